"""Realistic outside + inside audit logs for the auditor's tools (docs/AUDIT.md §7).

Written with the real :class:`ferry.audit.AuditLog` and a fake clock, so the
records are exactly what agents write and the timestamps are deterministic.
``standard(root)`` builds the scenario most tests use; see its docstring.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ferry.audit import AuditLog, AuditObject, AuditSettings, Subject
from ferry.crypto.keys import SecretKey

OUT_KEY = SecretKey("ed25519", bytes(range(32)))
IN_KEY = SecretKey("ed25519", bytes(range(100, 132)))
T0 = int(datetime(2026, 11, 21, 9, 0, tzinfo=UTC).timestamp()) * 1_000_000
S = 1_000_000  # one second in microseconds
DROP = Subject.clerk_folder("/srv/ferry/drop/permits", "files/permits")
PEER = Subject("peer", "a1b2c3d4")
HOSTILE_NAME = '<script>alert("x")</script>\x1b[31m\u202e=cmd|\' /C calc\'!A0 & "quotes"'


def item_id(n: int) -> str:
    return f"{n:032x}"


@dataclass
class Clock:
    """A settable clock for the writer (microseconds)."""

    t: int

    def __call__(self) -> int:
        return self.t


@dataclass
class _Event:
    t: int
    order: int
    event: str
    kw: dict[str, Any]


@dataclass
class Builder:
    """Collects events per side, then writes both logs in time order."""

    root: Path
    events: dict[str, list[_Event]] = field(default_factory=lambda: {"outside": [], "inside": []})
    open_logs: list[AuditLog] = field(default_factory=list)

    def add(self, side: str, t: int, event: str, **kw: Any) -> None:
        seq = len(self.events[side])
        self.events[side].append(_Event(t, seq, event, kw))

    # outside
    def accept(
        self,
        item: str,
        t: int,
        *,
        seq: int,
        channel: str = "files/permits",
        name: str = "application.pdf",
        content: bytes = b"%PDF-1.7 ...",
        subject: Subject = DROP,
    ) -> None:
        obj = AuditObject(
            kind="file",
            item=item,
            channel=channel,
            name=name,
            size=len(content),
            sha256=hashlib.sha256(content).hexdigest(),
            media_type="application/pdf",
            seq=seq,
        )
        self.add("outside", t, "intake.accepted", subject=subject, obj=obj, corr=item)

    def verdict(self, item: str, t: int, *, seq: int, reject: str | None = None) -> None:
        obj = AuditObject(kind="file", item=item, channel="files/permits", seq=seq)
        self.add(
            "outside",
            t,
            "verdict",
            subject=Subject.component("content"),
            result="rejected" if reject else "success",
            reason=reject,
            obj=obj,
            detail={"verdict": "reject" if reject else "deliver_as_is", "actions": []},
            corr=item,
        )

    def send(self, item: str, t: int, *, seq: int, times: int = 2, sha: str | None = None) -> None:
        obj = AuditObject(kind="file", item=item, channel="files/permits", seq=seq, sha256=sha)
        for n in range(1, times + 1):
            self.add(
                "outside",
                t + (n - 1) * 5 * S,
                "transfer.sent" if n == 1 else "transfer.repeated",
                subject=Subject.component("sender"),
                obj=obj,
                detail={"send": n, "of": times},
                corr=item,
            )

    def refuse(self, t: int, reason: str) -> None:
        self.add(
            "outside",
            t,
            "intake.rejected",
            subject=DROP,
            result="rejected",
            reason=reason,
            obj=AuditObject(kind="file", channel="files/permits", name="bad.exe"),
        )

    # inside
    def receive(self, item: str, t: int, *, seq: int, sha: str | None = None) -> None:
        obj = AuditObject(kind="file", item=item, channel="files/permits", seq=seq, sha256=sha)
        self.add(
            "inside",
            t,
            "transfer.received",
            subject=PEER,
            obj=obj,
            detail={"sends_seen": 1},
            corr=item,
        )

    def recheck(self, item: str, t: int, *, seq: int, reject: str | None = None) -> None:
        obj = AuditObject(kind="file", item=item, channel="files/permits", seq=seq)
        self.add(
            "inside",
            t,
            "recheck",
            subject=Subject.component("recheck"),
            result="rejected" if reject else "success",
            reason=reject,
            obj=obj,
            detail={"checks": ["type", "pdf"], "disagreement": bool(reject)},
            corr=item,
        )

    def deliver(self, item: str, t: int, *, seq: int, path: str, content: bytes) -> None:
        obj = AuditObject(
            kind="file",
            item=item,
            channel="files/permits",
            seq=seq,
            path=path,
            size=len(content),
            sha256=hashlib.sha256(content).hexdigest(),
        )
        self.add(
            "inside",
            t,
            "delivery.delivered",
            subject=Subject.component("delivery"),
            obj=obj,
            detail={"consumers": 0},
            corr=item,
        )

    def reject_inside(self, item: str, t: int, *, seq: int, reason: str) -> None:
        obj = AuditObject(kind="file", item=item, channel="files/permits", seq=seq)
        self.add(
            "inside",
            t,
            "delivery.rejected",
            subject=Subject.component("delivery"),
            result="rejected",
            reason=reason,
            obj=obj,
            detail={"kept": "/srv/ferry/rejected/x"},
            corr=item,
        )

    def lost(self, item: str, t: int, *, seq: int) -> None:
        obj = AuditObject(kind="file", item=item, channel="files/permits", seq=seq)
        self.add(
            "inside",
            t,
            "transfer.lost",
            subject=PEER,
            result="failure",
            reason="LOST: timeout",
            obj=obj,
            detail={"blocks_done": 3, "blocks_total": 8},  # (as the inside writes it)
            corr=item,
        )

    def gap(self, t: int, first: int, last: int, channel: str = "files/permits") -> None:
        self.add(
            "inside",
            t,
            "link.sequence_gap",
            subject=PEER,
            result="failure",
            obj=AuditObject(kind="link", channel=channel),
            detail={"first": first, "last": last},
        )

    def write(self, *, leave_open: tuple[str, ...] = ()) -> tuple[Path, Path]:
        """Write ``outside-audit`` and ``inside-audit`` under root; return their paths.
        ``leave_open``: sides whose logs are left as a running agent's (in :attr:`open_logs`:
        the records after the last checkpoint are not signed yet)."""
        paths = []
        for side, key in (("outside", OUT_KEY), ("inside", IN_KEY)):
            evs = sorted(self.events[side], key=lambda e: (e.t, e.order))
            clock = Clock(evs[0].t - S if evs else T0)
            directory = self.root / f"{side}-audit"
            settings = AuditSettings(
                origin=f"{side}.test/audit", side=side, checkpoint_every=25, host="test"
            )
            log = AuditLog(directory, key, settings, clock=clock)
            for e in evs:
                clock.t = e.t
                log.append(e.event, **e.kw)
            clock.t = (evs[-1].t if evs else T0) + S
            if side in leave_open:
                log.wait_durable(log.size - 1)  # (on disk, as a running agent's would be)
                self.open_logs.append(log)
            else:
                log.close()
            paths.append(directory)
        return paths[0], paths[1]


@dataclass(frozen=True)
class Standard:
    """What :func:`standard` built (item ids by name, log paths, delivered files)."""

    outside: Path
    inside: Path
    now: int  # the "now" to reconcile at
    items: dict[str, str]
    files: dict[str, Path]


def standard(root: Path) -> Standard:
    """The standard scenario, reconciled at ``now`` = T0 + 1 h with a 600 s grace.

    ``delivered`` (sent twice, received, re-checked, delivered to a file on disk),
    ``cleaned`` (delivered, the file was changed since), ``gone`` (delivered, file
    removed), ``hostile`` (delivered, an HTML/terminal/CSV-hostile name),
    ``verdict_rejected`` (outside verdict), ``inside_rejected`` (re-check refused),
    ``all_lost`` (every packet suppressed: sent twice, nothing inside -> missing),
    ``gave_up`` (inside transfer.lost and a link.sequence_gap -> missing),
    ``stuck`` (received, never delivered -> missing), ``in_flight`` (accepted
    2 minutes before now), ``unexplained`` (delivered inside, never accepted
    outside), and two intake refusals.
    """
    b = Builder(root)
    files_dir = root / "delivered"
    files_dir.mkdir()
    names = [
        "delivered",
        "cleaned",
        "gone",
        "hostile",
        "verdict_rejected",
        "inside_rejected",
        "all_lost",
        "gave_up",
        "stuck",
        "in_flight",
    ]
    items = {name: item_id(0xA000 + i) for i, name in enumerate(names)}
    items["unexplained"] = item_id(0xBAD)
    files: dict[str, Path] = {}
    t = T0
    for seq, name in enumerate(names, start=1):
        item = items[name]
        content = f"content of {name}".encode()
        accept_t = T0 + 3600 * S - 120 * S if name == "in_flight" else t
        b.accept(
            item,
            accept_t,
            seq=seq,
            content=content,
            name=HOSTILE_NAME if name == "hostile" else f"{name}.pdf",
        )
        if name == "verdict_rejected":
            b.verdict(item, accept_t + S, seq=seq, reject="MACRO: VBA macros in the document")
            t += 60 * S
            continue
        b.verdict(item, accept_t + S, seq=seq)
        sha = hashlib.sha256(content).hexdigest()
        b.send(item, accept_t + 2 * S, seq=seq, sha=sha)
        if name in ("all_lost", "in_flight"):
            t += 60 * S
            continue
        if name == "gave_up":
            b.lost(item, accept_t + 20 * S, seq=seq)
            t += 60 * S
            continue
        b.receive(item, accept_t + 3 * S, seq=seq, sha=sha)
        if name == "stuck":
            t += 60 * S
            continue
        b.recheck(
            item,
            accept_t + 4 * S,
            seq=seq,
            reject="TYPE: not a PDF" if name == "inside_rejected" else None,
        )
        if name == "inside_rejected":
            b.reject_inside(item, accept_t + 5 * S, seq=seq, reason="TYPE: not a PDF")
        else:
            path = files_dir / f"{name}.pdf"
            path.write_bytes(content)
            files[name] = path
            b.deliver(item, accept_t + 5 * S, seq=seq, path=str(path), content=content)
        t += 60 * S
    # gave_up (seq 8) reported as a gap once stuck's seq 9 arrived
    b.gap(T0 + 9 * 60 * S, 8, 8)
    b.refuse(T0 + 30 * S, "SIZE: larger than 100 MiB")
    b.refuse(T0 + 90 * S, "TYPE: application/x-msdownload not allowed")
    # Inside delivers an item the outside never accepted (mid-log: unexplained).
    ghost = b"ghost"
    b.receive(items["unexplained"], T0 + 200 * S, seq=99)
    b.deliver(items["unexplained"], T0 + 201 * S, seq=99, path="/nonexistent/ghost", content=ghost)
    outside, inside = b.write()
    files["cleaned"].write_bytes(b"changed after delivery")
    files["gone"].unlink()
    return Standard(outside, inside, T0 + 3600 * S, items, files)


def configs(root: Path, scn: Standard) -> tuple[Path, Path]:
    """Agent configs naming the logs: outside.yaml, and inside.yaml with the outside's mirror."""
    out_dir, in_dir = root / "outside", root / "inside"
    for d in (out_dir, in_dir):
        (d / "keys").mkdir(parents=True)
    shutil.copytree(scn.outside, out_dir / "audit")
    shutil.copytree(scn.inside, in_dir / "audit")
    shutil.copytree(scn.outside, in_dir / "audit-outside-mirror")  # byte-identical mirror
    (out_dir / "keys" / "audit.pub").write_text(OUT_KEY.public.to_string() + "\n")
    (in_dir / "keys" / "audit.pub").write_text(IN_KEY.public.to_string() + "\n")
    (in_dir / "keys" / "outside-audit.pub").write_text(OUT_KEY.public.to_string() + "\n")
    out_cfg, in_cfg = out_dir / "outside.yaml", in_dir / "inside.yaml"
    out_cfg.write_text("version: 1\nrole: outside\naudit:\n  dir: audit\n  key: keys/audit.key\n")
    in_cfg.write_text(
        "version: 1\nrole: inside\naudit:\n  dir: audit\n  key: keys/audit.key\n"
        "  mirror_dir: audit-outside-mirror\n  peer_public_key: keys/outside-audit.pub\n"
    )
    return out_cfg, in_cfg
