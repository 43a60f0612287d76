"""LossyLink: each impairment at its configured rate, bursts consecutive, exact accounting."""

from __future__ import annotations

import random
import struct
from collections import Counter

import pytest

from ferry.channels.base import DatagramReceiver, DatagramSender
from ferry.channels.memory import LossyLink, MemoryReceiver, MemorySender
from ferry.errors import ChannelError, UsageError

N = 100_000
SEQ = struct.Struct(">I")


def _run(link: LossyLink, n: int = N) -> list[int]:
    """Send n sequence-numbered datagrams; return the sequence numbers that arrived."""
    for i in range(n):
        link.send(SEQ.pack(i))
    link.flush()
    return [SEQ.unpack(d)[0] for d in link.deliver()]


def _rate(count: int, expected: float, n: int = N) -> None:
    # 100k trials: the binomial std dev is < 0.0016 for any p; 0.006 is > 3.5 sigma.
    assert count / n == pytest.approx(expected, abs=0.006)


def _accounting_holds(link: LossyLink) -> None:
    c = link.counters
    assert c.delivered == (
        c.sent - c.dropped - c.burst_dropped + c.duplicated + c.replayed - link.held
    )


def test_perfect_link_delivers_everything_in_order() -> None:
    link = LossyLink(seed=0)
    assert _run(link, 1000) == list(range(1000))
    assert link.counters.delivered == link.counters.sent == 1000


def test_random_drop_rate() -> None:
    link = LossyLink(seed=1, drop=0.05)
    got = _run(link)
    _rate(link.counters.dropped, 0.05)
    assert len(got) == N - link.counters.dropped
    assert got == sorted(got)
    _accounting_holds(link)


def test_bursts_are_consecutive_runs_of_burst_len() -> None:
    p, length = 0.01, 20
    link = LossyLink(seed=2, burst_every=p, burst_len=length)
    got = set(_run(link))
    runs: list[int] = []
    run = 0
    for i in range(N):
        if i in got:
            if run:
                runs.append(run)
            run = 0
        else:
            run += 1
    # Bursts can start right after one another, so a run is a whole number of bursts;
    # only a burst cut off by the end of the test may be shorter.
    assert all(r % length == 0 for r in runs)
    assert link.counters.burst_dropped == sum(runs) + run
    assert link.counters.dropped == 0
    # Renewal process: lost fraction = pL / (pL + 1 - p) ~ 0.168, ~840 bursts with sd ~24 (3%).
    expected = p * length / (p * length + 1 - p)
    assert link.counters.burst_dropped / N == pytest.approx(expected, rel=0.12)
    _accounting_holds(link)


def test_duplicates() -> None:
    link = LossyLink(seed=3, duplicate=0.02)
    got = _run(link)
    twice = [seq for seq, k in Counter(got).items() if k == 2]
    assert len(twice) == link.counters.duplicated
    assert max(Counter(got).values()) == 2
    _rate(link.counters.duplicated, 0.02)
    _accounting_holds(link)


def test_reorder_holds_back_within_depth() -> None:
    depth = 16
    link = LossyLink(seed=4, reorder=0.05, reorder_depth=depth)
    got = _run(link)
    assert sorted(got) == list(range(N))
    late = 0
    highest = -1
    for seq in got:
        if seq < highest:
            late += 1
            assert highest - seq <= depth
        highest = max(highest, seq)
    _rate(link.counters.reordered, 0.05)
    # Only held-back datagrams can arrive after a later one; almost all of them do.
    assert 0.95 * link.counters.reordered <= late <= link.counters.reordered
    _accounting_holds(link)


def test_corruption_flips_exactly_one_bit() -> None:
    rng = random.Random(5)
    sent = [rng.randbytes(rng.randint(1, 64)) for _ in range(N)]
    link = LossyLink(seed=5, corrupt=0.01)
    for d in sent:
        link.send(d)
    got = link.deliver()
    assert len(got) == N
    flipped = 0
    for a, b in zip(sent, got, strict=True):
        distance = sum(bin(x ^ y).count("1") for x, y in zip(a, b, strict=True))
        assert distance in (0, 1)
        flipped += distance
    assert flipped == link.counters.corrupted
    _rate(flipped, 0.01)


def test_replay_reinjects_old_datagrams() -> None:
    link = LossyLink(seed=6, replay=0.01)
    got = _run(link)
    highest = -1
    replays: list[int] = []  # age of each replayed datagram, in datagrams
    for seq in got:
        if seq <= highest:
            replays.append(highest + 1 - seq)
        else:
            assert seq == highest + 1
            highest = seq
    assert len(replays) == link.counters.replayed
    _rate(len(replays), 0.01)
    assert max(replays) > N // 2  # "possibly much older"
    _accounting_holds(link)


def test_accounting_with_every_impairment_at_once() -> None:
    link = LossyLink(
        seed=7,
        drop=0.03,
        burst_every=0.0005,
        burst_len=50,
        duplicate=0.02,
        reorder=0.1,
        reorder_depth=8,
        corrupt=0.01,
        replay=0.005,
    )
    for i in range(20_000):
        link.send(SEQ.pack(i))
        if i % 1000 == 0:
            _accounting_holds(link)
    link.flush()
    assert link.held == 0
    assert len(link.deliver()) == link.counters.delivered
    _accounting_holds(link)


def _impaired(seed: int) -> list[bytes]:
    link = LossyLink(
        seed=seed,
        drop=0.05,
        burst_every=0.001,
        duplicate=0.05,
        reorder=0.05,
        corrupt=0.05,
        replay=0.05,
    )
    for i in range(5000):
        link.send(SEQ.pack(i) * 4)
    link.flush()
    return link.deliver()


def test_same_seed_same_output() -> None:
    assert _impaired(42) == _impaired(42)
    assert _impaired(42) != _impaired(43)


def test_impairments_use_independent_streams() -> None:
    # Turning duplication on does not change which datagrams are dropped.
    a = _run(LossyLink(seed=8, drop=0.1), 5000)
    link = LossyLink(seed=8, drop=0.1, duplicate=0.1)
    b = sorted(set(_run(link, 5000)))
    assert a == b


@pytest.mark.parametrize(
    "kwargs",
    [
        {"drop": -0.1},
        {"drop": 1.5},
        {"replay": float("nan")},
        {"burst_len": 0},
        {"reorder_depth": 0},
    ],
)
def test_invalid_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(UsageError):
        LossyLink(seed=0, **kwargs)  # type: ignore[arg-type]


def test_adapters_implement_the_channel_protocols() -> None:
    link = LossyLink(seed=9)
    sender: DatagramSender = MemorySender(link)
    receiver: DatagramReceiver = MemoryReceiver(link)
    assert sender.wire_size(1400) == 1400
    sender.send(b"abc")
    sender.send(b"de")
    assert receiver.recv_batch(0.1) == [b"abc", b"de"]
    assert receiver.recv_batch(0.1) == []
    assert (receiver.stats.datagrams, receiver.stats.bytes) == (2, 5)
    sender.close()
    with pytest.raises(ChannelError):
        sender.send(b"x")
    receiver.close()
    assert receiver.recv_batch(0.0) == []
