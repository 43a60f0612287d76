"""Verify a reassembled object and deliver it atomically into its channel folder.

Verification (before anything is visible): trailer bounds, manifest signature
by the trusted outside key, object id and sizes consistent, SHA-256 of the
content. Delivery: once the ledger holds its signed trailer, the verified spool
file is truncated to the content, fsynced and hard-linked under a gateway-chosen
safe name (``link`` never overwrites: a collision tries ``name (2).ext``...).
Across filesystems the content is copied into an anonymous ``O_TMPFILE`` in the
target folder, fsynced and linked in, so a partial file is never visible under
any name. Where the target's file system has no O_TMPFILE (a share: FUSE, SMB,
NFS) the copy is written under a hidden temp name (``.ferry-<16 hex>.part``) first.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import sqlite3
import stat
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ferry.crypto import suite
from ferry.crypto.keys import PublicKey
from ferry.errors import EnvelopeRejected, FerryError, UnsafePathError, WireError
from ferry.place import (
    drop_temp,
    flush_all,
    fsync_named,
    link_new,
    on_local_disk,
    pinned_folder,
    share_like_folder,
    sync_names,
    temp_name,
)
from ferry.wire import records as rec
from inside.ledger import Ledger
from inside.paths import candidate_names, contained, safe_name

HASH_CHUNK = 1024 * 1024
MAX_SUBFOLDER_DEPTH = 16


class NotAuthentic(EnvelopeRejected):
    """What arrived under an object id is not an object the outside signed with that id
    (no trusted signature, a manifest for another id or size, content that is not what it
    signed). It says nothing of the genuine object, which a later copy may still bring:
    that id is not refused for good (a forged copy would otherwise keep it out)."""


@dataclass(frozen=True)
class Delivered:
    manifest: rec.Manifest
    path: Path


@dataclass(frozen=True)
class Duplicate:
    object_id: bytes


Senders = PublicKey | Sequence[PublicKey]
"""The outside signing key the inside trusts; during a key rotation, the current one first,
then earlier ones still accepted."""


def _signer(manifest_bytes: bytes, signature: bytes, sender: Senders) -> PublicKey:
    """The trusted key whose signature ``signature`` is (the current key is tried first);
    raise EnvelopeRejected if none. Nothing in the manifest is read before this."""
    keys = (sender,) if isinstance(sender, PublicKey) else sender
    refused: EnvelopeRejected | None = None
    for key in keys:
        try:
            suite.verify(key, rec.MANIFEST_LABEL, manifest_bytes, signature)
        except EnvelopeRejected as exc:
            refused = refused or exc
            continue
        return key
    raise refused or EnvelopeRejected("no trusted outside signing key")


def _manifest(trailer: bytes, object_id: bytes, content_len: int, sender: Senders) -> rec.Manifest:
    """Verify a trailer's signature, then that its manifest matches the transfer; raise
    :class:`NotAuthentic` if not."""
    try:
        manifest_bytes, signature = rec.split_trailer(trailer)
        key = _signer(manifest_bytes, signature, sender)
        manifest = rec.decode_manifest(manifest_bytes)  # authenticated from here on
    except WireError as exc:
        raise NotAuthentic(str(exc)) from exc
    if manifest.object_id != object_id:
        raise NotAuthentic("manifest object id differs from the transfer's")
    if manifest.sender != key.key_id:
        raise NotAuthentic("manifest names another sender key")
    if manifest.size != content_len:
        raise NotAuthentic("manifest size differs from the content length")
    return manifest


def verify_object(
    fd: int,
    object_id: bytes,
    length: int,
    sender: Senders,
    accept: Callable[[rec.Manifest], object] | None = None,
) -> rec.Manifest:
    """Check an object file; return its authenticated manifest or raise WireError.
    ``accept(manifest)`` runs once the manifest is authenticated, before the content is
    read (it raises to refuse the object, without reading gigabytes first)."""
    if os.fstat(fd).st_size != length:
        raise WireError("object file size differs from the object length")
    if length < rec.TRAILER_TAIL.size:
        raise NotAuthentic("object too short for a trailer")
    tlen = _trailer_length(os.pread(fd, rec.TRAILER_TAIL.size, length - rec.TRAILER_TAIL.size))
    if tlen > length:
        raise NotAuthentic("object trailer longer than the object")
    manifest = _manifest(os.pread(fd, tlen, length - tlen), object_id, length - tlen, sender)
    if accept is not None:
        accept(manifest)
    digest = hashlib.sha256()
    offset = 0
    while offset < manifest.size:
        chunk = os.pread(fd, min(HASH_CHUNK, manifest.size - offset), offset)
        if not chunk:
            raise WireError("object file shorter than its manifest")
        digest.update(chunk)
        offset += len(chunk)
    if digest.digest() != manifest.sha256:
        raise NotAuthentic("content SHA-256 differs from the signed manifest")
    return manifest


def _trailer_length(tail: bytes) -> int:
    try:
        return rec.trailer_length(tail)
    except WireError as exc:
        raise NotAuthentic(str(exc)) from exc


def verify_stream(data: bytes, object_id: bytes, sender: Senders) -> tuple[rec.Manifest, bytes]:
    """Check an object stream held in memory; return its manifest and content."""
    length = len(data)
    tlen = _trailer_length(data[-rec.TRAILER_TAIL.size :])
    if tlen > length:
        raise NotAuthentic("object trailer longer than the object")
    manifest = _manifest(data[length - tlen :], object_id, length - tlen, sender)
    content = data[: manifest.size]
    if hashlib.sha256(content).digest() != manifest.sha256:
        raise NotAuthentic("content SHA-256 differs from the signed manifest")
    return manifest, content


def open_bundle(
    manifest: rec.Manifest, content: bytes, sender: PublicKey
) -> list[tuple[rec.Manifest, bytes]]:
    """The messages of a verified bundle (see :func:`verify_stream`), each checked as a
    signed message would be: same sender and channel as the bundle, content hash, and no
    object id twice. Raises WireError; a bad member refuses the whole bundle."""
    members = rec.decode_bundle(content)
    seen = {manifest.object_id}
    for m, body in members:
        if m.sender != sender.key_id:
            raise WireError("a bundle member names another sender key")
        if m.channel != manifest.channel:
            raise WireError("a bundle member belongs to another channel than its bundle")
        if m.object_id in seen:
            raise WireError("an object id appears twice in a bundle")
        seen.add(m.object_id)
        if hashlib.sha256(body).digest() != m.sha256:
            raise WireError("a bundle member's SHA-256 differs from its manifest")
    return members


def _same_content(path: Path, sha256: bytes) -> bool:
    """Does ``path`` hold a regular file with this content? Never waits: a FIFO planted under
    the name (opened without O_NONBLOCK, it would hold the delivery thread for ever) or any
    other kind of file is not the same content."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        with open(fd, "rb", closefd=False) as f:
            return hashlib.file_digest(f, "sha256").digest() == sha256
    except OSError:
        return False
    finally:
        os.close(fd)


def name_tag(object_id: bytes) -> str:
    """The last-resort name tag of an item (:func:`ferry.names.candidate_names`): 48 bits
    of its random id, which no one in the delivery folder knows before it arrives."""
    return object_id[:6].hex()


def write_new_files(
    folder: Path, items: list[tuple[str, bytes, bytes]], tags: Sequence[str] = ()
) -> list[Path]:
    """Write ``(name, content, sha256)`` items under free safe names in ``folder``
    (``tags``: one per item, see :func:`ferry.names.candidate_names`).

    Group commit: every file is written into an anonymous O_TMPFILE, the
    filesystem is flushed once (syncfs), then each file is linked under the
    first free candidate name. The caller fsyncs the folder once
    (:func:`fsync_dir`) before anything says the files are delivered, so it can
    wait for that together with its other writes. Nothing is ever overwritten
    and no partial file is ever visible. Idempotent: a candidate that already
    holds the same content (a crash after linking, before the ledger said so)
    counts as delivered, so a repeat never makes a second copy. On a share each file is
    fsynced instead of the syncfs, and again once named (see :func:`ferry.place.sync_names`).
    """
    root = PurePosixPath(folder)
    tmps: list[tuple[int, str | None]] = []
    out: list[Path] = []
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)  # one folder for the whole batch
    try:
        shared = os.fstat(dir_fd)
        for _, content, _ in items:
            tmps.append(_open_temp(dir_fd, shared))
            tmp = tmps[-1][0]
            view = memoryview(content)
            while view:
                view = view[os.write(tmp, view) :]
        local = on_local_disk(dir_fd)
        flush_all([fd for fd, _ in tmps], local=local)
        for i, (fd, tmp_name) in enumerate(tmps):
            if tmp_name is not None:  # (closed before it is named: a share may hide a file
                os.close(fd)  # unlinked while open, .fuse_hidden..., .nfsXXXX)
                tmps[i] = (-1, tmp_name)
        for i, ((tmp, tmp_name), (name, _, sha)) in enumerate(zip(tmps, items, strict=True)):
            for candidate in candidate_names(safe_name(name), tag=tags[i] if tags else ""):
                try:
                    target = contained(root, candidate)
                except ValueError as exc:
                    raise UnsafePathError(str(exc)) from exc
                try:
                    _link_temp(tmp, tmp_name, dir_fd, candidate)
                    tmps[i] = (tmp, None)  # (named now)
                except FileExistsError:
                    if _same_content(Path(target), sha):
                        break
                    continue
                break
            else:
                raise UnsafePathError(f"no free name for {name!r} after many collisions")
            out.append(Path(target))
        if not local:  # (a share: see ferry.place.sync_names)
            fsync_named(dir_fd, [path.name for path in out])
    finally:
        for tmp, tmp_name in tmps:
            if tmp >= 0:
                os.close(tmp)
            drop_temp(tmp_name, dir_fd)
        os.close(dir_fd)
    return out


# O_TMPFILE refused: a file system without it (FUSE, SMB/CIFS, NFS: a delivery folder on a
# share) or a kernel before 3.11. A named temp file (ferry.place.temp_name) is used there.
_NO_TMPFILE = frozenset({errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL})


def _open_temp(dir_fd: int, folder: os.stat_result) -> tuple[int, str | None]:
    """A new file for writing in the folder open as ``dir_fd`` (``folder``: its stat), with
    the folder's permissions (:func:`ferry.place.share_like_folder`): anonymous (O_TMPFILE)
    where the file system allows, else under a hidden temp name (returned, or None)."""
    name: str | None = None
    try:
        fd = os.open(".", os.O_TMPFILE | os.O_WRONLY, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno not in _NO_TMPFILE:
            raise
        name = temp_name()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
    try:
        share_like_folder(fd, folder)
    except BaseException:
        os.close(fd)
        drop_temp(name, dir_fd)
        raise
    return fd, name


def _link_temp(tmp_fd: int, tmp_name: str | None, dir_fd: int, name: str) -> None:
    """Give a file from :func:`_open_temp` the name ``name`` (FileExistsError if taken);
    a named temp file (closed by then: ``tmp_fd`` is not used) then loses its temp name."""
    if tmp_name is None:
        _link_tmpfile(tmp_fd, dir_fd, name)
    elif link_new(tmp_name, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd):
        os.unlink(tmp_name, dir_fd=dir_fd)


def _link_tmpfile(tmp_fd: int, dir_fd: int, name: str) -> None:
    """Give an O_TMPFILE file the name ``name`` in the folder open as ``dir_fd``
    (FileExistsError if taken).

    linkat(2) with AT_SYMLINK_FOLLOW on /proc/self/fd/N; Python uses linkat
    (and that flag) only when a directory fd is passed.
    """
    os.link(f"/proc/self/fd/{tmp_fd}", name, dst_dir_fd=dir_fd, follow_symlinks=True)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def subfolder_parts(relpath: str) -> list[str]:
    """The sender's relative folder as safe names (UnsafePathError if empty or too deep)."""
    parts = [safe_name(p) for p in PurePosixPath(relpath).parts if p not in ("", ".", "/")]
    if not parts or len(parts) > MAX_SUBFOLDER_DEPTH:
        raise UnsafePathError(f"subfolder path {relpath!r} is empty or too deep")
    return parts


@contextmanager
def pinned_subfolder(folder: Path, relpath: str, *, keep: bool) -> Iterator[tuple[Path, Path]]:
    """The sender's relative folder under ``folder`` (when kept and given), made safe and
    created: ``(path, pinned)``. ``path`` is where it is (for the ledger, the audit log and
    people); ``pinned`` names the very folder opened, whatever happens to the path meanwhile
    (``/proc/self/fd/N``, valid inside the ``with``): links, checks and syncs go through it.

    Each folder on the way is opened from the one before without following a symlink, so a
    folder an inner user swaps for a symlink while a file is on its way (the path is checked
    some milliseconds before the link) cannot make the file land outside ``folder``.
    """
    if not keep or not relpath:
        yield folder, folder
        return
    with pinned_folder(folder, subfolder_parts(relpath)) as (path, fd):
        yield path, Path(f"/proc/self/fd/{fd}")


def _link_copy(src_fd: int, size: int, folder: Path, target: Path) -> None:
    """Copy into a new file in ``folder`` (anonymous where the file system allows) and link
    it as ``target`` (EEXIST on collision)."""
    dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        tmp, tmp_name = _open_temp(dir_fd, os.fstat(dir_fd))
        try:
            os.lseek(src_fd, 0, os.SEEK_SET)
            with os.fdopen(os.dup(src_fd), "rb") as src, os.fdopen(os.dup(tmp), "wb") as dst:
                shutil.copyfileobj(src, dst, HASH_CHUNK)
                dst.flush()
            os.ftruncate(tmp, size)
            os.fsync(tmp)
            if tmp_name is not None:  # (closed before it is named, as in write_new_files)
                os.close(tmp)
                tmp = -1
            _link_temp(tmp, tmp_name, dir_fd, target.name)
            tmp_name = None
        finally:
            if tmp >= 0:
                os.close(tmp)
            drop_temp(tmp_name, dir_fd)
    finally:
        os.close(dir_fd)


def link_under_free_name(
    src: Path,
    src_fd: int,
    size: int,
    folder: Path,
    name: str,
    *,
    before_link: Callable[[Path], None] | None = None,
    same_sha256: bytes | None = None,
    tag: str = "",
) -> Path:
    """Give the durable file ``src`` (open as ``src_fd``) a name in ``folder``: the first free
    candidate of ``safe_name(name)`` (``report (2).pdf``...), never overwriting, hard-linked
    (copied into an anonymous file and linked when ``folder`` is on another filesystem); then
    fsync the folder. The file is given the folder's permissions first
    (:func:`ferry.place.share_like_folder`). ``before_link(target)`` runs before each attempt. With
    ``same_sha256``, a candidate already holding that content counts as the file delivered
    (an interrupted earlier attempt) and is returned. ``tag``: see
    :func:`ferry.names.candidate_names`."""
    safe = safe_name(name)
    root = PurePosixPath(folder)
    share_like_folder(src_fd, os.stat(folder), where=folder)
    for candidate in candidate_names(safe, tag=tag):
        try:
            target = Path(contained(root, candidate))
        except ValueError as exc:
            raise UnsafePathError(str(exc)) from exc
        if os.path.lexists(target):
            if same_sha256 is not None and _same_content(target, same_sha256):
                break
            continue
        if before_link is not None:
            before_link(target)
        try:
            os.link(src, target, follow_symlinks=False)
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            try:
                _link_copy(src_fd, size, folder, target)
            except FileExistsError:
                continue
        break
    else:
        raise UnsafePathError(f"no free name for {safe!r} after many collisions")
    sync_names(folder, [target.name])
    return target


def find_same_content(folder: Path, name: str, sha256: bytes, tag: str = "") -> Path | None:
    """The first of ``safe_name(name)``'s candidate names in ``folder`` that holds content
    with this SHA-256 (what :func:`link_under_free_name` would have given an earlier
    attempt), or None."""
    root = PurePosixPath(folder)
    for candidate in candidate_names(safe_name(name), tag=tag):
        try:
            target = Path(contained(root, candidate))
        except ValueError as exc:
            raise UnsafePathError(str(exc)) from exc
        if os.path.lexists(target) and _same_content(target, sha256):
            return target
    return None


def _checked(
    spool_file: Path,
    fd: int,
    object_id: bytes,
    length: int,
    *,
    sender: Senders,
    folders: dict[str, Path],
    subfolders: dict[str, bool],
    recheck: Callable[[rec.Manifest, Path], None] | None,
    checking: AbstractContextManager[object] | None,
) -> tuple[rec.Manifest, Path]:
    """The verified manifest of the spooled object open as ``fd`` and its channel's folder,
    once re-checked (``checking`` held meanwhile); raises what refuses it, an unusable
    subfolder path included (the subfolder itself is made when the file is linked:
    :func:`pinned_subfolder`)."""

    def accept(manifest: rec.Manifest) -> Path:  # (before its content is read)
        if manifest.kind != "file":
            raise FerryError(f"a {manifest.kind} object cannot be delivered as a file")
        folder = folders.get(manifest.channel)
        if folder is None:
            raise FerryError(f"channel {manifest.channel!r} has no file folder on this inside")
        return folder

    with checking if checking is not None else nullcontext():
        manifest = verify_object(fd, object_id, length, sender, accept)
        folder = accept(manifest)
        if recheck is not None:
            recheck(manifest, spool_file)
    if manifest.path and subfolders.get(manifest.channel, False):
        subfolder_parts(manifest.path)  # (refused here, before anything is written)
    return manifest, folder


def deliver(
    spool_file: Path,
    object_id: bytes,
    length: int,
    *,
    sender: Senders,
    folders: dict[str, Path],
    ledger: Ledger,
    subfolders: dict[str, bool] | None = None,
    on_linked: Callable[[rec.Manifest, Path], None] | None = None,
    recheck: Callable[[rec.Manifest, Path], None] | None = None,
    checking: AbstractContextManager[object] | None = None,
) -> Delivered | Duplicate:
    """Verify and deliver; raise FerryError (reason in the message) if the object is refused.

    ``on_linked(manifest, path)`` runs once the file is durably in its folder and before
    the ledger says delivered (the audit record); if it raises, the ledger keeps the
    item as ``delivering`` and start-up recovery (or the caller) confirms it later.
    ``recheck(manifest, spool file)`` is the inside's own content check of the verified
    content (the file's first ``manifest.size`` bytes), before anything is visible; it raises
    to refuse the file. ``checking`` is held while the object is verified and re-checked
    (not while the delivery folder is written: a folder that hangs holds up nothing else).

    The spool file keeps its signed trailer until the ledger says ``delivering`` and holds
    that trailer (:meth:`Ledger.trailer_of`); only then is it cut to the content, for the
    hard link. A start after a crash can so put the trailer back and deliver the file again.
    """
    subfolders = subfolders or {}
    if ledger.state_of(object_id) in {"delivered", "rejected"}:
        spool_file.unlink(missing_ok=True)
        return Duplicate(object_id)
    fd = os.open(spool_file, os.O_RDWR | os.O_NOFOLLOW)
    try:
        manifest, folder = _checked(
            spool_file, fd, object_id, length, sender=sender, folders=folders,
            subfolders=subfolders, recheck=recheck, checking=checking,
        )  # fmt: skip
        trailer: bytes | None = os.pread(fd, length - manifest.size, manifest.size)
        keep = subfolders.get(manifest.channel, False)
        with pinned_subfolder(folder, manifest.path, keep=keep) as (where, pinned):

            def delivering(target: Path) -> None:  # (where a crash would have left it)
                nonlocal trailer
                ledger.record(
                    object_id,
                    "delivering",
                    channel=manifest.channel,
                    seq=manifest.seq,
                    name=manifest.name,
                    path=str(where / target.name),
                    size=manifest.size,
                    sha256=manifest.sha256,
                    trailer=trailer,
                )
                if trailer is not None:  # (the first attempt: the trailer is in the ledger)
                    trailer = None
                    os.ftruncate(fd, manifest.size)
                    os.fsync(fd)

            linked = link_under_free_name(
                spool_file,
                fd,
                manifest.size,
                pinned,
                manifest.name,
                before_link=delivering,
                tag=name_tag(object_id),
            )
            target = where / linked.name
        if on_linked is not None:
            on_linked(manifest, target)
        ledger.record(object_id, "delivered", path=str(target))
    finally:
        os.close(fd)
    spool_file.unlink(missing_ok=True)
    return Delivered(manifest, target)


def restore_trailer(spool_file: Path, size: int, trailer: bytes) -> int:
    """Put a trailer :func:`deliver` cut off back on its spool file (cut to the content's
    ``size`` first); the object's length. The object is then verified again like any other."""
    fd = os.open(spool_file, os.O_RDWR | os.O_NOFOLLOW)
    try:
        os.ftruncate(fd, size)
        view = memoryview(trailer)
        offset = size
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n
        os.fsync(fd)
    finally:
        os.close(fd)
    return size + len(trailer)


@dataclass(frozen=True)
class Alone:
    """Not delivered by :func:`deliver_batch`. ``error``: the check it failed (verification,
    its channel, the re-check), to refuse it for, as :func:`deliver` would have raised it.
    Otherwise it is to be delivered alone (:func:`deliver`), which retries it or copies it
    across file systems as it does any file; first settled where the ledger says
    ``delivering`` (its trailer cut off, perhaps linked), as start-up recovery does."""

    object_id: bytes
    error: Exception | None = None


@dataclass
class _Ready:
    spool_file: Path
    object_id: bytes
    fd: int
    manifest: rec.Manifest
    folder: Path
    trailer: bytes
    target: Path | None = None


def deliver_batch(
    jobs: Sequence[tuple[Path, bytes, int]],
    *,
    sender: Senders,
    folders: dict[str, Path],
    ledger: Ledger,
    subfolders: dict[str, bool] | None = None,
    on_linked: Callable[[list[tuple[rec.Manifest, Path]]], None] | None = None,
    recheck: Callable[[rec.Manifest, Path], None] | None = None,
    checking: Callable[[], AbstractContextManager[object]] | None = None,
) -> list[Delivered | Duplicate | Alone]:
    """:func:`deliver` for several spooled files (``(spool file, object id, length)``) of one
    channel at once, each step in the same order as there, with one wait for the disk per
    step for them all: one ledger transaction for ``delivering`` (their trailers kept), one
    flush of the cut spool files, a hard link each, one fsync per folder, ``on_linked`` with
    all of them (the audit records, one wait), one ledger transaction for ``delivered``.

    A result per job, in order. A file this path does not deliver comes back as
    :class:`Alone`: one that fails a check (so that :func:`deliver` refuses it with its
    reason), one whose folder is on another file system (a copy), one whose name was taken
    meanwhile, or every file still on its way when a step fails (a full disk, an audit log
    that cannot write). Raises nothing but what ``on_linked`` raises other than OSError
    and FerryError (the files then as :class:`Alone` in the ledger's eyes: ``delivering``).
    """
    subfolders = subfolders or {}
    results: dict[bytes, Delivered | Duplicate | Alone] = {}
    ready: list[_Ready] = []
    devices: dict[Path, int] = {}
    try:
        known = ledger.states_of([oid for _, oid, _ in jobs])
        for spool_file, oid, length in jobs:
            if oid in results or any(r.object_id == oid for r in ready):
                results.setdefault(oid, Duplicate(oid))  # (twice in the batch: a repeat)
                continue
            if known.get(oid) in {"delivered", "rejected"}:
                spool_file.unlink(missing_ok=True)
                results[oid] = Duplicate(oid)
                continue
            if known.get(oid) is not None:  # (delivering: left by a crash or a failed step)
                results[oid] = Alone(oid)
                continue
            item = _ready(
                spool_file, oid, length, sender=sender, folders=folders,
                subfolders=subfolders, recheck=recheck, checking=checking,
            )  # fmt: skip
            if isinstance(item, Exception):
                results[oid] = Alone(oid, item)
                continue
            if item.manifest.path and subfolders.get(item.manifest.channel, False):
                os.close(item.fd)  # (a kept subfolder: deliver pins it, folder by folder)
                results[oid] = Alone(oid)
                continue
            if item.folder not in devices:
                devices[item.folder] = os.stat(item.folder).st_dev
            if os.fstat(item.fd).st_dev != devices[item.folder]:
                os.close(item.fd)  # (copied across by deliver)
                results[oid] = Alone(oid)
                continue
            ready.append(item)
        _deliver_ready(ready, ledger, on_linked, results)
    finally:
        for item in ready:
            os.close(item.fd)
    return [results[oid] for _, oid, _ in jobs]


def _ready(
    spool_file: Path,
    oid: bytes,
    length: int,
    *,
    sender: Senders,
    folders: dict[str, Path],
    subfolders: dict[str, bool],
    recheck: Callable[[rec.Manifest, Path], None] | None,
    checking: Callable[[], AbstractContextManager[object]] | None,
) -> _Ready | Exception:
    """A spooled file verified and re-checked, open, with its channel's folder; else what
    :func:`deliver` would have raised."""
    try:
        fd = os.open(spool_file, os.O_RDWR | os.O_NOFOLLOW)
    except OSError as exc:
        return exc
    try:
        manifest, folder = _checked(
            spool_file, fd, oid, length, sender=sender, folders=folders, subfolders=subfolders,
            recheck=recheck, checking=None if checking is None else checking(),
        )  # fmt: skip
        trailer = os.pread(fd, length - manifest.size, manifest.size)
    except Exception as exc:  # noqa: BLE001  # (the caller refuses it, or tries it alone)
        os.close(fd)
        return exc
    return _Ready(spool_file, oid, fd, manifest, folder, trailer)


def _deliver_ready(
    ready: list[_Ready],
    ledger: Ledger,
    on_linked: Callable[[list[tuple[rec.Manifest, Path]]], None] | None,
    results: dict[bytes, Delivered | Duplicate | Alone],
) -> None:
    """The steps of :func:`deliver_batch` after the checks, each for every file still on
    its way. A step that fails leaves its files (and those behind it) to deliver alone."""
    taken: set[Path] = set()
    for item in list(ready):  # the first free name of each, none twice in the batch
        item.target = _free_name(item, taken)
        if item.target is None:
            ready.remove(item)
            os.close(item.fd)
            results[item.object_id] = Alone(item.object_id)
            continue
        taken.add(item.target)
    if not ready:
        return
    rows: list[dict[str, object]] = [
        {
            "object_id": r.object_id,
            "state": "delivering",
            "channel": r.manifest.channel,
            "seq": r.manifest.seq,
            "name": r.manifest.name,
            "path": str(r.target),
            "size": r.manifest.size,
            "sha256": r.manifest.sha256,
        }
        for r in ready
    ]
    try:
        ledger.record_many(rows, trailers=[(r.object_id, r.trailer) for r in ready])
    except Exception:  # noqa: BLE001  # (a full disk...): each alone, as if never tried
        for r in ready:
            results[r.object_id] = Alone(r.object_id)
        return
    linked: list[_Ready] = []
    try:  # from here on, each is settled (the ledger says delivering) if not delivered
        shared: dict[Path, os.stat_result] = {}
        for r in ready:
            assert r.target is not None
            os.ftruncate(r.fd, r.manifest.size)
            if (where := r.target.parent) not in shared:
                shared[where] = os.stat(where)
            share_like_folder(r.fd, shared[where], where=where)
        flush_all([r.fd for r in ready])
        for r in ready:
            assert r.target is not None
            try:
                os.link(r.spool_file, r.target, follow_symlinks=False)
            except OSError:  # (taken meanwhile, or refused: deliver tells which)
                results[r.object_id] = Alone(r.object_id)
                continue
            linked.append(r)
        names: dict[Path, list[str]] = {}
        for r in linked:
            assert r.target is not None
            names.setdefault(r.target.parent, []).append(r.target.name)
        for folder, named in names.items():
            sync_names(folder, named)
        if on_linked is not None and linked:
            on_linked([(r.manifest, r.target) for r in linked if r.target is not None])
        ledger.record_many(
            [
                {"object_id": r.object_id, "state": "delivered", "path": str(r.target)}
                for r in linked
            ],
            forget_trailers=True,
        )
    except (OSError, FerryError, sqlite3.Error):
        for r in ready:
            results.setdefault(r.object_id, Alone(r.object_id))
        return
    for r in linked:
        r.spool_file.unlink(missing_ok=True)
        assert r.target is not None
        results[r.object_id] = Delivered(r.manifest, r.target)


def _free_name(item: _Ready, taken: set[Path]) -> Path | None:
    """The first candidate name for ``item`` free in its folder and not ``taken``."""
    root = PurePosixPath(item.folder)
    for candidate in candidate_names(safe_name(item.manifest.name), tag=name_tag(item.object_id)):
        try:
            target = Path(contained(root, candidate))
        except ValueError:
            return None
        if target not in taken and not os.path.lexists(target):
            return target
    return None
