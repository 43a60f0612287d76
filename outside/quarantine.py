"""Quarantine: where rejected items go, with a reason a clerk can read.

An item lands in the channel's quarantine folder (next to the drop folder)
under a safe name derived from its untrusted original name, with two
companions: ``<name>.reason.json`` for machines and ``<name>.reason.txt`` in
plain English and Chinese for the clerk.

Never lose the item: the reason files are written first (temp file, fsync,
rename, folder fsync), then the item is moved in (rename; copy + fsync + unlink
across filesystems). Any failure is raised as OSError for the caller to alarm
on; the item is then still where it was, or already in the quarantine next to
its reason files. Nothing is ever overwritten: names are chosen under an
exclusive lock on the folder, and a taken name gets " (2)", " (3)"...
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import stat
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

from ferry import log
from ferry.names import candidate_names
from ferry.place import share_like_folder, sync_names_at

# Most Linux filesystems allow 255 bytes per name; keep room for " (NNNNN)", ".reason.json"
# and the temp-file decoration around it.
MAX_NAME_BYTES = 200
# A longer "extension" is not one worth keeping.
MAX_SUFFIX_BYTES = 16
# What reason.txt quotes of the untrusted name and of the message.
MAX_DISPLAY_CHARS = 300
COPY_CHUNK = 1024 * 1024
REASON_JSON = ".reason.json"
REASON_TXT = ".reason.txt"

RESERVED = {
    "CON", "PRN", "AUX", "NUL",
    *(f"COM{i}" for i in range(1, 10)),
    *(f"LPT{i}" for i in range(1, 10)),
}  # fmt: skip
# Characters that reorder or hide text; a name is shown to people, so they must not survive.
BIDI_AND_INVISIBLE = {
    "\u061c", "\u200b", "\u200c", "\u200d", "\u200e", "\u200f", "\u202a", "\u202b",
    "\u202c", "\u202d", "\u202e", "\u2060", "\u2066", "\u2067", "\u2068", "\u2069", "\ufeff",
}  # fmt: skip

_log = log.get("outside.quarantine")
# Room a copy into the quarantine from another file system must leave (its reason files).
COPY_ROOM_MARGIN = 1024 * 1024


# (why, 原因, what you can do, 您可以) per reason code.
_REASONS: dict[str, tuple[str, str, str, str]] = {
    "TOO_LARGE": (
        "The file is larger than this channel allows.",
        "文件大小超过了该通道允许的上限。",
        "Split the file into smaller parts, or ask your administrator about the size limit.",
        "请将文件拆分为较小的部分，或向管理员咨询大小限制。",
    ),
    "RATE_LIMITED": (
        "Too many files were submitted in a short time, so this one was set aside.",
        "短时间内提交的文件过多，此文件被暂时搁置。",
        "Submit the file again a little later.",
        "请稍后重新提交该文件。",
    ),
    "NOT_REGULAR_FILE": (
        "This is not an ordinary file (for example a link, a shortcut or a special system file).",
        "这不是普通文件（例如链接、快捷方式或特殊系统文件）。",
        "Copy the document itself into the folder, not a link to it.",
        "请将文档本身复制到文件夹中，而不是指向它的链接。",
    ),
    "FILENAME_POLICY": (
        "The file name is not allowed (forbidden characters, too long, or a reserved name).",
        "文件名不被允许（含有禁用字符、过长或属于保留名称）。",
        "Rename the file using ordinary letters and digits, then submit it again.",
        "请使用普通的字母和数字重命名文件，然后重新提交。",
    ),
    "TYPE_NOT_ALLOWED": (
        "This type of file is not accepted on this channel.",
        "该通道不接受此类型的文件。",
        "Convert the document to an accepted format; your administrator can tell you which.",
        "请将文档转换为允许的格式，具体格式可咨询管理员。",
    ),
    "TYPE_MISMATCH": (
        "The content of the file does not match the type its name claims.",
        "文件内容与其文件名所表示的类型不符。",
        "Open the file in its program and save it again in the right format.",
        "请用相应程序打开文件，并以正确的格式重新保存。",
    ),
    "POLYGLOT": (
        "The file is valid as several file types at once, a trick used to hide harmful content.",
        "该文件同时符合多种文件格式，这是隐藏有害内容的常见手法。",
        "Save a fresh copy from the program that made the document and submit that.",
        "请用生成该文档的程序另存一份新文件后再提交。",
    ),
    "MALFORMED": (
        "The file is damaged or does not follow the rules of its format.",
        "文件已损坏或不符合其格式规范。",
        "Open the file in its program, save a new copy and submit that.",
        "请用相应程序打开文件，另存一份新文件后再提交。",
    ),
    "ENCRYPTED": (
        "The file is encrypted or protected by a password, so it cannot be checked.",
        "文件已加密或设有密码，无法进行检查。",
        "Remove the password or encryption and submit the file again.",
        "请去除密码或加密后重新提交该文件。",
    ),
    "LIMIT_EXCEEDED": (
        "The file goes beyond a processing limit (for example too many pages, images or parts).",
        "文件超出了处理限制（例如页数、图片或组成部分过多）。",
        "Split the document into smaller parts and submit them separately.",
        "请将文档拆分为较小的部分分别提交。",
    ),
    "ARCHIVE_BOMB": (
        "The compressed archive would expand to an unreasonable size.",
        "压缩包解压后的大小异常巨大。",
        "Send the files without compressing them, or in smaller archives.",
        "请不经压缩直接发送文件，或分成较小的压缩包。",
    ),
    "ARCHIVE_TRAVERSAL": (
        "The compressed archive contains entries that try to write outside their folder.",
        "压缩包中含有试图写到其所在目录之外的条目。",
        "Do not use this archive; create a new one from the original files.",
        "请勿使用该压缩包，请用原始文件重新打包。",
    ),
    "ARCHIVE_DEPTH": (
        "The compressed archive contains too many archives nested inside each other.",
        "压缩包中嵌套的压缩包层数过多。",
        "Unpack the nested archives and send the files in one simple archive.",
        "请解开嵌套的压缩包，将文件放入一个普通压缩包后再发送。",
    ),
    "MALWARE_SIGNATURE": (
        "The file matched a signature of known harmful content.",
        "文件匹配到已知有害内容的特征。",
        "Do not open the file again; contact your IT security team.",
        "请勿再次打开该文件，并联系信息安全部门。",
    ),
    "XML_DTD_FORBIDDEN": (
        "The XML document contains a DTD or entity declarations, which are not allowed.",
        "该XML文档包含不被允许的DTD或实体声明。",
        "Export the data again without a DTD, or ask the sender of the data to do so.",
        "请重新导出不含DTD的数据，或请数据提供方重新导出。",
    ),
    "SCHEMA_INVALID": (
        "The data does not have the structure this channel expects.",
        "数据不符合该通道要求的结构。",
        "Check the data against the agreed format, correct it and submit it again.",
        "请对照约定的格式检查并更正数据后重新提交。",
    ),
    "ACTIVE_CONTENT_DISALLOWED": (
        "The file contains active content (macros, scripts or embedded programs).",
        "文件包含活动内容（宏、脚本或嵌入的程序）。",
        "Save a copy without macros or scripts (for example as PDF) and submit that.",
        "请另存一份不含宏或脚本的副本（例如PDF）后再提交。",
    ),
    "FILTER_ERROR": (
        "The file could not be checked because the gateway's checking step failed.",
        "由于网关的检查环节出错，无法检查该文件。",
        "Submit the file again later; if it keeps failing, contact the helpdesk.",
        "请稍后重新提交，如仍然失败，请联系服务台。",
    ),
    "CHANGED_DURING_COPY": (
        "The file was changed while the gateway was copying it.",
        "网关复制文件时，该文件被修改。",
        "Wait until the file is completely saved, then put it in the folder again.",
        "请等文件完全保存后，再将其放入文件夹。",
    ),
}
_GENERIC = (
    "The file did not pass the gateway's checks.",
    "文件未通过网关的检查。",
    "Contact the helpdesk for advice.",
    "请联系服务台咨询。",
)


def reason_text(reason_code: str) -> tuple[str, str, str, str]:
    """(why, 原因, what you can do, 您可以) for a reason code, generic for unknown codes."""
    return _REASONS.get(reason_code, _GENERIC)


@dataclass(frozen=True)
class QuarantineRecord:
    path: Path  # where the item now is (for a note: the name kept for it, where nothing is)
    reason_json: Path
    reason_txt: Path


def _clean_char(c: str) -> str:
    if c in BIDI_AND_INVISIBLE or unicodedata.category(c) in {"Cc", "Cf", "Cs", "Co", "Cn"}:
        return "_"
    if c in '/\\:*?"<>|':
        return "_"
    return c


def safe_name(untrusted: str) -> str:
    """One safe, visible path component derived from an untrusted file name."""
    name = untrusted.replace("\\", "/").rsplit("/", 1)[-1]
    name = unicodedata.normalize("NFC", name)
    name = unicodedata.normalize("NFC", "".join(_clean_char(c) for c in name))
    name = name.strip().rstrip(" .")  # Windows drops trailing dots and spaces
    if not name:
        return "unnamed"
    if name.startswith("."):
        name = "_" + name[1:]
    if name.split(".", 1)[0].upper() in RESERVED:
        name = "_" + name
    if len(name.encode()) > MAX_NAME_BYTES:
        p = PurePosixPath(name)
        suffix = p.suffix if len(p.suffix.encode()) <= MAX_SUFFIX_BYTES else ""
        stem = name[: len(name) - len(suffix)].encode()[: MAX_NAME_BYTES - len(suffix.encode())]
        name = stem.decode("utf-8", "ignore").rstrip(" .") + suffix
    return name


def _display(text: str, limit: int = MAX_DISPLAY_CHARS) -> str:
    """Untrusted text made safe to show: invisible and control characters spelled out."""
    out = "".join(
        f"\\u{ord(c):04x}"
        if c in BIDI_AND_INVISIBLE or unicodedata.category(c) in {"Cc", "Cf", "Cs"}
        else c
        for c in text[:limit]
    )
    return out + ("..." if len(text) > limit else "")


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _rfc3339(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _exists(dfd: int, name: str) -> bool:
    try:
        os.lstat(name, dir_fd=dfd)
    except FileNotFoundError:
        return False
    return True


def _fsync_fd(fd: int) -> None:
    os.fsync(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_if_same(src: Path, src_dir: int | None, st: os.stat_result) -> None:
    """Remove the name ``src`` if it still names the file ``st`` (a clerk who saved again
    during the copy keeps the new version, taken in its turn)."""
    try:
        if os.path.samestat(os.lstat(src, dir_fd=src_dir), st):
            os.unlink(src, dir_fd=src_dir)
    except FileNotFoundError:
        pass


def _fsync_src_dir(src: Path, src_dir: int | None) -> None:
    if src_dir is None:
        _fsync_dir(src.parent)
    else:
        os.fsync(src_dir)


def _write_atomic(dfd: int, name: str, fill: Callable[[int], None]) -> None:
    """Create ``name`` in the folder: temp file, ``fill(fd)``, fsync, rename (not the folder).
    The file has the folder's permissions (:func:`ferry.place.share_like_folder`): clerks
    allowed to read the quarantine folder read the reasons."""
    tmp = f".{name}.{secrets.token_hex(4)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600, dir_fd=dfd)
    try:
        try:
            share_like_folder(fd, os.fstat(dfd))
            fill(fd)
            _fsync_fd(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _copy_from(src_fd: int) -> Callable[[int], None]:
    def fill(fd: int) -> None:
        os.lseek(src_fd, 0, os.SEEK_SET)
        while chunk := os.read(src_fd, COPY_CHUNK):
            _write_all(fd, chunk)

    return fill


class Quarantine:
    """One quarantine folder; safe to share between threads and processes (folder lock)."""

    def __init__(self, folder: Path, *, clock: Callable[[], datetime] = _utc_now) -> None:
        self.folder = Path(os.path.abspath(folder))
        self._clock = clock

    def put_file(
        self,
        src: Path,
        *,
        channel: str,
        original_name: str,
        reason_code: str,
        message: str,
        item_id: str | None = None,
        sha256: str | None = None,
        details: Mapping[str, Any] | None = None,
        move: bool = True,
        src_dir: int | None = None,
        expect: tuple[int, int] | None = None,
        quiet: bool = False,
    ) -> QuarantineRecord:
        """Move (or copy) a regular file in; a symlink or special file raises OSError.
        ``src_dir``: ``src`` is a name in that open folder (opened one level at a time by
        the caller: what is moved then stays the file in that very folder). ``expect``:
        the (device, inode) the file must still be (OSError if it was replaced).
        ``quiet``: a failure is logged at debug level only (a move tried again)."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        src_fd = os.open(src, flags, dir_fd=src_dir)
        try:
            st = os.fstat(src_fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file (use put_note)", str(src))
            if expect is not None and (st.st_dev, st.st_ino) != expect:
                raise OSError(errno.ESTALE, "replaced since it was checked", str(src))

            def place(dfd: int, name: str) -> None:
                self._place_file(dfd, name, src, src_fd, st, move=move, src_dir=src_dir)

            return self._put(
                place,
                size=st.st_size,
                channel=channel,
                original_name=original_name,
                reason_code=reason_code,
                message=message,
                item_id=item_id,
                sha256=sha256,
                details=details,
                quiet=quiet,
            )
        finally:
            os.close(src_fd)

    def put_bytes(
        self,
        data: bytes,
        *,
        channel: str,
        original_name: str,
        reason_code: str,
        message: str,
        item_id: str | None = None,
        sha256: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> QuarantineRecord:
        """Store content held in memory (e.g. a rejected API message)."""

        def place(dfd: int, name: str) -> None:
            _write_atomic(dfd, name, partial(_write_all, data=data))

        return self._put(
            place,
            size=len(data),
            channel=channel,
            original_name=original_name,
            reason_code=reason_code,
            message=message,
            item_id=item_id,
            sha256=sha256,
            details=details,
        )

    def put_note(
        self,
        *,
        channel: str,
        original_name: str,
        reason_code: str,
        message: str,
        item_id: str | None = None,
        sha256: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> QuarantineRecord:
        """Only the reason files, for an item that cannot be moved (a symlink, a FIFO...)."""
        return self._put(
            None,
            size=None,
            channel=channel,
            original_name=original_name,
            reason_code=reason_code,
            message=message,
            item_id=item_id,
            sha256=sha256,
            details=details,
        )

    # -- internals ----------------------------------------------------------------------------

    def _open_folder(self) -> int:
        """The folder (created 0700 if missing), opened without following links and locked."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        dfd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fcntl.flock(dfd, fcntl.LOCK_EX)
        except BaseException:
            os.close(dfd)
            raise
        return dfd

    def _put(
        self,
        place: Callable[[int, str], None] | None,
        *,
        size: int | None,
        channel: str,
        original_name: str,
        reason_code: str,
        message: str,
        item_id: str | None,
        sha256: str | None,
        details: Mapping[str, Any] | None,
        quiet: bool = False,
    ) -> QuarantineRecord:
        base = safe_name(original_name)
        now = _rfc3339(self._clock())
        dfd = self._open_folder()
        try:
            name = next(
                (
                    n
                    for n in candidate_names(base)
                    if not any(_exists(dfd, x) for x in (n, n + REASON_JSON, n + REASON_TXT))
                ),
                None,
            )
            if name is None:
                raise OSError(errno.EEXIST, "too many quarantined items of this name", base)
            doc = {
                "version": 1,
                "reason_code": reason_code,
                "message": message,
                "channel": channel,
                "original_name": original_name,
                "stored_name": name if place is not None else None,
                "size": size,
                "sha256": sha256,
                "item_id": item_id,
                "quarantined_at": now,
                "details": dict(details or {}),
            }
            # ASCII-only JSON: an undecodable original name (lone surrogates) still serialises.
            as_json = (json.dumps(doc, indent=2, default=str) + "\n").encode("ascii")
            as_text = _reason_txt(doc).encode("utf-8", "backslashreplace")
            written: list[str] = []
            try:
                for reason_name, content in (
                    (name + REASON_JSON, as_json),
                    (name + REASON_TXT, as_text),
                ):
                    _write_atomic(dfd, reason_name, partial(_write_all, data=content))
                    written.append(reason_name)
                sync_names_at(dfd, written)  # (on a share: see ferry.place.sync_names)
                if place is not None:
                    place(dfd, name)
            except OSError as exc:
                if place is None or not _exists(dfd, name):
                    # The item is still where it was: leave no reason files pointing at nothing.
                    for w in written:
                        with contextlib.suppress(OSError):
                            os.unlink(w, dir_fd=dfd)
                    with contextlib.suppress(OSError):
                        _fsync_fd(dfd)
                failed = _log.error
                if quiet:
                    failed = _log.debug
                elif exc.errno == errno.ESTALE:  # (saved again)
                    failed = _log.info
                failed(
                    "quarantine_failed",
                    channel=channel,
                    reason_code=reason_code,
                    item_id=item_id,
                    folder=str(self.folder),
                    error=str(exc),
                )
                raise
        finally:
            os.close(dfd)
        _log.info(
            "quarantined",
            channel=channel,
            reason_code=reason_code,
            item_id=item_id,
            stored_name=name,
            stored=place is not None,
            size=size,
        )
        return QuarantineRecord(
            self.folder / name,
            self.folder / (name + REASON_JSON),
            self.folder / (name + REASON_TXT),
        )

    def _place_file(
        self,
        dfd: int,
        name: str,
        src: Path,
        src_fd: int,
        st: os.stat_result,
        *,
        move: bool,
        src_dir: int | None,
    ) -> None:
        if move:
            # One rename (whole). What came in is then checked to be the file that was
            # checked: its name, in the clerk's own folder, may have been swapped since. A
            # symlink holds nothing and is not kept (a release would follow it); another
            # file or folder of the clerk's is kept as it is (nothing of theirs is lost),
            # said, and never released for the content that was checked (its hash).
            try:
                os.rename(src, name, src_dir_fd=src_dir, dst_dir_fd=dfd)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
            else:
                moved = os.lstat(name, dir_fd=dfd)
                if stat.S_ISLNK(moved.st_mode):
                    os.unlink(name, dir_fd=dfd)
                    raise OSError(errno.ESTALE, "replaced by a symlink while it was moved", name)
                sync_names_at(dfd, [name] if stat.S_ISREG(moved.st_mode) else [])
                _fsync_src_dir(src, src_dir)
                if not os.path.samestat(moved, st):
                    _log.warning("quarantine_source_replaced", name=name)
                return
        vfs = os.fstatvfs(dfd)  # (a copy that cannot fit would only fill that disk, every try)
        if vfs.f_blocks and vfs.f_bavail * vfs.f_frsize < st.st_size + COPY_ROOM_MARGIN:
            raise OSError(errno.ENOSPC, "no room for it on the quarantine folder's disk", name)
        _write_atomic(dfd, name, _copy_from(src_fd))
        sync_names_at(dfd, [name])  # (on a share: see ferry.place.sync_names)
        if move:  # the copy is durable: only now let the original go (if it is still it)
            try:
                _unlink_if_same(src, src_dir, st)
            except OSError:  # (not the agent's to remove: no copy left to pile up)
                os.unlink(name, dir_fd=dfd)
                raise
            _fsync_src_dir(src, src_dir)


def _reason_txt(doc: Mapping[str, Any]) -> str:
    why, why_zh, todo, todo_zh = reason_text(str(doc["reason_code"]))
    stored = doc["stored_name"]
    item_id = doc["item_id"]
    if stored is not None:
        happened = (
            "Your file was NOT sent to the internal network. It has been moved here, to the "
            "quarantine folder, and nothing of it was transferred."
        )
        happened_zh = "您的文件未被发送到内网。该文件已被移到此隔离文件夹，没有任何内容被传送。"
        kept = _display(str(stored))
    else:
        happened = (
            "Your file was NOT sent to the internal network. It could not be moved here, so "
            "only this note was written."
        )
        happened_zh = "您的文件未被发送到内网。该文件无法移到此处，因此只记录了这份说明。"
        kept = "-"
    if item_id:
        quote = f"quote the item id {_display(str(item_id))}"
        quote_zh = f"提供编号 {_display(str(item_id))}"
    else:
        quote = "quote the file name and time above"
        quote_zh = "提供上面的文件名和时间"
    lines = [
        "FILE NOT TRANSFERRED / 文件未传送",
        "",
        f"File / 文件：{_display(str(doc['original_name']))}",
        f"Kept here as / 隔离文件名：{kept}",
        f"Channel / 通道：{_display(str(doc['channel']))}",
        f"Time (UTC) / 时间（UTC）：{doc['quarantined_at']}",
        f"Item id / 编号：{_display(str(item_id)) if item_id else '-'}",
        "",
        f"What happened: {happened}",
        f"处理结果：{happened_zh}",
        "",
        f"Why: {why}",
        f"原因：{why_zh}",
        f"Reason code / 原因代码：{_display(str(doc['reason_code']))}",
        f"Details / 详细信息：{_display(str(doc['message']))}",
        "",
        f"What you can do: {todo}",
        f"您可以：{todo_zh}",
        "",
        f"If you need help, contact the helpdesk and {quote}.",
        f"如需帮助，请联系服务台并{quote_zh}。",
        "",
    ]
    return "\n".join(lines)
