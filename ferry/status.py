"""The JSON status file each agent rewrites atomically twice a second (``state/status.json``),
for ``ferry health``, ``ferry demo``, operators and monitors."""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferry import log

STATUS_FILE = "status.json"
FAILURE_LOG_INTERVAL = 60.0
_last_failure_logged = [-FAILURE_LOG_INTERVAL]
_log = log.get("status")
MAX_STATUS_BYTES = 1024 * 1024
"""A status file is a few kB; anything larger is not one (read no further)."""


def write_status(path: Path, data: dict[str, Any]) -> None:
    """Replace the status file atomically. Never raises: a disk that cannot take it (full,
    read-only) leaves the previous one, whose age `ferry health` then reports; the error is
    logged now and then."""
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(data, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        now = time.monotonic()
        if now - _last_failure_logged[0] >= FAILURE_LOG_INTERVAL:
            _last_failure_logged[0] = now
            _log.error("status_not_written", path=str(path), error=str(exc))


@dataclass(frozen=True)
class Observed:
    """What was read from the status file: its data and age, or why it could not be used."""

    path: str
    data: dict[str, Any] | None = None
    mtime: float | None = None
    error: str | None = None


def observe_status(path: Path) -> Observed:
    """The status file as data, bounded; never raises."""
    try:
        with open(path, "rb", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW)) as fh:
            st = os.fstat(fh.fileno())
            raw = fh.read(MAX_STATUS_BYTES + 1)
    except FileNotFoundError:
        return Observed(str(path), error="missing")
    except OSError as exc:
        return Observed(str(path), error=f"unreadable: {exc.strerror or exc}")
    if len(raw) > MAX_STATUS_BYTES:
        return Observed(str(path), mtime=st.st_mtime, error="larger than 1 MiB: not a status file")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return Observed(str(path), mtime=st.st_mtime, error=f"not valid JSON ({exc})")
    if not isinstance(data, dict):
        return Observed(str(path), mtime=st.st_mtime, error="not a JSON object")
    return Observed(str(path), data=data, mtime=st.st_mtime)


def read_status(path: Path) -> dict[str, Any] | None:
    """The status as data, or None if there is no usable status file."""
    return observe_status(path).data
