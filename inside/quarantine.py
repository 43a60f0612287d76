"""The inside quarantine: files the inside re-check refused, and their release.

The inside agent (:meth:`inside.agent.InsideAgent._reject`) keeps a refused file in
``<state_dir>/quarantine/`` as ``<item id>.obj`` (the content the outside signed, verified)
next to ``<item id>.obj.reason.json`` (:func:`keep_reason`, written first): channel, name,
subfolder, size, SHA-256 from the signed manifest, the reason and what the re-check found.

A release (``ferry inside quarantine release``, needs the security-admin key) delivers the
file into its channel's folder exactly once (:func:`release_item`), with the shared steps of
:mod:`ferry.quarantine_release`: under the folder's lock, the file is checked against its
record, a signed ``quarantine.released`` line is appended to ``releases.jsonl`` (fsync), then
the file is linked into the delivery folder under the first free safe name (the same names
and collision rule as a normal delivery; nothing is overwritten), a second signed line,
``delivery.delivered``, names the delivered path, and only then does the file leave the
quarantine. Releasing again finishes an interrupted release from the step it stopped at (a
candidate name that already holds the same content counts as the file it linked; after the
delivered line, only the quarantine copy is removed, so a file a consumer already took is
never delivered twice) or reports ``already released`` with the delivered path. There is
no override: the release itself is the administrator's decision against the re-check, and
the file is delivered as it is. A file in which YARA found a signature cannot be released at all.

The inside agent follows ``releases.jsonl`` and records each line in its audit log
(``quarantine.released``; ``delivery.delivered`` with the path, and its ledger then holds the
item as delivered there).
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ferry import log
from ferry.crypto.keys import PublicKey, SecretKey
from ferry.errors import PolicyRejection, UsageError
from ferry.quarantine_release import (
    EVENT,
    REASON_JSON,
    append_release,
    check_admin_key,
    check_stored_name,
    delivered_record,
    locked,
    log_fields,
    new_record,
    now,
    previous_delivery,
    previous_release,
    sha256_file,
    show_item,
)
from ferry.wire import records as rec
from inside.deliver import (
    find_same_content,
    fsync_dir,
    link_under_free_name,
    pinned_subfolder,
    subfolder_parts,
)

SUFFIX = ".obj"
# Reasons a release may never wave through (the file matched a malware signature inside).
NOT_RELEASABLE = frozenset({"MALWARE_SIGNATURE"})
# Re-check problems kept in the reason document (the audit record keeps the first five).
MAX_PROBLEMS = 50
_CODE = re.compile(r"([A-Z][A-Z_]{2,63}): ")
_ITEM_ID = re.compile(r"[0-9a-f]{32}")

_log = log.get("inside.quarantine")


def stored_name(item: str) -> str:
    """The stored name of an item given by its id (32 hex digits) or its stored name."""
    item = item.strip()
    if _ITEM_ID.fullmatch(item.lower()):
        return item.lower() + SUFFIX
    check_stored_name(item)
    if not item.endswith(SUFFIX) or not _ITEM_ID.fullmatch(item[: -len(SUFFIX)]):
        raise UsageError(f"not an inside item id: {item!r} (32 hex digits, or <id>{SUFFIX})")
    return item


def reason_code(reason: str, findings: Mapping[str, Any] | None) -> str:
    """The code of a refusal: MALWARE_SIGNATURE when YARA matched anything, else the
    ``CODE:`` the reason starts with (RECHECK_DISAGREES, RECHECK_MISSING...)."""
    problems = (findings or {}).get("problems") or ()
    if any("MALWARE_SIGNATURE" in str(p) for p in problems) or "MALWARE_SIGNATURE" in reason:
        return "MALWARE_SIGNATURE"
    match = _CODE.match(reason)
    return match.group(1) if match else "RECHECK_FAILED"


def keep_reason(
    folder: Path,
    oid: bytes,
    reason: str,
    manifest: rec.Manifest | None,
    findings: Mapping[str, Any] | None,
    *,
    clock: Callable[[], str] = now,
) -> Path:
    """Write ``<id>.obj.reason.json`` (temp file, fsync, rename, folder fsync) before the
    item itself is moved in; returns its path."""
    name = oid.hex() + SUFFIX
    details: dict[str, Any] = {"recheck": dict(findings or {})}
    problems = details["recheck"].get("problems")
    if isinstance(problems, list | tuple):
        details["recheck"]["problems"] = [str(p) for p in problems[:MAX_PROBLEMS]]
    doc: dict[str, Any] = {
        "version": 1,
        "side": "inside",
        "reason_code": reason_code(reason, findings),
        "message": reason,
        "stored_name": name,
        "item_id": oid.hex(),
        "quarantined_at": clock(),
        "details": details,
    }
    if manifest is not None:
        doc |= {
            "channel": manifest.channel,
            "original_name": manifest.name,
            "path": manifest.path,
            "seq": manifest.seq,
            "size": manifest.size,
            "sha256": manifest.sha256.hex(),
            "media_type": manifest.media_type,
            "subject": manifest.subject,
            "sender": manifest.sender.hex(),
        }
        try:
            details["outside_report"] = json.loads(manifest.report) if manifest.report else None
        except ValueError:
            details["outside_report"] = manifest.report
    target = folder / (name + REASON_JSON)
    tmp = folder / f".{name}.{secrets.token_hex(4)}.tmp"
    data = (json.dumps(doc, indent=2, ensure_ascii=True, default=str) + "\n").encode("ascii")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
    fsync_dir(folder)
    return target


# Where a released item goes: the channel's folder, the sender's subfolder, whether it is kept.
_Target = tuple[Path, str, bool]


def _target_folder(
    doc: Mapping[str, Any], folders: Mapping[str, Path], subfolders: Mapping[str, bool]
) -> _Target:
    channel = str(doc.get("channel"))
    root = folders.get(channel)
    if root is None:
        raise UsageError(f"channel {channel!r} has no delivery folder on this inside")
    relpath, keep = str(doc.get("path") or ""), subfolders.get(channel, False)
    if relpath and keep:
        subfolder_parts(relpath)  # (refused before anything is written)
    return root, relpath, keep


def _link(folder: Path, stored: str, doc: Mapping[str, Any], target: _Target) -> Path | None:
    """Link the quarantined file into the target folder under the first free safe name (a
    name already holding this content is the file an interrupted release linked); if the
    file has already left the quarantine (a release interrupted by an older ferry, which
    removed it before writing the delivered line), find the copy it delivered. None if
    there is neither. The subfolder is pinned (:func:`inside.deliver.pinned_subfolder`)."""
    root, relpath, keep = target
    src = folder / stored
    with pinned_subfolder(root, relpath, keep=keep) as (where, pinned):
        if not src.is_file():
            found = find_same_content(
                pinned, str(doc.get("original_name")), _sha(doc), _sha(doc)[:6].hex()
            )
            return None if found is None else where / found.name
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            linked = link_under_free_name(
                src,
                fd,
                os.fstat(fd).st_size,
                pinned,
                str(doc.get("original_name")),
                same_sha256=_sha(doc),
                tag=_sha(doc)[:6].hex(),  # (quarantined: not seen by the folder's users)
            )
        finally:
            os.close(fd)
        return where / linked.name


def _leave(folder: Path, stored: str) -> None:
    """The delivered item leaves the quarantine (its record and release lines stay)."""
    try:
        (folder / stored).unlink()
    except FileNotFoundError:
        return
    fsync_dir(folder)


def _check_intact(path: Path, doc: Mapping[str, Any]) -> None:
    """Refuse a quarantined file that no longer matches its record (size and SHA-256)."""
    want = _sha(doc).hex()
    try:  # (a symlink in its place is not followed: refused as tampered with)
        intact = path.stat().st_size == doc.get("size") and sha256_file(path) == want
    except OSError:
        intact = False
    if not intact:
        raise PolicyRejection(
            "QUARANTINE_TAMPERED",
            f"{path} no longer matches its record (size {doc.get('size')}, SHA-256 {want});"
            " it is not released",
        )


def _sha(doc: Mapping[str, Any]) -> bytes:
    try:
        digest = bytes.fromhex(str(doc.get("sha256")))
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise UsageError(f"item {doc.get('stored_name')!r} has no SHA-256 in its record")
    return digest


def release_item(
    folder: Path,
    item: str,
    *,
    folders: Mapping[str, Path],
    subfolders: Mapping[str, bool],
    key: SecretKey,
    trusted: PublicKey,
    note: str = "",
    clock: Callable[[], str] = now,
) -> dict[str, Any]:
    """Deliver one quarantined item into its channel's folder (idempotent); returns the
    release record plus ``status`` (``released`` or ``already released``), ``delivered_as``
    (the delivered path; None when none is known) and ``finished`` (this call completed an
    interrupted release).

    The steps, each durable before the next: the release line; the link into the delivery
    folder; the delivered line; the quarantine copy removed. Run again after a crash, it
    picks up where the first run stopped and never delivers a second copy: once the
    delivered line is written, only the quarantine copy is removed (a consumer may already
    have taken the delivered file)."""
    stored = stored_name(item)
    check_admin_key(key, trusted)
    with locked(folder):
        doc = show_item(folder, stored, trusted)
        previous = previous_release(folder, stored, trusted)
        if previous is not None:
            return _finish(
                folder, stored, doc, previous,
                folders=folders, subfolders=subfolders, key=key, trusted=trusted, clock=clock,
            )  # fmt: skip
        code = str(doc.get("reason_code"))
        if code in NOT_RELEASABLE:
            raise UsageError(f"item {stored} was refused for {code}; it cannot be released")
        if not doc["present"]:
            raise UsageError(f"item {stored!r} has no file to release")
        target_folder = _target_folder(doc, folders, subfolders)
        _check_intact(folder / stored, doc)
        record = new_record(
            doc,
            stored,
            _sha(doc).hex(),
            channel=str(doc.get("channel")),
            key=key,
            override=None,
            note=note,
            clock=clock,
        )
        append_release(folder, record)
        moved = _deliver(
            folder, stored, doc, record, target_folder=target_folder, key=key, clock=clock
        )
    _log.info(EVENT, **log_fields(record), delivered_as=_str(moved))
    return dict(record, status="released", delivered_as=_str(moved), finished=False)


def _finish(
    folder: Path,
    stored: str,
    doc: Mapping[str, Any],
    release: dict[str, Any],
    *,
    folders: Mapping[str, Path],
    subfolders: Mapping[str, bool],
    key: SecretKey,
    trusted: PublicKey,
    clock: Callable[[], str],
) -> dict[str, Any]:
    """An item released before: finish what an interrupted run left, with the same checks."""
    said = previous_delivery(folder, stored, trusted)
    if said is not None:  # delivered and said so: at most the quarantine copy is left
        finished = doc["present"]
        _leave(folder, stored)
        where = str(said.get("delivered_as"))
        return dict(release, status="already released", delivered_as=where, finished=finished)
    if doc["present"]:
        _check_intact(folder / stored, doc)
    target_folder = _target_folder(doc, folders, subfolders)
    moved = _deliver(
        folder, stored, doc, release, target_folder=target_folder, key=key, clock=clock
    )
    if moved is not None:
        _log.info("quarantine_release_finished", **log_fields(release), delivered_as=str(moved))
    return dict(
        release, status="already released", delivered_as=_str(moved), finished=moved is not None
    )


def _deliver(
    folder: Path,
    stored: str,
    doc: Mapping[str, Any],
    release: dict[str, Any],
    *,
    target_folder: _Target,
    key: SecretKey,
    clock: Callable[[], str],
) -> Path | None:
    """Link, say where (the delivered line), then let the item leave the quarantine."""
    moved = _link(folder, stored, doc, target_folder)
    if moved is None:
        return None
    _say_delivered(folder, release, doc, moved, key=key, clock=clock)
    _leave(folder, stored)
    return moved


def _say_delivered(
    folder: Path,
    release: dict[str, Any],
    doc: Mapping[str, Any],
    path: Path,
    *,
    key: SecretKey,
    clock: Callable[[], str],
) -> None:
    """Append the signed line naming where the release delivered the item: the agent
    records it as ``delivery.delivered`` with that path, and marks the item delivered in
    its ledger. (After a crash before this line, running the release again writes it.)
    The size is the record's, which the file matched (_check_intact): the delivered file
    may already be gone, taken by a consumer."""
    size = int(doc["size"])
    append_release(folder, delivered_record(release, path, size, key=key, clock=clock))


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)
