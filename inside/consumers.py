"""Inner delivery of messages to ZeroMQ consumers: acknowledged (at least once) and PUB.

Verified messages wait in the ``outbox`` table of the inside's SQLite state
until a consumer acknowledges them, so a restart or a consumer crash never
loses one. Consumers connect a DEALER with CURVE (allow-listed like API
clients, with the channels they may read) and speak::

    consumer -> READY  {"credit": n, "channels": [...]}   ask for up to n messages
    inside   -> DELIVER {"item", "channel", "seq", "schema", "subject", "created_us"} + body
    consumer -> ACK    {"items": [...], "credit": n}        done with these; n more please
    inside   -> PING   {}                                    still there? (nothing to answer)

The inside knows a consumer by its connection (routing id and key). A connection made again
(the inside restarted, the network dropped) is a new consumer with no credit (or, with a routing
id the client chose, the one it was, its credit to be set): the client says READY again
(:class:`ferry.client.Consumer` does). A consumer silent for ``PROBE_AFTER`` seconds is sent a
PING; ROUTER_MANDATORY refuses it when the connection is gone, and the consumer is forgotten
(its messages in flight are offered again after ``redeliver_after``).

A message not acknowledged within ``redeliver_after`` seconds is offered
again (to any consumer of its channel), so delivery is at least once; the
item id lets consumers drop repeats. Messages in flight are not kept in memory (their
bodies are read from the outbox again when one is offered again), so what consumers hold
does not grow the inside's memory, whatever their sizes.

A key taken off the allow-list (or narrowed) stops its connections' deliveries at once; put
back, they go on without a new READY. A connection is known by its routing id *and* its key:
another key presenting a routing id already in use is another consumer.

A PUB endpoint, if configured, also publishes each message once, best effort, with the
channel as topic.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq

from ferry import log
from ferry.config_types import ApiClient, ConsumerParams
from ferry.crypto.keys import load_secret_key
from ferry.state import PRUNE_BATCH, Retention, transaction
from ferry.zmqsec import (
    Allowlist,
    ConnectionGuard,
    ServedKey,
    ServerKeys,
    connection_budget,
    curve_server,
    start_authenticator,
)
from ferry.zmqsec import user_id as frame_user_id
from inside.ledger import Ledger

PROTOCOL = b"FERRY/1"
ZAP_DOMAIN = "ferry-consumers"
MAX_CREDIT = 10_000
MAX_BODY = 64 * 1024
ACK_FLUSH_INTERVAL = 0.2
ACK_RETRY_INTERVAL = 5.0  # (after a failed write of acknowledgements: a full disk)
# A consumer silent this long is sent a PING (see above); a connection that is gone is then
# forgotten, so reconnections do not pile up consumers that will never be heard from.
PROBE_AFTER = 60.0
# Acknowledged outbox rows (without their bodies) are kept this long for operators, then
# deleted (ferry.state.Retention): the outbox stays bounded.
ACKED_RETENTION = 7 * 24 * 3600.0
# Messages of a channel waiting for a consumer held in memory, at most: the rest wait in the
# outbox only, and are read in, in order, as these go out (below half of either bound). So
# the inside's memory stays bounded however long its consumers are away.
WINDOW_ITEMS = 10_000
WINDOW_BYTES = 64 * 1024 * 1024

OUTBOX_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    object_id BLOB PRIMARY KEY,
    channel TEXT NOT NULL,
    seq INTEGER NOT NULL,
    schema TEXT NOT NULL,
    subject TEXT NOT NULL,
    created_us INTEGER NOT NULL,
    body BLOB NOT NULL,
    acked_us INTEGER,
    acked_by TEXT
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (acked_us, channel, seq);
CREATE INDEX IF NOT EXISTS outbox_waiting ON outbox (channel) WHERE acked_us IS NULL;
"""

_log = log.get("inside.consumers")


@dataclass(frozen=True)
class OutboxItem:
    object_id: bytes
    channel: str
    seq: int
    schema: str
    subject: str
    created_us: int
    body: bytes


class Outbox:
    """Durable queue of messages awaiting a consumer's acknowledgement.

    Lives in the inside's state database, so a message is recorded delivered
    and queued for consumers in one transaction.
    """

    def __init__(self, ledger: Ledger) -> None:
        self._db, self._lock = ledger.db
        with self._lock:
            self._db.executescript(OUTBOX_SCHEMA)
        # Acknowledgements go through their own connection without fsync at commit
        # (synchronous=NORMAL in WAL): losing the last ones in a power cut only means
        # those messages are offered again, which at-least-once delivery allows.
        self._acks = sqlite3.connect(
            ledger.path, isolation_level=None, check_same_thread=False, timeout=30
        )
        self._acks.execute("PRAGMA synchronous=NORMAL")

    def close(self) -> None:
        """(the ledger owns the main connection)"""
        self._acks.close()

    @staticmethod
    def insert(db: sqlite3.Connection, items: list[OutboxItem]) -> None:
        """Queue ``items`` inside the caller's transaction."""
        db.executemany(
            "INSERT OR IGNORE INTO outbox(object_id, channel, seq, schema, subject,"
            " created_us, body) VALUES (?,?,?,?,?,?,?)",
            [
                (i.object_id, i.channel, i.seq, i.schema, i.subject, i.created_us, i.body)
                for i in items
            ],
        )

    def add_many(self, items: list[OutboxItem]) -> None:
        with self._lock, transaction(self._db):
            self.insert(self._db, items)

    def pending(self) -> list[OutboxItem]:
        with self._lock:
            rows = self._db.execute(
                "SELECT object_id, channel, seq, schema, subject, created_us, body FROM outbox"
                " WHERE acked_us IS NULL ORDER BY channel, seq"
            ).fetchall()
        return [OutboxItem(bytes(r[0]), r[1], r[2], r[3], r[4], r[5], bytes(r[6])) for r in rows]

    def waiting_channels(self) -> list[str]:
        """Channels with messages not acknowledged yet."""
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT channel FROM outbox WHERE acked_us IS NULL"
            ).fetchall()
        return [str(r[0]) for r in rows]

    def waiting(
        self, channel: str, after: int, items: int, size: int
    ) -> tuple[list[tuple[int, OutboxItem]], bool]:
        """The channel's messages not acknowledged, in the order they were queued, after
        row ``after``: at most ``items`` of them and ``size`` bytes of bodies (one at least),
        each with its row; and whether those were all. Sizes are read first, so a page of
        large messages is never read in whole."""
        with self._lock:
            sizes = self._db.execute(
                "SELECT rowid, length(body) FROM outbox WHERE acked_us IS NULL AND channel=?"
                " AND rowid>? ORDER BY rowid LIMIT ?",
                (channel, after, items + 1),
            ).fetchall()
            last, total, n = after, 0, 0
            for rowid, length in sizes:
                if n >= items or (n and total + length > size):
                    break
                last, total, n = rowid, total + length, n + 1
            rows = (
                self._db.execute(
                    "SELECT rowid, object_id, channel, seq, schema, subject, created_us, body"
                    " FROM outbox WHERE acked_us IS NULL AND channel=? AND rowid>? AND rowid<=?"
                    " ORDER BY rowid",
                    (channel, after, last),
                ).fetchall()
                if n
                else []
            )
        page = [
            (r[0], OutboxItem(bytes(r[1]), r[2], r[3], r[4], r[5], r[6], bytes(r[7]))) for r in rows
        ]
        return page, n == len(sizes)

    def _by_ids(self, columns: str, where: str, object_ids: list[bytes]) -> list[Any]:
        """``SELECT columns FROM outbox WHERE where object_id IN (...)`` for these ids, in
        chunks of 500 (SQLite's bound on parameters); ``columns`` and ``where`` are this
        module's constants, never input."""
        rows: list[Any] = []
        with self._lock:
            for start in range(0, len(object_ids), 500):
                chunk = object_ids[start : start + 500]
                marks = ",".join("?" * len(chunk))  # placeholders only
                query = f"SELECT {columns} FROM outbox WHERE {where} object_id IN ({marks})"  # noqa: S608
                rows += self._db.execute(query, chunk).fetchall()
        return rows

    def rows_of(self, object_ids: list[bytes]) -> dict[bytes, tuple[int, bool]]:
        """The outbox rows of these messages, and whether each is acknowledged."""
        rows = self._by_ids("object_id, rowid, acked_us IS NOT NULL", "", object_ids)
        return {bytes(r[0]): (int(r[1]), bool(r[2])) for r in rows}

    def sizes_of(self, object_ids: list[bytes]) -> dict[bytes, tuple[int, int]]:
        """These messages, those not acknowledged: each one's row and body size."""
        rows = self._by_ids("object_id, rowid, length(body)", "acked_us IS NULL AND", object_ids)
        return {bytes(r[0]): (int(r[1]), int(r[2])) for r in rows}

    def items_of(self, object_ids: list[bytes]) -> dict[bytes, tuple[int, OutboxItem]]:
        """These messages, those not acknowledged, each with its row."""
        columns = "rowid, object_id, channel, seq, schema, subject, created_us, body"
        out: dict[bytes, tuple[int, OutboxItem]] = {}
        for r in self._by_ids(columns, "acked_us IS NULL AND", object_ids):
            item = OutboxItem(bytes(r[1]), r[2], r[3], r[4], r[5], r[6], bytes(r[7]))
            out[item.object_id] = (int(r[0]), item)
        return out

    def ack_many(self, object_ids: list[bytes], who: str) -> None:
        """Record who acknowledged what. The body is dropped at once (the delivery folder
        and the audit log keep what was delivered); the row itself stays for
        ``ACKED_RETENTION`` (see :meth:`prune`)."""
        now = int(time.time() * 1e6)
        with transaction(self._acks):
            self._acks.executemany(
                "UPDATE outbox SET acked_us=?, acked_by=?, body=x''"
                " WHERE object_id=? AND acked_us IS NULL",
                [(now, who, oid) for oid in object_ids],
            )

    def prune(self, before_us: int, limit: int = PRUNE_BATCH) -> int:
        """Forget up to ``limit`` rows acknowledged before ``before_us``; how many went."""
        with transaction(self._acks):
            cur = self._acks.execute(
                "DELETE FROM outbox WHERE rowid IN (SELECT rowid FROM outbox"
                " WHERE acked_us < ? LIMIT ?)",
                (before_us, limit),
            )
        return cur.rowcount

    def counts(self) -> tuple[int, int]:
        with self._lock:
            row = self._db.execute(
                "SELECT count(*) - count(acked_us), count(acked_us) FROM outbox"
            ).fetchone()
        return int(row[0]), int(row[1])


def _connected(served: ServedKey, client: ApiClient, first: bool) -> None:
    """A consumer's handshake (authenticator thread): warned about the first time it comes
    in with an earlier server key (``ferry inside status`` lists who still does)."""
    if first and not served.current:
        _log.warning(
            "consumer_on_previous_server_key",
            consumer=client.name,
            server_key=served.key.public.key_id.hex(),
            endpoints=served.endpoints,
        )


@dataclass(eq=False)
class _Consumer:
    identity: bytes
    name: str
    wanted: frozenset[str]  # (the channels it asked for at READY)
    key: str  # (z85: looked up again before each hand-out, so a revocation takes effect)
    credit: int = 0
    holding: int = 0  # given and not acknowledged (at most MAX_CREDIT: see _may_take)
    last_seen: float = field(default_factory=time.monotonic)
    allowed: bool = True  # (False while its key is off the allow-list: nothing handed out)
    channels: frozenset[str] = frozenset()  # (what it asked for and its key may read now)


def _may_take(con: _Consumer) -> bool:
    """Credit left, and fewer than MAX_CREDIT held: credit granted without acknowledging
    does not make a consumer hold more."""
    return con.credit > 0 and con.holding < MAX_CREDIT


class ConsumerServer:
    """Owns the consumer ROUTER (and PUB) sockets and their thread."""

    def __init__(self, params: ConsumerParams, outbox: Outbox, stop: threading.Event) -> None:
        if params.server_key is None or params.clients is None:
            raise ValueError("consumers need server_key and clients")
        self.params = params
        self.outbox = outbox
        self.stop = stop
        self.allow = Allowlist(params.clients)
        self.server_key = load_secret_key(params.server_key, ("x25519",))
        previous = params.previous_server_keys
        self.keys = ServerKeys(
            ZAP_DOMAIN, self.server_key, [load_secret_key(p.key, ("x25519",)) for p in previous]
        )
        self.keys.on_handshake = _connected
        self.allow.on_allowed = self.keys.handshake
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.auth = start_authenticator(self.ctx, self.keys.domains, self.allow)
        self.router: zmq.Socket[Any] | None = None
        self.pub: zmq.Socket[Any] | None = None
        self.endpoint = self.pub_endpoint = ""
        self.guards: list[ConnectionGuard] = []
        self._refusals_logged: dict[str, float] = {}  # address -> when last logged
        self._refusals_lock = threading.Lock()
        total = connection_budget(
            params.max_connections, sockets=bool(params.endpoint) + bool(params.publish)
        )
        per_address = min(total, params.max_connections_per_address)
        if params.endpoint:
            self.router = curve_server(
                self.ctx, zmq.ROUTER, self.server_key, ZAP_DOMAIN, max_message=MAX_BODY
            )
            self.guards.append(
                ConnectionGuard(
                    self.router,
                    "consumers",
                    total=total,
                    per_address=per_address,
                    on_refused=self._connection_refused,
                )
            )
            self.keys.bind(
                self.router, "consumers", [params.endpoint, *(p.endpoint for p in previous)]
            )
            self.endpoint = self.keys.current.endpoints["consumers"]
        if params.publish:
            self.pub = curve_server(
                self.ctx, zmq.PUB, self.server_key, ZAP_DOMAIN, max_message=MAX_BODY
            )
            self.guards.append(
                ConnectionGuard(
                    self.pub,
                    "publish",
                    total=total,
                    per_address=per_address,
                    on_refused=self._connection_refused,
                )
            )
            self.keys.bind(self.pub, "publish", [params.publish, *(p.publish for p in previous)])
            self.pub_endpoint = self.keys.current.endpoints["publish"]
        self._new: deque[OutboxItem] = deque()
        self._new_lock = threading.Lock()
        self._wake_r, self._wake_w = self.ctx.socket(zmq.PAIR), self.ctx.socket(zmq.PAIR)
        self._wake_r.bind("inproc://ferry-consumers-wake")
        self._wake_w.connect("inproc://ferry-consumers-wake")
        # item id -> item, in order, waiting for a consumer; and in flight, in the order
        # handed out: id -> (channel, when, to whom); the body stays in the outbox only
        self._waiting: OrderedDict[bytes, OutboxItem] = OrderedDict()
        self._inflight: dict[bytes, tuple[str, float, _Consumer]] = {}
        self._last_holder: dict[bytes, _Consumer] = {}  # offered again: who had it last
        self._redeliver_after_error = 0.0  # (the outbox could not be read: not before)
        self._held_bytes: dict[str, int] = {}  # channel -> bytes of its bodies in _waiting
        # Channels with messages in the outbox not read into _waiting yet: the row after
        # which to read on (see WINDOW_ITEMS).
        self._unread: dict[str, int] = {}
        # Channels paged up to the end, and the last row read: a notice of a message at or
        # before it comes late (see _fresh).
        self._read_to: dict[str, int] = {}
        self._unflushed: set[bytes] = set()  # acknowledged, not yet written (_flush_acks)
        self._queues: dict[str, OrderedDict[bytes, OutboxItem]] = {}  # _waiting by channel
        self._turn = 0  # (which channel hands out first: see _next_for)
        self.stray_acks = 0  # acks from connections that were not given the item
        self.forgotten = 0  # consumers whose connection was found gone (see _probe)
        self._next_probe = self._next_recheck = 0.0
        self._consumers: dict[bytes, _Consumer] = {}
        self.delivered = 0
        self.acked = 0
        self._acks: dict[str, list[bytes]] = {}
        self._next_ack_flush = 0.0
        self._retention = Retention(outbox.prune, ACKED_RETENTION, "outbox_pruned", _log)
        self._thread = threading.Thread(target=self._run, name="consumers", daemon=True)

    def _connection_refused(self, address: str, why: str, count: int) -> None:
        """A consumer connection past a limit was shut (on a guard's thread): logged once a
        minute per address at most."""
        now = time.monotonic()
        with self._refusals_lock:  # (the ROUTER's and the PUB's guards)
            if now - self._refusals_logged.get(address, -1e9) < 60:
                return
            if len(self._refusals_logged) > 10_000:
                self._refusals_logged.clear()
            self._refusals_logged[address] = now
        _log.warning("consumer_connection_refused", address=address, why=why, connections=count)

    def start(self) -> None:
        self.keys.check_rejects_strangers()
        for channel in self.outbox.waiting_channels():
            self._unread[channel] = 0
        self._read_in()
        self._thread.start()
        _log.info(
            "consumers_listening",
            endpoint=self.endpoint or None,
            publish=self.pub_endpoint or None,
            pending=self.outbox.counts()[0],
            previous_server_keys=self.keys.status() or None,
        )

    def close(self) -> None:
        self.stop.set()
        self.notify([])
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._flush_acks(force=True)
        for guard in self.guards:
            guard.close()
        for sock in (self.router, self.pub, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close(linger=200)
        self.auth.stop()
        self.ctx.term()

    def notify(self, items: list[OutboxItem]) -> None:
        """New durable messages (called from the delivery thread)."""
        with self._new_lock:
            self._new.extend(items)
            self._wake_w.send(b"", zmq.NOBLOCK)

    # ------------------------------------------------------------------ loop
    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        if self.router is not None:
            poller.register(self.router, zmq.POLLIN)
        while not self.stop.is_set():
            try:
                events = dict(poller.poll(250))
                if self._wake_r in events:
                    while True:
                        try:
                            self._wake_r.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                self.allow.maybe_reload()
                with self._new_lock:
                    fresh = list(self._new)
                    self._new.clear()
                for item in fresh:
                    self._publish(item)
                self._fresh(fresh)
                self._read_in()
                if self.router is not None and self.router in events:
                    self._read_router()
                self._redeliver()
                self._dispatch()
                self._probe()
                self._recheck_keys()
                self._flush_acks()
                self._retention.step(time.monotonic())
            except Exception:  # noqa: BLE001  # keep serving consumers
                _log.exception("consumer_loop_error")
                time.sleep(0.1)

    def _hold(self, item: OutboxItem, *, first: bool = False) -> None:
        """Into _waiting and its channel's queue (at its end, or first)."""
        self._waiting[item.object_id] = item
        queue = self._queues.setdefault(item.channel, OrderedDict())
        queue[item.object_id] = item
        if first:
            queue.move_to_end(item.object_id, last=False)
        self._held_bytes[item.channel] = self._held_bytes.get(item.channel, 0) + len(item.body)

    def _unhold(self, oid: bytes) -> None:
        item = self._waiting.pop(oid, None)
        if item is not None:
            del self._queues[item.channel][oid]
            self._held_bytes[item.channel] -= len(item.body)

    def _full(self, channel: str, part: int = 1) -> bool:
        n, size = self._held(channel)
        return n >= WINDOW_ITEMS // part or size >= WINDOW_BYTES // part

    def _held(self, channel: str) -> tuple[int, int]:
        """How many of the channel's messages are in _waiting, and their bytes."""
        return len(self._queues.get(channel, ())), self._held_bytes.get(channel, 0)

    def _fresh(self, items: list[OutboxItem]) -> None:
        """Messages just queued, in the order the delivery threads said so: held, unless
        their channel has messages still in the outbox only (they come after those) or its
        window is full (then they wait there too). While a channel is paged, or was, a
        notice may come after a page already read its message in, handed it out, even saw
        it acknowledged; and two delivery threads may give notice out of commit order. So
        then each message's row is looked up, and what the outbox says decides: done with
        (acknowledged, or gone) is dropped; before the page mark, the mark moves back."""
        rows: dict[bytes, tuple[int, bool]] | None = None

        def row(oid: bytes) -> tuple[int, bool] | None:
            nonlocal rows
            if rows is None:
                try:
                    rows = self.outbox.rows_of([i.object_id for i in items])
                except sqlite3.Error as exc:  # (unknown: held; at worst offered twice)
                    _log.warning("outbox_rows_not_read", error=str(exc))
                    rows = {i.object_id: (0, False) for i in items}
            return rows.get(oid)

        for item in items:
            oid, channel = item.object_id, item.channel
            if oid in self._waiting or oid in self._inflight or oid in self._unflushed:
                continue  # (read in already, or done with)
            looked_up = channel in self._unread or channel in self._read_to
            if looked_up:
                found = row(oid)
                if found is None or found[1]:
                    continue  # (acknowledged already, or gone)
                rowid = found[0]
                if channel in self._unread:  # (read in its turn; before the mark, it moves
                    if 0 < rowid <= self._unread[channel]:  # back)
                        self._unread[channel] = rowid - 1
                    continue
                if rowid > self._read_to[channel]:
                    del self._read_to[channel]  # (notices have caught up with the pages)
            if self._full(channel):
                found = row(oid)
                self._unread[channel] = max(0, (found[0] if found else 1) - 1)
                continue  # (every earlier row is held, in flight, done, or noticed later)
            self._hold(item)

    def _read_in(self) -> None:
        """Read messages waiting in the outbox only into channels' windows below half.
        Acknowledgements not yet written are skipped (not read in again); a database error
        (a full disk) skips the paging for this turn, and consumers are served meanwhile
        from what is held."""
        for channel, after in list(self._unread.items()):
            if self._full(channel, 2):
                continue
            n, size = self._held(channel)
            try:
                page, whole = self.outbox.waiting(
                    channel, after, WINDOW_ITEMS - n, max(1, WINDOW_BYTES - size)
                )
            except sqlite3.Error as exc:
                _log.warning("outbox_read_failed", channel=channel, error=str(exc))
                return
            for _, item in page:
                oid = item.object_id
                held = oid in self._waiting or oid in self._inflight
                if not held and oid not in self._unflushed:
                    self._hold(item)
            last = page[-1][0] if page else after
            if whole:
                del self._unread[channel]
                self._read_to[channel] = last
            else:
                self._unread[channel] = last

    def _publish(self, item: OutboxItem) -> None:
        if self.pub is None:
            return
        try:
            self.pub.send_multipart(
                [item.channel.encode(), msgpack.packb(self._meta(item)), item.body], zmq.NOBLOCK
            )
        except zmq.ZMQError as exc:
            _log.warning("publish_failed", error=str(exc))

    @staticmethod
    def _meta(item: OutboxItem) -> dict[str, Any]:
        return {
            "item": item.object_id.hex(),
            "channel": item.channel,
            "seq": item.seq,
            "schema": item.schema,
            "subject": item.subject,
            "created_us": item.created_us,
        }

    def _read_router(self) -> None:
        assert self.router is not None
        while True:
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            identity = frames[0].bytes
            key = frame_user_id(frames[-1])
            if key is None or len(frames) != 4 or frames[1].bytes != PROTOCOL:
                continue
            try:
                body = msgpack.unpackb(frames[3].bytes, raw=False)
            except (ValueError, msgpack.UnpackException):
                continue
            if not isinstance(body, dict):
                continue
            verb = frames[2].bytes
            client = self.allow.lookup(key)
            con = self._consumers.get(identity)
            if con is not None and con.key != key:  # (another key on that routing id: not
                del self._consumers[identity]  # the same consumer; what the first holds
                con = None  # is offered again in time, and only that key may acknowledge it)
            if con is None:
                if client is None or verb != b"READY":  # (a consumer starts with READY,
                    continue  # naming its channels: one forgotten is not made anew with all
                everything = frozenset(client.channels)  # it may read)
                con = self._consumers[identity] = _Consumer(
                    identity, client.name, everything, key, channels=everything
                )
            con.last_seen = time.monotonic()
            if client is None or client.name != con.name:
                # Off the allow-list: held back, not forgotten, so that it goes on if the key
                # is put back. What it acknowledges now is not taken (offered again in time);
                # the credit it grants is, or it would have less than it thinks once back.
                self._set_allowed(con, False)
            elif verb == b"ACK":  # (first: what it acknowledges no longer counts as held)
                self._ack(con, body.get("items"))
            # Credit: READY says how much it has (a connection made again, a routing id
            # reused: what it has left), an ACK grants more. At most MAX_CREDIT; what it
            # holds counts when messages are handed out (_may_take), not here, so credit is
            # never lost to messages that are acknowledged, or offered again, later.
            credit = body.get("credit")  # (a READY without it leaves the credit as it is)
            if type(credit) is int and credit >= 0:
                if verb == b"READY":
                    con.credit = min(MAX_CREDIT, credit)
                else:
                    con.credit = min(MAX_CREDIT, con.credit + credit)
            wanted = body.get("channels")
            if verb == b"READY" and isinstance(wanted, list):
                con.wanted = frozenset(c for c in wanted if isinstance(c, str))
                con.channels = con.wanted & frozenset(client.channels if client else ())

    def _ack(self, con: _Consumer, items: object) -> None:
        if not isinstance(items, list):
            return
        done = []
        for hexid in items[:MAX_CREDIT]:
            if not isinstance(hexid, str) or len(hexid) != 32:
                continue
            try:
                oid = bytes.fromhex(hexid)
            except ValueError:
                continue
            # Only the connection the message was given to may acknowledge it (also late,
            # after it was queued again): item ids are no secret, so an ack from anyone else
            # could make a message vanish before its consumer ever saw it.
            # (A connection made again with the same routing id and key may acknowledge
            # what the first was given.)
            entry = self._inflight.get(oid)
            holder: _Consumer | None
            if entry is not None:
                holder = entry[2]
            else:  # (offered again: waiting, or back in the outbox only)
                holder = self._last_holder.get(oid)
                if holder is None:
                    if oid in self._waiting:  # (never given: not its to acknowledge)
                        self.stray_acks += 1
                    continue
            if holder.identity != con.identity or holder.key != con.key:
                self.stray_acks += 1
                continue
            if self._inflight.pop(oid, None) is not None:
                holder.holding -= 1
            self._unhold(oid)
            self._last_holder.pop(oid, None)
            done.append(oid)
        if done:
            self._acks.setdefault(con.name, []).extend(done)
            self._unflushed.update(done)
            self.acked += len(done)

    def _flush_acks(self, force: bool = False) -> None:
        """Record acknowledgements in one transaction per interval (a lost one means a resend)."""
        now = time.monotonic()
        if not self._acks or (not force and now < self._next_ack_flush):
            return
        self._next_ack_flush = now + ACK_FLUSH_INTERVAL
        for who, ids in list(self._acks.items()):
            try:
                self.outbox.ack_many(ids, who)
            except sqlite3.Error as exc:  # (a full disk: kept, tried again a little later)
                self._next_ack_flush = now + ACK_RETRY_INTERVAL
                _log.warning("acks_not_written", pending=len(self._unflushed), error=str(exc))
                return
            del self._acks[who]
            self._unflushed.difference_update(ids)

    def _redeliver(self, limit: int = 1000) -> None:
        """Offer again the messages not acknowledged within ``redeliver_after`` (at most
        ``limit`` a turn, the oldest first), first in their channels' queues, in the order
        they were handed out. Only those that fit their channel's window are read from the
        outbox (their sizes first, as in paging); the others wait there and are paged in
        again in their turn. The outbox unreadable (a database error): tried again in a
        second, the messages kept in flight meanwhile."""
        now = time.monotonic()
        if now < self._redeliver_after_error:
            return
        due = now - self.params.redeliver_after
        late: list[bytes] = []
        for oid, (_, sent, _who) in self._inflight.items():  # (in the order handed out)
            if sent >= due or len(late) >= limit:
                break
            late.append(oid)
        if not late:
            return
        try:
            sizes = self.outbox.sizes_of(late)
            room = {ch: self._held(ch) for ch in {self._inflight[oid][0] for oid in late}}
            fits: list[bytes] = []
            for oid in late:  # (the oldest take the room first; after one that does not
                if (found := sizes.get(oid)) is None:  # fit, none of its channel does, so
                    continue  # a later one never goes ahead of an earlier one)
                channel = self._inflight[oid][0]
                if channel not in room:
                    continue
                n, size = room[channel]
                if n < WINDOW_ITEMS and (n == 0 or size + found[1] <= WINDOW_BYTES):
                    room[channel] = (n + 1, size + found[1])
                    fits.append(oid)
                else:
                    del room[channel]
            items = self.outbox.items_of(fits) if fits else {}
        except sqlite3.Error as exc:
            self._redeliver_after_error = now + 1.0
            _log.warning("outbox_read_failed", late=len(late), error=str(exc))
            return
        for oid in reversed(late):  # (each to the front: in the end, in their order)
            channel, _, holder = self._inflight.pop(oid)
            holder.holding -= 1
            if (found := sizes.get(oid)) is None:
                continue  # (acknowledged, or gone)
            self._last_holder[oid] = holder  # (its late ack still counts)
            if (got := items.get(oid)) is None:  # (no room: read in again in its turn)
                rowid = found[0]
                self._unread[channel] = min(self._unread.get(channel, rowid), rowid - 1)
                continue
            self._hold(got[1], first=True)

    def _probe(self) -> None:
        """PING each consumer silent for ``PROBE_AFTER`` s; forget those whose connection
        is gone (ROUTER_MANDATORY refuses the PING)."""
        now = time.monotonic()
        if self.router is None or now < self._next_probe:
            return
        self._next_probe = now + 1.0  # (looked at once a second, not on every turn)
        for con in [c for c in self._consumers.values() if now - c.last_seen >= PROBE_AFTER]:
            try:
                self.router.send_multipart(
                    [con.identity, PROTOCOL, b"PING", msgpack.packb({})], zmq.NOBLOCK
                )
            except zmq.Again:  # (there, but its queue is full: still there)
                con.last_seen = now
            except zmq.ZMQError:
                del self._consumers[con.identity]
                self.forgotten += 1
            else:
                con.last_seen = now  # (the next PING in PROBE_AFTER s)

    def _still_allowed(self, con: _Consumer) -> bool:
        """Is the consumer's key still on the allow-list (not removed, revoked or expired)?
        Its channels are those it asked for that the key may read now. A change either way
        is logged."""
        client = self.allow.lookup(con.key)
        allowed = client is not None and client.name == con.name
        self._set_allowed(con, allowed)
        if client is not None and allowed:
            con.channels = con.wanted & frozenset(client.channels)
        return allowed

    @staticmethod
    def _set_allowed(con: _Consumer, allowed: bool) -> None:
        if allowed != con.allowed:
            con.allowed = allowed
            event = "consumer_allowed_again" if allowed else "consumer_no_longer_allowed"
            _log.info(event, consumer=con.name)

    def _recheck_keys(self) -> None:
        """Every consumer's key looked up again once a second (also those with no credit,
        or nothing to hand out), so a change either way is logged when it happens."""
        now = time.monotonic()
        if now < self._next_recheck:
            return
        self._next_recheck = now + 1.0
        for con in self._consumers.values():
            self._still_allowed(con)

    def _next_for(
        self, channels: set[str], ready: list[_Consumer]
    ) -> Iterator[tuple[str, bytes, OutboxItem]]:
        """The waiting messages of ``channels``, each channel's in order, the channels taking
        turns (a consumer of several gets from each, not all of one first), each until no
        consumer of it has credit left (``ready`` is read as it changes)."""
        order = sorted(ch for ch in channels if ch in self._queues)
        if order:  # (each turn starts one channel further: none waits behind the others)
            self._turn = (self._turn + 1) % len(order)
            order = order[self._turn :] + order[: self._turn]
        queues = {ch: iter(self._queues[ch].items()) for ch in order}  # (changed after)
        while queues:
            for channel, queue in list(queues.items()):
                if not any(_may_take(c) and channel in c.channels for c in ready):
                    del queues[channel]
                    continue
                if (nxt := next(queue, None)) is None:
                    del queues[channel]
                    continue
                yield channel, *nxt

    def _dispatch(self) -> None:
        if self.router is None or not self._waiting:
            return
        # (a consumer whose key is off the allow-list gets nothing; what it holds is offered
        # again in time; put back, it goes on)
        ready = [c for c in self._consumers.values() if _may_take(c) and self._still_allowed(c)]
        if not ready:
            return
        sent: list[bytes] = []
        # Channel by channel, only those a consumer with credit reads: a channel whose
        # consumers are away holds a full window, not walked on every turn.
        wanted = {ch for c in ready for ch in c.channels}
        for channel, oid, item in self._next_for(wanted, ready):
            con = next((c for c in ready if _may_take(c) and channel in c.channels), None)
            if con is None:
                continue
            try:
                self.router.send_multipart(
                    [
                        con.identity,
                        PROTOCOL,
                        b"DELIVER",
                        msgpack.packb(self._meta(item)),
                        item.body,
                    ],
                    zmq.NOBLOCK,
                )
            except zmq.Again:  # its queue is full: nothing more for it this turn
                ready.remove(con)
                continue
            except zmq.ZMQError:  # gone: forget it (a READY on a new connection comes back)
                self._consumers.pop(con.identity, None)
                ready.remove(con)
                continue
            con.credit -= 1
            con.holding += 1
            self._inflight[oid] = (channel, time.monotonic(), con)
            self._last_holder.pop(oid, None)
            sent.append(oid)
        for oid in sent:
            self._unhold(oid)
        self.delivered += len(sent)
