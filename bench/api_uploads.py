"""Message acknowledgements while other clients' uploads are checked.

The outer API answers every client from one thread; a complete upload goes through the
channel's content policy (worker processes) and into the spool. This measures how long a
message waits for its ACCEPTED (hand-off to the API socket → answer, one client) in two
phases on a fresh ``ferry init`` deployment (both agents as subprocesses):

1. baseline: one message every ``--interval`` seconds for ``--seconds``;
2. the same while a second client uploads a ``--megapixels`` PNG photo (noise: the
   sanitizer decodes and re-encodes every pixel) to the ``documents`` channel, one upload
   after another.

The table gives p50, p99 and max per phase, and the uploads' count and mean time.
Run it from a worktree of an older commit, with the same venv, for a side-by-side figure.

    .venv/bin/python bench/api_uploads.py [--seconds 10] [--interval 0.02] [--megapixels 12]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import messages as mb  # noqa: E402
from PIL import Image  # noqa: E402

from ferry.client import Client  # noqa: E402


def _photo(path: Path, megapixels: float) -> None:
    width = int((megapixels * 1e6 * 4 / 3) ** 0.5)
    height = int(megapixels * 1e6 / width)
    Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)).save(path)


def _acks(config: str, seconds: float, interval: float) -> list[float]:
    """Milliseconds from each submission to its ACCEPTED."""
    doc = mb._template()
    out: list[float] = []
    with Client.from_config(config) as client:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            doc["application_id"] = str(uuid.uuid4())
            body = json.dumps(doc).encode()
            t0 = time.perf_counter()
            client.submit("messages", body, schema="citizen-application", timeout=120)
            out.append((time.perf_counter() - t0) * 1000)
            time.sleep(interval)
    return out


def _summary(ms: list[float]) -> dict[str, float]:
    ms = sorted(ms)
    return {
        "messages": len(ms),
        "p50_ms": statistics.median(ms),
        "p99_ms": ms[min(len(ms) - 1, int(len(ms) * 0.99))],
        "max_ms": ms[-1],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    ap.add_argument("--interval", type=float, default=0.02, help="seconds between messages")
    ap.add_argument("--megapixels", type=float, default=12.0, help="size of the uploaded photo")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ferry-bench-up-") as tmp_s:
        tmp = Path(tmp_s)
        dep = mb._deploy(tmp, 1, folder=True, on={})
        entry = Path(dep["api"]["allowlist_entry"])
        entry.write_text(
            entry.read_text().replace("channels: [messages]", "channels: [messages, documents]")
        )
        photo = tmp / "photo.png"
        _photo(photo, args.megapixels)
        procs = [
            mb._start("inside", dep["inside"]["config"], tmp / "inside.log"),
            mb._start("outside", dep["outside"]["config"], tmp / "outside.log"),
        ]
        config = dep["api"]["client_config"]
        try:
            time.sleep(3.0)  # agents up, API listening, allow-list reloaded
            _acks(config, 1.0, args.interval)  # warm-up
            baseline = _acks(config, args.seconds, args.interval)
            uploads: list[float] = []
            stop = threading.Event()

            def upload() -> None:
                with Client.from_config(config) as client:
                    while not stop.is_set():
                        t0 = time.perf_counter()
                        client.upload("documents", photo, timeout=120)
                        uploads.append(time.perf_counter() - t0)

            uploader = threading.Thread(target=upload, daemon=True)
            uploader.start()
            time.sleep(0.5)
            during = _acks(config, args.seconds, args.interval)
            stop.set()
            uploader.join(120)
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                p.wait(timeout=30)
    result = {
        "baseline": _summary(baseline),
        "during_uploads": _summary(during),
        "uploads": len(uploads),
        "upload_mean_s": statistics.mean(uploads) if uploads else None,
        "megapixels": args.megapixels,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for phase in ("baseline", "during_uploads"):
        r = result[phase]
        print(
            f"{phase:>15}: {r['messages']} messages, ACCEPTED after p50 {r['p50_ms']:.2f} ms, "
            f"p99 {r['p99_ms']:.2f} ms, max {r['max_ms']:.1f} ms"
        )
    mean = result["upload_mean_s"]
    print(
        f"{args.megapixels:g}-megapixel PNG uploads meanwhile: {result['uploads']}"
        + (f", {mean:.2f} s each" if mean else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
