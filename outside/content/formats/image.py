"""Raster images: decode to pixels, re-encode from the pixels alone.

* The decoder is restricted to the format the magic bytes name (``Image.open(formats=[…])``);
  a file whose header does not match one of PNG, JPEG, GIF, BMP or TIFF is ``MALFORMED``.
* Width, height and pixel count are read from the header and checked against
  ``limits.max_side`` / ``limits.max_pixels`` *before* any pixel is decoded; Pillow's own
  decompression-bomb warning is an error too (``LIMIT_EXCEEDED``).
* Only the pixels reach the output: PNG output is written by ``pngwrite`` from the raw
  scanlines (IHDR, IDAT, IEND and nothing else); JPEG output is encoded from a fresh copy of
  the pixels (``Image.frombytes``). No chunk, marker, profile, EXIF, XMP, comment or trailing
  byte of the input survives.
* PNG stays PNG, lossless: the delivered pixels are identical (palette images are expanded to
  RGB/RGBA, 16-bit grey stays 16-bit; 32-bit integer images become 16-bit grey, clipped to
  0..65535 and reported if any value is outside). JPEG stays JPEG: re-encoded with the
  input's quantisation tables and chroma subsampling where Pillow exposes them (quality 90
  otherwise), after applying the EXIF orientation so the picture still displays upright.
  GIF, BMP and TIFF become PNG.
* Animated or multi-page images (GIF, APNG, multi-page TIFF) keep their first frame only;
  the dropped frames are reported as an action. A multi-page TIFF scan therefore loses pages:
  channels that receive such scans should send them as PDF.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import cast

from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from ferry.content.base import Action, Context, FormatResult, Reject
from outside.content.formats import pngwrite

# Magic → Pillow format name and canonical type name.
MAGIC: tuple[tuple[bytes, str, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG", "png"),
    (b"\xff\xd8\xff", "JPEG", "jpeg"),
    (b"GIF87a", "GIF", "gif"),
    (b"GIF89a", "GIF", "gif"),
    (b"BM", "BMP", "bmp"),
    (b"II*\x00", "TIFF", "tiff"),
    (b"MM\x00*", "TIFF", "tiff"),
)
# Modes written to PNG as they are (see ``pngwrite.MODES``); anything else is converted to RGB
# or RGBA first. ``pngwrite`` picks the zlib settings from the size and a sample of the rows.
PNG_MODES = frozenset(pngwrite.MODES)
UINT16_MAX = 0xFFFF
ORIENTATION_TAG = 0x0112
JPEG_MODES = frozenset({"L", "RGB", "CMYK"})
JPEG_FALLBACK_QUALITY = 90


def sniff(head: bytes) -> tuple[str, str] | None:
    """(Pillow format, type name) for the magic at the start of ``head``."""
    for magic, fmt, name in MAGIC:
        if head.startswith(magic):
            return fmt, name
    return None


def sanitize(src: Path, dst: Path, ctx: Context) -> FormatResult:
    with src.open("rb") as fh:
        head = fh.read(16)
    found = sniff(head)
    if found is None:
        raise Reject("MALFORMED", "not a PNG, JPEG, GIF, BMP or TIFF image")
    fmt, in_type = found
    limits = ctx.policy.limits
    if src.stat().st_size > limits.max_bytes:
        raise Reject("LIMIT_EXCEEDED", f"image larger than {limits.max_bytes} bytes")
    actions: list[Action] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(src, formats=[fmt])
        except Image.DecompressionBombError as exc:
            raise Reject("LIMIT_EXCEEDED", f"decompression bomb: {exc}") from exc
        except Image.DecompressionBombWarning as exc:
            raise Reject("LIMIT_EXCEEDED", f"decompression bomb: {exc}") from exc
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise Reject("MALFORMED", f"{in_type} header does not parse: {exc}") from exc
        with im:
            width, height = im.size
            if width <= 0 or height <= 0:
                raise Reject("MALFORMED", f"image size {width}x{height}")
            if max(width, height) > limits.max_side:
                raise Reject(
                    "LIMIT_EXCEEDED", f"image side {max(width, height)} > {limits.max_side}"
                )
            if width * height > limits.max_pixels:
                raise Reject("LIMIT_EXCEEDED", f"{width * height} pixels > {limits.max_pixels}")
            frames = getattr(im, "n_frames", 1)
            if frames > 1:
                actions.append(Action("removed", "frames after the first", count=frames - 1))
            try:
                im.load()
            except Image.DecompressionBombWarning as exc:
                raise Reject("LIMIT_EXCEEDED", f"decompression bomb: {exc}") from exc
            except (OSError, SyntaxError, ValueError, EOFError) as exc:
                raise Reject("MALFORMED", f"{in_type} pixel data does not decode: {exc}") from exc
            metadata = _metadata_items(im)
            if metadata:
                # Re-encoding cannot keep metadata, so "allow" and "sanitize" both remove it;
                # "disallow" rejects the file.
                ctx.feature("metadata", len(metadata), "image")
            if in_type == "jpeg":
                out_type = "jpeg"
                _write_jpeg(im, dst, actions)
            else:
                out_type = "png"
                _write_png(im, dst, actions)
    if metadata:
        actions.append(Action("removed", "metadata: " + ", ".join(metadata), count=len(metadata)))
    if out_type != in_type:
        actions.append(Action("converted", f"{in_type} to {out_type}"))
    actions.append(Action("replaced", "image re-encoded from pixels"))
    return FormatResult(
        out_type,
        cleaned=True,
        actions=actions,
        info={"width": width, "height": height, "frames": frames, "input_type": in_type},
    )


def _metadata_items(im: Image.Image) -> list[str]:
    """The metadata keys the input carried (reported, never copied)."""
    skip = {
        "dpi",
        "transparency",
        "gamma",
        "aspect",
        "duration",
        "loop",
        "background",
        "interlace",
        "progression",
        "progressive",
        "jfif",
        "jfif_version",
        "jfif_unit",
        "jfif_density",
        "compression",
        "version",
        "extension",
        "palette",
        "disposal",
    }
    return sorted(str(k) for k in im.info if k not in skip)


def _fresh(im: Image.Image, mode: str) -> Image.Image:
    """A new image holding only the pixels of ``im`` in ``mode``."""
    px = im if im.mode == mode else im.convert(mode)
    return Image.frombytes(mode, px.size, px.tobytes())


def _write_png(im: Image.Image, dst: Path, actions: list[Action]) -> None:
    if im.mode in PNG_MODES:
        mode = im.mode
    elif im.mode in ("P", "PA") and ("transparency" in im.info or im.mode == "PA"):
        mode = "RGBA"
    elif im.mode in ("P", "PA"):
        mode = "RGB"
    elif "A" in im.getbands():
        mode = "RGBA"
    else:
        mode = "RGB"
    if mode != im.mode:
        actions.append(Action("converted", f"pixels {im.mode} to {mode}"))
    if mode == "I":
        low, high = cast("tuple[int, int]", im.getextrema())
        if low < 0 or high > UINT16_MAX:
            actions.append(Action("converted", "pixels I to 16 bit, clipped to 0..65535"))
    # pngwrite reads the raw scanlines with tobytes(): the output holds the pixels and nothing
    # else, so no intermediate copy of the image is needed.
    px = im if mode == im.mode else im.convert(mode)
    with dst.open("wb") as fh:
        pngwrite.write_png(px, fh)


def _write_jpeg(im: Image.Image, dst: Path, actions: list[Action]) -> None:
    options: dict[str, object] = {}
    try:
        options["qtables"] = im.quantization  # type: ignore[attr-defined]
        options["subsampling"] = JpegImagePlugin.get_sampling(im)
    except (AttributeError, TypeError):
        options = {"quality": JPEG_FALLBACK_QUALITY}
    if options.get("subsampling") == -1:
        del options["subsampling"]
    upright = im
    if im.getexif().get(ORIENTATION_TAG, 1) not in (1, None):
        upright = ImageOps.exif_transpose(im)
        actions.append(Action("normalised", "EXIF orientation applied to the pixels"))
    mode = upright.mode if upright.mode in JPEG_MODES else "RGB"
    out = _fresh(upright, mode)
    out.save(dst, format="JPEG", optimize=False, progressive=False, **options)
