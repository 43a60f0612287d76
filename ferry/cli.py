"""The ``ferry`` command line.

Exit codes: 0 success; 1 generic failure; 2 usage; 3 config; 4 key file;
5 self-test; 6-8 wire; 9-10 policy; 11 channel; 12 state (see ferry.errors);
13 busy (ferry send: the gateway stayed busy until the timeout).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import threading
from pathlib import Path

from ferry import __version__, log
from ferry.errors import FerryError


def _cmd_keygen(args: argparse.Namespace) -> int:
    from ferry.provision import keygen  # noqa: PLC0415  # keep `ferry --help` fast

    out = keygen(args.role, Path(args.out), args.name)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{out['role']} key ({out['alg']}, id {out['key_id']})")
        print(f"  secret: {out['secret_key']}  (mode 0600; never share)")
        print(f"  public: {out['public_key']}")
    return 0


def _cmd_init(args: argparse.Namespace) -> int:
    from ferry.provision import init_deployment  # noqa: PLC0415

    devices = tuple(args.serial_devices) if args.serial_devices else None
    out = init_deployment(
        Path(args.dir),
        transport=args.transport,
        port=args.port,
        serial_devices=devices,
        kem=args.kem,
        bulk=tuple(args.bulk or ()),
    )
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"created a ferry deployment under {out['root']}")
        print(f"  outside config: {out['outside']['config']}")
        print(f"  inside config:  {out['inside']['config']}")
        for name, ch in out["channels"].items():
            print(f"  channel {name}: drop {ch['drop']} -> deliver {ch['deliver']}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from ferry.config import load_inside_config, load_outside_config  # noqa: PLC0415
    from ferry.runtime import install_stop_handlers  # noqa: PLC0415

    stop = threading.Event()
    install_stop_handlers(stop)
    if args.side == "outside":
        from outside.agent import OutsideAgent  # noqa: PLC0415

        return OutsideAgent(load_outside_config(Path(args.config)), stop).run()
    from inside.agent import InsideAgent  # noqa: PLC0415

    return InsideAgent(load_inside_config(Path(args.config)), stop).run()


def _cmd_selftest(args: argparse.Namespace) -> int:
    from ferry import selftest  # noqa: PLC0415

    selftest.run()
    print("self-test passed: SHA-256, CRC32C, AES-256-GCM, Ed25519, HPKE, FEC (zfec, ISA-L)")
    return 0


def _cmd_health(args: argparse.Namespace) -> int:
    from ferry import health  # noqa: PLC0415
    from ferry.config import load_config  # noqa: PLC0415

    if not 0 <= args.critical_free <= args.warning_free <= 100:
        print("ferry: error: need 0 <= --critical-free <= --warning-free <= 100", file=sys.stderr)
        return health.State.UNKNOWN
    try:
        cfg = load_config(Path(args.config))
    except FerryError as exc:  # the monitoring convention: a check that cannot run is UNKNOWN
        print(f"FERRY UNKNOWN: {exc}")
        return health.State.UNKNOWN
    limits = health.Limits(
        max_age=args.max_age,
        warn_free=args.warning_free,
        crit_free=args.critical_free,
        max_stall=args.max_stall,
    )
    report = health.examine(cfg, limits)
    if args.format == "json":
        text = json.dumps(report.to_json(), ensure_ascii=False, indent=2) + "\n"
    elif args.format == "prometheus":
        text = report.prometheus()
    else:
        text = report.text() + "\n"
    if args.output:
        out = Path(args.output)  # atomically: a collector never reads half a file
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, out)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            print(f"FERRY UNKNOWN: cannot write {out}: {exc.strerror or exc}")
            return health.State.UNKNOWN
    else:
        sys.stdout.write(text)
    return report.exit_code


def _cmd_demo(args: argparse.Namespace) -> int:
    from ferry.demo import run_demo  # noqa: PLC0415

    return run_demo(link=args.link, keep=args.keep, workdir=args.dir, big_mib=args.big_mib)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """``argv``: the arguments to be parsed (None: ``sys.argv``), for errors that depend on
    them (``ferry send --json``)."""
    words = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        prog="ferry", description="One-way cross-domain data exchange gateway."
    )
    p.add_argument("--version", action="version", version=f"ferry {__version__}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-json", action="store_true", help="JSON logs even on a terminal")
    sub = p.add_subparsers(dest="command", required=True)

    kg = sub.add_parser(
        "keygen", help="create a role key pair (secret file 0600, never overwritten)"
    )
    kg.add_argument(
        "--role",
        required=True,
        choices=[
            "outside-signing",
            "inside-kem",
            "inside-kem-x25519",
            "audit",
            "api-server",
            "api-client",
            "consumer-server",
            "consumer",
            "security-admin",
        ],
    )
    kg.add_argument("--out", default=".", help="folder for the key files (default: .)")
    kg.add_argument("--name", help="file name stem (default: the role)")
    kg.add_argument("--json", action="store_true")
    kg.set_defaults(func=_cmd_keygen)

    it = sub.add_parser("init", help="create a matching outside/inside pair under DIR")
    it.add_argument("dir")
    it.add_argument("--transport", choices=["udp", "serial"], default="udp")
    it.add_argument("--port", type=int, help="UDP port (default: a free one)")
    it.add_argument("--serial-devices", nargs=2, metavar=("OUTSIDE_TTY", "INSIDE_TTY"))
    it.add_argument("--kem", choices=["mlkem768x25519", "x25519"], default="mlkem768x25519")
    it.add_argument(
        "--bulk",
        action="append",
        metavar="CHANNEL",
        help="also create a files channel for opaque data, without content checks (repeatable)",
    )
    it.add_argument("--json", action="store_true", help="print every created path as JSON")
    it.set_defaults(func=_cmd_init)

    from inside.quarantine_cli import add_parser as add_inside_quarantine  # noqa: PLC0415
    from outside.quarantine_cli import add_parser as add_quarantine_parser  # noqa: PLC0415

    for side, add_quarantine in (
        ("outside", add_quarantine_parser),
        ("inside", add_inside_quarantine),
    ):
        sp = sub.add_parser(side, help=f"the {side} agent")
        ssub = sp.add_subparsers(dest="action", required=True)
        run = ssub.add_parser("run", help=f"run the {side} agent until SIGTERM/SIGINT")
        run.add_argument("-c", "--config", required=True)
        run.set_defaults(func=_cmd_run, side=side)
        add_quarantine(ssub)  # ferry outside|inside quarantine list|show|release
        if side == "outside":
            from outside.mirror_cli import add_parser as add_mirror_parser  # noqa: PLC0415
        else:
            from inside.mirror_cli import add_parser as add_mirror_parser  # noqa: PLC0415
        add_mirror_parser(ssub)  # ferry outside mirror status|resend, ferry inside mirror status

    from ferry.send_cli import add_parsers as add_send_parsers  # noqa: PLC0415
    from ferry.send_cli import usage_error  # noqa: PLC0415

    add_send_parsers(sub, words)  # ferry send, ferry status
    p.error = functools.partial(usage_error, p, words)  # type: ignore[method-assign]

    hl = sub.add_parser(
        "health",
        help="is the agent running and able to move items (exit 0 OK, 1 WARNING, 2 CRITICAL, "
        "3 UNKNOWN)",
        description="Check a running agent from its own host: its process, its audit log, the "
        "link (inside) or the backlog (outside), and the free space of every file system it "
        "writes to. Exit codes follow the monitoring-plugin convention: 0 OK, 1 WARNING, "
        "2 CRITICAL, 3 UNKNOWN.",
    )
    hl.add_argument("-c", "--config", required=True, help="the agent's config (either side)")
    hl.add_argument(
        "--format", choices=["text", "json", "prometheus"], default="text", help="default: text"
    )
    hl.add_argument("--json", dest="format", action="store_const", const="json")
    hl.add_argument(
        "-o", "--output", help="write to this file atomically (node_exporter's textfile collector)"
    )
    hl.add_argument(
        "--max-age",
        type=float,
        default=5.0,
        help="seconds since the agent last wrote its status before it counts as stuck (default 5)",
    )
    hl.add_argument(
        "--warning-free", type=float, default=10.0, help="percent free space or inodes (default 10)"
    )
    hl.add_argument(
        "--critical-free", type=float, default=5.0, help="percent free space or inodes (default 5)"
    )
    hl.add_argument(
        "--max-stall",
        type=float,
        default=60.0,
        help="seconds a channel's folder intake (outside) or file delivery (inside) may make "
        "no progress before it is CRITICAL (default 60)",
    )
    hl.set_defaults(func=_cmd_health)

    from ferry.audit.cli import add_parser as add_audit_parser  # noqa: PLC0415

    add_audit_parser(sub)

    add_quarantine_parser(sub)  # ferry quarantine: the outside's, as before

    st = sub.add_parser("selftest", help="run the start-up known-answer tests")
    st.set_defaults(func=_cmd_selftest)

    dm = sub.add_parser("demo", help="move sample files across a one-way link on this machine")
    dm.add_argument("--link", choices=["udp", "serial"], default="udp")
    dm.add_argument("--keep", action="store_true", help="keep the demo folder")
    dm.add_argument("--dir", help="use this (new) folder instead of a temporary one")
    dm.add_argument("--big-mib", type=int, default=64, help="size of the largest sample file")
    dm.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    log.configure(args.log_level, json=True if args.log_json else None)
    try:
        rc: int = args.func(args)
    except FerryError as exc:
        print(f"ferry: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
