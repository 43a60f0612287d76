"""The outer API end to end: real agents, real ZeroMQ sockets with CURVE, real UDP.

A deployment from ``ferry init`` provisions one API client (``portal``) and one
inner consumer (``inner-app``); messages go API -> outside spool -> diode ->
inside re-check -> messages folder and consumer socket.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from cli_helpers import client_config_like, edit_yaml, fast, ferry, init

from ferry.client import ApiRejected, ApiUnavailable, Client, Consumer
from ferry.config import load_client_config
from ferry.crypto.keys import SecretKey, load_public_key, load_secret_key, write_secret_key
from ferry.errors import UsageError
from ferry.zmqsec import curve_client

pytestmark = pytest.mark.integration

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas" / "messages"


def example(schema: str) -> dict[str, Any]:
    doc = json.loads((SCHEMAS / f"{schema}.schema.json").read_text())
    return copy.deepcopy(doc["examples"][0])  # type: ignore[no-any-return]


def application(n: int) -> bytes:
    doc = example("citizen-application")
    doc["application_id"] = str(uuid.UUID(int=n + 1))
    return json.dumps(doc, ensure_ascii=False).encode()


def _deploy(tmp_path: Path, change_out=None, change_in=None) -> dict[str, Any]:
    dep = init(tmp_path / "d")

    def out(data: dict) -> None:
        fast(data)
        if change_out:
            change_out(data)

    edit_yaml(dep["outside"]["config"], out)
    if change_in:
        edit_yaml(dep["inside"]["config"], change_in)
    return dep


def _wait_json_files(folder: str, n: int, timeout: float = 60.0) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = sorted(Path(folder).glob("*.json"))
        if len(files) >= n:
            return files
        time.sleep(0.05)
    raise AssertionError(f"{len(list(Path(folder).glob('*.json')))} of {n} messages in {folder}")


def _consume(consumer: Consumer, n: int, timeout: float = 60.0) -> dict[str, bytes]:
    got: dict[str, bytes] = {}
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        batch = consumer.receive(timeout=0.5)
        for d in batch:
            got[d.item] = d.body
        if batch:
            consumer.ack([d.item for d in batch])
    return got


def test_submit_is_acknowledged_then_delivered_to_folder_and_consumer(
    tmp_path: Path, agents
) -> None:
    dep = _deploy(tmp_path)
    agents("inside", dep["inside"]["config"])
    outside = agents("outside", dep["outside"]["config"])
    outside.wait_event("api_listening")
    consumer = Consumer.from_config(dep["consumers"]["client_config"])
    with Client.from_config(dep["api"]["client_config"]) as client:
        raw = application(1)
        ack = client.submit("messages", raw, schema="citizen-application")
        assert ack.channel == "messages"
        assert ack.seq == 1
        assert not ack.duplicate
        notice = json.dumps(example("agency-notice"), ensure_ascii=False, indent=4).encode()
        ack2 = client.submit("messages", notice, schema="agency-notice")
        assert ack2.seq == 2
    files = _wait_json_files(dep["channels"]["messages"]["deliver"], 2)
    bodies = {p.name: p.read_bytes() for p in files}
    # canonical re-serialisation: no whitespace, same content
    assert json.loads(bodies["citizen-application-00000001.json"]) == json.loads(raw)
    assert json.loads(bodies["agency-notice-00000002.json"]) == json.loads(notice)
    assert b"\n" not in bodies["agency-notice-00000002.json"]
    got = _consume(consumer, 2)
    consumer.close()
    assert set(got) == {ack.item, ack2.item}
    assert got[ack.item] == bodies["citizen-application-00000001.json"]


@pytest.mark.slow  # (5-20 s: run with `python3 tasks.py test --slow`)
def test_ferry_send_needs_no_schema_when_the_message_matches_one_of_the_channels(
    tmp_path: Path, agents
) -> None:
    """The command of the issue and the README, as written: `ferry init`'s messages channel
    takes two schemas; a message sent without naming one is checked against each, and
    delivered under the one it matches. One that matches none is refused with what each
    schema found."""
    dep = _deploy(tmp_path)
    agents("inside", dep["inside"]["config"])
    outside = agents("outside", dep["outside"]["config"])
    outside.wait_event("api_listening")
    client = dep["api"]["client_config"]
    app, notice, neither = tmp_path / "app.json", tmp_path / "notice.json", tmp_path / "x.json"
    app.write_bytes(application(3))
    example = json.loads((SCHEMAS / "agency-notice.schema.json").read_text())["examples"][0]
    notice.write_text(json.dumps(example, ensure_ascii=False))
    neither.write_text('{"x": 1}')
    first = json.loads(
        ferry("send", "-c", client, "--channel", "messages", str(app), "--json").stdout
    )
    assert first["status"] == "ACCEPTED", first
    # a retry naming the schema (or after an operator changed the channel's schemas): the
    # same submission, the first answer
    again = json.loads(
        ferry(
            "send", "-c", client, "--channel", "messages", "--schema", "citizen-application",
            str(app), "--json", "--id", first["id"],
        ).stdout
    )  # fmt: skip
    assert (again["status"], again["item"], again["duplicate"]) == ("ACCEPTED", first["item"], True)
    second = json.loads(
        ferry("send", "-c", client, "--channel", "messages", str(notice), "--json").stdout
    )
    assert second["status"] == "ACCEPTED", second
    refused = ferry(
        "send", "-c", client, "--channel", "messages", str(neither), "--json", check=False
    )
    assert refused.returncode == 9
    why = json.loads(refused.stdout.splitlines()[0])
    assert why["code"] == "SCHEMA_INVALID", why
    assert "citizen-application: " in why["message"], why
    assert "agency-notice: " in why["message"], why
    files = _wait_json_files(dep["channels"]["messages"]["deliver"], 2)
    assert sorted(p.name for p in files) == [
        "agency-notice-00000002.json",
        "citizen-application-00000001.json",
    ]
    assert json.loads((files[0].parent / "agency-notice-00000002.json").read_text()) == example


def test_ferry_send_cli_on_a_fresh_deployment(tmp_path: Path, agents) -> None:
    dep = _deploy(tmp_path)
    agents("inside", dep["inside"]["config"])
    outside = agents("outside", dep["outside"]["config"])
    outside.wait_event("api_listening")
    msg = tmp_path / "app.json"
    msg.write_bytes(application(7))
    out = ferry(
        "send", "-c", dep["api"]["client_config"], "--channel", "messages",
        "--schema", "citizen-application", str(msg), "--json", "--id", "portal-7",
    )  # fmt: skip
    ack = json.loads(out.stdout)
    assert ack["status"] == "ACCEPTED"
    assert ack["id"] == "portal-7"
    assert ack["seq"] == 1
    again = json.loads(
        ferry(
            "send",
            "-c",
            dep["api"]["client_config"],
            "--channel",
            "messages",
            "--schema",
            "citizen-application",
            str(msg),
            "--json",
            "--id",
            "portal-7",
        ).stdout
    )
    assert again["item"] == ack["item"]
    assert again["duplicate"] is True
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"a": 1, "a": 2}')
    rejected = ferry(
        "send", "-c", dep["api"]["client_config"], "--channel", "messages",
        "--schema", "citizen-application", str(bad), "--json", check=False,
    )  # fmt: skip
    assert rejected.returncode == 9
    why = json.loads(rejected.stdout.splitlines()[0])
    assert why["code"] == "DUPLICATE_KEY"
    assert why["message"].startswith("duplicate key"), why  # (not the code and path again)
    _wait_json_files(dep["channels"]["messages"]["deliver"], 1)
    status = json.loads(ferry("status", "-c", dep["api"]["client_config"], "portal-7").stdout)
    assert status["item"] == ack["item"]
    assert status["state"] in {"queued", "sent"}
    assert status["sends"] >= 1


def test_idempotent_submission_ids(tmp_path: Path, agents) -> None:
    dep = _deploy(tmp_path)
    outside = agents("outside", dep["outside"]["config"])
    outside.wait_event("api_listening")
    with Client.from_config(dep["api"]["client_config"]) as client:
        first = client.submit(
            "messages", application(1), schema="citizen-application", submission_id="s-1"
        )
        again = client.submit(
            "messages", application(1), schema="citizen-application", submission_id="s-1"
        )
        assert again.item == first.item
        assert again.seq == first.seq
        assert again.duplicate
        with pytest.raises(ApiRejected) as err:
            client.submit(
                "messages", application(2), schema="citizen-application", submission_id="s-1"
            )
        assert err.value.reason_code == "SUBMISSION_ID_REUSED"
        nxt = client.submit(
            "messages", application(2), schema="citizen-application", submission_id="s-2"
        )
        assert nxt.seq == first.seq + 1  # the conflict took no sequence number


@pytest.mark.parametrize(
    ("data", "code", "path"),
    [
        (b'{"x": 1, "x": 2}', "DUPLICATE_KEY", None),
        (b'{"x": NaN}', "NON_FINITE_NUMBER", None),
        (b'{"x": "\xff\xfe"}', "INVALID_UTF8", None),
        (b'\xef\xbb\xbf{"x": 1}', "BOM", None),
        (b"[" * 5000 + b"]" * 5000, "TOO_DEEP", None),
        (b'{"x": 1', "MALFORMED_JSON", None),
        (b"[1, 2]", "NOT_AN_OBJECT", None),
    ],
)
def test_malformed_json_is_rejected_with_its_reason(
    api_deployment, data: bytes, code: str, path: Any
) -> None:
    client: Client = api_deployment
    with pytest.raises(ApiRejected) as err:
        client.submit("messages", data, schema="citizen-application")
    assert err.value.reason_code == code


@pytest.fixture(scope="module")
def api_deployment(tmp_path_factory: pytest.TempPathFactory):
    """One outside agent (no inside) shared by the rejection tests."""
    tmp = tmp_path_factory.mktemp("api")
    dep = _deploy(tmp)
    log = tmp / "outside.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ferry.cli", "--log-json", "outside", "run", "-c",
             dep["outside"]["config"]],
            stdout=fh, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        _wait_log(log, "api_listening")
        client = Client.from_config(dep["api"]["client_config"])
        client.dep = dep  # type: ignore[attr-defined]
        yield client
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def _wait_log(log: Path, event: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if f'"event": "{event}"' in log.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise AssertionError(log.read_text()[-3000:])


def _mutate(path: list[Any], value: Any) -> bytes:
    doc = example("citizen-application")
    target = doc
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return json.dumps(doc, ensure_ascii=False).encode()


@pytest.mark.parametrize(
    ("path", "value", "json_path"),
    [
        (["submitted_at"], "2026-13-45 25:61", "$.submitted_at"),
        (["submitted_at"], "yesterday", "$.submitted_at"),
        (["application_id"], "not-a-uuid", "$.application_id"),
        (["applicant", "id_number"], "110101199003070000", "$.applicant.id_number"),
        (["applicant"], KeyError, "$.applicant"),
        (["unexpected"], 1, "$.unexpected"),
    ],
)
def test_schema_failures_name_the_json_path(
    api_deployment, path: list[Any], value: Any, json_path: str
) -> None:
    client: Client = api_deployment
    with pytest.raises(ApiRejected) as err:
        client.submit("messages", _mutate(path, value), schema="citizen-application")
    assert err.value.reason_code == "SCHEMA_INVALID"
    assert err.value.path == json_path, err.value


def _grown_application(raw_bytes: int) -> bytes:
    """A valid application of exactly ``raw_bytes`` bytes whose canonical form is 100 bytes
    longer: its 20 attachment sizes are written ``5e7`` (RFC 8785 writes 50000000)."""
    doc = example("citizen-application")
    att = doc["attachments"][0]
    doc["attachments"] = [dict(att, size=50_000_000) for _ in range(20)]
    doc["content"]["form"] = [
        {"field": f"f{i}", "label": "x", "value": "\u0001" * 2000} for i in range(100)
    ]
    doc["content"]["description"] = ""

    def raw() -> bytes:
        text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
        return text.replace('"size":50000000', '"size":5e7').encode()

    keep = 100 * 2000 - (len(raw()) - raw_bytes + 5) // 6  # (escapes of 6 bytes to keep)
    for i, field in enumerate(doc["content"]["form"]):
        field["value"] = "\u0001" * min(2000, max(0, keep - 2000 * i))
    doc["content"]["description"] = "x" * (raw_bytes - len(raw()))
    data = raw()
    assert len(data) == raw_bytes, (len(data), raw_bytes)
    return data


def test_a_message_whose_canonical_form_is_over_the_limit_is_refused(api_deployment) -> None:
    """The limit is on what is delivered: numbers may grow in canonical form (5e7 is
    50000000), and a message the outside acknowledged must never be refused inside as too
    large. 1 MiB is the default limit of the messages channel and the API."""
    client: Client = api_deployment
    app = "citizen-application"
    with pytest.raises(ApiRejected) as err:
        client.submit("messages", _grown_application(1024 * 1024 - 50), schema=app)
    assert err.value.reason_code == "TOO_LARGE"
    assert "canonical" in err.value.message
    ack = client.submit("messages", _grown_application(1024 * 1024 - 100), schema=app)
    assert ack.item


def test_request_errors(api_deployment) -> None:
    client: Client = api_deployment
    with pytest.raises(ApiRejected) as err:
        client.submit("nope", application(1), schema="citizen-application")
    assert err.value.reason_code == "CHANNEL_NOT_ALLOWED"
    with pytest.raises(ApiRejected) as err:
        client.submit("messages", application(1), schema="other")
    assert err.value.reason_code == "SCHEMA_NOT_ALLOWED"
    with pytest.raises(UsageError, match="printable ASCII"):  # (refused before it is sent)
        client.submit("messages", application(1), schema="citizen-application", submission_id=" ")


def test_malformed_frames_are_rejected_and_the_server_keeps_serving(api_deployment) -> None:
    client: Client = api_deployment
    cfg = load_client_config(Path(client.dep["api"]["client_config"]))  # type: ignore[attr-defined]
    key = load_secret_key(cfg.client_key)  # the portal's own key: frames are authenticated
    ctx: zmq.Context = zmq.Context()
    sock = curve_client(ctx, zmq.DEALER, key, load_public_key(cfg.server_public_key))
    sock.connect(cfg.endpoint)
    bad_frames = [
        [b"garbage"],
        [b"FERRY/1"],
        [b"FERRY/0", b"SUBMIT", msgpack.packb({"id": "x"})],
        [b"FERRY/1", b"SUBMIT", b"\xc1not msgpack"],
        [b"FERRY/1", b"SUBMIT", msgpack.packb([1, 2])],
        [b"FERRY/1", b"LAUNCH", msgpack.packb({"id": "x"})],
        [b"FERRY/1", b"SUBMIT", msgpack.packb({"id": "x", "channel": 5}), b"{}"],
        [b"FERRY/1", b"SUBMIT", msgpack.packb({"id": " ", "channel": "messages"}), b"{}"],
        [b"FERRY/1", b"CHUNK", msgpack.packb({"upload": "zz", "offset": 0}), b"data"],
    ]
    try:
        for frames in bad_frames:
            sock.send_multipart(frames)
            assert sock.poll(5000), frames
            reply = sock.recv_multipart()
            assert reply[1] == b"REJECTED", (frames, reply)
            body = msgpack.unpackb(reply[2])
            assert body["code"] in {"BAD_REQUEST", "UNKNOWN_UPLOAD"}, body
        # oversize: libzmq drops the connection; the server keeps serving others
        sock.send_multipart([b"FERRY/1", b"SUBMIT", msgpack.packb({"id": "big"}), bytes(3 << 20)])
        assert not sock.poll(1500)
    finally:
        sock.close(0)
        ctx.term()
    ack = client.submit("messages", application(99), schema="citizen-application")
    assert ack.item


def test_unknown_key_is_refused(api_deployment, tmp_path: Path) -> None:
    client: Client = api_deployment
    cfg_path = Path(client.dep["api"]["client_config"])  # type: ignore[attr-defined]
    stranger = tmp_path / "stranger.key"
    write_secret_key(stranger, SecretKey.generate("x25519"), "api-client")
    other = tmp_path / "stranger.yaml"
    client_config_like(cfg_path, other, client_key=str(stranger))
    with Client.from_config(other) as c, pytest.raises(ApiUnavailable, match="refused"):
        c.submit("messages", application(1), timeout=5)


def test_revoked_key_stops_working_for_a_connected_client(tmp_path: Path, agents) -> None:
    dep = _deploy(tmp_path)
    outside = agents("outside", dep["outside"]["config"])
    outside.wait_event("api_listening")
    with Client.from_config(dep["api"]["client_config"]) as client:
        assert client.submit("messages", application(1), schema="citizen-application").seq == 1
        os.unlink(dep["api"]["allowlist_entry"])  # revoke
        time.sleep(1.5)  # the allow-list is re-read at most once a second
        with pytest.raises(ApiRejected) as err:
            client.submit("messages", application(2), schema="citizen-application", timeout=5)
        assert err.value.reason_code == "UNAUTHENTICATED"


def test_spool_full_gives_busy_then_recovers(tmp_path: Path, agents) -> None:
    def slow(data: dict) -> None:
        data["api"]["busy_items"] = 3
        for ch in data["channels"]:
            if ch["name"] == "messages":  # items stay spooled until their 2nd copy, 3 s later
                ch["repeat"] = {"count": 2, "spread": 3}

    dep = _deploy(tmp_path, slow)
    outside = agents("outside", dep["outside"]["config"])
    outside.wait_event("api_listening")
    cfg = load_client_config(Path(dep["api"]["client_config"]))
    ctx: zmq.Context = zmq.Context()
    sock = curve_client(
        ctx, zmq.DEALER, load_secret_key(cfg.client_key), load_public_key(cfg.server_public_key)
    )
    sock.connect(cfg.endpoint)
    verbs = []
    try:
        for n in range(8):
            body = {"id": f"b-{n}", "channel": "messages", "schema": "citizen-application"}
            sock.send_multipart([b"FERRY/1", b"SUBMIT", msgpack.packb(body), application(n)])
            assert sock.poll(5000)
            verbs.append(sock.recv_multipart()[1])
    finally:
        sock.close(0)
        ctx.term()
    assert verbs[:3] == [b"ACCEPTED"] * 3
    assert b"BUSY" in verbs[3:], verbs
    # recovery: once the backlog drains, the client's retries get through
    t0 = time.monotonic()
    with Client.from_config(dep["api"]["client_config"]) as client:
        ack = client.submit("messages", application(100), schema="citizen-application", timeout=60)
    assert ack.item
    assert time.monotonic() - t0 > 0.5  # it waited for the backlog to drain


def test_acknowledged_message_survives_kill_9_of_the_outside(tmp_path: Path, agents) -> None:
    def slow(data: dict) -> None:
        data["link"]["rate"] = 20_000  # nothing gets far before the kill
        for ch in data["channels"]:  # (a first copy that left before the kill, into a link
            if ch["name"] == "messages":  # with no inside yet, is followed by its repeat)
                ch["repeat"] = {"count": 2, "spread": 3}

    dep = _deploy(tmp_path, slow, lambda d: d["link"].update(rate=20_000))
    outside = agents("outside", dep["outside"]["config"])
    outside.wait_event("api_listening")
    with Client.from_config(dep["api"]["client_config"]) as client:
        acks = [
            client.submit("messages", application(n), schema="citizen-application")
            for n in range(5)
        ]
    outside.proc.send_signal(signal.SIGKILL)
    outside.proc.wait()

    def normal(data: dict) -> None:
        data["link"]["rate"] = "800M"

    edit_yaml(dep["outside"]["config"], normal)
    edit_yaml(dep["inside"]["config"], normal)
    agents("inside", dep["inside"]["config"])
    agents("outside", dep["outside"]["config"])
    files = _wait_json_files(dep["channels"]["messages"]["deliver"], 5)
    time.sleep(1.0)  # repeats arrive too: still exactly one file per message
    files = sorted(Path(dep["channels"]["messages"]["deliver"]).glob("*.json"))
    assert len(files) == 5
    assert {json.loads(p.read_bytes())["application_id"] for p in files} == {
        str(uuid.UUID(int=n + 1)) for n in range(5)
    }
    assert len({a.item for a in acks}) == 5


def test_chunked_upload_to_a_files_channel(tmp_path: Path, agents) -> None:
    dep = _deploy(tmp_path)
    allow = Path(dep["api"]["allowlist_entry"])
    allow.write_text(
        allow.read_text().replace("channels: [messages]", "channels: [messages, documents]")
    )
    agents("inside", dep["inside"]["config"])
    outside = agents("outside", dep["outside"]["config"])
    outside.wait_event("api_listening")
    # a 3 MiB text (several chunks); uploads go through the content pipeline like folders
    line = "第{}行：申请材料扫描件的文字内容。\n"
    data = "".join(line.format(i) for i in range(120_000)).encode()[: 3 * 1024 * 1024 + 17]
    data = data[: data.rfind(b"\n") + 1]
    src = tmp_path / "扫描件.txt"
    src.write_bytes(data)
    fake = tmp_path / "扫描件.pdf"  # random bytes posing as a PDF: refused, never spooled
    fake.write_bytes(os.urandom(300_000))
    seen: list[int] = []
    time.sleep(1.5)  # allow-list reload
    with Client.from_config(dep["api"]["client_config"]) as client:
        ack = client.upload("documents", src, progress=lambda off, size: seen.append(off))
        with pytest.raises(ApiRejected) as refused:
            client.upload("documents", fake)
    assert refused.value.reason_code in {"TYPE_MISMATCH", "MALFORMED", "TYPE_NOT_ALLOWED"}
    assert ack.channel == "documents"
    assert seen
    assert seen == sorted(seen)
    assert seen[-1] < len(data)
    target = Path(dep["channels"]["documents"]["deliver"]) / "扫描件.txt"
    deadline = time.monotonic() + 60
    while not target.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert target.read_bytes() == data


@pytest.mark.slow
def test_flood_of_100k_small_submissions(tmp_path: Path, agents) -> None:
    """100,000 pipelined submissions: every one answered, no item lost or doubled."""

    def roomy(data: dict) -> None:
        data["api"]["busy_items"] = 1_000_000

    dep = _deploy(tmp_path, roomy)
    entry = Path(dep["api"]["allowlist_entry"])
    entry.write_text(entry.read_text().replace("rate: 5000", "rate: 1000000"))
    outside = agents("outside", dep["outside"]["config"])
    outside.wait_event("api_listening")
    n = 100_000
    seqs: set[int] = set()
    items: set[str] = set()
    rejected = 0
    with Client.from_config(dep["api"]["client_config"]) as client:
        stream = (("messages", application(i), "citizen-application") for i in range(n))
        for _sid, answer in client.submit_many(stream, window=2000, timeout=120):
            if isinstance(answer, ApiRejected):
                rejected += 1
                continue
            seqs.add(answer.seq)
            items.add(answer.item)
    assert rejected == 0
    assert seqs == set(range(1, n + 1))
    assert len(items) == n
