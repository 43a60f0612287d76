"""Image sanitizer (Pillow re-encode from pixels) and the PNG/JPEG walkers."""

from __future__ import annotations

import importlib
import importlib.util
import io
import random
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from ferry.content.base import Limits, Reject
from inside.recheck import recheck_bytes
from outside.content.formats import pngwrite
from outside.content.formats.image import sanitize
from tests.content_ctx import ctx, run
from tests.corpus.build_docs import png_chunk, zip_bytes


def noise(mode: str = "RGB", size: tuple[int, int] = (120, 90), seed: int = 7) -> Image.Image:
    rnd = random.Random(seed)
    bands = len(Image.new(mode, (1, 1)).getbands())
    return Image.frombytes(
        mode, size, bytes(rnd.randrange(256) for _ in range(size[0] * size[1] * bands))
    )


def encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def hostile_png() -> bytes:
    png = encode(noise(), "PNG")
    extra = (
        png_chunk(b"tEXt", b"Comment\x00secret")
        + png_chunk(
            b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00<x:xmpmeta>GPS 48.85</x:xmpmeta>"
        )
        + png_chunk(b"stEg", b"covert payload")
    )
    return png[:33] + extra + png[33:] + zip_bytes([("payload.exe", b"MZ" + b"\x00" * 64)])


def exif_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "Canon"
    exif[0x8825] = {1: "N", 2: (48.0, 51.0, 30.0), 3: "E", 4: (2.0, 17.0, 40.0)}
    return encode(noise(), "JPEG", exif=exif, comment=b"operator: li na", quality=92)


def bomb_png(side: int = 30000) -> bytes:
    """A 1-bit PNG of side x side pixels that is ~100 KB on disk."""
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def test_png_hostile_chunks_and_trailing_zip(tmp_path: Path) -> None:
    data = hostile_png()
    problems = recheck_bytes(data, "png").problems
    assert any("tEXt" in p for p in problems)
    assert any("after IEND" in p for p in problems)
    result, out = run(sanitize, data, tmp_path, "x.png")
    assert result.type_name == "png"
    assert recheck_bytes(out, "png").ok
    assert Image.open(io.BytesIO(out)).tobytes() == noise().tobytes()
    assert b"secret" not in out
    assert b"stEg" not in out
    assert b"PK\x03\x04" not in out


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "1", "I;16"])
def test_png_pixels_identical(mode: str, tmp_path: Path) -> None:
    im = noise("RGB").convert(mode) if mode in ("1", "I;16") else noise(mode)
    data = encode(im, "PNG")
    _, out = run(sanitize, data, tmp_path, "x.png")
    back = Image.open(io.BytesIO(out))
    assert back.mode == im.mode
    assert back.tobytes() == im.tobytes()
    assert recheck_bytes(out, "png").ok


def test_palette_png_with_transparency(tmp_path: Path) -> None:
    im = noise().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    data = encode(im, "PNG", transparency=3)
    _, out = run(sanitize, data, tmp_path, "x.png")
    assert (
        Image.open(io.BytesIO(out)).convert("RGBA").tobytes()
        == Image.open(io.BytesIO(data)).convert("RGBA").tobytes()
    )


def test_jpeg_exif_gps_and_comment_removed(tmp_path: Path) -> None:
    data = exif_jpeg()
    problems = recheck_bytes(data, "jpeg").problems
    assert any("APP1" in p for p in problems)
    assert any("COM" in p for p in problems)
    result, out = run(sanitize, data, tmp_path, "x.jpg")
    assert result.type_name == "jpeg"
    assert recheck_bytes(out, "jpeg").ok
    back = Image.open(io.BytesIO(out))
    assert not back.getexif()
    assert "comment" not in back.info
    assert b"Canon" not in out
    assert b"li na" not in out
    # Re-encoded with the input's tables: close to the decoded input.
    src = Image.open(io.BytesIO(data)).tobytes()
    diff = sum(abs(a - b) for a, b in zip(src, back.tobytes(), strict=True)) / len(src)
    assert diff < 10


def test_jpeg_orientation_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(noise(size=(40, 20)), "JPEG", exif=exif)
    result, out = run(sanitize, data, tmp_path, "x.jpg")
    assert Image.open(io.BytesIO(out)).size == (20, 40)
    assert any(a.what == "normalised" for a in result.actions)


def test_jpeg_trailing_data(tmp_path: Path) -> None:
    data = encode(noise(), "JPEG") + b"PK\x03\x04hidden"
    assert any("after EOI" in p for p in recheck_bytes(data, "jpeg").problems)
    _, out = run(sanitize, data, tmp_path, "x.jpg")
    assert recheck_bytes(out, "jpeg").ok
    assert b"hidden" not in out


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_converted_to_png(fmt: str, tmp_path: Path) -> None:
    im = noise("RGB")
    data = encode(im, fmt)
    result, out = run(sanitize, data, tmp_path, "x." + fmt.lower())
    assert result.type_name == "png"
    assert out.startswith(b"\x89PNG")
    assert recheck_bytes(out, fmt.lower()).ok
    expected = Image.open(io.BytesIO(data)).convert("RGB").tobytes()
    assert Image.open(io.BytesIO(out)).convert("RGB").tobytes() == expected


def test_animated_gif_keeps_first_frame(tmp_path: Path) -> None:
    frames = [noise("RGB", seed=s).convert("P") for s in (1, 2, 3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100)
    result, out = run(sanitize, buf.getvalue(), tmp_path, "x.gif")
    assert result.info["frames"] == 3
    assert any(a.target == "frames after the first" and a.count == 2 for a in result.actions)
    assert (
        Image.open(io.BytesIO(out)).convert("RGB").tobytes() == frames[0].convert("RGB").tobytes()
    )


def test_decompression_bomb_rejected_before_decoding(tmp_path: Path) -> None:
    data = bomb_png()
    assert len(data) < 200_000
    with pytest.raises(Reject) as err:
        run(sanitize, data, tmp_path, "x.png")
    assert err.value.code == "LIMIT_EXCEEDED"


def test_policy_limits(tmp_path: Path) -> None:
    data = encode(noise(size=(300, 10)), "PNG")
    for limits in (Limits(max_side=200), Limits(max_pixels=2000)):
        with pytest.raises(Reject) as err:
            run(sanitize, data, tmp_path, "x.png", ctx(limits=limits))
        assert err.value.code == "LIMIT_EXCEEDED"


def test_metadata_disallowed(tmp_path: Path) -> None:
    with pytest.raises(Reject) as err:
        run(sanitize, exif_jpeg(), tmp_path, "x.jpg", ctx({"metadata": "disallow"}))
    assert err.value.code == "ACTIVE_CONTENT_DISALLOWED"


@pytest.mark.parametrize(
    "data", [b"not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 30, b"\xff\xd8\xff\xe0junk"]
)
def test_malformed(data: bytes, tmp_path: Path) -> None:
    with pytest.raises(Reject) as err:
        run(sanitize, data, tmp_path, "x.png")
    assert err.value.code == "MALFORMED"


def test_truncated_png_pixels_malformed(tmp_path: Path) -> None:
    data = encode(noise(), "PNG")
    with pytest.raises(Reject) as err:
        run(sanitize, data[: len(data) // 2], tmp_path, "x.png")
    assert err.value.code == "MALFORMED"


def test_png_walker_details() -> None:
    data = encode(noise(), "PNG")
    assert recheck_bytes(data, "png").ok
    bad_crc = data[:29] + bytes([data[29] ^ 1]) + data[30:]
    assert any("CRC" in p for p in recheck_bytes(bad_crc, "png").problems)
    # Extra zlib data beyond what the image needs is a hiding place too.
    raw = zlib.decompress(data[data.index(b"IDAT") + 4 : data.index(b"IEND") - 8])
    fat = zlib.compress(raw + b"hidden" * 10)
    head = data[: data.index(b"IDAT") - 4]
    forged = head + png_chunk(b"IDAT", fat) + png_chunk(b"IEND", b"")
    assert any("IDAT inflates" in p for p in recheck_bytes(forged, "png").problems)
    assert not recheck_bytes(encode(noise(), "JPEG"), "png").ok


# --------------------------------------------------------------------------- pngwrite


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """The (type, body) chunks of a PNG, checking every length and CRC on the way."""
    assert data.startswith(pngwrite.SIGNATURE)
    pos, chunks = len(pngwrite.SIGNATURE), []
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack_from(">I", data, pos + 8 + length)
        assert zlib.crc32(kind + body) == crc, kind
        chunks.append((kind, body))
        pos += 12 + length
    assert pos == len(data)
    return chunks


def written(im: Image.Image, **kw: int) -> bytes:
    buf = io.BytesIO()
    pngwrite.write_png(im, buf, **kw)
    return buf.getvalue()


def sample(mode: str, size: tuple[int, int], seed: int = 3) -> Image.Image:
    """Random pixels in ``mode``, 16-bit modes using the whole 0..65535 range."""
    if mode in ("I;16", "I;16B", "I"):
        big_endian = random.Random(seed).randbytes(size[0] * size[1] * 2)
        if mode == "I;16":  # Pillow's convert() between 16-bit modes clips to 255
            little = bytearray(len(big_endian))
            little[0::2], little[1::2] = big_endian[1::2], big_endian[0::2]
            return Image.frombytes("I;16", size, bytes(little))
        im16 = Image.frombytes("I;16B", size, big_endian)
        return im16.convert("I") if mode == "I" else im16
    return noise("RGB", size, seed).convert(mode) if mode == "1" else noise(mode, size, seed)


def assert_same_pixels(out: bytes, im: Image.Image) -> None:
    back = Image.open(io.BytesIO(out))
    if im.mode in ("I;16", "I;16B", "I"):
        assert back.mode == "I;16"
        assert back.tobytes("raw", "I;16B") == im.tobytes("raw", "I;16B")
    else:
        assert back.mode == im.mode
        assert back.tobytes() == im.tobytes()


# The stdlib zlib always; zlib-ng (a dependency) too, wherever it could be installed.
DEFLATERS = ["zlib"] + (["zlib_ng"] if importlib.util.find_spec("zlib_ng") else [])


@pytest.fixture(params=DEFLATERS)
def deflater(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with each deflate implementation pngwrite can use."""
    module = importlib.import_module("zlib" if request.param == "zlib" else "zlib_ng.zlib_ng")
    monkeypatch.setattr(pngwrite, "compressobj", module.compressobj)
    return str(request.param)


@pytest.mark.parametrize("mode", sorted(pngwrite.MODES))
@pytest.mark.parametrize("size", [(1, 1), (13, 7), (64, 33)])
def test_pngwrite_pixels_identical(mode: str, size: tuple[int, int], deflater: str) -> None:
    im = sample(mode, size)
    out = written(im)
    assert_same_pixels(out, im)
    chunks = png_chunks(out)
    assert [k for k, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    _, depth, colour = pngwrite.MODES[mode]
    assert chunks[0][1] == struct.pack(">IIBBBBB", *size, depth, colour, 0, 0, 0)
    assert recheck_bytes(out, "png").ok


def test_pngwrite_clips_32_bit_integers() -> None:
    im = Image.new("I", (3, 1))
    im.putpixel((0, 0), -5)
    im.putpixel((1, 0), 300)
    im.putpixel((2, 0), 70000)
    back = Image.open(io.BytesIO(written(im)))
    assert back.tobytes("raw", "I;16B") == struct.pack(">3H", 0, 300, 65535)


def test_pngwrite_rejects_other_modes() -> None:
    for mode in ("P", "CMYK", "F", "RGBX"):
        with pytest.raises(ValueError, match="cannot write mode"):
            written(Image.new(mode, (2, 2)))


def test_pngwrite_stripes_and_several_idats(monkeypatch: pytest.MonkeyPatch, deflater: str) -> None:
    monkeypatch.setattr(pngwrite, "STRIPE_BYTES", 1000)
    monkeypatch.setattr(pngwrite, "IDAT_BYTES", 256)
    for mode in ("RGBA", "1", "I;16"):
        im = sample(mode, (150, 97))
        out = written(im, level=1, strategy=zlib.Z_HUFFMAN_ONLY)
        assert_same_pixels(out, im)
        kinds = [k for k, _ in png_chunks(out)]
        assert kinds[0] == b"IHDR"
        assert kinds[-1] == b"IEND"
        assert set(kinds[1:-1]) == {b"IDAT"}
        assert len(kinds) > 4
        assert all(len(body) <= 256 for _, body in png_chunks(out))
        assert recheck_bytes(out, "png").ok


def large_picture(kind: str) -> Image.Image:
    """1200x900 RGB (above FAST_ABOVE_PIXELS): flat panels, random bytes, or a third random."""
    size = (1200, 900)
    flat = Image.new("RGB", size, (240, 240, 240))
    for x in range(0, 1200, 100):
        flat.paste((x % 256, 40, 90), (x, 50, x + 40, 850))
    if kind == "flat":
        return flat
    busy = Image.frombytes("RGB", size, random.Random(5).randbytes(1200 * 900 * 3))
    if kind == "busy":
        return busy
    flat.paste(busy.crop((0, 0, 400, 900)))
    return flat


@pytest.mark.parametrize(
    ("kind", "settings"),
    [
        ("flat", pngwrite.LARGE_FLAT),
        ("mixed", pngwrite.LARGE_MIXED),
        ("busy", pngwrite.BUSY),
    ],
)
def test_pngwrite_large_image_settings(kind: str, settings: tuple[int, int], deflater: str) -> None:
    im = large_picture(kind)
    assert im.width * im.height > pngwrite.FAST_ABOVE_PIXELS
    assert pngwrite._compression(im, "RGB", im.width * 3) == settings
    out = written(im)
    assert_same_pixels(out, im)
    kinds = [k for k, _ in png_chunks(out)]
    assert set(kinds) == {b"IHDR", b"IDAT", b"IEND"}
    assert recheck_bytes(out, "png").ok
    if kind == "busy":
        assert kinds.count(b"IDAT") > 1  # ~3.3 MB of zlib stream in 1 MiB chunks


def test_pngwrite_small_image_settings() -> None:
    flat = Image.new("L", (30, 10))
    assert pngwrite._compression(flat, "L", 30) == pngwrite.SMALL
    busy = Image.frombytes("L", (30, 10), random.Random(1).randbytes(300))
    assert pngwrite._compression(busy, "L", 30) == pngwrite.BUSY


def test_sanitized_png_has_only_critical_chunks(tmp_path: Path) -> None:
    im = noise("RGBA")
    data = encode(im, "PNG", dpi=(300, 300), icc_profile=b"\x00" * 128)
    assert b"pHYs" in data
    assert b"iCCP" in data
    _, out = run(sanitize, data, tmp_path, "x.png")
    assert [k for k, _ in png_chunks(out)] == [b"IHDR", b"IDAT", b"IEND"]
    assert_same_pixels(out, im)


@pytest.mark.parametrize("mode", ["I;16B", "I"])
def test_tiff_16_and_32_bit_grey_to_16_bit_png(mode: str, tmp_path: Path) -> None:
    im = sample(mode, (20, 10))
    result, out = run(sanitize, encode(im, "TIFF"), tmp_path, "x.tif")
    assert result.type_name == "png"
    assert_same_pixels(out, im)
    assert not any("clipped" in a.target for a in result.actions)
    assert recheck_bytes(out, "png").ok


def test_tiff_32_bit_out_of_range_clipped_and_reported(tmp_path: Path) -> None:
    im = Image.new("I", (4, 2), 100)
    im.putpixel((0, 0), 70000)
    result, out = run(sanitize, encode(im, "TIFF"), tmp_path, "x.tif")
    assert any("clipped" in a.target for a in result.actions)
    back = Image.open(io.BytesIO(out))
    assert back.mode == "I;16"
    assert back.getpixel((0, 0)) == 65535
    assert back.getpixel((1, 0)) == 100
