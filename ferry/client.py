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

import hashlib
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import zmq
from zmq.utils import monitor

from ferry.config import ClientConfig, load_client_config
from ferry.crypto.keys import load_public_key, load_secret_key
from ferry.errors import ChannelError, FerryError, PolicyRejection
from ferry.zmqsec import curve_client

PROTOCOL = b"FERRY/1"


class ApiRejected(PolicyRejection):
    """The gateway refused the submission (exit code 9); ``path`` is the JSON path if any."""

    def __init__(self, code: str, message: str, path: str | None = None) -> None:
        super().__init__(code, message + (f" (at {path})" if path else ""))
        self.message = message
        self.path = path


class ApiUnavailable(ChannelError):
    """No answer in time, the key was refused, or the gateway stayed busy (exit code 11)."""


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
        self.cfg = cfg
        key = load_secret_key(cfg.client_key, ("x25519",))
        server = load_public_key(cfg.server_public_key, cfg.source.parent)
        self._ctx: zmq.Context[Any] = zmq.Context()
        self.sock = curve_client(self._ctx, zmq.DEALER, key, server)
        self._mon = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
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

    def _recv(self, deadline: float) -> tuple[bytes, dict[str, Any]]:
        while (left := deadline - time.monotonic()) > 0:
            events = dict(self._poller.poll(max(1, int(left * 1000))))
            if self._mon in events:
                event = monitor.recv_monitor_message(self._mon)
                if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    raise ApiUnavailable(
                        f"{self.cfg.endpoint}: the gateway refused this client key "
                        "(not allow-listed, expired or revoked)"
                    )
            if self.sock in events:
                frames = self.sock.recv_multipart()
                if len(frames) != 3 or frames[0] != PROTOCOL:
                    continue
                body = msgpack.unpackb(frames[2], raw=False)
                if isinstance(body, dict):
                    return frames[1], body
        raise ApiUnavailable(f"{self.cfg.endpoint}: no answer within the timeout")

    def _wait_for(self, sid: str, deadline: float) -> tuple[bytes, dict[str, Any]]:
        if sid in self._early:
            return self._early.pop(sid)
        while True:
            verb, body = self._recv(deadline)
            if body.get("id") == sid:
                return verb, body
            if len(self._early) < 100_000:
                self._early[str(body.get("id"))] = (verb, body)

    @staticmethod
    def _result(verb: bytes, body: dict[str, Any]) -> Ack:
        if verb == b"ACCEPTED":
            return Ack(body["id"], body["item"], body["channel"], body["seq"], body["duplicate"])
        if verb == b"REJECTED":
            raise ApiRejected(body.get("code", "?"), body.get("message", ""), body.get("path"))
        raise FerryError(f"unexpected reply {verb!r}")

    def _timeout(self, timeout: float | None) -> float:
        return time.monotonic() + (self.cfg.timeout if timeout is None else timeout)

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
        """Submit one JSON message; return the acknowledgement or raise ApiRejected."""
        sid = submission_id or str(uuid.uuid4())
        body: dict[str, Any] = {"id": sid, "channel": channel}
        if schema is not None:
            body["schema"] = schema
        deadline = self._timeout(timeout)
        while True:
            self._send(b"SUBMIT", body, data)
            verb, reply = self._wait_for(sid, deadline)
            if verb != b"BUSY":
                return self._result(verb, reply)
            pause = float(reply.get("retry_after", 1.0))
            if time.monotonic() + pause > deadline:
                raise ApiUnavailable(f"gateway busy; retry submission {sid} later")
            time.sleep(pause)

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
        source = iter(messages)
        exhausted = False
        deadline = self._timeout(timeout)
        while True:
            now = time.monotonic()
            for when, sid in [r for r in retry if r[0] <= now]:
                retry.remove((when, sid))
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
            verb, reply = self._recv(deadline)
            sid = str(reply.get("id"))
            if sid not in pending:
                continue
            if verb == b"BUSY":
                retry.append((time.monotonic() + float(reply.get("retry_after", 1.0)), sid))
                continue
            del pending[sid], payload[sid]
            deadline = self._timeout(timeout)
            try:
                yield sid, self._result(verb, reply)
            except ApiRejected as exc:
                yield sid, exc

    def status(self, submission_id: str, *, timeout: float | None = None) -> dict[str, Any]:
        """Where a submission is: unknown, queued (accepted, not yet fully sent) or sent."""
        self._send(b"STATUS", {"id": submission_id})
        verb, body = self._wait_for(submission_id, self._timeout(timeout))
        if verb != b"STATUS":
            self._result(verb, body)
        return body

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
        """Upload a file in chunks (credit-based flow control); memory stays bounded."""
        path = Path(path)
        sid = submission_id or str(uuid.uuid4())
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
            size = f.tell()
        body = {
            "id": sid,
            "channel": channel,
            "name": name or path.name,
            "size": size,
            "sha256": digest.digest(),
        }
        deadline = self._timeout(timeout)
        while True:
            self._send(b"UPLOAD", body)
            verb, reply = self._wait_for(sid, deadline)
            if verb != b"BUSY":
                break
            time.sleep(float(reply.get("retry_after", 1.0)))
            if time.monotonic() > deadline:
                raise ApiUnavailable("gateway busy; upload not started")
        if verb != b"CREDIT":
            return self._result(verb, reply)
        token, chunk_size, credit = reply["upload"], int(reply["chunk_size"]), int(reply["credit"])
        sent = 0
        with path.open("rb") as f:
            while True:
                while credit > 0 and sent < size:
                    data = f.read(min(chunk_size, size - sent))
                    if not data:
                        raise FerryError(f"{path}: file shrank during upload")
                    self._send(b"CHUNK", {"id": sid, "upload": token, "offset": sent}, data)
                    sent += len(data)
                    credit -= 1
                verb, reply = self._wait_for(sid, deadline)
                deadline = self._timeout(timeout)
                if verb == b"CREDIT":
                    credit += int(reply["credit"])
                    if progress is not None:
                        progress(int(reply["offset"]), size)
                    continue
                return self._result(verb, reply)


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
    """

    def __init__(
        self, cfg: ClientConfig, *, channels: list[str] | None = None, credit: int = 256
    ) -> None:
        self.cfg = cfg
        key = load_secret_key(cfg.client_key, ("x25519",))
        server = load_public_key(cfg.server_public_key, cfg.source.parent)
        self._ctx: zmq.Context[Any] = zmq.Context()
        self.sock = curve_client(self._ctx, zmq.DEALER, key, server)
        self._monitor = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
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
        """Say READY again on each new connection after the first (see the class)."""
        while True:
            try:
                event = monitor.recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
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


def read_input(path: str) -> bytes:
    """A file's bytes, or stdin's for ``-``."""
    if path == "-":
        import sys  # noqa: PLC0415

        return sys.stdin.buffer.read()
    with open(path, "rb") as f:
        return f.read()


__all__ = [
    "Ack",
    "ApiRejected",
    "ApiUnavailable",
    "Client",
    "Consumer",
    "Delivery",
    "new_submission_id",
    "read_input",
]
