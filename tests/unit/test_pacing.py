"""TokenBucket: exact long-run rate, burst bound, rate changes, with a fake clock."""

from __future__ import annotations

import math
import random

import pytest

from ferry.errors import UsageError
from ferry.wire.pacing import TokenBucket

RATE = 12_500_000.0  # 100 Mbit/s in bytes/s
BURST = 64 * 1024


def _simulate(
    bucket: TokenBucket,
    rng: random.Random,
    duration: float,
    *,
    oversleep: float = 0.0,
    start: float = 0.0,
) -> list[tuple[float, int]]:
    """Wait-then-send loop against a fake clock; returns (send time, bytes) pairs."""
    now = start
    sent: list[tuple[float, int]] = []
    while now < start + duration:
        n = rng.randint(40, 1500)
        wait = bucket.consume(n, now)
        if wait > 0.0:
            now += wait + rng.random() * oversleep
        sent.append((now, n))
    return sent


def _max_window_excess(sent: list[tuple[float, int]], rate: float) -> float:
    """max over windows [s_k, s_j] of (bytes sent in it) - rate * (s_j - s_k), in O(n)."""
    best = -math.inf
    prefix = 0  # bytes sent before index k
    max_start = -math.inf  # max over k <= j of rate * s_k - prefix_before_k
    for t, n in sent:
        max_start = max(max_start, rate * t - prefix)
        prefix += n
        best = max(best, prefix - rate * t + max_start)
    return best


def test_long_run_rate_is_exact_within_one_percent() -> None:
    rng = random.Random(1)
    bucket = TokenBucket(RATE, BURST)
    sent = _simulate(bucket, rng, 10.0)
    elapsed = sent[-1][0] - sent[0][0]
    total = sum(n for _, n in sent)
    assert elapsed == pytest.approx(10.0, rel=0.01)
    assert total / elapsed == pytest.approx(RATE, rel=0.01)


def test_oversleeping_is_absorbed_by_the_burst() -> None:
    # Real sleeps overshoot; up to 1 ms of oversleep refills 12.5 kB, which the 64 KiB burst holds.
    rng = random.Random(2)
    bucket = TokenBucket(RATE, BURST)
    sent = _simulate(bucket, rng, 10.0, oversleep=0.001)
    elapsed = sent[-1][0] - sent[0][0]
    assert sum(n for _, n in sent) / elapsed == pytest.approx(RATE, rel=0.01)


def test_burst_bound_holds_in_every_window() -> None:
    rng = random.Random(3)
    bucket = TokenBucket(RATE, BURST)
    sent = _simulate(bucket, rng, 2.0, oversleep=0.002)
    assert _max_window_excess(sent, RATE) <= BURST + 1e-3


def test_a_full_bucket_lets_exactly_burst_bytes_through_at_once() -> None:
    bucket = TokenBucket(1000.0, 5000)
    assert [bucket.consume(1000, 0.0) for _ in range(5)] == [0.0] * 5
    assert bucket.consume(1000, 0.0) == pytest.approx(1.0)
    # The debt is cumulative: the next caller waits longer.
    assert bucket.consume(500, 0.0) == pytest.approx(1.5)


def test_idle_time_refills_only_up_to_burst() -> None:
    bucket = TokenBucket(1000.0, 2000)
    bucket.consume(2000, 0.0)
    assert bucket.credit(100.0) == 2000.0
    assert bucket.consume(3000, 100.0) == pytest.approx(1.0)


def test_datagram_larger_than_burst_waits_for_the_difference() -> None:
    bucket = TokenBucket(1000.0, 1000)
    assert bucket.consume(3000, 0.0) == pytest.approx(2.0)
    assert bucket.credit(2.0) == pytest.approx(0.0)


def test_rate_change_applies_from_now_on() -> None:
    rng = random.Random(4)
    bucket = TokenBucket(RATE, BURST)
    first = _simulate(bucket, rng, 5.0)
    t_change = first[-1][0]
    bucket.set_rate(RATE / 4, t_change)
    second = _simulate(bucket, rng, 5.0, start=t_change)
    rate1 = sum(n for _, n in first) / (t_change - first[0][0])
    rate2 = sum(n for _, n in second[1:]) / (second[-1][0] - second[0][0])
    assert rate1 == pytest.approx(RATE, rel=0.01)
    assert rate2 == pytest.approx(RATE / 4, rel=0.01)
    assert bucket.rate == RATE / 4


def test_debt_is_repaid_at_the_new_rate() -> None:
    bucket = TokenBucket(1000.0, 1000)
    bucket.consume(3000, 0.0)  # 2000 bytes of debt
    bucket.set_rate(2000.0, 0.0)
    assert bucket.consume(0, 0.0) == pytest.approx(1.0)


def test_clock_stepping_backwards_does_not_mint_credit() -> None:
    bucket = TokenBucket(1000.0, 1000)
    bucket.consume(1000, 10.0)
    assert bucket.consume(500, 5.0) == pytest.approx(0.5)
    assert bucket.consume(0, 10.5) == pytest.approx(0.0)


def test_reset_forgets_debt() -> None:
    bucket = TokenBucket(1000.0, 1000)
    bucket.consume(10_000, 0.0)
    bucket.reset(1.0)
    assert bucket.consume(1000, 1.0) == 0.0


@pytest.mark.parametrize(
    ("rate", "burst"),
    [(0.0, 1), (-1.0, 1), (math.nan, 1), (math.inf, 1), (1.0, 0), (1.0, -5)],
)
def test_invalid_parameters_are_usage_errors(rate: float, burst: int) -> None:
    with pytest.raises(UsageError):
        TokenBucket(rate, burst)


def test_negative_consume_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        TokenBucket(1.0, 1).consume(-1, 0.0)
    with pytest.raises(UsageError):
        TokenBucket(1.0, 1).set_rate(0.0, 0.0)
