"""The inside's durable state: replay floors and the delivery ledger (SQLite, WAL)."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ferry.state import PRUNE_BATCH, open_db, transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS replay (
    sender_kid BLOB PRIMARY KEY, epoch INTEGER NOT NULL, counter INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS objects (
    object_id BLOB PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('delivering', 'delivered', 'rejected', 'lost')),
    channel TEXT, seq INTEGER, name TEXT, path TEXT, size INTEGER, sha256 BLOB,
    reason TEXT,
    updated_us INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS objects_updated ON objects (updated_us);
-- per channel, the highest sequence number of the objects pruned (forgotten after the
-- retention): every number up to it was seen, so a restart does not report them as gaps
CREATE TABLE IF NOT EXISTS seq_floor (channel TEXT PRIMARY KEY, seq INTEGER NOT NULL);
-- the signed trailer of a file being delivered, cut off its spool file so that the content
-- can be hard-linked into the delivery folder: kept until the delivery is settled, so that a
-- start after a crash can put it back and deliver the spooled file again
CREATE TABLE IF NOT EXISTS trailers (object_id BLOB PRIMARY KEY, trailer BLOB NOT NULL);
"""


class Ledger:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "inside.db"
        self._db = open_db(self.path, SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def replay_floor(self, sender_kid: bytes) -> tuple[int, int]:
        with self._lock:
            row = self._db.execute(
                "SELECT epoch, counter FROM replay WHERE sender_kid=?", (sender_kid,)
            ).fetchone()
        return (0, 0) if row is None else (int(row[0]), int(row[1]))

    def set_replay_floor(self, sender_kid: bytes, epoch: int, counter: int) -> None:
        with self._lock, transaction(self._db):
            self._db.execute(
                "INSERT INTO replay VALUES (?,?,?) ON CONFLICT(sender_kid) DO UPDATE SET"
                " epoch=excluded.epoch, counter=excluded.counter",
                (sender_kid, epoch, counter),
            )

    def state_of(self, object_id: bytes) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT state FROM objects WHERE object_id=?", (object_id,)
            ).fetchone()
        return None if row is None else str(row[0])

    def states_of(self, object_ids: list[bytes]) -> dict[bytes, str]:
        """The state of each of ``object_ids`` the ledger knows (one query per 500)."""
        out: dict[bytes, str] = {}
        with self._lock:
            for start in range(0, len(object_ids), 500):
                chunk = object_ids[start : start + 500]
                marks = ",".join("?" * len(chunk))  # placeholders only
                query = f"SELECT object_id, state FROM objects WHERE object_id IN ({marks})"  # noqa: S608
                for oid, state in self._db.execute(query, chunk):
                    out[bytes(oid)] = str(state)
        return out

    def finished_ids(self, limit: int) -> list[bytes]:
        with self._lock:
            rows = self._db.execute(
                "SELECT object_id FROM objects WHERE state IN ('delivered','rejected')"
                " ORDER BY updated_us DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [bytes(r[0]) for r in rows]

    def record(
        self,
        object_id: bytes,
        state: str,
        *,
        channel: str | None = None,
        seq: int | None = None,
        name: str | None = None,
        path: str | None = None,
        size: int | None = None,
        sha256: bytes | None = None,
        reason: str | None = None,
        trailer: bytes | None = None,
    ) -> None:
        """Record ``object_id``'s state. ``trailer`` (with ``delivering``): the trailer cut off
        its spool file (:meth:`trailer_of`); any other state forgets the trailer."""
        with self._lock, transaction(self._db):
            if trailer is not None:
                self._db.execute(
                    "INSERT OR REPLACE INTO trailers VALUES (?,?)", (object_id, trailer)
                )
            elif state != "delivering":
                self._db.execute("DELETE FROM trailers WHERE object_id=?", (object_id,))
            self._db.execute(
                "INSERT INTO objects VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(object_id) DO UPDATE"
                " SET state=excluded.state, channel=coalesce(excluded.channel, channel),"
                " seq=coalesce(excluded.seq, seq), name=coalesce(excluded.name, name),"
                " path=coalesce(excluded.path, path), size=coalesce(excluded.size, size),"
                " sha256=coalesce(excluded.sha256, sha256), reason=excluded.reason,"
                " updated_us=excluded.updated_us",
                (
                    object_id,
                    state,
                    channel,
                    seq,
                    name,
                    path,
                    size,
                    sha256,
                    reason,
                    int(time.time() * 1e6),
                ),
            )

    def row_of(self, object_id: bytes) -> dict[str, Any] | None:
        """Every column of ``object_id``'s row, or None."""
        with self._lock:
            cur = self._db.execute("SELECT * FROM objects WHERE object_id=?", (object_id,))
            row = cur.fetchone()
            names = [d[0] for d in cur.description]
        return None if row is None else dict(zip(names, row, strict=True))

    def trailer_of(self, object_id: bytes) -> bytes | None:
        """The trailer recorded with ``delivering`` (see :meth:`record`), or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT trailer FROM trailers WHERE object_id=?", (object_id,)
            ).fetchone()
        return None if row is None else bytes(row[0])

    @property
    def db(self) -> tuple[sqlite3.Connection, threading.Lock]:
        """The connection and its lock, for tables kept in the same database (outbox)."""
        return self._db, self._lock

    def record_many(
        self,
        rows: list[dict[str, object]],
        *,
        also: Callable[[sqlite3.Connection], None] | None = None,
        trailers: Sequence[tuple[bytes, bytes]] = (),
        forget_trailers: bool = False,
    ) -> None:
        """Several :meth:`record` calls in one durable transaction (group commit).

        ``also(db)`` runs inside the same transaction (e.g. queue for consumers).
        ``trailers``: (object id, trailer) kept with ``delivering`` rows, as :meth:`record`
        keeps them; ``forget_trailers``: those of ``rows`` are forgotten (files settled).
        """
        now = int(time.time() * 1e6)
        keys = ("channel", "seq", "name", "path", "size", "sha256", "reason")
        with self._lock, transaction(self._db):
            if also is not None:
                also(self._db)
            if trailers:
                self._db.executemany("INSERT OR REPLACE INTO trailers VALUES (?,?)", trailers)
            if forget_trailers:
                self._db.executemany(
                    "DELETE FROM trailers WHERE object_id=?", [(r["object_id"],) for r in rows]
                )
            self._db.executemany(
                "INSERT INTO objects VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(object_id) DO UPDATE"
                " SET state=excluded.state, channel=coalesce(excluded.channel, channel),"
                " seq=coalesce(excluded.seq, seq), name=coalesce(excluded.name, name),"
                " path=coalesce(excluded.path, path), size=coalesce(excluded.size, size),"
                " sha256=coalesce(excluded.sha256, sha256), reason=excluded.reason,"
                " updated_us=excluded.updated_us",
                [(r["object_id"], r["state"], *(r.get(k) for k in keys), now) for r in rows],
            )

    def in_state(self, state: str) -> list[tuple[bytes, str | None, str | None, bytes | None]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT object_id, path, name, sha256 FROM objects WHERE state=?", (state,)
            ).fetchall()
        return [(bytes(r[0]), r[1], r[2], r[3]) for r in rows]

    def rows_in_state(self, state: str) -> list[dict[str, Any]]:
        """Every column of the objects in ``state`` (start-up recovery)."""
        with self._lock:
            cur = self._db.execute("SELECT * FROM objects WHERE state=?", (state,))
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def channel_seqs(self) -> list[tuple[str, int]]:
        """(channel, seq) of every item the ledger knows (sequence-gap tracking)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT channel, seq FROM objects WHERE channel IS NOT NULL AND seq IS NOT NULL"
            ).fetchall()
        return [(str(r[0]), int(r[1])) for r in rows]

    def prune(self, before_us: int, limit: int = PRUNE_BATCH) -> int:
        """Forget up to ``limit`` finished objects (delivered, rejected, lost) last updated
        before ``before_us``, oldest first; how many went. A repeat of a forgotten object
        would be delivered again, so the retention must outlast every repeat schedule."""
        with self._lock, transaction(self._db):
            rows = self._db.execute(
                "SELECT rowid, channel, seq FROM objects INDEXED BY objects_updated"
                " WHERE updated_us < ? AND state != 'delivering' ORDER BY updated_us LIMIT ?",
                (before_us, limit),
            ).fetchall()
            floors: dict[str, int] = {}
            for _, channel, seq in rows:
                if isinstance(channel, str) and isinstance(seq, int):
                    floors[channel] = max(floors.get(channel, 0), seq)
            self._db.executemany(
                "INSERT INTO seq_floor VALUES (?,?)"
                " ON CONFLICT(channel) DO UPDATE SET seq=max(seq, excluded.seq)",
                list(floors.items()),
            )
            self._db.executemany("DELETE FROM objects WHERE rowid=?", [(r[0],) for r in rows])
        return len(rows)

    def seq_floors(self) -> list[tuple[str, int]]:
        """(channel, highest pruned sequence number): see :meth:`prune`."""
        with self._lock:
            rows = self._db.execute("SELECT channel, seq FROM seq_floor").fetchall()
        return [(str(r[0]), int(r[1])) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, count(*) FROM objects GROUP BY state").fetchall()
        return {str(r[0]): int(r[1]) for r in rows}
