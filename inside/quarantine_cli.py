"""``ferry inside quarantine list | show | release -c inside.yaml``: the files the inside
re-check refused (:mod:`inside.quarantine`).

``show`` prints the item's record with what the re-check found and the outside's report;
``release`` (security-admin key; its public key must equal ``keys/security-admin.pub`` next to
the inside config, or ``--admin-public``) delivers the file into its channel's folder once.
An item is named by its id (32 hex digits) or its stored name ``<id>.obj``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ferry.crypto.keys import load_secret_key
from ferry.errors import UsageError
from ferry.quarantine_release import (
    add_quarantine_parser,
    admin_key_if_present,
    list_items,
    print_json,
    print_list,
    show_item,
    trusted_admin_key,
)
from inside.quarantine import release_item, stored_name

QUARANTINE = "quarantine"  # under the inside state folder (inside.agent keeps it there)


def _load(config: Path) -> tuple[Path, dict[str, Path], dict[str, bool]]:
    """The quarantine folder, each files channel's delivery folder and subfolder switch."""
    from ferry.config import load_inside_config  # noqa: PLC0415

    cfg = load_inside_config(config)
    files = [c for c in cfg.channels if c.kind == "files" and c.deliver is not None]
    return (
        cfg.state_dir / QUARANTINE,
        {c.name: c.deliver for c in files if c.deliver is not None},
        {c.name: c.subfolders for c in files},
    )


def _cmd_list(args: argparse.Namespace) -> int:
    folder, folders, _ = _load(Path(args.config))
    if args.channel is not None and args.channel not in folders:
        raise UsageError(f"no files channel {args.channel!r} ({', '.join(folders)})")
    rows = [
        item
        for item in list_items(folder, admin_key_if_present(Path(args.config), args.admin_public))
        if args.channel is None or item.get("channel") == args.channel
    ]
    print_list(rows, as_json=args.json)
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    folder, _, _ = _load(Path(args.config))
    doc = show_item(
        folder,
        stored_name(args.item),
        admin_key_if_present(Path(args.config), args.admin_public),
    )
    if args.json:
        print_json(doc)
        return 0
    flag = "released" if doc["released"] else ("kept" if doc["present"] else "file missing")
    for label, key in (
        ("Item", "item_id"),
        ("Channel", "channel"),
        ("Name", "original_name"),
        ("Subfolder", "path"),
        ("Size", "size"),
        ("SHA-256", "sha256"),
        ("Reason", "reason_code"),
        ("Quarantined", "quarantined_at"),
    ):
        if doc.get(key) not in (None, ""):
            print(f"{label + ':':13}{doc[key]}")
    print(f"{'State:':13}{flag}")
    print(f"{'Message:':13}{doc.get('message')}")
    details: Any = doc.get("details") if isinstance(doc.get("details"), dict) else {}
    if details.get("recheck"):
        print("Re-check findings:")
        print_json(details["recheck"])
    if details.get("outside_report"):
        print("The outside's report:")
        print_json(details["outside_report"])
    return 0


def _cmd_release(args: argparse.Namespace) -> int:
    config = Path(args.config)
    folder, folders, subfolders = _load(config)
    out = release_item(
        folder,
        args.item,
        folders=folders,
        subfolders=subfolders,
        key=load_secret_key(Path(args.key), ("ed25519",)),
        trusted=trusted_admin_key(config, args.admin_public),
        note=args.note or "",
    )
    if args.json:
        print_json(out)
    elif out["status"] == "already released":
        if out["finished"]:
            done = f"finished its interrupted delivery as {out['delivered_as']}"
        elif out["delivered_as"]:
            done = f"delivered as {out['delivered_as']}"
        else:  # (an interruption before the delivered line, and the file since taken)
            done = "no delivered file found; nothing delivered now"
        print(f"{args.item}: already released on {out.get('released_at')}; {done}")
    else:
        print(f"{args.item}: released; delivered as {out['delivered_as']}")
    return 0


def add_parser(sub: Any) -> None:
    """Register ``quarantine`` under ``ferry inside``."""
    add_quarantine_parser(
        sub,
        {"list": _cmd_list, "show": _cmd_show, "release": _cmd_release},
        config_help="the inside agent's config",
        item_help="the item's id (32 hex digits) or stored name (<id>.obj)",
        release_help="deliver an item into its channel's folder (needs the security-admin key)",
        channel_help="only this files channel's items",
        override=False,
        channel_actions=("list",),  # an item's record names its channel
    )
