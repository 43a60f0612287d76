"""Coverage-guided fuzzing of the receiver with atheris (libFuzzer for Python).

The invariant is the one tests/property/test_receiver_fuzz.py checks in CI with
Hypothesis: whatever bytes arrive, ``Receiver.receive_datagram`` raises only
``WireError`` (``EnvelopeRejected`` and ``ReplayRejected`` are subclasses), no input
decodes a block or completes an object, and afterwards the genuine rest of a
transfer still rebuilds the object byte for byte.

atheris is optional (``pip install -e '.[fuzz]'``; it needs a Linux x86-64 wheel or
clang to build) and this harness is not part of the test run. Run it with::

    .venv/bin/pip install -e '.[fuzz]'
    mkdir -p /tmp/ferry-corpus
    .venv/bin/python tests/fuzz/fuzz_receiver.py /tmp/ferry-corpus -max_total_time=600
    # reproduce one crash:
    .venv/bin/python tests/fuzz/fuzz_receiver.py crash-<hash>

The first input byte picks the mode: raw bytes, or a genuine datagram (announcement,
heartbeat, symbol) with the rest of the input as a mutation script. Add
``-atheris_runs=N`` or any libFuzzer flag after the corpus directory.
"""

from __future__ import annotations

import random
import sys

import atheris

with atheris.instrument_imports():
    from ferry.config_types import FecParams, LinkParams
    from ferry.crypto.keys import SecretKey
    from ferry.errors import WireError
    from ferry.wire.receiver import BlockDecoded, ObjectCompleted, Receiver
    from ferry.wire.sender import BytesSource, OutgoingObject, Sender

SIGN = SecretKey("ed25519", bytes(range(32)))
KEM = SecretKey("x25519", bytes(range(32, 64)))
LINK = LinkParams(fec=FecParams(codec="zfec", source=4, repair=2, interleave=2), kem="x25519")
NOW = 1_700_000_000.0
SPLIT = 3


def _record() -> tuple[bytes, bytes, list[bytes]]:
    rng = random.Random(11)
    sender = Sender(LINK, SIGN, KEM.public, epoch=5, rng=rng.randbytes, now=NOW)
    data = rng.randbytes(7000)
    sender.submit(OutgoingObject(b"\x42" * 16, len(data), BytesSource(data)))
    out = sender.datagrams(NOW, 1000)
    announce = sender.announcement()
    return data, announce, [d for d in out if d != announce]


DATA, ANNOUNCE, SEALED = _record()
GENUINE = [ANNOUNCE, *SEALED]
GENUINE_SET = frozenset(GENUINE)


def _mutate(fdp: atheris.FuzzedDataProvider) -> bytes:
    data = bytearray(GENUINE[fdp.ConsumeIntInRange(0, len(GENUINE) - 1)])
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        op = fdp.ConsumeIntInRange(0, 5)
        pos = fdp.ConsumeIntInRange(0, max(len(data) - 1, 0))
        if op == 0 and data:
            data[pos] ^= 1 << fdp.ConsumeIntInRange(0, 7)
        elif op == 1 and data:
            data[pos] = fdp.ConsumeIntInRange(0, 255)
        elif op == 2:
            data[pos:pos] = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 16))
        elif op == 3:
            del data[pos : pos + fdp.ConsumeIntInRange(1, 16)]
        elif op == 4:
            del data[pos:]
        else:
            data += fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 64))
    return bytes(data)


def _collect(receiver: Receiver, buf: bytearray) -> int:
    completed = 0
    for event in receiver.pop_events():
        if isinstance(event, BlockDecoded):
            buf[event.offset : event.offset + len(event.data)] = event.data
        elif isinstance(event, ObjectCompleted):
            completed += 1
    return completed


def TestOneInput(data: bytes) -> None:  # atheris looks for this name
    fdp = atheris.FuzzedDataProvider(data)
    buf = bytearray(len(DATA))
    receiver = Receiver(LINK, SIGN.public, KEM)
    receiver.receive_datagram(ANNOUNCE, NOW)
    for d in SEALED[:SPLIT]:
        receiver.receive_datagram(d, NOW)
    if _collect(receiver, buf):
        raise AssertionError("set-up completed the object early")
    inputs = []
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        if fdp.ConsumeBool():
            inputs.append(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 2000)))
        else:
            inputs.append(_mutate(fdp))
    for datagram in inputs:
        if datagram in GENUINE_SET:
            continue
        try:
            receiver.receive_datagram(datagram, NOW + 0.5)
        except WireError:
            pass
        events = receiver.pop_events()
        if events:
            raise AssertionError(f"fuzz input produced events: {events!r}")
    completed = 0
    for d in SEALED[SPLIT:]:
        receiver.receive_datagram(d, NOW + 1)
        completed += _collect(receiver, buf)
    if completed != 1 or bytes(buf) != DATA:
        raise AssertionError("the genuine transfer no longer rebuilds the object")


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
