"""``ferry quarantine list | show | release``: look at and release quarantined items.

Items live in each files channel's quarantine folder as ``<name>`` + ``<name>.reason.json``
(+ ``.reason.txt``), written by :mod:`outside.quarantine`; the JSON's ``details`` holds the
content report when the content pipeline refused the item.

Release needs the security-admin key (Ed25519; ``ferry keygen --role security-admin``, or the
one ``ferry init`` leaves in ``admin/``). Its public key must equal the trusted one
(``keys/security-admin.pub`` next to the outside config, or ``--admin-public``). A release:

1. takes the quarantine folder's lock;
2. if ``releases.jsonl`` already records this item, only finishes an interrupted move and
   reports ``already released`` (releasing twice never delivers twice);
3. appends a signed ``quarantine.released`` record (fsync), then moves the item back into
   the channel's drop folder under its safe original name. The intake takes it again and
   **every content check applies again**; with ``--override CODE`` the record also names the
   one reason code the administrator accepts for this exact file (by SHA-256), for the intake
   to honour (:func:`overrides_for`). Codes that would let active or hostile content through
   cannot be overridden (:data:`NOT_OVERRIDABLE`).

The record is also logged (structlog ``quarantine.released``) and passed to ``on_record`` (the
agent routes it into the audit log).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import secrets
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ferry import log
from ferry.crypto.keys import PublicKey, SecretKey, load_public_key, load_secret_key
from ferry.errors import KeyFileError, UsageError
from ferry.jsondoc import canonical
from outside.quarantine import REASON_JSON, REASON_TXT, candidate_names, safe_name

RELEASES = "releases.jsonl"
EVENT = "quarantine.released"
SIGNING_CONTEXT = b"ferry-quarantine-release-v1\n"
# Refusals that must never be waved through: they mean hostile or unchecked content.
NOT_OVERRIDABLE = frozenset(
    {
        "MALWARE_SIGNATURE",
        "POLYGLOT",
        "ARCHIVE_BOMB",
        "ARCHIVE_TRAVERSAL",
        "ARCHIVE_DEPTH",
        "ENCRYPTED",
        "XML_DTD_FORBIDDEN",
        "ACTIVE_CONTENT_DISALLOWED",
        "FILTER_ERROR",
        "MALFORMED",
    }
)
# releases.jsonl larger than this is not read whole (a folder with that many releases is
# an incident of its own).
MAX_RELEASES_BYTES = 64 * 1024 * 1024

_log = log.get("outside.quarantine")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ----------------------------------------------------------------------------- reading
def list_items(folder: Path) -> list[dict[str, Any]]:
    """Every quarantined item's reason document (plus ``released``), oldest first."""
    released = {r["stored_name"] for r in _releases(folder)}
    items = []
    for path in sorted(folder.glob("*" + REASON_JSON)) if folder.is_dir() else []:
        try:
            doc = json.loads(path.read_text("ascii"))
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict):
            continue
        doc["stored_name"] = doc.get("stored_name") or path.name[: -len(REASON_JSON)]
        doc["released"] = doc["stored_name"] in released
        items.append(doc)
    items.sort(key=lambda d: (str(d.get("quarantined_at")), str(d["stored_name"])))
    return items


def show_item(folder: Path, stored_name: str) -> dict[str, Any]:
    _check_stored_name(stored_name)
    path = folder / (stored_name + REASON_JSON)
    try:
        doc: dict[str, Any] = json.loads(path.read_text("ascii"))
    except FileNotFoundError:
        raise UsageError(f"no quarantined item {stored_name!r} in {folder}") from None
    doc["released"] = any(r["stored_name"] == stored_name for r in _releases(folder))
    doc["present"] = (folder / stored_name).is_file()
    return doc


def _releases(folder: Path) -> Iterator[dict[str, Any]]:
    path = folder / RELEASES
    try:
        if path.stat().st_size > MAX_RELEASES_BYTES:
            raise UsageError(f"{path} is too large to read")
        lines = path.read_text("utf-8").splitlines()
    except FileNotFoundError:
        return
    for line in lines:
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and "stored_name" in record:
                yield record


def overrides_for(folder: Path, sha256: str, trusted: PublicKey) -> frozenset[str]:
    """Reason codes a verified release accepted for the file with this SHA-256."""
    return frozenset(
        str(r["override"])
        for r in _releases(folder)
        if r.get("sha256") == sha256 and r.get("override") and verify_record(r, trusted)
    )


# ----------------------------------------------------------------------------- signing
def _signed_bytes(record: dict[str, Any]) -> bytes:
    body = {k: v for k, v in record.items() if k != "signature"}
    return SIGNING_CONTEXT + canonical(body)


def sign_record(record: dict[str, Any], key: SecretKey) -> dict[str, Any]:
    signature = key.sign(_signed_bytes(record))
    return dict(record, signature=base64.b64encode(signature).decode("ascii"))


def verify_record(record: dict[str, Any], trusted: PublicKey) -> bool:
    try:
        signature = base64.b64decode(str(record["signature"]), validate=True)
        if record.get("admin_key_id") != trusted.key_id.hex():
            return False
        return trusted.verify(signature, _signed_bytes(record))
    except (KeyError, ValueError, TypeError):
        return False


# ----------------------------------------------------------------------------- release
def _check_stored_name(stored_name: str) -> None:
    if not stored_name or "/" in stored_name or stored_name in (".", "..") or "\0" in stored_name:
        raise UsageError(f"not an item name: {stored_name!r}")


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[int]:
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(dfd, fcntl.LOCK_EX)
        yield dfd
    finally:
        os.close(dfd)


def _append(folder: Path, record: dict[str, Any]) -> None:
    line = json.dumps(record, ensure_ascii=True, sort_keys=True) + "\n"
    fd = os.open(folder / RELEASES, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, line.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_back(folder: Path, stored_name: str, original: str, drop: Path) -> str | None:
    """Move the item into the drop folder (temp name, then rename: the watcher takes it at
    once); None if it is no longer in the quarantine folder."""
    src = folder / stored_name
    if not src.is_file():
        return None
    drop.mkdir(parents=True, exist_ok=True)
    for candidate in candidate_names(safe_name(original)):
        if not (drop / candidate).exists():
            break
    else:
        raise UsageError(f"{drop}: too many files named {safe_name(original)!r}")
    tmp = drop / f".ferry-release-{secrets.token_hex(6)}.part"
    try:
        os.rename(src, tmp)
    except OSError:  # another filesystem: copy, fsync, then let the original go
        with src.open("rb") as fin, tmp.open("xb") as fout:
            while chunk := fin.read(1 << 20):
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        src.unlink()
    os.rename(tmp, drop / candidate)
    return candidate


def release_item(
    folder: Path,
    stored_name: str,
    *,
    channel: str,
    drop: Path,
    key: SecretKey,
    trusted: PublicKey,
    override: str | None = None,
    note: str = "",
    on_record: Callable[[dict[str, Any]], None] | None = None,
    clock: Callable[[], str] = _now,
) -> dict[str, Any]:
    """Release one item back into ``drop`` (idempotent); returns the release record plus
    ``status`` (``released`` or ``already released``) and ``resubmitted_as``."""
    _check_stored_name(stored_name)
    if key.alg != "ed25519" or key.public != trusted:
        raise KeyFileError(
            "this key is not the security-admin key trusted by this gateway "
            f"(expected key id {trusted.key_id.hex()})"
        )
    with _locked(folder):
        doc = show_item(folder, stored_name)
        if override is not None:
            if override != doc.get("reason_code"):
                raise UsageError(
                    f"--override {override} does not match the item's reason "
                    f"{doc.get('reason_code')}"
                )
            if override in NOT_OVERRIDABLE:
                raise UsageError(f"{override} cannot be overridden; the item stays refused")
        previous = next((r for r in _releases(folder) if r["stored_name"] == stored_name), None)
        if previous is not None:
            moved = _move_back(folder, stored_name, str(doc.get("original_name")), drop)
            return dict(previous, status="already released", resubmitted_as=moved)
        if not doc["present"]:
            raise UsageError(f"item {stored_name!r} has no file to release (only a note)")
        record = {
            "version": 1,
            "event": EVENT,
            "channel": channel,
            "stored_name": stored_name,
            "original_name": doc.get("original_name"),
            "item_id": doc.get("item_id"),
            "sha256": doc.get("sha256") or _sha256(folder / stored_name),
            "reason_code": doc.get("reason_code"),
            "override": override,
            "note": note,
            "released_at": clock(),
            "admin_key_id": key.public.key_id.hex(),
        }
        record = sign_record(record, key)
        _append(folder, record)
        moved = _move_back(folder, stored_name, str(doc.get("original_name")), drop)
    fields = {k: v for k, v in record.items() if k not in ("signature", "event")}
    _log.info(EVENT, **fields, resubmitted_as=moved)
    if on_record is not None:
        on_record(record)
    return dict(record, status="released", resubmitted_as=moved)


def _sha256(path: Path) -> str:
    import hashlib  # noqa: PLC0415

    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- CLI
def _channels(config: Path) -> dict[str, tuple[Path, Path]]:
    from ferry.config import load_outside_config  # noqa: PLC0415

    cfg = load_outside_config(config)
    return {
        c.name: (c.quarantine, c.drop)
        for c in cfg.channels
        if c.quarantine is not None and c.drop is not None
    }


def _pick(args: argparse.Namespace) -> tuple[str, Path, Path]:
    channels = _channels(Path(args.config))
    if args.channel is None:
        if len(channels) != 1:
            raise UsageError(f"name a channel with --channel ({', '.join(channels)})")
        args.channel = next(iter(channels))
    if args.channel not in channels:
        raise UsageError(f"no files channel {args.channel!r} ({', '.join(channels)})")
    quarantine, drop = channels[args.channel]
    return args.channel, quarantine, drop


def _cmd_list(args: argparse.Namespace) -> int:
    channels = _channels(Path(args.config))
    wanted = [args.channel] if args.channel else list(channels)
    rows = []
    for name in wanted:
        if name not in channels:
            raise UsageError(f"no files channel {name!r}")
        rows += [dict(item, channel=name) for item in list_items(channels[name][0])]
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return 0
    if not rows:
        print("no quarantined items")
    for r in rows:
        flag = " (released)" if r["released"] else ""
        print(
            f"{r['channel']}  {r['stored_name']}  {r.get('reason_code')}  "
            f"{r.get('quarantined_at')}{flag}"
        )
        print(f"    {r.get('message')}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    _, quarantine, _ = _pick(args)
    doc = show_item(quarantine, args.item)
    if args.json:
        print(json.dumps(doc, ensure_ascii=False, indent=2))
    else:
        txt = quarantine / (args.item + REASON_TXT)
        print(txt.read_text("utf-8", "replace") if txt.is_file() else json.dumps(doc, indent=2))
        report = (
            doc.get("details", {}).get("report") if isinstance(doc.get("details"), dict) else None
        )
        if report:
            print("Content report:")
            print(json.dumps(report, ensure_ascii=False, indent=2))
    return 0


def _cmd_release(args: argparse.Namespace) -> int:
    channel, quarantine, drop = _pick(args)
    key = load_secret_key(Path(args.key), ("ed25519",))
    trusted_path = args.admin_public or str(Path(args.config).parent / "keys/security-admin.pub")
    trusted = load_public_key(trusted_path)
    out = release_item(
        quarantine,
        args.item,
        channel=channel,
        drop=drop,
        key=key,
        trusted=trusted,
        override=args.override,
        note=args.note or "",
    )
    if args.json:
        print(json.dumps(out, ensure_ascii=False, indent=2))
    elif out["status"] == "already released":
        print(f"{args.item}: already released on {out.get('released_at')}; nothing done")
    else:
        print(
            f"{args.item}: released; resubmitted to {drop} as {out['resubmitted_as']} "
            "(content checks apply again)"
        )
    return 0


def add_parser(sub: Any) -> None:
    """Register ``ferry quarantine`` on the top-level subparsers."""
    qp = sub.add_parser("quarantine", help="list, inspect and release quarantined files")
    qsub = qp.add_subparsers(dest="action", required=True)
    for action, func, helptext in (
        ("list", _cmd_list, "list quarantined items"),
        ("show", _cmd_show, "show one item's reason and content report"),
        ("release", _cmd_release, "release an item (needs the security-admin key)"),
    ):
        p = qsub.add_parser(action, help=helptext)
        p.add_argument("-c", "--config", required=True, help="the outside agent's config")
        p.add_argument("--channel", help="files channel (default: the only one)")
        p.add_argument("--json", action="store_true")
        if action != "list":
            p.add_argument("item", help="the item's stored name in the quarantine folder")
        if action == "release":
            p.add_argument("--key", required=True, help="the security-admin secret key file")
            p.add_argument(
                "--admin-public",
                help="trusted security-admin public key "
                "(default: keys/security-admin.pub next to the config)",
            )
            p.add_argument("--override", help="the item's reason code to accept for this file")
            p.add_argument("--note", help="why the item is released (kept in the record)")
        p.set_defaults(func=func)
