"""`ferry send` and `ferry status` as an integrator's script uses them: one JSON object on
stdout with --json whatever happens, an exit code per kind of outcome, the submission id in
every error (a generated one included) so that sending again makes no second item, and no
traceback for input that cannot be read.

Real agents from `ferry init`, real CURVE sockets.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import Agent, client_config_like, edit_yaml, fast, ferry, init

from ferry.crypto.keys import SecretKey, write_secret_key

pytestmark = pytest.mark.integration

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas" / "messages"
MiB = 1024 * 1024


class Gateway:
    """One outside agent (no inside): ``portal`` may use every channel, ``slow`` (rate
    0.05/s) only messages."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dep = init(root / "d", "--bulk", "bulk")
        edit_yaml(self.dep["outside"]["config"], fast)
        allow = Path(self.dep["api"]["allowlist_entry"])
        allow.write_text(allow.read_text().replace("[messages]", "[messages, documents, bulk]"))
        self.config = self.dep["api"]["client_config"]
        self.slow = self._client("slow", rate=0.05)
        self.agent = Agent("outside", self.dep["outside"]["config"], root / "outside.log")
        self.agent.wait_event("api_listening")

    def _client(self, name: str, *, rate: float) -> str:
        key = SecretKey.generate("x25519")
        write_secret_key(self.root / f"{name}.key", key, "api-client")
        (Path(self.dep["api"]["allowlist"]) / f"{name}.yaml").write_text(
            f"version: 1\nname: {name}\npublic_key: {key.public.to_string()}\n"
            f"channels: [messages]\nrate: {rate}\n"
        )
        config = self.root / f"{name}.yaml"
        return client_config_like(self.config, config, client_key=str(config.with_suffix(".key")))

    def send(self, *args: str, stdin: bytes | None = None, timeout: str = "10") -> Sent:
        cmd = [sys.executable, "-m", "ferry.cli", "send", "-c", self.config, "--json"]
        cmd += ["--timeout", timeout, *args]
        return Sent(subprocess.run(cmd, input=stdin, capture_output=True, check=False))


class Sent:
    """A finished `ferry send --json`: its exit code, its one JSON object, its stderr."""

    def __init__(self, proc: subprocess.CompletedProcess[bytes]) -> None:
        self.rc = proc.returncode
        self.stderr = proc.stderr.decode(errors="replace")
        lines = proc.stdout.decode().splitlines()
        assert len(lines) == 1, (proc.stdout, self.stderr)
        self.out: dict[str, Any] = json.loads(lines[0])
        assert "Traceback" not in self.stderr, self.stderr


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = Gateway(tmp_path_factory.mktemp("send"))
    try:
        yield g
    finally:
        g.agent.stop()


def notice(body: str = "x") -> bytes:
    doc = json.loads((SCHEMAS / "agency-notice.schema.json").read_text())["examples"][0]
    doc["body"] = body
    return json.dumps(doc, ensure_ascii=False).encode()


ERROR_KEYS = {"status", "id", "code", "message", "retry_after"}


def test_every_outcome_is_one_json_object_with_its_own_exit_code(
    gw: Gateway, tmp_path: Path
) -> None:
    msg = tmp_path / "notice.json"
    msg.write_bytes(notice())
    ok = gw.send("--channel", "messages", "--schema", "agency-notice", str(msg))
    assert (ok.rc, ok.out["status"]) == (0, "ACCEPTED")

    rejected = gw.send("--channel", "messages", "--schema", "nosuch", str(msg), "--id", "r-1")
    assert rejected.rc == 9
    assert rejected.out["status"] == "REJECTED"
    assert rejected.out["code"] == "SCHEMA_NOT_ALLOWED"
    assert rejected.out["id"] == "r-1"
    assert rejected.out.keys() >= ERROR_KEYS

    gw.config, portal = gw.slow, gw.config
    try:  # one submission a 20 s: the second is BUSY until the timeout
        assert gw.send("--channel", "messages", "--schema", "agency-notice", str(msg)).rc == 0
        busy = gw.send("--channel", "messages", "--schema", "agency-notice", str(msg), timeout="1")
    finally:
        gw.config = portal
    assert busy.rc == 13
    assert busy.out["status"] == "BUSY"
    assert busy.out["retry_after"] > 1
    assert f"--id {busy.out['id']}" in busy.stderr

    down = tmp_path / "down.yaml"
    client_config_like(portal, down, endpoint="tcp://127.0.0.1:9")
    gw.config = str(down)
    try:
        t0 = time.monotonic()
        lost = gw.send("--channel", "messages", str(msg), timeout="1")
    finally:
        gw.config = portal
    assert time.monotonic() - t0 < 5
    assert lost.rc == 11
    assert (lost.out["status"], lost.out["code"]) == ("ERROR", "NO_ANSWER")
    assert "no answer from tcp://127.0.0.1:9 within 1 s" in lost.out["message"]
    assert "server_public_key" in lost.out["message"]
    assert lost.out["id"]
    assert f"send again with --id {lost.out['id']}" in lost.stderr

    gw.config = str(tmp_path / "nope.yaml")
    try:
        missing = gw.send("--channel", "messages", str(msg))
    finally:
        gw.config = portal
    assert (missing.rc, missing.out["status"], missing.out["code"]) == (3, "ERROR", "CONFIG")
    assert missing.out["id"]  # (a generated id, shown even though nothing was sent)


def test_a_consumer_config_is_refused_at_once(gw: Gateway, tmp_path: Path) -> None:
    msg = tmp_path / "notice.json"
    msg.write_bytes(notice())
    gw.config, portal = gw.dep["consumers"]["client_config"], gw.config
    try:
        t0 = time.monotonic()
        wrong = gw.send("--channel", "messages", str(msg), timeout="20")
    finally:
        gw.config = portal
    assert time.monotonic() - t0 < 5
    assert (wrong.rc, wrong.out["code"]) == (3, "CONFIG")
    assert "role consumer" in wrong.out["message"]
    status = ferry("status", "-c", gw.dep["consumers"]["client_config"], "x", check=False)
    assert status.returncode == 3


@pytest.mark.parametrize("length", [129, 300])
def test_an_id_the_gateway_cannot_take_is_refused_at_once(
    gw: Gateway, tmp_path: Path, length: int
) -> None:
    msg = tmp_path / "notice.json"
    msg.write_bytes(notice())
    t0 = time.monotonic()
    bad = gw.send("--channel", "messages", str(msg), "--id", "a" * length)
    assert (bad.rc, bad.out["code"]) == (2, "USAGE")
    status = ferry(
        "status", "-c", gw.config, "a" * length, "--json", "--timeout", "20", check=False
    )
    assert status.returncode == 2
    assert json.loads(status.stdout)["code"] == "USAGE"
    assert time.monotonic() - t0 < 5


def test_status_takes_json_and_an_unknown_id_exits_1(gw: Gateway) -> None:
    out = ferry("status", "-c", gw.config, "never-sent", "--json", check=False)
    assert out.returncode == 1
    assert json.loads(out.stdout)["state"] == "unknown"


def test_input_over_the_message_limit_is_too_large_at_once(gw: Gateway, tmp_path: Path) -> None:
    """Over the API's frame limit the server would drop the connection (no answer until the
    timeout); stdin is read no further than the limit."""
    big = notice("x" * (1100 * 1024))
    t0 = time.monotonic()
    piped = gw.send("--channel", "messages", "--schema", "agency-notice", "-", stdin=big)
    assert (piped.rc, piped.out["status"], piped.out["code"]) == (9, "REJECTED", "TOO_LARGE")
    named = tmp_path / "big.json"
    named.write_bytes(big)
    by_name = gw.send("--channel", "messages", "--schema", "agency-notice", str(named))
    assert (by_name.rc, by_name.out["code"]) == (9, "TOO_LARGE")  # (not WRONG_CHANNEL_KIND)
    assert time.monotonic() - t0 < 5
    # 200 MiB of stdin: refused after the first MiB, in bounded memory (the peak resident
    # size of the processes under a fresh Python, whose only descendants they are)
    script = (
        f"head -c 200M /dev/zero | {sys.executable} -m ferry.cli send -c {gw.config} "
        "--channel messages - --json --timeout 10"
    )
    proc = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, "sh", "-c", script],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert json.loads(proc.stdout)["code"] == "TOO_LARGE"
    assert int(proc.stderr.split()[-1]) < 150 * 1024, proc.stderr  # KiB


PEAK_RSS = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)"
)


def test_a_small_file_to_a_files_channel_is_uploaded(gw: Gateway, tmp_path: Path) -> None:
    small = tmp_path / "note.bin"
    small.write_bytes(os.urandom(1000))
    sent = gw.send("--channel", "bulk", str(small))
    assert (sent.rc, sent.out["status"]) == (0, "ACCEPTED")
    piped = gw.send("--channel", "bulk", "-", "--name", "piped.bin", stdin=small.read_bytes())
    assert (piped.rc, piped.out["status"]) == (0, "ACCEPTED")
    unnamed = gw.send("--channel", "bulk", "-", stdin=small.read_bytes())
    assert (unnamed.rc, unnamed.out["code"]) == (9, "WRONG_CHANNEL_KIND")
    assert "--upload --name" in unnamed.out["message"]


def test_input_that_cannot_be_read_is_a_usage_error(gw: Gateway, tmp_path: Path) -> None:
    for path in (tmp_path / "missing.json", tmp_path):
        bad = gw.send("--channel", "messages", str(path))
        assert (bad.rc, bad.out["status"], bad.out["code"]) == (2, "ERROR", "USAGE")
    nameless = gw.send("--channel", "bulk", "-", "--upload", stdin=b"data")
    assert (nameless.rc, nameless.out["code"]) == (2, "USAGE")
    assert "--name" in nameless.out["message"]
    latin1 = os.fsdecode(bytes(tmp_path) + b"/r\xe9sum\xe9.bin")
    Path(latin1).write_bytes(b"data")
    undecodable = gw.send("--channel", "bulk", latin1, "--upload")
    assert (undecodable.rc, undecodable.out["code"]) == (2, "USAGE")
    assert "--name" in undecodable.out["message"]
    renamed = gw.send("--channel", "bulk", latin1, "--upload", "--name", "resume.bin")
    assert renamed.out["status"] == "ACCEPTED"


def test_uploads_from_stdin_and_a_pipe(gw: Gateway, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB)  # (more than a message: spooled, then sent in chunks)
    from_stdin = gw.send("--channel", "bulk", "-", "--upload", "--name", "a.bin", stdin=data)
    assert from_stdin.out["status"] == "ACCEPTED", from_stdin.out
    (tmp_path / "src.bin").write_bytes(data)
    script = (
        f"{sys.executable} -m ferry.cli send -c {gw.config} --channel bulk --upload --json "
        f"--name b.bin <(cat {tmp_path / 'src.bin'})"
    )
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=False)
    assert json.loads(proc.stdout)["status"] == "ACCEPTED", proc.stderr
    too_big = gw.send(
        "--channel", "bulk", "-", "--upload", "--name", "c.bin", "--upload-limit", str(MiB),
        stdin=data,
    )  # fmt: skip
    assert (too_big.rc, too_big.out["code"]) == (9, "TOO_LARGE")


def test_bad_options_are_one_json_object_too(gw: Gateway) -> None:
    for bad in (
        ["--bogus"],
        ["--timeout", "inf"],
        ["--timeout", "nan"],
        ["--timeout", "-1"],
        ["--message-limit", "100000000000"],
        ["--message-limit", "1e21"],
    ):
        sent = gw.send("--channel", "messages", "x.json", *bad)
        assert (sent.rc, sent.out["status"], sent.out["code"]) == (2, "ERROR", "USAGE"), bad
    cmd = [sys.executable, "-m", "ferry.cli", "send", "-c", gw.config, "--json", "x.json"]
    missing = Sent(subprocess.run(cmd, capture_output=True, check=False))  # (no --channel)
    assert (missing.rc, missing.out["code"]) == (2, "USAGE")
    assert "--channel" in missing.out["message"]


def test_a_send_stopped_midway_says_its_id_and_leaves_no_copy(gw: Gateway, tmp_path: Path) -> None:
    """SIGTERM (timeout(1), systemd) or Ctrl-C while an upload from a pipe is copied aside:
    its temporary copy is removed, and the submission id is told (the gateway may already
    have the submission: only sending again with that id is safe)."""
    spool = tmp_path / "tmp"
    spool.mkdir()
    # (Ctrl-C as at a terminal: a shell's background jobs, this run's too, may have SIGINT
    # ignored, and Python then leaves it so)
    interactive = (
        "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "sys.argv[0] = 'ferry'; runpy.run_module('ferry.cli', run_name='__main__')"
    )
    cmd = [sys.executable, "-c", interactive, "send", "-c", gw.config, "--json", "--channel"]
    cmd += ["bulk", "-", "--upload", "--name", "big.bin", "--id", "stopped-1"]
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(os.environ, TMPDIR=str(spool)),
        )
        assert proc.stdin is not None
        proc.stdin.write(os.urandom(2 << 20))  # (a stream still open: being copied aside)
        proc.stdin.flush()
        deadline = time.monotonic() + 10
        while not list(spool.iterdir()):
            assert time.monotonic() < deadline, "no temporary copy was made"
            time.sleep(0.05)
        proc.send_signal(sig)
        proc.wait(timeout=10)  # (stdin still open: only the signal can end it)
        proc.stdin.close()
        assert proc.stdout is not None
        assert proc.stderr is not None
        out, err = proc.stdout.read(), proc.stderr.read()
        stopped = json.loads(out)
        assert proc.returncode == 130
        assert (stopped["status"], stopped["code"], stopped["id"]) == (
            "ERROR",
            "INTERRUPTED",
            "stopped-1",
        )
        assert b"--id stopped-1" in err
        assert list(spool.iterdir()) == []


def test_an_answer_stdout_cannot_take_still_names_the_item(gw: Gateway, tmp_path: Path) -> None:
    msg = tmp_path / "notice.json"
    msg.write_bytes(notice())
    cmd = [sys.executable, "-m", "ferry.cli", "send", "-c", gw.config, "--json", "--channel"]
    cmd += ["messages", "--schema", "agency-notice", str(msg), "--id", "full-1"]
    with open("/dev/full", "wb") as full:
        proc = subprocess.run(cmd, stdout=full, stderr=subprocess.PIPE, check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 1
    assert "submission id full-1" in err, err
    assert "accepted (item " in err, err
    assert "Traceback" not in err
    again = gw.send(
        "--channel", "messages", "--schema", "agency-notice", str(msg), "--id", "full-1"
    )
    assert (again.out["status"], again.out["duplicate"]) == ("ACCEPTED", True)
