"""The Python client's errors: each carries its submission id (a generated one included), so
that sending again makes no second item; a consumer whose key is refused is told so; an
upload the outside forgot in a restart begins again.

Real agents from `ferry init`, real CURVE sockets.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import Agent, application, client_config_like, edit_yaml, fast, init
from structlog.testing import capture_logs

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
    assert [e["code"] for e in logs if e["event"] == "upload_restarted"] == ["UNKNOWN_UPLOAD"]


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
