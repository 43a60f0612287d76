"""The `attempt` an UPLOAD may carry (echoed in its first CREDIT) comes from the client:
anything but a small positive integer is ignored, never echoed or trusted."""

from __future__ import annotations

from typing import Any

import pytest

from outside.api import _attempt


@pytest.mark.parametrize(
    "garbage", [None, "1", 1.0, True, 0, -1, 1000, 2**70, [1], {"a": 1}, b"\x01"]
)
def test_anything_but_a_small_positive_integer_is_ignored(garbage: Any) -> None:
    assert _attempt({"attempt": garbage}) == {}


def test_a_small_positive_integer_is_echoed() -> None:
    assert _attempt({"attempt": 2}) == {"attempt": 2}
    assert _attempt({}) == {}
