"""ConnectionGuard on a plain ROUTER over loopback TCP, and the descriptor budget."""

from __future__ import annotations

import os
import resource
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq

from ferry import zmqsec
from ferry.zmqsec import ConnectionGuard, connection_budget


def _until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def router() -> Iterator[tuple[zmq.Socket[Any], int]]:
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    yield sock, 0
    sock.close(0)
    ctx.term()


def _guarded(
    router: tuple[zmq.Socket[Any], int], **kw: Any
) -> tuple[ConnectionGuard, int, list[tuple[str, str, int]]]:
    sock, _ = router
    refusals: list[tuple[str, str, int]] = []
    guard = ConnectionGuard(sock, "test", on_refused=lambda *a: refusals.append(a), **kw)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return guard, port, refusals


def _connect(port: int, source: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))


def _shut(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True if the other end closed: EOF (after libzmq's greeting, if it came first)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def test_counts_follow_connections_opening_and_closing(router: Any) -> None:
    guard, port, refusals = _guarded(router, total=10, per_address=3)
    try:
        a = [_connect(port, "127.0.0.1") for _ in range(2)]
        b = _connect(port, "127.0.0.2")
        _until(lambda: guard.counts() == (3, {"127.0.0.1": 2, "127.0.0.2": 1}))
        a[0].close()
        _until(lambda: guard.counts() == (2, {"127.0.0.1": 1, "127.0.0.2": 1}))
        b.close()
        a[1].close()
        _until(lambda: guard.counts() == (0, {}))
        assert refusals == []
        assert guard.refused == 0
    finally:
        guard.close()


def test_the_connection_past_the_per_address_limit_is_shut(router: Any) -> None:
    guard, port, refusals = _guarded(router, total=10, per_address=2)
    try:
        kept = [_connect(port, "127.0.0.1") for _ in range(2)]
        _until(lambda: guard.counts()[0] == 2)
        third = _connect(port, "127.0.0.1")
        assert _shut(third)
        _until(lambda: len(refusals) == 1)  # (recorded just after the shutdown)
        assert not any(_shut(s, timeout=0.3) for s in kept)  # (the first two are left alone)
        assert refusals == [("127.0.0.1", "more than 2 connections from 127.0.0.1", 3)]
        other = _connect(port, "127.0.0.2")  # another address still gets in
        _until(lambda: guard.counts()[1].get("127.0.0.2") == 1)
        kept[0].close()
        _until(lambda: guard.counts()[1].get("127.0.0.1") == 1)
        fourth = _connect(port, "127.0.0.1")  # room again
        _until(lambda: guard.counts()[1].get("127.0.0.1") == 2)
        assert guard.refused == 1
        for s in (third, other, kept[1], fourth):
            s.close()
    finally:
        guard.close()


def test_the_connection_past_the_total_is_shut(router: Any) -> None:
    guard, port, refusals = _guarded(router, total=3, per_address=3)
    try:
        socks = [_connect(port, f"127.0.0.{i}") for i in (1, 2, 3)]
        _until(lambda: guard.counts()[0] == 3)
        extra = _connect(port, "127.0.0.4")
        assert _shut(extra)
        _until(lambda: len(refusals) == 1)  # (recorded just after the shutdown)
        assert refusals == [("127.0.0.4", "more than 3 connections in all", 4)]
        for s in (*socks, extra):
            s.close()
    finally:
        guard.close()


def test_a_sweep_drops_what_a_lost_event_left_counted(router: Any, tmp_path: Any) -> None:
    guard, port, _ = _guarded(router, total=3, per_address=3)
    try:
        live = _connect(port, "127.0.0.1")
        _until(lambda: guard.counts()[0] == 1)
        not_a_socket = os.open(tmp_path / "f", os.O_CREAT | os.O_RDWR)
        closed = os.open(tmp_path / "g", os.O_CREAT | os.O_RDWR)
        os.close(closed)
        ends = (("127.0.0.1", port), ("127.0.0.9", 40000))
        with guard._lock:  # as if two DISCONNECTED events had been lost
            for fd in (not_a_socket, closed):
                guard._open[fd] = ("127.0.0.9", ends)
                guard._by_address["127.0.0.9"] += 1
        assert guard.counts() == (3, {"127.0.0.1": 1, "127.0.0.9": 2})
        guard.sweep()
        assert guard.counts() == (1, {"127.0.0.1": 1})
        os.close(not_a_socket)
        live.close()
    finally:
        guard.close()


def test_the_budget_leaves_descriptors_for_the_agents_own_files(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    limits = {"now": (1024, 4096)}
    monkeypatch.setattr(zmqsec.resource, "getrlimit", lambda _: limits["now"])

    def setrlimit(_: int, value: tuple[int, int]) -> None:
        limits["now"] = value

    monkeypatch.setattr(zmqsec.resource, "setrlimit", setrlimit)
    assert connection_budget(1000) == 1000  # (the soft limit raised to the hard one first)
    assert limits["now"] == (4096, 4096)
    limits["now"] = (600, 600)  # a hard limit of 600: 344 left past the reserve, half of it
    assert connection_budget(1000) == (600 - zmqsec.FD_RESERVE) // 2
    assert connection_budget(1000, sockets=2) == (600 - zmqsec.FD_RESERVE) // 4
    assert connection_budget(100) == 100
    limits["now"] = (100, 100)
    assert connection_budget(1000) == 16  # (never none at all)


def test_the_real_limit_is_raised_towards_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 512), hard))
        got = zmqsec.raise_fd_limit(2048)
        want = 2048 if hard == resource.RLIM_INFINITY else min(2048, hard)
        assert got == want == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_descriptor_taken_by_another_socket_meanwhile_is_left_alone(
    router: Any, tmp_path: Any
) -> None:
    """An ACCEPTED event is handled after the fact: its descriptor may be closed by then and
    its number taken by another socket of the agent (the SIEM exporter's, say). The guard,
    at its total, must not shut that one down."""
    guard, port, refusals = _guarded(router, total=1, per_address=1)
    other = socket.create_server(("127.0.0.1", 0))
    try:
        held = _connect(port, "127.0.0.1")
        _until(lambda: guard.counts()[0] == 1)
        mine = socket.create_connection(other.getsockname(), timeout=5)  # not the listener's
        served, _ = other.accept()
        guard._event(zmq.EVENT_ACCEPTED, mine.fileno(), f"tcp://127.0.0.1:{port}".encode())
        guard._event(zmq.EVENT_ACCEPTED, served.fileno(), f"tcp://0.0.0.0:{port}".encode())
        assert refusals == []
        assert guard.counts()[0] == 1
        mine.sendall(b"still open")
        assert served.recv(100) == b"still open"
        for s in (held, mine, served):
            s.close()
    finally:
        other.close()
        guard.close()


@pytest.mark.parametrize("abstract", [False, True], ids=["file", "abstract"])
def test_local_ipc_connections_count_only_towards_the_total(tmp_path: Any, abstract: bool) -> None:
    """Also on an abstract socket (``ipc://@name``), whose local name Python gives as bytes:
    compared with the listener's as a string, no connection was counted (no limit held)."""
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    refusals: list[tuple[str, str, int]] = []
    guard = ConnectionGuard(
        sock, "ipc", total=3, per_address=1, on_refused=lambda *a: refusals.append(a)
    )
    name = f"ferry-test-{os.getpid()}-{id(tmp_path):x}"
    path = str(tmp_path / "api.sock")
    sock.bind(f"ipc://@{name}" if abstract else f"ipc://{path}")
    address = "\0" + name if abstract else path
    try:
        clients = []
        for _ in range(3):
            c = socket.socket(socket.AF_UNIX)
            c.connect(address)
            clients.append(c)
        _until(lambda: guard.counts() == (3, {"unix": 3}))
        extra = socket.socket(socket.AF_UNIX)
        extra.connect(address)
        assert _shut(extra)
        _until(lambda: len(refusals) == 1)
        assert refusals == [("unix", "more than 3 connections in all", 4)]
        for c in (*clients, extra):
            c.close()
    finally:
        guard.close()
        sock.close(0)
        ctx.term()


@pytest.mark.parametrize(
    ("endpoint", "local", "ours"),
    [
        ("tcp://127.0.0.1:5000", ("127.0.0.1", 5000), True),
        ("tcp://127.0.0.1:5000", ("127.0.0.1", 5001), False),
        ("tcp://127.0.0.1:5000", ("127.0.0.2", 5000), False),
        ("tcp://0.0.0.0:5000", ("10.1.2.3", 5000), True),
        ("tcp://[::]:5000", ("::ffff:10.1.2.3", 5000, 0, 0), True),
        ("tcp://[::1]:5000", ("::1", 5000, 0, 0), True),
        ("tcp://127.0.0.1:5000", ("::ffff:127.0.0.1", 5000, 0, 0), True),
        ("tcp://gateway.example:5000", ("10.1.2.3", 5000), True),
        ("ipc:///run/ferry/api.sock", "/run/ferry/api.sock", True),
        ("ipc:///run/ferry/api.sock", "/run/ferry/other.sock", False),
        ("ipc://@ferry", "\0ferry", True),
        ("ipc://@ferry", b"\0ferry", True),
        ("ipc://@ferry", b"\0other", False),
        ("tcp://127.0.0.1:5000", "/run/ferry/api.sock", False),
        ("inproc://x", ("127.0.0.1", 5000), False),
    ],
)
def test_which_sockets_are_the_listeners(endpoint: str, local: object, ours: bool) -> None:
    assert zmqsec._ours(endpoint, local) is ours
