"""SQLite helpers shared by both agents (stdlib sqlite3, WAL mode, synchronous=FULL)."""

from __future__ import annotations

import errno
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ferry import log
from ferry.config_types import DEFAULT_SPOOL_RESERVE
from ferry.errors import StateError

# Retention: old rows are deleted this many per transaction, every PRUNE_INTERVAL seconds
# (or a batch per call of Retention.step while a backlog of old rows remains).
PRUNE_BATCH = 5000
PRUNE_INTERVAL = 600.0
# Less room than this where a state database lives: an error opening it is put down to
# the full disk (SQLite reports a -shm or -wal file it cannot create as "disk I/O error").
LOW_ROOM = 1 << 20

_log = log.get("ferry.state")


def open_db(path: Path, schema: str) -> sqlite3.Connection:
    """Open (creating if needed) a state database and apply ``schema`` (idempotent DDL)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        db.executescript(schema)
    except sqlite3.Error as exc:
        room = free_bytes(path.parent)
        if disk_full(exc) or (room is not None and room < LOW_ROOM):
            raise StateError(
                f"{path}: cannot open state database: its disk is full ({room} bytes free; "
                f"SQLite said: {exc}); make room there and start again"
            ) from exc
        raise StateError(f"{path}: cannot open state database: {exc}") from exc
    return db


def free_bytes(folder: Path) -> int | None:
    """Bytes an unprivileged writer may still use on the file system of ``folder`` (None if
    it does not say: :func:`disk_room`)."""
    room = disk_room(folder)
    return None if room is None else room[0]


def disk_room(folder: Path) -> tuple[int, int] | None:
    """Bytes an unprivileged writer may still use on the file system of ``folder``, and all
    it could use there (its size less the blocks kept for root), or None if it does not say."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    if st.f_blocks == 0:  # (a FUSE file system without statfs: it does not say)
        return None
    return st.f_bavail * st.f_frsize, (st.f_blocks - st.f_bfree + st.f_bavail) * st.f_frsize


def room_reserve(configured: int | None, folder: Path) -> int:
    """The room an agent keeps free on the file system of ``folder`` for its own records
    (``spool_reserve``): as configured, else DEFAULT_SPOOL_RESERVE but at most a tenth of
    that file system (a small one, in a test). A configured reserve that leaves no room at
    all is warned about (``spool_reserve_too_big``): nothing big could ever be taken."""
    room = disk_room(folder)
    if configured is None:
        return DEFAULT_SPOOL_RESERVE if room is None else min(DEFAULT_SPOOL_RESERVE, room[1] // 10)
    if room is not None and configured >= room[1]:
        _log.warning(
            "spool_reserve_too_big",
            folder=str(folder),
            spool_reserve=configured,
            disk=room[1],
            effect="no file can be taken",
        )
    return configured


def disk_full(exc: BaseException) -> bool:
    """A write that failed for want of room: SQLite's SQLITE_FULL, or ENOSPC/EDQUOT."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


def rollback(db: sqlite3.Connection) -> None:
    """Roll back the transaction under way, if SQLite has not already: after some errors (a
    full disk) it has, and a ROLLBACK then fails and would hide the error that counts."""
    if db.in_transaction:
        db.execute("ROLLBACK")


@contextmanager
def transaction(db: sqlite3.Connection, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
    """One explicit write transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``, rollback on error).

    Connections from :func:`open_db` are in autocommit mode, where ``with db:``
    does not group statements: every statement would commit (and fsync) alone.
    ``durable=False`` commits without waiting for the disk (``synchronous=NORMAL`` for
    this transaction only; in WAL order the next durable commit carries it): for
    records whose loss in a power cut is harmless.
    """
    if not durable:  # (SQLite refuses to change it inside a transaction)
        db.execute("PRAGMA synchronous=NORMAL")
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            rollback(db)
            raise
    finally:
        if not durable:
            db.execute("PRAGMA synchronous=FULL")


class Retention:
    """Forget rows older than ``keep_seconds`` now and then, for a loop that calls
    :meth:`step` often: ``prune(before_us, limit)`` deletes up to ``limit`` of them in one
    transaction and returns how many went. A database error is logged and tried again
    ``PRUNE_INTERVAL`` later (the transaction rolled back: nothing changed)."""

    def __init__(
        self, prune: Callable[[int, int], int], keep_seconds: float, event: str, logger: Any
    ) -> None:
        self._prune = prune
        self._keep_us = int(keep_seconds * 1e6)
        self._event = event  # logged with the count: e.g. "spool_pruned"
        self._log = logger
        self._next = 0.0  # (monotonic): the first step prunes

    def step(self, now: float) -> None:
        """Prune a batch if due (``now``: time.monotonic())."""
        if now < self._next:
            return
        before = int(time.time() * 1e6) - self._keep_us
        try:
            gone = self._prune(before, PRUNE_BATCH)
        except sqlite3.Error as exc:
            self._log.error(self._event + "_failed", error=str(exc))
            self._next = now + PRUNE_INTERVAL
            return
        if gone:
            self._log.info(self._event, items=gone, before_us=before)
        self._next = now + (0.0 if gone >= PRUNE_BATCH else PRUNE_INTERVAL)
