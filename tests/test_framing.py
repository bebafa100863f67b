"""The length-prefixed framer: any split of a byte stream gives the same frames; bad headers
are refused as soon as they are seen."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from livelm.protocol.errors import ErrorCode, TooLarge
from livelm.protocol.framing import (
    HEADER_BYTES,
    BadFrame,
    FrameDecoder,
    FrameTooLarge,
    encode_frame,
)

payloads = st.lists(st.binary(min_size=1, max_size=300), max_size=20)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False)]


def test_encode_frame_is_big_endian_length_then_payload() -> None:
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert encode_frame(b"x" * 258)[:HEADER_BYTES] == b"\x00\x00\x01\x02"
    with pytest.raises(ValueError):
        encode_frame(b"")


@given(payloads, st.lists(st.integers(min_value=0), max_size=40))
def test_any_split_of_the_stream_gives_the_same_frames(
    frames: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(encode_frame(p) for p in frames)
    decoder = FrameDecoder(max_frame=300)
    got: list[bytes] = []
    for piece in split(stream, cuts):
        got += decoder.feed(piece)
    assert got == frames
    assert decoder.buffered == 0


@given(payloads, st.integers(min_value=1, max_value=299))
def test_buffered_counts_the_bytes_of_an_incomplete_frame(frames: list[bytes], cut: int) -> None:
    last = b"y" * 300
    stream = b"".join(encode_frame(p) for p in frames) + encode_frame(last)
    decoder = FrameDecoder(max_frame=300)
    assert decoder.feed(stream[:-cut]) == frames
    assert decoder.buffered == HEADER_BYTES + len(last) - cut
    assert decoder.feed(stream[-cut:]) == [last]
    assert decoder.buffered == 0


@given(payloads, st.integers(min_value=101, max_value=(1 << 32) - 1))
def test_oversized_header_is_refused_before_its_body(frames: list[bytes], length: int) -> None:
    decoder = FrameDecoder(max_frame=100)
    ok = [p[:100] for p in frames]
    head = b"".join(encode_frame(p) for p in ok)
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(head + length.to_bytes(HEADER_BYTES, "big"))  # no body byte sent
    assert info.value.length == length
    assert info.value.frames == ok  # the whole frames before it are handed over
    assert isinstance(info.value, TooLarge) and info.value.code is ErrorCode.TOO_LARGE
    with pytest.raises(BadFrame):  # the decoder stays broken
        decoder.feed(encode_frame(b"ok"))


def test_oversized_header_split_across_feeds_is_refused_once_complete() -> None:
    decoder = FrameDecoder(max_frame=10)
    assert decoder.feed(b"\x00\x00") == []
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"\x00\x0b")


def test_zero_length_frame_is_a_bad_frame() -> None:
    decoder = FrameDecoder(max_frame=10)
    with pytest.raises(BadFrame) as info:
        decoder.feed(encode_frame(b"a") + b"\x00\x00\x00\x00")
    assert info.value.code is ErrorCode.BAD_FRAME
    assert info.value.frames == [b"a"]


def test_frame_of_exactly_max_frame_passes() -> None:
    decoder = FrameDecoder(max_frame=5)
    assert decoder.feed(encode_frame(b"12345")) == [b"12345"]
