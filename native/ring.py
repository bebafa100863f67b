"""Typed wrapper around the native lock-free SPSC ring of uint32 words.

One producer thread calls :meth:`Ring.write`; one consumer thread calls :meth:`Ring.read`,
:meth:`Ring.read_into`, :meth:`Ring.peek`, :meth:`Ring.consume` and :meth:`Ring.wait`.
:meth:`Ring.wake` and the size properties may be used from any thread. Every native call
runs with the GIL released, so a consumer sleeping in :meth:`Ring.wait` blocks no one.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from ._ring import ffi, lib

MIN_CAPACITY = 16

U32Array = npt.NDArray[np.uint32]

_U32_ARRAY = ffi.typeof("uint32_t[]")  # parsed once; from_buffer is on the hot path
_MAX_TIMEOUT_US = 2**62  # fits int64_t with room for the C side's deadline arithmetic


class RingClosedError(RuntimeError):
    """Raised when a closed :class:`Ring` is used."""


class Ring:
    """Single-producer/single-consumer ring buffer of uint32 words, backed by C.

    Besides the native ring, the wrapper keeps a staging array of the same size for
    :meth:`read` and :meth:`peek`, so small reads allocate only their result.
    """

    def __init__(self, capacity_words: int) -> None:
        capacity_words = operator.index(capacity_words)
        if capacity_words < MIN_CAPACITY or capacity_words & (capacity_words - 1):
            raise ValueError(
                f"ring capacity must be a power of two >= {MIN_CAPACITY} words, "
                f"got {capacity_words!r}"
            )
        ptr = lib.lr_ring_create(capacity_words)
        if ptr == ffi.NULL:
            raise MemoryError(f"cannot allocate a ring of {capacity_words} words")
        # ffi.gc frees the ring if close() is never called.
        self._ring: Any = ffi.gc(ptr, lib.lr_ring_destroy)
        self._capacity = capacity_words
        # Reused by read() and peek(): one more memcpy, but much cheaper than allocating
        # and wrapping a fresh array per call (from_buffer costs more than a small copy).
        self._scratch: U32Array = np.empty(capacity_words, dtype=np.uint32)
        self._scratch_ptr: Any = ffi.from_buffer(_U32_ARRAY, self._scratch)

    def _handle(self) -> Any:
        ring = self._ring
        if ring is None:
            raise RingClosedError("ring is closed")
        return ring

    def write(self, words: U32Array | Sequence[int]) -> bool:
        """Write all of ``words`` or nothing; returns False if they do not fit.

        A numpy array must be C-contiguous uint32 and is passed without copying.
        """
        ring = self._handle()
        if isinstance(words, np.ndarray):
            if words.dtype != np.uint32 or not words.flags.c_contiguous:
                raise TypeError(
                    f"ring.write() needs a C-contiguous uint32 array, got dtype={words.dtype}, "
                    f"c_contiguous={words.flags.c_contiguous}"
                )
            arr = words
        else:
            arr = np.asarray(words, dtype=np.uint32)
        if arr.size == 0:
            return True
        return bool(lib.lr_ring_write(ring, ffi.from_buffer(_U32_ARRAY, arr), arr.size))

    def read(self, max_words: int) -> U32Array:
        """Consume up to ``max_words`` words and return them as a new uint32 array."""
        ring = self._handle()
        if max_words < 0:
            raise ValueError(f"max_words must be >= 0, got {max_words}")
        got = lib.lr_ring_read(ring, self._scratch_ptr, min(max_words, self._capacity))
        return self._scratch[:got].copy()

    def read_into(self, out: U32Array) -> int:
        """Consume up to ``out.size`` words into ``out`` (C-contiguous uint32); returns the count."""
        ring = self._handle()
        flags = out.flags
        if out.dtype != np.uint32 or not flags.c_contiguous or not flags.writeable:
            raise TypeError("ring.read_into() needs a writable, C-contiguous uint32 array")
        if out.size == 0:
            return 0
        return int(lib.lr_ring_read(ring, ffi.from_buffer(_U32_ARRAY, out), out.size))

    def peek(self, n: int) -> U32Array:
        """Return a copy of up to ``n`` words at the read position without consuming them."""
        ring = self._handle()
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        got = lib.lr_ring_peek(ring, self._scratch_ptr, min(n, self._capacity))
        return self._scratch[:got].copy()

    def consume(self, n: int) -> None:
        """Drop up to ``n`` words (never more than are available)."""
        ring = self._handle()
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        lib.lr_ring_consume(ring, n)

    def wait(self, timeout_s: float | None) -> bool:
        """Block until data is available, :meth:`wake` is called, or ``timeout_s`` passes.

        ``None`` (or ``math.inf``) waits without a limit, 0 only polls. A :meth:`wake` that came while no
        one was waiting makes the next wait return at once. Returns True if data is
        available.
        """
        ring = self._handle()
        if timeout_s is None or timeout_s == math.inf:
            timeout_us = -1
        elif timeout_s >= 0:
            timeout_us = min(int(timeout_s * 1e6), _MAX_TIMEOUT_US)
        else:
            raise ValueError(f"timeout_s must be >= 0 or None, got {timeout_s}")
        return bool(lib.lr_ring_wait(ring, timeout_us))

    def wake(self) -> None:
        """Make the consumer's current or next :meth:`wait` return, even with no data."""
        lib.lr_ring_wake(self._handle())

    @property
    def used(self) -> int:
        """Words waiting to be read."""
        return int(lib.lr_ring_used(self._handle()))

    @property
    def free(self) -> int:
        """Words that can be written."""
        return int(lib.lr_ring_free(self._handle()))

    @property
    def capacity(self) -> int:
        """Total size in words."""
        self._handle()
        return self._capacity

    @property
    def closed(self) -> bool:
        return self._ring is None

    def close(self) -> None:
        """Free the native ring. Idempotent; no thread may be using the ring meanwhile."""
        ring, self._ring = self._ring, None
        if ring is not None:
            ffi.release(ring)

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._ring is None:
            return "Ring(closed)"
        return f"Ring(capacity={self._capacity}, used={self.used})"
