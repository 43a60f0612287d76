"""Fixtures for integration tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cli_helpers import Agent


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[Callable[[str, str], Agent]]:
    started: list[Agent] = []

    def start(side: str, config: str) -> Agent:
        a = Agent(side, config, tmp_path / f"{side}-{len(started)}.log")
        started.append(a)
        return a

    yield start
    for a in started:
        a.stop()
