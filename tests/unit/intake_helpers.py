"""The outside's folder intake driven by hand, on a real `ferry init` deployment (real
content pipeline, spool and audit log): the ``gateway`` fixture (tests/unit/conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any

from ferry.audit.agent import AgentAudit
from ferry.audit.record import decode
from ferry.audit.segments import iter_lines, list_segments
from ferry.config import load_outside_config
from ferry.crypto.keys import load_public_key, load_secret_key
from ferry.provision import init_deployment
from ferry.quarantine_release import append_release, new_record, now
from outside.content.pipeline import ContentPipeline
from outside.intake import FolderIntake
from outside.spool import Spool
from outside.watch import Ready


class Gateway:
    """The outside's intake of the ``documents`` channel, driven by hand."""

    def __init__(self, root: Path, pipeline: ContentPipeline) -> None:
        self.dep = init_deployment(root, port=47998)
        cfg = load_outside_config(Path(self.dep["outside"]["config"]))
        admin = self.dep["security_admin"]
        self.key = load_secret_key(Path(admin["secret_key"]))
        self.trusted = load_public_key(admin["public_key"])
        self.channel = next(c for c in cfg.channels if c.name == "documents")
        assert self.channel.drop is not None
        assert self.channel.quarantine is not None
        self.drop, self.quarantine = self.channel.drop, self.channel.quarantine
        self.audit = AgentAudit(cfg.audit, "outside", cfg.state_dir, cfg.source)
        self.intake = FolderIntake(
            cfg.channels,
            Spool(cfg.state_dir),
            load_secret_key(cfg.signing_key),
            audit=self.audit,
            pipeline=pipeline,
            admin_key=self.trusted,
        )
        self.audit_dir = cfg.audit.dir if cfg.audit is not None else Path()

    def drop_file(self, name: str, data: bytes) -> bool:
        """Drop a file and take it; True if it was spooled (to be sent)."""
        path = self.drop / name
        path.write_bytes(data)
        return self.take(name)

    def take(self, name: str) -> bool:
        path = self.drop / name
        st = os.stat(path)
        ready = Ready(
            "documents", path, PurePosixPath(name), st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino
        )
        prepared = self.intake._prepare(self.channel, ready)
        if prepared is None:
            return False
        lane = self.intake._lanes[self.channel.name]
        return self.intake._commit(lane, [prepared]) != []

    def sign(self, sha: str, override: str, *, unsigned: bool = False, **change: Any) -> None:
        """Append a release line as the administrator would sign it (then ``change`` it)."""
        doc = {"original_name": "x", "reason_code": override}
        record = new_record(
            doc, "x", sha, channel="documents", key=self.key, override=override, note="",
            clock=now,
        )  # fmt: skip
        record |= change
        if unsigned:
            del record["signature"]
        append_release(self.quarantine, record)

    def records(self) -> list[dict[str, Any]]:
        self.audit.log.checkpoint()
        return [
            decode(line.data)
            for _, seg in list_segments(self.audit_dir)
            for line in iter_lines(seg)
            if line.complete
        ]

    def close(self) -> None:
        self.intake.stop()
        self.audit.close()
