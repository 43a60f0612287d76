"""Audit log throughput: appends with fsync group commit, and verification of a large log.

    .venv/bin/python bench/audit.py                      # verify a 1,000,000-record log
    .venv/bin/python bench/audit.py --records 200000     # quicker
    .venv/bin/python bench/audit.py --dir /srv/ferry/x   # on the disk that matters

Every record is schema-validated, hashed into the Merkle tree and written with
group commit (write + fsync of whatever is queued). Records are realistic: a
mix of intake.accepted, verdict, transfer.sent and delivery.delivered with an
item id, channel, name, size, SHA-256 and sequence number (about 420 bytes).

1. ``append``: one thread appends without waiting, then waits for the last one.
2. ``durable``: T threads each call ``append(..., durable=True)`` (acknowledge
   only after the record is on disk), the pattern of the intake API.
3. ``verify``: ``ferry.audit.verify`` of an N-record log (records/s, seconds).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import structlog

from ferry.audit import AuditLog, AuditObject, AuditSettings, FileOps, Subject, verify
from ferry.crypto.keys import SecretKey

KEY = SecretKey.generate("ed25519")
EVENTS = ("intake.accepted", "verdict", "transfer.sent", "delivery.delivered")
CLIENT = Subject.api_client("z85:Z1Pcy8d7p3xWq0rT5uV2wY4aB6cE9fH1jK3lM5nO", "portal")


class CountingFiles(FileOps):
    def __init__(self) -> None:
        self.fsyncs = 0

    def fsync(self, fd: int) -> None:
        self.fsyncs += 1
        super().fsync(fd)


def record(i: int) -> dict[str, object]:
    event = EVENTS[i % len(EVENTS)]
    obj = AuditObject(
        item=f"0193f2c4-7d1e-7b3a-9d55-{i:012x}",
        channel="files/default",
        name=f"application-{i:08d}.pdf",
        size=100_000 + i,
        sha256=f"{i:064x}",
        seq=i,
    )
    return {
        "event": event,
        "subject": CLIENT if event == "intake.accepted" else Subject.component("pipeline"),
        "result": "success",
        "obj": obj,
        "corr": f"c-{i:016x}",
    }


def settings() -> AuditSettings:
    return AuditSettings(origin="bench.ferry.example/audit", side="outside")


def bench_append(root: Path, n: int) -> Path:
    path = root / "append"
    files = CountingFiles()
    records = [record(i) for i in range(n)]
    with AuditLog(path, KEY, settings(), files=files) as log:
        start = time.perf_counter()
        for r in records:
            log.append(**r)  # type: ignore[arg-type]
        queued = time.perf_counter()
        log.wait_durable(log.size - 1, timeout=600)
        done = time.perf_counter()
    size = sum(p.stat().st_size for p in path.glob("audit-*.jsonl"))
    print(
        f"append   1 thread   {n:>9,} records  {n / (done - start):>9,.0f} records/s durable "
        f"({n / (queued - start):,.0f}/s queued)  {files.fsyncs:,} fsyncs  "
        f"{size / max(n, 1):.0f} B/record"
    )
    return path


def bench_durable(root: Path, threads: int, per_thread: int) -> None:
    path = root / f"durable-{threads}"
    files = CountingFiles()
    latencies: list[float] = []
    lock = threading.Lock()
    with AuditLog(path, KEY, settings(), files=files) as log:

        def work(t: int) -> None:
            mine = []
            for i in range(per_thread):
                r = record(t * per_thread + i)
                began = time.perf_counter()
                log.append(**r, durable=True)  # type: ignore[arg-type]
                mine.append(time.perf_counter() - began)
            with lock:
                latencies.extend(mine)

        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        elapsed = time.perf_counter() - start
    n = threads * per_thread
    q = statistics.quantiles(latencies, n=100)
    print(
        f"durable  {threads} thread{'s' if threads > 1 else ' '}  {n:>9,} records  "
        f"{n / elapsed:>9,.0f} records/s  p50 {q[49] * 1e3:.2f} ms  p99 {q[98] * 1e3:.2f} ms  "
        f"{files.fsyncs / n:.2f} fsyncs/record"
    )


def bench_verify(path: Path, n: int) -> None:
    report = verify(path, KEY.public)
    assert report.verified, report.first
    print(
        f"verify   {report.records:>20,} records  {report.records / report.seconds:>9,.0f} "
        f"records/s  {report.seconds:.1f} s  ({report.checkpoints_verified:,} checkpoints, "
        f"{report.segments} segments)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000, help="records to verify")
    parser.add_argument("--durable", type=int, default=2_000, help="durable appends per thread")
    parser.add_argument("--dir", help="work folder (default: a temporary one, removed)")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="ferry-audit-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"work folder {root} ({os.cpu_count()} CPUs)")
    try:
        for threads in (1, 8):
            bench_durable(root, threads, args.durable)
        log = bench_append(root, args.records)
        bench_verify(log, args.records)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
