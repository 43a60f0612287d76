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
import threading
import time
from pathlib import Path

from ferry import log, selftest
from ferry.config_types import InsideConfig
from ferry.crypto.keys import load_public_key, load_secret_key
from ferry.errors import FerryError, WireError
from ferry.runtime import open_receiver
from ferry.status import write_status
from ferry.wire.linkstate import LinkMonitor
from ferry.wire.receiver import (
    BlockDecoded,
    HeartbeatReceived,
    ObjectCompleted,
    ObjectLost,
    Receiver,
    SessionStarted,
)
from inside.deliver import Delivered, deliver
from inside.ledger import Ledger

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
        self.folders = {ch.name: ch.deliver for ch in cfg.channels}
        for folder in self.folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(cfg.state_dir)
        self._fds: dict[bytes, int] = {}
        self._work: queue.Queue[tuple[bytes, int] | None] = queue.Queue()
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
        while (job := self._work.get()) is not None:
            oid, length = job
            path = self._spool_path(oid)
            try:
                result = deliver(
                    path,
                    oid,
                    length,
                    sender=self.sender_key,
                    folders=self.folders,
                    ledger=self.ledger,
                )
            except (FerryError, OSError) as exc:
                self.rejected += 1
                reason = str(exc)
                target = self.rejected_dir / f"{oid.hex()}.obj"
                if path.exists():
                    os.replace(path, target)
                self.ledger.record(oid, "rejected", reason=reason)
                _log.error("object_rejected", object_id=oid.hex(), reason=reason, kept=str(target))
                continue
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
                os.pwrite(self._spool_fd(ev.object_id), ev.data, ev.offset)
            elif isinstance(ev, ObjectCompleted):
                # (an empty object's only block still went through BlockDecoded)
                os.close(self._spool_fd(ev.object_id))
                del self._fds[ev.object_id]
                self._work.put((ev.object_id, ev.length))
            elif isinstance(ev, ObjectLost):
                self.lost += 1
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
