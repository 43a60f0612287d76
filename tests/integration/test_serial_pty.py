"""The serial transport over real pseudo-terminals.

A pty pair stands in for the serial line: the *slave* end has a device path
and takes the ferry endpoint under test (SerialReceiver or SerialSender); the
test plays the other end of the line through the *master* descriptor.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import inspect
import os
import random
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import ferry.channels.serial as serial_module
from ferry.channels.serial import SerialReceiver, SerialSender
from ferry.errors import ChannelError
from ferry.wire.framing import FrameDecoder, encode_frame

pytestmark = pytest.mark.integration

BAUD = 115_200


class Pty:
    """One pty pair: ``path`` is the slave device, ``master`` the test's end of the line."""

    def __init__(self) -> None:
        self.master, self._slave = os.openpty()
        self.path = os.ttyname(self._slave)

    def attrs(self) -> list[int]:
        """The termios flags (iflag, oflag, cflag, lflag) the endpoint left on the line."""
        return [int(flag) for flag in termios.tcgetattr(self._slave)[:4]]

    def write_all(self, data: bytes) -> None:
        """Write to the line from the master end (blocks while the pty buffer is full)."""
        view = memoryview(data)
        while view:
            view = view[os.write(self.master, view) :]

    def hang_up(self) -> None:
        """Close the master end: the slave sees a hang-up."""
        fd, self.master = self.master, -1
        os.close(fd)

    def close(self) -> None:
        for fd in (self.master, self._slave):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def read_available(self) -> bytes:
        """Whatever is waiting on the master end right now (non-blocking)."""
        os.set_blocking(self.master, False)
        try:
            return os.read(self.master, 65_536)
        except BlockingIOError:
            return b""
        finally:
            os.set_blocking(self.master, True)


@pytest.fixture
def pty() -> Iterator[Pty]:
    pair = Pty()
    yield pair
    pair.close()


def random_payloads(count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.randint(0, 1400)) for _ in range(count)]


def receive(receiver: SerialReceiver, count: int, deadline: float = 30.0) -> list[bytes]:
    got: list[bytes] = []
    end = time.monotonic() + deadline
    while len(got) < count and time.monotonic() < end:
        got += receiver.recv_batch(timeout=0.5)
    return got


def in_thread(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def assert_raw_one_way(attrs: list[int]) -> None:
    iflag, oflag, cflag, lflag = attrs
    assert not iflag & (termios.IXON | termios.IXOFF | termios.IXANY | termios.ICRNL)
    assert not oflag & termios.OPOST
    assert not cflag & (termios.CRTSCTS | termios.PARENB | termios.CSTOPB)
    assert cflag & termios.CSIZE == termios.CS8
    assert cflag & termios.CLOCAL
    assert not lflag & (termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG)


def test_receiver_gets_500_payloads_in_order_and_sends_nothing_back(
    pty: Pty, monkeypatch: pytest.MonkeyPatch
) -> None:
    written_fds: list[int] = []
    real_write = os.write

    def spy_write(fd: int, data: bytes) -> int:
        written_fds.append(fd)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", spy_write)
    payloads = random_payloads(500, seed=1)
    with SerialReceiver(pty.path, BAUD, max_payload=1400) as receiver:
        assert fcntl.fcntl(receiver.fileno(), fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        assert_raw_one_way(pty.attrs())
        writer = in_thread(lambda: pty.write_all(b"".join(map(encode_frame, payloads))))
        got = receive(receiver, len(payloads))
        writer.join(timeout=10)
        stats = receiver.stats
        receiver_fd = receiver.fileno()
        time.sleep(0.2)  # anything echoed or sent back would be on the master by now
        assert pty.read_available() == b""
    assert got == payloads
    assert (stats.datagrams, stats.framing_errors, stats.overflow_drops) == (500, 0, 0)
    assert stats.bytes == sum(map(len, payloads))
    assert pty.master in written_fds  # the spy saw the test's own writes
    assert receiver_fd not in written_fds


def test_echo_detector_works_on_an_unconfigured_pty(pty: Pty) -> None:
    # Control for the "nothing comes back" check: a pty in its default (cooked, echo on)
    # mode does send bytes back to the master, so an empty read above means something.
    pty.write_all(b"ping\n")
    time.sleep(0.1)
    assert pty.read_available().startswith(b"ping")


def test_receiver_source_has_no_write_call() -> None:
    forbidden = {"write", "writev", "pwrite", "send", "sendall", "tcsendbreak", "tcflow"}
    sources: list[Callable[..., object]] = [
        serial_module.SerialReceiver,
        serial_module._open_tty,
        serial_module._configure_raw,
    ]
    for obj in sources:
        tree = ast.parse(inspect.getsource(obj))
        names = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        names |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        assert not names & forbidden, (obj, names & forbidden)


def test_sender_writes_frames_write_only(pty: Pty) -> None:
    payloads = random_payloads(500, seed=2)
    decoder = FrameDecoder(max_payload=1400)
    got: list[bytes] = []

    def read_line() -> None:
        while len(got) < len(payloads):
            got.extend(decoder.feed(os.read(pty.master, 65_536)))

    reader = in_thread(read_line)
    with SerialSender(pty.path, BAUD) as sender:
        assert fcntl.fcntl(sender.fileno(), fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY
        assert_raw_one_way(pty.attrs())
        for payload in payloads:
            sender.send(payload)
        reader.join(timeout=30)
    assert got == payloads
    assert decoder.errors == 0


def test_sender_wire_size_counts_start_and_stop_bits(pty: Pty) -> None:
    with SerialSender(pty.path, 9600) as sender:
        assert sender.wire_size(1400) == 1765  # ceil(1412 framed bytes * 10 / 8)
        assert sender.wire_size(0) == 9  # ceil(7 * 10 / 8)
        assert sender.wire_rate == 1200.0  # 9600 baud / 8
        # 1412 bytes at 10 bits each take 1.4708 s at 9600 baud; the bucket agrees.
        assert sender.wire_size(1400) / sender.wire_rate == pytest.approx(1412 * 10 / 9600, 1e-3)


def test_receiver_survives_line_noise_and_counts_it(pty: Pty) -> None:
    rng = random.Random(3)
    payloads = random_payloads(100, seed=4)
    stream = b"".join(rng.randbytes(rng.randint(1, 300)) + encode_frame(p) for p in payloads)
    with SerialReceiver(pty.path, BAUD, max_payload=1400) as receiver:
        writer = in_thread(lambda: pty.write_all(stream))
        got = receive(receiver, len(payloads))
        writer.join(timeout=10)
        stats = receiver.stats
    assert got == payloads
    assert stats.framing_errors >= 50  # each burst of noise is at least one bad frame


def test_receiver_queue_overflow_drops_and_counts(pty: Pty) -> None:
    payload = b"\x42" * 200  # queued at 200 + 64 bytes: three fit in 1000
    with SerialReceiver(pty.path, BAUD, max_payload=1400, queue_bytes=1000) as receiver:
        in_thread(lambda: pty.write_all(encode_frame(payload) * 20))
        end = time.monotonic() + 10
        while receiver.stats.overflow_drops < 17 and time.monotonic() < end:
            time.sleep(0.01)
        assert receiver.recv_batch(timeout=1) == [payload] * 3
        assert receiver.stats.overflow_drops == 17


def test_receiver_reports_hang_up_as_channel_error(pty: Pty) -> None:
    with SerialReceiver(pty.path, BAUD, max_payload=1400) as receiver:
        pty.write_all(encode_frame(b"last words"))
        assert receive(receiver, 1) == [b"last words"]
        pty.hang_up()
        with pytest.raises(ChannelError, match=pty.path):
            receiver.recv_batch(timeout=5)


def test_receiver_close_is_prompt_and_idempotent(pty: Pty) -> None:
    receiver = SerialReceiver(pty.path, BAUD, max_payload=1400)
    start = time.monotonic()
    receiver.close()
    assert time.monotonic() - start < 1.0
    receiver.close()
    assert receiver.recv_batch(timeout=5) == []


@pytest.mark.parametrize(
    "open_endpoint",
    [
        lambda path: SerialSender(path, BAUD),
        lambda path: SerialReceiver(path, BAUD, max_payload=1400),
    ],
    ids=["sender", "receiver"],
)
def test_missing_device_raises_channel_error(
    tmp_path: Path, open_endpoint: Callable[[str], object]
) -> None:
    missing = str(tmp_path / "ttyNOPE0")
    with pytest.raises(ChannelError, match="ttyNOPE0"):
        open_endpoint(missing)


def test_regular_file_is_not_a_tty(tmp_path: Path) -> None:
    plain = tmp_path / "not-a-tty"
    plain.write_bytes(b"")
    with pytest.raises(ChannelError, match="not a tty"):
        SerialSender(str(plain), BAUD)
    with pytest.raises(ChannelError, match="not a tty"):
        SerialReceiver(str(plain), BAUD, max_payload=1400)


def test_unsupported_baud_rate(pty: Pty) -> None:
    with pytest.raises(ChannelError, match="unsupported baud rate 12345"):
        SerialReceiver(pty.path, 12_345, max_payload=1400)


def test_send_after_close_raises(pty: Pty) -> None:
    sender = SerialSender(pty.path, BAUD)
    sender.close()
    with pytest.raises(ChannelError, match="closed"):
        sender.send(b"late")
