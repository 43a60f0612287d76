"""The inside's message delivery step alone: CPU per message, and what the folder files cost.

A real ``InsideAgent`` on a fresh ``ferry init`` deployment (ledger, audit log, consumer
outbox, the messages channel's delivery folder, all on real files) delivers batches of
verified citizen-application messages, exactly as its delivery thread does with the members
of the bundles it receives: re-check (strict JSON, schema, canonical form), the folder files
(O_TMPFILE, syncfs, linkat), two audit records each, the folder fsync, one ledger and outbox
transaction. No network and no outside agent, so the figures are steadier than
``messages.py``'s and show one thread's cost::

    .venv/bin/python bench/inside_deliver.py [--batch 500] [--batches 16] [--churn N] [--dir DIR]

``--churn N`` first creates and deletes N files in the deployment's filesystem, as a previous
run's clean-up (or a consumer that deletes the files it has read) does. On ext4 without a
journal, the kernel does not reuse an inode deleted in the last minute (several minutes while
its inode table block is still dirty), and it checks each such inode, one buffer-cache
lookup at a time, every time it allocates a new one: each delivered file then costs much
more kernel time. Journaled filesystems (ext4 with its journal, the default; XFS) skip
this check. ``sync; echo 3 > /proc/sys/vm/drop_caches`` (root) ends it at once.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ferry.config import load_inside_config  # noqa: E402
from ferry.crypto.keys import load_secret_key  # noqa: E402
from ferry.jsondoc import SchemaRegistry  # noqa: E402
from ferry.wire import records as rec  # noqa: E402
from inside import agent as agent_mod  # noqa: E402
from inside import deliver as deliver_mod  # noqa: E402
from inside.agent import InsideAgent  # noqa: E402
from outside.api import message_manifest  # noqa: E402

SCHEMA = ROOT / "schemas" / "messages" / "citizen-application.schema.json"
Message = tuple[bytes, rec.Manifest, bytes]


def _messages(count: int, sender: bytes) -> list[Message]:
    doc = json.loads(SCHEMA.read_text())["examples"][0]
    registry = SchemaRegistry.load()
    out: list[Message] = []
    for seq in range(1, count + 1):
        doc["application_id"] = str(uuid.UUID(int=seq))
        _, canonical = registry.check("citizen-application", json.dumps(doc).encode())
        manifest = message_manifest(
            "messages", seq, "citizen-application", canonical, sender=sender, client="portal"
        )
        out.append((manifest.object_id, manifest, canonical))
    return out


def _churn(where: Path, count: int) -> float:
    """Create and delete ``count`` files under ``where``; seconds taken."""
    t0 = time.perf_counter()
    junk = where / "churn"
    junk.mkdir()
    for i in range(count):
        (junk / f"{i}.json").write_bytes(b"{}")
    shutil.rmtree(junk)
    return time.perf_counter() - t0


def _timed(func: Callable[..., Any], spent: list[float]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.thread_time()
        try:
            return func(*args, **kwargs)
        finally:
            spent[0] += time.thread_time() - t0

    return wrapper


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=500, help="messages per batch")
    ap.add_argument("--batches", type=int, default=16, help="batches (the first one warms up)")
    ap.add_argument("--churn", type=int, default=0, help="files created and deleted first")
    ap.add_argument("--dir", help="where to put the deployment (default: a temporary folder)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="ferry-inside-deliver-", dir=args.dir))
    agent: InsideAgent | None = None
    try:
        out = subprocess.run(
            [sys.executable, "-m", "ferry.cli", "init", str(base / "d"), "--json"],
            capture_output=True,
            check=True,
            cwd=ROOT,
        )
        dep = json.loads(out.stdout)
        churn_s = _churn(base, args.churn) if args.churn else 0.0
        agent = InsideAgent(load_inside_config(Path(dep["inside"]["config"])), threading.Event())
        sender = load_secret_key(Path(dep["outside"]["signing_key"]), ("ed25519",))
        msgs = _messages(args.batch * args.batches, sender.public.key_id)
        batches = [msgs[i : i + args.batch] for i in range(0, len(msgs), args.batch)]
        agent._deliver_messages_audited(batches[0])  # warm up (schemas, statements, caches)
        folder = [0.0]
        timed = _timed(deliver_mod.write_new_files, folder)
        agent_mod.write_new_files = timed  # type: ignore[attr-defined]  # (imported by name)
        c0, t0, w0 = time.process_time(), time.thread_time(), time.perf_counter()
        for batch in batches[1:]:
            agent._deliver_messages_audited(batch)
        c1, t1, w1 = time.process_time(), time.thread_time(), time.perf_counter()
        n = args.batch * (len(batches) - 1)
        delivered = len(list(Path(dep["channels"]["messages"]["deliver"]).iterdir()))
        if delivered != len(msgs):
            print(f"error: {delivered} files delivered of {len(msgs)}", file=sys.stderr)
            return 1
        result = {
            "messages": n,
            "batch": args.batch,
            "churn_files": args.churn,
            "churn_seconds": round(churn_s, 2),
            "thread_cpu_us": round((t1 - t0) / n * 1e6, 1),
            "folder_files_cpu_us": round(folder[0] / n * 1e6, 1),
            "process_cpu_us": round((c1 - c0) / n * 1e6, 1),
            "wall_us": round((w1 - w0) / n * 1e6, 1),
        }
    finally:
        if agent is not None:
            agent.audit.close()
            agent.ledger.close()
        shutil.rmtree(base, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"inside delivery of {n} messages in batches of {args.batch}"
            + (f", after creating and deleting {args.churn} files" if args.churn else "")
            + f": delivery thread {result['thread_cpu_us']} µs CPU per message"
            f" (folder files {result['folder_files_cpu_us']} µs), process"
            f" {result['process_cpu_us']} µs, wall {result['wall_us']} µs"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
