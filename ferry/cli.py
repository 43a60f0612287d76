"""The ``ferry`` command line.

Exit codes: 0 success; 1 generic failure; 2 usage; 3 config; 4 key file;
5 self-test; 6-8 wire; 9-10 policy; 11 channel; 12 state (see ferry.errors).
"""

from __future__ import annotations

import argparse
import json
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


def _cmd_demo(args: argparse.Namespace) -> int:
    from ferry.demo import run_demo  # noqa: PLC0415

    return run_demo(link=args.link, keep=args.keep, workdir=args.dir, big_mib=args.big_mib)


def build_parser() -> argparse.ArgumentParser:
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
        choices=["outside-signing", "inside-kem", "inside-kem-x25519", "audit"],
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
    it.add_argument("--json", action="store_true", help="print every created path as JSON")
    it.set_defaults(func=_cmd_init)

    for side in ("outside", "inside"):
        sp = sub.add_parser(side, help=f"the {side} agent")
        ssub = sp.add_subparsers(dest="action", required=True)
        run = ssub.add_parser("run", help=f"run the {side} agent until SIGTERM/SIGINT")
        run.add_argument("-c", "--config", required=True)
        run.set_defaults(func=_cmd_run, side=side)

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
    args = build_parser().parse_args(argv)
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
