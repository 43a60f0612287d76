#!/usr/bin/env python3
"""Throughput of the format sanitizers (outside) and their inside re-checks.

    .venv/bin/python bench/content_formats.py [--seconds S] [--json FILE]

Workloads, generated in memory (no downloads):
  pdf10   a 10-page PDF, each page with text and a 640x480 JPEG image (pikepdf rebuild)
  jpeg3mp a 3-megapixel (2048x1536) photo-like JPEG, re-encoded from pixels
  png3mp  the same picture as PNG, re-encoded losslessly
  docx    a 40-paragraph DOCX with an image, docProps and an external hyperlink
Each is run for S seconds in 1 process and in 2 processes (the 2-core target); the inside
re-check of the cleaned output is timed separately (1 process). Goals: pdf10 >= 20/s,
3 MP images >= 10/s.
"""

# ruff: noqa: E501  (fixture byte strings are clearer on one line)

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image, ImageDraw, ImageFilter

from inside.recheck import recheck_bytes
from outside.content.formats import image, ooxml, pdf
from tests.content_ctx import ctx
from tests.corpus import build_docs as B

GOALS = {"pdf10": 20.0, "jpeg3mp": 10.0, "png3mp": 10.0, "png3mp_screen": 10.0}


def photo(w: int, h: int, seed: int = 1) -> Image.Image:
    """Smooth gradients plus noise: compresses like a photograph, not like a flat fill."""
    rnd = random.Random(seed)
    small = Image.frombytes(
        "RGB",
        (w // 16, h // 16),
        bytes(rnd.randrange(256) for _ in range((w // 16) * (h // 16) * 3)),
    )
    im = small.resize((w, h), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(2))
    noise = Image.effect_noise((w, h), 12).convert("RGB")
    return Image.blend(im, noise, 0.08)


def screen(w: int, h: int) -> Image.Image:
    """A screenshot-like picture: flat panels, lines of text, a few icons."""
    rnd = random.Random(2)
    im = Image.new("RGB", (w, h), (245, 245, 245))
    draw = ImageDraw.Draw(im)
    for _ in range(60):
        x, y = rnd.randrange(w - 200), rnd.randrange(h - 60)
        draw.rectangle(
            (x, y, x + rnd.randint(40, 400), y + rnd.randint(20, 200)),
            fill=(rnd.randrange(256),) * 3,
        )
    for row in range(0, h, 18):
        draw.text((20, row), f"ferry benchmark line {row} notice budget meeting", fill=(0, 0, 0))
    return im


def encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def pdf10() -> bytes:
    jpg = encode(photo(640, 480, 3), "JPEG", quality=85)
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"",  # pages, filled below
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Title (Benchmark) /Author (ferry) >>",
    ]
    kids = []
    rnd = random.Random(5)
    words = [
        "notice",
        "budget",
        "meeting",
        "annex",
        "report",
        "review",
        "office",
        "plan",
        "department",
        "schedule",
    ]
    for _i in range(10):
        page_no = len(objs) + 1
        kids.append(b"%d 0 R" % page_no)
        lines = [" ".join(rnd.choice(words) for _ in range(12)) for _ in range(40)]
        text = B.pdf_text_stream(lines, y=760) + b"\nq 320 0 0 240 150 60 cm /Im1 Do Q"
        objs.append(
            b"<< /Type /Page /Parent 2 0 R /Contents %d 0 R /Resources << /Font << /F1 3 0 R >> /XObject << /Im1 %d 0 R >> >> >>"
            % (page_no + 1, page_no + 2)
        )
        objs.append(B.stream_obj(text, compress=True))
        objs.append(
            b"<< /Type /XObject /Subtype /Image /Width 640 /Height 480 /ColorSpace /DeviceRGB /BitsPerComponent 8 /Filter /DCTDecode /Length %d >>\nstream\n"
            % len(jpg)
            + jpg
            + b"\nendstream"
        )
    objs[1] = (
        b"<< /Type /Pages /Kids [" + b" ".join(kids) + b"] /Count 10 /MediaBox [0 0 612 792] >>"
    )
    return B.raw_pdf(objs, info=4)


def docx() -> bytes:
    rnd = random.Random(9)
    words = [
        "关于",
        "召开",
        "年度",
        "工作",
        "会议",
        "的",
        "通知",
        "budget",
        "meeting",
        "annex",
        "report",
    ]
    paras = [" ".join(rnd.choice(words) for _ in range(30)) for _ in range(40)]
    png = encode(photo(400, 300, 4), "PNG")
    return B.docx(
        paras,
        body_extra='<w:p><w:hyperlink r:id="rIdH"><w:r><w:t>portal</w:t></w:r></w:hyperlink></w:p>'
        '<w:p><w:r><w:drawing><a:blip r:embed="rIdImg"/></w:drawing></w:r></w:p>',
        doc_rels=[
            ("rIdH", "hyperlink", "http://example.org/", "External"),
            ("rIdImg", "image", "media/image1.png"),
        ],
        extra_parts=[("word/media/image1.png", png)],
    )


WORKLOADS: dict[str, tuple[Callable[[], bytes], str, str]] = {
    "pdf10": (pdf10, "pdf", "pdf"),
    "jpeg3mp": (lambda: encode(photo(2048, 1536), "JPEG", quality=88), "image", "jpeg"),
    "png3mp": (lambda: encode(photo(2048, 1536), "PNG"), "image", "png"),
    "png3mp_screen": (lambda: encode(screen(2048, 1536), "PNG"), "image", "png"),
    "docx": (docx, "ooxml", "docx"),
}
MODULES = {"pdf": pdf, "image": image, "ooxml": ooxml}


def _worker(args: tuple[str, bytes, float]) -> float:
    """Sanitize the workload's input for ``seconds``; files per second of that loop alone."""
    name, data, seconds = args
    _, module, _ = WORKLOADS[name]
    sanitize = MODULES[module].sanitize
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in", Path(tmp) / "out"
        src.write_bytes(data)
        context = ctx()
        done = 0
        start = time.perf_counter()
        end = start + seconds
        while time.perf_counter() < end:
            sanitize(src, dst, context)
            done += 1
        return done / (time.perf_counter() - start)


def rate(name: str, seconds: float, procs: int) -> float:
    """Files per second over ``procs`` processes; generating the input is not timed."""
    data = WORKLOADS[name][0]()
    if procs == 1:
        return _worker((name, data, seconds))
    with mp.get_context("fork").Pool(procs) as pool:
        return sum(pool.map(_worker, [(name, data, seconds)] * procs))


def recheck_rate(name: str, seconds: float) -> float:
    make, module, kind = WORKLOADS[name]
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in", Path(tmp) / "out"
        src.write_bytes(make())
        result = MODULES[module].sanitize(src, dst, ctx())
        out = dst.read_bytes()
    check = recheck_bytes(out, result.type_name)
    assert check.ok, check.problems
    done = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        recheck_bytes(out, kind)
        done += 1
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    print(
        f"{'workload':<9} {'size':>9} {'1 proc/s':>9} {'2 proc/s':>9} {'recheck/s':>10} {'goal':>6}"
    )
    for name, (make, _, _) in WORKLOADS.items():
        size = len(make())
        one = rate(name, args.seconds, 1)
        two = rate(name, args.seconds, 2)
        rc = recheck_rate(name, args.seconds / 2)
        goal = GOALS.get(name)
        rows.append(
            {
                "workload": name,
                "bytes": size,
                "per_s_1proc": round(one, 2),
                "per_s_2proc": round(two, 2),
                "recheck_per_s": round(rc, 2),
                "goal_per_s": goal,
            }
        )
        print(f"{name:<9} {size:>9} {one:>9.1f} {two:>9.1f} {rc:>10.1f} {goal or '':>6}")
    out = {
        "bench": "content_formats",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "seconds": args.seconds,
        "results": rows,
    }
    path = (
        args.json
        or Path(__file__).parent
        / "results"
        / f"content-formats-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
