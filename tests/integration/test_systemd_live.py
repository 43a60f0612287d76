"""The units ``ferry init`` writes, run by a real systemd.

systemd boots as PID 1 of new pid, mount, network and cgroup namespaces on a copy-on-write
overlay of this machine (``systemd_boot.sh``: every write lands in a tmpfs, and the whole
system ends when the test kills it). Inside, both agents of a UDP pair run as the
unprivileged user ``ferry`` under the units' sandbox; the tests move a clerk's file and an
integrator's message across, ask ``ferry health``, check what the kernel enforces (user,
capabilities, the system call filter, the serial line's device access one way only) and stop
the services. A serial pair joined by a one-way pty cable runs under the same systemd.

Needs root, ``unshare`` and systemd (``python3 tasks.py test`` installs Debian's systemd
package when missing and running as root, as in CI).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import application, edit_yaml
from test_audit_agents import wait_for

from ferry.systemd import ferry_command

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="booting systemd in namespaces needs root"),
    pytest.mark.skipif(
        not Path("/lib/systemd/systemd").exists() or shutil.which("unshare") is None,
        reason="systemd or unshare is not installed",
    ),
]

BOOT = Path(__file__).with_name("systemd_boot.sh")
SERIAL_CABLE = """
import os, sys, time, pwd
from ferry.channels.emulator import PtyCable
cable = PtyCable()
user = pwd.getpwnam("ferry")
for path in (cable.outside_path, cable.inside_path):
    os.chown(path, user.pw_uid, user.pw_gid)
print(cable.outside_path, cable.inside_path, flush=True)
while True:
    time.sleep(3600)
"""


@dataclass
class Booted:
    pid: int  # systemd, as the host sees it
    init: dict[str, Any]  # what `ferry init --json` printed in there

    @property
    def root(self) -> Path:
        """The booted system's / (its overlay), seen from the host."""
        return Path(f"/proc/{self.pid}/root")

    def inside(self, path: str | Path) -> Path:
        return self.root / str(path).lstrip("/")

    def run(
        self, *argv: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """``argv`` run in the booted system (its namespaces, root and working directory)."""
        cmd = ["nsenter", "-t", str(self.pid), "-m", "-p", "-n", "-C", "-r", "-w", *argv]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"{argv} exited {result.returncode}: {result.stderr[-2000:]}")
        return result

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, "-p", ",".join(props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str) -> list[dict[str, Any]]:
        out = self.run("journalctl", "-u", unit, "-o", "cat", "--no-pager").stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _child_of(pid: int) -> int:
    """The first child of ``pid`` (0 while it has none)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return 0
    return int(children[0]) if children else 0


def _cgroup_mounts() -> dict[str, Path]:
    """Each mounted cgroup hierarchy by the name /proc/self/cgroup gives it ("" for v2)."""
    mounts: dict[str, Path] = {}
    controllers = {line.split()[0] for line in Path("/proc/cgroups").read_text().splitlines()}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, tail = line.partition(" - ")
        fstype, _, options = tail.split(" ", 2)
        if fstype == "cgroup2":
            mounts.setdefault("", Path(fields.split()[4]))
        elif fstype == "cgroup":
            names = [o for o in options.split(",") if o in controllers or o.startswith("name=")]
            mounts[",".join(names)] = Path(fields.split()[4])
    return mounts


def contain_cgroups(tag: str) -> list[Path]:
    """A child of this process's cgroup in every hierarchy: the booted systemd, in a cgroup
    namespace rooted there, builds its tree under it and not at the host's root. Returns
    those made (it may be none: the boot works without, less tidily)."""
    mounts = _cgroup_mounts()
    made = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        mount = mounts.get(names)
        if mount is None:
            continue
        parent = mount / path.lstrip("/")
        child = parent / tag
        try:
            child.mkdir()
            for knob in ("cpuset.cpus", "cpuset.mems"):  # a v1 cpuset starts with none
                if (child / knob).exists():
                    (child / knob).write_text((parent / knob).read_text())
        except OSError:
            continue
        made.append(child)
    return made


def remove_cgroups(made: list[Path]) -> None:
    """Remove what the booted system left under ``made`` (empty once its processes died)."""
    deadline = time.monotonic() + 10
    for top in made:
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        with contextlib.suppress(OSError):
            top.rmdir()


# `systemctl is-system-running` answers of a systemd that takes requests.
BOOTING_OR_UP = {"initializing", "starting", "running", "degraded", "maintenance"}


@pytest.fixture(scope="module")
def booted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Booted]:
    work = tmp_path_factory.mktemp("systemd")
    log = (work / "boot.log").open("wb")
    argv = ["unshare", "--mount", "--net", "--pid", "--cgroup", "--fork", "--kill-child"]
    program = ferry_command()
    assert len(program) == 1, "the boot script needs ferry as one program (a venv's script)"
    host_ns = os.readlink("/proc/self/ns/mnt")
    cgroups = contain_cgroups(f"ferry-systemd-test-{os.getpid()}")
    enter = 'for p in $FERRY_CGROUPS; do echo $$ > $p/cgroup.procs; done; exec "$@"'
    unshare = subprocess.Popen(
        ["sh", "-c", enter, "sh", *argv, str(BOOT), str(work / "overlay"), program[0], host_ns],
        env={**os.environ, "FERRY_CGROUPS": " ".join(map(str, cgroups))},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        pid = wait_for(lambda: _child_of(unshare.pid), 10, what="the namespace's PID 1")

        def systemd_up() -> bool:
            if unshare.poll() is not None:
                raise AssertionError(f"boot failed: {(work / 'boot.log').read_text()[-3000:]}")
            try:
                return os.readlink(f"/proc/{pid}/exe").endswith("/systemd")
            except OSError:
                return False

        wait_for(systemd_up, 30, what="systemd to start")
        init = json.loads(Path(f"/proc/{pid}/root/root/init.json").read_text())
        booted = Booted(pid, init)

        def answers() -> bool:  # its control socket is up: systemctl can talk to it
            result = booted.run("systemctl", "is-system-running", check=False)
            # ("offline" until systemd has marked the system as booted by it: then every
            # systemctl call fails with "System has not been booted with systemd")
            return result.stdout.strip() in BOOTING_OR_UP

        wait_for(answers, 30, what="systemd to answer systemctl")
        yield booted
    finally:
        unshare.send_signal(signal.SIGKILL)  # --kill-child: the namespace's PID 1 goes too
        unshare.wait(timeout=10)
        log.close()
        remove_cgroups(cgroups)


def active(booted: Booted, *units: str) -> bool:
    """All of ``units`` active and never restarted; an AssertionError with the journal of
    the first that failed or was restarted (Restart=on-failure hides a failure otherwise)."""
    for unit in units:
        props = booted.show(unit, "ActiveState", "NRestarts")
        if props["ActiveState"] == "failed" or props["NRestarts"] != "0":
            journal = booted.run("journalctl", "-u", unit, "--no-pager", check=False).stdout
            raise AssertionError(f"{unit} failed ({props}):\n{journal[-3000:]}")
    states = booted.run("systemctl", "is-active", *units, check=False).stdout.split()
    return states == ["active"] * len(units)


UNITS = ("ferry-outside.service", "ferry-inside.service")
_broken: list[str] = []  # why the agents did not start: the other tests fail at once


@pytest.fixture(scope="module")
def running(booted: Booted) -> Booted:
    if _broken:
        pytest.fail(f"the agents did not start (see the first error): {_broken[0]}")
    try:
        wait_for(lambda: active(booted, *UNITS), 60, what="both agents to be active")
        statuses = [
            booted.inside(Path(booted.init[side]["config"]).parent / "state/status.json")
            for side in ("outside", "inside")
        ]

        def started() -> bool:  # past their self-tests: each has written its status
            return active(booted, *UNITS) and all(s.exists() for s in statuses)

        wait_for(started, 60, what="both agents' status files")
    except AssertionError as exc:
        _broken.append(str(exc)[:500])
        raise
    return booted


def proc_status(booted: Booted, unit: str) -> dict[str, str]:
    main = booted.show(unit, "MainPID")["MainPID"]
    text = booted.inside(f"/proc/{main}/status").read_text()
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


@pytest.mark.parametrize("unit", UNITS)
def test_each_agent_runs_unprivileged_under_the_units_sandbox(running: Booted, unit: str) -> None:
    status = proc_status(running, unit)
    ferry_uid = running.run("id", "-u", "ferry").stdout.strip()
    assert status["Uid"].split()[0] == ferry_uid != "0"
    assert int(status["CapEff"], 16) == 0
    assert int(status["CapBnd"], 16) == 0  # CapabilityBoundingSet= is empty
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2"  # SystemCallFilter= is on
    # systemd's own score of the live unit (lower is better; the offline test's bars: 2.0,
    # 2.2 for the inside, whose filter lets fchown back for delivered files' group)
    threshold = "22" if unit == "ferry-inside.service" else "20"
    result = running.run(
        "systemd-analyze", "security", f"--threshold={threshold}", unit, check=False
    )
    assert result.returncode == 0, result.stdout[-2000:]


def test_a_clerks_file_and_an_integrators_message_cross(running: Booted) -> None:
    documents = running.init["channels"]["documents"]
    delivered = running.inside(documents["deliver"])
    (running.inside(documents["drop"]) / "letter.txt").write_text("a permit application\n")
    got = wait_for(lambda: list(delivered.glob("letter*.txt")), 60, what="the file inside")
    assert got[0].read_text() == "a permit application\n"

    running.inside("/root/message.json").write_bytes(application(7))
    client = running.init["api"]["client_config"]
    sent = running.run(
        *ferry_command(), "send", "-c", client, "--channel", "messages",
        "--schema", "citizen-application", "/root/message.json", "--json",
    )  # fmt: skip
    answer = json.loads(sent.stdout)
    assert answer["status"] == "ACCEPTED", answer
    messages = running.inside(running.init["channels"]["messages"]["deliver"])
    (message,) = wait_for(lambda: list(messages.glob("*.json")), 60, what="the message inside")
    assert json.loads(message.read_text())["application_id"] == str(uuid.UUID(int=8))

    started = [e for e in running.journal(UNITS[0]) if e.get("event") == "content_pipeline_started"]
    assert started, "the content workers never started"
    assert started[-1]["network"] == "userns+netns"  # RestrictNamespaces= lets them leave
    assert started[-1]["seccomp"] == "filter"  # SystemCallFilter= lets them confine themselves


@pytest.mark.parametrize("side", ["outside", "inside"])
def test_health_says_ok(running: Booted, side: str) -> None:
    result = running.run(
        *ferry_command(), "health", "-c", running.init[side]["config"], check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"FERRY {side.upper()} OK")
    # as the agent's user, as a monitoring system runs it (sudo -u ferry): the same
    config = running.init[side]["config"]
    as_ferry = running.run("runuser", "-u", "ferry", "--", *ferry_command(), "health", "-c",
                           config, check=False)  # fmt: skip
    assert as_ferry.returncode == 0, as_ferry.stdout + as_ferry.stderr
    # any other user cannot read the agent's files (UMask=0077): UNKNOWN, with the reason
    other = running.run("runuser", "-u", "nobody", "--", *ferry_command(), "health", "-c",
                        config, check=False)  # fmt: skip
    assert other.returncode == 3, other.stdout + other.stderr
    assert "ermission denied" in other.stdout + other.stderr


@pytest.mark.slow  # (10-40 s: run with `python3 tasks.py test --slow`)
@pytest.mark.parametrize("unit", UNITS)
def test_an_agent_killed_is_restarted_and_transfers_go_on(running: Booted, unit: str) -> None:
    """kill -9: systemd restarts the agent (Restart=on-failure, 5 s later) and files cross
    again. A killed inside rejoins the outside's running session within a second of its
    start (it used to wait for the next rekey, an hour)."""
    restarts = int(running.show(unit, "NRestarts")["NRestarts"])
    running.run("systemctl", "kill", "--signal=KILL", unit)

    def back() -> bool:
        props = running.show(unit, "NRestarts", "ActiveState")
        return int(props["NRestarts"]) == restarts + 1 and props["ActiveState"] == "active"

    wait_for(back, 30, what=f"{unit} to be restarted")
    inside_cfg = running.init["inside"]["config"]

    def healthy() -> bool:  # the new process runs and the inside hears the outside
        result = running.run(*ferry_command(), "health", "-c", inside_cfg, check=False)
        return result.returncode == 0

    wait_for(healthy, 30, what="the pair to be healthy again")
    documents = running.init["channels"]["documents"]
    name = f"after-{unit}.txt"
    (running.inside(documents["drop"]) / name).write_text(f"sent after {unit} was killed\n")
    delivered = running.inside(documents["deliver"]) / name
    wait_for(delivered.exists, 60, what=f"{name} inside")


SERIAL_UNITS = ("ferry-serial-outside.service", "ferry-serial-inside.service")


def test_people_read_what_the_agents_give_them_set_up_as_the_guide_says(
    running: Booted,
) -> None:
    """docs/OPERATIONS.md, "Who may read what", done as written, with the units' umask 0077
    and system call filter, the agents as the unprivileged user ferry: a clerk (bob) reads
    why a file was refused and finds the original in sent/; an inner user (alice) reads the
    delivered document and message; carol, in neither group, reads none of them. Documents
    keep their subfolders, which ferry makes in sent/ and in the delivery folder. (Under the
    units every delivered file was 0600, and the filter refused the fchown a delivered file
    needs for its folder's group, and any mode with the setgid bit a subfolder needs.)"""
    docs = running.init["channels"]["documents"]
    outside = Path(running.init["outside"]["config"]).parent
    inside = Path(running.init["inside"]["config"]).parent
    recipe = f"""set -e
groupadd clerks; usermod -aG clerks ferry; useradd -M -G clerks bob
groupadd readers; usermod -aG readers ferry; useradd -M -G readers alice
useradd -M carol
cd {outside}
chgrp clerks drop/documents sent/documents quarantine/documents
chmod 2770 drop/documents
chmod 2750 sent/documents quarantine/documents
cd {inside}
chgrp readers deliver/documents deliver/messages
chmod 2750 deliver/documents deliver/messages
"""
    running.run("sh", "-c", recipe)

    def keep_subfolders(data: dict[str, Any]) -> None:
        for ch in data["channels"]:
            if ch["name"] == "documents":
                ch["subfolders"] = True

    for side in ("outside", "inside"):
        edit_yaml(running.inside(running.init[side]["config"]), keep_subfolders)
    running.run("systemctl", "restart", *UNITS)  # (the agent's user is in the groups now)

    def up() -> bool:
        states = running.run("systemctl", "is-active", *UNITS, check=False).stdout.split()
        return states == ["active"] * len(UNITS)

    wait_for(up, 60, what="both agents after the restart")
    drop = docs["drop"]
    running.run("runuser", "-u", "bob", "--", "sh", "-c",
                f"umask 002; mkdir {drop}/2026 && echo 'a permit application' > "
                f"{drop}/2026/permit.txt; "
                f"printf 'MZ%0500d' 0 > {drop}/setup.exe")  # fmt: skip
    running.inside("/root/people.json").write_bytes(application(31))
    sent = running.run(
        *ferry_command(), "send", "-c", running.init["api"]["client_config"],
        "--channel", "messages", "--schema", "citizen-application", "/root/people.json", "--json",
    )  # fmt: skip
    assert json.loads(sent.stdout)["status"] == "ACCEPTED"
    delivered = running.inside(docs["deliver"])
    (document,) = wait_for(
        lambda: list(delivered.glob("2026/permit*.txt")), 60, what="the document"
    )
    messages = running.inside(running.init["channels"]["messages"]["deliver"])
    wanted = str(uuid.UUID(int=32))

    def the_message() -> list[Path]:
        return [m for m in messages.glob("*.json") if wanted in m.read_text()]

    (message,) = wait_for(the_message, 60, what="the message")
    reason = running.inside(docs["quarantine"]) / "setup.exe.reason.txt"
    wait_for(reason.exists, 60, what="the reason a file was refused")
    original = running.inside(docs["sent"]) / "2026" / "permit.txt"
    wait_for(original.exists, 60, what="the original in sent/")

    def reads(user: str, path: Path) -> bool:
        inner = "/" + str(path.relative_to(running.root))
        result = running.run("runuser", "-u", user, "--", "cat", inner, check=False)
        return result.returncode == 0 and result.stdout.encode() == path.read_bytes()

    assert reads("alice", document), running.run("ls", "-lnR", docs["deliver"]).stdout
    assert reads("alice", message)
    assert reads("bob", reason)
    assert reads("bob", original)
    for path in (document, message, reason):
        assert not reads("carol", path)
    events = [e for unit in UNITS for e in running.journal(unit)]
    assert [e for e in events if e.get("event") == "shared_permissions_refused"] == []
    exact = [e["available"] for e in events if e.get("event") == "folders_made_with_exact_mode"]
    assert exact == [True, True]  # (subfolders made in sent/ and in the delivery folder)


@pytest.fixture(scope="module")
def serial(running: Booted) -> Iterator[dict[str, Any]]:
    """A second pair, on a one-way pty cable in the booted system, under units of its own."""
    python = str(Path(ferry_command()[0]).with_name("python"))
    cmd = ["nsenter", "-t", str(running.pid), "-m", "-p", "-n", "-C", "-r", "-w"]
    cable = subprocess.Popen([*cmd, python, "-c", SERIAL_CABLE], stdout=subprocess.PIPE, text=True)
    try:
        assert cable.stdout is not None
        outside_tty, inside_tty = cable.stdout.readline().split()
        out = running.run(
            *ferry_command(), "init", "/srv/serial", "--transport", "serial",
            "--serial-devices", outside_tty, inside_tty, "--json",
        ).stdout  # fmt: skip
        init = json.loads(out)
        running.run("chown", "-R", "ferry:", "/srv/serial/outside", "/srv/serial/inside")
        for side, unit in zip(("outside", "inside"), SERIAL_UNITS, strict=True):
            text = Path(running.inside(init[side]["service"])).read_text()
            running.inside(f"/etc/systemd/system/{unit}").write_text(text)
        running.run("systemctl", "daemon-reload")
        running.run("systemctl", "start", *SERIAL_UNITS)
        wait_for(lambda: active(running, *SERIAL_UNITS), 60, what="the serial pair to be active")
        init["ttys"] = {"outside": outside_tty, "inside": inside_tty}
        yield init
    finally:
        cable.kill()
        cable.wait(timeout=10)


def device_rules(booted: Booted, unit: str) -> set[str]:
    """The device cgroup's list for ``unit`` (DevicePolicy=, DeviceAllow=), from the kernel."""
    rules = booted.inside(f"/sys/fs/cgroup/devices/system.slice/{unit}/devices.list")
    return set(rules.read_text().splitlines())


def test_a_serial_pair_moves_a_file_and_each_agent_may_use_its_line_one_way(
    running: Booted, serial: dict[str, Any]
) -> None:
    documents = serial["channels"]["documents"]
    delivered = running.inside(documents["deliver"])
    (running.inside(documents["drop"]) / "form.txt").write_text("over the serial line\n")
    got = wait_for(lambda: list(delivered.glob("form*.txt")), 60, what="the file inside")
    assert got[0].read_text() == "over the serial line\n"

    def rule(path: str, access: str) -> str:
        st = os.stat(running.inside(path))
        return f"c {os.major(st.st_rdev)}:{os.minor(st.st_rdev)} {access}"

    # DevicePolicy=strict: the kernel lets each agent open its line one way, /dev/null and
    # /dev/urandom, and no other device (`closed` would have added every pty read-write)
    common = {rule("/dev/null", "rw"), rule("/dev/urandom", "r")}
    outside, inside = serial["ttys"]["outside"], serial["ttys"]["inside"]
    assert device_rules(running, SERIAL_UNITS[0]) == {rule(outside, "w"), *common}
    assert device_rules(running, SERIAL_UNITS[1]) == {rule(inside, "r"), *common}


def test_the_agents_stop_cleanly(running: Booted, serial: dict[str, Any]) -> None:
    units = (*UNITS, *SERIAL_UNITS)
    started = time.monotonic()
    running.run("systemctl", "stop", *units)
    took = time.monotonic() - started
    for unit in units:
        props = running.show(unit, "ActiveState", "Result", "ExecMainStatus")
        assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, (
            unit
        )
    assert took < 30, f"stopping took {took:.1f} s"
