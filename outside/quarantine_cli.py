"""``ferry quarantine list | show | release`` (also ``ferry outside quarantine``): the outside's
quarantined items.

Items live in each files channel's quarantine folder as ``<name>`` + ``<name>.reason.json``
(+ ``.reason.txt``), written by :mod:`outside.quarantine`; the JSON's ``details`` holds the
content report when the content pipeline refused the item.

Release needs the security-admin key (Ed25519; ``ferry keygen --role security-admin``, or the
one ``ferry init`` leaves in ``admin/``). Its public key must equal the trusted one
(``keys/security-admin.pub`` next to the outside config, or ``--admin-public``). A release
(the shared steps are :mod:`ferry.quarantine_release`'s):

1. takes the quarantine folder's lock;
2. if a verified line of ``releases.jsonl`` already records this item, only finishes an
   interrupted move and reports ``already released`` (releasing twice never delivers twice);
3. appends a signed ``quarantine.released`` record (fsync), then moves the item back into
   the channel's drop folder under its safe original name. The intake takes it again and
   **every content check applies again**; with ``--override CODE`` the record also names the
   one reason code the administrator accepts for this exact file (by SHA-256), which the
   intake honours (:func:`overrides_by_sha`): that one refusal is set aside and every other
   check still applies. Codes that would let active or hostile content through cannot be
   overridden (:data:`NOT_OVERRIDABLE`); only :data:`HONOURED_OVERRIDES` can be set aside.

The record is also logged (structlog ``quarantine.released``) and passed to ``on_record``; the
agent follows ``releases.jsonl`` and records each line in its audit log
(:class:`ferry.quarantine_release.ReleaseAuditor`).
"""

from __future__ import annotations

import argparse
import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ferry import log
from ferry.crypto.keys import PublicKey, SecretKey, load_secret_key
from ferry.errors import UsageError
from ferry.names import candidate_names
from ferry.place import drop_temp, rename_new, sync_names, temp_name
from ferry.quarantine_release import (
    EVENT,
    RELEASES,
    add_quarantine_parser,
    admin_key_if_present,
    append_release,
    check_admin_key,
    check_stored_name,
    list_items,
    locked,
    log_fields,
    new_record,
    now,
    previous_release,
    print_json,
    print_list,
    releases,
    sha256_file,
    show_item,
    sign_record,
    trusted_admin_key,
    verify_record,
)
from outside.quarantine import REASON_TXT, safe_name

__all__ = [
    "EVENT",
    "HONOURED_OVERRIDES",
    "NOT_OVERRIDABLE",
    "RELEASES",
    "add_parser",
    "list_items",
    "overrides_by_sha",
    "release_item",
    "show_item",
    "sign_record",
    "verify_record",
]

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
# Refusals the intake can set aside for one released file while every other check still
# applies (see outside.content.pipeline.override_inputs and FolderIntake): the name, the
# name's extension, the type allow-list, the file-size limit.
HONOURED_OVERRIDES = frozenset(
    {"FILENAME_POLICY", "TYPE_MISMATCH", "TYPE_NOT_ALLOWED", "LIMIT_EXCEEDED"}
)

_log = log.get("outside.quarantine")


# ----------------------------------------------------------------------------- overrides
def overrides_by_sha(folder: Path, trusted: PublicKey) -> dict[str, frozenset[str]]:
    """SHA-256 → the reason codes verified releases accepted for that file (forged or
    unsigned lines, and codes that can never be overridden, are left out)."""
    found: dict[str, set[str]] = {}
    for r in releases(folder):
        code = r.get("override")
        sha = r.get("sha256")
        if not isinstance(code, str) or not isinstance(sha, str) or code in NOT_OVERRIDABLE:
            continue
        if verify_record(r, trusted):
            found.setdefault(sha, set()).add(code)
    return {sha: frozenset(codes) for sha, codes in found.items()}


# ----------------------------------------------------------------------------- release
def _move_back(folder: Path, stored_name: str, original: str, drop: Path) -> str | None:
    """Move the item into the drop folder under a free name, whole (the watcher takes it at
    once); None if it is no longer in the quarantine folder. It leaves the quarantine folder
    only once it is in the drop folder under that name: a crash before leaves it where it
    was, for the release to be run again."""
    src = folder / stored_name
    if not _regular(src):  # (never a symlink: a release must not follow one elsewhere)
        return None
    drop.mkdir(parents=True, exist_ok=True)
    for candidate in candidate_names(safe_name(original)):
        if (drop / candidate).exists():
            continue
        try:
            _place_in(src, drop, candidate)
        except FileExistsError:  # (taken meanwhile)
            continue
        return candidate
    raise UsageError(f"{drop}: too many files named {safe_name(original)!r}")


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _place_in(src: Path, drop: Path, name: str) -> None:
    """``src`` renamed to ``drop/name`` in one step, never over a file; on another file
    system copied under a temp name, synced, given the name, and only then removed."""
    try:
        rename_new(src, drop / name)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    else:
        sync_names(drop, [name])
        return
    tmp = drop / temp_name()
    try:
        with src.open("rb") as fin, tmp.open("xb") as fout:
            while chunk := fin.read(1 << 20):
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        rename_new(tmp, drop / name)
    finally:
        drop_temp(tmp)
    sync_names(drop, [name])
    src.unlink()


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
    clock: Callable[[], str] = now,
) -> dict[str, Any]:
    """Release one item back into ``drop`` (idempotent); returns the release record plus
    ``status`` (``released`` or ``already released``) and ``resubmitted_as``."""
    check_stored_name(stored_name)
    check_admin_key(key, trusted)
    with locked(folder):
        doc = show_item(folder, stored_name, trusted)
        if override is not None:
            if override != doc.get("reason_code"):
                raise UsageError(
                    f"--override {override} does not match the item's reason "
                    f"{doc.get('reason_code')}"
                )
            if override in NOT_OVERRIDABLE:
                raise UsageError(f"{override} cannot be overridden; the item stays refused")
            if override not in HONOURED_OVERRIDES:
                raise UsageError(
                    f"the intake cannot set {override} aside (it can: "
                    f"{', '.join(sorted(HONOURED_OVERRIDES))}); release without --override "
                    "to have the file checked again"
                )
        previous = previous_release(folder, stored_name, trusted)
        if previous is not None:
            moved = _move_back(folder, stored_name, str(doc.get("original_name")), drop)
            return dict(previous, status="already released", resubmitted_as=moved)
        if not doc["present"]:
            raise UsageError(f"item {stored_name!r} has no file to release (only a note)")
        seen = sha256_file(folder / stored_name)  # (what is released: what is signed)
        if override is not None and doc.get("sha256") not in (None, seen):
            raise UsageError(
                f"item {stored_name!r} is no longer the content that was checked (its SHA-256 "
                "differs from the one recorded when it was refused); release it without "
                "--override to have it checked again"
            )
        record = new_record(
            doc,
            stored_name,
            seen,
            channel=channel,
            key=key,
            override=override,
            note=note,
            clock=clock,
        )
        append_release(folder, record)
        moved = _move_back(folder, stored_name, str(doc.get("original_name")), drop)
    _log.info(EVENT, **log_fields(record), resubmitted_as=moved)
    if on_record is not None:
        on_record(record)
    return dict(record, status="released", resubmitted_as=moved)


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
    trusted = admin_key_if_present(Path(args.config), args.admin_public)
    wanted = [args.channel] if args.channel else list(channels)
    rows = []
    for name in wanted:
        if name not in channels:
            raise UsageError(f"no files channel {name!r}")
        rows += [dict(item, channel=name) for item in list_items(channels[name][0], trusted)]
    print_list(rows, as_json=args.json)
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    _, quarantine, _ = _pick(args)
    doc = show_item(
        quarantine, args.item, admin_key_if_present(Path(args.config), args.admin_public)
    )
    if args.json:
        print_json(doc)
    else:
        txt = quarantine / (args.item + REASON_TXT)
        if txt.is_file():
            print(txt.read_text("utf-8", "replace"))
        else:
            print_json(doc)
        report = (
            doc.get("details", {}).get("report") if isinstance(doc.get("details"), dict) else None
        )
        if report:
            print("Content report:")
            print_json(report)
    return 0


def _cmd_release(args: argparse.Namespace) -> int:
    channel, quarantine, drop = _pick(args)
    key = load_secret_key(Path(args.key), ("ed25519",))
    trusted = trusted_admin_key(Path(args.config), args.admin_public)
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
        print_json(out)
    elif out["status"] == "already released":
        print(f"{args.item}: already released on {out.get('released_at')}; nothing done")
    else:
        print(
            f"{args.item}: released; resubmitted to {drop} as {out['resubmitted_as']} "
            "(content checks apply again)"
        )
    return 0


def add_parser(sub: Any) -> None:
    """Register ``quarantine`` (the outside's) on a subparsers object: ``ferry quarantine``
    and ``ferry outside quarantine``."""
    add_quarantine_parser(
        sub,
        {"list": _cmd_list, "show": _cmd_show, "release": _cmd_release},
        config_help="the outside agent's config",
        item_help="the item's stored name in the quarantine folder",
        release_help="release an item back to its drop folder (needs the security-admin key)",
        channel_help="files channel (default: the only one)",
        override=True,
    )
