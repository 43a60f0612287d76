"""Shared by every unit test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from intake_helpers import Gateway

from outside.content.pipeline import ContentPipeline


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """``ferry.cli.main`` points the logs at the stream it was given (pytest's captured
    stderr, closed after the test): later tests that log must not write there."""
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="module")
def pipeline() -> Iterator[ContentPipeline]:
    """A real content pipeline (one worker process), shared by a module's tests."""
    p = ContentPipeline(workers=1)
    p.start()
    yield p
    p.close()


@pytest.fixture
def gateway(tmp_path: Path, pipeline: ContentPipeline) -> Iterator[Gateway]:
    """The outside's intake of a fresh deployment's ``documents`` channel, driven by hand."""
    g = Gateway(tmp_path / "d", pipeline)
    yield g
    g.close()
