"""``ferry health``: is this agent running and able to move items? For operators and monitors.

One look at a running agent from its own host: the status file it rewrites twice a second
(``state/status.json``), whether its process is alive, its audit log, its link (inside) or
backpressure (outside), and the free space and inodes of every file system it writes to. The
answer follows the monitoring-plugin convention (Nagios, Icinga, Zabbix, Sensu): exit code
0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN, a one-line summary first; ``--json`` and
``--format prometheus`` (for node_exporter's textfile collector, written atomically with
``-o``) carry the same checks.

The judgement (:func:`assess`) is pure: the status, the clock, the process check and the
file-system figures come in as values, so every rule is tested without an agent.
"""

from __future__ import annotations

import enum
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.config_types import InsideConfig, OutsideConfig
from ferry.status import STATUS_FILE, Observed, observe_status

# Seconds to wait for a folder's file system to answer (statvfs) before it counts as hung.
PROBE_TIMEOUT = 3.0


class State(enum.IntEnum):
    """Monitoring-plugin states; the value is the exit code."""

    OK = 0
    WARNING = 1
    CRITICAL = 2
    UNKNOWN = 3


_SEVERITY = {State.OK: 0, State.WARNING: 1, State.UNKNOWN: 2, State.CRITICAL: 3}


def worst(states: Iterable[State]) -> State:
    return max(states, key=_SEVERITY.__getitem__, default=State.OK)


@dataclass(frozen=True)
class Limits:
    max_age: float = 5.0
    """Seconds since the status file was last written before the agent counts as stopped."""
    warn_free: float = 10.0
    """Percent of space or inodes free below which a file system is a WARNING."""
    crit_free: float = 5.0
    """... and below which it is CRITICAL (the gateway stops when it cannot write)."""
    max_stall: float = 60.0
    """Seconds a channel's folder intake may show no progress before it is CRITICAL (a
    drop, sent or quarantine folder that stopped answering: a share whose server is gone)."""


@dataclass(frozen=True)
class Check:
    name: str
    state: State
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state.name, "message": self.message}


@dataclass(frozen=True)
class Space:
    """One file system the agent writes to, and what it holds there."""

    uses: tuple[str, ...]
    """What lives there, e.g. ("state", "audit", "deliver/documents")."""
    path: str
    """The first of those folders."""
    free_bytes: int = 0
    total_bytes: int = 0
    free_inodes: int = 0
    total_inodes: int = 0
    error: str | None = None
    """Why the folder could not be examined (missing, not a folder, ...)."""

    @property
    def free_pct(self) -> float:
        return 100.0 * self.free_bytes / self.total_bytes if self.total_bytes else 100.0

    @property
    def free_inodes_pct(self) -> float:
        # file systems without a fixed inode table (btrfs, some tmpfs) report 0 inodes
        return 100.0 * self.free_inodes / self.total_inodes if self.total_inodes else 100.0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"uses": list(self.uses), "path": self.path}
        if self.error is not None:
            out["error"] = self.error
        else:
            out |= {
                "free_bytes": self.free_bytes,
                "total_bytes": self.total_bytes,
                "free_inodes": self.free_inodes,
                "total_inodes": self.total_inodes,
            }
        return out


@dataclass(frozen=True)
class Report:
    role: str
    state: State
    checks: tuple[Check, ...]
    spaces: tuple[Space, ...] = ()
    status: Mapping[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return int(self.state)

    def summary(self) -> str:
        bad = [c for c in self.checks if c.state is self.state and c.state is not State.OK]
        what = "; ".join(c.message for c in bad) if bad else "running, link and disks fine"
        return f"FERRY {self.role.upper()} {self.state.name}: {what}"

    def text(self) -> str:
        lines = [self.summary()]
        width = max((len(c.name) for c in self.checks), default=0)
        lines += [f"  {c.name:<{width}}  {c.state.name:<8}  {c.message}" for c in self.checks]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "state": self.state.name,
            "exit_code": self.exit_code,
            "summary": self.summary(),
            "checks": [c.to_json() for c in self.checks],
            "file_systems": [s.to_json() for s in self.spaces],
            "status": dict(self.status),
        }

    def prometheus(self) -> str:
        """The text exposition format: the states, the file systems and the status counters."""
        role = _label(self.role)
        out = [
            "# HELP ferry_health Overall health: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.",
            "# TYPE ferry_health gauge",
            f'ferry_health{{role="{role}"}} {self.exit_code}',
            "# HELP ferry_health_check One check: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.",
            "# TYPE ferry_health_check gauge",
        ]
        out += [
            f'ferry_health_check{{role="{role}",check="{_label(c.name)}"}} {int(c.state)}'
            for c in self.checks
        ]
        measured = [s for s in self.spaces if s.error is None]
        for metric, help_text, attr in (
            ("free_bytes", "Bytes free to the agent.", "free_bytes"),
            ("size_bytes", "Size in bytes.", "total_bytes"),
            ("free_inodes", "Inodes free to the agent.", "free_inodes"),
        ):
            out += [
                f"# HELP ferry_filesystem_{metric} {help_text}",
                f"# TYPE ferry_filesystem_{metric} gauge",
            ]
            out += [
                f'ferry_filesystem_{metric}{{role="{role}",path="{_label(s.path)}",'
                f'uses="{_label(",".join(s.uses))}"}} {getattr(s, attr)}'
                for s in measured
            ]
        for key in sorted(self.status):
            value = self.status[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if not math.isfinite(value) or not key.isidentifier():
                continue
            out += [
                f"# TYPE ferry_status_{key} gauge",
                f'ferry_status_{key}{{role="{role}"}} {value}',
            ]
        return "\n".join(out) + "\n"


def _label(value: str) -> str:
    """A Prometheus label value: backslash, quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# --- reading (I/O) ---------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (signal 0 sends nothing)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def folders(cfg: OutsideConfig | InsideConfig) -> list[tuple[str, Path]]:
    """Every folder the agent writes to, with what it holds."""
    out: list[tuple[str, Path]] = [("state", cfg.state_dir)]
    if cfg.audit is not None:
        out.append(("audit", cfg.audit.dir))
        if isinstance(cfg, InsideConfig) and cfg.audit.mirror_dir is not None:
            out.append(("audit mirror", cfg.audit.mirror_dir))
    for ch in cfg.channels:
        for what in ("drop", "sent", "quarantine", "deliver"):
            folder = getattr(ch, what, None)
            if folder is not None:
                out.append((f"{what}/{ch.name}", folder))
    return out


def measure(
    places: Iterable[tuple[str, Path]], *, timeout: float = PROBE_TIMEOUT
) -> tuple[Space, ...]:
    """Free space and inodes per file system (each named once, with everything it holds).
    Each folder is looked at on a thread of its own: one on a share that stopped answering
    is reported as such after ``timeout`` seconds instead of holding up the check."""
    places = list(places)
    found: dict[int, tuple[int, os.statvfs_result] | OSError] = {}

    def probe(i: int, folder: Path) -> None:
        try:
            found[i] = (os.stat(folder).st_dev, os.statvfs(folder))
        except OSError as exc:
            found[i] = exc

    threads = [
        threading.Thread(target=probe, args=(i, folder), name="health-probe", daemon=True)
        for i, (_, folder) in enumerate(places)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    by_dev: dict[int, tuple[list[str], Path, os.statvfs_result]] = {}
    failed: list[Space] = []
    for i, (use, folder) in enumerate(places):
        got = found.get(i)
        if got is None:
            failed.append(Space((use,), str(folder), error=f"not answering after {timeout:g} s"))
            continue
        if isinstance(got, OSError):
            failed.append(Space((use,), str(folder), error=got.strerror or str(got)))
            continue
        dev, sv = got
        by_dev.setdefault(dev, ([], folder, sv))[0].append(use)
    spaces = [
        Space(
            tuple(uses),
            str(folder),
            free_bytes=sv.f_bavail * sv.f_frsize,
            total_bytes=sv.f_blocks * sv.f_frsize,
            free_inodes=sv.f_favail,
            total_inodes=sv.f_files,
        )
        for uses, folder, sv in by_dev.values()
    ]
    return (*spaces, *failed)


def examine(
    cfg: OutsideConfig | InsideConfig, limits: Limits, *, now: float | None = None
) -> Report:
    """The health of the agent ``cfg`` configures, as seen from this host now."""
    role = "outside" if isinstance(cfg, OutsideConfig) else "inside"
    return assess(
        role,
        observe_status(cfg.state_dir / STATUS_FILE),
        measure(folders(cfg)),
        limits,
        now=time.time() if now is None else now,
        alive=pid_alive,
    )


# --- judging (pure) --------------------------------------------------------------------------


def assess(
    role: str,
    seen: Observed,
    spaces: Iterable[Space],
    limits: Limits,
    *,
    now: float,
    alive: Callable[[int], bool],
) -> Report:
    spaces = tuple(spaces)
    checks = [_agent(role, seen, limits, now, alive)]
    data = seen.data or {}
    running = checks[0].state is State.OK
    if running:
        checks.append(_audit(data))
        if "audit_mirror_problem" in data:  # an inside that mirrors the outside's log
            checks.append(_mirror(data["audit_mirror_problem"]))
        checks += _link(data) if role == "inside" else _backlog(data)
        if "intake_stalled" in data:
            checks.append(_intake(data["intake_stalled"], limits.max_stall))
        if isinstance(data.get("delivery_held"), Mapping):  # (a list before 2026-11-22)
            checks.append(_delivery(data["delivery_held"], limits.max_stall))
    checks += [_space(s, limits) for s in spaces]
    return Report(role, worst(c.state for c in checks), tuple(checks), spaces, data)


def _number(data: Mapping[str, Any], key: str) -> float | None:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _agent(
    role: str, seen: Observed, limits: Limits, now: float, alive: Callable[[int], bool]
) -> Check:
    if seen.error == "missing":
        return Check(
            "agent", State.CRITICAL, f"not running: no status file ({seen.path}); start the agent"
        )
    if seen.error is not None or seen.data is None:
        return Check("agent", State.UNKNOWN, f"status file {seen.path}: {seen.error}")
    data = seen.data
    if data.get("role") != role:
        return Check(
            "agent",
            State.UNKNOWN,
            f"status file {seen.path} is not the {role} agent's (role {data.get('role')!r})",
        )
    pid = data.get("pid")
    written = _number(data, "written_at")
    if written is None:
        written = seen.mtime
    if not isinstance(pid, int) or isinstance(pid, bool) or written is None:
        return Check("agent", State.UNKNOWN, f"status file {seen.path} lacks pid or written_at")
    age = now - written
    if not alive(pid):
        return Check(
            "agent",
            State.CRITICAL,
            f"not running: process {pid} is gone (status last written {_ago(age)})",
        )
    if age > limits.max_age:
        return Check(
            "agent",
            State.CRITICAL,
            f"stuck or stopped: status last written {_ago(age)} (process {pid}; "
            f"limit {limits.max_age:g} s)",
        )
    started = _number(data, "started_at")
    up = "" if started is None else f", up {_duration(now - started)}"
    return Check("agent", State.OK, f"running (process {pid}{up})")


def _audit(data: Mapping[str, Any]) -> Check:
    if "audit_problem" not in data:
        return Check("audit", State.UNKNOWN, "the status file does not say (an older agent?)")
    problem = data["audit_problem"]
    if problem is None:
        return Check("audit", State.OK, "audit log writable")
    return Check(
        "audit",
        State.CRITICAL,
        f"transfers stopped (fail closed): {str(problem)[:300]}",
    )


def _mirror(problem: object) -> Check:
    if problem is None:
        return Check("audit mirror", State.OK, "the outside's log and the copy held here agree")
    return Check(
        "audit mirror",
        State.CRITICAL,
        "the outside's audit log contradicts the copy held here: tampering, or the outside's "
        "log was lost or replaced (docs/OPERATIONS.md, 'Backups, and rebuilding an agent'): "
        f"{str(problem)[:300]}",
    )


def _link(data: Mapping[str, Any]) -> list[Check]:
    state = data.get("link_state")
    age = _number(data, "last_heartbeat_age")
    heard = "no heartbeat yet" if age is None else f"last heartbeat {_ago(age)}"
    if state == "UP":
        link = Check("link", State.OK, f"UP ({heard})")
    elif state == "DEGRADED":
        link = Check("link", State.WARNING, f"DEGRADED: heartbeats late ({heard})")
    elif state == "DOWN":
        link = Check("link", State.CRITICAL, f"DOWN: nothing heard from the outside ({heard})")
    else:
        link = Check("link", State.UNKNOWN, f"link state {state!r} is not one ferry writes")
    out = [link]
    if data.get("link_params_mismatch") is True:
        out.append(
            Check(
                "link params",
                State.WARNING,
                "the outside's link parameters differ from this config's (see link_params_mismatch"
                " in the log)",
            )
        )
    if data.get("link_clock_skew") is True:
        out.append(
            Check("clock", State.WARNING, "the outside's clock is off by more than max_clock_skew")
        )
    return out


def _backlog(data: Mapping[str, Any]) -> list[Check]:
    items = _number(data, "backlog_items")
    size = _number(data, "backlog_bytes")
    waiting = "backlog unknown" if items is None else f"{items:.0f} items waiting"
    if size is not None:
        waiting += f", {_bytes(size)} queued in all"
    if data.get("intake_paused") is True:
        return [
            Check(
                "backlog",
                State.WARNING,
                f"spool past its threshold: {waiting}; folder intake paused, the API answers BUSY",
            )
        ]
    limit = _number(data, "busy_items")
    if items is not None and limit:
        waiting += f", BUSY at {limit:.0f}"
    return [Check("backlog", State.OK, waiting)]


def _intake(stalled: object, max_stall: float) -> Check:
    """``stalled``: channel → seconds its folder intake has shown no progress (the agent
    lists those past a few seconds)."""
    return _held_up(
        "intake",
        stalled,
        max_stall,
        late="folder intake of channel {} has not moved: a drop, sent or quarantine folder is "
        "not answering (a share whose server is gone?); other channels go on",
        waiting="taking files; waiting on a folder: {}",
        ok="taking files",
    )


def _delivery(held: object, max_stall: float) -> Check:
    """``held``: channel → seconds the inside has been on one file of it (verification and
    re-check not counted), or on a batch of messages (the agent lists those past a few
    seconds)."""
    return _held_up(
        "delivery",
        held,
        max_stall,
        late="delivery of channel {} has not moved: its delivery folder does not answer or "
        "cannot be written (a share whose server is gone? a full disk?); it is tried again, "
        "the other channels go on",
        waiting="delivering; waiting on a folder: {}",
        ok="delivering",
    )


def _held_up(
    name: str, held: object, max_stall: float, *, late: str, waiting: str, ok: str
) -> Check:
    """CRITICAL naming the channels held up for ``max_stall`` seconds or more (``held``:
    channel → seconds, from the status file)."""
    if not isinstance(held, Mapping):
        return Check(name, State.UNKNOWN, f"the status file's {name} figures are not a map")
    waits = {
        str(channel)[:64]: float(v)
        for channel, v in held.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }
    over = sorted((n for n, v in waits.items() if v >= max_stall), key=lambda n: -waits[n])
    if over:
        named = ", ".join(f"{n} ({_duration(waits[n])})" for n in over[:5])
        more = f" and {len(over) - 5} more" if len(over) > 5 else ""
        return Check(name, State.CRITICAL, late.format(named + more))
    if waits:
        return Check(
            name,
            State.OK,
            waiting.format(", ".join(f"{n} ({_duration(v)})" for n, v in sorted(waits.items()))),
        )
    return Check(name, State.OK, ok)


def _space(space: Space, limits: Limits) -> Check:
    name = f"disk {space.uses[0]}"
    where = f"{space.path} ({', '.join(space.uses)})"
    if space.error is not None:
        return Check(name, State.CRITICAL, f"{where}: {space.error}")
    free, inodes = space.free_pct, space.free_inodes_pct
    low = min(free, inodes)
    what = f"{where}: {_bytes(space.free_bytes)} free ({free:.1f} %)"
    if space.total_inodes:
        what += f", inodes {inodes:.1f} % free"
    if low < limits.crit_free:
        return Check(name, State.CRITICAL, f"{what}; below {limits.crit_free:g} %")
    if low < limits.warn_free:
        return Check(name, State.WARNING, f"{what}; below {limits.warn_free:g} %")
    return Check(name, State.OK, what)


def _ago(seconds: float) -> str:
    return f"{_duration(seconds)} ago" if seconds >= 0 else f"{_duration(-seconds)} in the future"


def _duration(seconds: float) -> str:
    s = max(0.0, seconds)
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
