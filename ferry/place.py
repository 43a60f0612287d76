"""Giving a file its name without replacing another: what the inside's delivery folders and
the outside's ``sent`` folder share, shares (FUSE, SMB, NFS) included.

:func:`link_new` names a file with a hard link, which never replaces one; where the file
system refuses hard links (some shares), a rename after a check stands in for it. A file
written in place before it is named goes under a :func:`temp_name` (hidden, fixed length:
any final name fits beside it); :func:`remove_stale_temps` removes those a crash left.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import errno
import os
import queue
import re
import stat
import struct
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from ferry import log
from ferry.errors import UnsafePathError

TEMP_PREFIX = ".ferry-"
TEMP_SUFFIX = ".part"
_LIBC = ctypes.CDLL(None, use_errno=True)
_TEMP = re.compile(r"\.ferry-[0-9a-f]{16}\.part")
# Hard links refused by the file system: a rename after a check stands in for link.
NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK})

_log = log.get("ferry.place")
_share_refused: set[tuple[int, int]] = set()  # (folder device and inode: logged once each)


def shared_mode(folder_mode: int, *, directory: bool = False) -> int:
    """The mode :func:`share_like_folder` gives a file (or folder) in a folder of this mode."""
    if directory:  # (setuid means nothing on a Linux folder: not passed on)
        return (stat.S_IMODE(folder_mode) & ~stat.S_IRWXO & ~stat.S_ISUID) | stat.S_IRWXU
    return (folder_mode & 0o660) | stat.S_IRUSR | stat.S_IWUSR


def share_like_folder(
    fd: int, folder: os.stat_result, *, directory: bool = False, where: str | Path | None = None
) -> None:
    """Give the file (or, with ``directory``, the folder) open as ``fd``, which ferry is
    placing in the folder whose stat is ``folder``, that folder's permissions, whatever the
    agent's umask (the systemd unit's is 0077): a file gets its owner's and group's read and
    write bits (never execute), a folder its owner's and group's bits and its setgid and
    sticky bits; never anything for others (a folder open to everyone does not make
    citizens' documents readable by every account on the host). The owner keeps read and
    write (and search). Where the folder has the setgid bit, the file is given
    its group too (files made in it have it already; one linked from the agent's own storage
    does not). The agent's user must be a member of that group (and the systemd unit lets
    it call ``fchown``). Refused (not a member; a share that keeps no Unix permissions; the
    kernel dropping a folder's setgid bit for an owner outside its group), the file keeps
    what it has (the agent's group, or the umask's mode: never more open) and this is
    logged once per folder (``shared_permissions_refused``, naming ``where``, the folder,
    if given): the item is delivered all the same.

    So the people who read a delivery, ``sent`` or quarantine folder read what ferry puts
    there as the operator set up the folder (docs/OPERATIONS.md, "Who may read what")."""
    mode = shared_mode(folder.st_mode, directory=directory)
    try:
        if directory:
            _folder_mode(fd, mode)
        else:
            os.fchmod(fd, mode)
        if folder.st_mode & stat.S_ISGID and os.fstat(fd).st_gid != folder.st_gid:
            os.fchown(fd, -1, folder.st_gid)
        if directory and (now := stat.S_IMODE(os.fstat(fd).st_mode)) != mode:
            raise PermissionError(errno.EPERM, f"the folder's mode is {oct(now)}")
    except OSError as exc:
        _refused(fd, folder, mode, exc, where)


def _refused(
    fd: int, folder: os.stat_result, mode: int, exc: OSError, where: str | Path | None
) -> None:
    """``shared_permissions_refused``, once per folder (see :func:`share_like_folder`)."""
    key = (folder.st_dev, folder.st_ino)
    if key in _share_refused:
        return
    _share_refused.add(key)
    try:
        if where is None:  # (a file made in place, or a folder: the folder it is in)
            where = os.path.dirname(os.readlink(f"/proc/self/fd/{fd}"))
        elif str(where).startswith("/proc/self/fd/"):  # (a pinned folder: its path)
            where = os.readlink(where)
    except OSError:
        where = where or f"inode {folder.st_ino}"
    _log.warning(
        "shared_permissions_refused",
        folder=str(where),
        mode=oct(mode),
        group=folder.st_gid,
        error=str(exc),
    )


_ACL_ACCESS = "system.posix_acl_access"


def _has_acl(fd: int) -> bool:
    try:
        os.getxattr(fd, _ACL_ACCESS)
    except OSError:  # (ENODATA: none; EOPNOTSUPP: no ACLs here)
        return False
    return True


_NO_ACLS = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})


def _folder_mode(fd: int, mode: int) -> None:
    """Give the folder open as ``fd`` ``mode``. With the setgid bit, which a folder made in a
    setgid folder has already: its permission bits are set through a minimal access ACL
    (the ACL the mode bits are, which the kernel keeps as mode bits: the setgid bit stays),
    since the systemd units refuse any chmod that names the setgid bit
    (``RestrictSUIDSGID=``); where the file system has no ACLs, by fchmod. A folder that has
    ``mode`` already (a default ACL in its parent) is left as it is, and one with an ACL of
    its own (named users or groups: the operator's) is not given a minimal one."""
    now = os.fstat(fd).st_mode
    if stat.S_IMODE(now) == mode:
        return
    if mode & stat.S_ISGID and now & stat.S_ISGID and not _has_acl(fd):
        acl = struct.pack("<I", 2)  # (POSIX_ACL_XATTR_VERSION; entries: tag, perm, id)
        for tag, shift in ((0x01, 6), (0x04, 3), (0x20, 0)):  # (user, group, other: owner's)
            acl += struct.pack("<HHI", tag, (mode >> shift) & 0o7, 0xFFFFFFFF)
        try:
            os.setxattr(fd, _ACL_ACCESS, acl)
        except OSError as exc:
            if exc.errno not in _NO_ACLS:
                raise
        else:
            if stat.S_IMODE(os.fstat(fd).st_mode) == mode:
                return
    os.fchmod(fd, mode)


# File systems whose syncfs(2) writes every dirty file and then flushes the disk's cache
# (statfs f_type, linux/magic.h). On the others it may do much less: on FUSE (bindfs,
# sshfs, exfat-fuse, ...) the kernel does not pass it to the daemon at all (only virtiofs
# asks for it), and NFS and SMB leave it to the server; there an fsync of each file is what
# reaches the daemon or the server (FUSE_FSYNC, COMMIT, SMB2 FLUSH).
SYNCFS_FLUSHES = {
    0xEF53: "ext2/ext3/ext4",
    0x58465342: "xfs",
    0x9123683E: "btrfs",
    0xF2F52010: "f2fs",
    0x01021994: "tmpfs",  # (nothing to flush)
    0x858458F6: "ramfs",
}


def fs_type(fd: int) -> int:
    """The file system type of the file open as ``fd`` (fstatfs f_type: 0x6573_5546 is
    FUSE, 0xEF53 ext4...); OSError if fstatfs fails."""
    buf = ctypes.create_string_buffer(256)  # (struct statfs is 120 bytes on 64-bit Linux)
    if _LIBC.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF  # (f_type comes first)


def flush_all(fds: list[int], *, local: bool | None = None) -> None:
    """Make every file open as ``fds`` durable. On a local file system (SYNCFS_FLUSHES): one
    syncfs (one flush for many small files, where an fsync each would wait for the disk
    once per file), or an fsync of each if syncfs fails. Elsewhere (a share: FUSE, NFS,
    SMB...), an fsync of each. The files must share one file system; ``local``: what
    :func:`on_local_disk` says of it, when the caller knows already."""
    if not fds:
        return
    if local is None:
        local = on_local_disk(fds[0])
    if local and _LIBC.syncfs(fds[0]) == 0:
        return
    for fd in fds:
        os.fsync(fd)


def on_local_disk(fd: int) -> bool:
    """Whether the file open as ``fd`` is on a file system of SYNCFS_FLUSHES (a local disk,
    where syncfs and a folder's fsync do what they say), not a share."""
    return fs_type(fd) in SYNCFS_FLUSHES


def sync_names(folder: str | Path, names: Iterable[str]) -> None:
    """Make the files just named ``names`` in ``folder`` durable under those names: an fsync
    of the folder; on a share (not :func:`on_local_disk`), also an fsync of each of those
    files. A FUSE daemon without fsyncdir (bindfs answers ENOSYS) gets no folder fsync at
    all, the kernel taking it as done from then on, while a file's fsync reaches it, and on
    the file server's own disk (ext4, xfs) commits the file's new name along with it."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        sync_names_at(fd, names)
    finally:
        os.close(fd)


def sync_names_at(dir_fd: int, names: Iterable[str]) -> None:
    """:func:`sync_names` for the folder open as ``dir_fd``."""
    os.fsync(dir_fd)
    if not on_local_disk(dir_fd):
        fsync_named(dir_fd, names)


def fsync_named(dir_fd: int, names: Iterable[str]) -> None:
    """An fsync of each file ``names`` in the folder open as ``dir_fd`` (on a share, what
    commits a new name on the file server: see :func:`sync_names`)."""
    for name in names:  # (never waits on a FIFO someone put under the name meanwhile)
        f = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
        try:
            if stat.S_ISREG(os.fstat(f).st_mode):
                os.fsync(f)
        finally:
            os.close(f)


class _ExactMode:
    """A thread with a file system context of its own (``unshare(CLONE_FS)``) and umask 0,
    in which folders are made with exactly the mode asked for: no chmod after (which the
    systemd units refuse when it names the setgid bit, ``RestrictSUIDSGID=``; a folder made
    in a setgid folder has that bit from it), and no moment at which a new folder has less
    than its mode. The agent's own umask (0077 under the units) is not touched. Where the
    thread cannot have a context of its own, None: folders are made as usual."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[tuple[str, int, int, concurrent.futures.Future[None]]]
        self._jobs = queue.SimpleQueue()
        self._ready: bool | None = None

    def _run(self, started: concurrent.futures.Future[bool]) -> None:
        if _LIBC.unshare(_CLONE_FS) != 0:  # (never the umask of the whole process)
            started.set_result(False)
            return
        os.umask(0)
        started.set_result(True)
        while True:
            name, mode, dir_fd, done = self._jobs.get()
            try:
                os.mkdir(name, mode, dir_fd=dir_fd)
            except BaseException as exc:  # noqa: BLE001  # (the caller's to handle)
                done.set_exception(exc)
            else:
                done.set_result(None)

    def mkdir(self, name: str, mode: int, dir_fd: int) -> bool:
        """Make ``name`` in the folder open as ``dir_fd`` with ``mode`` exactly; False if
        this cannot be done here (the caller makes it as usual)."""
        with self._lock:
            if self._ready is None:
                started: concurrent.futures.Future[bool] = concurrent.futures.Future()
                threading.Thread(
                    target=self._run, args=(started,), name="ferry-exact-mode", daemon=True
                ).start()
                self._ready = started.result(timeout=10)
                _log.info("folders_made_with_exact_mode", available=self._ready)
        if not self._ready:
            return False
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._jobs.put((name, mode, dir_fd, done))
        done.result()
        return True


_CLONE_FS = 0x00000200
_exact_mode = _ExactMode()


def _mkdir_exactly(name: str, mode: int, dir_fd: int) -> None:
    """mkdir with ``mode`` less the setgid bit (the units refuse a mode naming it; a setgid
    parent passes it on), under umask 0 where a thread may have one of its own
    (:class:`_ExactMode`), else under the agent's (then :func:`share_like_folder` opens it up
    after)."""
    mode &= ~stat.S_ISGID
    if not _exact_mode.mkdir(name, mode, dir_fd):
        os.mkdir(name, mode, dir_fd=dir_fd)


@contextlib.contextmanager
def pinned_folder(
    folder: Path, parts: Sequence[str], *, create: bool = True
) -> Iterator[tuple[Path, int]]:
    """``folder / parts``, opened one folder at a time from ``folder`` without following a
    symlink (and made where missing, if ``create``, with the mode and group of the folder it
    is made in: :func:`share_like_folder`): ``(path, fd)``, the descriptor open
    for the ``with``. Names given relative to ``fd`` (``dir_fd=``, or ``/proc/self/fd/N``)
    stay in that very folder whatever is done to the path meanwhile, so a folder swapped for
    a symlink by someone who can write under ``folder`` cannot send a file elsewhere.
    UnsafePathError if something on the way is not a folder; FileNotFoundError if it is
    missing (``create`` false)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for depth, part in enumerate(parts, 1):
            made: os.stat_result | None = None
            if create:
                with contextlib.suppress(FileExistsError):
                    parent = os.fstat(fd)
                    _mkdir_exactly(part, shared_mode(parent.st_mode, directory=True), fd)
                    made = parent  # (checked, and given its parent's mode if need be, below)
            try:
                inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise  # (gone; or a share that does not let the agent in: as it is)
                where = folder.joinpath(*parts[:depth])  # (a symlink, or a file)
                raise UnsafePathError(f"{where} is not a folder") from exc
            try:
                # (only a folder of the agent's own: not one a person renamed into its place
                # meanwhile, which a root agent would otherwise open up; on a share that
                # shows another owner, said once)
                if made is not None:
                    if os.fstat(inner).st_uid == os.geteuid():
                        share_like_folder(inner, made, directory=True)
                    else:
                        wanted = shared_mode(made.st_mode, directory=True)
                        owner = PermissionError(errno.EPERM, "not the agent's own folder")
                        _refused(inner, made, wanted, owner, None)
            except BaseException:
                os.close(inner)
                raise
            os.close(fd)
            fd = inner
        yield folder.joinpath(*parts), fd
    finally:
        os.close(fd)


def temp_name() -> str:
    """A new hidden temp name: ``.ferry-<16 hex>.part``."""
    return f"{TEMP_PREFIX}{os.urandom(8).hex()}{TEMP_SUFFIX}"


def link_new(
    src: str | Path,
    dst: str | Path,
    *,
    src_dir_fd: int | None = None,
    dst_dir_fd: int | None = None,
) -> bool:
    """Give the file ``src`` also the name ``dst`` (FileExistsError if ``dst`` is taken).
    True: hard-linked, ``src`` still names it (the caller unlinks it when done). False: the
    file system has no hard links, so it was renamed: ``src`` is gone (never over a file,
    as far as a check just before can tell). Other errors (EXDEV...) are raised."""
    try:
        os.link(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, follow_symlinks=False)
        return True
    except OSError as exc:
        if exc.errno not in NO_HARD_LINKS:
            raise
    try:
        os.stat(dst, dir_fd=dst_dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        os.rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
        return False
    raise FileExistsError(errno.EEXIST, "name taken", str(dst))


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def rename_new(src: str | Path, dst: str | Path) -> None:
    """Rename ``src`` to ``dst`` on one file system, never over a file (FileExistsError):
    renameat2(2) with RENAME_NOREPLACE, in one step (no moment with both names, none with
    neither). Where the file system or the C library has no such rename, :func:`link_new`
    and an unlink of ``src`` stand in (two steps)."""
    renameat2 = getattr(_LIBC, "renameat2", None)
    if renameat2 is not None:
        if (
            renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
            == 0
        ):
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}:
            raise OSError(err, os.strerror(err), str(src))
    if link_new(src, dst):
        os.unlink(src)


def drop_temp(name: str | Path | None, dir_fd: int | None = None) -> None:
    """Remove a temp file if it is still there (None: nothing to remove)."""
    if name is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)


def remove_stale_temps(folder: Path, *, below: bool = False) -> int:
    """Remove the temp files (:func:`temp_name`) a crash left in ``folder`` (and in its
    subfolders, if ``below``; symlinks are not followed); how many."""
    removed = 0
    try:
        for entry in os.scandir(folder):
            if _TEMP.fullmatch(entry.name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
            elif below and entry.is_dir(follow_symlinks=False):
                removed += remove_stale_temps(Path(entry.path), below=True)
    except OSError:
        pass  # (a folder that is not there, or does not answer: its owner reports it)
    return removed
