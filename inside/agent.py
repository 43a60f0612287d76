"""The inside (high-side) agent: receive, verify, deliver. It never writes to the link.

``ferry inside run -c inside.yaml``. The transport's own thread drains the
link into memory; the main thread feeds the receiver machine and writes
decoded blocks into per-object spool files; a delivery thread verifies
completed objects and links them into their channel folders.
"""

from __future__ import annotations

import hashlib
import os
import queue
import sys
import threading
import time
from pathlib import Path

from ferry import log, selftest
from ferry.config_types import InsideConfig
from ferry.crypto.keys import load_public_key, load_secret_key
from ferry.errors import FerryError, PolicyRejection, WireError
from ferry.jsondoc import SchemaRegistry
from ferry.runtime import open_receiver
from ferry.status import write_status
from ferry.wire import records as rec
from ferry.wire.linkstate import LinkMonitor
from ferry.wire.receiver import (
    BlockDecoded,
    HeartbeatReceived,
    ObjectCompleted,
    ObjectLost,
    Receiver,
    SessionStarted,
)
from inside.consumers import ConsumerServer, Outbox, OutboxItem
from inside.deliver import Delivered, deliver, verify_stream, write_new_files
from inside.ledger import Ledger

# Objects whose whole stream fits in one FEC block this small stay in memory (messages).
MEMORY_OBJECT_MAX = 256 * 1024
DELIVERY_BATCH = 256

Job = tuple[bytes, int, bytes | None]

TICK_INTERVAL = 0.25
STATUS_INTERVAL = 0.5

_log = log.get("inside")


class _RateLimitedLog:
    """Log a recurring rejection the 1st, 2nd, 4th, 8th... time, with its running count."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def __call__(self, event: str, reason: str, **kw: object) -> None:
        n = self.counts.get(reason, 0) + 1
        self.counts[reason] = n
        if n & (n - 1) == 0:
            _log.warning(event, reason=reason, count=n, **kw)


class InsideAgent:
    def __init__(self, cfg: InsideConfig, stop: threading.Event) -> None:
        self.cfg = cfg
        self.stop = stop
        selftest.run()
        self.kem_key = load_secret_key(cfg.kem_key, ("mlkem768x25519", "x25519"))
        self.sender_key = load_public_key(cfg.outside_public_key, cfg.source.parent)
        if self.kem_key.alg != cfg.link.kem:
            raise FerryError(f"inside key is {self.kem_key.alg} but link.kem is {cfg.link.kem}")
        self.spool_dir = cfg.state_dir / "incoming"
        self.rejected_dir = cfg.state_dir / "rejected"
        for d in (self.spool_dir, self.rejected_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.folders = {
            ch.name: ch.deliver for ch in cfg.channels if ch.kind == "files" and ch.deliver
        }
        self.subfolders = {ch.name: ch.subfolders for ch in cfg.channels}
        self.msg_channels = {ch.name: ch for ch in cfg.channels if ch.kind == "messages"}
        for ch in cfg.channels:
            if ch.deliver is not None:
                ch.deliver.mkdir(parents=True, exist_ok=True)
        self.schemas = SchemaRegistry.load() if self.msg_channels else None
        for ch in self.msg_channels.values():
            for name in ch.schemas:
                if self.schemas is not None and name not in self.schemas.ids:
                    raise FerryError(f"channel {ch.name}: unknown message schema {name!r}")
        self.ledger = Ledger(cfg.state_dir)
        self.outbox: Outbox | None = None
        self.consumers: ConsumerServer | None = None
        if cfg.consumers.endpoint or cfg.consumers.publish:
            self.outbox = Outbox(self.ledger)
            self.consumers = ConsumerServer(cfg.consumers, self.outbox, stop)
        self._fds: dict[bytes, int] = {}
        self._mem: dict[bytes, bytes] = {}
        self._work: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._reject_log = _RateLimitedLog()
        self.delivered = 0
        self.delivered_bytes = 0
        self.rejected = 0
        self.lost = 0
        self.status_path = cfg.state_dir / "status.json"

    # ------------------------------------------------------------ recovery
    def _recover(self) -> None:
        for stale in self.spool_dir.glob("*.part"):
            stale.unlink()
        for oid, path, _name, sha in self.ledger.in_state("delivering"):
            ok = False
            if path and os.path.isfile(path) and sha is not None:
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                ok = h.digest() == sha
            if ok:
                self.ledger.record(oid, "delivered")
                _log.info("delivery_confirmed_after_restart", object_id=oid.hex(), path=path)
            else:
                self.ledger.record(oid, "lost", reason="interrupted delivery")
                _log.warning("delivery_interrupted", object_id=oid.hex())

    # ------------------------------------------------------------ delivery
    def _spool_path(self, oid: bytes) -> Path:
        return self.spool_dir / f"{oid.hex()}.part"

    def _spool_fd(self, oid: bytes) -> int:
        fd = self._fds.get(oid)
        if fd is None:
            path = self._spool_path(oid)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            self._fds[oid] = fd
        return fd

    def _delivery_loop(self) -> None:
        last = False
        while not last:
            first = self._work.get()
            if first is None:
                return
            jobs: list[Job] = [first]
            while len(jobs) < DELIVERY_BATCH:
                try:
                    job = self._work.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    last = True
                    break
                jobs.append(job)
            messages: list[tuple[bytes, rec.Manifest, bytes]] = []
            for oid, length, data in jobs:
                if data is None:
                    self._deliver_file(oid, length)
                    continue
                try:
                    manifest, content = verify_stream(data, oid, self.sender_key)
                except FerryError as exc:
                    self._reject(oid, str(exc), data)
                    continue
                if manifest.kind == "message":
                    messages.append((oid, manifest, content))
                else:  # a small file: through the file path
                    path = self._spool_path(oid)
                    with open(path, "wb") as f:
                        f.write(data)
                    self._deliver_file(oid, length)
            if messages:
                try:
                    self._deliver_messages(messages)
                except Exception as exc:  # noqa: BLE001  # keep the agent delivering
                    _log.exception("message_delivery_failed", count=len(messages))
                    for oid, _, content in messages:  # kept in rejected/, never dropped
                        if self.ledger.state_of(oid) != "delivered":
                            self._reject(oid, f"delivery failed: {exc}", content)

    def _reject(self, oid: bytes, reason: str, data: bytes | None = None) -> None:
        self.rejected += 1
        target = self.rejected_dir / f"{oid.hex()}.obj"
        path = self._spool_path(oid)
        if data is not None:
            with open(target, "wb") as f:
                f.write(data)
        elif path.exists():
            os.replace(path, target)
        self.ledger.record(oid, "rejected", reason=reason)
        _log.error("object_rejected", object_id=oid.hex(), reason=reason, kept=str(target))

    def _deliver_file(self, oid: bytes, length: int) -> None:
        path = self._spool_path(oid)
        try:
            result = deliver(
                path,
                oid,
                length,
                sender=self.sender_key,
                folders=self.folders,
                ledger=self.ledger,
                subfolders=self.subfolders,
            )
        except (FerryError, OSError) as exc:
            self._reject(oid, str(exc))
            return
        if isinstance(result, Delivered):
            self.delivered += 1
            self.delivered_bytes += result.manifest.size
            _log.info(
                "delivered",
                object_id=oid.hex(),
                channel=result.manifest.channel,
                seq=result.manifest.seq,
                name=result.manifest.name,
                path=str(result.path),
                size=result.manifest.size,
                sha256=result.manifest.sha256.hex(),
            )
        else:
            _log.info("duplicate_ignored", object_id=oid.hex())

    def _check_message(self, manifest: rec.Manifest, content: bytes) -> None:
        """The inside's own checks of a message: channel, schema, strict JSON, canonical."""
        ch = self.msg_channels.get(manifest.channel)
        if ch is None or self.schemas is None:
            raise FerryError(f"channel {manifest.channel!r} takes no messages on this inside")
        if manifest.schema not in ch.schemas:
            raise FerryError(f"schema {manifest.schema!r} is not accepted on {ch.name}")
        _, canonical = self.schemas.check(manifest.schema, content)
        if canonical != content:
            raise FerryError("message is not in canonical form")

    def _deliver_messages(self, batch: list[tuple[bytes, rec.Manifest, bytes]]) -> None:
        """Check, then deliver a batch with one flush and one ledger transaction.

        Folder files are written first (idempotently: a file already holding
        the same content is not written twice), then one transaction records
        every message delivered and queues it for consumers.
        """
        ok: list[tuple[bytes, rec.Manifest, bytes]] = []
        seen: set[bytes] = set()
        for oid, manifest, content in batch:
            if oid in seen or self.ledger.state_of(oid) in {"delivered", "rejected"}:
                continue  # a repeat
            seen.add(oid)
            try:
                self._check_message(manifest, content)
            except (FerryError, PolicyRejection) as exc:
                self._reject(oid, f"message re-check failed: {exc}", content)
                continue
            ok.append((oid, manifest, content))
        if not ok:
            return
        paths: dict[bytes, Path] = {}
        by_folder: dict[Path, list[tuple[bytes, rec.Manifest, bytes]]] = {}
        for item in ok:
            folder = self.msg_channels[item[1].channel].deliver
            if folder is not None:
                by_folder.setdefault(folder, []).append(item)
        for folder, items in by_folder.items():
            written = write_new_files(folder, [(m.name, c, m.sha256) for _, m, c in items])
            paths.update((oid, p) for (oid, _, _), p in zip(items, written, strict=True))
        queued = [
            OutboxItem(oid, m.channel, m.seq, m.schema, m.subject, m.created_us, c)
            for oid, m, c in ok
            if self.msg_channels[m.channel].consumers and self.outbox is not None
        ]
        self.ledger.record_many(
            [
                {
                    "object_id": oid,
                    "state": "delivered",
                    "channel": m.channel,
                    "seq": m.seq,
                    "name": m.name,
                    "path": str(paths[oid]) if oid in paths else None,
                    "size": m.size,
                    "sha256": m.sha256,
                }
                for oid, m, _ in ok
            ],
            also=(lambda db: Outbox.insert(db, queued)) if queued else None,
        )
        for oid, m, _ in ok:
            _log.info(
                "delivered",
                object_id=oid.hex(),
                channel=m.channel,
                seq=m.seq,
                schema=m.schema,
                subject=m.subject,
                path=str(paths[oid]) if oid in paths else None,
                size=m.size,
                sha256=m.sha256.hex(),
            )
        self.delivered += len(ok)
        self.delivered_bytes += sum(m.size for _, m, _ in ok)
        if self.consumers is not None and queued:
            self.consumers.notify(queued)

    # ---------------------------------------------------------------- main
    def run(self) -> int:
        cfg = self.cfg
        self._recover()
        machine = Receiver(
            cfg.link,
            self.sender_key,
            self.kem_key,
            replay_floor=self.ledger.replay_floor(self.sender_key.key_id),
            max_object_size=cfg.max_object_size,
            object_timeout=cfg.object_timeout,
        )
        for oid in self.ledger.finished_ids(50_000):
            machine.mark_finished(oid)
        monitor = LinkMonitor(
            cfg.link.digest(),
            degraded_after=cfg.degraded_after,
            down_after=cfg.down_after,
            max_clock_skew=cfg.max_clock_skew,
        )
        channel = open_receiver(cfg)
        sys.setswitchinterval(0.0005)  # several threads hand work along: keep hand-offs short
        if self.consumers is not None:
            self.consumers.start()
        worker = threading.Thread(target=self._delivery_loop, name="deliver", daemon=True)
        worker.start()
        _log.info(
            "inside_started",
            transport=cfg.link.transport,
            kem_key=self.kem_key.public.key_id.hex(),
            trusted_sender=self.sender_key.key_id.hex(),
            link_state=monitor.state.value,
        )
        next_tick = next_status = 0.0
        try:
            while not self.stop.is_set():
                batch = channel.recv_batch(0.05)
                now = time.time()
                for datagram in batch:
                    try:
                        machine.receive_datagram(datagram, now)
                    except WireError as exc:
                        self._reject_log("packet_rejected", str(exc), kind=type(exc).__name__)
                    self._handle(machine, monitor, now)
                mono = time.monotonic()
                if mono >= next_tick:
                    next_tick = mono + TICK_INTERVAL
                    machine.tick(now)
                    self._handle(machine, monitor, now)
                    for ev in monitor.tick(now):
                        _log.warning("link_" + ev.kind, message=ev.message, state=ev.state.value)
                if mono >= next_status:
                    next_status = mono + STATUS_INTERVAL
                    st = machine.stats
                    write_status(
                        self.status_path,
                        {
                            "role": "inside",
                            "pid": os.getpid(),
                            "link_state": monitor.state.value,
                            "datagrams": st.datagrams,
                            "symbols": st.symbols,
                            "blocks_decoded": st.blocks_decoded,
                            "blocks_recovered": st.blocks_recovered,
                            "objects_completed": st.objects_completed,
                            "objects_lost": self.lost,
                            "delivered": self.delivered,
                            "delivered_bytes": self.delivered_bytes,
                            "rejected": self.rejected,
                            "rejections": dict(self._reject_log.counts),
                            "active_objects": machine.active_objects,
                            "framing_errors": channel.stats.framing_errors,
                            "overflow_drops": channel.stats.overflow_drops,
                            "heartbeats_missed": monitor.heartbeats_missed,
                        },
                    )
        finally:
            self._work.put(None)
            worker.join(timeout=30)
            if self.consumers is not None:
                self.consumers.close()
            if self.outbox is not None:
                self.outbox.close()
            channel.close()
            for fd in self._fds.values():
                os.close(fd)
            self.ledger.close()
            _log.info(
                "inside_stopped", delivered=self.delivered, rejected=self.rejected, lost=self.lost
            )
        return 0

    def _handle(self, machine: Receiver, monitor: LinkMonitor, now: float) -> None:
        for ev in machine.pop_events():
            if isinstance(ev, BlockDecoded):
                if ev.offset == 0 and len(ev.data) == ev.object_length <= MEMORY_OBJECT_MAX:
                    self._mem[ev.object_id] = ev.data  # the whole object (a message)
                else:
                    os.pwrite(self._spool_fd(ev.object_id), ev.data, ev.offset)
            elif isinstance(ev, ObjectCompleted):
                # (an empty object's only block still went through BlockDecoded)
                data = self._mem.pop(ev.object_id, None)
                if data is None:
                    os.close(self._spool_fd(ev.object_id))
                    del self._fds[ev.object_id]
                self._work.put((ev.object_id, ev.length, data))
            elif isinstance(ev, ObjectLost):
                self.lost += 1
                self._mem.pop(ev.object_id, None)
                fd = self._fds.pop(ev.object_id, None)
                if fd is not None:
                    os.close(fd)
                self._spool_path(ev.object_id).unlink(missing_ok=True)
                self.ledger.record(ev.object_id, "lost", reason=ev.reason)
                _log.error(
                    "object_lost",
                    object_id=ev.object_id.hex(),
                    reason=ev.reason,
                    blocks_done=ev.blocks_done,
                    blocks_total=ev.blocks_total,
                )
            elif isinstance(ev, SessionStarted):
                self.ledger.set_replay_floor(self.sender_key.key_id, ev.epoch, ev.counter)
                _log.info(
                    "session_started",
                    epoch=ev.epoch,
                    counter=ev.counter,
                    session_id=ev.session_id.hex(),
                )
            elif isinstance(ev, HeartbeatReceived):
                for lev in monitor.on_heartbeat(ev.heartbeat, now):
                    level = "info" if lev.kind == "state" else "warning"
                    getattr(_log, level)(
                        "link_" + lev.kind, message=lev.message, state=lev.state.value, **lev.detail
                    )
