"""Worker processes: where untrusted content is parsed.

Each worker is a fresh interpreter (``python -m outside.content.worker``, started with
``subprocess``: no fork of the threaded agent). Before it reads any request it:

- exits when the agent is gone (a watcher thread polls the parent; it also exits when its
  request pipe closes) and forbids gaining privileges (``PR_SET_NO_NEW_PRIVS``);
- leaves the network: ``unshare(CLONE_NEWNET)`` as root, else a new user + network namespace
  where the kernel allows unprivileged ones; the new namespace has only a loopback interface,
  which is down. If neither works it says so (``netns: false``), the pipeline logs a warning
  and the report records it;
- sets rlimits: address space (``memory_mb``), CPU seconds (re-armed per file), file size
  (writes beyond it fail with EFBIG), open files, no core dumps;
- installs a seccomp filter (:mod:`ferry.seccomp`): no sockets, programs, new processes,
  signals to or tracing of other processes, namespaces, mounts, keyrings, BPF or io_uring. If
  the kernel or the architecture does not allow it, it says so (``seccomp: "none: ..."``) and
  the pipeline logs a warning;
- compiles the YARA rules and runs the EICAR self-test.

Protocol: frames of a 4-byte big-endian length and UTF-8 JSON, on private copies of stdin and
stdout (fd 0 and 1 are pointed at /dev/null and stderr, so a library that prints cannot
corrupt a frame). The first frame out is ``{"ready": ...}``; then one answer per request.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import resource
import signal
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

from ferry.content.base import Action
from ferry.content.policy import policy_from_config
from ferry.seccomp import confine

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
# Seconds between checks that the agent is still there.
ORPHAN_POLL = 1.0
PR_SET_NO_NEW_PRIVS = 38
# Largest frame either side accepts (a report of a 1,000-member archive is far smaller).
MAX_FRAME = 64 * 1024 * 1024
MAX_OPEN_FILES = 256
_LEN = struct.Struct(">I")


def write_frame(out: BinaryIO, obj: Any) -> None:
    data = json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    out.write(_LEN.pack(len(data)) + data)
    out.flush()


def _read_exact(inp: BinaryIO, size: int) -> bytes | None:
    parts, got = [], 0
    while got < size:
        chunk = inp.read(size - got)
        if not chunk:
            return None
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def read_frame(inp: BinaryIO) -> Any | None:
    """The next frame's value, or None at end of input."""
    head = _read_exact(inp, 4)
    if head is None:
        return None
    (size,) = _LEN.unpack(head)
    if size > MAX_FRAME:
        raise ValueError("frame too large")
    data = _read_exact(inp, size)
    return None if data is None else json.loads(data)


def _libc() -> Any:
    return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def leave_network(libc: Any) -> str:
    """Move into a new network namespace; returns how ("netns", "userns+netns" or "none")."""
    if libc.unshare(CLONE_NEWNET) == 0:
        return "netns"
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
        return "userns+netns"
    return "none"


def _orphan_watch(parent: int) -> None:
    """Exit when the agent is gone. (PR_SET_PDEATHSIG would fire when the agent *thread*
    that started this worker ends, not the agent.)"""
    while os.getppid() == parent:
        time.sleep(ORPHAN_POLL)
    os._exit(3)


def harden(memory_mb: int, file_bytes: int) -> tuple[str, str]:
    """Confine this process (see the module's docstring); returns how it left the network
    and whether the seccomp filter is on."""
    libc = _libc()
    network = leave_network(libc)  # first: unshare(CLONE_NEWUSER) fails once a thread runs
    threading.Thread(target=_orphan_watch, args=(os.getppid(),), daemon=True).start()
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # oversized writes fail with EFBIG instead
    limit = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    resource.setrlimit(resource.RLIMIT_NOFILE, (MAX_OPEN_FILES, MAX_OPEN_FILES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return network, confine()  # last: it forbids what the steps above use


def arm_cpu(seconds: int) -> None:
    """Allow ``seconds`` more CPU time from now (SIGXCPU kills the worker beyond it)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = int(usage.ru_utime + usage.ru_stime) + 1
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = used + seconds
    if hard != resource.RLIM_INFINITY and soft > hard:
        soft = hard
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _answer(outcome: Any) -> dict[str, Any]:
    return {
        "kind": outcome.kind,
        "type_name": outcome.type_name,
        "name": outcome.name,
        "reason": outcome.reason,
        "message": outcome.message,
        "actions": [_action(a) for a in outcome.actions],
        "report": outcome.report,
        "output": str(outcome.output) if outcome.output is not None else None,
    }


def _action(a: Action) -> dict[str, Any]:
    return {"what": a.what, "target": a.target, "where": a.where, "count": a.count}


def serve(
    inp: BinaryIO, out: BinaryIO, rules: Path | None, network: str, seccomp: str = "none"
) -> int:
    from ferry.content.scan import Scanner  # noqa: PLC0415
    from outside.content.engine import Engine  # noqa: PLC0415  # after the rlimits

    try:
        scanner = Scanner(rules)
        scanner.self_test()
    except Exception as exc:  # noqa: BLE001  # reported to the parent, which refuses to start
        write_frame(out, {"ready": False, "error": str(exc)})
        return 2
    engine = Engine(scanner)
    write_frame(
        out, {"ready": True, "network": network, "seccomp": seccomp, "rules": scanner.digest}
    )
    while True:
        request = read_frame(inp)
        if request is None:
            return 0
        engine.sanitizers = dict(request.get("sanitizers") or {})
        policy = policy_from_config(request["policy"])
        arm_cpu(policy.limits.cpu_seconds)
        try:
            outcome = engine.run(
                policy, Path(request["src"]), request["name"], Path(request["workdir"])
            )
            answer = _answer(outcome)
        except Exception as exc:  # noqa: BLE001  # fail closed: the file is refused
            answer = {
                "kind": "reject",
                "type_name": None,
                "name": str(request.get("name") or "file"),
                "reason": "FILTER_ERROR",
                "message": f"the file could not be checked ({type(exc).__name__})",
                "actions": [],
                "report": {"version": 1, "verdict": "reject", "reason": "FILTER_ERROR"},
                "output": None,
            }
        write_frame(out, answer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="outside.content.worker")
    parser.add_argument("--memory-mb", type=int, required=True)
    parser.add_argument("--file-bytes", type=int, required=True)
    parser.add_argument("--rules")
    args = parser.parse_args(argv)
    proto_in = os.fdopen(os.dup(0), "rb", buffering=0)
    proto_out = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    os.close(devnull)
    sys.stdout = sys.stderr
    network, seccomp = harden(args.memory_mb, args.file_bytes)
    rules = Path(args.rules) if args.rules else None
    return serve(proto_in, proto_out, rules, network, seccomp)


if __name__ == "__main__":
    sys.exit(main())
