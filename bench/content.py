#!/usr/bin/env python3
"""Content pipeline throughput: files per second through ContentPipeline.process.

    .venv/bin/python bench/content.py [--seconds S] [--workers 2] [--json FILE]

Each workload is one generated file processed over and over for S seconds by ``workers``
threads feeding a pipeline of the same number of worker processes (the real path: request,
isolated worker, every stage, verdict), so the rate includes process isolation and IPC.
Workloads: a JSON message validated against its schema, UTF-8 text, CSV with formulas, a ZIP
of 20 text members and, when their filters exist, a 10-page PDF, a 3-megapixel JPEG and a
DOCX. ``json_direct`` is ferry.jsondoc's SchemaRegistry.check in this process (one core):
the per-core ceiling of message validation without per-file isolation.

Goals (2 cores): PDF >= 20/s, 3 MP images >= 10/s, JSON validated >= 50,000/s per core.
Results go to bench/results/content-<time>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import platform
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ferry import jsondoc, log
from ferry.content.policy import SUPPORTED_TYPES, policy_from_config
from outside.content.pipeline import ContentPipeline

SCHEMA = Path(__file__).resolve().parents[1] / "ferry/schemas/messages"


def _example() -> bytes:
    doc = json.loads((SCHEMA / "citizen-application.schema.json").read_text("utf-8"))
    return json.dumps(doc["examples"][0], ensure_ascii=False).encode()


def _text() -> bytes:
    return ("预算执行情况 Budget execution report, line of ordinary prose.\n" * 400).encode()


def _csv() -> bytes:
    rows = ["id,amount,delta,name,note"]
    rows += [f"{i},-{i}.5,+{i},张三{i},=SUM(A{i})" for i in range(1, 500)]
    return ("\n".join(rows) + "\n").encode()


def _zip() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(20):
            zf.writestr(f"docs/file-{i}.txt", _text()[: 2000 + i])
    return out.getvalue()


def _pdf() -> bytes:
    from tests.corpus.build_docs import simple_pdf  # noqa: PLC0415

    pages = [[f"Page {p + 1}, line {i}: the quick brown fox" for i in range(40)] for p in range(10)]
    return simple_pdf(pages)


def _jpeg() -> bytes:
    from PIL import Image  # noqa: PLC0415

    im = Image.effect_noise((2048, 1536), 40).convert("RGB")
    out = io.BytesIO()
    im.save(out, "JPEG", quality=85)
    return out.getvalue()


def _docx() -> bytes:
    from tests.corpus.build_docs import docx  # noqa: PLC0415

    return docx([f"Paragraph {i}: 关于预算执行情况的报告。" for i in range(200)])


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def run_workload(
    pipeline: ContentPipeline,
    name: str,
    data: bytes,
    policy: Any,
    seconds: float,
    threads: int,
    tmp: Path,
) -> dict[str, Any]:
    src = tmp / f"src-{name}"
    src.write_bytes(data)
    counter = iter(range(10**9))
    kinds: dict[str, int] = {}

    def worker(_: int) -> int:
        done = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            n = next(counter)
            verdict = pipeline.process(policy, src, name, tmp / f"w-{n}")
            kinds[verdict.kind] = kinds.get(verdict.kind, 0) + 1
            if verdict.output is not None:
                verdict.output.unlink()
            done += 1
        return done

    started = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(worker, range(threads)))
    elapsed = time.monotonic() - started
    return {
        "workload": name,
        "bytes": len(data),
        "files": total,
        "per_second": round(total / elapsed, 1),
        "verdicts": kinds,
    }


def json_direct(seconds: float) -> dict[str, Any]:
    registry = jsondoc.SchemaRegistry.load()
    data = _example()
    n = 0
    cpu = time.process_time()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(200):
            registry.check("citizen-application", data)
        n += 200
    used = time.process_time() - cpu
    return {
        "workload": "json_direct (jsondoc, 1 core)",
        "files": n,
        "per_second": round(n / used, 1),
        "bytes": len(data),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    log.configure("warning")
    everything = {"types": list(SUPPORTED_TYPES)}
    workloads: list[tuple[str, Callable[[], bytes], dict[str, Any]]] = [
        ("message.json", _example, dict(everything, schemas=["citizen-application"])),
        ("report.txt", _text, everything),
        ("table.csv", _csv, everything),
        ("bundle.zip", _zip, everything),
    ]
    if _available("outside.content.formats.pdf"):
        workloads.append(("ten-pages.pdf", _pdf, everything))
    if _available("outside.content.formats.image"):
        workloads.append(("photo-3mp.jpg", _jpeg, everything))
    if _available("outside.content.formats.ooxml"):
        workloads.append(("letter.docx", _docx, everything))
    results = []
    with tempfile.TemporaryDirectory() as tmp, ContentPipeline(workers=args.workers) as pipe:
        for name, build, raw in workloads:
            result = run_workload(
                pipe,
                name,
                build(),
                policy_from_config(raw),
                args.seconds,
                args.workers,
                Path(tmp),
            )
            results.append(result)
            print(
                f"{result['workload']:<22} {result['per_second']:>9.1f} files/s   "
                f"{result['verdicts']}",
                flush=True,
            )
    direct = json_direct(args.seconds)
    results.append(direct)
    print(f"{direct['workload']:<22} {direct['per_second']:>9.1f} msg/s per core")
    doc = {
        "benchmark": "content",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "workers": args.workers,
        "seconds": args.seconds,
        "results": results,
    }
    target = args.json or (
        Path(__file__).resolve().parent
        / "results"
        / f"content-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    print(f"results written to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
