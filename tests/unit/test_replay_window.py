"""ferry.wire.replay.ReplayWindow: which packet numbers could still be new."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ferry.wire.replay import ReplayWindow


def test_new_duplicate_and_too_old() -> None:
    w = ReplayWindow(size=16)
    assert w.check(5)
    w.accept(5)
    assert not w.check(5)  # a replay
    assert w.check(4)
    assert w.check(6)
    w.accept(30)
    assert not w.check(30)
    assert w.check(20)  # inside the window, never seen
    assert not w.check(14)  # 16 behind the highest: too old to tell, refused
    assert w.check(15)


def test_a_jump_far_past_the_window_forgets_the_past_at_once() -> None:
    w = ReplayWindow()
    for pn in range(100):
        w.accept(pn)
    w.accept(2**62)  # (no 2**62-bit integer is built)
    assert not w.check(2**62)
    assert w.check(2**62 - 1)
    assert not w.check(99)  # far behind the window now


@given(st.lists(st.integers(min_value=0, max_value=300), max_size=200))
def test_agrees_with_a_set_of_what_was_accepted(pns: list[int]) -> None:
    size = 64
    w = ReplayWindow(size=size)
    seen: set[int] = set()
    highest = -1
    for pn in pns:
        expected = pn > highest or (highest - pn < size and pn not in seen)
        assert w.check(pn) == expected, (pn, highest)
        if expected:
            w.accept(pn)
            seen.add(pn)
            highest = max(highest, pn)
