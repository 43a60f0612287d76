"""``ferry inside mirror status -c inside.yaml``: how far the inside's copy of the outside's
audit log reaches, and where to resend from when it stopped growing.

The mirror (:mod:`inside.mirror`) only ever writes a piece that continues its file, so each
file on disk is a whole prefix of the outside's. A segment is known whole once the next one's
opening record names its exact size; the place to resend from is the end of the first segment
not known whole (``ferry outside mirror resend --from <that place>`` on the outside;
docs/AUDIT.md §8).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ferry.audit.segments import CHECKPOINTS_FILE, list_segments, segment_name
from ferry.errors import UsageError
from inside.mirror import segment_complete


def _mirror_dir(config: Path) -> Path:
    from ferry.config import load_inside_config  # noqa: PLC0415

    cfg = load_inside_config(config)
    if cfg.audit is None or cfg.audit.mirror_dir is None:
        raise UsageError(f"{config}: this inside keeps no mirror (audit.mirror_dir is not set)")
    return cfg.audit.mirror_dir


def status(mirror_dir: Path) -> dict[str, Any]:
    """Each mirrored file and its size, and ``resend_from``: where the copy stops being
    known whole."""
    segments = list_segments(mirror_dir) if mirror_dir.is_dir() else []
    files = [{"file": p.name, "size": p.stat().st_size} for _, p in segments]
    checkpoints = mirror_dir / CHECKPOINTS_FILE
    if checkpoints.is_file():
        files.append({"file": CHECKPOINTS_FILE, "size": checkpoints.stat().st_size})
    start = f"{segment_name(1)}@0"
    for number, path in segments:  # the first one not known whole
        start = f"{path.name}@{path.stat().st_size}"
        if not segment_complete(mirror_dir, number):
            break
    return {"mirror_dir": str(mirror_dir), "files": files, "resend_from": start}


def _cmd_status(args: argparse.Namespace) -> int:
    out = status(_mirror_dir(Path(args.config)))
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"mirror of the outside's audit log: {out['mirror_dir']}")
    for row in out["files"]:
        print(f"  {row['file']:24} {row['size']:12d} bytes")
    print(
        "if it stopped growing (a link.sequence_gap on channel _audit), run on the outside:\n"
        f"  ferry outside mirror resend -c outside.yaml --from {out['resend_from']}"
    )
    return 0


def add_parser(sub: Any) -> None:
    """Register ``mirror`` under ``ferry inside``."""
    mp = sub.add_parser("mirror", help="the inside's copy of the outside's audit log")
    msub = mp.add_subparsers(dest="mirror_action", required=True)
    st = msub.add_parser("status", help="how far the copy reaches; where to resend from")
    st.add_argument("-c", "--config", required=True, help="the inside agent's config")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_cmd_status)
