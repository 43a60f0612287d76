"""`ferry inside quarantine list | show | release`: files the inside re-check refused.

Real quarantined items (made as tests/integration/test_recheck_inside.py makes them: a real
InsideAgent on a `ferry init` deployment refuses a PNG the outside vouched for) are listed,
shown with the re-check's findings, and released with the security-admin key: delivered once
into the channel's folder under the normal collision-safe names, never twice, never with
another key, and recorded in the inside audit log by the agent, whether it was running at the
time of the release or started later.
"""

from __future__ import annotations

import errno
import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import Agent, ferry, init
from test_audit_agents import records, wait_for
from test_recheck_inside import close_agent, png, stage, text_chunk

from ferry.config import load_inside_config
from ferry.crypto.keys import SecretKey, load_public_key, load_secret_key, write_secret_key
from ferry.errors import KeyFileError, PolicyRejection, UsageError
from ferry.quarantine_release import RELEASES
from ferry.wire import records as rec
from inside import agent as agent_module
from inside import quarantine as quarantine_mod
from inside.agent import InsideAgent, RecheckFailed
from inside.ledger import Ledger
from inside.quarantine import release_item

pytestmark = pytest.mark.integration

# EICAR in hex, so that this file is not itself a signature hit.
EICAR = bytes.fromhex(
    "58354f2150254041505b345c505a58353428505e2937434329377d2445494341522d5354414e444152442d414e5449564952"
    "55532d544553542d46494c452124482b482a"
)


def quarantine(tmp_path: Path, *files: tuple[str, bytes]) -> tuple[dict[str, Any], list[str]]:
    """A deployment whose inside trusts the security-admin key, with ``files`` refused by
    the inside re-check; returns it and the items' ids."""
    dep = init(tmp_path / "d")
    inside_pub = Path(dep["inside"]["config"]).parent / "keys" / "security-admin.pub"
    assert dep["security_admin"]["inside_public_key"] == str(inside_pub)  # ferry init put it there
    assert (
        inside_pub.read_bytes() == (Path(dep["root"]) / "admin" / "security-admin.pub").read_bytes()
    )
    agent = InsideAgent(load_inside_config(Path(dep["inside"]["config"])), threading.Event())
    ids = []
    try:
        for seq, (name, content) in enumerate(files, 1):
            oid, length = stage(agent, dep["outside"]["signing_key"], name, content, seq)
            agent._deliver_file(oid, length)
            ids.append(oid.hex())
    finally:
        close_agent(agent)
    return dep, ids


def inside_quarantine(dep: dict[str, Any], *args: str) -> Any:
    out = ferry("inside", "quarantine", *args, "-c", dep["inside"]["config"], "--json")
    return json.loads(out.stdout)


def release(dep: dict[str, Any], item: str, key: str) -> Any:
    return ferry(
        "inside", "quarantine", "release", "-c", dep["inside"]["config"], item,
        "--key", key, "--json", check=False,
    )  # fmt: skip


@pytest.mark.slow  # (5-10 s: run with `python3 tasks.py test --slow`)
def test_list_show_and_release_once_with_the_admin_key(tmp_path: Path) -> None:
    bad = png(text_chunk())
    dep, (first, second) = quarantine(tmp_path, ("scan.png", bad), ("photo.png", bad + b""))
    state = Path(load_inside_config(Path(dep["inside"]["config"])).state_dir) / "quarantine"
    deliver = Path(dep["channels"]["documents"]["deliver"])
    admin_key = dep["security_admin"]["secret_key"]

    rows = inside_quarantine(dep, "list")
    assert [r["item_id"] for r in rows] == [first, second]
    assert rows[0]["channel"] == "documents"
    assert rows[0]["original_name"] == "scan.png"
    assert rows[0]["reason_code"] == "RECHECK_DISAGREES"
    assert rows[0]["sha256"] == hashlib.sha256(bad).hexdigest()
    assert not rows[0]["released"]
    shown = inside_quarantine(dep, "show", first)
    assert any("tEXt" in p for p in shown["details"]["recheck"]["problems"])
    assert shown["details"]["outside_report"]["verdict"] == "deliver_cleaned"
    text = ferry("inside", "quarantine", "show", "-c", dep["inside"]["config"], first).stdout
    assert "Re-check findings" in text
    assert "scan.png" in text

    # another key is refused with a clear error, and nothing moves
    wrong = tmp_path / "other.key"
    write_secret_key(wrong, SecretKey.generate("ed25519"), "security-admin")
    refused = release(dep, first, str(wrong))
    assert refused.returncode == KeyFileError.exit_code
    assert "not the security-admin key" in refused.stderr
    # an item id that is not one, or names no item, is refused
    for item in ("../../etc/passwd", "nothing", "0" * 32):
        out = release(dep, item, admin_key)
        assert out.returncode == UsageError.exit_code, item
        assert "ferry: error:" in out.stderr
    assert list(deliver.iterdir()) == []
    assert not (state / RELEASES).exists()

    # released while the agent is not running: delivered under a collision-safe name
    (deliver / "scan.png").write_bytes(b"someone else's scan")
    out = release(dep, first, admin_key)
    assert out.returncode == 0, out.stderr
    done = json.loads(out.stdout)
    assert done["status"] == "released"
    assert done["delivered_as"] == str(deliver / "scan (2).png")
    assert (deliver / "scan (2).png").read_bytes() == bad
    assert not (state / f"{first}.obj").exists()
    assert inside_quarantine(dep, "show", first)["released"]  # the record stays
    again = release(dep, f"{first}.obj", admin_key)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["status"] == "already released"
    assert json.loads(again.stdout)["delivered_as"] == str(deliver / "scan (2).png")
    assert json.loads(again.stdout)["finished"] is False
    text = ferry(
        "inside", "quarantine", "release", "-c", dep["inside"]["config"], first, "--key", admin_key
    ).stdout  # fmt: skip
    assert f"already released on {done['released_at']}; delivered as {deliver}" in text
    assert sorted(p.name for p in deliver.iterdir()) == ["scan (2).png", "scan.png"]

    # a forged line naming the second item neither blocks its release nor is trusted
    with open(state / RELEASES, "a", encoding="utf-8") as f:
        forged = {"stored_name": f"{second}.obj", "admin_key_id": "00", "signature": "AA=="}
        f.write(json.dumps(forged) + "\n")
    shown = inside_quarantine(dep, "show", second)
    assert not shown["released"]  # list and show trust only signed lines
    assert shown["unverified_release_lines"] == 1
    agent = Agent("inside", dep["inside"]["config"], tmp_path / "inside.log")
    try:
        audit_dir = dep["inside"]["audit_dir"]

        def released() -> list[dict[str, Any]]:
            return [r for r in records(audit_dir) if r["event"] == "quarantine.released"]

        # the release made while the agent was down is recorded once it runs
        wait_for(lambda: len(released()) >= 2, what="the first release and the forged line")
        out = release(dep, second, admin_key)  # released while the agent runs
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["status"] == "released"
        wait_for(
            lambda: (
                len(released()) >= 3
                and sum(r["event"] == "delivery.delivered" for r in records(audit_dir)) >= 2
            ),
            what="the second release and where it was delivered",
        )
    finally:
        assert agent.stop() == 0
    assert (deliver / "photo.png").read_bytes() == bad
    # each release is followed by a signed line naming the delivered path (the release made
    # again delivered nothing new, so it wrote none); the agent recorded each as
    # delivery.delivered with that path, and its ledger now holds the items as delivered
    lines = [json.loads(x) for x in (state / RELEASES).read_text().splitlines()]
    assert [x.get("event") for x in lines] == [
        "quarantine.released", "delivery.delivered", None,
        "quarantine.released", "delivery.delivered",
    ]  # fmt: skip
    assert [lines[1]["delivered_as"], lines[4]["delivered_as"]] == [
        str(deliver / "scan (2).png"),
        str(deliver / "photo.png"),
    ]
    assert lines[1]["size"] == len(bad)
    delivered = [
        r
        for r in records(audit_dir)
        if r["event"] == "delivery.delivered" and r["detail"].get("released")
    ]
    assert [(r["object"]["item"], r["object"]["path"]) for r in delivered] == [
        (first, str(deliver / "scan (2).png")),
        (second, str(deliver / "photo.png")),
    ]
    assert delivered[0]["subject"]["id"].endswith(dep["security_admin"]["key_id"])
    assert delivered[0]["object"]["sha256"] == hashlib.sha256(bad).hexdigest()
    assert delivered[0]["object"]["size"] == len(bad)
    ledger = Ledger(load_inside_config(Path(dep["inside"]["config"])).state_dir)
    try:
        assert ledger.state_of(bytes.fromhex(first)) == "delivered"
        assert ledger.state_of(bytes.fromhex(second)) == "delivered"
        [row] = [r for r in ledger.rows_in_state("delivered") if r["object_id"].hex() == first]
        assert row["path"] == str(deliver / "scan (2).png")
    finally:
        ledger.close()
    recs = released()
    assert [r["result"] for r in recs] == ["success", "failure", "success"]
    assert [r["object"].get("item") for r in recs] == [first, None, second]
    assert recs[0]["subject"]["id"].endswith(dep["security_admin"]["key_id"])
    assert recs[0]["detail"]["stored_name"] == f"{first}.obj"
    assert recs[0]["detail"]["reason_code"] == "RECHECK_DISAGREES"
    assert recs[0]["object"]["channel"] == "documents"
    assert recs[0]["corr"] == first
    assert "BAD_SIGNATURE" in recs[1]["reason"]


def _admin(dep: dict[str, Any]) -> tuple[SecretKey, Any]:
    admin = dep["security_admin"]
    return load_secret_key(Path(admin["secret_key"])), load_public_key(admin["public_key"])


def _release(dep: dict[str, Any], item: str) -> dict[str, Any]:
    cfg = load_inside_config(Path(dep["inside"]["config"]))
    key, trusted = _admin(dep)
    deliver = Path(dep["channels"]["documents"]["deliver"])
    return release_item(
        cfg.state_dir / "quarantine",
        item,
        folders={"documents": deliver},
        subfolders={},
        key=key,
        trusted=trusted,
    )


def test_a_malware_match_cannot_be_released(tmp_path: Path) -> None:
    dep, (item,) = quarantine(tmp_path, ("eicar.png", png(text_chunk() + EICAR)))
    [row] = inside_quarantine(dep, "list")
    assert row["reason_code"] == "MALWARE_SIGNATURE"
    with pytest.raises(UsageError, match="cannot be released"):
        _release(dep, item)
    assert list(Path(dep["channels"]["documents"]["deliver"]).iterdir()) == []


def test_a_file_changed_in_quarantine_is_not_released(tmp_path: Path) -> None:
    dep, (item,) = quarantine(tmp_path, ("scan.png", png(text_chunk())))
    state = load_inside_config(Path(dep["inside"]["config"])).state_dir / "quarantine"
    kept = state / f"{item}.obj"
    kept.write_bytes(kept.read_bytes().replace(b"payload", b"PAYLOAD"))
    with pytest.raises(PolicyRejection, match="no longer matches its record"):
        _release(dep, item)
    assert list(Path(dep["channels"]["documents"]["deliver"]).iterdir()) == []
    assert not (state / RELEASES).exists()


def test_an_interrupted_release_is_finished_only_while_the_file_matches_its_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dep, (item,) = quarantine(tmp_path, ("scan.png", png(text_chunk())))
    state = load_inside_config(Path(dep["inside"]["config"])).state_dir / "quarantine"
    deliver = Path(dep["channels"]["documents"]["deliver"])
    kept = state / f"{item}.obj"
    original = kept.read_bytes()

    def crash(*_args: object) -> None:
        raise RuntimeError("power cut after the release line")

    with monkeypatch.context() as m:
        m.setattr(quarantine_mod, "_link", crash)
        with pytest.raises(RuntimeError):
            _release(dep, item)
    assert len((state / RELEASES).read_text().splitlines()) == 1  # released, not delivered
    kept.write_bytes(original.replace(b"payload", b"PAYLOAD"))
    with pytest.raises(PolicyRejection, match="no longer matches its record"):
        _release(dep, item)
    assert list(deliver.iterdir()) == []
    kept.write_bytes(original)  # as it was: the release is finished, once
    done = _release(dep, item)
    assert done["status"] == "already released"
    assert done["finished"] is True
    assert (deliver / "scan.png").read_bytes() == original
    assert not kept.exists()


@pytest.mark.parametrize(
    "stop", ["after the link", "after the delivered line", "file gone, no delivered line"]
)
def test_a_release_interrupted_at_any_step_is_finished_once_with_its_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop: str
) -> None:
    """Killed between two steps (the link, the delivered line, the quarantine copy removed),
    a release run again finishes from there: the delivered line names the path, and no second
    copy appears even when a consumer has already taken the first."""
    dep, (item,) = quarantine(tmp_path, ("scan.png", png(text_chunk())))
    state = load_inside_config(Path(dep["inside"]["config"])).state_dir / "quarantine"
    deliver = Path(dep["channels"]["documents"]["deliver"])
    kept = state / f"{item}.obj"
    content = kept.read_bytes()

    def crash(*_args: object, **_kw: object) -> None:
        raise RuntimeError(f"killed {stop}")

    step = "_leave" if stop == "after the delivered line" else "_say_delivered"
    with monkeypatch.context() as m:
        m.setattr(quarantine_mod, step, crash)
        with pytest.raises(RuntimeError):
            _release(dep, item)
    assert (deliver / "scan.png").read_bytes() == content  # linked before the crash
    assert kept.exists()
    if stop == "file gone, no delivered line":  # how an older ferry left it
        kept.unlink()
    if stop == "after the delivered line":  # a consumer takes the file before the rerun
        (deliver / "scan.png").unlink()

    done = _release(dep, item)
    assert done["status"] == "already released"
    assert done["finished"] is True
    assert done["delivered_as"] == str(deliver / "scan.png")
    assert not kept.exists()
    expected = [] if stop == "after the delivered line" else ["scan.png"]
    assert sorted(p.name for p in deliver.iterdir()) == expected  # never a second copy
    lines = [json.loads(x) for x in (state / RELEASES).read_text().splitlines()]
    assert [x.get("event") for x in lines] == ["quarantine.released", "delivery.delivered"]
    assert lines[1]["delivered_as"] == str(deliver / "scan.png")
    assert lines[1]["size"] == len(content)
    again = _release(dep, item)  # and a third run changes nothing
    assert (again["finished"], again["delivered_as"]) == (False, str(deliver / "scan.png"))
    assert len((state / RELEASES).read_text().splitlines()) == 2


def test_a_release_whose_delivered_copy_is_gone_says_so_and_delivers_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Left by an older ferry (the file out of the quarantine, no delivered line) and the
    delivered file since taken: nothing to find, so nothing is claimed and nothing made."""
    dep, (item,) = quarantine(tmp_path, ("scan.png", png(text_chunk())))
    state = load_inside_config(Path(dep["inside"]["config"])).state_dir / "quarantine"
    deliver = Path(dep["channels"]["documents"]["deliver"])

    def crash(*_args: object, **_kw: object) -> None:
        raise RuntimeError("killed after the link")

    with monkeypatch.context() as m:
        m.setattr(quarantine_mod, "_say_delivered", crash)
        with pytest.raises(RuntimeError):
            _release(dep, item)
    (state / f"{item}.obj").unlink()
    (deliver / "scan.png").rename(tmp_path / "taken.png")
    (deliver / "scan.png").write_bytes(b"another file of that name")  # not the released one
    done = _release(dep, item)
    assert (done["status"], done["finished"], done["delivered_as"]) == (
        "already released", False, None,
    )  # fmt: skip
    assert sorted(p.name for p in deliver.iterdir()) == ["scan.png"]
    assert len((state / RELEASES).read_text().splitlines()) == 1
    out = ferry(
        "inside", "quarantine", "release", "-c", dep["inside"]["config"], item,
        "--key", dep["security_admin"]["secret_key"],
    ).stdout  # fmt: skip
    assert "no delivered file found; nothing delivered now" in out


def test_a_quarantined_copy_moved_in_keeps_its_reason_when_the_folder_sync_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-check refusal's copy moved into quarantine/ keeps its reason when only the sync
    of the folder fails after the move (its reason was removed as if the copy were not
    there, and the copy left unlisted, never to be released)."""
    dep = init(tmp_path / "d")
    agent = InsideAgent(load_inside_config(Path(dep["inside"]["config"])), threading.Event())
    quarantine = Path(dep["inside"]["state_dir"]) / "quarantine"
    oid = b"\x07" * 16
    body = b"x" * 1000
    agent._spool_path(oid).write_bytes(body)
    m = rec.Manifest(
        object_id=oid, kind="file", channel="documents", seq=1, name="a.pdf",
        media_type="application/pdf", size=len(body), sha256=hashlib.sha256(body).digest(),
        created_us=1, mtime_us=1, sender=b"\x01" * 8,
    )  # fmt: skip
    real = agent_module.fsync_dir

    def failing(path: Path) -> None:  # the move is done; its folder's fsync fails (EIO)
        if Path(path) == quarantine:
            raise OSError(errno.EIO, "fsync_dir")
        real(path)

    monkeypatch.setattr(agent_module, "fsync_dir", failing)
    try:
        agent._reject(oid, "RECHECK_DISAGREES: x", quarantine=True,
                      refused=RecheckFailed("RECHECK_DISAGREES: x", manifest=m))  # fmt: skip
    finally:
        close_agent(agent)
    names = sorted(p.name for p in quarantine.iterdir())
    # the copy is in quarantine/ (os.replace succeeded): it stays listed and releasable
    assert f"{oid.hex()}.obj" in names, names
    assert f"{oid.hex()}.obj.reason.json" in names, names
