"""The content-security pipeline: every file, one verdict, parsed only in worker processes.

::

    pipeline = ContentPipeline(rules_dir=None, workers=2)
    pipeline.start()                      # EICAR self-test; SelfTestError if it fails
    verdict = pipeline.process(policy, src, name, workdir)
    pipeline.close()

``process`` never raises for bad content and never delivers what it could not check: a worker
that crashes, is killed by its rlimits, exceeds the wall-clock limit (``limits.seconds``) or
answers anything but a well-formed verdict yields ``reject`` / FILTER_ERROR, and the worker
is replaced. Workers are also recycled after ``max_jobs`` files. ``process`` may be called
from several threads at once; at most ``workers`` files are checked at a time.

The worker's answer is untrusted (the worker parsed hostile bytes): its verdict kind, reason
code, names and actions are checked, and a cleaned output must be a regular file inside the
item's work folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import select
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ferry import log
from ferry.content.base import REASONS, Action, Limits, Policy, Verdict
from ferry.content.policy import policy_to_json
from ferry.content.scan import Scanner
from ferry.errors import SelfTestError
from outside.content.identify import EXTENSION_TYPES
from outside.content.names import CANONICAL_EXTENSIONS, MAX_NAME_BYTES, split_extension

_log = log.get("outside.content")

# Seconds a new worker may take to import, compile the rules and self-test.
START_TIMEOUT = 60.0
# Seconds added to a file's wall-clock limit for the round trip of request and answer.
IPC_GRACE = 2.0
# A worker is replaced after this many files (bounds leaks and state kept between files).
MAX_JOBS = 200
# Slack on top of the largest output a policy allows (reports, temporary member files).
FILE_BYTES_MIN = 64 * 1024 * 1024
# Largest answer frame read from a worker.
MAX_FRAME = 64 * 1024 * 1024
_ROOT = Path(__file__).resolve().parents[2]
_KINDS = ("deliver_as_is", "deliver_cleaned", "reject")
_ACTION_WORDS = frozenset(
    {"removed", "replaced", "converted", "normalised", "neutralised", "renamed", "rebuilt"}
)


class WorkerFailed(Exception):
    """The worker died, hung or answered nonsense; the message is for the report."""


class _Worker:
    def __init__(self, memory_mb: int, file_bytes: int, rules_dir: Path | None) -> None:
        self.memory_mb = memory_mb
        self.file_bytes = file_bytes
        self.jobs = 0
        cmd = [
            sys.executable,
            "-m",
            "outside.content.worker",
            "--memory-mb",
            str(memory_mb),
            "--file-bytes",
            str(file_bytes),
        ]
        if rules_dir is not None:
            cmd += ["--rules", str(rules_dir)]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("http_", "HTTP"))}
        env["PYTHONPATH"] = os.pathsep.join(
            [str(_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            close_fds=True,
            start_new_session=True,
        )
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self._in = self.proc.stdin
        self._out = self.proc.stdout.fileno()
        ready = self._read(time.monotonic() + START_TIMEOUT)
        if not isinstance(ready, dict) or ready.get("ready") is not True:
            self.kill()
            error = ready.get("error") if isinstance(ready, dict) else None
            raise SelfTestError(f"content worker did not start: {error or ready!r}")
        self.network = str(ready.get("network"))
        self.seccomp = str(ready.get("seccomp"))
        self.rules = str(ready.get("rules"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read_exact(self, size: int, deadline: float) -> bytes:
        parts, got = [], 0
        waiting = select.poll()  # (not select(): descriptors past 1023 are common here)
        waiting.register(self._out, select.POLLIN)
        while got < size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            if not waiting.poll(max(1, int(left * 1000))):
                raise TimeoutError
            chunk = os.read(self._out, min(size - got, 1 << 20))
            if not chunk:
                raise WorkerFailed(self._death())
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def _read(self, deadline: float) -> Any:
        (size,) = struct.unpack(">I", self._read_exact(4, deadline))
        if size > MAX_FRAME:
            raise WorkerFailed("the checking process sent an oversized answer")
        try:
            return json.loads(self._read_exact(size, deadline))
        except ValueError:
            raise WorkerFailed("the checking process sent an unreadable answer") from None

    def _death(self) -> str:
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
            return "the checking process stopped answering"
        if code < 0:
            sig = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            if -code == signal.SIGXCPU:
                return "checking the file used more CPU time than allowed"
            return f"the checking process was killed ({sig})"
        return f"the checking process exited (code {code})"

    def request(self, payload: dict[str, Any], timeout: float) -> Any:
        data = json.dumps(payload, separators=(",", ":")).encode()
        self.jobs += 1
        try:
            self._in.write(struct.pack(">I", len(data)) + data)
            self._in.flush()
        except (BrokenPipeError, OSError):
            raise WorkerFailed(self._death()) from None
        return self._read(time.monotonic() + timeout)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                if stream is not None:
                    stream.close()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._in.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
        else:
            with contextlib.suppress(OSError):
                if self.proc.stdout is not None:
                    self.proc.stdout.close()


class ContentPipeline:
    """Isolated content checks for every file of every channel (one instance per agent)."""

    def __init__(
        self,
        rules_dir: Path | None = None,
        workers: int = 2,
        *,
        sanitizers: dict[str, str] | None = None,
        max_jobs: int = MAX_JOBS,
    ) -> None:
        if workers < 1:
            raise ValueError("at least one worker is needed")
        self.rules_dir = rules_dir
        self.workers = workers
        self.max_jobs = max_jobs
        self._sanitizers = dict(sanitizers or {})
        self._idle: queue.LifoQueue[_Worker | None] = queue.LifoQueue()
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self._started = False
        self.rules_digest = ""
        self.network_isolation = "unknown"
        self.seccomp = "unknown"
        self.crashes = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Compile the rules and run the EICAR self-test here and in one worker; raises
        SelfTestError (or ConfigError for a bad rules folder) if either fails."""
        with self._lock:
            if self._started:
                return
            scanner = Scanner(self.rules_dir)
            scanner.self_test()
            self.rules_digest = scanner.digest
            limits = Policy(frozenset()).limits
            first = self._spawn(limits.memory_mb, _file_bytes(limits))
            self.network_isolation = first.network
            if first.network == "none":
                _log.warning(
                    "content_worker_network_not_isolated",
                    detail="no network namespace could be created; workers can reach the "
                    "network (run the agent as root or allow unprivileged user namespaces)",
                )
            self.seccomp = first.seccomp
            if first.seccomp != "filter":
                _log.warning(
                    "content_worker_seccomp_off",
                    detail=f"workers run without their seccomp filter ({first.seccomp})",
                )
            for _ in range(self.workers):
                self._idle.put(None)  # a slot: a worker is started on first use
            self._idle.get()
            self._idle.put(first)
            self._started = True
            _log.info(
                "content_pipeline_started",
                workers=self.workers,
                rules=self.rules_digest,
                network=self.network_isolation,
                seccomp=self.seccomp,
            )

    def close(self) -> None:
        with self._lock:
            workers, self._all = list(self._all), set()
            self._started = False
            self._idle = queue.LifoQueue()
        for w in workers:
            w.stop()

    def __enter__(self) -> ContentPipeline:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _spawn(self, memory_mb: int, file_bytes: int = FILE_BYTES_MIN) -> _Worker:
        worker = _Worker(memory_mb, file_bytes, self.rules_dir)
        self._all.add(worker)
        return worker

    def _retire(self, worker: _Worker, *, kill: bool) -> None:
        self._all.discard(worker)
        if kill:
            worker.kill()
        else:
            worker.stop()

    # ------------------------------------------------------------------ one file
    def process(self, policy: Policy, src: Path, name: str, workdir: Path) -> Verdict:
        """Check one file; the verdict's ``output`` (when cleaned) lies in ``workdir``."""
        if not self._started:
            self.start()
        started = time.monotonic()
        workdir = Path(os.path.abspath(workdir))
        workdir.mkdir(parents=True, exist_ok=True)
        payload = {
            "policy": policy_to_json(policy),
            "src": os.path.abspath(src),
            "name": name,
            "workdir": str(workdir),
            "sanitizers": self._sanitizers,
        }
        slot = self._idle.get()
        worker = slot
        try:
            file_bytes = _file_bytes(policy.limits)
            if worker is not None and (worker.memory_mb, worker.file_bytes) != (
                policy.limits.memory_mb,
                file_bytes,
            ):
                self._retire(worker, kill=False)
                worker = None
            if worker is None:
                with self._lock:
                    worker = self._spawn(policy.limits.memory_mb, file_bytes)
            try:
                answer = worker.request(payload, policy.limits.seconds + IPC_GRACE)
                verdict = self._verdict(
                    answer, src=src, name=name, workdir=workdir, started=started
                )
            except TimeoutError:
                self._fail(worker)
                worker = None
                verdict = self._filter_error(
                    src,
                    name,
                    started,
                    f"checking the file took longer than {policy.limits.seconds:g} s",
                )
            except WorkerFailed as exc:
                self._fail(worker)
                worker = None
                verdict = self._filter_error(src, name, started, str(exc))
            if worker is not None and worker.jobs >= self.max_jobs:
                self._retire(worker, kill=False)
                worker = None
            return verdict
        except SelfTestError:
            worker = None
            raise
        finally:
            self._idle.put(worker)

    def process_overridden(
        self, policy: Policy, src: Path, name: str, workdir: Path, refused: Verdict
    ) -> Verdict:
        """Check a refused file again with its one refusal set aside, because a verified
        release accepted that reason code for this very file (:func:`override_inputs`).

        Every other stage runs again: the new verdict decides, and its report's ``override``
        says what was set aside and whether that let the file through (``applied``). A
        refusal that cannot be set aside, or a second refusal, keeps the file refused."""
        code = str(refused.reason)
        note: dict[str, Any] = {"code": code, "refused": f"{code}: {refused.message}"}
        relaxed = override_inputs(policy, name, refused)
        if relaxed is None:
            note |= {"applied": False, "why": "this refusal cannot be set aside for this file"}
            verdict = refused
        else:
            verdict = self.process(relaxed[0], src, relaxed[1], workdir)
            note["applied"] = verdict.kind != "reject"
            if relaxed[1] != name:
                note["checked_as"] = relaxed[1]
        _log.warning(
            "content_override", name=name, code=code, applied=note["applied"], verdict=verdict.kind
        )
        return replace(verdict, report={**verdict.report, "override": note})

    def _fail(self, worker: _Worker) -> None:
        self.crashes += 1
        _log.warning("content_worker_failed", pid=worker.pid)
        self._retire(worker, kill=True)

    def _filter_error(self, src: Path, name: str, started: float, message: str) -> Verdict:
        digest, size = _digest(src)
        report = {
            "version": 1,
            "name": name,
            "delivered_name": None,
            "type": None,
            "verdict": "reject",
            "reason": "FILTER_ERROR",
            "message": message,
            "sha256_in": digest,
            "sha256_out": None,
            "size_in": size,
            "size_out": None,
            "actions": [],
            "members": [],
            "scans": {"engine": "yara", "rules": self.rules_digest, "objects": 0, "matches": []},
            "elapsed_ms": round((time.monotonic() - started) * 1000, 1),
        }
        _log.warning("content_filter_error", name=name, message=message)
        return Verdict("reject", None, name, "FILTER_ERROR", message, report=report)

    def _verdict(
        self,
        answer: Any,
        *,
        src: Path,
        name: str,
        workdir: Path,
        started: float,
    ) -> Verdict:
        try:
            return _checked_verdict(answer, workdir)
        except (KeyError, TypeError, ValueError) as exc:
            _log.error("content_worker_bad_answer", name=name, error=str(exc))
            return self._filter_error(
                src, name, started, "the checking process returned an invalid answer"
            )


def override_inputs(policy: Policy, name: str, refused: Verdict) -> tuple[Policy, str] | None:
    """The policy and name to check a refused file again with, its one refusal set aside;
    None when that refusal cannot be set aside (the file stays refused).

    * FILENAME_POLICY: the file is checked (and delivered) under a gateway-chosen name,
      ``released-<sha256 prefix>`` plus the original extension when it is a known one;
    * TYPE_MISMATCH: checked without the name's extension (the gateway adds the right one);
    * TYPE_NOT_ALLOWED: the detected type joins the allowed types, if ferry has a sanitizer
      for it (members of an archive are not covered);
    * LIMIT_EXCEEDED: the file-size limit grows to the file's size (not the other limits).
    """
    report = refused.report
    code = refused.reason
    if code == "FILENAME_POLICY":
        sha = str(report.get("sha256_in") or "")[:12]  # (the worker's word: a name part only)
        sha = sha if len(sha) == 12 and all(c in "0123456789abcdef" for c in sha) else "file"
        _, ext = split_extension(name)
        keep = ext.isascii() and ext.isalnum() and ext in EXTENSION_TYPES
        return policy, f"released-{sha}" + (f".{ext}" if keep else "")
    if code == "TYPE_MISMATCH":
        base, ext = split_extension(name)
        return (policy, base) if ext else None
    if code == "TYPE_NOT_ALLOWED":
        kind = refused.type_name
        if kind not in CANONICAL_EXTENSIONS or kind in policy.allowed_types:
            return None
        return replace(policy, allowed_types=policy.allowed_types | {kind}), name
    if code == "LIMIT_EXCEEDED":
        size = report.get("size_in")
        if not isinstance(size, int) or size <= policy.limits.max_bytes:
            return None
        return replace(policy, limits=replace(policy.limits, max_bytes=size)), name
    return None


def _file_bytes(limits: Limits) -> int:
    """The worker's file-size rlimit: room for a cleaned copy of the largest file or archive."""
    return max(2 * limits.max_bytes, limits.archive_expanded) + FILE_BYTES_MIN


def _checked_verdict(answer: Any, workdir: Path) -> Verdict:
    """A Verdict from a worker's (untrusted) answer; ValueError if anything is off."""
    if not isinstance(answer, dict):
        raise ValueError("answer is not an object")
    kind = answer["kind"]
    if kind not in _KINDS:
        raise ValueError(f"bad kind {kind!r}")
    reason = answer["reason"]
    if (kind == "reject") != (reason is not None) or (reason is not None and reason not in REASONS):
        raise ValueError("bad reason")
    type_name = answer["type_name"]
    if type_name is not None and not isinstance(type_name, str):
        raise ValueError("bad type")
    name = answer["name"]
    if not isinstance(name, str):
        raise ValueError("bad name")
    if kind != "reject":
        size = len(name.encode("utf-8", "replace"))
        if type_name not in CANONICAL_EXTENSIONS or "/" in name or "\0" in name:
            raise ValueError("bad delivered type or name")
        if not 0 < size <= MAX_NAME_BYTES or name.startswith("."):
            raise ValueError("bad delivered name")
    actions = tuple(
        Action(str(a["what"]), str(a["target"]), str(a.get("where") or ""), int(a["count"]))
        for a in answer["actions"]
    )
    if any(a.what not in _ACTION_WORDS for a in actions):
        raise ValueError("unknown action word")
    output: Path | None = None
    if kind == "deliver_cleaned":
        output = Path(answer["output"])
        st = os.lstat(output)
        if output.parent != workdir or not stat.S_ISREG(st.st_mode):
            raise ValueError("cleaned output is not a regular file in the work folder")
    elif answer["output"] is not None:
        raise ValueError("output without a cleaned verdict")
    report = answer["report"]
    if not isinstance(report, dict):
        raise ValueError("bad report")
    return Verdict(
        kind,
        type_name,
        name,
        reason,
        str(answer["message"]),
        actions,
        report,
        output,
    )


def _digest(path: Path) -> tuple[str | None, int | None]:
    try:
        digest, size = hashlib.sha256(), 0
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
        return digest.hexdigest(), size
    except OSError:
        return None, None
