"""Length-prefixed frames of the raw TCP transport: a 4-byte big-endian length N, then N bytes.

Sans-I/O: ``FrameDecoder.feed`` takes bytes as they arrive and gives back whole payloads. A
header announcing more than ``max_frame`` bytes is refused as soon as its 4 bytes are in, before
any of the body is read; a zero-length frame is a bad frame. Either error leaves the decoder
unusable (the connection is closed after the error is sent).
"""

from __future__ import annotations

from livelm.protocol.errors import ErrorCode, LiveLMError, TooLarge

HEADER_BYTES = 4
MAX_LENGTH = (1 << (8 * HEADER_BYTES)) - 1  # the largest length a header can hold


class BadFrame(LiveLMError):
    """The byte stream is not a sequence of frames (a zero-length frame, a broken stream)."""

    code = ErrorCode.BAD_FRAME

    def __init__(self, message: str, *, frames: list[bytes] | None = None) -> None:
        super().__init__(message)
        self.frames = frames or []  # the whole frames decoded before the bad one


class FrameTooLarge(TooLarge):
    """A header announced ``length`` bytes, more than the connection's ``max_frame``."""

    def __init__(self, length: int, max_frame: int, *, frames: list[bytes] | None = None) -> None:
        super().__init__(f"frame of {length} bytes exceeds max_frame ({max_frame} bytes)")
        self.length = length
        self.max_frame = max_frame
        self.frames = frames or []  # the whole frames decoded before the oversized one


def encode_frame(payload: bytes) -> bytes:
    """The frame holding ``payload`` (which must not be empty)."""
    if not payload:
        raise ValueError("a frame's payload must not be empty")
    if len(payload) > MAX_LENGTH:
        raise ValueError(f"a frame holds at most {MAX_LENGTH} bytes, got {len(payload)}")
    return len(payload).to_bytes(HEADER_BYTES, "big") + payload


class FrameDecoder:
    """Splits a byte stream into frame payloads; keeps the bytes of an incomplete frame."""

    def __init__(self, max_frame: int) -> None:
        if max_frame < 1:
            raise ValueError("max_frame must be at least 1 byte")
        self.max_frame = max_frame
        self._buffer = bytearray()
        self._broken: str | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for a frame that is not complete yet."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """The payloads completed by ``data``, in order.

        Raises ``FrameTooLarge`` or ``BadFrame`` (carrying the payloads completed before the
        bad header in ``.frames``); after that every call raises ``BadFrame``.
        """
        if self._broken is not None:
            raise BadFrame(f"the frame stream is broken: {self._broken}")
        self._buffer += data
        frames: list[bytes] = []
        pos = 0
        end = len(self._buffer)
        try:
            while end - pos >= HEADER_BYTES:
                length = int.from_bytes(self._buffer[pos : pos + HEADER_BYTES], "big")
                self._check_length(length, frames)
                if end - pos - HEADER_BYTES < length:
                    break
                start = pos + HEADER_BYTES
                frames.append(bytes(self._buffer[start : start + length]))
                pos = start + length
        except (FrameTooLarge, BadFrame) as exc:
            self._broken = exc.message
            self._buffer.clear()
            raise
        del self._buffer[:pos]
        return frames

    def _check_length(self, length: int, frames: list[bytes]) -> None:
        if length == 0:
            raise BadFrame("zero-length frame", frames=frames)
        if length > self.max_frame:
            raise FrameTooLarge(length, self.max_frame, frames=frames)
