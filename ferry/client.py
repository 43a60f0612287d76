"""Python client of ferry's outer API (ZeroMQ DEALER with CURVE).

    from ferry.client import Client
    with Client.from_config("portal.yaml") as c:
        ack = c.submit("messages", json_bytes, schema="citizen-application")
        print(ack.item, ack.seq)

Every submission carries a submission id (a fresh UUID unless given): sending
the same id again after a timeout is safe, the gateway answers with the same
item. ``ACCEPTED`` arrives only once the item is durably spooled. ``BUSY``
(backpressure or rate limit) is retried after the server's ``retry_after``
until the call's timeout. Files larger than a message go by :meth:`upload`,
in chunks the server grants credit for, so memory stays bounded on both ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import zmq
from zmq.utils import monitor

from ferry import log
from ferry.config import ClientConfig, load_client_config
from ferry.crypto.keys import load_public_key, load_secret_key
from ferry.errors import ChannelError, ConfigError, FerryError, PolicyRejection, UsageError
from ferry.zmqsec import curve_client

PROTOCOL = b"FERRY/1"
# What the outside takes as a submission id (outside/api.py): 1-128 printable ASCII
# characters, no space. It answers a longer one with an empty id, which no client can match.
SUBMISSION_ID = re.compile(r"[\x21-\x7e]{1,128}")
# Rejections of an upload's chunks that mean the outside no longer knows the upload (it
# restarted, or dropped the upload as idle): the upload begins again, once.
RESTART_UPLOAD = frozenset({"UNKNOWN_UPLOAD", "BAD_OFFSET"})
# What answers each request (others for its id are left from a request sent twice).
SUBMIT_ANSWERS = frozenset({b"ACCEPTED", b"REJECTED", b"BUSY"})
STATUS_ANSWERS = frozenset({b"STATUS", b"REJECTED"})
UPLOAD_ANSWERS = frozenset({b"CREDIT", b"ACCEPTED", b"REJECTED", b"BUSY"})
# A request whose connection dropped before its answer is sent again (the submission id
# makes that safe); one that drops it this many times is given up: the gateway closes the
# connection of a frame over its size limit, so that is the likeliest cause.
DROPS_PER_REQUEST = 2

_log = log.get("ferry.client")


class ApiError(FerryError):
    """A submission did not go through. ``submission_id`` is the id it was sent with (set by
    :meth:`Client.submit` and :meth:`Client.upload`, generated ids included): sending again
    with that id is safe, the gateway answers with the item it made the first time, if any."""

    submission_id: str | None = None


class _Dropped(Exception):
    """The connection to the gateway dropped while an answer was awaited: what was sent
    and not answered is lost, and is to be sent again."""


class ApiRejected(PolicyRejection, ApiError):
    """The gateway refused the submission (exit code 9); ``path`` is the JSON path if any."""

    def __init__(self, code: str, message: str, path: str | None = None) -> None:
        super().__init__(code, message + (f" (at {path})" if path else ""))
        self.message = message
        self.path = path


class ApiUnavailable(ChannelError, ApiError):
    """No answer in time (``code`` NO_ANSWER), the key was refused (KEY_REFUSED), or the
    gateway closed the connection each time the request was sent (CONNECTION_DROPPED: a
    message over its size limit, or a restarting outside); exit code 11."""

    def __init__(self, message: str, code: str = "NO_ANSWER") -> None:
        super().__init__(message)
        self.code = code


class ApiBusy(ApiUnavailable):
    """The gateway stayed busy (backpressure or rate limit) until the call's timeout: nothing
    was stored. ``retry_after`` is the server's last advice, in seconds (exit code 13)."""

    exit_code = 13

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message, "BUSY")
        self.retry_after = retry_after


@contextlib.contextmanager
def _naming(sid: str) -> Iterator[None]:
    """Every ApiError raised inside carries the submission id (see ApiError)."""
    try:
        yield
    except ApiError as exc:
        exc.submission_id = sid
        raise


def check_submission_id(sid: str) -> str:
    """``sid`` if the outside takes it as a submission id, else UsageError."""
    if not SUBMISSION_ID.fullmatch(sid):
        raise UsageError(
            f"submission id {sid[:40]!r}{'...' if len(sid) > 40 else ''}: an id is 1 to 128 "
            "printable ASCII characters, without spaces"
        )
    return sid


def _check_role(cfg: ClientConfig, role: str, what: str) -> None:
    if cfg.role != role:
        raise ConfigError(
            f"{cfg.source}: role {cfg.role}, but {what} needs a config with role {role} "
            "(ferry init writes clients/portal.yaml for the API, clients/inner-app.yaml for "
            "a consumer)"
        )


@dataclass(frozen=True)
class Ack:
    id: str
    item: str
    channel: str
    seq: int
    duplicate: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": "ACCEPTED",
            "id": self.id,
            "item": self.item,
            "channel": self.channel,
            "seq": self.seq,
            "duplicate": self.duplicate,
        }


class Client:
    def __init__(self, cfg: ClientConfig) -> None:
        _check_role(cfg, "api-client", "an API client")
        self.cfg = cfg
        self._waiting = cfg.timeout  # (seconds of the current call's wait, for its error)
        key = load_secret_key(cfg.client_key, ("x25519",))
        server = load_public_key(cfg.server_public_key, cfg.source.parent)
        self._ctx: zmq.Context[Any] = zmq.Context()
        self.sock = curve_client(self._ctx, zmq.DEALER, key, server)
        self._mon = self.sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
        )
        self._up = False  # a connection whose handshake succeeded is open
        self.sock.connect(cfg.endpoint)
        self._poller = zmq.Poller()
        self._poller.register(self.sock, zmq.POLLIN)
        self._poller.register(self._mon, zmq.POLLIN)
        self._early: dict[str, tuple[bytes, dict[str, Any]]] = {}

    @classmethod
    def from_config(cls, path: str | Path) -> Client:
        return cls(load_client_config(Path(path)))

    def close(self) -> None:
        self.sock.disable_monitor()
        self._mon.close(0)
        self.sock.close(0)
        self._ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # ------------------------------------------------------------ plumbing
    def _send(self, verb: bytes, body: dict[str, Any], data: bytes | None = None) -> None:
        frames = [PROTOCOL, verb, msgpack.packb(body, use_bin_type=True)]
        if data is not None:
            frames.append(data)
        self.sock.send_multipart(frames)

    def _on_event(self, event: Mapping[str, Any]) -> bool:
        """Follow the connection's state; True if a connection that was up dropped (what
        it carried unanswered is lost). A handshake that fails (a wrong server key) drops
        connections that were never up: those are not drops of a request."""
        kind = event["event"]
        if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            raise ApiUnavailable(
                f"{self.cfg.endpoint}: the gateway refused this client key "
                "(not allow-listed, expired or revoked)",
                "KEY_REFUSED",
            )
        if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._up = True
        elif kind == zmq.EVENT_DISCONNECTED:
            was_up, self._up = self._up, False
            return was_up
        return False

    def _begin(self, sid: str) -> None:
        """Before a call's first request: take the connection events that came while no
        call was waiting (a drop then lost nothing of this call's), and forget answers
        for ``sid`` left from an earlier call (a request sent twice is answered twice)."""
        while self._mon.poll(0):
            self._on_event(monitor.recv_monitor_message(self._mon))
        if sid:
            self._early.pop(sid, None)

    def _recv(self, deadline: float) -> tuple[bytes, dict[str, Any]]:
        while (left := deadline - time.monotonic()) > 0:
            events = dict(self._poller.poll(max(1, int(left * 1000))))
            if self._mon in events and self._on_event(monitor.recv_monitor_message(self._mon)):
                raise _Dropped
            if self.sock in events:
                frames = self.sock.recv_multipart()
                if len(frames) != 3 or frames[0] != PROTOCOL:
                    continue
                body = msgpack.unpackb(frames[2], raw=False)
                if isinstance(body, dict):
                    return frames[1], body
        raise ApiUnavailable(
            f"no answer from {self.cfg.endpoint} within {self._waiting:g} s: is the outside "
            "agent running there, and is server_public_key its key?"
        )

    def _wait_for(
        self, sid: str, deadline: float, verbs: frozenset[bytes]
    ) -> tuple[bytes, dict[str, Any]]:
        """The next answer for ``sid`` of one of ``verbs`` (others are answers to an earlier
        request of this id, sent twice: passed over)."""
        early = self._early.pop(sid, None)
        if early is not None and early[0] in verbs:
            return early
        while True:
            verb, body = self._recv(deadline)
            if body.get("id") == sid:
                if verb in verbs:
                    return verb, body
                continue
            if len(self._early) < 100_000:
                self._early[str(body.get("id"))] = (verb, body)

    @staticmethod
    def _result(verb: bytes, body: dict[str, Any]) -> Ack:
        if verb == b"ACCEPTED":
            return Ack(body["id"], body["item"], body["channel"], body["seq"], body["duplicate"])
        if verb == b"REJECTED":
            raise ApiRejected(body.get("code", "?"), body.get("message", ""), body.get("path"))
        raise ApiError(f"unexpected reply {verb[:32]!r}")

    def _timeout(self, timeout: float | None) -> float:
        self._waiting = self.cfg.timeout if timeout is None else timeout
        return time.monotonic() + self._waiting

    # ----------------------------------------------------------------- API
    def submit(
        self,
        channel: str,
        data: bytes,
        *,
        schema: str | None = None,
        submission_id: str | None = None,
        timeout: float | None = None,
    ) -> Ack:
        """Submit one JSON message; return the acknowledgement or raise an ApiError (its
        ``submission_id`` says what to send again with)."""
        sid = new_submission_id() if submission_id is None else check_submission_id(submission_id)
        body: dict[str, Any] = {"id": sid, "channel": channel}
        if schema is not None:
            body["schema"] = schema
        deadline = self._timeout(timeout)
        drops = 0
        with _naming(sid):
            self._begin(sid)
            while True:
                self._send(b"SUBMIT", body, data)
                try:
                    verb, reply = self._wait_for(sid, deadline, SUBMIT_ANSWERS)
                except _Dropped:
                    drops += 1
                    if drops >= DROPS_PER_REQUEST:
                        raise self._dropped_error(len(data)) from None
                    _log.info("submission_sent_again", id=sid, reason="connection dropped")
                    continue
                if verb != b"BUSY":
                    return self._result(verb, reply)
                self._pause(reply, deadline, "gateway busy")

    def _dropped_error(self, size: int | None = None) -> ApiUnavailable:
        """CONNECTION_DROPPED: each try of a request lost its connection (``size``: of a
        message, which the gateway drops that way when it is over its size limit)."""
        if size is None:
            why = f"{self.cfg.endpoint} closed the connection twice; is the outside restarting?"
        else:
            why = (
                f"{self.cfg.endpoint} closed the connection each time this message ({size} "
                "bytes) was sent: the gateway does that with a message over its size limit "
                "(api.max_message_size, 1 MiB unless configured; larger content goes by "
                "upload), or it was restarting"
            )
        return ApiUnavailable(why, "CONNECTION_DROPPED")

    def submit_many(
        self,
        messages: Iterable[tuple[str, bytes, str | None]],
        *,
        window: int = 256,
        timeout: float | None = None,
    ) -> Iterator[tuple[str, Ack | ApiRejected]]:
        """Pipeline ``(channel, data, schema)`` submissions, ``window`` in flight.

        Yields ``(submission id, Ack or ApiRejected)`` as answers arrive; BUSY
        answers are resubmitted after their ``retry_after``.
        """
        pending: dict[str, dict[str, Any]] = {}
        payload: dict[str, bytes] = {}
        retry: list[tuple[float, str]] = []
        drops: dict[str, int] = {}
        source = iter(messages)
        exhausted = False
        deadline = self._timeout(timeout)
        self._begin("")
        while True:
            now = time.monotonic()
            for when, sid in [r for r in retry if r[0] <= now]:
                retry.remove((when, sid))
                if sid in pending:
                    self._send(b"SUBMIT", pending[sid], payload[sid])
            while not exhausted and len(pending) < window:
                try:
                    channel, data, schema = next(source)
                except StopIteration:
                    exhausted = True
                    break
                sid = str(uuid.uuid4())
                body: dict[str, Any] = {"id": sid, "channel": channel}
                if schema is not None:
                    body["schema"] = schema
                pending[sid], payload[sid] = body, data
                self._send(b"SUBMIT", body, data)
            if not pending:
                return
            wait_until = min([deadline, *(r[0] for r in retry)]) if retry else deadline
            if retry and len(retry) == len(pending):
                time.sleep(max(0.0, wait_until - time.monotonic()))
                continue
            try:
                verb, reply = self._recv(deadline)
            except _Dropped:  # what was in flight is lost: sent again, each at most once
                waiting = {sid for _, sid in retry}  # (not in flight: sent when their time comes)
                for sid in [sid for sid in pending if sid not in waiting]:
                    drops[sid] = drops.get(sid, 0) + 1
                    if drops[sid] >= DROPS_PER_REQUEST:
                        error = self._dropped_error(len(payload[sid]))
                        error.submission_id = sid
                        raise error from None
                    self._send(b"SUBMIT", pending[sid], payload[sid])
                continue
            sid = str(reply.get("id"))
            if sid not in pending or verb not in SUBMIT_ANSWERS:
                continue
            if verb == b"BUSY":
                if all(r[1] != sid for r in retry):  # (a request sent twice: two BUSY)
                    retry.append((time.monotonic() + float(reply.get("retry_after", 1.0)), sid))
                continue
            del pending[sid], payload[sid]
            retry = [r for r in retry if r[1] != sid]
            deadline = self._timeout(timeout)
            try:
                yield sid, self._result(verb, reply)
            except ApiRejected as exc:
                yield sid, exc

    def status(self, submission_id: str, *, timeout: float | None = None) -> dict[str, Any]:
        """Where a submission is: unknown, queued (accepted, not yet fully sent) or sent."""
        check_submission_id(submission_id)
        deadline = self._timeout(timeout)
        self._begin(submission_id)
        for attempt in range(DROPS_PER_REQUEST):
            self._send(b"STATUS", {"id": submission_id})
            try:
                verb, body = self._wait_for(submission_id, deadline, STATUS_ANSWERS)
                break
            except _Dropped:
                if attempt + 1 == DROPS_PER_REQUEST:
                    raise self._dropped_error() from None
        if verb != b"STATUS":
            self._result(verb, body)
        return body

    def _pause(self, reply: dict[str, Any], deadline: float, why: str) -> None:
        """Wait out a BUSY answer's ``retry_after``, or raise ApiBusy if that is past the
        deadline."""
        pause = float(reply.get("retry_after", 1.0))
        if time.monotonic() + pause > deadline:
            raise ApiBusy(f"{why}; try again in {pause:g} s", pause)
        time.sleep(pause)

    def upload(
        self,
        channel: str,
        path: str | Path,
        *,
        name: str | None = None,
        submission_id: str | None = None,
        timeout: float | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Ack:
        """Upload a file in chunks (credit-based flow control); memory stays bounded.

        An upload the outside no longer knows (it restarted meanwhile) begins again once.
        """
        path = Path(path)
        sid = new_submission_id() if submission_id is None else check_submission_id(submission_id)
        name = path.name if name is None else name
        try:
            name.encode()
        except UnicodeEncodeError:
            raise UsageError(
                f"{str(path)!r}: the file name is not UTF-8 text; give the upload a name "
                "(name=..., ferry send --name)"
            ) from None
        with _naming(sid):
            size, sha256 = _size_and_digest(path)
            body = {"id": sid, "channel": channel, "name": name, "size": size, "sha256": sha256}
            self._begin(sid)  # (after the hashing, which may take long)
            try:
                return self._upload(path, {**body, "attempt": 1}, timeout, progress)
            except ApiRejected as exc:
                if exc.reason_code not in RESTART_UPLOAD:
                    raise
                _log.info("upload_restarted", id=sid, code=exc.reason_code)
            except _Dropped:  # (chunks in flight were lost)
                _log.info("upload_restarted", id=sid, code="CONNECTION_DROPPED")
            try:
                return self._upload(path, {**body, "attempt": 2}, timeout, progress, stale=True)
            except _Dropped:
                raise self._dropped_error() from None

    def _upload(
        self,
        path: Path,
        body: dict[str, Any],
        timeout: float | None,
        progress: Callable[[int, int], None] | None,
        *,
        stale: bool = False,
    ) -> Ack:
        """One try of :meth:`upload`. ``stale``: answers to an earlier try may still come:
        refusals of its chunks (RESTART_UPLOAD), credit for its chunks, or its UPLOAD's
        credit (an outside of this version echoes the try's ``attempt``): passed over."""
        sid, size = body["id"], body["size"]
        attempt = body.get("attempt", 1)
        deadline = self._timeout(timeout)

        def earlier(verb: bytes, reply: dict[str, Any]) -> bool:
            if not stale:
                return False
            if verb == b"REJECTED":
                return reply.get("code") in RESTART_UPLOAD
            # (an outside that echoes no attempt: its first answer is taken as this try's)
            return verb == b"CREDIT" and reply.get("attempt", attempt) != attempt

        while True:
            self._send(b"UPLOAD", body)
            verb, reply = self._wait_for(sid, deadline, UPLOAD_ANSWERS)
            while earlier(verb, reply) or (verb == b"CREDIT" and "chunk_size" not in reply):
                verb, reply = self._wait_for(sid, deadline, UPLOAD_ANSWERS)
            if verb != b"BUSY":
                break
            self._pause(reply, deadline, "gateway busy; upload not started")
        if verb != b"CREDIT":
            return self._result(verb, reply)
        token, chunk_size, credit = reply["upload"], int(reply["chunk_size"]), int(reply["credit"])
        sent = 0
        with path.open("rb") as f:
            while True:
                while credit > 0 and sent < size:
                    data = f.read(min(chunk_size, size - sent))
                    if not data:
                        raise ApiError(f"{path}: file shrank during upload")
                    self._send(b"CHUNK", {"id": sid, "upload": token, "offset": sent}, data)
                    sent += len(data)
                    credit -= 1
                verb, reply = self._wait_for(sid, deadline, UPLOAD_ANSWERS)
                deadline = self._timeout(timeout)
                if (verb == b"CREDIT" and reply.get("upload") != token) or (
                    verb == b"REJECTED" and stale and reply.get("code") in RESTART_UPLOAD
                ):
                    continue  # (for an earlier try, or a chunk of one)
                if verb == b"CREDIT":
                    credit += int(reply["credit"])
                    if progress is not None:
                        progress(int(reply["offset"]), size)
                    continue
                return self._result(verb, reply)


def _size_and_digest(path: Path) -> tuple[int, bytes]:
    """A file's size and SHA-256, read once (its size as read: a pipe has none before)."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.digest()


@dataclass(frozen=True)
class Delivery:
    """A message handed to an inner consumer; acknowledge its ``item`` when processed."""

    item: str
    channel: str
    seq: int
    schema: str
    subject: str
    created_us: int
    body: bytes


ACK_PIECE = 1_000  # item ids per ACK (see Consumer.ack)


class Consumer:
    """Inner consumer of ferry's messages (DEALER with CURVE to the inside agent).

    Delivery is at least once: a message not acknowledged in time is offered
    again, so use ``item`` to drop repeats. ``credit`` bounds how many
    unacknowledged messages this consumer holds.

    The inside knows a consumer by its connection only. When the connection is made
    again (the inside restarted, or the network dropped it), the consumer says READY
    once more, with the credit it has left, the next time :meth:`receive` runs; without
    that, a consumer that outlives a restart of the inside would wait for ever.

    A consumer whose key the inside refuses gets ApiUnavailable (KEY_REFUSED) from
    :meth:`receive` at each refused handshake, rather than nothing for ever.
    """

    def __init__(
        self, cfg: ClientConfig, *, channels: list[str] | None = None, credit: int = 256
    ) -> None:
        _check_role(cfg, "consumer", "a consumer")
        self.cfg = cfg
        key = load_secret_key(cfg.client_key, ("x25519",))
        server = load_public_key(cfg.server_public_key, cfg.source.parent)
        self._ctx: zmq.Context[Any] = zmq.Context()
        self.sock = curve_client(self._ctx, zmq.DEALER, key, server)
        self._monitor = self.sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
        )
        self._connections = 0
        self._channels = channels
        self._credit = credit  # what the consumer asked for in all, less what it holds:
        self._held: set[str] = set()  # (received, not yet acknowledged)
        self._early: list[Delivery] = []  # (read before a READY, not returned yet)
        self.reconnects = 0
        self._poller = zmq.Poller()
        self._poller.register(self.sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self.sock.connect(cfg.endpoint)
        self._ready(credit)  # (queued: sent once the first connection is made)

    def _ready(self, credit: int) -> None:
        body: dict[str, Any] = {"credit": credit}
        if self._channels is not None:
            body["channels"] = self._channels
        self.sock.send_multipart([PROTOCOL, b"READY", msgpack.packb(body)])

    def _check_connection(self) -> None:
        """Say READY again on each new connection after the first (see the class); raise
        ApiUnavailable if the inside refused the key."""
        while True:
            try:
                event = monitor.recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                raise ApiUnavailable(
                    f"{self.cfg.endpoint}: the inside refused this consumer key "
                    "(not allow-listed, expired or revoked)",
                    "KEY_REFUSED",
                )
            if event["event"] != zmq.EVENT_HANDSHAKE_SUCCEEDED:
                continue
            self._connections += 1
            if self._connections > 1:
                self.reconnects += 1
                # What the last connection delivered and is still in the socket is held as
                # well: counted before saying how much credit is left (else the consumer
                # would be given its credit again on top of those).
                early = self._read(1 << 30)
                self._held.update(d.item for d in early)
                self._early += early
                self._ready(max(0, self._credit - len(self._held)))

    @classmethod
    def from_config(cls, path: str | Path, **kw: Any) -> Consumer:
        return cls(load_client_config(Path(path)), **kw)

    def receive(self, timeout: float = 1.0, limit: int = 1024) -> list[Delivery]:
        """Messages that arrived, waiting up to ``timeout`` seconds for the first."""
        deadline = time.monotonic() + timeout
        while not self._early:
            ready = dict(self._poller.poll(max(0, int((deadline - time.monotonic()) * 1000))))
            if self._monitor in ready:
                self._check_connection()
            if self.sock in ready:
                break
            if time.monotonic() >= deadline:
                return []
        out, self._early = self._early[:limit], self._early[limit:]
        out += self._read(limit - len(out))
        self._held.update(d.item for d in out)
        return out

    def _read(self, limit: int) -> list[Delivery]:
        """Deliveries waiting in the socket, up to ``limit``, without waiting."""
        out: list[Delivery] = []
        while len(out) < limit:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if len(frames) != 4 or frames[0] != PROTOCOL or frames[1] != b"DELIVER":
                continue
            meta = msgpack.unpackb(frames[2], raw=False)
            out.append(
                Delivery(
                    meta["item"],
                    meta["channel"],
                    meta["seq"],
                    meta["schema"],
                    meta["subject"],
                    meta["created_us"],
                    frames[3],
                )
            )
        return out

    def ack(self, items: list[str], credit: int | None = None) -> None:
        """Acknowledge processed messages and grant as much new credit (by default)."""
        grant = len(items) if credit is None else credit
        self._held.difference_update(items)
        self._credit = max(0, self._credit + grant - len(items))
        # In pieces the inside takes (a request is at most 64 KiB: some 1,900 ids); the
        # credit goes with the last.
        pieces = [items[i : i + ACK_PIECE] for i in range(0, len(items), ACK_PIECE)] or [[]]
        for n, piece in enumerate(pieces, 1):
            body = {"items": piece, "credit": grant if n == len(pieces) else 0}
            self.sock.send_multipart([PROTOCOL, b"ACK", msgpack.packb(body)])

    def close(self) -> None:
        self.sock.disable_monitor()
        self._monitor.close(0)
        self.sock.close(0)
        self._ctx.term()

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def new_submission_id() -> str:
    return str(uuid.uuid4())


def read_input(path: str, limit: int | None = None) -> bytes:
    """A file's bytes, or stdin's for ``-``: at most ``limit + 1`` of them if a limit is
    given (more than ``limit`` means "too large", without holding all of it)."""
    if path == "-":
        import sys  # noqa: PLC0415

        return _read_up_to(sys.stdin.buffer, limit)
    with open(path, "rb") as f:
        return _read_up_to(f, limit)


def _read_up_to(f: Any, limit: int | None) -> bytes:
    """All of ``f``, or its first ``limit + 1`` bytes, read in pieces: memory grows with what
    there is, not with the limit asked for."""
    if limit is None:
        return bytes(f.read())
    out = bytearray()
    while len(out) <= limit and (piece := f.read(min(1 << 20, limit + 1 - len(out)))):
        out += piece
    return bytes(out)


__all__ = [
    "Ack",
    "ApiBusy",
    "ApiError",
    "ApiRejected",
    "ApiUnavailable",
    "Client",
    "Consumer",
    "Delivery",
    "check_submission_id",
    "new_submission_id",
    "read_input",
]
