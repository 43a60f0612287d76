"""The outside's durable spool: SQLite (WAL) rows plus one object file per item.

An object file holds the object stream exactly as it is sent: the content
followed by the signed trailer (manifest + signature). It is written to a
temporary name, fsynced and renamed before its row is committed, so after a
crash every committed row has a complete object file.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ferry.state import open_db

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS channel_seq (channel TEXT PRIMARY KEY, last_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    object_id BLOB PRIMARY KEY,
    channel TEXT NOT NULL,
    seq INTEGER NOT NULL,
    name TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 BLOB NOT NULL,
    length INTEGER NOT NULL,          -- object stream length (content + trailer)
    spool_file TEXT NOT NULL,
    source_path TEXT NOT NULL,        -- where the clerk dropped it
    source_key TEXT NOT NULL,         -- dev/inode/size/mtime of the original (crash recovery)
    state TEXT NOT NULL CHECK (state IN ('queued', 'sent')),
    created_us INTEGER NOT NULL,
    sent_us INTEGER,
    UNIQUE (channel, seq)
);
CREATE INDEX IF NOT EXISTS items_state ON items (state, created_us);
CREATE INDEX IF NOT EXISTS items_source ON items (source_key);
"""


@dataclass(frozen=True)
class SpoolItem:
    object_id: bytes
    channel: str
    seq: int
    name: str
    size: int
    length: int
    spool_file: Path


class Spool:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "spool"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._db = open_db(state_dir / "outside.db", SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def next_epoch(self, now_us: int) -> int:
        """A sender epoch strictly greater than any used before, time-ordered when state is lost."""
        with self._lock, self._db:
            row = self._db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
            epoch = max(now_us, (row[0] if row else 0) + 1)
            self._db.execute(
                "INSERT INTO meta(key, value) VALUES('epoch', ?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (epoch,),
            )
        return epoch

    def next_seq(self, channel: str) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT last_seq FROM channel_seq WHERE channel=?", (channel,)
            ).fetchone()
            return (row[0] if row else 0) + 1

    def known_source(self, source_key: str) -> str | None:
        """The spool state of an item taken from a file with this identity, if any."""
        with self._lock:
            row = self._db.execute(
                "SELECT state FROM items WHERE source_key=?", (source_key,)
            ).fetchone()
        return None if row is None else str(row[0])

    def add(self, item: SpoolItem, sha256: bytes, source_path: str, source_key: str) -> None:
        """Commit an item whose object file is already durable."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute(
                    "INSERT INTO items(object_id, channel, seq, name, size, sha256, length,"
                    " spool_file, source_path, source_key, state, created_us)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,'queued',?)",
                    (
                        item.object_id,
                        item.channel,
                        item.seq,
                        item.name,
                        item.size,
                        sha256,
                        item.length,
                        item.spool_file.name,
                        source_path,
                        source_key,
                        int(time.time() * 1e6),
                    ),
                )
                self._db.execute(
                    "INSERT INTO channel_seq(channel, last_seq) VALUES (?, ?) "
                    "ON CONFLICT(channel) DO UPDATE SET last_seq=excluded.last_seq",
                    (item.channel, item.seq),
                )
                self._db.execute("COMMIT")
            except sqlite3.Error:
                self._db.execute("ROLLBACK")
                raise

    def queued(self) -> list[SpoolItem]:
        with self._lock:
            rows = self._db.execute(
                "SELECT object_id, channel, seq, name, size, length, spool_file FROM items"
                " WHERE state='queued' ORDER BY created_us"
            ).fetchall()
        return [SpoolItem(r[0], r[1], r[2], r[3], r[4], r[5], self.dir / r[6]) for r in rows]

    def mark_sent(self, object_id: bytes) -> Path | None:
        with self._lock, self._db:
            row = self._db.execute(
                "SELECT spool_file FROM items WHERE object_id=?", (object_id,)
            ).fetchone()
            self._db.execute(
                "UPDATE items SET state='sent', sent_us=? WHERE object_id=?",
                (int(time.time() * 1e6), object_id),
            )
        return None if row is None else self.dir / row[0]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, count(*) FROM items GROUP BY state").fetchall()
        return {str(r[0]): int(r[1]) for r in rows}
