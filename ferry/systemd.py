"""systemd service units for the agents, written by ``ferry init`` next to each config.

Each unit runs its agent as an unprivileged user under systemd's sandbox (systemd.exec(5)):
read-only system, its own folder writable and nothing else, no capabilities, no devices but
/dev/null, /dev/urandom and the serial line it uses (read-only inside, write-only outside),
only the address families it needs, the system calls of a service less the privileged ones,
and namespaces limited to the user + network namespaces the content workers create to leave
the network. The content workers then add their own seccomp filter and limits
(docs/CONTENT.md). Exit codes that a restart cannot fix (usage, config, key file, self-test,
state database) stop the restarts. tests/integration/test_systemd_live.py runs the units
under a real systemd.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from ferry.errors import ConfigError, KeyFileError, SelfTestError, StateError, UsageError

USER = "ferry"
NO_RESTART_EXITS = tuple(
    e.exit_code for e in (UsageError, ConfigError, KeyFileError, SelfTestError, StateError)
)
"""Exit codes a restart cannot fix (docs/OPERATIONS.md, "Exit codes"): a transport failure
(11, e.g. a USB serial adapter unplugged) or a crash is restarted."""

HOMES = (Path("/home"), Path("/root"), Path("/run/user"))
"""What ``ProtectHome=yes`` makes invisible to the service."""
TEMPS = (Path("/tmp"), Path("/var/tmp"))  # noqa: S108  # the folders, not files in them
"""What ``PrivateTmp=yes`` replaces with empty folders of the service's own."""
PACKAGE = Path(__file__).resolve().parent.parent
"""Where this ferry's code is (a source checkout, an editable install or site-packages)."""

_SAFE_WORD = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")


def unit_name(side: str) -> str:
    return f"ferry-{side}.service"


def ferry_command() -> list[str]:
    """How to start this ferry: the ``ferry`` script next to this Python if there is one
    (a venv or a pip install), else this Python with ``-m ferry.cli``."""
    script = Path(sys.executable).parent / "ferry"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "ferry.cli"]


def _under(places: tuple[Path, ...], paths: list[Path]) -> bool:
    """Whether any of ``paths`` lies in one of ``places``."""
    return any(p.is_relative_to(place) for p in paths for place in places)


def _escape(text: str) -> str:
    """A unit-file value: ``%`` starts a specifier, so it is doubled."""
    if any(c in text for c in "\n\r\0"):
        raise ValueError(f"{text!r}: a path for a unit file cannot hold a line break or NUL")
    return text.replace("%", "%%")


def _word(text: str) -> str:
    """One word of ExecStart= or a path list: quoted when it holds anything but safe
    characters (systemd unquotes "..." with C-style escapes)."""
    text = _escape(text)
    if _SAFE_WORD.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def service_unit(
    side: str,
    folder: Path,
    config: Path,
    *,
    command: list[str] | None = None,
    serial_device: str | None = None,
    user: str = USER,
) -> str:
    """The unit for ``side`` ("outside" or "inside") whose files all live under ``folder``."""
    if side not in ("outside", "inside"):
        raise ValueError(f"side must be outside or inside, not {side!r}")
    program = command or ferry_command()
    argv = [*program, "--log-json", side, "run", "-c", str(config)]
    # ferry or its folder under a home directory: hidden by ProtectHome=yes, so read-only
    # (the folder is writable again through ReadWritePaths=)
    ours = [Path(program[0]), PACKAGE, folder, config]
    exposed = _under(HOMES, ours)
    # ferry or its folder under /tmp or /var/tmp (a trial install): a private /tmp hides them
    in_tmp = _under(TEMPS, ours)
    low = side == "outside"
    lines = [
        f"# ferry {side} agent (written by `ferry init`; see docs/OPERATIONS.md, 'Services').",
        "# The paths are where `ferry init` ran: edit them if the folder or ferry moved. Install:",
        f"#   useradd --system --home-dir {folder} --shell /usr/sbin/nologin {user}",
        f"#   chown -R {user}: {folder}",
        f"#   cp {unit_name(side)} /etc/systemd/system/ && systemctl daemon-reload",
        f"#   systemctl enable --now {unit_name(side)}",
        f"# Then `ferry health -c {config}` says whether it runs and moves items.",
        "",
        "[Unit]",
        f"Description=ferry {side} agent (one-way gateway, {'low' if low else 'high'} side)",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"User={_escape(user)}",
        f"Group={_escape(user)}",
        f"WorkingDirectory={_escape(str(folder))}",
        "ExecStart=" + " ".join(_word(a) for a in argv),
        "Restart=on-failure",
        "RestartSec=5",
        "RestartPreventExitStatus=" + " ".join(str(c) for c in NO_RESTART_EXITS),
        "# SIGTERM: the agent finishes what it holds and stops (the content workers with it).",
        "KillMode=mixed",
        "TimeoutStopSec=60",
        "UMask=0077",
        "LimitNOFILE=65536",
        "LimitCORE=0",
        "",
        "# Sandbox (systemd.exec(5)). Add ReadWritePaths= for folders you move out of",
        f"# {folder} (a delivery folder on a share, the audit log on a disk of its own).",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "AmbientCapabilities=",
        "ProtectSystem=strict",
        f"ReadWritePaths={_word(str(folder))}",
        *(
            ["# ferry or its folder is under a home directory: read-only, not hidden."]
            if exposed
            else []
        ),
        f"ProtectHome={'read-only' if exposed else 'yes'}",
        *(
            ["# ferry or its folder is under /tmp or /var/tmp: a private /tmp would hide it."]
            if in_tmp
            else []
        ),
        f"PrivateTmp={'no' if in_tmp else 'yes'}",
        "ProtectProc=invisible",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "# The content workers leave the network in a user + network namespace of their own.",
        "RestrictNamespaces=user net",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "RemoveIPC=yes",
        "SystemCallArchitectures=native",
        "# System calls: what a service needs, plus seccomp (the content workers install their",
        "# own filter), minus the privileged ones; a refused call fails with EPERM, it does not",
        "# kill the agent.",
        "SystemCallFilter=@system-service seccomp",
        "SystemCallFilter=~@privileged",
        *(
            []
            if low
            else [
                "# Back: fchown, which gives a delivered file its folder's group (the kernel",
                "# allows only a group the agent's user is in; docs/OPERATIONS.md).",
                "SystemCallFilter=fchown",
            ]
        ),
        "SystemCallErrorNumber=EPERM",
        "PrivateMounts=yes",
        "# AF_NETLINK: libzmq lists the network interfaces through it (it aborts without).",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    ]
    if serial_device is None:
        lines += ["PrivateDevices=yes"]
    else:
        access = "w" if low else "r"  # the one-way property, enforced by the kernel as well
        lines += [
            f"# The serial line, {'write' if low else 'read'}-only, /dev/null and /dev/urandom:",
            "# no other device (strict: `closed` would add every pty, read-write).",
            "DevicePolicy=strict",
            "DeviceAllow=/dev/null rw",
            "DeviceAllow=/dev/urandom r",
            f"DeviceAllow={_word(serial_device)} {access}",
            "SupplementaryGroups=dialout",
        ]
    lines += ["", "[Install]", "WantedBy=multi-user.target", ""]
    return "\n".join(lines)
