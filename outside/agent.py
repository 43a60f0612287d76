"""The outside (low-side) agent: take files in, spool them, send them one way.

``ferry outside run -c outside.yaml``. Threads: one intake thread scans the
drop folders and spools files; the main thread drives the sender machine,
paces every byte through a token bucket and writes to the link. It never
reads from the link.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from pathlib import Path

from ferry import log, selftest
from ferry.config_types import OutsideConfig
from ferry.crypto.keys import load_public_key, load_secret_key
from ferry.errors import ChannelError
from ferry.runtime import open_sender, pacing_rate
from ferry.status import write_status
from ferry.wire.pacing import TokenBucket
from ferry.wire.sender import OutgoingObject, Sender
from outside.intake import FolderIntake
from outside.spool import Spool, SpoolItem

# Datagrams asked of the sender machine per loop turn: amortises Python overhead
# while keeping heartbeats and intake responsive (64 x 1.5 kB ~ 0.1 ms at 1 Gb/s).
BATCH = 64
# Pacing burst: the bucket may run this many bytes ahead of the rate.
PACING_BURST = 256 * 1024
STATUS_INTERVAL = 0.5

_log = log.get("outside")


class FileSource:
    """An object file in the spool, read with pread (thread-safe, no shared offset)."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self._fd, size, offset)

    def close(self) -> None:
        os.close(self._fd)


class OutsideAgent:
    def __init__(self, cfg: OutsideConfig, stop: threading.Event) -> None:
        self.cfg = cfg
        self.stop = stop
        selftest.run()
        self.key = load_secret_key(cfg.signing_key, ("ed25519",))
        self.recipient = load_public_key(cfg.inside_public_key, cfg.source.parent)
        self.spool = Spool(cfg.state_dir)
        for ch in cfg.channels:
            ch.drop.mkdir(parents=True, exist_ok=True)
        self.intake = FolderIntake(cfg.channels, self.spool, self.key)
        self._incoming: queue.Queue[SpoolItem] = queue.Queue()
        self._sources: dict[bytes, FileSource] = {}
        self.status_path = cfg.state_dir / "status.json"

    def _intake_loop(self) -> None:
        while not self.stop.is_set():
            try:
                for item in self.intake.scan():
                    self._incoming.put(item)
            except Exception:  # noqa: BLE001  # the intake thread must never die silently
                _log.exception("intake_error")
            self.stop.wait(self.cfg.poll_interval)

    def _submit(self, sender: Sender, item: SpoolItem) -> None:
        try:
            src = FileSource(item.spool_file)
        except OSError as exc:
            _log.error("spool_file_missing", object_id=item.object_id.hex(), error=str(exc))
            return
        self._sources[item.object_id] = src
        sender.submit(OutgoingObject(item.object_id, item.length, src, item.channel, item.seq))

    def run(self) -> int:
        cfg = self.cfg
        epoch = self.spool.next_epoch(int(time.time() * 1e6))
        sender = Sender(
            cfg.link, self.key, self.recipient, epoch=epoch, rng=os.urandom, now=time.time()
        )
        channel = open_sender(cfg)
        bucket = TokenBucket(pacing_rate(cfg), PACING_BURST)
        backlog = self.spool.queued()
        for item in backlog:
            self._submit(sender, item)
        _log.info(
            "outside_started",
            epoch=epoch,
            transport=cfg.link.transport,
            rate_bps=cfg.link.rate_bps,
            resumed_items=len(backlog),
            inside_key=self.recipient.key_id.hex(),
            signing_key=self.key.public.key_id.hex(),
        )
        intake = threading.Thread(target=self._intake_loop, name="intake", daemon=True)
        intake.start()
        next_status = 0.0
        started = time.monotonic()
        try:
            while not self.stop.is_set():
                while True:
                    try:
                        self._submit(sender, self._incoming.get_nowait())
                    except queue.Empty:
                        break
                now = time.time()
                batch = sender.datagrams(now, BATCH)
                for d in batch:
                    wait = bucket.consume(channel.wire_size(len(d)), time.monotonic())
                    if wait > 0.01:
                        self.stop.wait(wait)  # slow links: stay responsive to SIGTERM
                    elif wait > 0:
                        time.sleep(wait)
                    channel.send(d)
                for ev in sender.pop_events():
                    src = self._sources.pop(ev.object_id, None)
                    if src is not None:
                        src.close()
                    done = self.spool.mark_sent(ev.object_id)
                    if done is not None:
                        done.unlink(missing_ok=True)
                    _log.info("sent", object_id=ev.object_id.hex(), channel=ev.channel, seq=ev.seq)
                mono = time.monotonic()
                if mono >= next_status:
                    next_status = mono + STATUS_INTERVAL
                    write_status(
                        self.status_path,
                        {
                            "role": "outside",
                            "epoch": epoch,
                            "pid": os.getpid(),
                            "packets_sent": sender.packets_sent,
                            "bytes_sent": sender.bytes_sent,
                            "objects_sent": sender.objects_sent,
                            "queued": sender.objects_queued,
                            "uptime": mono - started,
                        },
                    )
                if not batch:
                    delay = min(sender.next_control_due() - time.time(), 0.05)
                    if delay > 0:
                        self.stop.wait(delay)
        except ChannelError as exc:
            _log.error("link_failed", error=str(exc))
            return exc.exit_code
        finally:
            self.stop.set()
            intake.join(timeout=5)
            channel.close()
            for src in self._sources.values():
                src.close()
            self.spool.close()
            _log.info(
                "outside_stopped",
                packets_sent=sender.packets_sent,
                objects_sent=sender.objects_sent,
            )
        return 0
