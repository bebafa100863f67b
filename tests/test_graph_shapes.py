"""Which captured graph a step replays (``graphs.pick_shape``): pure host logic, so it is
checked here without CUDA; the graphs' numerics are checked on the GPU (test_gpu_exactness)."""

from __future__ import annotations

from livelm.daemon.engine.graphs import (
    DATA_BUCKETS,
    PACKED_MAX_ROWS,
    PREFILL_BUCKETS,
    data_sizes,
    packed_sizes,
    pick_packed,
    pick_shape,
    slower_than_larger,
)
from livelm.daemon.engine.scheduler import Chunk
from livelm.daemon.engine.sequence import QueryState, SessionState

DECODE = [1, 2, 4, 8]
PREFILL = list(PREFILL_BUCKETS)
DATA = data_sizes(max(PREFILL), 2048)


def data(length: int) -> Chunk:
    return Chunk(SessionState(tokens=[0] * 5000), 100, length, sample=False)


def question(length: int, score: bool = False) -> Chunk:
    return Chunk(QueryState(tokens=[0] * 5000), 100, length, sample=not score, score=score)


def test_data_sizes_start_past_the_questions_and_stop_at_the_limit() -> None:
    assert DATA[0] > max(PREFILL) and DATA[-1] == 2048
    assert data_sizes(128, 0) == []
    assert data_sizes(128, 600) == [192, 224, 256, 288, 320, 352, 384, 416, 448, 480, 512, 576]
    assert data_sizes(256, 512) == [288, 320, 352, 384, 416, 448, 480, 512]


def test_a_data_chunk_takes_the_smallest_bucket_that_holds_it() -> None:
    assert pick_shape([data(100)], DECODE, PREFILL, DATA) == (1, 128)
    assert pick_shape([data(404)], DECODE, PREFILL, DATA) == (1, 416)
    assert pick_shape([data(1109)], DECODE, PREFILL, DATA) == (1, 1152)
    assert pick_shape([data(2048)], DECODE, PREFILL, DATA) == (1, 2048)
    assert pick_shape([data(2049)], DECODE, PREFILL, DATA) is None  # eager


def test_questions_and_scoring_chunks_never_take_a_graph_without_logits() -> None:
    assert pick_shape([question(32)], DECODE, PREFILL, DATA) == (1, 32)
    assert pick_shape([question(200)], DECODE, PREFILL, DATA) is None
    assert pick_shape([question(200, score=True)], DECODE, PREFILL, DATA) is None


def test_decode_rows_batch_and_mixed_steps_run_eagerly() -> None:
    rows = [question(1) for _ in range(3)]
    assert pick_shape(rows, DECODE, PREFILL, DATA) == (4, 1)
    assert pick_shape([question(1) for _ in range(9)], DECODE, PREFILL, DATA) is None
    assert pick_shape([data(300), data(300)], DECODE, PREFILL, DATA) is None


def test_padding_stays_within_an_eighth_to_2048_tokens_and_a_quarter_past() -> None:
    for small, large in zip(DATA_BUCKETS, DATA_BUCKETS[1:], strict=False):
        if small >= 256:
            assert large <= small * (1.125 if large <= 2048 else 1.25)


def test_a_size_a_larger_one_beats_is_dropped() -> None:
    # the H200's 448-row step, whose up-projection cuBLAS ran slower than at 480 rows
    times = {416: 14.0, 448: 17.5, 480: 14.9, 512: 15.2}
    assert slower_than_larger(times, 0.03) == [448]


def test_sizes_within_the_margin_of_a_larger_one_are_kept() -> None:
    assert slower_than_larger({256: 10.0, 288: 9.8, 320: 11.0}, 0.03) == []
    assert slower_than_larger({256: 10.0, 288: 9.6, 320: 11.0}, 0.03) == [256]
    assert slower_than_larger({2048: 5.0}, 0.03) == []
    # a size beaten by a larger one two steps up, not by its neighbour
    assert slower_than_larger({256: 10.0, 288: 10.5, 320: 9.0}, 0.03) == [256, 288]


def test_several_sessions_data_packs_into_the_fewest_rows_that_hold_it() -> None:
    sizes = packed_sizes(1024)
    # capped: past PACKED_MAX_ROWS an eager step is no longer host-bound
    assert sizes[0] == 16 and sizes[-1] == PACKED_MAX_ROWS == 640 and sizes == sorted(sizes)
    assert packed_sizes(300)[-1] <= 300
    seqs = 9  # up to 8 sessions, and the padding rows' sequence
    assert pick_packed([data(10), data(5)], seqs, sizes) == 16
    assert pick_packed([data(300), data(100), data(17)], seqs, sizes) == 448
    assert pick_packed([data(16)] * 8, seqs, sizes) == 128


def test_packed_steps_take_only_several_sessions_data_within_the_limits() -> None:
    sizes, seqs = packed_sizes(512), 9
    assert pick_packed([data(10)], seqs, sizes) is None  # one chunk: the (1, L) graphs
    assert pick_packed([data(16)] * 9, seqs, sizes) is None  # no sequence left for padding
    assert pick_packed([data(400), data(200)], seqs, sizes) is None  # past the largest
    assert pick_packed([data(10), question(5)], seqs, sizes) is None
    assert pick_packed([data(10), question(5, score=True)], seqs, sizes) is None
    assert pick_packed([data(10), data(5)], 0, []) is None  # off
