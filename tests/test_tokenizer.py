"""Tokenizer against transformers' PreTrainedTokenizerFast: ids, BOS, chat rendering, chat split."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livelm.daemon.model.tokenizer import TEXT_CACHE_MAX_CHARS, ChatTemplateError, Tokenizer
from livelm.protocol.errors import ModelLoadError
from tests.tiny_models import CHATML_TOKENS, LLAMA3_TOKENS, train_test_tokenizer

STYLES = ("llama3", "chatml")
SPECIALS = {"llama3": LLAMA3_TOKENS, "chatml": CHATML_TOKENS}

TEXTS = [
    "",
    " ",
    "Hello world",
    "  leading and trailing spaces  ",
    "The market opened higher on Monday.",
    "2024-03-04 09:31 AAPL o=182.15 h=182.90 l=181.77 c=182.44 v=120340",
    '{"sym": "BTC-USD", "px": 64210.5, "qty": 0.25, "side": "buy"}',
    "line one\nline two\r\n\n\ttabbed",
    "Café naïve 東京 Привет 🚀📈 ≤≥∞",
    "it's they're we'll I'd you've",
    "1234567890 3.14159 -42 1e-5",
    "<|begin_of_text|>hello<|eot_id|>",
    "<|im_start|>user\nhi<|im_end|>\n",
    "text <|end_of_text|> more <|start_header_id|>user<|end_header_id|>",
    "<|not_a_token|> <|eot_id",
]

SYSTEM = "You watch a market feed. Answer briefly; say ‘unknown’ when the data lacks it."
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_price",
            "description": "Latest price of a symbol (e.g. “AAPL”, €-priced ok)",
            "parameters": {
                "type": "object",
                "properties": {"symbol": {"type": "string"}},
                "required": ["symbol"],
            },
        },
    }
]
CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "What is the last close?"}],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Trend?"}],
    [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "  Was volume high?  "},
        {"role": "assistant", "content": "Yes, above the weekly average.", "tool_calls": None},
        {"role": "user", "content": "And the high? 東京 🚀"},
    ],
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    for style in STYLES:
        train_test_tokenizer(root / style, style)
    return {style: root / style for style in STYLES}


@pytest.fixture(scope="module")
def ours(folders: dict[str, Path]) -> dict[str, Tokenizer]:
    return {style: Tokenizer.from_folder(folder) for style, folder in folders.items()}


@pytest.fixture(scope="module")
def hf(folders: dict[str, Path]) -> dict[str, Any]:
    from transformers import PreTrainedTokenizerFast

    return {style: PreTrainedTokenizerFast.from_pretrained(f) for style, f in folders.items()}


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / folder.name
    shutil.copytree(folder, target)
    return target


# ---- special tokens --------------------------------------------------------------------------
def test_bos_is_found_for_llama3_style(ours: dict[str, Tokenizer]) -> None:
    tok = ours["llama3"]
    assert tok.bos_id is not None
    assert tok.bos_id == tok.token_id("<|begin_of_text|>")


def test_no_bos_for_chatml_style(ours: dict[str, Tokenizer]) -> None:
    assert ours["chatml"].bos_id is None


def test_bos_matches_what_transformers_prepends(
    ours: dict[str, Tokenizer], hf: dict[str, Any]
) -> None:
    for style in STYLES:
        with_specials = hf[style].encode("Hello", add_special_tokens=True)
        without = hf[style].encode("Hello", add_special_tokens=False)
        prepended = with_specials[: len(with_specials) - len(without)]
        assert prepended == ([] if ours[style].bos_id is None else [ours[style].bos_id])


def test_eos_and_vocab(ours: dict[str, Tokenizer], hf: dict[str, Any]) -> None:
    # llama3 style gives eos_token as a {"content": ...} dict, chatml as a plain string
    assert ours["llama3"].eos_ids == (ours["llama3"].token_id("<|eot_id|>"),)
    assert ours["chatml"].eos_ids == (ours["chatml"].token_id("<|im_end|>"),)
    for style in STYLES:
        assert ours[style].eos_ids == (hf[style].eos_token_id,)
        assert ours[style].vocab_size == len(hf[style])


# ---- encode and decode -----------------------------------------------------------------------
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(
    ours: dict[str, Tokenizer], hf: dict[str, Any], style: str, text: str
) -> None:
    assert ours[style].encode(text) == hf[style].encode(text, add_special_tokens=False)


def test_special_tokens_in_text_are_recognized(ours: dict[str, Tokenizer]) -> None:
    tok = ours["llama3"]
    ids = tok.encode("a<|eot_id|>b")
    assert tok.token_id("<|eot_id|>") in ids
    assert tok.bos_id not in tok.encode("plain text")


@settings(max_examples=150, deadline=None)
@given(
    pieces=st.lists(
        st.one_of(st.text(max_size=40), st.sampled_from(LLAMA3_TOKENS + CHATML_TOKENS)),
        max_size=6,
    )
)
def test_encode_matches_transformers_on_any_text(
    ours: dict[str, Tokenizer], hf: dict[str, Any], pieces: list[str]
) -> None:
    text = "".join(pieces)
    for style in STYLES:
        assert ours[style].encode(text) == hf[style].encode(text, add_special_tokens=False)


@settings(max_examples=80, deadline=None)
@given(
    pieces=st.lists(
        st.one_of(st.text(max_size=40), st.sampled_from(LLAMA3_TOKENS + CHATML_TOKENS)),
        max_size=6,
    ),
    cached=st.booleans(),
)
def test_literal_specials_encode_as_transformers_splits_them(
    cache_on_off: dict[tuple[str, bool], Tokenizer], hf: dict[str, Any], pieces: list[str],
    cached: bool,
) -> None:
    """Data that spells a special token, encoded as plain text: transformers'
    ``split_special_tokens``, through the piece cache or not."""
    text = "".join(pieces)
    for style in STYLES:
        tok = cache_on_off[style, cached]
        want = hf[style].encode(text, add_special_tokens=False, split_special_tokens=True)
        assert tok.encode_batch([text, "x"], literal_specials=True)[0] == want
        # the default still reads them as control tokens
        assert tok.encode_batch([text])[0] == hf[style].encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def cache_on_off(folders: dict[str, Path]) -> dict[tuple[str, bool], Tokenizer]:
    """Per style, a tokenizer with the piece cache on and one with it off."""
    made = {}
    for style in STYLES:
        for cached in (False, True):
            made[style, cached] = tok = Tokenizer.from_folder(folders[style])
            tok.use_piece_cache(4096 if cached else 0)
    return made


@pytest.mark.parametrize("style", STYLES)
def test_a_remembered_text_encodes_the_same_into_a_fresh_list(
    ours: dict[str, Tokenizer], hf: dict[str, Any], style: str
) -> None:
    tok = ours[style]
    text = "Is the trend up? Last close " + style
    first = tok.encode(text)
    first.append(-1)  # a caller extends its ids (a question suffix): the next call is unchanged
    again = tok.encode(text)
    assert again == hf[style].encode(text, add_special_tokens=False) == first[:-1]
    long = "price 101.25 volume 3000 " * (TEXT_CACHE_MAX_CHARS // 10)  # past the cached length
    assert tok.encode(long) == hf[style].encode(long, add_special_tokens=False)


@pytest.mark.parametrize("style", STYLES)
def test_encode_batch_equals_encode(ours: dict[str, Tokenizer], style: str) -> None:
    tok = ours[style]
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]


@pytest.mark.parametrize("style", STYLES)
def test_decode(ours: dict[str, Tokenizer], hf: dict[str, Any], style: str) -> None:
    tok = ours[style]
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special_tokens=False) == text
        assert tok.decode(ids) == hf[style].decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
    special = SPECIALS[style][0]
    assert tok.decode(tok.encode(f"{special}abc")) == "abc"


# ---- chat templates --------------------------------------------------------------------------
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("with_tools", [False, True])
def test_render_chat_matches_transformers(
    ours: dict[str, Tokenizer],
    hf: dict[str, Any],
    style: str,
    conversation: int,
    add_generation_prompt: bool,
    with_tools: bool,
) -> None:
    messages = CONVERSATIONS[conversation]
    tools = TOOLS if with_tools else None
    expected = hf[style].apply_chat_template(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    got = ours[style].render_chat(
        messages, add_generation_prompt=add_generation_prompt, tools=tools
    )
    assert got == expected
    if with_tools:
        assert "“AAPL”" in got  # tojson keeps non-ASCII text as it is


def test_tool_message_with_mapping_content(ours: dict[str, Tokenizer], hf: dict[str, Any]) -> None:
    messages = [
        {"role": "user", "content": "price?"},
        {"role": "tool", "content": {"symbol": "AAPL", "price": 182.4, "note": "ünïcode"}},
    ]
    expected = hf["llama3"].apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert ours["llama3"].render_chat(messages) == expected


def test_raise_exception_in_template_is_a_clear_error(ours: dict[str, Tokenizer]) -> None:
    with pytest.raises(ChatTemplateError, match="unsupported role: narrator"):
        ours["llama3"].render_chat([{"role": "narrator", "content": "Once upon a time"}])


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("user_text", ["What is the trend?", "Close > open? 東京 🚀\nanswer"])
def test_chat_split_rebuilds_the_rendering(
    ours: dict[str, Tokenizer], hf: dict[str, Any], style: str, user_text: str
) -> None:
    prefix, suffix = ours[style].chat_split(SYSTEM)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user_text}]
    expected = hf[style].apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prefix + user_text + suffix == expected
    assert SYSTEM in prefix
    assert suffix.endswith("assistant<|end_header_id|>\n\n" if style == "llama3" else "assistant\n")


def test_no_chat_template_means_raw(folders: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(folders["chatml"], tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_folder(folder)
    assert tok.chat_template is None
    with pytest.raises(ChatTemplateError, match='"raw"'):
        tok.chat_split("system prompt")


def test_chat_template_file_wins(folders: dict[str, Path], tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    folder = _copy(folders["llama3"], tmp_path)
    template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{{ eos_token }}"
    (folder / "chat_template.jinja").write_text(template)
    tok = Tokenizer.from_folder(folder)
    assert tok.chat_template == template
    messages = CONVERSATIONS[1]
    expected = PreTrainedTokenizerFast.from_pretrained(folder).apply_chat_template(
        messages, tokenize=False
    )
    assert tok.render_chat(messages, add_generation_prompt=False) == expected
    assert expected.endswith("<|eot_id|>")


def test_sentinel_shown_twice_is_refused(folders: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(folders["llama3"], tmp_path)
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m.content }}|{{ m.content }}{% endfor %}"
    )
    with pytest.raises(ChatTemplateError, match="2 times"):
        Tokenizer.from_folder(folder).chat_split("sys")


def test_template_syntax_error_fails_at_load(folders: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(folders["llama3"], tmp_path)
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(ModelLoadError, match="chat template does not compile"):
        Tokenizer.from_folder(folder)


def test_missing_tokenizer_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


def test_corrupt_tokenizer_file(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": 42}')
    with pytest.raises(ModelLoadError, match="cannot read"):
        Tokenizer.from_folder(tmp_path)
