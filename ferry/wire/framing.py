"""COBS + CRC32C framing of datagrams on a byte stream (serial links). Pure, sans-IO.

A serial line delivers a stream of bytes with bit errors, dropped bytes and
no boundaries. Each datagram travels as one *frame*::

    0x00 | COBS(payload || CRC32C(payload) as 4 bytes little-endian) | 0x00

COBS (Consistent Overhead Byte Stuffing, Cheshire & Baker 1999) rewrites the
bytes so that 0x00 never occurs inside a frame; 0x00 is only ever a frame
delimiter, so a receiver that lost sync (line noise, started mid-frame) is
back in step at the next 0x00. The encoding is the canonical one: a block
that ends the data with 254 non-zero bytes (code 0xFF) is not followed by an
empty 0x01 block. Decoding also accepts that non-minimal form.

Leading delimiter: every frame *starts* with 0x00 as well as ending with one.
It costs one byte per frame (0.07 % at 1400-byte payloads) and means that
garbage left on the line (noise, a sender killed mid-frame, a receiver that
attached mid-frame) is closed off before the next frame begins, so only the
damaged frame is lost and never the good one that follows. Back-to-back frames
therefore carry two 0x00 in a row; the decoder ignores the empty frame
between them.

The CRC catches line errors (a serial link has bit errors rather than whole
lost packets); a bad frame is dropped and becomes an erasure for FEC. It is
not a security check: authenticity comes from the sealed packet inside.
"""

from __future__ import annotations

from crc32c import crc32c

from ferry.errors import UsageError

__all__ = [
    "CRC_SIZE",
    "MAX_COBS_RUN",
    "MAX_PAYLOAD",
    "FrameDecoder",
    "encode_frame",
    "framed_size",
    "max_encoded_size",
]

CRC_SIZE = 4
"""Bytes of CRC32C appended to each payload before COBS (little-endian)."""

MAX_COBS_RUN = 254
# The longest run of non-zero bytes one COBS code byte can describe: the code is
# 1..255 (never 0) and counts itself, so code 0xFF = 254 data bytes and no zero.

MAX_PAYLOAD = 65_507
# The largest payload a frame may carry. 65,507 is the largest UDP payload over IPv4
# (65,535 - 20 IP header - 8 UDP header): ferry sizes its sealed datagrams for UDP, so
# every datagram that fits one transport fits the other. It also caps what a decoder
# may be asked to buffer for one frame in progress (about 66 KiB).

_DELIMITER = b"\x00"
_FULL_BLOCK = 0xFF


def max_encoded_size(data_len: int) -> int:
    """Largest COBS encoding of ``data_len`` bytes (no delimiters): one code byte per block.

    Equal to ``data_len + 1 + data_len // 254``; reached when the data holds no
    zero byte (and its length is not a multiple of 254) or only trailing zeros.
    """
    return data_len + 1 + data_len // MAX_COBS_RUN


def framed_size(payload_len: int) -> int:
    """Bytes on the wire for one frame carrying ``payload_len`` bytes, both delimiters included.

    COBS output length depends on where the zero bytes are, so this is the
    exact *maximum* over all payloads of that length: what a pacer must budget
    so that it never under-counts. A frame is at most ``(payload_len + 4) // 254``
    bytes shorter than this (for sealed, random-looking 1400-byte datagrams,
    typically 2-3 bytes shorter).
    """
    if payload_len < 0:
        raise UsageError(f"payload length must be >= 0, got {payload_len}")
    return 2 + max_encoded_size(payload_len + CRC_SIZE)


def _cobs_encode(data: bytes) -> bytes:
    """COBS-encode ``data``; the result contains no 0x00 byte."""
    out = bytearray()
    parts = data.split(_DELIMITER)
    last = len(parts) - 1
    for index, part in enumerate(parts):
        size = len(part)
        start = 0
        # Full 254-byte runs: code 0xFF, no zero implied after them.
        while size - start >= MAX_COBS_RUN:
            out.append(_FULL_BLOCK)
            out += part[start : start + MAX_COBS_RUN]
            start += MAX_COBS_RUN
        rest = size - start
        # The final block (possibly empty) implies the zero that followed this part.
        # At the very end there is no zero to imply; a trailing empty block after a
        # full run would be redundant, so the canonical encoding omits it.
        if index != last or rest or size == 0:
            out.append(rest + 1)
            out += part[start:]
    return bytes(out)


def _cobs_decode(encoded: bytes) -> bytes | None:
    """Decode one COBS block sequence (no delimiters); ``None`` if it is malformed."""
    pieces: list[bytes] = []
    end_of_data = len(encoded)
    index = 0
    while index < end_of_data:
        code = encoded[index]
        end = index + code
        if code == 0 or end > end_of_data:
            return None  # a zero inside a frame, or a block running past the frame's end
        pieces.append(encoded[index + 1 : end])
        if code != _FULL_BLOCK and end < end_of_data:
            pieces.append(_DELIMITER)
        index = end
    return b"".join(pieces)


def encode_frame(payload: bytes) -> bytes:
    """Return the wire bytes of one frame: ``0x00 COBS(payload || crc32c LE) 0x00``.

    Raises :class:`~ferry.errors.UsageError` if the payload exceeds :data:`MAX_PAYLOAD`.
    """
    if len(payload) > MAX_PAYLOAD:
        raise UsageError(f"frame payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    crc = crc32c(payload).to_bytes(CRC_SIZE, "little")
    return _DELIMITER + _cobs_encode(payload + crc) + _DELIMITER


class FrameDecoder:
    """Turn a byte stream, fed in pieces of any size, back into frame payloads.

    Never raises on input: frames with bad COBS, a bad CRC, fewer than 4 bytes
    or a payload over ``max_payload`` are dropped and counted. A frame still
    in progress is buffered only up to the largest valid encoding of
    ``max_payload`` bytes; past that the decoder discards bytes until the next
    0x00 (one error for the whole oversize run).
    """

    def __init__(self, max_payload: int) -> None:
        """``max_payload``: largest payload accepted, 0..:data:`MAX_PAYLOAD`."""
        if not 0 <= max_payload <= MAX_PAYLOAD:
            raise UsageError(f"max_payload must be in 0..{MAX_PAYLOAD}, got {max_payload}")
        self.max_payload = max_payload
        self._max_encoded = max_encoded_size(max_payload + CRC_SIZE)
        self._partial = bytearray()
        self._skipping = False
        self.frames = 0
        """Valid frames decoded."""
        self.errors = 0
        """Frames dropped, for any reason (the sum of the three counters below)."""
        self.cobs_errors = 0
        """Dropped because the COBS structure was broken or the frame was shorter than a CRC."""
        self.crc_errors = 0
        """Dropped because the CRC32C did not match (line noise, lost bytes)."""
        self.oversize_errors = 0
        """Dropped because the frame was longer than ``max_payload`` allows."""

    @property
    def buffered(self) -> int:
        """Bytes held for the frame in progress (never more than the largest valid frame)."""
        return len(self._partial)

    def feed(self, data: bytes) -> list[bytes]:
        """Consume ``data`` and return the payloads of the frames it completes, in order."""
        payloads: list[bytes] = []
        if not data:
            return payloads
        chunks = data.split(_DELIMITER)
        if len(chunks) == 1:
            self._hold(data)
            return payloads
        # chunks[0] ends the frame in progress, chunks[1:-1] are whole frames,
        # chunks[-1] starts the next frame.
        if self._skipping:
            self._skipping = False  # the oversize frame is over; already counted
        elif self._partial:
            self._partial += chunks[0]
            body = bytes(self._partial)
            self._partial.clear()
            self._finish(body, payloads)
        else:
            self._finish(chunks[0], payloads)
        for body in chunks[1:-1]:
            self._finish(body, payloads)
        self._hold(chunks[-1])
        return payloads

    def _hold(self, tail: bytes) -> None:
        """Buffer the start of a frame in progress, or start skipping if it is too long."""
        if self._skipping or not tail:
            return
        if len(self._partial) + len(tail) > self._max_encoded:
            self._partial.clear()
            self._skipping = True
            self._drop_oversize()
        else:
            self._partial += tail

    def _drop_oversize(self) -> None:
        self.oversize_errors += 1
        self.errors += 1

    def _finish(self, body: bytes, payloads: list[bytes]) -> None:
        """Check one complete frame body (between delimiters) and keep its payload if valid."""
        if not body:
            return  # two delimiters in a row: the gap between frames, not an error
        if len(body) > self._max_encoded:
            self._drop_oversize()
            return
        data = _cobs_decode(body)
        if data is None or len(data) < CRC_SIZE:
            self.cobs_errors += 1
            self.errors += 1
            return
        payload = data[:-CRC_SIZE]
        if len(payload) > self.max_payload:
            self._drop_oversize()
            return
        if crc32c(payload) != int.from_bytes(data[-CRC_SIZE:], "little"):
            self.crc_errors += 1
            self.errors += 1
            return
        self.frames += 1
        payloads.append(payload)
