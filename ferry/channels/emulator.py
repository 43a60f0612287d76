"""Link emulators for the demo and tests: a lossy one-way UDP hop and a one-way pty "cable".

These stand in for the physical diode on a single machine. Each copies in one
direction only; nothing ever flows back.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import socket
import termios
import threading
import tty


class LossyUdpForwarder:
    """Receive on ``127.0.0.1:<port>`` and forward to ``target``, dropping a seeded fraction."""

    def __init__(self, target: tuple[str, int], loss: float, seed: int = 1) -> None:
        self._rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024 * 1024)
        self._rx.bind(("127.0.0.1", 0))
        self._rx.settimeout(0.2)
        self.port: int = self._rx.getsockname()[1]
        self._tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._tx.connect(target)
        self.loss = loss  # may be changed while running (tests suppress a window)
        self._rng = random.Random(seed)  # noqa: S311  # loss emulation, not cryptography
        self.forwarded = 0
        self.dropped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lossy-udp", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        rnd, send = self._rng.random, self._tx.send
        while not self._stop.is_set():
            try:
                data = self._rx.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            if rnd() < self.loss:
                self.dropped += 1
                continue
            try:
                send(data)
                self.forwarded += 1
            except OSError:
                self.dropped += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._rx.close()
        self._tx.close()


class PtyCable:
    """Two pty pairs joined one way: bytes written to ``outside_path`` appear at ``inside_path``.

    The relay copies master A -> master B only (the return wire is cut), and can
    flip bits at a seeded rate to emulate line noise.
    """

    def __init__(self, corrupt: float = 0.0, seed: int = 1) -> None:
        self._ma, sa = os.openpty()
        self._mb, sb = os.openpty()
        for fd in (self._ma, sa, self._mb, sb):
            tty.setraw(fd)
            attrs = termios.tcgetattr(fd)
            attrs[3] &= ~termios.ECHO
            termios.tcsetattr(fd, termios.TCSANOW, attrs)
        self.outside_path = os.ttyname(sa)
        self.inside_path = os.ttyname(sb)
        self._slaves = (sa, sb)  # kept open so the ptys stay alive between agent restarts
        self._corrupt = corrupt
        self._rng = random.Random(seed)  # noqa: S311  # noise emulation, not cryptography
        self.bytes_copied = 0
        self.bytes_returned = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pty-cable", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        reading = select.poll()  # (not select(): no limit on descriptor numbers)
        reading.register(self._ma, select.POLLIN)
        reading.register(self._mb, select.POLLIN)
        writing = select.poll()
        writing.register(self._mb, select.POLLOUT)
        while not self._stop.is_set():
            ready = {fd for fd, _ in reading.poll(200)}
            if self._mb in ready:  # anything the inside side emitted: counted, never forwarded
                with contextlib.suppress(OSError):
                    self.bytes_returned += len(os.read(self._mb, 65536))
            if self._ma not in ready:
                continue
            try:
                data = os.read(self._ma, 65536)
            except OSError:
                continue
            if self._corrupt and self._rng.random() < self._corrupt * len(data):
                buf = bytearray(data)
                buf[self._rng.randrange(len(buf))] ^= 1 << self._rng.randrange(8)
                data = bytes(buf)
            view = memoryview(data)
            while view and not self._stop.is_set():
                try:
                    n = os.write(self._mb, view)
                except BlockingIOError:
                    writing.poll(200)
                    continue
                view = view[n:]
            self.bytes_copied += len(data)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        for fd in (self._ma, self._mb, *self._slaves):
            os.close(fd)
