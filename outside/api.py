"""The outer API: integrators submit messages and upload files over ZeroMQ with CURVE.

One thread owns the ROUTER socket. Each turn it drains what has arrived,
checks every request (authenticated client still allowed, channel permitted,
rate, size, strict JSON and schema), commits all accepted messages in one
durable SQLite transaction (group commit) and only then answers ACCEPTED.
The wire format is in docs/API.md: every frame list starts with
``b"FERRY/1"`` and a verb, then a msgpack map, then an optional data frame.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import re
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgpack
import zmq

from ferry import log
from ferry.audit.agent import AgentAudit
from ferry.audit.record import AuditObject, AuditUnavailable, Subject
from ferry.config_types import ApiClient, ApiParams, OutsideChannel, OutsideConfig
from ferry.content.base import Verdict
from ferry.crypto.keys import SecretKey, load_secret_key
from ferry.errors import FerryError, PolicyRejection
from ferry.jsondoc import JsonLimits, SchemaRegistry
from ferry.state import disk_full
from ferry.wire import records as rec
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
from outside.content.pipeline import ContentPipeline
from outside.spool import (
    Conflict,
    MessageRequest,
    Sealed,
    Spool,
    SpoolItem,
    now_us,
)

PROTOCOL = b"FERRY/1"
ZAP_DOMAIN = "ferry-api"
# Requests read per turn before the group commit: bounds latency and memory.
MAX_BATCH = 1024
MAX_BATCH_BYTES = 32 * 1024 * 1024
# Requests queued per connection in the socket (ZeroMQ counts messages, not bytes): at most
# about this many bytes of the largest requests per connection (965 requests with the default
# 1 MiB limit; fewer hold back group commit: 64 cost a fifth of the throughput).
RECEIVE_QUEUE_BYTES = 1024 * 1024 * 1024
MAX_BODY = 16 * 1024
MAX_UPLOADS_PER_CLIENT = 4
# A request's id is echoed in its reply (the client matches replies by it) up to this length;
# a longer one, never a valid submission id, is answered with an empty id.
MAX_ECHOED_ID = 256
UPLOAD_IDLE_TIMEOUT = 120.0
# Seconds close() waits for an upload being checked (the content pipeline has a limit of its
# own; an upload cut short is not acknowledged, and the client sends it again).
FINISH_STOP_TIMEOUT = 10.0
SUBMISSION_ID = re.compile(r"[\x21-\x7e]{1,128}")
BUSY_RETRY_AFTER = 1.0
# A client's slow requests are charged to a budget of the API thread's time: a crafted JSON
# document within the size limit (hundreds of thousands of numbers, deep nesting) can take
# the single API thread a tenth to half a second to check. Each check taking SLOW_REQUEST or
# more is charged whole; a client may spend SLOW_SHARE of the thread's time so (SLOW_BURST
# seconds at once), and past it gets BUSY before its next message is read. Ordinary
# messages (well under a millisecond) are never charged.
SLOW_REQUEST = 0.002
SLOW_SHARE = 0.5
SLOW_BURST = 1.0
# Seconds a client is told to wait while the audit log cannot write (intake is halted).
AUDIT_RETRY_AFTER = 2.0
MESSAGE_TYPE = "application/json"
# Seconds between audit records of the same repeated event (rate limit hits, bad handshakes).
NOTE_INTERVAL = 60.0
# Records of one such event per NOTE_INTERVAL across all senders (fresh keys cost nothing);
# the rest are counted, and the count recorded once the interval is over.
NOTES_PER_INTERVAL = 20
# Refusals of requests that are not charged to the client's rate (they come before it):
# recorded like the events above, so that a client repeating one cannot flood the audit log.
UNCHARGED_REFUSALS = frozenset(
    {
        "BAD_REQUEST",
        "CHANNEL_NOT_ALLOWED",
        "UNKNOWN_CHANNEL",
        "WRONG_CHANNEL_KIND",
        "SCHEMA_NOT_ALLOWED",
        "SUBMISSION_ID_REUSED",
        "UNKNOWN_UPLOAD",
        "BAD_OFFSET",
    }
)

_log = log.get("outside.api")


class Refused(Exception):  # control flow: becomes a REJECTED reply
    def __init__(self, code: str, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.path = path


class Busy(Exception):  # control flow: becomes a BUSY reply
    def __init__(self, retry_after: float, why: str) -> None:
        super().__init__(why)
        self.retry_after = retry_after


class Answered(Exception):  # control flow: the reply is ready (an earlier answer)
    def __init__(self, frames: list[bytes]) -> None:
        super().__init__("answered")
        self.frames = frames


@dataclass
class _Bucket:
    rate: float
    tokens: float
    last: float

    def take(self, now: float) -> float:
        """0 if a token was taken, else seconds until one is available."""
        # (at least one token fits: a rate under 1/s still admits one now and then)
        self.tokens = min(max(1.0, self.rate), self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass
class _TimeBudget:
    """Seconds of the API thread a client may still spend on slow checks (see SLOW_SHARE)."""

    left: float
    last: float

    def refill(self, now: float) -> float:
        self.left = min(SLOW_BURST, self.left + (now - self.last) * SLOW_SHARE)
        self.last = now
        return self.left


@dataclass
class _Upload:
    token: str
    client: str
    submission_id: str
    channel: OutsideChannel
    name: str
    size: int
    sha256: bytes
    path: Path
    fd: int
    identity: bytes
    received: int = 0
    digest: Any = field(default_factory=hashlib.sha256)
    last: float = field(default_factory=time.monotonic)
    finishing: bool = False  # every byte is in: checked and spooled on the finisher thread


def _attempt(body: dict[str, Any]) -> dict[str, int]:
    """A client's numbering of its tries of one upload, echoed in the first CREDIT so that
    it can tell this try's answer from an earlier one's (ignored unless a small integer)."""
    attempt = body.get("attempt")
    return {"attempt": attempt} if type(attempt) is int and 0 < attempt < 1000 else {}


def _reply(verb: bytes, body: dict[str, Any]) -> list[bytes]:
    return [PROTOCOL, verb, msgpack.packb(body, use_bin_type=True)]


def _accepted(  # the reply's fields, in order
    sid: str, object_id: bytes, channel: str, seq: int, duplicate: bool
) -> list[bytes]:
    body = {"id": sid, "item": object_id.hex(), "channel": channel, "seq": seq}
    return _reply(b"ACCEPTED", {**body, "duplicate": duplicate})


def message_manifest(
    channel: str, seq: int, schema: str, canonical: bytes, *, sender: bytes, client: str
) -> rec.Manifest:
    """The manifest of a message the API accepted: ``canonical`` (its canonical JSON) as
    ``<schema>-<seq>.json`` on ``channel``, from API client ``client``, a new object id."""
    created = now_us()
    return rec.Manifest(
        object_id=os.urandom(16),
        kind="message",
        channel=channel,
        seq=seq,
        name=f"{schema}-{seq:08d}.json",
        media_type=MESSAGE_TYPE,
        size=len(canonical),
        sha256=hashlib.sha256(canonical).digest(),
        created_us=created,
        mtime_us=created,
        sender=sender,
        schema=schema,
        subject=f"api:{client}",
    )


class ApiServer:
    """Owns the API socket and its thread; hands accepted items to ``on_items``."""

    def __init__(
        self,
        cfg: OutsideConfig,
        spool: Spool,
        signing_key: SecretKey,
        on_items: Callable[[list[SpoolItem]], None],
        stop: threading.Event,
        *,
        schemas: SchemaRegistry | None = None,
        audit: AgentAudit | None = None,
        pipeline: ContentPipeline | None = None,
    ) -> None:
        if cfg.api is None or cfg.api.server_key is None or cfg.api.clients is None:
            raise FerryError("the outside config has no api section")
        self.params: ApiParams = cfg.api
        server_key, clients = cfg.api.server_key, cfg.api.clients
        self.cfg = cfg
        self.spool = spool
        self.key = signing_key
        self.on_items = on_items
        self.stop = stop
        self.channels = {c.name: c for c in cfg.channels}
        self.schemas = schemas or SchemaRegistry.load()
        for ch in cfg.channels:
            for name in ch.schemas:
                if name not in self.schemas.ids:
                    raise FerryError(
                        f"channel {ch.name}: unknown message schema {name!r}; "
                        f"known: {', '.join(self.schemas.ids)}"
                    )
        self.server_key = load_secret_key(server_key, ("x25519",))
        self.allow = Allowlist(clients)
        self.audit = audit
        self._batch_idx = -1  # index of the last intake.accepted record of the batch
        # the batch's new messages (intake.accepted entries) by (client, channel)
        self._intake: dict[tuple[str, str], list[dict[str, object]]] = {}
        self._noted: dict[tuple[str, str], float] = {}  # (event, who) -> last recorded
        # event -> (interval start, records in it, suppressed): see NOTES_PER_INTERVAL
        self._note_window: dict[str, tuple[float, int, int]] = {}
        self._note_lock = threading.Lock()
        self._batch_sids: set[tuple[str, str]] = set()  # (client, id) of this batch's SUBMITs
        self._slow: dict[str, _TimeBudget] = {}  # clients whose checks were slow
        self._spool_full = False
        if audit is not None:
            self.allow.on_refused = self._auth_failed
        self._buckets: dict[str, _Bucket] = {}
        self._uploads: dict[str, _Upload] = {}
        self._upload_dir = cfg.state_dir / "uploads"
        self._upload_dir.mkdir(parents=True, exist_ok=True)
        self.pipeline = pipeline
        self._content_dir = self._upload_dir / "content"  # cleaned outputs (spool's disk)
        shutil.rmtree(self._content_dir, ignore_errors=True)
        for stale in self._upload_dir.glob("*.part"):
            stale.unlink()
        self.keys = ServerKeys(
            ZAP_DOMAIN,
            self.server_key,
            [load_secret_key(p.key, ("x25519",)) for p in self.params.previous_server_keys],
        )
        self.keys.on_handshake = self._connected
        self.allow.on_allowed = self.keys.handshake
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.auth = start_authenticator(self.ctx, self.keys.domains, self.allow)
        overhead = 64 * 1024
        max_msg = max(self.params.max_message_size, self.params.chunk_size) + overhead
        self.sock = curve_server(
            self.ctx,
            zmq.ROUTER,
            self.server_key,
            ZAP_DOMAIN,
            max_message=max_msg,
            rcvhwm=max(64, min(10_000, RECEIVE_QUEUE_BYTES // max_msg)),
        )
        total = connection_budget(self.params.max_connections)
        self.guard = ConnectionGuard(
            self.sock,
            "api",
            total=total,
            per_address=min(total, self.params.max_connections_per_address),
            on_refused=self._connection_refused,
        )
        self.keys.bind(
            self.sock,
            "api",
            [self.params.endpoint, *(p.endpoint for p in self.params.previous_server_keys)],
        )
        self.endpoint = self.keys.current.endpoints["api"]
        self.accepted = 0
        self.rejected = 0
        self.busy = 0
        self.undeliverable = 0  # replies dropped: the client was gone or not reading
        self._thread = threading.Thread(target=self._run, name="api", daemon=True)
        # Complete uploads are checked (content pipeline) and spooled on a thread of their
        # own, so that a large or slow file holds up no other client's messages; the API
        # thread, which alone owns the socket, sends the answers (woken through _wake_rx).
        self._finish_queue: queue.SimpleQueue[_Upload | None] = queue.SimpleQueue()
        self._finished: queue.SimpleQueue[tuple[_Upload, list[bytes], str]] = queue.SimpleQueue()
        self._wake_endpoint = f"inproc://ferry-api-finished-{id(self):x}"
        self._wake_rx = self.ctx.socket(zmq.PULL)
        self._wake_rx.bind(self._wake_endpoint)
        self._finisher = threading.Thread(target=self._finish_loop, name="api-uploads", daemon=True)

    def start(self) -> None:
        self.keys.check_rejects_strangers()
        self._finisher.start()
        self._thread.start()
        _log.info(
            "api_listening",
            endpoint=self.endpoint,
            server_key=self.server_key.public.to_string(),
            clients=len(self.allow),
            previous_server_keys=self.keys.status() or None,
        )

    def close(self) -> None:
        self.stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self._thread.is_alive():  # (closing a socket another thread uses aborts libzmq)
            _log.error("api_thread_left_running", waited_s=5)
            return
        self._finish_queue.put(None)
        if self._finisher.is_alive():
            self._finisher.join(timeout=FINISH_STOP_TIMEOUT)
        for up in list(self._uploads.values()):
            if not (up.finishing and self._finisher.is_alive()):  # (else it is in use)
                self._drop_upload(up)
        self.guard.close()
        self._wake_rx.close(linger=0)
        self.sock.close(linger=500)
        self.auth.stop()
        self.ctx.term()

    # ------------------------------------------------------------------ loop
    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        while not self.stop.is_set():
            try:
                self.allow.maybe_reload()
                self._expire_uploads()
                self._note_suppressed()
                ready = dict(poller.poll(100))
                if self._wake_rx in ready:
                    with contextlib.suppress(zmq.Again):
                        while True:
                            self._wake_rx.recv(zmq.NOBLOCK)
                    self._answer_finished()
                if self.sock not in ready:
                    continue
                batch: list[list[zmq.Frame]] = []
                size = 0
                while len(batch) < MAX_BATCH and size < MAX_BATCH_BYTES:
                    try:
                        batch.append(self.sock.recv_multipart(zmq.NOBLOCK, copy=False))
                    except zmq.Again:
                        break
                    size += sum(len(f) for f in batch[-1])
                self._handle_batch(batch)
            except Exception:  # noqa: BLE001  # the API thread must keep serving
                _log.exception("api_loop_error")
                time.sleep(0.1)

    def _send(self, identity: bytes, frames: list[bytes]) -> None:
        """Never waits: a client that does not read its replies loses them (it asks again;
        submissions are idempotent) rather than holding up every other client."""
        try:
            self.sock.send_multipart([identity, *frames], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # EHOSTUNREACH (gone) or EAGAIN (its queue is full)
            self.undeliverable += 1
            if self._first_in_a_while("reply_undeliverable", identity.hex()):
                _log.warning("reply_undeliverable", error=str(exc), dropped=self.undeliverable)

    def _handle_batch(self, batch: list[list[zmq.Frame]]) -> None:
        submits: list[tuple[bytes, MessageRequest, bytes, str]] = []
        self._batch_sids.clear()
        for frames in batch:
            try:
                self._handle_one(frames, submits)
            except Exception:  # noqa: BLE001  # one request's failure is its own
                _log.exception("request_failed")
        if submits:
            self._commit(submits)

    def _handle_one(
        self, frames: list[zmq.Frame], submits: list[tuple[bytes, MessageRequest, bytes, str]]
    ) -> None:
        identity = frames[0].bytes
        sid = ""  # (echoed in replies only if short enough, so a client can match them)
        try:
            if len(frames) < 4 or frames[1].bytes != PROTOCOL:
                self._authenticate(frames)
                raise Refused("BAD_REQUEST", "expected [FERRY/1, verb, body, data?]")
            body = self._body(frames[3].bytes)
            given = body.get("id")
            sid = given if isinstance(given, str) and len(given) <= MAX_ECHOED_ID else ""
            client = self._authenticate(frames)  # every message: revocation is immediate
            verb = frames[2].bytes
            data = frames[4].bytes if len(frames) > 4 else b""
            if len(frames) > 5:
                raise Refused("BAD_REQUEST", "too many frames")
            if verb == b"SUBMIT":
                submits.append((identity, *self._check_submit(client, body, data)))
                self._batch_sids.add((client.name, sid))
            elif verb == b"STATUS":
                self._status(identity, client, body)
            elif verb == b"UPLOAD":
                self._upload_begin(identity, client, body)
            elif verb == b"CHUNK":
                self._upload_chunk(identity, client, body, data)
            elif verb == b"PING":
                self._send(identity, _reply(b"PONG", {"id": sid}))
            else:
                raise Refused("BAD_REQUEST", f"unknown verb {verb[:32]!r}")
        except Refused as exc:
            self.rejected += 1
            self._send(identity, _reply(b"REJECTED", self._rejection(sid, exc)))
            _log.info("request_rejected", id=sid, code=exc.code, message=exc.message[:1024])
            self._record_refused(frames, sid, exc)
        except Busy as exc:
            self.busy += 1
            self._send(identity, _reply(b"BUSY", {"id": sid, "retry_after": exc.retry_after}))
        except Answered as exc:
            self._send(identity, exc.frames)
        except Exception as exc:  # noqa: BLE001  # fail closed for this request only
            _log.exception("request_failed", id=sid)
            self._send(
                identity,
                _reply(b"REJECTED", {"id": sid, "code": "INTERNAL", "message": str(exc)}),
            )

    def _record_refused(self, frames: list[zmq.Frame], sid: str, exc: Refused) -> None:
        """intake.rejected for a refused request; api.auth_failed for a revoked key.
        Malformed requests and bad keys are recorded at most once a minute per sender."""
        if self.audit is None:
            return
        who = frame_user_id(frames[-1]) or "unknown"
        if exc.code == "UNAUTHENTICATED":
            if self._first_in_a_while("api.auth_failed", who):
                self._note(
                    "api.auth_failed",
                    subject=Subject("api_client", who[:512]),
                    result="rejected",
                    reason=f"{exc.code}: {exc.message}",
                )
            return
        if exc.code in UNCHARGED_REFUSALS and not self._first_in_a_while(
            "intake.rejected", f"{who}/{exc.code}"
        ):
            return
        client = self.allow.lookup(who)
        detail: dict[str, Any] = {"reason_code": exc.code}
        if sid:
            detail["submission"] = sid[:128]  # (well-formed ids are no longer)
        if exc.path is not None:
            detail["json_path"] = str(exc.path)[:512]
        self._note(
            "intake.rejected",
            subject=self._client_subject(client.name if client else who[:512]),
            result="rejected",
            reason=f"{exc.code}: {exc.message}"[:1024],
            obj=AuditObject(kind="message"),
            detail=detail,
        )

    @staticmethod
    def _rejection(sid: str, exc: Refused) -> dict[str, Any]:
        out: dict[str, Any] = {"id": sid, "code": exc.code, "message": exc.message}
        if exc.path is not None:
            out["path"] = exc.path
        return out

    def _authenticate(self, frames: list[zmq.Frame]) -> ApiClient:
        key = frame_user_id(frames[-1])
        client = None if key is None else self.allow.lookup(key)
        if client is None:
            raise Refused("UNAUTHENTICATED", "this client key is not (or no longer) allowed")
        return client

    @staticmethod
    def _body(raw: bytes) -> dict[str, Any]:
        if len(raw) > MAX_BODY:
            raise Refused("BAD_REQUEST", f"request body over {MAX_BODY} bytes")
        try:
            body = msgpack.unpackb(raw, raw=False, strict_map_key=True)
        except (ValueError, msgpack.ExtraData, msgpack.UnpackException) as exc:
            raise Refused("BAD_REQUEST", f"request body is not msgpack: {exc}") from exc
        if not isinstance(body, dict):
            raise Refused("BAD_REQUEST", "request body must be a map")
        return body

    def _channel(self, client: ApiClient, body: dict[str, Any], kind: str) -> OutsideChannel:
        name = body.get("channel")
        if not isinstance(name, str):
            raise Refused("BAD_REQUEST", "'channel' must be a string")
        if name not in client.channels:
            raise Refused("CHANNEL_NOT_ALLOWED", f"client {client.name} may not use {name!r}")
        ch = self.channels.get(name)
        if ch is None:
            raise Refused("UNKNOWN_CHANNEL", f"no channel {name!r} on this gateway")
        if ch.kind != kind:
            what = "messages (SUBMIT)" if ch.kind == "messages" else "files (UPLOAD)"
            raise Refused("WRONG_CHANNEL_KIND", f"channel {name!r} takes {what}")
        return ch

    @staticmethod
    def _submission_id(body: dict[str, Any]) -> str:
        sid = body.get("id")
        if not isinstance(sid, str) or not SUBMISSION_ID.fullmatch(sid):
            raise Refused("BAD_REQUEST", "'id' must be 1-128 printable ASCII characters")
        return sid

    def _admit(self, client: ApiClient) -> None:
        """Rate limit and spool backpressure: BUSY, never a silent drop."""
        now = time.monotonic()
        bucket = self._buckets.get(client.name)
        if bucket is None or bucket.rate != client.rate:
            bucket = self._buckets[client.name] = _Bucket(client.rate, max(1.0, client.rate), now)
        if self.audit is not None and self.audit.failed:
            raise Busy(AUDIT_RETRY_AFTER, "audit log unavailable")  # fail closed
        budget = self._slow.get(client.name)
        if budget is not None and budget.refill(now) < 0:
            wait = -budget.left / SLOW_SHARE
            if self._first_in_a_while("api.rate_limited", f"{client.name}/slow"):
                self._note(
                    "api.rate_limited",
                    subject=self._client_subject(client.name),
                    result="rejected",
                    reason=(
                        f"SLOW_REQUESTS: checking this client's messages took more than "
                        f"{SLOW_SHARE:.0%} of the API's time"
                    ),
                    detail={"retry_after": round(wait, 3)},
                )
            raise Busy(round(wait, 3), "slow requests")
        wait = bucket.take(now)
        if wait > 0:
            if self._first_in_a_while("api.rate_limited", client.name):
                self._note(
                    "api.rate_limited",
                    subject=self._client_subject(client.name),
                    result="rejected",
                    reason=f"RATE_LIMIT: more than {client.rate} submissions/s",
                    detail={"retry_after": round(wait, 3)},
                )
            raise Busy(round(wait, 3), "rate limit")
        p = self.params
        if self.spool.backlog_items >= p.busy_items or self.spool.backlog_bytes >= p.busy_bytes:
            if not self._spool_full:
                self._spool_full = True
                self._note(
                    "spool.full",
                    subject=Subject.component("spool"),
                    result="info",
                    detail={
                        "items": self.spool.backlog_items,
                        "bytes": self.spool.backlog_bytes,
                    },
                )
            raise Busy(BUSY_RETRY_AFTER, "spool full")
        self._spool_full = False

    def _check_submit(
        self, client: ApiClient, body: dict[str, Any], data: bytes
    ) -> tuple[MessageRequest, bytes, str]:
        sid = self._submission_id(body)
        ch = self._channel(client, body, "messages")
        named = body.get("schema", ch.schemas[0] if len(ch.schemas) == 1 else None)
        if named is not None and not isinstance(named, str):
            raise Refused("BAD_REQUEST", "'schema' must be a string")
        if named is not None and named not in ch.schemas:
            raise Refused("SCHEMA_NOT_ALLOWED", f"{ch.name} takes {', '.join(ch.schemas)}")
        if any(u.client == client.name and u.submission_id == sid for u in self._uploads.values()):
            raise Refused("SUBMISSION_ID_REUSED", "an upload with this id is in progress")
        # What a retry must repeat: the channel and the bytes. Not the schema: named or not,
        # and whatever the channel's schemas are by then (an operator may add one), a retry
        # gets the first answer.
        request_sha = hashlib.sha256(b"%s\x00\x00" % ch.name.encode() + data)
        self._admit_or_answer(client, sid, request_sha.digest())
        limit = min(ch.max_message_size, self.params.max_message_size)
        if len(data) > limit:
            raise Refused("TOO_LARGE", f"message of {len(data)} bytes; the limit is {limit}")
        started = time.monotonic()
        try:
            schema, canonical = self._validate(
                ch.schemas if named is None else (named,), data, limit
            )
        finally:
            self._charge(client, started)
        if len(canonical) > limit:  # (numbers may grow: 1e20 is 100000000000000000000)
            raise Refused(
                "TOO_LARGE",
                f"message of {len(canonical)} bytes in canonical form (RFC 8785, what is "
                f"delivered); the limit is {limit}",
            )
        req = MessageRequest(
            client=client.name,
            submission_id=sid,
            request_sha256=request_sha.digest(),
            channel=ch.name,
            sends_total=ch.repeat.count,
            spread_us=int(ch.repeat.spread * 1e6),
            priority=ch.priority,
        )
        return req, canonical, schema

    def _validate(self, schemas: Sequence[str], data: bytes, limit: int) -> tuple[str, bytes]:
        """Strict parse and validation against the schema named, or when none was, the first
        of the channel's schemas the message matches: (that schema, canonical bytes). A
        message that matches none is refused with what each schema found."""
        found: list[tuple[str, PolicyRejection]] = []
        for schema in schemas:
            try:
                _, canonical = self.schemas.check(schema, data, JsonLimits(max_bytes=limit))
            except PolicyRejection as exc:
                if exc.reason_code != "SCHEMA_INVALID":  # (not JSON, or past a limit: the same
                    found = [(schema, exc)]  # whatever the schema)
                    break
                found.append((schema, exc))
                continue
            return schema, canonical
        if len(found) == 1:
            only = found[0][1]
            message = getattr(only, "message", None) or str(only)
            raise Refused(only.reason_code, message, getattr(only, "json_path", None))
        raise Refused(
            "SCHEMA_INVALID",
            "matches none of the channel's schemas: "
            + "; ".join(
                f"{schema}: {getattr(exc, 'json_path', '$')}: {getattr(exc, 'message', exc)}"
                for schema, exc in found
            )
            + " (name one with 'schema' to see only its errors)",
        )

    def _charge(self, client: ApiClient, started: float) -> None:
        """Charge a slow check to the client's time budget (see SLOW_SHARE)."""
        now = time.monotonic()
        if now - started < SLOW_REQUEST:
            return
        budget = self._slow.get(client.name)
        if budget is None:
            budget = self._slow[client.name] = _TimeBudget(SLOW_BURST, now)
        budget.refill(now)
        budget.left -= now - started

    def _admit_or_answer(self, client: ApiClient, sid: str, request_sha: bytes) -> None:
        """:meth:`_admit`; when it says BUSY, an id answered before gets that answer instead."""
        try:
            self._admit(client)
        except Busy:
            self._answer_earlier(client, sid, request_sha)
            raise

    def _answer_earlier(self, client: ApiClient, sid: str, request_sha: bytes) -> None:
        """Raise :class:`Answered` with the answer given before to this submission id, if any:
        ACCEPTED (duplicate) for the same content, SUBMISSION_ID_REUSED for other content."""
        prior = self.spool.submission(client.name, sid)
        if prior is None:
            return
        if prior.request_sha256 != request_sha:
            raise Refused(
                "SUBMISSION_ID_REUSED",
                f"this id was used before for other content (item {prior.object_id.hex()})",
            )
        raise Answered(_accepted(sid, prior.object_id, prior.channel, prior.seq, True))

    def _commit(self, submits: list[tuple[bytes, MessageRequest, bytes, str]]) -> None:
        payloads = {id(req): (canonical, schema) for _, req, canonical, schema in submits}

        def seal(req: MessageRequest, seq: int) -> Sealed:
            canonical, schema = payloads[id(req)]
            return self._seal(req, seq, canonical, schema)

        self._batch_idx = -1
        self._intake.clear()
        try:
            results = self.spool.accept_messages([s[1] for s in submits], seal, self._record_intake)
        except AuditUnavailable as exc:  # rolled back: nothing spooled, nothing acknowledged
            self._hold(submits, exc)
            return
        except Exception as exc:  # noqa: BLE001  # fail closed: nothing acknowledged
            if disk_full(exc):  # rolled back: backpressure until there is room again
                self._hold(submits, exc, why="the spool's disk is full")
                return
            _log.exception("spool_commit_failed")
            for identity, req, _, _ in submits:
                self._send(
                    identity,
                    _reply(
                        b"REJECTED",
                        {"id": req.submission_id, "code": "INTERNAL", "message": str(exc)},
                    ),
                )
            return
        new_items = [item for _, item in results if item is not None]
        if new_items:  # (sent once the intake records are durable)
            self.on_items(new_items)
        if self._batch_idx >= 0 and self.audit is not None:
            try:  # ACCEPTED only once the intake records are on disk
                self.audit.log.wait_durable(self._batch_idx)
            except AuditUnavailable as exc:  # spooled; a resubmit gets the same item
                self._hold(submits, exc)
                return
        for (identity, req, _, _), (answer, _item) in zip(submits, results, strict=True):
            if isinstance(answer, Conflict):
                self.rejected += 1
                self._send(
                    identity,
                    _reply(
                        b"REJECTED",
                        {
                            "id": req.submission_id,
                            "code": "SUBMISSION_ID_REUSED",
                            "message": "this id was used before for a different message "
                            f"(item {answer.object_id.hex()})",
                        },
                    ),
                )
                continue
            self.accepted += 1
            self._send(
                identity,
                _accepted(
                    req.submission_id, answer.object_id, req.channel, answer.seq, answer.duplicate
                ),
            )
        _log.debug("messages_committed", count=len(submits), new=len(new_items))

    def _hold(
        self,
        submits: list[tuple[bytes, MessageRequest, bytes, str]],
        exc: Exception,
        why: str = "the audit log cannot write",
    ) -> None:
        """The audit log cannot write, or the spool's disk is full: answer BUSY (retry
        later), acknowledge nothing."""
        _log.error("submissions_held", count=len(submits), reason=why, error=str(exc))
        self.busy += len(submits)
        for identity, req, _, _ in submits:
            self._send(
                identity,
                _reply(b"BUSY", {"id": req.submission_id, "retry_after": AUDIT_RETRY_AFTER}),
            )

    def _client_subject(self, client: str) -> Subject:
        return Subject.api_client(client)

    def _first_in_a_while(self, event: str, who: str, window: str = "") -> bool:
        """At most one record per event and client per NOTE_INTERVAL, and at most
        NOTES_PER_INTERVAL per event from all clients together (a flood of fresh keys costs
        nothing to make): floods stay bounded. What is held back is counted, and the count
        recorded (:meth:`_note_suppressed`). ``window``: a share of its own for one kind of
        record of the event (``api.rate_limited`` of connections, so that a flood from many
        addresses does not hold back clients' rate records)."""
        key = f"{event}/{window}" if window else event
        with self._note_lock:  # (the authenticator's thread notes refused keys)
            now = time.monotonic()
            start, count, held = self._note_window.get(key, (now, 0, 0))
            if now - start >= NOTE_INTERVAL:
                self._flush_suppressed(key, held)
                start, count, held = now, 0, 0
            last = self._noted.get((key, who))
            if (last is not None and now - last < NOTE_INTERVAL) or count >= NOTES_PER_INTERVAL:
                self._note_window[key] = (start, count, held + 1)
                return False
            self._note_window[key] = (start, count + 1, held)
            if len(self._noted) > 10_000:
                self._noted.clear()
            self._noted[(key, who)] = now
            return True

    def _note_suppressed(self) -> None:
        """Record how many records of each event were held back in an interval now over."""
        now = time.monotonic()
        with self._note_lock:
            for key, (start, _, held) in list(self._note_window.items()):
                if now - start >= NOTE_INTERVAL:
                    del self._note_window[key]
                    self._flush_suppressed(key, held)

    def _flush_suppressed(self, key: str, held: int) -> None:
        event, _, window = key.partition("/")
        if held and event in {"api.auth_failed", "api.rate_limited", "intake.rejected"}:
            what = f" {window}" if window else ""
            self._note(
                event,
                subject=Subject.component("api"),
                result="rejected",
                reason=f"SUPPRESSED: {held} more{what} in {NOTE_INTERVAL:.0f} s, not recorded "
                "one by one",
                detail={"suppressed": held},
            )

    def _note(self, event: str, **kw: Any) -> None:
        if self.audit is not None:
            self.audit.try_record(event, **kw)

    def _connected(self, served: ServedKey, client: ApiClient, first: bool) -> None:
        """A client's handshake (on the authenticator thread): recorded now and then, and
        warned about the first time it comes in with an earlier server key."""
        key_id = served.key.public.key_id.hex()
        if first and not served.current:
            _log.warning(
                "client_on_previous_server_key",
                client=client.name,
                server_key=key_id,
                endpoint=served.endpoints.get("api"),
            )
        if self._first_in_a_while("api.connected", f"{client.name}\0{key_id}"):
            self._note(
                "api.connected",
                subject=self._client_subject(client.name),
                result="success",
                detail={
                    "server_key": key_id,
                    "previous_key": not served.current,
                    "endpoint": served.endpoints.get("api", "")[:1024],
                },
            )

    def _connection_refused(self, address: str, why: str, count: int) -> None:
        """A connection past a limit was shut (on the guard's thread): recorded once a
        minute per address at most (:meth:`_first_in_a_while`)."""
        if self._first_in_a_while("api.rate_limited", address, window="connections"):
            _log.warning("api_connection_refused", address=address, why=why)
            self._note(
                "api.rate_limited",
                subject=Subject.component("api"),
                result="rejected",
                reason=f"CONNECTIONS: {why}; the connection was closed",
                detail={"address": address[:256], "connections": count},
            )

    def _auth_failed(self, z85_key: str) -> None:
        if self._first_in_a_while("api.auth_failed", z85_key):
            self._note(
                "api.auth_failed",
                subject=Subject("api_client", z85_key[:512]),
                result="rejected",
                reason="UNKNOWN_KEY: CURVE handshake from a key not on the allow-list",
            )

    def _seal(self, req: MessageRequest, seq: int, canonical: bytes, schema: str) -> Sealed:
        manifest = message_manifest(
            req.channel, seq, schema, canonical, sender=self.key.public.key_id, client=req.client
        )
        object_id, name, sha = manifest.object_id, manifest.name, manifest.sha256
        # unsigned: the sender signs the bundle it travels in (docs/PROTOCOL.md)
        stream = rec.encode_member(manifest, canonical)
        self._intake.setdefault((req.client, req.channel), []).append(
            {
                "item": object_id.hex(),
                "name": name,
                "schema": schema,
                "seq": seq,
                "sha256": sha.hex(),
                "size": len(canonical),
                "submission": req.submission_id,
            }
        )
        return Sealed(object_id, stream, name, len(canonical), sha)

    def _record_intake(self) -> dict[tuple[str, str], int]:
        """The batch's intake.accepted records, one per client and channel (docs/AUDIT.md
        §2). Called inside the spool transaction: raising rolls it back. The index of each
        by (client, channel); the last is kept as ``_batch_idx`` (or -1)."""
        out: dict[tuple[str, str], int] = {}
        if self.audit is not None:
            for (client, channel), entries in self._intake.items():
                out[client, channel] = self.audit.record_items(
                    "intake.accepted",
                    subject=self._client_subject(client),
                    shared={"channel": channel, "kind": "message", "media_type": MESSAGE_TYPE},
                    entries=entries,
                )
        self._intake.clear()
        self._batch_idx = max(out.values(), default=-1)
        return out

    # ---------------------------------------------------------------- status
    def _status(self, identity: bytes, client: ApiClient, body: dict[str, Any]) -> None:
        sid = self._submission_id(body)
        st = self.spool.submission(client.name, sid)
        if st is None:
            self._send(identity, _reply(b"STATUS", {"id": sid, "state": "unknown"}))
            return
        self._send(
            identity,
            _reply(
                b"STATUS",
                {
                    "id": sid,
                    "state": st.state,
                    "item": st.object_id.hex(),
                    "channel": st.channel,
                    "seq": st.seq,
                    "sends": st.sends_done,
                    "sends_planned": st.sends_total,
                    "repeated": max(0, st.sends_done - 1),
                    # finished with copies not sent: past their deadline (Spool.expire_repeats)
                    "expired": st.state == "sent" and st.sends_done < st.sends_total,
                    "accepted_us": st.created_us,
                    "last_sent_us": st.sent_us,
                },
            ),
        )

    # --------------------------------------------------------------- uploads
    def _upload_begin(self, identity: bytes, client: ApiClient, body: dict[str, Any]) -> None:
        sid = self._submission_id(body)
        ch = self._channel(client, body, "files")
        name, size, sha = body.get("name"), body.get("size"), body.get("sha256")
        if not isinstance(name, str) or not 0 < len(name.encode()) <= rec.MAX_NAME_BYTES:
            raise Refused("BAD_REQUEST", "'name' must be a non-empty string of at most 1 KiB")
        if type(size) is not int or size < 0:
            raise Refused("BAD_REQUEST", "'size' must be a non-negative integer")
        if not isinstance(sha, bytes) or len(sha) != 32:
            raise Refused("BAD_REQUEST", "'sha256' must be 32 bytes")
        if (client.name, sid) in self._batch_sids:  # (a SUBMIT of this id, being committed)
            raise Busy(BUSY_RETRY_AFTER, "a submission with this id is being committed")
        self._admit_or_answer(client, sid, sha)
        if size > ch.max_size:
            raise Refused("TOO_LARGE", f"{size} bytes; {ch.name} takes at most {ch.max_size}")
        self._answer_earlier(client, sid, sha)  # (a message's hash never equals a file's)
        for other in [u for u in self._uploads.values() if u.client == client.name]:
            if other.submission_id != sid:
                continue
            if other.finishing:  # its answer comes soon; then a resubmit gets the same
                raise Busy(BUSY_RETRY_AFTER, "this submission is being checked")
            self._drop_upload(other)  # begun again (the client restarted): the new one counts
        mine = [u for u in self._uploads.values() if u.client == client.name]
        if len(mine) >= MAX_UPLOADS_PER_CLIENT:
            raise Busy(BUSY_RETRY_AFTER, "too many uploads in progress")
        token = os.urandom(12).hex()
        path = self._upload_dir / f"{token}.part"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        up = _Upload(token, client.name, sid, ch, name, size, sha, path, fd, identity)
        self._uploads[token] = up
        self._send(
            identity,
            _reply(
                b"CREDIT",
                {
                    "id": sid,
                    "upload": token,
                    "offset": 0,
                    "chunk_size": self.params.chunk_size,
                    "credit": self.params.upload_window,
                    **_attempt(body),
                },
            ),
        )
        if size == 0:
            self._upload_finish(up)

    def _upload_chunk(
        self, identity: bytes, client: ApiClient, body: dict[str, Any], data: bytes
    ) -> None:
        token = body.get("upload")
        up = self._uploads.get(token) if isinstance(token, str) else None
        if up is None or up.client != client.name:
            raise Refused("UNKNOWN_UPLOAD", "no such upload in progress (expired or finished)")
        if up.finishing:
            raise Refused("BAD_OFFSET", f"every byte of this upload is in ({up.size})")
        offset = body.get("offset")
        if offset != up.received:
            raise Refused("BAD_OFFSET", f"expected offset {up.received}, got {offset!r}")
        if len(data) > self.params.chunk_size or up.received + len(data) > up.size:
            self._drop_upload(up)
            raise Refused("TOO_LARGE", "chunk beyond the announced size; upload cancelled")
        if not data:
            raise Refused("BAD_REQUEST", "empty chunk")
        view = memoryview(data)
        while view:  # (a short write is not the end: every byte, or an error)
            view = view[os.write(up.fd, view) :]
        up.digest.update(data)
        up.received += len(data)
        up.last = time.monotonic()
        up.identity = identity
        if up.received < up.size:
            self._send(
                identity,
                _reply(
                    b"CREDIT",
                    {"id": up.submission_id, "upload": token, "offset": up.received, "credit": 1},
                ),
            )
            return
        self._upload_finish(up)

    def _upload_finish(self, up: _Upload) -> None:
        """Every byte is in: hand the upload to the finisher thread (the answer follows)."""
        if up.digest.digest() != up.sha256:
            self._drop_upload(up)
            raise Refused("HASH_MISMATCH", "SHA-256 of the uploaded bytes differs")
        up.finishing = True
        self._finish_queue.put(up)

    def _finish_loop(self) -> None:
        """The finisher thread: check, spool and record each complete upload in turn."""
        wake = self.ctx.socket(zmq.PUSH)
        wake.connect(self._wake_endpoint)
        try:
            while (up := self._finish_queue.get()) is not None:
                try:
                    frames, outcome = self._finish(up)
                except Exception as exc:  # noqa: BLE001  # fail closed for this upload only
                    _log.exception("upload_finish_failed", id=up.submission_id)
                    frames = _reply(
                        b"REJECTED",
                        {"id": up.submission_id, "code": "INTERNAL", "message": str(exc)},
                    )
                    outcome = "failed"
                self._finished.put((up, frames, outcome))
                with contextlib.suppress(zmq.ZMQError):
                    wake.send(b"", zmq.NOBLOCK)
        finally:
            wake.close(linger=0)

    def _finish(self, up: _Upload) -> tuple[list[bytes], str]:
        """Check and spool one complete upload; return the answer and what it was
        (``accepted``, ``rejected``, ``busy``, ``failed``: the upload is then dropped)."""
        from outside import intake  # noqa: PLC0415  # (import cycle)

        sid = up.submission_id
        content = up.path
        recorded: list[int] = []

        def record(item: SpoolItem, sha: str, media: str) -> int:
            recorded.append(self._record_upload(up, item, sha, media, verdict))
            return recorded[-1]

        verdict: Verdict | None = None
        try:
            os.fsync(up.fd)
            os.close(up.fd)
            up.fd = -1
            content, verdict = self._check_content(up)  # the same pipeline as the folders'
            item = intake.spool_file_item(
                self.spool,
                self.key,
                up.channel,
                content,
                name=verdict.name if verdict is not None else up.name,
                subject=f"api:{up.client}",
                submission=(up.client, sid, up.sha256),
                record=record,
                report=intake.summary(up.channel, verdict),
                media_type=intake.media_type_of(verdict),
            )
            idx = recorded[-1] if recorded else -1
            self.on_items([replace(item, audit_idx=idx)])  # sent once the record is durable
            if idx >= 0 and self.audit is not None:
                self.audit.log.wait_durable(idx)  # ACCEPTED only once it is on disk
        except AuditUnavailable as exc:  # (spooled already? a resubmit gets the same item)
            if content != up.path:
                content.unlink(missing_ok=True)
            _log.error("upload_held_audit_unavailable", id=sid, error=str(exc))
            return _reply(b"BUSY", {"id": sid, "retry_after": AUDIT_RETRY_AFTER}), "busy"
        except Refused as exc:
            return _reply(b"REJECTED", self._rejection(sid, exc)), "rejected"
        except (OSError, FerryError) as exc:
            if content != up.path:
                content.unlink(missing_ok=True)
            _log.exception("upload_spool_failed", id=sid)
            return _reply(
                b"REJECTED", {"id": sid, "code": "INTERNAL", "message": str(exc)}
            ), "failed"
        return _accepted(sid, item.object_id, item.channel, item.seq, False), "accepted"

    def _answer_finished(self) -> None:
        """On the API thread: send the finisher's answers and forget those uploads."""
        while True:
            try:
                up, frames, outcome = self._finished.get_nowait()
            except queue.Empty:
                return
            self._drop_upload(up)
            if outcome == "accepted":
                self.accepted += 1
            elif outcome == "busy":
                self.busy += 1
            else:
                self.rejected += 1
            self._send(up.identity, frames)

    def _check_content(self, up: _Upload) -> tuple[Path, Verdict | None]:
        """The channel's content policy on an upload; a refusal becomes REJECTED (and is
        recorded), any failure of the pipeline FILTER_ERROR: nothing unchecked is spooled."""
        from outside import intake  # noqa: PLC0415  # (import cycle)

        try:
            return intake.check_content(
                self.pipeline, self.audit, up.channel, up.path, up.name, workdir=self._content_dir
            )
        except intake.ContentRefused as exc:
            code, message = exc.reason_code, str(exc).removeprefix(f"{exc.reason_code}: ")
        except Exception as exc:  # noqa: BLE001  # fail closed
            _log.exception("upload_filter_error", id=up.submission_id)
            code, message = "FILTER_ERROR", f"a content check failed: {exc}"
        self._note(
            "intake.rejected",
            subject=self._client_subject(up.client),
            result="rejected",
            reason=f"{code}: {message}"[:1024],
            obj=AuditObject(kind="file", channel=up.channel.name, name=up.name[:1024]),
            detail={"reason_code": code, "submission": up.submission_id},
        )
        raise Refused(code, message)

    def _record_upload(
        self,
        up: _Upload,
        item: SpoolItem,
        sha256: str,
        media_type: str,
        verdict: Verdict | None,
    ) -> int:
        """The upload's intake.accepted record (on the finisher thread); its index, or -1."""
        from outside import intake  # noqa: PLC0415  # (import cycle)

        if self.audit is None:
            return -1
        if verdict is not None:
            intake.record_verdict(self.audit, up.channel, up.name, verdict, item)
        return self.audit.record(
            "intake.accepted",
            subject=self._client_subject(up.client),
            obj=AuditObject(
                kind="file",
                item=item.object_id.hex(),
                channel=item.channel,
                name=up.name,
                size=item.size,
                sha256=sha256,
                seq=item.seq,
                media_type=media_type,
            ),
            detail={"submission": up.submission_id},
            corr=item.object_id.hex(),
        )

    def _drop_upload(self, up: _Upload) -> None:
        self._uploads.pop(up.token, None)
        if up.fd >= 0:
            os.close(up.fd)
            up.fd = -1
        up.path.unlink(missing_ok=True)

    def _expire_uploads(self) -> None:
        now = time.monotonic()
        for up in [
            u
            for u in self._uploads.values()
            if now - u.last > UPLOAD_IDLE_TIMEOUT and not u.finishing
        ]:
            _log.warning("upload_expired", id=up.submission_id, client=up.client)
            self._drop_upload(up)
