"""SQLite helpers shared by both agents (stdlib sqlite3, WAL mode, synchronous=FULL)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ferry.errors import StateError


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
        raise StateError(f"{path}: cannot open state database: {exc}") from exc
    return db


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One explicit write transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``, rollback on error).

    Connections from :func:`open_db` are in autocommit mode, where ``with db:``
    does not group statements: every statement would commit (and fsync) alone.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
