"""Serial-line transport: datagrams as COBS/CRC32C frames on a raw tty, one way only.

The sender opens the tty **write-only** and the receiver **read-only**; both
put the line in raw mode: 8N1 at the configured baud, no echo, no canonical
line editing, no signals, no output post-processing, and no flow control of
any kind (no RTS/CTS, no XON/XOFF), with CLOCAL so modem lines are ignored.
Echo and software flow control are back-channels (the line discipline would
transmit echoed bytes or XOFF from the receiving end), so the receiver turns
them off and then checks that the kernel really applied that.

Why ``os.open`` + :mod:`termios` and not pyserial: ``serial.Serial`` always
opens the device read-write (``O_RDWR``), so the receiving end would hold a
descriptor able to transmit. ``os.open`` with ``O_RDONLY``/``O_WRONLY`` makes
the one-way property hold at the file-descriptor level, and the termios
settings are short enough to spell out here. This module does not use
pyserial at all. The cost: only the standard ``termios.B*`` baud rates are
supported (no arbitrary rates through ``BOTHER``/``TCSETS2``).

The hardware must still be one-way (TX wire cut, or RS-422 with a single pair):
opening a tty asserts DTR/RTS on most UARTs, which software cannot prevent.

Pacing: :meth:`SerialSender.wire_size` returns *octet-times*, the line time a
datagram takes in units of 8 bit-times (framed bytes x 10 bits for 8N1, / 8,
rounded up). Pace with a token bucket of ``baud / 8`` octet-times per second
(:attr:`SerialSender.wire_rate`), i.e. ``LinkParams.rate_bps = baud``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import termios
import threading
from collections import deque
from types import TracebackType

from ferry.channels.base import ReceiverStats
from ferry.errors import ChannelError
from ferry.wire.framing import FrameDecoder, encode_frame, framed_size

__all__ = ["BAUD_RATES", "BITS_PER_BYTE", "SerialReceiver", "SerialSender"]

BITS_PER_BYTE = 10
"""Bit-times one byte occupies on an 8N1 line: start bit, 8 data bits, stop bit."""

BAUD_RATES: dict[int, int] = {
    rate: int(getattr(termios, f"B{rate}"))
    for rate in (
        *(1200, 2400, 4800, 9600, 19_200, 38_400, 57_600, 115_200, 230_400, 460_800),
        *(500_000, 576_000, 921_600, 1_000_000, 1_152_000, 1_500_000, 2_000_000),
        *(2_500_000, 3_000_000, 3_500_000, 4_000_000),
    )
    if hasattr(termios, f"B{rate}")
}
"""Supported baud rates (those with a ``termios.B*`` constant on this platform)."""

MAX_READ = 65_536
# Bytes asked for per read(). The kernel's tty input buffer is about 4 KiB, so one read
# drains it; a larger request costs nothing and helps on fast USB adapters.

POLL_INTERVAL = 0.05
# Seconds the reader thread waits in poll() before checking for close(): close() returns
# within about this long, and an idle line costs 20 wake-ups a second.

QUEUE_ITEM_OVERHEAD = 64
# Bytes charged per queued datagram on top of its length (Python object and deque slot),
# so a flood of tiny or empty frames is bounded by queue_bytes too.

# Input: no break/parity marking, no CR/NL mapping, no stripping, no XON/XOFF.
_IFLAG_OFF = (
    termios.IGNBRK
    | termios.BRKINT
    | termios.PARMRK
    | termios.ISTRIP
    | termios.INLCR
    | termios.IGNCR
    | termios.ICRNL
    | termios.IXON
    | termios.IXOFF
    | termios.IXANY
    | termios.INPCK
    | termios.IMAXBEL
)
# Local: no echo of any kind, no line editing, no signals, no extended processing.
_LFLAG_OFF = (
    termios.ECHO
    | termios.ECHOE
    | termios.ECHOK
    | termios.ECHONL
    | termios.ECHOCTL
    | termios.ECHOKE
    | termios.ECHOPRT
    | termios.ICANON
    | termios.ISIG
    | termios.IEXTEN
)
# Control: 8N1 without RTS/CTS; CLOCAL ignores modem lines (no wait for carrier, no
# hang-up), CREAD enables the UART's receiver.
_CFLAG_OFF = termios.CSIZE | termios.PARENB | termios.CSTOPB | termios.CRTSCTS
_CFLAG_ON = termios.CS8 | termios.CLOCAL | termios.CREAD
# Flags that would make the line discipline transmit or hold data; checked after setting.
_MUST_BE_OFF = (
    (0, termios.IXON | termios.IXOFF | termios.IXANY, "software flow control"),
    (2, termios.CRTSCTS, "hardware flow control"),
    (3, termios.ECHO | termios.ECHONL | termios.ICANON, "echo / canonical mode"),
)


def _configure_raw(fd: int, device: str, baud: int) -> None:
    """Put the tty in raw 8N1 mode at ``baud`` with echo and flow control off, and verify."""
    try:
        attrs = termios.tcgetattr(fd)
    except termios.error as exc:
        raise ChannelError(f"serial device {device} is not a tty: {exc}") from exc
    iflag, oflag, cflag, lflag, _ispeed, _ospeed, cc = attrs
    speed = BAUD_RATES[baud]
    cc[termios.VMIN] = 1
    cc[termios.VTIME] = 0
    raw = [
        iflag & ~_IFLAG_OFF,
        oflag & ~termios.OPOST,
        (cflag & ~_CFLAG_OFF) | _CFLAG_ON,
        lflag & ~_LFLAG_OFF,
        speed,
        speed,
        cc,
    ]
    try:
        termios.tcsetattr(fd, termios.TCSANOW, raw)
        applied = termios.tcgetattr(fd)
    except termios.error as exc:
        raise ChannelError(f"cannot configure serial device {device}: {exc}") from exc
    for index, mask, what in _MUST_BE_OFF:
        if applied[index] & mask:
            raise ChannelError(f"serial device {device} refused to turn off {what}")


def _open_tty(device: str, flags: int, baud: int) -> int:
    """Open ``device`` with ``flags`` (never O_RDWR) and configure it; ChannelError on failure."""
    if baud not in BAUD_RATES:
        rates = ", ".join(str(rate) for rate in BAUD_RATES)
        raise ChannelError(f"serial device {device}: unsupported baud rate {baud} (use {rates})")
    try:
        fd = os.open(device, flags)
    except OSError as exc:
        raise ChannelError(f"cannot open serial device {device}: {exc.strerror}") from exc
    try:
        _configure_raw(fd, device, baud)
    except BaseException:
        os.close(fd)
        raise
    return fd


class SerialSender:
    """Send-only end of a serial link: writes one COBS frame per datagram, never reads.

    The descriptor is opened ``O_WRONLY | O_NOCTTY`` (non-blocking only while
    configuring, so a missing carrier cannot hang the open) and then made
    blocking: when the UART's buffer is full, :meth:`send` waits rather than
    dropping bytes.
    """

    def __init__(self, device: str, baud: int) -> None:
        """Open and configure ``device``; raises ChannelError naming it on failure."""
        self.device = device
        self.baud = baud
        self._fd = _open_tty(device, os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK, baud)
        os.set_blocking(self._fd, True)

    @property
    def wire_rate(self) -> float:
        """The pacing rate matching :meth:`wire_size`: ``baud / 8`` octet-times per second."""
        return self.baud / 8

    def wire_size(self, datagram_len: int) -> int:
        """Line time of one datagram in octet-times (8 bit-times), rounded up.

        That is ``ceil(framed_size(datagram_len) * 10 / 8)``: every framed byte
        costs 10 bit-times on an 8N1 line. Pace at :attr:`wire_rate`.
        """
        return (framed_size(datagram_len) * BITS_PER_BYTE + 7) // 8

    def send(self, datagram: bytes) -> None:
        """Write one framed datagram completely (retrying partial writes)."""
        if self._fd < 0:
            raise ChannelError(f"serial sender on {self.device} is closed")
        view = memoryview(encode_frame(datagram))
        while view:
            try:
                written = os.write(self._fd, view)
            except OSError as exc:
                raise ChannelError(f"write to serial device {self.device} failed: {exc}") from exc
            view = view[written:]

    def fileno(self) -> int:
        """The tty descriptor (opened write-only), or -1 once closed."""
        return self._fd

    def close(self) -> None:
        """Close the tty (idempotent). Linux lets queued output drain on close."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> SerialSender:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SerialReceiver:
    """Receive-only end of a serial link. Never writes to the tty.

    The tty is opened ``O_RDONLY | O_NOCTTY | O_NONBLOCK``. A daemon thread
    polls it, feeds a :class:`~ferry.wire.framing.FrameDecoder` and queues the
    payloads (bounded by ``queue_bytes``; beyond that new datagrams are dropped
    and counted in ``overflow_drops``). If the device fails (unplugged adapter,
    hang-up), :meth:`recv_batch` returns what was queued and then raises
    ChannelError; the agent may reopen.
    """

    def __init__(
        self, device: str, baud: int, max_payload: int, queue_bytes: int = 64 * 1024 * 1024
    ) -> None:
        """Open and configure ``device`` and start the reader thread."""
        self.device = device
        self.baud = baud
        self._decoder = FrameDecoder(max_payload)
        self._queue_limit = queue_bytes
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._stats = ReceiverStats()
        self._failure: str | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._fd = _open_tty(device, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK, baud)
        self._thread = threading.Thread(
            target=self._run, name=f"ferry-serial-rx {device}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        try:
            self._read_loop()
        finally:
            with self._cond:
                if self._failure is None and not self._stop.is_set():
                    self._failure = f"serial reader on {self.device} stopped unexpectedly"
                self._cond.notify_all()

    def _read_loop(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN | select.POLLPRI)
        timeout_ms = int(POLL_INTERVAL * 1000)
        while not self._stop.is_set():
            events = poller.poll(timeout_ms)
            if not events:
                continue
            revents = events[0][1]
            if revents & select.POLLNVAL:
                self._fail("descriptor is no longer valid")
                return
            try:
                data = os.read(self._fd, MAX_READ)
            except BlockingIOError:
                if revents & (select.POLLHUP | select.POLLERR):
                    self._fail("hang-up")
                    return
                continue
            except OSError as exc:
                self._fail(str(exc))
                return
            if not data:
                self._fail("hang-up (end of file)")
                return
            self._deliver(self._decoder.feed(data))

    def _deliver(self, payloads: list[bytes]) -> None:
        with self._cond:
            for payload in payloads:
                cost = len(payload) + QUEUE_ITEM_OVERHEAD
                if self._queued_bytes + cost > self._queue_limit:
                    self._stats.overflow_drops += 1
                    continue
                self._queue.append(payload)
                self._queued_bytes += cost
            self._stats.framing_errors = self._decoder.errors
            if self._queue:
                self._cond.notify_all()

    def _fail(self, reason: str) -> None:
        with self._cond:
            self._failure = f"serial device {self.device} failed: {reason}"
            self._cond.notify_all()

    def recv_batch(self, timeout: float) -> list[bytes]:
        """Return every queued datagram, waiting up to ``timeout`` s for at least one.

        Returns ``[]`` on timeout or after :meth:`close`. Raises ChannelError
        once the queue is empty if the device has failed.
        """
        with self._cond:
            self._cond.wait_for(
                lambda: bool(self._queue) or self._failure is not None or self._closed, timeout
            )
            if self._queue:
                batch = list(self._queue)
                self._queue.clear()
                self._queued_bytes = 0
                self._stats.datagrams += len(batch)
                self._stats.bytes += sum(len(datagram) for datagram in batch)
                return batch
            if self._failure is not None and not self._closed:
                raise ChannelError(self._failure)
            return []

    @property
    def stats(self) -> ReceiverStats:
        """A snapshot of the counters (``framing_errors`` comes from the frame decoder)."""
        with self._cond:
            return dataclasses.replace(self._stats)

    def fileno(self) -> int:
        """The tty descriptor (opened read-only), or -1 once closed. Do not read from it."""
        return self._fd

    def close(self) -> None:
        """Stop the reader thread (within about POLL_INTERVAL) and close the tty. Idempotent."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> SerialReceiver:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
