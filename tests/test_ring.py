"""Tests for the native SPSC ring (livelm.native.ring)."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livelm.native.ring import Ring, RingClosedError

# A wait() that should return at once runs in a thread joined with this limit, so a broken
# wake-up fails the test instead of hanging it. Not a performance bound.
HANG_GUARD_S = 30.0
LONG_WAIT_S = 120.0


def u32(values: list[int] | range) -> np.ndarray:
    return np.asarray(values, dtype=np.uint32)


def run_in_thread(
    fn: Callable[[], object], before_join: Callable[[], None] | None = None
) -> object:
    """Run ``fn`` in a daemon thread, optionally call ``before_join``, return fn's result."""
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    thread.start()
    if before_join is not None:
        before_join()
    thread.join(HANG_GUARD_S)
    assert not thread.is_alive(), "wait() did not return"
    assert len(result) == 1
    return result[0]


def assert_wait_blocks(ring: Ring) -> None:
    """Check that wait() sleeps (no data, no pending wake), then wake it up."""
    returned = threading.Event()

    def wait() -> None:
        ring.wait(LONG_WAIT_S)
        returned.set()

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    assert not returned.wait(0.2), "wait() returned with no data and no wake"
    ring.wake()
    thread.join(HANG_GUARD_S)
    assert returned.is_set(), "wake() did not end the wait"


@pytest.mark.parametrize("capacity", [-16, 0, 1, 8, 15, 17, 24, 100, 1000])
def test_bad_capacity(capacity: int) -> None:
    with pytest.raises(ValueError, match="power of two >= 16"):
        Ring(capacity)


def test_capacity_must_be_an_integer() -> None:
    with pytest.raises(TypeError):
        Ring(16.0)  # type: ignore[arg-type]


def test_fresh_ring() -> None:
    with Ring(1024) as ring:
        assert (ring.capacity, ring.used, ring.free) == (1024, 0, 1024)


def test_empty() -> None:
    with Ring(16) as ring:
        got = ring.read(10)
        assert got.dtype == np.uint32 and got.size == 0
        assert ring.read_into(np.empty(8, dtype=np.uint32)) == 0
        assert ring.peek(4).size == 0
        ring.consume(5)  # no-op on an empty ring
        assert ring.used == 0
        assert ring.wait(0) is False
        assert ring.wait(0.01) is False


def test_full() -> None:
    with Ring(16) as ring:
        assert ring.write(u32(range(10)))
        assert ring.write(u32(range(100, 107))) is False  # 17 > 16: nothing written
        assert (ring.used, ring.free) == (10, 6)
        assert ring.write(u32(range(10, 16)))  # exactly full
        assert (ring.used, ring.free) == (16, 0)
        assert ring.write([99]) is False
        assert ring.write([]) is True
        np.testing.assert_array_equal(ring.read(100), u32(range(16)))
        assert ring.write(u32(range(16)))  # a whole-capacity write into an empty ring
        np.testing.assert_array_equal(ring.read(16), u32(range(16)))


def test_write_too_big_for_the_ring() -> None:
    with Ring(16) as ring:
        assert ring.write(u32(range(17))) is False
        assert ring.used == 0


def test_wraparound_read() -> None:
    # Chunk sizes coprime with the capacity put the wrap point everywhere.
    with Ring(64) as ring:
        sent = received = 0
        for i in range(2000):
            n = (7, 13, 29, 37, 64)[i % 5]
            assert ring.write(u32(range(sent, sent + n)))
            sent += n
            got = ring.read((5, 31, 64)[i % 3])
            np.testing.assert_array_equal(got, u32(range(received, received + got.size)))
            received += got.size
            got = ring.read(64)
            np.testing.assert_array_equal(got, u32(range(received, received + got.size)))
            received += got.size
        assert received == sent and sent > 100 * 64


def test_wraparound_peek_consume_read_into() -> None:
    with Ring(32) as ring:
        sent = received = 0
        out = np.empty(32, dtype=np.uint32)
        for i in range(1000):
            n = 1 + (i * 11) % 32
            if ring.write(u32(range(sent, sent + n))):
                sent += n
            k = 1 + (i * 7) % 32
            peeked = ring.peek(k)
            np.testing.assert_array_equal(peeked, u32(range(received, received + peeked.size)))
            assert ring.used >= peeked.size  # peek does not consume
            if i % 2:
                ring.consume(k)
                received += peeked.size
            else:
                got = ring.read_into(out[:k])
                assert got == peeked.size
                np.testing.assert_array_equal(out[:got], peeked)
                received += got
        assert sent > 10 * 32
        np.testing.assert_array_equal(ring.read(32), u32(range(received, sent)))


def test_sequence_inputs() -> None:
    with Ring(16) as ring:
        assert ring.write([1, 2, 3])
        assert ring.write((4, 5))
        assert ring.write(range(6, 8))
        assert ring.write([2**32 - 1])
        np.testing.assert_array_equal(ring.read(16), u32([1, 2, 3, 4, 5, 6, 7, 2**32 - 1]))
        with pytest.raises(OverflowError):
            ring.write([-1])
        with pytest.raises(OverflowError):
            ring.write([2**32])
        assert ring.used == 0


def test_rejects_wrong_arrays() -> None:
    with Ring(16) as ring:
        with pytest.raises(TypeError, match="uint32"):
            ring.write(np.arange(4, dtype=np.int64))
        with pytest.raises(TypeError, match="C-contiguous"):
            ring.write(np.arange(8, dtype=np.uint32)[::2])
        readonly = np.zeros(4, dtype=np.uint32)
        readonly.flags.writeable = False
        assert ring.write(readonly)  # reading from a read-only buffer is fine
        with pytest.raises(TypeError, match="writable"):
            ring.read_into(readonly)
        with pytest.raises(TypeError):
            ring.read_into(np.empty(4, dtype=np.int32))
        with pytest.raises(ValueError):
            ring.read(-1)
        with pytest.raises(ValueError):
            ring.wait(-1.0)
        with pytest.raises(ValueError):
            ring.wait(math.nan)


def test_wake_before_wait_returns_at_once() -> None:
    ring = Ring(16)
    ring.wake()
    assert run_in_thread(lambda: ring.wait(LONG_WAIT_S)) is False
    assert_wait_blocks(ring)  # the pending wake was used up by that wait
    ring.wake()
    assert ring.wait(0) is False  # a poll uses it up too
    assert_wait_blocks(ring)
    ring.close()


def test_wake_interrupts_a_long_wait() -> None:
    # Also shows wait() releases the GIL: this thread runs while the other one waits.
    ring = Ring(16)

    def wake_soon() -> None:
        time.sleep(0.05)  # best effort: let the other thread fall asleep first
        ring.wake()

    assert run_in_thread(lambda: ring.wait(LONG_WAIT_S), wake_soon) is False
    ring.close()


@pytest.mark.parametrize("timeout_s", [None, math.inf, 1e300])
def test_wait_without_limit_is_woken(timeout_s: float | None) -> None:
    ring = Ring(16)

    def wake_soon() -> None:
        time.sleep(0.05)
        ring.wake()

    assert run_in_thread(lambda: ring.wait(timeout_s), wake_soon) is False
    ring.close()


def test_write_wakes_a_waiting_consumer() -> None:
    ring = Ring(16)

    def write_soon() -> None:
        time.sleep(0.05)
        assert ring.write([1, 2, 3])

    assert run_in_thread(lambda: ring.wait(LONG_WAIT_S), write_soon) is True
    np.testing.assert_array_equal(ring.read(16), u32([1, 2, 3]))
    ring.close()


def test_wait_returns_true_when_data_is_there() -> None:
    ring = Ring(16)
    ring.wake()
    assert ring.write([7])
    assert ring.wait(0) is True  # data wins, and the pending wake is used up
    ring.read(1)
    assert_wait_blocks(ring)
    ring.close()


def test_close() -> None:
    ring = Ring(16)
    ring.close()
    ring.close()  # idempotent
    assert ring.closed
    for use in (
        lambda: ring.write([1]),
        lambda: ring.read(1),
        lambda: ring.peek(1),
        lambda: ring.consume(1),
        lambda: ring.wait(0),
        ring.wake,
        lambda: ring.used,
        lambda: ring.free,
        lambda: ring.capacity,
    ):
        with pytest.raises(RingClosedError, match="closed"):
            use()
    with Ring(16) as other:
        pass
    assert other.closed


def test_spsc_ten_million_ids() -> None:
    """Two threads move 0..N-1 through a small ring in variable chunks: nothing lost,
    duplicated or reordered."""
    n_ids = 10_000_000
    ring = Ring(4096)
    ids = np.arange(n_ids, dtype=np.uint32)
    rng = np.random.default_rng(20240611)
    # A mix of tiny chunks and chunks up to the whole ring.
    k = n_ids // 1000
    sizes = np.where(rng.random(k) < 0.3, rng.integers(1, 16, k), rng.integers(16, 4097, k))
    edges = np.concatenate(([0], np.cumsum(sizes)))
    edges = np.append(edges[edges < n_ids], n_ids)
    read_sizes = rng.integers(1, 8193, 1 << 16)

    errors: list[BaseException] = []
    done = threading.Event()

    def produce() -> None:
        try:
            for a, b in zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True):
                chunk = ids[a:b]
                while not ring.write(chunk):
                    time.sleep(20e-6)  # ring full: let the consumer catch up
        except BaseException as exc:  # handed to the test thread below
            errors.append(exc)
        finally:
            done.set()

    out = np.empty(n_ids, dtype=np.uint32)
    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    pos = reads = 0
    deadline = time.monotonic() + 300  # hang guard only
    while pos < n_ids:
        if not ring.wait(0.5):
            assert not errors, errors
            assert not (done.is_set() and ring.used == 0), f"stream ended after {pos} ids"
            assert time.monotonic() < deadline, "consumer stalled"
            continue
        size = int(read_sizes[reads % read_sizes.size])
        pos += ring.read_into(out[pos : pos + size])
        reads += 1
    producer.join(HANG_GUARD_S)
    assert not producer.is_alive()
    assert not errors, errors
    assert ring.used == 0, "extra ids after the last one"
    np.testing.assert_array_equal(out, ids)
    ring.close()


def test_ping_pong_never_loses_a_wake_up() -> None:
    """Two threads hand one word back and forth, so every round trip has a consumer going
    to sleep while the producer publishes: a lost wake-up shows as a timed-out wait."""
    rounds = 20_000
    ping, pong = Ring(16), Ring(16)
    timeouts: list[str] = []

    def echo() -> None:
        for _ in range(rounds):
            if not ping.wait(5.0):
                timeouts.append("echo")
                return
            if not pong.write(ping.read(1)):
                timeouts.append("echo: pong full")
                return

    echoer = threading.Thread(target=echo, daemon=True)
    echoer.start()
    for i in range(rounds):
        assert ping.write([i])
        if not pong.wait(5.0):
            timeouts.append("main")
            break
        assert pong.read(1).tolist() == [i]
    echoer.join(HANG_GUARD_S)
    assert not echoer.is_alive()
    assert not timeouts, f"lost wake-up in {timeouts}"
    ping.close()
    pong.close()


_words = st.lists(st.integers(0, 2**32 - 1), max_size=40)
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("write"), _words),
        st.tuples(st.just("write_np"), _words),
        st.tuples(st.sampled_from(["read", "read_into", "peek", "consume"]), st.integers(0, 70)),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(capacity=st.sampled_from([16, 32, 64]), ops=_ops)
def test_matches_deque_model(capacity: int, ops: list[tuple[str, object]]) -> None:
    model: deque[int] = deque()
    with Ring(capacity) as ring:
        for op, arg in ops:
            if op in ("write", "write_np"):
                assert isinstance(arg, list)
                fits = len(model) + len(arg) <= capacity
                words = u32(arg) if op == "write_np" else arg
                assert ring.write(words) is fits
                if fits:
                    model.extend(arg)
            else:
                assert isinstance(arg, int)
                expected = list(model)[:arg]
                if op == "read":
                    assert ring.read(arg).tolist() == expected
                elif op == "read_into":
                    out = np.empty(arg, dtype=np.uint32)
                    assert ring.read_into(out) == len(expected)
                    assert out[: len(expected)].tolist() == expected
                elif op == "peek":
                    assert ring.peek(arg).tolist() == expected
                else:
                    ring.consume(arg)
                if op != "peek":
                    for _ in expected:
                        model.popleft()
            assert ring.used == len(model)
            assert ring.free == capacity - len(model)
