"""`ferry quarantine release --override CODE`: the outside intake honours a verified override
for that very file (by SHA-256) and that one refusal only.

The intake is a real FolderIntake on a `ferry init` deployment with a real content pipeline
(worker processes) and audit log; a file is taken as the watcher would hand it over.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any

import pytest
from content_helpers import policy
from intake_helpers import Gateway

from ferry.content.base import Verdict
from ferry.errors import UsageError
from ferry.quarantine_release import list_items
from outside.content.pipeline import override_inputs
from outside.quarantine import Quarantine
from outside.quarantine_cli import HONOURED_OVERRIDES, release_item

TEXT = b"minutes of the meeting\n"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _quarantined(g: Gateway) -> list[str]:
    """The reason codes of the items still refused (not released)."""
    return [str(i["reason_code"]) for i in list_items(g.quarantine, g.trusted) if not i["released"]]


def test_a_released_override_of_the_refusal_delivers_that_file(gateway: Gateway) -> None:
    g = gateway
    assert not g.drop_file("minutes.pdf", TEXT)  # plain text named .pdf
    [item] = list_items(g.quarantine, g.trusted)
    assert item["reason_code"] == "TYPE_MISMATCH"
    out = release_item(
        g.quarantine,
        item["stored_name"],
        channel="documents",
        drop=g.drop,
        key=g.key,
        trusted=g.trusted,
        override="TYPE_MISMATCH",
    )
    assert g.take(out["resubmitted_as"])  # taken again: every other check ran, and passed
    recs = g.records()
    [accepted] = [r for r in recs if r["event"] == "intake.accepted"]
    assert accepted["object"]["name"] == "minutes.txt"
    assert accepted["detail"]["override"] == ["TYPE_MISMATCH"]
    verdicts = [r for r in recs if r["event"] == "verdict"]
    assert [v["result"] for v in verdicts] == ["rejected", "success"]
    assert verdicts[1]["detail"]["override"]["code"] == "TYPE_MISMATCH"
    assert verdicts[1]["detail"]["override"]["applied"] is True
    # the same content under another name is the same file: the release covers it
    assert g.drop_file("minutes again.pdf", TEXT)
    # other content is not covered
    assert not g.drop_file("agenda.pdf", b"another text\n")
    assert _quarantined(g) == ["TYPE_MISMATCH"]  # agenda.pdf; minutes.pdf was released


@pytest.mark.parametrize(
    ("name", "data", "override", "refusal"),
    [
        ("minutes.pdf", TEXT, "FILENAME_POLICY", "TYPE_MISMATCH"),  # another code
        ("broken.pdf", b"%PDF-1.7\nnot a pdf at all\n", "MALFORMED", "MALFORMED"),  # never
    ],
)
def test_an_override_of_another_or_a_hostile_code_changes_nothing(
    gateway: Gateway, name: str, data: bytes, override: str, refusal: str
) -> None:
    gateway.sign(_sha(data), override)
    assert not gateway.drop_file(name, data)
    [item] = list_items(gateway.quarantine, gateway.trusted)
    assert item["reason_code"] == refusal
    assert item["details"]["report"].get("override", {}).get("applied") in (None, False)
    assert not [r for r in gateway.records() if r["event"] == "intake.accepted"]


def test_a_forged_or_altered_release_is_ignored(gateway: Gateway) -> None:
    g = gateway
    g.sign("00" * 32, "TYPE_MISMATCH", sha256=_sha(TEXT))  # signed for another file, altered
    g.sign(_sha(TEXT), "TYPE_MISMATCH", signature="AA==")  # not the admin's signature
    g.sign(_sha(TEXT), "TYPE_MISMATCH", unsigned=True)
    g.sign(_sha(TEXT), "TYPE_MISMATCH", admin_key_id="00" * 8)  # claims another admin key
    assert not g.drop_file("minutes.pdf", TEXT)
    assert _quarantined(g) == ["TYPE_MISMATCH"]
    # the same file with a genuine release line goes through: the test can tell
    g.sign(_sha(TEXT), "TYPE_MISMATCH")
    assert g.drop_file("minutes.pdf", TEXT)


@pytest.mark.parametrize(
    ("code", "error"),
    [("MALFORMED", "cannot be overridden"), ("SCHEMA_INVALID", "cannot set SCHEMA_INVALID aside")],
)
def test_the_release_cli_refuses_codes_the_intake_cannot_set_aside(
    gateway: Gateway, code: str, error: str
) -> None:
    g = gateway
    (g.drop / "x.json").write_bytes(b"{}")
    Quarantine(g.quarantine).put_file(
        g.drop / "x.json", channel="documents", original_name="x.json", reason_code=code,
        message="refused",
    )  # fmt: skip
    with pytest.raises(UsageError, match=error):
        release_item(
            g.quarantine, "x.json", channel="documents", drop=g.drop, key=g.key,
            trusted=g.trusted, override=code,
        )  # fmt: skip
    assert list(g.drop.iterdir()) == []
    assert not (g.quarantine / "releases.jsonl").exists()


def _refused(code: str, **report: Any) -> Verdict:
    return Verdict("reject", report.pop("type_name", None), "x", code, "no", report=report)


def test_override_inputs_set_aside_one_stage_only() -> None:
    pol = policy(types=["pdf", "txt"], limits={"max_bytes": 10})
    sha = "ab" * 32
    assert override_inputs(pol, "a\x01b.pdf", _refused("FILENAME_POLICY", sha256_in=sha)) == (
        pol,
        "released-abababababab.pdf",
    )
    assert override_inputs(pol, "x.exe", _refused("FILENAME_POLICY", sha256_in="../")) == (
        pol,
        "released-file.exe",
    )
    assert override_inputs(pol, "minutes.pdf", _refused("TYPE_MISMATCH")) == (pol, "minutes")
    assert override_inputs(pol, "minutes", _refused("TYPE_MISMATCH")) is None
    widened = override_inputs(pol, "a.png", _refused("TYPE_NOT_ALLOWED", type_name="png"))
    assert widened is not None
    assert widened[0].allowed_types == {"pdf", "txt", "png"}
    assert override_inputs(pol, "a.exe", _refused("TYPE_NOT_ALLOWED", type_name="exe")) is None
    assert override_inputs(pol, "a.pdf", _refused("TYPE_NOT_ALLOWED", type_name="pdf")) is None
    bigger = override_inputs(pol, "a.pdf", _refused("LIMIT_EXCEEDED", size_in=11))
    assert bigger is not None
    assert bigger[0] == replace(pol, limits=replace(pol.limits, max_bytes=11))
    assert override_inputs(pol, "a.pdf", _refused("LIMIT_EXCEEDED", size_in=5)) is None
    assert override_inputs(pol, "a.pdf", _refused("MALWARE_SIGNATURE")) is None
    honoured = {"FILENAME_POLICY", "TYPE_MISMATCH", "TYPE_NOT_ALLOWED", "LIMIT_EXCEEDED"}
    assert honoured == HONOURED_OVERRIDES
