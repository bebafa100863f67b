"""The piece cache encodes entries exactly as ``encode`` does, for every tokenizer the tests
build, on any text (property-tested), and says in the log when a tokenizer cannot use it."""

from __future__ import annotations

import logging

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer

from livelm.daemon.engine.formats import render_entry
from livelm.daemon.model.tokenizer import Tokenizer
from tests.tiny_models import CHATML_TOKENS, LLAMA3_TOKENS, metaspace_tokenizer, tokenizer_folder

SPECIAL_TEXTS = LLAMA3_TOKENS + CHATML_TOKENS + ["<|", "|>", "<|eot_id", "eot_id|>"]
KINDS = ("demo", "llama3", "chatml", "nfkc-metaspace")


@pytest.fixture(scope="module", params=KINDS)
def tokenizer(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Tokenizer:
    tok = Tokenizer.from_folder(tokenizer_folder(request.param, tmp_path_factory.mktemp(request.param)))
    tok.use_piece_cache(4096)
    assert tok.piece_cache is not None
    return tok


WHITESPACE = [" ", "  ", "\t", "\n", "\r\n", "   \n", "\u200b", "\u00a0"]
DIGITS_AND_MARKS = ["0", "7", "123", "4.50", "-", "=", ",", ":", "'s", "'ll"]
WORDS = ["AAPL", " o=", " v=", "é", "ﬁ", "Ⅻ", "東京", "🚀"]  # ﬁ and Ⅻ change under NFKC
pieces = st.sampled_from(SPECIAL_TEXTS + WHITESPACE + DIGITS_AND_MARKS + WORDS)
mixed_text = st.lists(st.one_of(pieces, st.text(max_size=6)), max_size=24).map("".join)
number = st.one_of(
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
)
ohlcv = st.fixed_dictionaries(
    {
        "t": st.one_of(
            st.integers(0, 2**40),
            st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r"), max_size=20),
        ),
        "o": number,
        "h": number,
        "l": number,
        "c": number,
        "v": number,
    },
    optional={"s": st.sampled_from(["AAPL", "BTC-USD", "<|eot_id|>", "東京"])},
)
entries = st.one_of(
    st.text(max_size=80),
    mixed_text,
    ohlcv.map(lambda e: render_entry(e, "ohlcv", 0)),
    st.dictionaries(st.text(max_size=8), st.one_of(number, st.text(max_size=10)), max_size=4).map(
        lambda e: render_entry(e, "json", 0)
    ),
)
slow = settings(
    max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@slow
@given(batch=st.lists(entries.map(lambda e: render_entry(e, "text", 0)), min_size=1, max_size=8))
def test_piece_cache_equals_encode(tokenizer: Tokenizer, batch: list[str]) -> None:
    assert tokenizer.encode_batch(batch) == [tokenizer.encode(text) for text in batch]


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batch=st.lists(mixed_text, min_size=1, max_size=6))
def test_a_tiny_cache_that_keeps_clearing_stays_exact(
    tokenizer: Tokenizer, batch: list[str]
) -> None:
    cache = tokenizer.piece_cache
    tokenizer.use_piece_cache(3)
    try:
        assert tokenizer.encode_batch(batch) == [tokenizer.encode(text) for text in batch]
        assert len(tokenizer.piece_cache._pieces) <= 3
    finally:
        tokenizer.piece_cache = cache


def test_hits_and_misses_are_counted(tokenizer: Tokenizer) -> None:
    cache = tokenizer.piece_cache
    line = "ZQXJ 2024-03-01 o=187.25 qwzx\n"
    before = (cache.hits, cache.misses)
    tokenizer.encode_batch([line])
    tokenizer.encode_batch([line])
    hits, misses = cache.hits - before[0], cache.misses - before[1]
    assert misses > 0 and hits >= misses  # the second encoding found every piece


def test_a_tokenizer_without_pre_tokenizer_encodes_whole_and_says_so(tmp_path, caplog) -> None:
    folder = metaspace_tokenizer(tmp_path / "bare")
    backend = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    backend.pre_tokenizer = None
    tok = Tokenizer(backend)
    with caplog.at_level(logging.INFO, logger="livelm.tokenizer"):
        tok.use_piece_cache(4096)
        tok.use_piece_cache(0)
    assert tok.piece_cache is None
    assert "no pre-tokenizer" in caplog.text and "encoded whole" in caplog.text
    assert "token_cache_pieces: 0" in caplog.text
    assert tok.encode_batch(["a b  c"]) == [tok.encode("a b  c")]


def test_daemon_counts_cache_hits(demo_daemon) -> None:
    sid = requests.post(f"{demo_daemon.url}/v1/sessions/init", json={}, timeout=30).json()[
        "session_id"
    ]
    for _ in range(2):
        push = {"data": ["MSFT 2024-03-01 o=411.5 c=412.25"]}
        reply = requests.post(
            f"{demo_daemon.url}/v1/sessions/{sid}/stream/push", json=push, timeout=30
        )
        assert reply.status_code == 200
    text = requests.get(f"{demo_daemon.url}/metrics", timeout=30).text
    values = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("livelm_token_cache_")
    }
    assert values["livelm_token_cache_hits_total"] > 0
    assert values["livelm_token_cache_misses_total"] > 0


def test_bulk_batches_use_the_native_encoder_and_stay_exact(tokenizer: Tokenizer) -> None:
    """Pushes past PIECE_CACHE_MAX_BATCH entries skip the cache (no GIL-bound lookups)."""
    from livelm.daemon.model.tokenizer import PIECE_CACHE_MAX_BATCH

    cache = tokenizer.piece_cache
    batch = [f"AAPL t={i} o={180 + i % 7}.25 c={181 + i % 5}.5" for i in range(PIECE_CACHE_MAX_BATCH + 1)]
    before = (cache.hits, cache.misses)
    assert tokenizer.encode_batch(batch) == [tokenizer.encode(text) for text in batch]
    assert (cache.hits, cache.misses) == before
    assert tokenizer.encode_batch(batch[:2]) == [tokenizer.encode(text) for text in batch[:2]]
    assert (cache.hits, cache.misses) != before
