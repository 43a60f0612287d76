"""The systemd units ``ferry init`` writes: what they say, and systemd's own verdict on them.

``systemd-analyze verify`` parses a unit offline as systemd would and checks that ExecStart's
program exists; ``systemd-analyze security --offline`` scores its sandbox. Debian's
``systemd`` package is installed by ``python3 tasks.py test`` when missing and running as
root (as in CI); without it only those two checks are skipped.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ferry.config import load_config
from ferry.errors import ChannelError, ConfigError, KeyFileError, SelfTestError, StateError
from ferry.health import folders
from ferry.provision import init_deployment
from ferry.systemd import HOMES, PACKAGE, TEMPS, ferry_command, service_unit

ANALYZE = shutil.which("systemd-analyze")
needs_systemd = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def parse(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values, as a unit file lists them (keys may repeat)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out[section] = {}
            continue
        key, _, value = line.partition("=")
        out[section].setdefault(key, []).append(value)
    return out


@pytest.fixture(scope="module")
def udp(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return init_deployment(tmp_path_factory.mktemp("udp") / "d")


@pytest.fixture(scope="module")
def serial(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return init_deployment(
        tmp_path_factory.mktemp("serial") / "d",
        transport="serial",
        serial_devices=("/dev/ttyS0", "/dev/ttyUSB1"),
        messages=None,
    )


@pytest.mark.parametrize("side", ["outside", "inside"])
def test_init_writes_a_unit_that_runs_the_agent_on_its_config(udp: dict, side: str) -> None:
    path = Path(udp[side]["service"])
    assert path.name == f"ferry-{side}.service"
    assert path.stat().st_mode & 0o777 == 0o644
    unit = parse(path.read_text())["Service"]
    config = udp[side]["config"]
    assert unit["ExecStart"] == [
        " ".join([*ferry_command(), "--log-json", side, "run", "-c", config])
    ]
    assert unit["WorkingDirectory"] == [str(Path(config).parent)]
    assert unit["User"] == ["ferry"]
    assert unit["UMask"] == ["0077"]
    assert unit["NoNewPrivileges"] == ["yes"]
    assert unit["CapabilityBoundingSet"] == [""]
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["PrivateDevices"] == ["yes"]
    assert "DeviceAllow" not in unit
    # libzmq aborts when it cannot list the interfaces over netlink (found under systemd)
    families = unit["RestrictAddressFamilies"][0].split()
    assert sorted(families) == ["AF_INET", "AF_INET6", "AF_NETLINK", "AF_UNIX"]
    assert unit["RestrictNamespaces"] == ["user net"]  # the content workers leave the network
    # a service's system calls plus seccomp (the workers' own filter), less the privileged
    # (inside, fchown back: a delivered file gets its folder's group, one the agent is in)
    back = [] if side == "outside" else ["fchown"]
    assert unit["SystemCallFilter"] == ["@system-service seccomp", "~@privileged", *back]
    assert unit["SystemCallErrorNumber"] == ["EPERM"]
    # hidden, unless this ferry itself is there (then read-only, or no private /tmp: below)
    here = [Path(ferry_command()[0]), PACKAGE, Path(config)]  # (pytest's folders are in /tmp)
    in_home = any(p.is_relative_to(place) for p in here for place in HOMES)
    in_tmp = any(p.is_relative_to(place) for p in here for place in TEMPS)
    assert unit["ProtectHome"] == ["read-only" if in_home else "yes"]
    assert unit["PrivateTmp"] == ["no" if in_tmp else "yes"]


@pytest.mark.parametrize("side", ["outside", "inside"])
def test_every_folder_the_agent_writes_is_writable_and_nothing_else(udp: dict, side: str) -> None:
    unit = parse(Path(udp[side]["service"]).read_text())["Service"]
    (writable,) = unit["ReadWritePaths"]
    cfg = load_config(Path(udp[side]["config"]))
    places = folders(cfg)
    assert {use for use, _ in places} >= {"state", "audit"}
    for _, folder in places:
        assert Path(folder).is_relative_to(writable), folder


def test_restarts_stop_at_exit_codes_a_restart_cannot_fix(udp: dict) -> None:
    unit = parse(Path(udp["inside"]["service"]).read_text())["Service"]
    assert unit["Restart"] == ["on-failure"]
    codes = {int(c) for c in unit["RestartPreventExitStatus"][0].split()}
    fatal = {ConfigError, KeyFileError, SelfTestError, StateError}
    assert {e.exit_code for e in fatal} <= codes
    assert ChannelError.exit_code not in codes  # a replugged USB adapter comes back


def test_a_serial_unit_opens_its_line_one_way_only(serial: dict) -> None:
    for side, device, access in (("outside", "/dev/ttyS0", "w"), ("inside", "/dev/ttyUSB1", "r")):
        unit = parse(Path(serial[side]["service"]).read_text())["Service"]
        assert unit["DevicePolicy"] == ["strict"]  # closed would add every pty, read-write
        assert unit["DeviceAllow"] == ["/dev/null rw", "/dev/urandom r", f"{device} {access}"]
        assert "PrivateDevices" not in unit


@pytest.mark.parametrize(
    ("folder", "program", "home", "tmp"),
    [
        ("/srv/ferry", "/usr/bin/ferry", "yes", "yes"),
        ("/home/clerk/ferry", "/usr/bin/ferry", "read-only", "yes"),
        ("/srv/ferry", "/root/src/ferry/.venv/bin/ferry", "read-only", "yes"),
        ("/run/user/1000/ferry", "/usr/bin/ferry", "read-only", "yes"),
        ("/homework/ferry", "/usr/bin/ferry", "yes", "yes"),  # a path, not a string prefix
        ("/srv/ferry", "/var/tmp/ferry/.venv/bin/ferry", "yes", "no"),
        ("/tmp/trial", "/usr/bin/ferry", "yes", "no"),
        ("/tmpfiles/ferry", "/usr/bin/ferry", "yes", "yes"),
    ],
)
def test_ferry_in_a_home_or_tmp_folder_is_not_hidden_from_itself(
    folder: str, program: str, home: str, tmp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ProtectHome=yes hides /home, /root and /run/user, PrivateTmp=yes /tmp and /var/tmp:
    a ferry or a folder there could not start (systemd says 203/EXEC, or the agent finds no
    config). A home is made read-only instead; a private /tmp is left out."""
    monkeypatch.setattr("ferry.systemd.PACKAGE", Path("/usr/lib/python3/dist-packages"))
    text = service_unit("inside", Path(folder), Path(folder) / "i.yaml", command=[program])
    unit = parse(text)["Service"]
    assert unit["ProtectHome"] == [home]
    assert unit["PrivateTmp"] == [tmp]
    assert unit["ReadWritePaths"] == [folder]  # writable again under read-only


def test_odd_paths_are_escaped_for_systemd(tmp_path: Path) -> None:
    folder = tmp_path / 'a b%c"d'
    text = service_unit("inside", folder, folder / "inside.yaml", command=["/usr/bin/ferry"])
    unit = parse(text)["Service"]
    assert unit["WorkingDirectory"] == [f'{tmp_path}/a b%%c"d']
    quoted = f'"{tmp_path}/a b%%c\\"d'
    assert unit["ReadWritePaths"] == [quoted + '"']
    assert unit["ExecStart"][0].endswith(f'-c {quoted}/inside.yaml"')
    with pytest.raises(ValueError, match="line break"):
        service_unit("inside", tmp_path / "x\ny", tmp_path / "c.yaml")
    with pytest.raises(ValueError, match="side"):
        service_unit("both", tmp_path, tmp_path / "c.yaml")


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, check=False)


@needs_systemd
def test_systemd_accepts_the_units_without_a_warning(udp: dict, serial: dict) -> None:
    units = [d[side]["service"] for d in (udp, serial) for side in ("outside", "inside")]
    result = analyze("verify", *units)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""


@needs_systemd
def test_systemd_reads_escaped_paths_as_the_paths_they_are(tmp_path: Path) -> None:
    """verify checks that ExecStart's program exists: only a correctly unescaped path does."""
    odd = tmp_path / "bin dir %n"
    odd.mkdir()
    (odd / "ferry").symlink_to(shutil.which("true") or "/bin/true")
    folder = tmp_path / "deploy 50%"
    folder.mkdir()
    config = folder / "o.yaml"
    good = tmp_path / "good.service"
    good.write_text(service_unit("outside", folder, config, command=[str(odd / "ferry")]))
    result = analyze("verify", str(good))
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""
    bad = tmp_path / "bad.service"  # control: a program that is not there is caught
    bad.write_text(service_unit("outside", folder, config, command=[str(odd / "nope")]))
    result = analyze("verify", str(bad))
    assert result.returncode != 0
    assert "nope" in result.stderr


@needs_systemd
def test_the_sandbox_scores_ok_in_systemds_own_exposure_rating(udp: dict, tmp_path: Path) -> None:
    # (the inside 0.2 more: fchown, which gives delivered files their folder's group)
    for side, threshold in (("outside", "20"), ("inside", "22")):
        result = analyze(
            "security", "--offline=yes", f"--threshold={threshold}", udp[side]["service"]
        )
        assert result.returncode == 0, result.stdout[-2000:]
        assert "Overall exposure level" in result.stdout
    plain = tmp_path / "plain.service"  # control: an unsandboxed unit fails the same threshold
    plain.write_text(f"[Service]\nExecStart={shutil.which('true')}\n")
    assert analyze("security", "--offline=yes", "--threshold=20", str(plain)).returncode != 0
