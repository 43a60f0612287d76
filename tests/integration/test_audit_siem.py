"""``ferry audit export``: RFC 5424 syslog to real loopback receivers, outages, the cursor."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ferry.audit import AuditLog, AuditObject, AuditSettings, Subject
from ferry.audit import cli as audit_cli
from ferry.audit.merkle import leaf_hash
from ferry.audit.siem import (
    CursorMismatch,
    Destination,
    Exporter,
    ExportOptions,
    format_message,
    frame_octet_counting,
)
from ferry.crypto.keys import SecretKey

pytestmark = pytest.mark.integration

KEY = SecretKey("ed25519", bytes(range(32)))
SENDER = Subject.component("sender")
# RFC 5424: <PRI>VERSION SP TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID SP SD SP MSG
SYSLOG = re.compile(
    rb"<(?P<pri>\d{1,3})>1 (?P<ts>\S+) (?P<host>\S+) (?P<app>\S+) (?P<procid>\S+) (?P<msgid>\S+) "
    rb'(?P<sd>\[ferry@32473(?: [a-z_]+="(?:[^"\\\]]|\\["\\\]])*")*\]) (?P<msg>.*)',
    re.DOTALL,
)
FAST = ExportOptions(
    hostname="ferry-test", poll=0.02, backoff_min=0.02, backoff_max=0.1, save_interval=0.0
)


class Receiver:
    """A syslog receiver on loopback: TCP (octet counting) or UDP; can go down and come back."""

    def __init__(self, scheme: str) -> None:
        self.scheme = scheme
        self.messages: list[bytes] = []
        self.port = 0
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    def start(self) -> None:
        self._stop.clear()
        kind = socket.SOCK_STREAM if self.scheme == "tcp" else socket.SOCK_DGRAM
        srv = socket.socket(socket.AF_INET, kind)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        self.port = srv.getsockname()[1]
        srv.settimeout(0.05)
        self._socks.append(srv)
        if self.scheme == "tcp":
            srv.listen()
            target: Callable[[socket.socket], None] = self._accept
        else:
            target = self._datagrams
        t = threading.Thread(target=target, args=(srv,), daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        for s in self._socks:
            s.close()
        self._socks.clear()
        self._threads.clear()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def _add(self, msg: bytes) -> None:
        with self._lock:
            self.messages.append(msg)

    def _datagrams(self, srv: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                self._add(srv.recv(70000))
            except TimeoutError:
                continue

    def _accept(self, srv: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            conn.settimeout(0.05)
            self._socks.append(conn)
            t = threading.Thread(target=self._stream, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _stream(self, conn: socket.socket) -> None:
        buf = b""
        while True:
            try:
                data = conn.recv(65536)
            except TimeoutError:
                if self._stop.is_set():
                    break  # everything sent so far has been read
                continue
            except OSError:
                break
            if not data:
                break
            buf += data
            while b" " in buf:  # RFC 6587 octet counting: MSG-LEN SP SYSLOG-MSG
                head, _, rest = buf.partition(b" ")
                length = int(head)
                if len(rest) < length:
                    break
                self._add(rest[:length])
                buf = rest[length:]

    def idxs(self) -> list[int]:
        with self._lock:
            msgs = list(self.messages)
        return [json.loads(parse(m)["msg"])["idx"] for m in msgs]

    def wait_for(self, n: int, timeout: float = 10.0) -> list[int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            idxs = self.idxs()
            if len(set(idxs)) >= n:
                return idxs
            time.sleep(0.01)
        raise AssertionError(f"received {len(set(self.idxs()))} distinct records, wanted {n}")


def parse(msg: bytes) -> dict[str, bytes]:
    m = SYSLOG.fullmatch(msg)
    assert m is not None, msg[:200]
    return m.groupdict()


@pytest.fixture
def receiver() -> Iterator[Callable[[str], Receiver]]:
    made: list[Receiver] = []

    def make(scheme: str) -> Receiver:
        r = Receiver(scheme)
        r.start()
        made.append(r)
        return r

    yield make
    for r in made:
        r.stop()


def open_log(path: Path) -> AuditLog:
    settings = AuditSettings(
        origin="outside.test/audit", checkpoint_every=50, max_segment_bytes=64 * 1024
    )
    return AuditLog(path, KEY, settings)


def append(log: AuditLog, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        obj = AuditObject(kind="file", item=f"{i:032x}", channel="files/x", seq=i, name=f"f{i}")
        log.append("transfer.sent", subject=SENDER, obj=obj, detail={"send": 1, "of": 1})


def lines(path: Path) -> list[bytes]:
    out: list[bytes] = []
    for seg in sorted(path.glob("audit-*.jsonl")):
        out.extend(seg.read_bytes().splitlines())
    return out


def in_order_after_resends(idxs: list[int]) -> bool:
    """Every record arrives; a resend restarts at most from an earlier point, then in order."""
    expected = 0
    for idx in idxs:
        if idx > expected:
            return False  # a gap: a record was skipped
        expected = max(expected, idx + 1)
    return True


def test_message_format() -> None:
    line = (
        b'{"v":1,"idx":7,"ts":"2026-11-21T21:25:25.521159Z","event":"intake.rejected",'
        b'"result":"rejected","reason":"SIZE: x","subject":{"id":"a]\\"b","kind":"api_client"},'
        b'"object":{"channel":"files/x"},"prev":"' + b"0" * 64 + b'"}'
    )
    msg = format_message(line, hostname="gw", origin="outside.gw/audit")
    f = parse(msg)
    assert f["pri"] == b"109"  # facility 13 (log audit) * 8 + severity 5 (notice: rejected)
    assert (f["ts"], f["host"], f["app"], f["procid"], f["msgid"]) == (
        b"2026-11-21T21:25:25.521159Z",
        b"gw",
        b"ferry",
        b"-",
        b"intake.rejected",
    )
    assert f["sd"] == (
        b'[ferry@32473 origin="outside.gw/audit" idx="7" event="intake.rejected" '
        b'result="rejected" channel="files/x" subject="api_client:a\\]\\"b"]'
    )
    assert f["msg"] == line  # byte for byte: the SIEM can recompute the leaf hash
    assert frame_octet_counting(b"abc") == b"3 abc"
    bad = parse(format_message(b"\x00not json", hostname="gw", origin="o"))
    assert bad["msgid"] == b"-"
    assert b'malformed="1"' in bad["sd"]
    assert Destination.parse("udp://[::1]").port == 514
    with pytest.raises(Exception, match="tcp://HOST:PORT"):
        Destination.parse("http://x:1")


def test_tcp_export_once_sends_every_record_in_order(
    tmp_path: Path, receiver: Callable[[str], Receiver]
) -> None:
    rx = receiver("tcp")
    with open_log(tmp_path / "audit") as log:
        append(log, 400)  # several 64 KiB segments
    assert len(list((tmp_path / "audit").glob("audit-*.jsonl"))) > 2
    exported: list[tuple[int, int]] = []
    ex = Exporter(
        tmp_path / "audit",
        Destination.parse(rx.url),
        tmp_path / "state",
        options=FAST,
        on_exported=lambda a, b: exported.append((a, b)),
    )
    assert ex.run(threading.Event(), once=True, timeout=20)
    want = lines(tmp_path / "audit")
    assert rx.wait_for(len(want)) == list(range(len(want)))
    assert [parse(m)["msg"] for m in rx.messages] == want
    assert exported[0][0] == 0
    assert exported[-1][1] == len(want) - 1
    cursor = json.loads(next((tmp_path / "state").glob("*.cursor.json")).read_text())
    assert cursor["next"]["idx"] == len(want)
    assert cursor["next"]["prev"] == leaf_hash(want[-1]).hex()


def test_the_cursor_resumes_without_duplicates(
    tmp_path: Path, receiver: Callable[[str], Receiver], capsys: pytest.CaptureFixture[str]
) -> None:
    rx = receiver("tcp")
    argv = ["export", "--log", str(tmp_path / "audit"), "--syslog", rx.url, "--once"]
    with open_log(tmp_path / "audit") as log:
        append(log, 20)
        log.checkpoint()
        assert audit_cli.run(argv) == 0
        first = rx.wait_for(log.durable_size)
        append(log, 20, start=20)
        log.checkpoint()
        size = log.durable_size
        assert audit_cli.run(argv) == 0
    rx.wait_for(size)
    assert rx.idxs() == list(range(size))  # each record exactly once
    assert len(first) < size
    assert (tmp_path / "audit-export").is_dir()  # the default state dir, next to the log
    assert "exported" in capsys.readouterr().err


def test_a_replaced_log_is_refused(
    tmp_path: Path, receiver: Callable[[str], Receiver], capsys: pytest.CaptureFixture[str]
) -> None:
    rx = receiver("tcp")
    argv = ["export", "--log", str(tmp_path / "audit"), "--syslog", rx.url, "--once"]
    with open_log(tmp_path / "audit") as log:
        append(log, 5)
    assert audit_cli.run(argv) == 0
    for seg in (tmp_path / "audit").iterdir():
        seg.unlink()
    with open_log(tmp_path / "audit") as log:  # another log with other keys' records
        append(log, 30, start=1000)
    assert audit_cli.run(argv) == 1
    assert "the log is not the one exported so far" in capsys.readouterr().err
    ex = Exporter(tmp_path / "audit", Destination.parse(rx.url), tmp_path / "audit-export")
    with pytest.raises(CursorMismatch):
        ex.run(threading.Event(), once=True, timeout=5)


def test_tcp_outage_backlog_drains_in_order_and_never_blocks_the_log(
    tmp_path: Path, receiver: Callable[[str], Receiver]
) -> None:
    rx = receiver("tcp")
    stop = threading.Event()
    ex = Exporter(tmp_path / "audit", Destination.parse(rx.url), tmp_path / "state", options=FAST)
    with open_log(tmp_path / "audit") as log:
        t = threading.Thread(target=ex.run, args=(stop,), daemon=True)
        t.start()
        try:
            append(log, 50)
            log.checkpoint()
            before = log.durable_size
            rx.wait_for(before)
            rx.stop()  # the SIEM goes down
            slowest = 0.0
            for i in range(300):  # the local log carries on at full speed
                t0 = time.perf_counter()
                obj = AuditObject(item=f"{i:032x}", channel="files/x", seq=1000 + i)
                log.append("transfer.sent", subject=SENDER, obj=obj, durable=True)
                slowest = max(slowest, time.perf_counter() - t0)
            log.checkpoint()
            total = log.durable_size
            time.sleep(0.5)  # the exporter retries meanwhile
            assert ex.failures > 0
            assert len(set(rx.idxs())) == before  # nothing got through
            rx.start()  # same port
            idxs = rx.wait_for(total)
        finally:
            stop.set()
            t.join(10)
    assert slowest < 1.0
    assert sorted(set(idxs)) == list(range(total))
    assert in_order_after_resends(idxs)
    after = idxs[len(idxs) - (total - before) :]
    assert after == list(range(before, total))  # the backlog, in order


def test_udp_export_and_outage(tmp_path: Path, receiver: Callable[[str], Receiver]) -> None:
    rx = receiver("udp")
    with open_log(tmp_path / "audit") as log:
        append(log, 30)
        log.checkpoint()
        size = log.durable_size
        ex = Exporter(
            tmp_path / "audit", Destination.parse(rx.url), tmp_path / "state", options=FAST
        )
        assert ex.run(threading.Event(), once=True, timeout=10)
        assert rx.wait_for(size) == list(range(size))
        rx.stop()
        append(log, 10, start=100)
        log.checkpoint()
        total = log.durable_size
        # Loopback reports the refused datagram (ICMP port unreachable) at once.
        ex = Exporter(
            tmp_path / "audit", Destination.parse(rx.url), tmp_path / "state", options=FAST
        )
        assert not ex.run(threading.Event(), once=True, timeout=0.5)
        assert ex.failures > 0
        assert ex.committed.idx == size
        rx.start()
        ex = Exporter(
            tmp_path / "audit", Destination.parse(rx.url), tmp_path / "state", options=FAST
        )
        assert ex.run(threading.Event(), once=True, timeout=10)
    idxs = rx.wait_for(total)
    assert idxs == list(range(total))


def test_export_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert audit_cli.run(["export", "--syslog", "tcp://127.0.0.1:1"]) == 2
    argv = ["export", "--log", str(tmp_path / "none"), "--syslog", "tcp://127.0.0.1:1"]
    assert audit_cli.run(argv) == 2
    argv = ["export", "--log", str(tmp_path), "--syslog", "ftp://127.0.0.1:1", "--once"]
    assert audit_cli.run(argv) == 2
    assert "error" in capsys.readouterr().err


def test_once_gives_up_after_the_timeout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with open_log(tmp_path / "audit") as log:
        append(log, 3)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there
    argv = ["export", "--log", str(tmp_path / "audit"), "--syslog", f"tcp://127.0.0.1:{port}"]
    assert audit_cli.run([*argv, "--once", "--timeout", "0.5"]) == 1
    assert "not everything was exported" in capsys.readouterr().err
