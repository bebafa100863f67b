"""A tiny Llama checkpoint that answers every chat request with one scripted text, then stops.

A random model never emits a tool call, so the end-to-end tool tests use this one. Its
attention and MLP outputs are zero, so the residual stream at a position is just the token's
embedding, and the logits are ``norm(embedding) @ lm_head.T``. The script's whole text is ONE
added (non-special) token; ``lm_head`` gives that token a large multiple of the normalised
embedding of the assistant header's last token, and the eos token a large multiple of the
script token's own: after the header the model emits the script, then eos.

Styles: ``hermes`` (ChatML with a Qwen-2.5-like tool template, ``<tool_call>`` format) and
``llama3`` (the Llama-3.1-like template of tests/tiny_models.py, bare JSON calls).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tokenizers
import torch

from tests.tiny_models import (
    LLAMA3_TEMPLATE,
    TINY_LAYERS,
    _transformers,
    qwen_tools_system_turn,
    train_test_tokenizer,
)

HERMES_SCRIPT = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
LLAMA3_SCRIPT = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
SCRIPT_GAIN = 12.0  # multiple of a unit vector; the scripted logit is this times sqrt(hidden)

# Qwen-2.5-like: tools in the system turn, prior calls as <tool_call> blocks, tool results as
# <tool_response> in a user turn.
HERMES_TEMPLATE = (
    qwen_tools_system_turn(
        "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>",
        '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n',
    )
    + """{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
)

_STYLES: dict[str, dict[str, Any]] = {
    "hermes": {
        "tokens": "chatml",
        "template": HERMES_TEMPLATE,
        "script": HERMES_SCRIPT,
        "eos": "<|im_end|>",
        "bos": None,
    },
    "llama3": {
        "tokens": "llama3",
        "template": LLAMA3_TEMPLATE,
        "script": LLAMA3_SCRIPT,
        "eos": "<|eot_id|>",
        "bos": "<|begin_of_text|>",
    },
}
_SHAPE: dict[str, Any] = {
    **TINY_LAYERS,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


def make_scripted_checkpoint(folder: Path, style: str) -> Path:
    """Write the scripted model of ``style`` (``hermes`` or ``llama3``) into ``folder``."""
    spec = _STYLES[style]
    tokenizer = _write_tokenizer(folder, spec)
    ids = {name: tokenizer.token_to_id(spec[name]) for name in ("script", "eos")}
    header_end = _header_last_token(tokenizer, spec)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    bos = tokenizer.token_to_id(spec["bos"]) if spec["bos"] else None
    transformers = _transformers()
    config = transformers.LlamaConfig(
        vocab_size=vocab, bos_token_id=bos, eos_token_id=[ids["eos"]], **_SHAPE
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _script(model, header_end, ids["script"], ids["eos"])
    model.save_pretrained(folder)
    generation = {"bos_token_id": bos, "eos_token_id": [ids["eos"]]}
    (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


def _write_tokenizer(folder: Path, spec: dict[str, Any]) -> tokenizers.Tokenizer:
    train_test_tokenizer(folder, spec["tokens"])
    tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.add_tokens([tokenizers.AddedToken(spec["script"], normalized=False, special=False)])
    tokenizer.save(str(folder / "tokenizer.json"))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = spec["template"]
    config_path.write_text(json.dumps(config, indent=2))
    return tokenizer


def _header_last_token(tokenizer: tokenizers.Tokenizer, spec: dict[str, Any]) -> int:
    """The last token of every rendered prompt: the end of the assistant header."""
    header = "<|im_start|>assistant\n" if spec["tokens"] == "chatml" else "<|end_header_id|>\n\n"
    return tokenizer.encode(header, add_special_tokens=False).ids[-1]


def _script(model: Any, header_end: int, script: int, eos: int) -> None:
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.model.embed_tokens.weight
        head = model.lm_head.weight
        head.normal_(0.0, 0.02)
        head[script] += SCRIPT_GAIN * _unit(embed[header_end])
        head[eos] += SCRIPT_GAIN * _unit(embed[script])


def _unit(row: torch.Tensor) -> torch.Tensor:
    # the final norm's weight is 1, so norm(embedding) points along the embedding
    return row / row.norm()
