"""Table-driven tests and golden vectors for ferry.wire.framing (COBS + CRC32C frames)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from crc32c import crc32c

from ferry.errors import UsageError
from ferry.wire.framing import (
    MAX_PAYLOAD,
    FrameDecoder,
    encode_frame,
    framed_size,
    max_encoded_size,
)

VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "framing.json").read_text())[
    "vectors"
]


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"][:40] for v in VECTORS])
def test_golden_vectors_encode_and_decode(vector: dict[str, str]) -> None:
    payload = bytes.fromhex(vector["payload"])
    frame = bytes.fromhex(vector["frame"])
    assert encode_frame(payload) == frame
    decoder = FrameDecoder(max_payload=len(payload))
    assert decoder.feed(frame) == [payload]
    assert decoder.errors == 0


def test_hand_checked_vectors() -> None:
    # Derived by hand, independently of the encoder: CRC32C("") = 0 -> 00 00 00 00 -> five
    # 0x01 codes; CRC32C("123456789") = 0xE3069283 (the standard check value).
    assert encode_frame(b"") == bytes.fromhex("00 0101010101 00")
    assert encode_frame(b"123456789") == bytes.fromhex("00 0e 313233343536373839 839206e3 00")
    assert crc32c(b"123456789") == 0xE3069283


def _frame(payload: bytes) -> bytes:
    return encode_frame(payload)


P1 = b"first \x00 payload"
P2 = bytes(range(256)) * 3
P3 = b""


@pytest.mark.parametrize(
    ("stream", "expected", "errors"),
    [
        pytest.param(b"", [], 0, id="nothing"),
        pytest.param(b"\x00" * 10, [], 0, id="only delimiters are empty frames, not errors"),
        pytest.param(_frame(P1), [P1], 0, id="one frame"),
        pytest.param(_frame(P1) + _frame(P2) + _frame(P3), [P1, P2, P3], 0, id="three frames"),
        pytest.param(_frame(P1)[1:], [P1], 0, id="no leading delimiter"),
        pytest.param(b"line noise" + _frame(P1), [P1], 1, id="garbage before a frame"),
        pytest.param(b"\xde\xad\x00\xbe\xef" + _frame(P1), [P1], 2, id="garbage with a zero"),
        pytest.param(_frame(P1) + b"\x07junk\x00" + _frame(P2), [P1, P2], 1, id="junk between"),
        pytest.param(b"\x00\x05ab\x00", [], 1, id="COBS block runs past the frame end"),
        pytest.param(b"\x00\x02a\x00", [], 1, id="shorter than a CRC"),
        pytest.param(
            b"\x00\x01\x01\x01\x01\x01" * 3 + b"\x00", [P3] * 3, 0, id="one 0x00 between frames"
        ),
    ],
)
def test_decoder_table(stream: bytes, expected: list[bytes], errors: int) -> None:
    decoder = FrameDecoder(max_payload=1000)
    assert decoder.feed(stream) == expected
    assert decoder.errors == errors
    assert decoder.frames == len(expected)


def test_frame_incomplete_until_delimiter_arrives() -> None:
    decoder = FrameDecoder(max_payload=100)
    frame = encode_frame(P1)
    assert decoder.feed(frame[:-1]) == []
    assert decoder.buffered == len(frame) - 2
    assert decoder.feed(b"\x00") == [P1]
    assert decoder.buffered == 0


def test_byte_at_a_time() -> None:
    decoder = FrameDecoder(max_payload=len(P2))
    stream = encode_frame(P1) + encode_frame(P2)
    got = [payload for i in range(len(stream)) for payload in decoder.feed(stream[i : i + 1])]
    assert got == [P1, P2]
    assert decoder.errors == 0


def test_corrupted_crc_is_dropped_and_counted() -> None:
    frame = bytearray(encode_frame(b"payload with a checksum"))
    frame[-2] ^= 0x01  # last CRC byte (non-zero either way, so COBS stays valid)
    assert frame[-2] != 0
    decoder = FrameDecoder(max_payload=100)
    assert decoder.feed(bytes(frame) + encode_frame(P1)) == [P1]
    assert (decoder.errors, decoder.crc_errors, decoder.cobs_errors) == (1, 1, 0)


def test_every_single_bit_flip_is_rejected_or_harmless() -> None:
    for payload in (b"", b"x", bytes(range(256)) * 2 + b"\x00\x00tail"):
        frame = encode_frame(payload)
        for bit in range(len(frame) * 8):
            damaged = bytearray(frame)
            damaged[bit // 8] ^= 1 << (bit % 8)
            got = FrameDecoder(max_payload=len(payload)).feed(bytes(damaged))
            assert got in ([], [payload]), (payload[:8], bit)


def test_oversize_frame_dropped_then_resync() -> None:
    decoder = FrameDecoder(max_payload=100)
    assert decoder.feed(encode_frame(b"\x01" * 101) + encode_frame(P1)) == [P1]
    assert (decoder.errors, decoder.oversize_errors) == (1, 1)


def test_payload_at_limit_accepted() -> None:
    worst = b"\x01" * 600  # no zero bytes: the longest encoding of 600 bytes
    decoder = FrameDecoder(max_payload=600)
    assert decoder.feed(encode_frame(worst)) == [worst]


def test_decoded_payload_over_limit_but_short_encoding_dropped() -> None:
    # 301 bytes with zeros every 150 bytes encode to 306 bytes, inside the 306-byte COBS
    # limit of a 300-byte payload; the decoded length check must catch it.
    payload = (b"\x09" * 149 + b"\x00") * 2 + b"\x09"
    frame = encode_frame(payload)
    assert len(frame) - 2 <= max_encoded_size(300 + 4)
    decoder = FrameDecoder(max_payload=300)
    assert decoder.feed(frame) == []
    assert decoder.oversize_errors == 1


def test_oversize_stream_never_buffers_unbounded() -> None:
    decoder = FrameDecoder(max_payload=1400)
    limit = max_encoded_size(1400 + 4)
    chunk = b"\xaa" * 4096
    for _ in range(2560):  # 10 MiB with no delimiter
        assert decoder.feed(chunk) == []
        assert decoder.buffered <= limit
    assert (decoder.errors, decoder.oversize_errors) == (1, 1)  # one error for the whole run
    assert decoder.feed(b"\xbb\xbb" + encode_frame(P1)) == [P1]  # resync at the next 0x00
    assert decoder.errors == 1


def test_oversize_complete_body_in_one_feed() -> None:
    decoder = FrameDecoder(max_payload=10)
    assert decoder.feed(b"\x00" + b"\x33" * 50 + b"\x00" + encode_frame(b"ok")) == [b"ok"]
    assert decoder.oversize_errors == 1


@pytest.mark.parametrize(
    ("payload_len", "size"),
    [(0, 7), (1, 8), (249, 256), (250, 258), (1400, 1412), (1472, 1484), (MAX_PAYLOAD, 65_771)],
)
def test_framed_size_table(payload_len: int, size: int) -> None:
    assert framed_size(payload_len) == size


def test_framed_size_is_exact_for_zero_free_data() -> None:
    payload = b"\x5a" * 1400
    assert 0 not in crc32c(payload).to_bytes(4, "little")
    assert len(encode_frame(payload)) == framed_size(1400)


@pytest.mark.parametrize(
    "call",
    [
        lambda: encode_frame(bytes(MAX_PAYLOAD + 1)),
        lambda: FrameDecoder(max_payload=-1),
        lambda: FrameDecoder(max_payload=MAX_PAYLOAD + 1),
        lambda: framed_size(-1),
    ],
    ids=["payload too large", "negative max", "max too large", "negative size"],
)
def test_local_misuse_raises_usage_error(call: Callable[[], object]) -> None:
    with pytest.raises(UsageError):
        call()


def test_max_payload_frame_roundtrip() -> None:
    payload = bytes(range(256)) * (MAX_PAYLOAD // 256) + b"\x01" * (MAX_PAYLOAD % 256)
    assert FrameDecoder(MAX_PAYLOAD).feed(encode_frame(payload)) == [payload]
