"""The Python client's errors: each carries its submission id (a generated one included), so
that sending again makes no second item; a consumer whose key is refused is told so; an
upload the outside forgot in a restart begins again.

Real agents from `ferry init`, real CURVE sockets.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import Agent, application, client_config_like, edit_yaml, fast, init
from structlog.testing import capture_logs

import ferry.client as client_mod
from ferry.client import ApiUnavailable, Client, Consumer
from ferry.crypto.keys import SecretKey, write_secret_key

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


def _outside(tmp_path: Path, agents: Any) -> tuple[dict[str, Any], Agent]:
    """A deployment whose ``portal`` may use its bulk channel too; its outside agent."""
    dep = init(tmp_path / "d", "--bulk", "bulk")
    edit_yaml(dep["outside"]["config"], fast)
    allow = Path(dep["api"]["allowlist_entry"])
    allow.write_text(allow.read_text().replace("[messages]", "[messages, bulk]"))
    outside: Agent = agents("outside", dep["outside"]["config"])
    outside.wait_event("api_listening")
    return dep, outside


def test_errors_of_the_client_carry_the_submission_id(tmp_path: Path, agents: Any) -> None:
    """The answer to a submission with a generated id is lost: the error says the id, and
    sending again with it gives the same item, not a second one."""
    dep, outside = _outside(tmp_path, agents)
    data = application(4242)
    with Client.from_config(dep["api"]["client_config"]) as client:
        client.status("warm-up", timeout=5)  # (connected, handshake done)
        os.kill(outside.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(ApiUnavailable) as err:
                client.submit("messages", data, schema="citizen-application", timeout=1)
        finally:
            os.kill(outside.proc.pid, signal.SIGCONT)
        sid = err.value.submission_id
        assert sid
        first = client.submit("messages", data, schema="citizen-application", submission_id=sid)
        again = client.submit("messages", data, schema="citizen-application", submission_id=sid)
    assert again.item == first.item
    assert again.duplicate


def test_an_upload_cut_by_a_restart_of_the_outside_begins_again(
    tmp_path: Path, agents: Any
) -> None:
    dep, outside = _outside(tmp_path, agents)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(6 * MiB))  # (24 chunks of 256 KiB, 8 in flight)
    restarted: list[Agent] = []

    def restart_once(offset: int, size: int) -> None:
        if restarted:
            return
        time.sleep(0.3)  # (the credit for every chunk in flight is in)
        outside.stop()
        restarted.append(agents("outside", dep["outside"]["config"]))
        restarted[0].wait_event("api_listening")

    with capture_logs() as logs, Client.from_config(dep["api"]["client_config"]) as client:
        ack = client.upload("bulk", src, timeout=20, progress=restart_once)
    assert restarted
    assert ack.channel == "bulk"
    restarts = [e["code"] for e in logs if e["event"] == "upload_restarted"]
    # begun again once: on the dropped connection, or on the new outside's refusal of a
    # chunk of the old upload (whichever the client saw first)
    assert len(restarts) == 1
    assert restarts[0] in {"CONNECTION_DROPPED", "UNKNOWN_UPLOAD"}


def test_a_message_over_the_gateways_limit_is_told_at_once(tmp_path: Path, agents: Any) -> None:
    """The gateway drops the connection of a frame over its limit (1 MiB): the client sends
    once more, then says so, instead of waiting out its timeout; the gateway goes on."""
    dep, _ = _outside(tmp_path, agents)
    with Client.from_config(dep["api"]["client_config"]) as client:
        start = time.monotonic()
        with pytest.raises(ApiUnavailable) as err:
            client.submit("messages", b'{"x": "' + b"a" * (3 * MiB) + b'"}', timeout=60)
        assert time.monotonic() - start < 10
        assert err.value.code == "CONNECTION_DROPPED"
        assert "size limit" in str(err.value)
        assert err.value.submission_id
        ack = client.submit("messages", application(1), timeout=10)
    assert ack.channel == "messages"


def test_a_submission_cut_by_a_restart_of_the_outside_is_sent_again(
    tmp_path: Path, agents: Any
) -> None:
    """The outside dies (kill -9) with a submission unanswered: the client sends it again to
    the restarted outside and gets its acknowledgement within its timeout."""
    dep, outside = _outside(tmp_path, agents)
    result: list[Any] = []
    with Client.from_config(dep["api"]["client_config"]) as client:
        client.status("warm-up", timeout=5)  # (connected, handshake done)
        os.kill(outside.proc.pid, signal.SIGSTOP)  # it will not answer
        worker = threading.Thread(
            target=lambda: result.append(client.submit("messages", application(7), timeout=30))
        )
        worker.start()
        time.sleep(0.5)  # (the submission is on its way)
        os.kill(outside.proc.pid, signal.SIGKILL)
        outside.proc.wait()
        agents("outside", dep["outside"]["config"]).wait_event("api_listening")
        worker.join(40)
    assert result, "no acknowledgement"
    assert result[0].channel == "messages"


def test_a_consumer_whose_key_is_refused_is_told_so(tmp_path: Path, agents: Any) -> None:
    dep = init(tmp_path / "d")
    inside: Agent = agents("inside", dep["inside"]["config"])
    inside.wait_event("consumers_listening")
    stranger = tmp_path / "stranger.key"
    write_secret_key(stranger, SecretKey.generate("x25519"), "consumer")
    mine = Path(dep["consumers"]["client_config"])
    config = tmp_path / "stranger.yaml"
    client_config_like(mine, config, client_key=str(stranger))
    with Consumer.from_config(config) as consumer, pytest.raises(ApiUnavailable) as err:
        _receive_for(consumer, 10.0)
    assert err.value.code == "KEY_REFUSED"
    assert "refused this consumer key" in str(err.value)


def _receive_for(consumer: Consumer, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        consumer.receive(timeout=0.5)


def _restart(dep: dict[str, Any], agents: Any, outside: Agent) -> Agent:
    """The outside restarted while the client waits for nothing (it reconnects meanwhile)."""
    outside.stop()
    new: Agent = agents("outside", dep["outside"]["config"])
    new.wait_event("api_listening")
    time.sleep(1.0)
    return new


@pytest.mark.slow  # (5-20 s: run with `python3 tasks.py test --slow`)
def test_restarts_of_the_outside_between_calls_are_no_drops_of_later_calls(
    tmp_path: Path, agents: Any
) -> None:
    """Connections that dropped while no call waited lost nothing of later calls: those are
    not sent twice, not refused as dropped, and a status is a status (not a left-over
    answer of a submission sent twice)."""
    dep, outside = _outside(tmp_path, agents)
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(3 * MiB))
    with Client.from_config(dep["api"]["client_config"]) as client:
        client.submit("messages", application(1), timeout=10)
        outside = _restart(dep, agents, outside)
        outside = _restart(dep, agents, outside)
        with capture_logs() as logs:
            ack = client.submit("messages", application(2), timeout=10)
            state = client.status(ack.id, timeout=5)
            outside = _restart(dep, agents, outside)
            up = client.upload("bulk", src, timeout=20)
        outside = _restart(dep, agents, outside)
        answers = list(
            client.submit_many(
                [("messages", application(n), None) for n in range(10, 60)], timeout=30
            )
        )
    assert not ack.duplicate
    assert state["state"] in {"queued", "sent"}, state
    assert up.channel == "bulk"
    assert [e["event"] for e in logs if "again" in e["event"] or "restart" in e["event"]] == []
    assert len(answers) == 50
    assert len({sid for sid, _ in answers}) == 50
    assert all(not isinstance(a, Exception) and not a.duplicate for _, a in answers)


def test_a_wrong_server_key_is_no_answer_not_a_dropped_message(tmp_path: Path, agents: Any) -> None:
    """A client config naming another server key: the handshakes fail, and each drops its
    connection; that is said as before (no answer; is server_public_key its key?)."""
    dep, _ = _outside(tmp_path, agents)
    other = SecretKey.generate("x25519")
    cfg = client_config_like(
        dep["api"]["client_config"], tmp_path / "c.yaml", server_public_key=other.public.to_string()
    )
    with Client.from_config(cfg) as client, pytest.raises(ApiUnavailable) as err:
        client.submit("messages", application(1), timeout=2)
    assert err.value.code == "NO_ANSWER"
    assert "server_public_key" in str(err.value)


def test_an_upload_whose_file_is_hashed_while_the_outside_restarts_goes_through(
    tmp_path: Path, agents: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large file takes a while to hash before its upload begins; the outside restarting
    meanwhile drops no part of the upload (nothing was sent yet)."""
    dep, outside = _outside(tmp_path, agents)
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(3 * MiB))
    real = client_mod._size_and_digest
    restarted: list[Agent] = []

    def slow_digest(path: Path) -> tuple[int, bytes]:
        restarted.append(_restart(dep, agents, outside))
        return real(path)

    with Client.from_config(dep["api"]["client_config"]) as client:
        client.status("warm-up", timeout=5)  # (connected, handshake done)
        monkeypatch.setattr(client_mod, "_size_and_digest", slow_digest)
        with capture_logs() as logs:
            ack = client.upload("bulk", src, timeout=15)
    assert restarted
    assert ack.channel == "bulk"
    assert [e for e in logs if e["event"] == "upload_restarted"] == []
