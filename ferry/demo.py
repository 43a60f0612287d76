"""``ferry demo``: a complete outside -> inside transfer on one machine.

Initialises a temporary deployment, starts both agents as separate processes
joined one way (UDP on loopback through a lossy hop, or a pty "cable" with the
return wire cut), drops sample documents, shows progress and ends with where
every file landed and a summary. Exit code 0 only if everything arrived intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from ferry.channels.emulator import LossyUdpForwarder, PtyCable
from ferry.provision import init_deployment
from ferry.status import STATUS_FILE, read_status

TIMEOUT = 180.0
# Seconds, after the items, for the inside to witness one of the outside's checkpoints: a
# piece of the outside's log sent before the inside's socket was open (the agents start
# together), or lost on the demo's lossy hop beyond what FEC rebuilds, comes again with its
# second copy, 30 s after the first (repeat.spread).
MIRROR_WAIT = 45.0
SERIAL_DEMO_BAUD = 4_000_000


def _png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    rows = b"".join(
        b"\x00" + bytes(((x * 255 // width) ^ (y * 255 // height)) & 255 for x in range(width))
        for y in range(height)
    )
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + b"\x08\x00\x00\x00\x00"
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


# A minimal PE header: what a clerk's infected "PDF" really is (refused by type).
HOSTILE_EXE = (
    b"MZ" + b"\x90" * 58 + b"\x80\x00\x00\x00" + b"\x00" * 64 + b"PE\x00\x00" + b"\x00" * 200
)


def sample_documents(big: int, medium: int = 3 * 1024 * 1024 + 17) -> dict[str, bytes]:
    """Sample files of several sizes (generated, nothing downloaded)."""
    letter = (
        "关于办理居住证的申请\n\n申请人：张三\n身份证号：110101199003077777\n"
        "申请事项：居住证首次办理\n\n此致\n敬礼\n"
    ).encode()
    csv = "id,name,amount\n" + "".join(f"{i},申请{i},{i * 13.5:.2f}\n" for i in range(2000))
    notice = {
        "notice_id": "2026-1121-001",
        "from": "市数据局",
        "to": ["市公安局", "市民政局"],
        "title": "关于数据共享目录更新的通知",
        "issued_at": "2026-11-21T09:00:00+08:00",
    }
    return {
        "申请书-张三.txt": letter,
        "notice.json": json.dumps(notice, ensure_ascii=False, indent=2).encode(),
        "applications.csv": csv.encode(),
        "scan-page1.png": _png(640, 480),
        "archive-medium.bin": os.urandom(medium),
        "survey-large.bin": os.urandom(big),
        "empty.txt": b"",
    }


def sample_messages(n: int) -> list[tuple[str, bytes]]:
    """``n`` valid messages built from the schemas' own examples, each with a fresh id."""
    folder = resources.files("ferry").joinpath("schemas").joinpath("messages")
    examples = {
        name: json.loads(folder.joinpath(f"{name}.schema.json").read_text("utf-8"))["examples"]
        for name in ("citizen-application", "agency-notice")
    }
    out = []
    for i in range(n):
        schema = ("citizen-application", "agency-notice")[i % 2]
        doc = json.loads(json.dumps(examples[schema][0]))
        for key in ("application_id", "notice_id"):
            if key in doc:
                doc[key] = str(uuid.uuid4())
        out.append((schema, json.dumps(doc, ensure_ascii=False, indent=2).encode()))
    return out


def _send_messages(
    deployment: dict[str, Any], messages: list[tuple[str, bytes]], deadline: float
) -> tuple[list[Any], str]:
    """Submit through the outer API (retrying until the agent listens); returns acks."""
    from ferry.client import ApiRejected, ApiUnavailable, Client  # noqa: PLC0415

    acks: list[Any] = []
    with Client.from_config(deployment["api"]["client_config"]) as client:
        for schema, data in messages:
            sid = None
            while True:
                try:
                    acks.append(
                        client.submit("messages", data, schema=schema, submission_id=sid, timeout=5)
                    )
                    break
                except ApiUnavailable as exc:
                    if time.monotonic() > deadline:
                        raise
                    sid = exc.submission_id  # (the same id again: never a second item)
        try:
            client.submit("messages", b'{"applicant": 1, "applicant": 2}', schema=messages[0][0])
            hostile = "accepted?!"
        except ApiRejected as exc:
            hostile = exc.reason_code
    return acks, hostile


def _wait_listening(proc: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    """Until the inside says it has started (its link open), it exits, or ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if b'"event": "inside_started"' in log.read_bytes():
            return
        time.sleep(0.05)


def _agent(side: str, config: str, logdir: Path) -> subprocess.Popen[bytes]:
    log = open(logdir / f"{side}.log", "wb")  # noqa: SIM115  # owned by the child for its lifetime
    return subprocess.Popen(
        [sys.executable, "-m", "ferry.cli", "--log-json", side, "run", "-c", config],
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()
    return proc.returncode


def _witnessed(deployment: dict[str, Any]) -> int:
    """How many of the outside's checkpoints the inside's audit log says it witnessed (0
    while it cannot be read whole: the agent is writing it)."""
    from ferry.audit.record import decode  # noqa: PLC0415
    from ferry.audit.segments import iter_lines, list_segments  # noqa: PLC0415

    try:
        return sum(
            decode(line.data)["event"] == "audit.witnessed"
            for _, seg in list_segments(Path(deployment["inside"]["audit_dir"]))
            for line in iter_lines(seg)
        )
    except Exception:  # noqa: BLE001  # (a line half written: not yet)
        return 0


def _show_audit(console: Console, deployment: dict[str, Any]) -> bool:
    """Verify both sides' audit logs with their public keys; show what they recorded."""
    from collections import Counter  # noqa: PLC0415

    from ferry.audit.record import decode, per_item  # noqa: PLC0415
    from ferry.audit.segments import iter_lines, list_segments  # noqa: PLC0415
    from ferry.audit.verify import verify  # noqa: PLC0415
    from ferry.crypto.keys import load_public_key  # noqa: PLC0415

    good = True
    for side in ("outside", "inside"):
        d = deployment[side]
        report = verify(d["audit_dir"], load_public_key(d["audit_public_key"]))
        events: Counter[str] = Counter()
        for _, seg in list_segments(Path(d["audit_dir"])):
            for line in iter_lines(seg):  # (a batch record counts once per message)
                events.update(r["event"] for r in per_item(decode(line.data)))
        shown = ", ".join(
            f"{e} {n}" for e, n in sorted(events.items()) if not e.startswith("audit.")
        )
        status = "[green]verified" if report.verified else "[red]FAILED"
        console.print(
            f"audit log ({side}): {report.records} records, {report.checkpoints_verified} "
            f"signed checkpoints, {status}[/]  (events per item: {shown})"
        )
        good = good and report.verified
    d = deployment["inside"]
    mirror = verify(d["audit_mirror_dir"], load_public_key(d["outside_audit_public_key"]))
    witnessed = _witnessed(deployment)
    status = "[green]verified" if mirror.verified else "[red]FAILED"
    console.print(
        f"inside's mirror of the outside log: {mirror.records} records, "
        f"{mirror.checkpoints_verified} checkpoints, {status}[/]; "
        f"{witnessed} checkpoints witnessed inside"
    )
    return good and mirror.verified and witnessed > 0


def run_demo(
    link: str = "udp",
    keep: bool = False,
    workdir: str | None = None,
    big_mib: int = 64,
    loss: float = 0.02,
) -> int:
    console = Console()
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="ferry-demo-"))
    cable: PtyCable | None = None
    hop: LossyUdpForwarder | None = None
    if link == "serial":
        cable = PtyCable()
        big_mib = min(big_mib, 1)
        deployment = init_deployment(
            root,
            transport="serial",
            serial_devices=(cable.outside_path, cable.inside_path),
            bulk=("bulk",),
        )
        for side in ("outside", "inside"):  # a pty carries 4 Mbaud; a real cable is set by hand
            cfg = Path(deployment[side]["config"])
            cfg.write_text(cfg.read_text().replace("baud: 115200", f"baud: {SERIAL_DEMO_BAUD}"))
    else:
        deployment = init_deployment(root, transport="udp", bulk=("bulk",))
    if link == "udp" and loss > 0:
        inside_port = deployment["link"]["udp"]["port"]
        hop = LossyUdpForwarder(("127.0.0.1", inside_port), loss)
        cfg = Path(deployment["outside"]["config"])
        cfg.write_text(cfg.read_text().replace(f"port: {inside_port}", f"port: {hop.port}"))
    logdir = root / "logs"
    logdir.mkdir()
    medium = 256 * 1024 if link == "serial" else 3 * 1024 * 1024 + 17
    files = sample_documents(big_mib * 1024 * 1024, medium)
    total = sum(map(len, files.values()))
    # documents go through the content pipeline; opaque .bin data crosses on the bulk channel
    channel_of = {n: "bulk" if n.endswith(".bin") else "documents" for n in files}
    chans = deployment["channels"]
    hostile_name = "invoice.pdf.exe"  # an executable posing as a PDF: quarantined outside
    console.rule("[bold]ferry demo")
    console.print(f"deployment: {root}")
    console.print(
        f"link: {link}"
        + (f" (loopback through a hop that drops {loss:.0%} of packets)" if hop else "")
        + (f" (pty cable {cable.outside_path} -> {cable.inside_path})" if cable else "")
    )
    inside = _agent("inside", deployment["inside"]["config"], logdir)
    _wait_listening(inside, logdir / "inside.log")  # (else the outside's first packets are
    outside = _agent("outside", deployment["outside"]["config"], logdir)  # lost, for 30 s)
    started = time.monotonic()
    for name, data in [*files.items(), (hostile_name, HOSTILE_EXE)]:
        drop = Path(chans[channel_of.get(name, "documents")]["drop"])
        tmp = drop / (name + ".part")
        tmp.write_bytes(data)
        os.rename(tmp, drop / name)
    from ferry.client import Consumer  # noqa: PLC0415

    messages = sample_messages(20)
    consumer = Consumer.from_config(deployment["consumers"]["client_config"])
    acks, hostile = _send_messages(deployment, messages, started + 30)
    console.print(
        f"API: {len(acks)} messages acknowledged (durably spooled); a message with a "
        f"duplicate key was refused: {hostile}"
    )
    consumed: set[str] = set()
    msg_folder = Path(deployment["channels"]["messages"]["deliver"])
    arrived: dict[str, Path] = {}
    ok = False
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f} B"),
        TransferSpeedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("delivering", total=total)
        while time.monotonic() - started < TIMEOUT:
            for folder in {chans[c]["deliver"] for c in channel_of.values()}:
                for p in Path(folder).iterdir():
                    if p.name in files and p.name not in arrived:
                        arrived[p.name] = p
            progress.update(task, completed=sum(len(files[n]) for n in arrived))
            got = consumer.receive(timeout=0)
            if got:
                consumed.update(d.item for d in got)
                consumer.ack([d.item for d in got])
            msg_files = len(list(msg_folder.glob("*.json")))
            if len(arrived) == len(files) and len(consumed) == len(acks) and msg_files == len(acks):
                ok = True
                break
            if inside.poll() is not None or outside.poll() is not None:
                break
            time.sleep(0.1)
    elapsed = time.monotonic() - started
    consumer.close()
    if ok:  # (the outside ships its log every second or so: its first checkpoint may still
        # be on its way, or its second copy; the agents are not stopped before the inside
        # has witnessed one)
        deadline = time.monotonic() + MIRROR_WAIT
        while _witnessed(deployment) == 0 and time.monotonic() < deadline:
            if inside.poll() is not None or outside.poll() is not None:
                break
            time.sleep(0.2)
    time.sleep(1.2)  # let both agents write a final status
    out_status: dict[str, Any] = (
        read_status(Path(deployment["outside"]["state_dir"]) / STATUS_FILE) or {}
    )
    in_status: dict[str, Any] = (
        read_status(Path(deployment["inside"]["state_dir"]) / STATUS_FILE) or {}
    )
    rc_in, rc_out = _stop(inside), _stop(outside)
    if hop:
        hop.close()
    if cable:
        cable.close()

    table = Table(title="delivered inside")
    for col in ("file", "channel", "bytes", "content", "path inside"):
        table.add_column(col)
    intact = 0
    for name, data in files.items():
        path = arrived.get(name)
        same = path is not None and hashlib.sha256(path.read_bytes()).digest() == (
            hashlib.sha256(data).digest()
        )
        if channel_of[name] == "bulk":  # opaque data: byte for byte
            good, shown = same, "[green]identical" if same else "[red]MISSING/BAD"
        else:  # checked, and cleaned where the policy says (e.g. an image re-encoded)
            good = path is not None
            shown = ("[green]as sent" if same else "[cyan]cleaned") if good else "[red]MISSING"
        intact += good
        table.add_row(name, channel_of[name], f"{len(data):,}", shown, str(path or "-"))
    console.print(table)
    quarantine = Path(chans["documents"]["quarantine"])
    reasons = sorted(quarantine.glob("*.reason.txt"))
    refused = any(hostile_name.split(".", maxsplit=1)[0] in r.name for r in reasons)
    console.print(
        f"quarantine: {hostile_name} was refused outside"
        + (f" ({reasons[0].read_text(encoding='utf-8').splitlines()[0]})" if reasons else "")
        if refused
        else f"[red]quarantine: {hostile_name} was NOT refused"
    )
    sent = int(out_status.get("packets_sent", 0))
    received = int(in_status.get("datagrams", 0))
    console.print(
        f"items: {intact}/{len(files)} intact   bytes: {total:,}   time: {elapsed:.1f} s   "
        f"throughput: {total * 8 / elapsed / 1e6:.1f} Mb/s"
    )
    console.print(
        f"packets: {sent:,} sent, {received:,} received, "
        f"{max(0, sent - received):,} lost on the link; "
        f"{in_status.get('blocks_recovered', 0):,} FEC blocks rebuilt from repair symbols; "
        f"link state {in_status.get('link_state', '?')}"
    )
    delivered_msgs = sorted(msg_folder.glob("*.json"))
    msgs_ok = len(delivered_msgs) == len(acks) and set(consumed) == {a.item for a in acks}
    console.print(
        f"messages: {len(acks)} accepted, {len(delivered_msgs)} delivered into {msg_folder}, "
        f"{len(consumed)} received and acknowledged by the inner consumer"
        + ("" if msgs_ok else " [red](INCOMPLETE)")
    )
    if cable:
        console.print(
            f"serial: {cable.bytes_copied:,} bytes crossed, {cable.bytes_returned} came back"
        )
    audits_ok = _show_audit(console, deployment)
    console.print(f"agent logs: {logdir}")
    success = ok and msgs_ok and audits_ok and hostile != "accepted?!" and intact == len(files)
    success = success and refused
    success = success and rc_in == 0 and rc_out == 0
    if not success:
        console.print(f"[red]demo FAILED[/red] (inside exit {rc_in}, outside exit {rc_out})")
    else:
        console.print("[green]demo passed: every file and message arrived intact[/green]")
    if not keep and not workdir and success:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if success else 1
