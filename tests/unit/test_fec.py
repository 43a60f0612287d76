"""Erasure codecs (zfec, ISA-L) and the block layout of objects."""

from __future__ import annotations

import itertools
import random

import pytest

from ferry.errors import WireError
from ferry.wire.fec import (
    CODEC_IDS,
    CODEC_ISAL,
    CODEC_NAMES,
    CODEC_ZFEC,
    ISAL_FRAGMENT_HEADER,
    Codec,
    IsalCodec,
    ZfecCodec,
    block_count,
    block_layout,
    get_codec,
)

CODECS = [pytest.param(ZfecCodec(), id="zfec"), pytest.param(IsalCodec(), id="isal")]


def block_of(k: int, size: int, seed: int = 0) -> bytes:
    return random.Random(f"{seed}:{k}:{size}").randbytes(k * size)


# ---------------------------------------------------------------- codec registry
def test_codec_ids_are_stable() -> None:
    assert CODEC_IDS == {"zfec": 1, "isal": 2}
    assert CODEC_NAMES == {1: "zfec", 2: "isal"}
    assert get_codec(CODEC_ZFEC).codec_id == CODEC_ZFEC
    assert get_codec(CODEC_ISAL).codec_id == CODEC_ISAL
    assert get_codec(CODEC_ZFEC).overhead == 0
    assert get_codec(CODEC_ISAL).overhead == ISAL_FRAGMENT_HEADER == 80


@pytest.mark.parametrize("codec_id", [0, 3, 255])
def test_unknown_codec_is_a_wire_error(codec_id: int) -> None:
    with pytest.raises(WireError, match="unknown FEC codec"):
        get_codec(codec_id)


# ---------------------------------------------------------------------- encoding
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(
    ("k", "r", "size"), [(4, 2, 64), (1, 0, 7), (1, 3, 16), (5, 0, 3), (32, 16, 100), (2, 1, 1)]
)
def test_encode_is_systematic_and_sized(codec: Codec, k: int, r: int, size: int) -> None:
    block = block_of(k, size)
    symbols = codec.encode(block, k, r, size)
    assert len(symbols) == k + r
    assert {len(s) for s in symbols} == {size + codec.overhead}
    # source symbols carry the block itself, in order, after any fragment header
    assert b"".join(s[codec.overhead :] for s in symbols[:k]) == block


@pytest.mark.parametrize("codec", CODECS)
def test_repetition_code_when_k_is_1(codec: Codec) -> None:
    block = b"0123456789abcdef"
    symbols = codec.encode(block, 1, 3, 16)
    assert [s[codec.overhead :] for s in symbols] == [block] * 4
    for i in range(4):
        assert codec.decode({i: symbols[i]}, 1, 3, 16) == block


@pytest.mark.parametrize("codec", CODECS)
def test_repair_symbols_differ_from_source(codec: Codec) -> None:
    block = block_of(4, 32)
    symbols = codec.encode(block, 4, 2, 32)
    payloads = [s[codec.overhead :] for s in symbols]
    assert len(set(payloads)) == 6


# ------------------------------------------------------------------------ decoding
def _check_every_subset(codec: Codec, k: int, r: int, size: int, min_size: int) -> int:
    block = block_of(k, size, seed=k * 100 + r)
    symbols = codec.encode(block, k, r, size)
    checked = 0
    for n in range(min_size, k + r + 1):
        for subset in itertools.combinations(range(k + r), n):
            got = codec.decode({i: symbols[i] for i in subset}, k, r, size)
            assert got == block, f"k={k} r={r} subset={subset}"
            checked += 1
    return checked


@pytest.mark.parametrize("codec", CODECS)
def test_every_4_of_6_symbols_rebuild_the_block(codec: Codec) -> None:
    assert _check_every_subset(codec, 4, 2, 64, min_size=4) == 15 + 6 + 1


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(("k", "r"), [(2, 1), (3, 3), (2, 4), (5, 4), (8, 4), (4, 8)])
def test_every_large_enough_subset_rebuilds_the_block(codec: Codec, k: int, r: int) -> None:
    assert _check_every_subset(codec, k, r, 24, min_size=k) > 0


def test_zfec_every_subset_with_many_repair_symbols() -> None:
    # zfec's Vandermonde-derived systematic matrix is MDS for every (k, r)
    assert _check_every_subset(ZfecCodec(), 5, 6, 8, min_size=5) == sum(
        len(list(itertools.combinations(range(11), n))) for n in range(5, 12)
    )


def test_isal_every_subset_with_many_repair_symbols() -> None:
    _check_every_subset(IsalCodec(), 5, 6, 16, min_size=5)


def test_isal_pattern_undecodable_with_rs_vand_decodes_with_cauchy() -> None:
    """isa_l_rs_vand could not decode this subset (not MDS for r >= 5); Cauchy can."""
    codec = IsalCodec()
    block = block_of(5, 16)
    symbols = codec.encode(block, 5, 6, 16)
    assert codec.decode({i: symbols[i] for i in (1, 2, 5, 7, 10)}, 5, 6, 16) == block


@pytest.mark.parametrize("codec", CODECS)
def test_decode_uses_the_lowest_k_of_more_than_k_symbols(codec: Codec) -> None:
    block = block_of(4, 16)
    symbols = codec.encode(block, 4, 2, 16)
    assert codec.decode(dict(enumerate(symbols)), 4, 2, 16) == block
    assert codec.decode({i: symbols[i] for i in (0, 2, 3, 4, 5)}, 4, 2, 16) == block


def test_isal_decode_rejects_garbage_fragments() -> None:
    codec = IsalCodec()
    symbols = codec.encode(block_of(4, 16), 4, 2, 16)
    garbage = {i: bytes(len(symbols[0])) for i in (1, 2, 4, 5)}
    with pytest.raises(WireError):
        codec.decode(garbage, 4, 2, 16)


# ------------------------------------------------------------------- block layout
K, R, S = 32, 16, 100
BLOCK = K * S


@pytest.mark.parametrize(
    ("length", "block_index", "expected"),
    [
        # an empty object: one empty block of one symbol, protected at the same ratio
        (0, 0, (0, 0, 1, 1)),
        (1, 0, (0, 1, 1, 1)),
        (S, 0, (0, S, 1, 1)),
        (S + 1, 0, (0, S + 1, 2, 1)),
        (3 * S, 0, (0, 3 * S, 3, 2)),
        (BLOCK - 1, 0, (0, BLOCK - 1, K, R)),
        (BLOCK, 0, (0, BLOCK, K, R)),  # exactly one block
        (BLOCK + 1, 0, (0, BLOCK, K, R)),  # one block + 1 byte
        (BLOCK + 1, 1, (BLOCK, 1, 1, 1)),
        (5 * BLOCK + 7 * S + 3, 0, (0, BLOCK, K, R)),  # many blocks
        (5 * BLOCK + 7 * S + 3, 4, (4 * BLOCK, BLOCK, K, R)),
        (5 * BLOCK + 7 * S + 3, 5, (5 * BLOCK, 7 * S + 3, 8, 4)),
        (5 * BLOCK + 17 * S, 5, (5 * BLOCK, 17 * S, 17, 9)),  # ceil(16 * 17 / 32) = 9
        (5 * BLOCK + 31 * S + 1, 5, (5 * BLOCK, 31 * S + 1, K, R)),  # the rest fills k symbols
        (2 * BLOCK, 1, (BLOCK, BLOCK, K, R)),
    ],
)
def test_block_layout(length: int, block_index: int, expected: tuple[int, int, int, int]) -> None:
    assert block_layout(length, K, R, S, block_index) == expected


@pytest.mark.parametrize(
    ("length", "blocks"),
    [
        (0, 1),
        (1, 1),
        (BLOCK - 1, 1),
        (BLOCK, 1),
        (BLOCK + 1, 2),
        (5 * BLOCK + 7 * S + 3, 6),
        (100 * BLOCK, 100),
    ],
)
def test_block_count(length: int, blocks: int) -> None:
    assert block_count(length, K, S) == blocks


@pytest.mark.parametrize(
    ("k", "r", "k_b", "r_b"),
    [(4, 0, 1, 0), (4, 0, 3, 0), (4, 1, 1, 1), (4, 1, 3, 1), (8, 17, 1, 3), (8, 17, 7, 15)],
)
def test_last_block_keeps_the_repair_ratio(k: int, r: int, k_b: int, r_b: int) -> None:
    length = 3 * k * 10 + k_b * 10 - 5  # three full blocks and a last one of k_b symbols
    assert block_layout(length, k, r, 10, 3) == (3 * k * 10, k_b * 10 - 5, k_b, r_b)


@pytest.mark.parametrize("k", [1, 2, 3, 7, 32])
@pytest.mark.parametrize("r", [0, 1, 5, 16])
@pytest.mark.parametrize("size", [1, 13, 1321])
def test_blocks_tile_the_object_exactly(k: int, r: int, size: int) -> None:
    rng = random.Random(k * r * size)
    for length in [0, 1, size, k * size, k * size + 1, rng.randrange(50 * k * size)]:
        n = block_count(length, k, size)
        offset = 0
        for b in range(n):
            off, ln, k_b, r_b = block_layout(length, k, r, size, b)
            assert off == offset
            assert 1 <= k_b <= k
            assert 0 <= r_b <= r
            assert k_b * size >= ln > (k_b - 1) * size or (length == 0 and ln == 0)
            assert r_b * k >= r * k_b  # never less protected than a full block
            offset += ln
        assert offset == length
