"""Hypothesis properties of ferry.wire.framing."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ferry.wire.framing import (
    FrameDecoder,
    _cobs_decode,
    _cobs_encode,
    encode_frame,
    framed_size,
    max_encoded_size,
)

MAX = 2100  # above the longest generated payload (8 x 255 bytes)
payloads = st.binary(max_size=1500)
# Zero-heavy and run-heavy payloads reach the COBS edge cases (empty blocks, 254-byte runs)
# that uniformly random bytes rarely hit.
structured = st.lists(
    st.sampled_from([b"\x00", b"\x01" * 253, b"\x02" * 254, b"\x03" * 255, b"ab"]), max_size=8
).map(b"".join)
any_payload = payloads | structured


def reference_cobs_encode(data: bytes) -> bytes:
    """Byte-at-a-time COBS (the textbook loop), to check the split-based encoder against."""
    out = bytearray([0])
    code_at, code = 0, 1
    for index, byte in enumerate(data):
        if byte:
            out.append(byte)
            code += 1
        if not byte or code == 0xFF:
            out[code_at] = code
            if byte and index == len(data) - 1:
                return bytes(out)  # a full block ends the data: no trailing empty block
            code_at, code = len(out), 1
            out.append(0)
    out[code_at] = code
    return bytes(out)


def split_at(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(stream)) for cut in cuts})
    return [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]


def feed_all(decoder: FrameDecoder, pieces: list[bytes]) -> list[bytes]:
    limit = max_encoded_size(decoder.max_payload + 4)
    got = []
    for piece in pieces:
        got += decoder.feed(piece)
        assert decoder.buffered <= limit
    return got


def counters(decoder: FrameDecoder) -> tuple[int, ...]:
    return (
        decoder.frames,
        decoder.errors,
        decoder.cobs_errors,
        decoder.crc_errors,
        decoder.oversize_errors,
    )


@given(any_payload)
def test_cobs_matches_reference_and_roundtrips(data: bytes) -> None:
    encoded = _cobs_encode(data)
    assert encoded == reference_cobs_encode(data)
    assert 0 not in encoded
    assert len(encoded) <= max_encoded_size(len(data))
    assert _cobs_decode(encoded) == data


@given(any_payload)
def test_decode_encode_roundtrip(payload: bytes) -> None:
    decoder = FrameDecoder(max_payload=len(payload))
    assert decoder.feed(encode_frame(payload)) == [payload]
    assert counters(decoder) == (1, 0, 0, 0, 0)


@given(any_payload)
def test_framed_size_bounds_the_frame(payload: bytes) -> None:
    size = len(encode_frame(payload))
    assert framed_size(len(payload)) - (len(payload) + 4) // 254 <= size
    assert size <= framed_size(len(payload))


@given(st.lists(any_payload, max_size=6), st.lists(st.integers(min_value=0, max_value=10_000)))
def test_split_points_do_not_matter(frames: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(payload) for payload in frames)
    whole = FrameDecoder(max_payload=MAX)
    split = FrameDecoder(max_payload=MAX)
    assert whole.feed(stream) == frames
    assert feed_all(split, split_at(stream, cuts)) == frames
    assert counters(whole) == counters(split)


@given(
    st.lists(st.one_of(payloads.map(encode_frame), st.binary(max_size=600)), max_size=8),
    st.lists(st.integers(min_value=0, max_value=10_000)),
    st.integers(min_value=0, max_value=600),
)
def test_split_points_do_not_matter_with_garbage(
    pieces: list[bytes], cuts: list[int], max_payload: int
) -> None:
    stream = b"".join(pieces)
    whole = FrameDecoder(max_payload=max_payload)
    split = FrameDecoder(max_payload=max_payload)
    assert whole.feed(stream) == feed_all(split, split_at(stream, cuts))
    assert counters(whole) == counters(split)


@given(st.lists(any_payload, min_size=1, max_size=4), st.data())
def test_single_bit_flip_never_yields_a_wrong_payload(
    frames: list[bytes], data: st.DataObject
) -> None:
    stream = bytearray(b"".join(encode_frame(payload) for payload in frames))
    bit = data.draw(st.integers(min_value=0, max_value=len(stream) * 8 - 1), label="bit")
    stream[bit // 8] ^= 1 << (bit % 8)
    got = FrameDecoder(max_payload=MAX).feed(bytes(stream))
    # Whatever arrives is a subsequence of what was sent: a flip only ever loses frames.
    remaining = iter(frames)
    assert all(any(payload == sent for sent in remaining) for payload in got)
    assert len(got) >= len(frames) - 1  # a flip breaks at most the one frame it touches


@given(st.lists(st.binary(max_size=2000), max_size=10), st.integers(min_value=0, max_value=2000))
def test_arbitrary_bytes_never_raise_and_stay_bounded(
    chunks: list[bytes], max_payload: int
) -> None:
    decoder = FrameDecoder(max_payload=max_payload)
    for payload in feed_all(decoder, chunks):
        assert len(payload) <= max_payload
    assert decoder.errors == decoder.cobs_errors + decoder.crc_errors + decoder.oversize_errors


@given(any_payload)
def test_non_minimal_cobs_is_accepted(data: bytes) -> None:
    # An encoder that always ends with an (empty) final block is also understood.
    last_run = data.rsplit(b"\x00", 1)[-1]
    if last_run and len(last_run) % 254 == 0:
        assert _cobs_encode(data)[-255] == 0xFF
        assert _cobs_decode(_cobs_encode(data) + b"\x01") == data
