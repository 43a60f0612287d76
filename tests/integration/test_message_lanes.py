"""Each messages channel is delivered inside by a thread of its own: real agents over UDP,
a real FUSE mount (bindfs) as the share one channel's folder is on."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import SCHEMAS, Share, application, edit_yaml, fast, init, wait_files
from test_audit_agents import wait_for
from test_health_cli import until_check

from ferry.client import Client

pytestmark = pytest.mark.integration


def notice(n: int) -> bytes:
    """The agency-notice schema's example, numbered ``n`` in its subject."""
    doc = json.loads((SCHEMAS / "agency-notice.schema.json").read_text())["examples"][0]
    doc["subject"] = f"{doc['subject']} #{n}"
    return json.dumps(doc, ensure_ascii=False).encode()


def with_notices(dep: dict[str, Any], folder: Path) -> None:
    """A second messages channel, ``notices`` (agency notices, sent once: no repeat could
    bring back a notice the inside lost), delivered inside to ``folder``; the portal's
    client may use it."""

    def outside(data: dict[str, Any]) -> None:
        fast(data)
        data["channels"].append(
            {
                "name": "notices",
                "kind": "messages",
                "schemas": ["agency-notice"],
                "max_message_size": "1M",
                "repeat": {"count": 1},
            }
        )

    def inside(data: dict[str, Any]) -> None:
        data["channels"].append(
            {
                "name": "notices",
                "kind": "messages",
                "schemas": ["agency-notice"],
                "deliver": str(folder),
                "consumers": False,
            }
        )

    edit_yaml(dep["outside"]["config"], outside)
    edit_yaml(dep["inside"]["config"], inside)
    (client,) = Path(dep["outside"]["config"]).parent.glob("api-clients/*.yaml")
    edit_yaml(client, lambda data: data.update(channels=["messages", "notices"]))


@pytest.mark.slow  # (10-40 s: run with `python3 tasks.py test --slow`)
def test_a_messages_folder_share_that_stops_answering_holds_up_only_its_channel(
    tmp_path: Path, agents: Any, network_share: Share
) -> None:
    """Inside, the notices channel delivers onto a share; its server goes away. Notices
    wait; citizen applications on the messages channel still reach their folder on the
    gateway's disk. status.json and `ferry health` name the notices channel alone. The
    inside is stopped while the share still hangs: the notices it holds in memory (the
    batch on its way to the share and those queued behind it) are written to its spool,
    and once the server is back a new start delivers each of them, once."""
    dep = init(tmp_path / "d")
    with_notices(dep, network_share.mount)
    inside_cfg = dep["inside"]["config"]
    status = Path(dep["inside"]["state_dir"]) / "status.json"
    applications = Path(dep["channels"]["messages"]["deliver"])
    inside = agents("inside", inside_cfg)
    agents("outside", dep["outside"]["config"])
    inside.wait_event("inside_started")
    client = Client.from_config(dep["api"]["client_config"])
    daemon = network_share.daemon()
    os.kill(daemon, signal.SIGSTOP)
    try:
        for n in range(1, 4):
            client.submit("notices", notice(n), schema="agency-notice", timeout=10)
            time.sleep(0.3)  # (in batches of their own: the first is on its way meanwhile)
        for n in range(1, 4):
            client.submit("messages", application(n), schema="citizen-application", timeout=10)
        names = {f"citizen-application-{n:08d}.json" for n in range(1, 4)}
        assert set(wait_files(applications, names, timeout=30)) == names

        def held() -> bool:
            return list(json.loads(status.read_text())["delivery_held"]) == ["notices"]

        wait_for(held, what="status.json naming the notices channel held up")
        found = until_check(inside_cfg, "delivery", "CRITICAL", "--max-stall", "5")
        assert "channel notices" in found["delivery"]["message"]
        assert "messages" not in found["delivery"]["message"]
        client.submit("messages", application(4), schema="citizen-application", timeout=10)
        wait_files(applications, {"citizen-application-00000004.json"}, timeout=30)
        assert not list(network_share.server.iterdir())

        assert inside.stop() == 0  # while the share still hangs
        left = inside.wait_event("delivery_thread_left_waiting")
        assert left["channel"] == "notices"
        assert "kept in the spool" in left["effect"]
    finally:
        os.kill(daemon, signal.SIGCONT)
    client.close()
    assert not list(network_share.server.iterdir())  # nothing reached it before the stop
    kept = list((Path(dep["inside"]["state_dir"]) / "incoming").glob("*.obj"))
    assert kept  # (what it held in memory, for the next start)
    inside = agents("inside", inside_cfg)
    assert inside.wait_event("kept_objects_to_deliver")["count"] == len(kept)
    names = {f"agency-notice-{n:08d}.json" for n in range(1, 4)}
    delivered = wait_files(network_share.server, names, timeout=30)
    for n in range(1, 4):
        assert f"#{n}" in json.loads(delivered[f"agency-notice-{n:08d}.json"])["subject"]
    wait_for(lambda: not list(status.parent.joinpath("incoming").iterdir()), what="the spool")
    time.sleep(1.0)
    assert sorted(os.listdir(network_share.server)) == sorted(names)  # each once
    assert len(list(applications.iterdir())) == 4
