"""Folder intake (polling scan; the watchdog-based watcher comes with the intake issue).

A file is taken when it has kept the same size and mtime for ``settle_seconds``.
It is copied into gateway-owned storage with ``O_NOFOLLOW`` (symlinks, devices
and FIFOs are refused), hashed while copied, wrapped with a signed trailer and
fsynced; only then is its row committed and the clerk's original moved to
``sent/`` (or deleted).
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

from ferry import log
from ferry.config_types import OutsideChannel
from ferry.crypto.keys import SecretKey
from ferry.wire import records as rec
from ferry.wire.sender import build_trailer
from outside.spool import Spool, SpoolItem

# Copy in 1 MiB pieces: large enough for throughput, small enough to keep memory flat.
COPY_CHUNK = 1024 * 1024
IGNORED_SUFFIXES = (".part", ".tmp", ".crdownload", ".partial")

_log = log.get("outside.intake")


def ignored(name: str) -> bool:
    """Temp and hidden files a clerk's tools leave behind are never taken."""
    return name.startswith((".", "~$")) or name.lower().endswith(IGNORED_SUFFIXES)


def _source_key(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


class FolderIntake:
    def __init__(
        self,
        channels: tuple[OutsideChannel, ...],
        spool: Spool,
        signing_key: SecretKey,
        rng: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._channels = channels
        self._spool = spool
        self._key = signing_key
        self._rng = rng
        self._seen: dict[Path, tuple[int, int, float]] = {}

    def scan(self, now: float | None = None) -> list[SpoolItem]:
        """Take every settled file of every channel; return the new spool items."""
        now = time.monotonic() if now is None else now
        taken: list[SpoolItem] = []
        for ch in self._channels:
            try:
                entries = list(os.scandir(ch.drop))
            except OSError as exc:
                _log.error("drop_folder_unreadable", channel=ch.name, error=str(exc))
                continue
            for entry in sorted(entries, key=lambda e: e.name):
                if ignored(entry.name):
                    continue
                path = Path(entry.path)
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    if not stat.S_ISDIR(st.st_mode):
                        _log.warning("refused_non_regular_file", channel=ch.name, name=entry.name)
                    continue
                sig = (st.st_size, st.st_mtime_ns, now)
                prev = self._seen.get(path)
                if prev is None or prev[:2] != sig[:2]:
                    self._seen[path] = sig
                    if ch.settle_seconds > 0:
                        continue
                elif now - prev[2] < ch.settle_seconds:
                    continue
                item = self._take(ch, path, st)
                self._seen.pop(path, None)
                if item is not None:
                    taken.append(item)
        return taken

    def _take(self, ch: OutsideChannel, path: Path, st: os.stat_result) -> SpoolItem | None:
        key = _source_key(st)
        if self._spool.known_source(key) is not None:
            self._finish_original(ch, path)  # crashed after commit, before the move
            return None
        if st.st_size > ch.max_size:
            _log.warning(
                "rejected_too_large",
                channel=ch.name,
                name=path.name,
                size=st.st_size,
                max_size=ch.max_size,
            )
            return None
        object_id = self._rng(16)
        seq = self._spool.next_seq(ch.name)
        tmp = self._spool.dir / f"{object_id.hex()}.tmp"
        final = self._spool.dir / f"{object_id.hex()}.obj"
        try:
            src = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            _log.warning("refused_unopenable", channel=ch.name, name=path.name, error=exc.strerror)
            return None
        digest = hashlib.sha256()
        size = 0
        try:
            fst = os.fstat(src)
            if not stat.S_ISREG(fst.st_mode) or _source_key(fst) != key:
                _log.warning("refused_changed_or_special", channel=ch.name, name=path.name)
                return None
            with open(tmp, "xb") as out:
                while chunk := os.read(src, COPY_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                if size != st.st_size:
                    _log.warning("file_changed_during_copy", channel=ch.name, name=path.name)
                    out.close()
                    tmp.unlink()
                    return None
                manifest = rec.Manifest(
                    object_id=object_id,
                    kind="file",
                    channel=ch.name,
                    seq=seq,
                    name=path.name,
                    media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream",
                    size=size,
                    sha256=digest.digest(),
                    created_us=int(time.time() * 1e6),
                    mtime_us=st.st_mtime_ns // 1000,
                    sender=self._key.public.key_id,
                )
                trailer = build_trailer(manifest, self._key)
                out.write(trailer)
                out.flush()
                os.fsync(out.fileno())
            os.rename(tmp, final)
            _fsync_dir(self._spool.dir)
        finally:
            os.close(src)
        item = SpoolItem(object_id, ch.name, seq, path.name, size, size + len(trailer), final)
        self._spool.add(item, digest.digest(), str(path), key)
        _log.info(
            "taken",
            channel=ch.name,
            name=path.name,
            size=size,
            seq=seq,
            object_id=object_id.hex(),
            sha256=digest.hexdigest(),
        )
        self._finish_original(ch, path)
        return item

    def _finish_original(self, ch: OutsideChannel, path: Path) -> None:
        try:
            if ch.after_send == "delete":
                path.unlink()
            else:
                ch.sent.mkdir(parents=True, exist_ok=True)
                target = ch.sent / path.name
                n = 1
                while target.exists():
                    n += 1
                    target = ch.sent / f"{path.stem} ({n}){path.suffix}"
                os.rename(path, target)
        except FileNotFoundError:
            pass
        except OSError as exc:
            _log.error("cannot_move_original", channel=ch.name, name=path.name, error=str(exc))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
