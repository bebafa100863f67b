"""A tiny built-in demo model, made at first use with no download.

``ensure_demo_model`` writes a Hugging Face-style folder (tokenizer, chat template, config,
random weights) so the daemon can start anywhere. Everything is derived from constants in this
file, so the folder is byte-identical on every machine; DEMO_VERSION names the folder and must
change whenever anything here does.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from livelm.protocol.errors import ModelLoadError

DEMO_VERSION = "v1"
DEMO_SEED = 1234

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
EOT = "<|eot_id|>"
LLAMA3_SPECIAL_TOKENS = [BOS, EOS, "<|start_header_id|>", "<|end_header_id|>", EOT]

# GPT-2 style split, except each digit stands alone so numbers tokenize digit by digit.
_SPLIT_PATTERN = r"'(?:[sdmt]|ll|ve|re)| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# A Llama-3-style template: header tokens around the role, <|eot_id|> after each turn.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}\n"
    "{{- message['content'] | trim }}\n"
    "{{- '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}
_VOCAB_TARGET = 1024

_PROSE = """\
The market opened higher on Monday as traders weighed fresh inflation data against strong earnings.
Shares of large technology companies rose while energy stocks fell with the price of crude oil.
The central bank kept interest rates unchanged and said it would watch the labour market closely.
Bond yields slipped after the report, and the dollar weakened against the euro and the yen.
Volume was light in the morning session but picked up sharply after the announcement at noon.
An analyst said the rally looked stretched and that investors should expect more volatility.
The order book showed heavy bids near the previous close and thin offers above the high.
When the spread widens, market makers pull their quotes and liquidity can vanish in seconds.
A stop loss order becomes a market order once the price touches the trigger level.
Moving averages smooth the noise of daily prices so that the trend is easier to see.
The relative strength index rose above seventy, which some traders read as overbought.
Futures on the index pointed to a weaker open after a sell-off in Asian markets overnight.
Gold climbed to a record as investors looked for safety during the uncertainty.
The company reported revenue of four billion dollars, beating the forecast of analysts.
Guidance for the next quarter was cautious, and the stock dropped in after-hours trading.
Please summarize the latest data and tell me whether the trend is up, down or flat.
What was the highest price in the last hour, and when did it happen?
Answer briefly: is the volume today above or below the average of the past week?
The service restarted at midnight after a deployment, and error rates returned to normal.
Latency on the payment endpoint rose to three hundred milliseconds during the peak.
The disk on the database server is ninety percent full; an alert was sent to the team.
A sensor in the north building reported a temperature of twenty one degrees and rising.
The pump vibration exceeded the threshold twice this morning and then settled down.
The agent called the search tool, read the results, and wrote a short answer for the user.
You are a helpful assistant. Read the stream of events and answer questions about it.
Each line of data is one record with a timestamp, a symbol and the open, high, low and close.
If the data does not contain the answer, say that you do not know instead of guessing.
Yesterday the weather was cold and rainy, but today the sun is out and the air is warm.
She walked to the station, bought a coffee and read the news while waiting for the train.
Numbers matter: one, two, three, four, five, six, seven, eight, nine, ten, hundred, thousand.
Zero, eleven, twelve, twenty, thirty, forty, fifty, sixty, seventy, eighty, ninety, million.
"""

_SYMBOLS = ("AAPL", "MSFT", "NVDA", "TSLA", "AMZN", "BTC-USD", "ETH-USD", "EURUSD", "SPY", "GLD")


def _market_lines(count: int) -> Iterator[str]:
    """Deterministic OHLCV-, trade- and log-like lines; no RNG so nothing can drift."""
    for i in range(count):
        sym = _SYMBOLS[i % len(_SYMBOLS)]
        base = 100 + (i * 37) % 900
        cents = (i * 53) % 100
        minute = i % 60
        hour = 9 + (i // 60) % 8
        yield (
            f"2024-03-{1 + i % 28:02d} {hour:02d}:{minute:02d} {sym} o={base}.{cents:02d} "
            f"h={base + 1}.{(cents + 17) % 100:02d} l={base - 1}.{(cents + 71) % 100:02d} "
            f"c={base}.{(cents + 29) % 100:02d} v={(i * 7919) % 500000}"
        )
        side = "buy" if i % 3 else "sell"
        yield json.dumps({"sym": sym, "px": base + cents / 100, "qty": i % 50 + 1, "side": side})
        status = (200, 200, 201, 404, 500)[i % 5]
        yield (
            f"{hour:02d}:{minute:02d}:{i % 60:02d} INFO request path=/v1/orders/{i} "
            f"status={status} ms={(i * 13) % 400}"
        )


def demo_corpus() -> list[str]:
    return _PROSE.splitlines() + list(_market_lines(240))


def build_bpe_tokenizer(
    corpus: Iterable[str], vocab_size: int, special_tokens: list[str], bos: str | None
) -> Tokenizer:
    """Train a byte-level BPE on ``corpus``; ``bos`` (one of ``special_tokens``) is prepended
    to every encoded text when given, like Llama's post-processor."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    if bos is not None:
        bos_id = tokenizer.token_to_id(bos)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return tokenizer


def ensure_demo_model(cache_dir: Path) -> Path:
    """The demo model's folder under ``cache_dir``, written first if it isn't there yet."""
    final = cache_dir / f"livelm-demo-{DEMO_VERSION}"
    if final.is_dir():
        return final
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".livelm-demo-", dir=cache_dir))
    except OSError as exc:
        raise ModelLoadError(f"cannot write the demo model under {cache_dir}: {exc}") from exc
    try:
        _write_demo(staging)
        _make_readable(staging)
        os.rename(staging, final)  # atomic: readers see a whole folder or none
    except OSError as exc:
        if not final.is_dir():  # another process finishing first is fine; anything else is not
            raise ModelLoadError(f"cannot write the demo model to {final}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _write_demo(folder: Path) -> None:
    tokenizer = build_bpe_tokenizer(demo_corpus(), _VOCAB_TARGET, LLAMA3_SPECIAL_TOKENS, BOS)
    tokenizer.save(str(folder / "tokenizer.json"))
    ids = {t: tokenizer.token_to_id(t) for t in (BOS, EOS, EOT)}
    config = _config(tokenizer.get_vocab_size(with_added_tokens=True), ids)
    _write_json(folder / "tokenizer_config.json", _tokenizer_config())
    _write_json(folder / "config.json", config)
    _write_json(
        folder / "generation_config.json",
        {"bos_token_id": ids[BOS], "eos_token_id": [ids[EOS], ids[EOT]]},
    )
    save_file(_random_weights(config), str(folder / "model.safetensors"), metadata={"format": "pt"})


def _make_readable(folder: Path) -> None:
    # mkdtemp makes the folder private; the model is not secret and may be shared by users
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def _tokenizer_config() -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOT,
        "model_max_length": 8192,
        "chat_template": LLAMA3_CHAT_TEMPLATE,
    }


def _config(vocab_size: int, ids: dict[str, int]) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **_SHAPE,
        "vocab_size": vocab_size,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "bos_token_id": ids[BOS],
        "eos_token_id": [ids[EOS], ids[EOT]],
    }


def _random_weights(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(DEMO_SEED)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config["head_dim"]
    q_size = config["num_attention_heads"] * head_dim
    kv_size = config["num_key_value_heads"] * head_dim
    vocab = config["vocab_size"]

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * 0.02

    weights = {"model.embed_tokens.weight": normal(vocab, hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights[p + "self_attn.q_proj.weight"] = normal(q_size, hidden)
        weights[p + "self_attn.k_proj.weight"] = normal(kv_size, hidden)
        weights[p + "self_attn.v_proj.weight"] = normal(kv_size, hidden)
        weights[p + "self_attn.o_proj.weight"] = normal(hidden, q_size)
        weights[p + "mlp.gate_proj.weight"] = normal(inter, hidden)
        weights[p + "mlp.up_proj.weight"] = normal(inter, hidden)
        weights[p + "mlp.down_proj.weight"] = normal(hidden, inter)
        weights[p + "input_layernorm.weight"] = torch.ones(hidden)
        weights[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
    weights["model.norm.weight"] = torch.ones(hidden)
    weights["lm_head.weight"] = normal(vocab, hidden)
    return weights


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
