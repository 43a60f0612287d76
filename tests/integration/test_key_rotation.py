"""Key rotation with overlap on a real inside agent (``ferry init`` deployment, files signed
as the outside signs them): while the config lists the new keys first and the old ones under
``previous_*``, items signed with either outside key are delivered; the agent records each key
it starts using (``key.activated``) and each it stops using (``key.retired``); once the old
signing key is dropped, an item it signed is refused."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_helpers import init
from test_audit_agents import records
from test_recheck_inside import close_agent, png, stage

from ferry.config import load_inside_config
from ferry.crypto.keys import SecretKey, write_public_key, write_secret_key
from ferry.errors import ConfigError
from inside.agent import InsideAgent

pytestmark = pytest.mark.integration


def _rewrite(config: Path, **keys: Any) -> None:
    doc = yaml.safe_load(config.read_text())
    doc["keys"].update(keys)
    for name, value in keys.items():
        if value is None:
            del doc["keys"][name]
    config.write_text(yaml.safe_dump(doc, sort_keys=False))


def _deliver(config: Path, signed_by: list[tuple[str, str]], first_seq: int) -> InsideAgent:
    """Start an inside agent on ``config`` and deliver one PNG per (name, signing key path)."""
    agent = InsideAgent(load_inside_config(config), threading.Event())
    try:
        for seq, (name, key) in enumerate(signed_by, first_seq):
            oid, length = stage(agent, key, name, png(), seq)
            agent._deliver_file(oid, length)
    finally:
        close_agent(agent)
    return agent


LINK_ROLES = ("inside-kem", "outside-signing")


def _key_events(
    audit_dir: str, roles: tuple[str, ...] = LINK_ROLES
) -> list[tuple[str, str, str, bool | None]]:
    """Key events of the link keys (the consumer server key has its own test module)."""
    return [
        (r["event"], r["detail"]["role"], r["object"].get("key_id"), r["detail"].get("current"))
        for r in records(audit_dir)
        if r["event"] in {"key.activated", "key.retired"} and r["detail"]["role"] in roles
    ]


def test_both_outside_keys_deliver_during_the_overlap_and_only_the_new_one_after(
    tmp_path: Path,
) -> None:
    dep = init(tmp_path / "d")
    config = Path(dep["inside"]["config"])
    keys_dir = config.parent / "keys"
    deliver = Path(dep["channels"]["documents"]["deliver"])
    audit_dir = dep["inside"]["audit_dir"]
    old_sign_path = dep["outside"]["signing_key"]
    old_sign_pub = keys_dir / "outside-signing.pub"
    before = load_inside_config(config)
    agent = _deliver(config, [("before.png", old_sign_path)], 1)
    old_sign_id = agent.sender_key.key_id.hex()
    old_kem_id = agent.kem_key.public.key_id.hex()
    assert _key_events(audit_dir) == [
        ("key.activated", "inside-kem", old_kem_id, True),
        ("key.activated", "outside-signing", old_sign_id, True),
    ]

    # the rotation: a new outside signing key and a new inside KEM key, the old ones kept
    new_sign = SecretKey.generate("ed25519")
    new_sign_path = tmp_path / "outside-signing-2.key"
    write_secret_key(new_sign_path, new_sign, "outside-signing")
    new_kem = SecretKey.generate(before.link.kem)
    write_secret_key(keys_dir / "inside-kem-2.key", new_kem, "inside-kem")
    write_public_key(keys_dir / "inside-kem-2.pub", new_kem.public)
    _rewrite(
        config,
        kem_key="keys/inside-kem-2.key",
        previous_kem_keys=["keys/inside-kem.key"],
        outside_public_key=new_sign.public.to_string(),
        previous_outside_public_keys=[str(old_sign_pub)],
    )
    agent = _deliver(
        config, [("old-key.png", old_sign_path), ("new-key.png", str(new_sign_path))], 2
    )
    assert agent.sender_key.key_id == new_sign.public.key_id  # the current one comes first
    assert sorted(p.name for p in deliver.iterdir()) == ["before.png", "new-key.png", "old-key.png"]
    new_sign_id, new_kem_id = new_sign.public.key_id.hex(), new_kem.public.key_id.hex()
    signers = {
        r["object"]["name"]: r["subject"]
        for r in records(audit_dir)
        if r["event"] == "transfer.received"
    }  # each item is recorded as received from the key that signed it
    assert signers["old-key.png"] == {"kind": "peer", "id": old_sign_id}
    assert signers["new-key.png"] == {"kind": "peer", "id": new_sign_id}
    assert _key_events(audit_dir)[2:] == [
        ("key.activated", "inside-kem", new_kem_id, True),
        ("key.activated", "outside-signing", new_sign_id, True),
    ]  # the old keys are still in use (as previous ones): nothing retired yet

    # the overlap is over: the old keys go, and an item the old key signed is refused
    _rewrite(config, previous_kem_keys=None, previous_outside_public_keys=None)
    _deliver(config, [("late.png", old_sign_path), ("after.png", str(new_sign_path))], 4)
    assert sorted(p.name for p in deliver.iterdir()) == [
        "after.png", "before.png", "new-key.png", "old-key.png",
    ]  # fmt: skip
    assert sorted(_key_events(audit_dir)[4:]) == [
        ("key.retired", "inside-kem", old_kem_id, None),
        ("key.retired", "outside-signing", old_sign_id, None),
    ]
    # (not refused: a copy the current keys do not vouch for says nothing of the item)
    assert not [r for r in records(audit_dir) if r["event"] == "delivery.rejected"]
    lost = [r for r in records(audit_dir) if r["event"] == "transfer.lost"]
    assert len(lost) == 1
    assert lost[0]["reason"].startswith("NOT_AUTHENTIC: ")
    assert "signature" in lost[0]["reason"]
    # a fourth start with the same keys records no key event
    _deliver(config, [], 6)
    assert len(_key_events(audit_dir)) == 6
    consumer_key = [e[:2] for e in _key_events(audit_dir, ("consumer-server",))]
    assert consumer_key == [("key.activated", "consumer-server")]  # unchanged throughout


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        pytest.param(
            {"previous_outside_public_keys": ["keys/outside-signing.pub"] * 2},
            "distinct earlier outside signing public keys",
            id="listed-twice",
        ),
        pytest.param(
            {"previous_outside_public_keys": ["keys/outside-signing.pub"] * 4},
            "at most 3 entries",
            id="too-many",
        ),
        pytest.param(
            {"previous_kem_keys": "keys/inside-kem.key"}, "expected a list", id="not-a-list"
        ),
    ],
)
def test_a_bad_previous_key_list_is_refused_with_the_line(
    tmp_path: Path, keys: dict[str, Any], message: str
) -> None:
    dep = init(tmp_path / "d")
    config = Path(dep["inside"]["config"])
    _rewrite(config, **keys)
    with pytest.raises(ConfigError, match=message):
        load_inside_config(config)


@pytest.mark.parametrize(
    ("garbage", "retired"),
    [
        pytest.param(b"{not json", 0, id="not-json"),
        pytest.param(b"[1, 2]", 0, id="not-an-object"),
        pytest.param(b"\xff\xfe\x00", 0, id="not-utf8"),
        pytest.param(
            b'{"outside-signing:zz": {"role": "outside-signing", "key_id": "../x"}, "y": 3}',
            1,
            id="odd-entries",
        ),
    ],
)
def test_a_damaged_keys_in_use_file_is_started_over(
    tmp_path: Path, garbage: bytes, retired: int
) -> None:
    """The agent's own record of its keys, damaged: the agent still starts, records every
    key as activated again (and a strange entry as retired, without its odd key id)."""
    dep = init(tmp_path / "d")
    config = Path(dep["inside"]["config"])
    _deliver(config, [], 1)
    state = load_inside_config(config).state_dir / "keys-in-use.json"
    state.write_bytes(garbage)
    _deliver(config, [], 1)
    events = _key_events(dep["inside"]["audit_dir"])
    assert [e[0] for e in events] == ["key.activated"] * 4 + ["key.retired"] * retired
    assert events[2:4] == events[0:2]
    if retired:
        assert events[4][1:3] == ("outside-signing", None)
    # rewritten whole (with the consumer key, the audit key and the outside's audit key)
    assert len(json.loads(state.read_text())) == 5
