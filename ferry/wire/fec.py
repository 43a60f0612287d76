"""Erasure codes for blocks: any ``k`` of a block's ``k + r`` symbols rebuild it.

Two C-backed systematic Reed-Solomon codecs, named on the wire by a codec id:

* ``CODEC_ZFEC`` (1): zfec. A symbol is exactly ``symbol_size`` bytes.
* ``CODEC_ISAL`` (2): pyeclib with Intel ISA-L (``isa_l_rs_cauchy``; the ``rs_vand``
  matrix is not MDS for r >= 5, Cauchy is), ~10x faster
  to encode here. A symbol is a liberasurecode fragment: an 80-byte fragment
  header followed by ``symbol_size`` bytes.

Blocks with ``k == 1`` or ``r == 0`` bypass the codec: ``k == 1`` is a
repetition code (every symbol is a copy of the block), ``r == 0`` sends the
source symbols only. Both are trivially MDS, so the "any k of k + r" rule
holds for every block.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Protocol

from ferry.errors import WireError

CODEC_ZFEC = 1
CODEC_ISAL = 2
CODEC_IDS = {"zfec": CODEC_ZFEC, "isal": CODEC_ISAL}
CODEC_NAMES = {v: k for k, v in CODEC_IDS.items()}

# zfec and ISA-L both work over GF(2^8): at most 256 symbols per block; the wire
# carries k and r in one byte each and the symbol index in one byte, so k + r <= 255.
MAX_SYMBOLS_PER_BLOCK = 255
# liberasurecode's fragment header (fragment_header_t) is 80 bytes.
ISAL_FRAGMENT_HEADER = 80


class Codec(Protocol):
    codec_id: int
    overhead: int
    """Bytes each symbol carries beyond ``symbol_size``."""

    def encode(self, block: bytes, k: int, r: int, symbol_size: int) -> list[bytes]:
        """Return the ``k + r`` symbols of ``block`` (``len(block) == k * symbol_size``)."""

    def decode(self, symbols: dict[int, bytes], k: int, r: int, symbol_size: int) -> bytes:
        """Rebuild the ``k * symbol_size`` block bytes from any ``k`` symbols (index -> bytes)."""


def _split(block: bytes, k: int, size: int) -> list[bytes]:
    return [block[i * size : (i + 1) * size] for i in range(k)]


def _trivial_decode(symbols: dict[int, bytes], k: int, size: int, overhead: int) -> bytes | None:
    """Handle the repetition (k == 1) and no-repair cases without the codec."""
    if k == 1:
        sym = next(iter(symbols.values()))
        return sym[overhead:] if overhead else sym
    if all(i in symbols for i in range(k)):
        if overhead:
            return b"".join(symbols[i][overhead:] for i in range(k))
        return b"".join(symbols[i] for i in range(k))
    return None


class ZfecCodec:
    codec_id = CODEC_ZFEC
    overhead = 0

    def encode(self, block: bytes, k: int, r: int, symbol_size: int) -> list[bytes]:
        src = _split(block, k, symbol_size)
        if r == 0:
            return src
        if k == 1:
            return src * (1 + r)
        return src + list(_zfec_encoder(k, k + r).encode(src, list(range(k, k + r))))

    def decode(self, symbols: dict[int, bytes], k: int, r: int, symbol_size: int) -> bytes:
        fast = _trivial_decode(symbols, k, symbol_size, 0)
        if fast is not None:
            return fast
        idx = sorted(symbols)[:k]
        out = _zfec_decoder(k, k + r).decode([symbols[i] for i in idx], idx)
        return b"".join(out)


class IsalCodec:
    codec_id = CODEC_ISAL
    overhead = ISAL_FRAGMENT_HEADER

    def encode(self, block: bytes, k: int, r: int, symbol_size: int) -> list[bytes]:
        if r == 0 or k == 1:
            pad = bytes(ISAL_FRAGMENT_HEADER)
            src = [pad + s for s in _split(block, k, symbol_size)]
            return src if r == 0 else src * (1 + r)
        frags: list[bytes] = _isal_driver(k, r).encode(block)
        return frags

    def decode(self, symbols: dict[int, bytes], k: int, r: int, symbol_size: int) -> bytes:
        if r == 0 or k == 1:
            fast = _trivial_decode(symbols, k, symbol_size, ISAL_FRAGMENT_HEADER)
            if fast is None:  # pragma: no cover - guarded by the caller's symbol count
                raise WireError("not enough symbols")
            return fast
        # Data fragments in order are the block itself: skip the library.
        if all(i in symbols for i in range(k)):
            return b"".join(symbols[i][ISAL_FRAGMENT_HEADER:] for i in range(k))
        try:
            data: bytes = _isal_driver(k, r).decode([symbols[i] for i in sorted(symbols)[:k]])
        except Exception as exc:  # pyeclib raises its own untyped tree
            raise WireError("erasure decoding failed") from exc
        return data


@lru_cache(maxsize=64)
def _zfec_encoder(k: int, m: int) -> Any:
    import zfec  # noqa: PLC0415  # imported lazily: only the configured codec loads

    return zfec.Encoder(k, m)


@lru_cache(maxsize=64)
def _zfec_decoder(k: int, m: int) -> Any:
    import zfec  # noqa: PLC0415

    return zfec.Decoder(k, m)


@lru_cache(maxsize=64)
def _isal_driver(k: int, m: int) -> Any:
    from pyeclib.ec_iface import ECDriver  # noqa: PLC0415

    return ECDriver(k=k, m=m, ec_type="isa_l_rs_cauchy")


_CODECS: dict[int, Codec] = {CODEC_ZFEC: ZfecCodec(), CODEC_ISAL: IsalCodec()}


def get_codec(codec_id: int) -> Codec:
    try:
        return _CODECS[codec_id]
    except KeyError:
        raise WireError(f"unknown FEC codec id {codec_id}") from None


def block_layout(
    object_length: int, k: int, r: int, symbol_size: int, block_index: int
) -> tuple[int, int, int, int]:
    """Return ``(offset, length, k_b, r_b)`` of block ``block_index`` of an object.

    Full blocks hold ``k * symbol_size`` bytes with ``r`` repair symbols. The
    last block holds the rest in ``k_b = ceil(length / symbol_size)`` source
    symbols and ``r_b = ceil(r * k_b / k)`` repair symbols, so it is protected
    at the same ratio. An empty object has one empty block of one symbol.
    """
    block_bytes = k * symbol_size
    offset = block_index * block_bytes
    length = max(0, min(block_bytes, object_length - offset))
    if length == block_bytes:
        return offset, length, k, r
    k_b = max(1, -(-length // symbol_size))
    r_b = -(-r * k_b // k)
    return offset, length, k_b, r_b


def block_count(object_length: int, k: int, symbol_size: int) -> int:
    """Number of blocks of an object (at least one, even when empty)."""
    return max(1, -(-object_length // (k * symbol_size)))
