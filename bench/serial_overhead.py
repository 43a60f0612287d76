"""Serial framing overhead and FrameDecoder throughput.

    .venv/bin/python bench/serial_overhead.py

Overhead is framing only (delimiters, COBS code bytes, CRC32C), FEC excluded:
``(wire - payload) / wire``. "8N1" also counts the start and stop bit of every
byte as line time, which is what the pacer budgets. The design goal is framing
overhead <= 3 % of wire bytes at 1400-byte payloads.
"""

from __future__ import annotations

import random
import time

from ferry.wire.framing import FrameDecoder, encode_frame, framed_size

PAYLOAD = 1400
FRAMES = 20_000
GOAL = 0.03


def overhead_rows(rng: random.Random) -> list[tuple[str, int, int]]:
    """(case, payload bytes, wire bytes) per frame."""
    randoms = [rng.randbytes(PAYLOAD) for _ in range(1000)]
    mean_random = sum(len(encode_frame(p)) for p in randoms) / len(randoms)
    worst = b"\xa5" * PAYLOAD  # no zero bytes: one COBS code byte per 254 bytes
    return [
        ("random 1400 B (mean)", PAYLOAD, round(mean_random)),
        ("worst case: no zero bytes", PAYLOAD, len(encode_frame(worst))),
        ("framed_size(1400) budget", PAYLOAD, framed_size(PAYLOAD)),
    ]


def throughput(stream: bytes, chunk: int, max_payload: int) -> tuple[float, int]:
    """Decode ``stream`` fed in ``chunk``-byte reads; returns (MB/s, frames decoded)."""
    decoder = FrameDecoder(max_payload=max_payload)
    pieces = [stream[i : i + chunk] for i in range(0, len(stream), chunk)]
    start = time.perf_counter()
    frames = sum(len(decoder.feed(piece)) for piece in pieces)
    elapsed = time.perf_counter() - start
    return len(stream) / elapsed / 1e6, frames


def main() -> None:
    rng = random.Random(1)
    print(f"{'case':<28}{'payload':>8}{'wire':>7}{'framing %':>11}{'8N1 line %':>12}")
    for case, payload, wire in overhead_rows(rng):
        framing = (wire - payload) / wire
        line = (wire * 10 - payload * 8) / (wire * 10)
        ok = "ok" if framing <= GOAL else "OVER GOAL"
        print(f"{case:<28}{payload:>8}{wire:>7}{framing:>10.2%}{line:>12.2%}  {ok}")
    print("(8N1 line %: share of line time not carrying payload bits, start/stop bits included)")
    print()

    random_stream = b"".join(encode_frame(rng.randbytes(PAYLOAD)) for _ in range(FRAMES))
    zero_stream = b"".join(encode_frame(bytes(PAYLOAD)) for _ in range(FRAMES // 10))
    print(f"{'decoder input':<36}{'read size':>10}{'MB/s':>9}")
    for name, stream in (("random 1400 B payloads", random_stream),):
        for chunk in (4096, 65_536, len(stream)):
            rate, frames = throughput(stream, chunk, PAYLOAD)
            assert frames == FRAMES
            label = "whole" if chunk == len(stream) else str(chunk)
            print(f"{name:<36}{label:>10}{rate:>9.1f}")
    rate, frames = throughput(zero_stream, 4096, PAYLOAD)
    assert frames == FRAMES // 10
    print(f"{'all-zero payloads (1 byte/block)':<36}{4096:>10}{rate:>9.1f}")


if __name__ == "__main__":
    main()
