"""Tiny Hugging Face checkpoints and tokenizers for tests, and transformers as the reference.

Only tests import this module (the daemon never imports transformers).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tokenizers
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, normalizers, pre_tokenizers, trainers

from livelm.daemon.model.demo import build_bpe_tokenizer, demo_corpus, ensure_demo_model

TEST_VOCAB = 500

LLAMA3_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
]
CHATML_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Llama-3.1-like: a system header that always appears (with dates and optional tools).
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if date_string is not defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {{- "Call a function by replying with JSON {\\"name\\": ..., \\"parameters\\": ...}.\\n\\n" }}
    {%- for tool in tools %}
        {{- tool | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message['role'] in ['ipython', 'tool'] %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message['content'] is mapping %}
            {{- message['content'] | tojson }}
        {%- else %}
            {{- message['content'] }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- elif message['role'] in ['user', 'assistant'] %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
        {{- message['content'] | trim + '<|eot_id|>' }}
    {%- else %}
        {{- raise_exception("unsupported role: " + message['role']) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Qwen's system turn when tools are offered: the system text (or a default), then the tools
# as JSON lines between two texts (TOOLS_INTRO, TOOLS_OUTRO: jinja string contents).
_QWEN_TOOLS_SYSTEM_TURN = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "TOOLS_INTRO" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "TOOLS_OUTRO" }}
"""


def qwen_tools_system_turn(intro: str, outro: str) -> str:
    """The ``{%- if tools %}`` branch opening a Qwen-like template (see above)."""
    return _QWEN_TOOLS_SYSTEM_TURN.replace("TOOLS_INTRO", intro).replace("TOOLS_OUTRO", outro)


# Qwen-like ChatML: a default system turn, tools listed as JSON lines.
CHATML_TEMPLATE = (
    qwen_tools_system_turn("\\n\\n# Tools\\n\\n<tools>", "\\n</tools><|im_end|>\\n")
    + """{%- elif messages[0]['role'] != 'system' %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first and tools %}
        {%- continue %}
    {%- endif %}
    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
)

_EXTRA_CORPUS = [
    "Café au lait, naïve façade, jalapeño, Zürich and São Paulo.",
    "東京の株式市場は上昇した。Привет, как дела? Γειά σου κόσμε.",
    "Emoji and symbols: 🚀 📈 ✓ € £ ¥ ± ≤ ≥ → ∞.",
    "def f(x):\n    return x * 2  # code, tabs\tand\r\nnewlines",
]

_FAMILY_STYLE = {"llama": "llama3", "mistral": "llama3", "qwen2": "chatml", "qwen3": "chatml"}
TINY_LAYERS: dict[str, Any] = {  # the layer shapes every tiny test checkpoint shares
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}
_SHAPE: dict[str, Any] = {
    **TINY_LAYERS,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    # large enough that random models do not just repeat a token, so greedy tests discriminate
    "initializer_range": 0.2,
}
_FAMILY_CONFIG: dict[str, dict[str, Any]] = {
    "llama": {
        "tie_word_embeddings": False,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
    "mistral": {"tie_word_embeddings": False, "sliding_window": 4096, "rope_theta": 1000000.0},
    "qwen2": {"tie_word_embeddings": True, "rope_theta": 1000000.0},
    "qwen3": {"tie_word_embeddings": True, "rope_theta": 1000000.0},
}
FAMILIES = tuple(_FAMILY_CONFIG)

_hf_models: dict[Path, Any] = {}


def tiny_corpus() -> list[str]:
    return demo_corpus() + _EXTRA_CORPUS


def train_test_tokenizer(folder: Path, special_tokens_style: str) -> None:
    """Write tokenizer.json and tokenizer_config.json of a tiny byte-level BPE into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    if special_tokens_style == "llama3":
        tokenizer = build_bpe_tokenizer(tiny_corpus(), TEST_VOCAB, LLAMA3_TOKENS, LLAMA3_TOKENS[0])
        config = {
            "bos_token": "<|begin_of_text|>",
            # the dict form older checkpoints use
            "eos_token": {
                "__type": "AddedToken",
                "content": "<|eot_id|>",
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
            },
            "chat_template": LLAMA3_TEMPLATE,
        }
    elif special_tokens_style == "chatml":
        tokenizer = build_bpe_tokenizer(tiny_corpus(), TEST_VOCAB, CHATML_TOKENS, None)
        config = {
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            # the list form of named templates
            "chat_template": [{"name": "default", "template": CHATML_TEMPLATE}],
        }
    else:
        raise ValueError(f"unknown special_tokens_style {special_tokens_style!r}")
    tokenizer.save(str(folder / "tokenizer.json"))
    config |= {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def make_tiny_checkpoint(
    folder: Path, family: str, *, sharded: bool = False, seed: int = 0
) -> Path:
    """A tiny random float32 checkpoint of ``family`` with its tokenizer, saved by transformers."""
    transformers = _transformers()

    style = _FAMILY_STYLE[family]
    train_test_tokenizer(folder, style)
    tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = {t: tokenizer.token_to_id(t) for t in LLAMA3_TOKENS + CHATML_TOKENS}
    if style == "llama3":
        bos, eos = ids["<|begin_of_text|>"], [ids["<|end_of_text|>"], ids["<|eot_id|>"]]
    else:
        bos, eos = ids["<|endoftext|>"], [ids["<|im_end|>"], ids["<|endoftext|>"]]
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    config_class = transformers.AutoConfig.for_model(family).__class__
    config = config_class(
        vocab_size=vocab, bos_token_id=bos, eos_token_id=eos, **_SHAPE, **_FAMILY_CONFIG[family]
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _perturb_norms_and_biases(model)
    model.save_pretrained(folder, max_shard_size="100KB" if sharded else "50GB")
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": bos, "eos_token_id": eos}, indent=2)
    )
    return folder


def _perturb_norms_and_biases(model: torch.nn.Module) -> None:
    # transformers starts norms at 1 and biases at 0, which would hide a decoder that skips them
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
            elif "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)


def _transformers() -> Any:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    return transformers


def _hf_model(folder: Path) -> Any:
    transformers = _transformers()

    key = folder.resolve()
    if key not in _hf_models:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            key, dtype=torch.float32, attn_implementation="eager"
        )
        _hf_models[key] = model.eval()
    return _hf_models[key]


def hf_last_logits(folder: Path, token_ids: list[int]) -> torch.Tensor:
    """transformers' logits for the next token after ``token_ids`` (float32, [vocab])."""
    with torch.no_grad():
        out = _hf_model(folder)(torch.tensor([token_ids]))
    return out.logits[0, -1].float()


def hf_greedy(folder: Path, token_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation by transformers, a full forward pass per token, no stop at EOS."""
    ids = list(token_ids)
    for _ in range(max_new_tokens):
        ids.append(int(hf_last_logits(folder, ids).argmax()))
    return ids[len(token_ids) :]


def hf_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The weights transformers loads from ``folder``, by Hugging Face name."""
    return dict(_hf_model(folder).state_dict())


def metaspace_tokenizer(folder: Path) -> Path:
    """A SentencePiece-like BPE with a normalizer (NFKC), to cover normalizing first."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def tokenizer_folder(kind: str, folder: Path) -> Path:
    """A folder holding a tokenizer of one kind the tests cover: ``demo`` (the demo model's),
    ``llama3`` or ``chatml`` (trained byte-level BPEs), or ``nfkc-metaspace``."""
    if kind == "demo":
        return ensure_demo_model(folder)
    if kind == "nfkc-metaspace":
        return metaspace_tokenizer(folder)
    train_test_tokenizer(folder, kind)
    return folder
