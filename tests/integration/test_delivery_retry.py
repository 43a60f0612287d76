"""A delivery folder that refuses a file for a reason that passes (here a full disk, as a
share that drops its connection or a permission being fixed would) is tried again until it
takes the file: the file is never refused for it, `ferry health` on the inside names the
channel held up, and other channels go on. Real agents; the delivery folder is a real
2 MiB tmpfs, filled up.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import drop_file, edit_yaml, fast_bulk, fill_disk, init, opaque, wait_files
from test_audit_agents import wait_for
from test_health_cli import until_check

pytestmark = pytest.mark.integration


@pytest.mark.slow  # (10-40 s: run with `python3 tasks.py test --slow`)
def test_a_full_delivery_disk_holds_the_file_until_there_is_room(
    tmp_path: Path, agents: Any, small_audit_disk: Any
) -> None:
    dep = init(tmp_path / "d", "--bulk", "archive")
    edit_yaml(dep["outside"]["config"], fast_bulk)
    for side in ("outside", "inside"):
        edit_yaml(dep[side]["config"], opaque)
    docs, archive = dep["channels"]["documents"], dep["channels"]["archive"]
    inside_cfg = dep["inside"]["config"]
    state = Path(dep["inside"]["state_dir"])
    deliver = small_audit_disk(docs["deliver"])
    filler = fill_disk(deliver)
    inside = agents("inside", inside_cfg)
    agents("outside", dep["outside"]["config"])

    report = os.urandom(300_000)
    drop_file(Path(docs["drop"]), "report.bin", report)
    waiting = inside.wait_event("delivery_waiting_for_folder", timeout=60)
    assert waiting["channel"] == "documents"
    assert "No space left" in waiting["error"]
    drop_file(Path(archive["drop"]), "other.bin", b"another channel")
    assert wait_files(archive["deliver"], {"other.bin"}, timeout=30)
    found = until_check(inside_cfg, "delivery", "CRITICAL", "--max-stall", "3")
    assert "channel documents" in found["delivery"]["message"]
    status = json.loads((state / "status.json").read_text())
    assert status["files_waiting"] == {"documents": 1}
    assert list((state / "rejected").iterdir()) == []  # not refused
    assert not (deliver / "report.bin").exists()

    filler.unlink()  # room again
    assert wait_files(deliver, {"report.bin"}, timeout=90) == {"report.bin": report}
    until_check(inside_cfg, "delivery", "OK", "--max-stall", "3")
    wait_for(
        lambda: json.loads((state / "status.json").read_text())["files_waiting"] == {},
        what="no file waiting",
    )
    assert sorted(p.name for p in deliver.iterdir()) == ["report.bin"]
    assert list((state / "rejected").iterdir()) == []
    assert [e["event"] for e in inside.events()].count("delivered") == 2
