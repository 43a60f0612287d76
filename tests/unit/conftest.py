"""Shared by every unit test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """``ferry.cli.main`` points the logs at the stream it was given (pytest's captured
    stderr, closed after the test): later tests that log must not write there."""
    yield
    structlog.reset_defaults()
