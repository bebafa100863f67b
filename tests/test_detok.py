"""Streaming detokenization: the text deltas of a growing answer join up to exactly what
decoding the whole answer gives, cut at the first stop string, for every tokenizer kind."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livelm.daemon.engine.detok import TextTracker
from livelm.daemon.model.tokenizer import Tokenizer
from tests.tiny_models import tokenizer_folder

KINDS = ("demo", "llama3", "nfkc-metaspace")
checks = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module", params=KINDS)
def tokenizer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_folder(tokenizer_folder(request.param, tmp_path_factory.mktemp(request.param)))


def stream(tokenizer: Tokenizer, ids: list[int], stop: tuple[str, ...]) -> tuple[str, TextTracker]:
    tracker, answer, shown = TextTracker(tokenizer, stop), [], []
    for token in ids:
        answer.append(token)  # the worker grows one list, as here
        shown.append(tracker.update(answer))
        if tracker.stopped:
            break
    shown.append(tracker.finish())
    return "".join(shown), tracker


token_ids = st.lists(st.integers(0, 399), max_size=40)


@checks
@given(ids=token_ids)
def test_deltas_join_up_to_the_whole_decode(tokenizer: Tokenizer, ids: list[int]) -> None:
    text, tracker = stream(tokenizer, ids, ())
    assert text == tracker.text == tokenizer.decode(ids)


@checks
@given(ids=token_ids, stop=st.sampled_from(["e", " t", "\n", "ab", "the "]))
def test_text_ends_before_the_first_stop_string(
    tokenizer: Tokenizer, ids: list[int], stop: str
) -> None:
    text, tracker = stream(tokenizer, ids, (stop,))
    whole = tokenizer.decode(ids)
    cut = whole.find(stop)
    if cut >= 0:
        assert tracker.stopped and text == whole[:cut]
    else:
        assert not tracker.stopped and text == whole
