"""WAL checkpoints of the state databases run on a thread of their own (ferry.state.Checkpointer),
not in the commits of the threads that hold the database's lock."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from ferry.state import WRITER_AUTOCHECKPOINT, Checkpointer, open_db, transaction
from inside.ledger import Ledger
from outside.spool import Spool

SCHEMA = "CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, blob BLOB NOT NULL);"


def _write(db: sqlite3.Connection, commits: int) -> None:
    for _ in range(commits):
        with transaction(db):
            db.execute("INSERT INTO t (blob) VALUES (?)", (os.urandom(4000),))


def _wal(path: Path) -> int:
    return (path.parent / (path.name + "-wal")).stat().st_size


def test_the_writers_commits_leave_checkpoints_to_the_thread(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    db = open_db(path, SCHEMA)
    assert db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == WRITER_AUTOCHECKPOINT
    # without the thread, 2,000 commits of a page or more each leave them all in the WAL
    _write(db, 2000)
    assert _wal(path) > 2000 * 4096
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    cp = Checkpointer(path, "test", interval=0.02)
    try:
        for _ in range(20):  # with it, the WAL is copied back and started over as it goes
            _write(db, 100)
            time.sleep(0.03)
        assert cp.checkpoints >= 5
        assert _wal(path) < 1000 * 4096
        assert db.execute("SELECT count(*) FROM t").fetchone()[0] == 4000
    finally:
        cp.close()
        db.close()
    again = sqlite3.connect(path)  # (everything committed is there, WAL or not)
    assert again.execute("SELECT count(*) FROM t").fetchone()[0] == 4000
    assert again.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    again.close()


def test_an_error_is_counted_and_the_thread_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    db = open_db(path, SCHEMA)
    cp = Checkpointer(path, "test", interval=3600)
    try:
        cp._db.close()  # (any sqlite3 error: the next step fails)
        cp.step()
        cp.step()
        assert cp.errors == 2
        assert cp._thread.is_alive()
    finally:
        cp.close()
        db.close()


def test_the_spool_and_the_ledger_each_run_one(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "out")
    ledger = Ledger(tmp_path / "in")
    try:
        assert spool._checkpointer.path == tmp_path / "out" / "outside.db"
        assert ledger._checkpointer.path == tmp_path / "in" / "inside.db"
        assert spool._checkpointer._thread.is_alive()
        assert ledger._checkpointer._thread.is_alive()
    finally:
        spool.close()
        ledger.close()
    assert not spool._checkpointer._thread.is_alive()
    assert not ledger._checkpointer._thread.is_alive()
