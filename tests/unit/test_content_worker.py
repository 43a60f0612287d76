"""Worker isolation: a filter that crashes, loops, hogs memory, writes too much or lies about
its output is refused with FILTER_ERROR, and the pipeline keeps working."""

from __future__ import annotations

import errno as E
import json
import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from content_helpers import policy

from ferry.errors import SelfTestError
from outside.content.pipeline import ContentPipeline
from tests.corpus.gen_basic import _zip

HOSTILE = "tests.unit.content_helpers"


@pytest.fixture
def pipeline() -> Iterator[ContentPipeline]:
    p = ContentPipeline(
        workers=1,
        sanitizers={
            "csv": f"{HOSTILE}:crash",
            "json": f"{HOSTILE}:loop",
            "xml": f"{HOSTILE}:hog",
            "ofd": f"{HOSTILE}:raises",
            "zip": f"{HOSTILE}:escape",
        },
    )
    p.start()
    yield p
    p.close()


def _check(p: ContentPipeline, tmp: Path, name: str, data: bytes, **limits: float) -> str:
    src = tmp / f"src-{name}"
    src.write_bytes(data)
    verdict = p.process(policy(limits=limits), src, name, tmp / f"work-{name}")
    assert verdict.report["sha256_in"]
    return f"{verdict.kind}:{verdict.reason}" if verdict.reason else verdict.kind


def _still_works(p: ContentPipeline, tmp: Path) -> None:
    assert _check(p, tmp, f"ok{len(list(tmp.iterdir()))}.txt", b"fine\n") == "deliver_as_is"


def test_crash_rejected_and_recovered(pipeline: ContentPipeline, tmp_path: Path) -> None:
    assert _check(pipeline, tmp_path, "a.csv", b"a,b\n") == "reject:FILTER_ERROR"
    assert pipeline.crashes == 1
    _still_works(pipeline, tmp_path)


def test_endless_loop_times_out(pipeline: ContentPipeline, tmp_path: Path) -> None:
    src = tmp_path / "a.json"
    src.write_bytes(b"{}")
    verdict = pipeline.process(policy(limits={"seconds": 1.5}), src, "a.json", tmp_path / "w")
    assert verdict.reason == "FILTER_ERROR"
    assert "longer than 1.5 s" in verdict.message
    _still_works(pipeline, tmp_path)


def test_cpu_limit(pipeline: ContentPipeline, tmp_path: Path) -> None:
    src = tmp_path / "a.json"
    src.write_bytes(b"{}")
    verdict = pipeline.process(
        policy(limits={"seconds": 30, "cpu_seconds": 1}), src, "a.json", tmp_path / "w"
    )
    assert verdict.reason == "FILTER_ERROR"
    assert "CPU" in verdict.message
    _still_works(pipeline, tmp_path)


_HOG = f"""
import json, resource, sys
from pathlib import Path
from content_helpers import policy
from outside.content.pipeline import ContentPipeline
tmp = Path(sys.argv[1])
p = ContentPipeline(workers=1, sanitizers={{"xml": "{HOSTILE}:hog"}})
p.start()
verdicts = []
for name, data in (("a.xml", b"<a/>"), ("ok.txt", b"fine\\n")):
    (tmp / name).write_bytes(data)
    verdict = p.process(policy(limits={{}}), tmp / name, name, tmp / ("work-" + name))
    verdicts.append(f"{{verdict.kind}}:{{verdict.reason}}" if verdict.reason else verdict.kind)
p.close()
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({{"verdicts": verdicts, "peak_kib": peak}}))
"""


def test_memory_hog_bounded(tmp_path: Path) -> None:
    """A filter that allocates without end is stopped by the worker's memory limit. Run in
    a process of its own: the peak of its workers alone (RUSAGE_CHILDREN counts every child
    a process ever had, and pytest's own include the agents of other tests)."""
    unit = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(unit.parents[1]), str(unit)])}
    run = subprocess.run(
        [sys.executable, "-c", _HOG, str(tmp_path)],
        check=False, capture_output=True, text=True, timeout=120, env=env, cwd=unit.parents[1],
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["verdicts"] == ["reject:FILTER_ERROR", "deliver_as_is"]
    assert out["peak_kib"] < 500 * 1024, f"a worker reached {out['peak_kib'] // 1024} MiB"


def test_filter_exception(pipeline: ContentPipeline, tmp_path: Path) -> None:

    ofd = _zip([("OFD.xml", b"<ofd:OFD/>")])
    assert _check(pipeline, tmp_path, "a.ofd", ofd) == "reject:FILTER_ERROR"
    _still_works(pipeline, tmp_path)


def test_output_outside_workdir_refused(pipeline: ContentPipeline, tmp_path: Path) -> None:

    verdict = _check(pipeline, tmp_path, "a.zip", _zip([("a.txt", b"a")]))
    assert verdict == "reject:FILTER_ERROR"


def test_file_size_limit(tmp_path: Path) -> None:
    with ContentPipeline(workers=1, sanitizers={"txt": f"{HOSTILE}:big_write"}) as p:
        src = tmp_path / "a.txt"
        src.write_bytes(b"x\n")
        small = policy(limits={"max_bytes": "1M", "archive_expanded": "1M"})
        verdict = p.process(small, src, "a.txt", tmp_path / "w")
        assert verdict.reason == "FILTER_ERROR"
        assert not list((tmp_path / "w").iterdir()), "a partial output was left behind"


def test_worker_has_no_network() -> None:
    code = (
        "import socket, sys\n"
        "from outside.content.worker import harden\n"
        "net, _ = harden(450, 1 << 30)\n"
        "try:\n"
        "    s = socket.socket(); s.settimeout(2)\n"
        "    s.connect(('127.0.0.1', 9)); print('connected')\n"
        "except OSError as e:\n    print(net, e.errno)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    net, errno = out.stdout.split()
    if net == "none":
        pytest.skip("no network namespaces on this machine")
    # EPERM: the seccomp filter refuses the socket itself (test_worker_seccomp_filter)
    assert int(errno) in (E.EPERM, E.ENETUNREACH, E.ECONNREFUSED, E.EADDRNOTAVAIL)


UNSHARE = (
    "import ctypes, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "print('ok' if libc.unshare(0x10000000 | 0x40000000) == 0 else 'refused')\n"
)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the worker as another user")
def test_worker_leaves_the_network_when_not_root() -> None:
    """As an unprivileged user the worker needs a user namespace for its network namespace,
    which the kernel refuses to a process that already runs a second thread (EINVAL); under
    the systemd units the agents never run as root."""
    nobody = {"user": 65534, "group": 65534, "extra_groups": []}
    here = Path(__file__).resolve()
    if any(not d.stat().st_mode & 0o001 for d in here.parents):
        pytest.skip(f"another user cannot reach {here.parents[2]} (a folder on the way is closed)")
    control = subprocess.run(
        [sys.executable, "-c", UNSHARE], capture_output=True, text=True, check=True, **nobody
    )
    if control.stdout.strip() != "ok":
        pytest.skip("this kernel gives unprivileged users no namespaces")
    code = "from outside.content.worker import harden\nprint(harden(450, 1 << 30)[0])\n"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
        **nobody,
    )
    assert out.stdout.strip() == "userns+netns"


PROBE = """
import ctypes, errno, json, os, socket, subprocess, threading
from outside.content.worker import harden
out = {"seccomp": harden(450, 1 << 30)[1]}
libc = ctypes.CDLL(None, use_errno=True)

def attempt(name, fn):
    try:
        fn()
        out[name] = "allowed"
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))

def raw(nr, *args):
    if libc.syscall(*(ctypes.c_long(a) for a in (nr, *args))) == -1:
        raise OSError(ctypes.get_errno(), "refused")

attempt("socket", socket.socket)
attempt("socketpair", socket.socketpair)
attempt("fork", os.fork)
attempt("exec", lambda: subprocess.run(["/bin/true"], check=False))
attempt("signal the agent", lambda: os.kill(os.getppid(), 0))
attempt("unshare", lambda: raw(272, 0x10000000))
attempt("ptrace", lambda: raw(101, 16, os.getppid(), 0, 0))
attempt("bpf", lambda: raw(321, 0, 0, 0))
attempt("io_uring", lambda: raw(425, 1, 0))
attempt("x32 getpid", lambda: raw(0x40000000 + 39))
t = threading.Thread(target=lambda: out.__setitem__("thread", "ran"))
t.start()
t.join()
r, w = os.pipe()
os.write(w, b"p")
out["pipe"] = os.read(r, 1).decode()
print(json.dumps(out))
"""


def test_worker_seccomp_filter(tmp_path: Path) -> None:
    """A hardened worker cannot open sockets, run programs, make processes, signal or trace
    the agent, or reach namespaces, BPF, io_uring or another ABI; threads, files and its
    pipes still work."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )  # fmt: skip
    got = json.loads(out.stdout)
    assert got.pop("seccomp") == "filter"
    assert got.pop("thread") == "ran"
    assert got.pop("pipe") == "p"
    assert got == dict.fromkeys(
        ["socket", "socketpair", "fork", "exec", "signal the agent", "unshare", "ptrace", "bpf",
         "io_uring", "x32 getpid"],
        "EPERM",
    )  # fmt: skip


def test_pipeline_reports_the_filter() -> None:
    with ContentPipeline(workers=1) as p:
        assert p.seccomp == "filter"
        worker = p._idle.get()
        try:
            status = Path(f"/proc/{worker.pid}/status").read_text()
        finally:
            p._idle.put(worker)
    assert "\nSeccomp:\t2\n" in status  # mode 2: a filter


def test_self_test_fails_without_eicar_rule(tmp_path: Path) -> None:
    (tmp_path / "other.yar").write_text('rule R { strings: $a = "zzzz" condition: $a }')
    with pytest.raises(SelfTestError):
        ContentPipeline(rules_dir=tmp_path).start()


def test_concurrent_processing(tmp_path: Path) -> None:
    with ContentPipeline(workers=2, max_jobs=3) as p:

        def one(i: int) -> str:
            src = tmp_path / f"{i}.txt"
            src.write_bytes(f"file {i}\n".encode())
            return p.process(policy(), src, f"{i}.txt", tmp_path / f"w{i}").kind

        with ThreadPoolExecutor(4) as pool:
            kinds = list(pool.map(one, range(12)))
    assert kinds == ["deliver_as_is"] * 12


def test_workers_started_while_many_descriptors_are_open(tmp_path: Path) -> None:
    """The outside raises its descriptor limit and may hold 1,000 API connections: a worker
    started then gets pipes numbered past 1023, which select() refuses (ValueError); the
    pipeline waits on them with poll()."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(2048, hard), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        assert max(held) > 1024
        with ContentPipeline(workers=1) as p:
            _still_works(p, tmp_path)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
