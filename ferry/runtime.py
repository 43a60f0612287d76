"""Process plumbing shared by the agents: stop signals, clocks, the channel factory."""

from __future__ import annotations

import gc
import signal
import threading
from types import FrameType

from ferry.channels.base import DatagramReceiver, DatagramSender
from ferry.config_types import InsideConfig, OutsideConfig


def install_stop_handlers(stop: threading.Event) -> None:
    """SIGTERM and SIGINT set ``stop``; the agents finish their step and exit cleanly."""

    def _handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)


# Young-generation threshold: the agents allocate many short-lived objects per message,
# and the default (700) runs a collection every few messages.
GC_YOUNG_THRESHOLD = 10_000


def settle_gc() -> None:
    """Collect once after start-up and freeze what survived (configs, keys, caches, the ids
    of finished objects): later collections skip it, so a full collection under load pauses
    the agent for a few milliseconds, not tens."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def pacing_rate(cfg: OutsideConfig) -> float:
    """Token-bucket rate in wire bytes per second for the configured transport."""
    if cfg.link.transport == "serial":
        return min(cfg.link.rate_bps, cfg.serial.baud) / 8
    return cfg.link.rate_bps / 8


def open_sender(cfg: OutsideConfig) -> DatagramSender:
    if cfg.link.transport == "serial":
        from ferry.channels.serial import SerialSender  # noqa: PLC0415

        return SerialSender(cfg.serial.device, cfg.serial.baud)
    from ferry.channels.udp import UdpSender  # noqa: PLC0415

    return UdpSender(cfg.udp.host, cfg.udp.port)


def open_receiver(cfg: InsideConfig) -> DatagramReceiver:
    if cfg.link.transport == "serial":
        from ferry.channels.serial import SerialReceiver  # noqa: PLC0415

        return SerialReceiver(cfg.serial.device, cfg.serial.baud, cfg.link.packet_size + 64)
    from ferry.channels.udp import UdpReceiver  # noqa: PLC0415

    return UdpReceiver(cfg.udp.host, cfg.udp.port, cfg.udp.rcvbuf)
