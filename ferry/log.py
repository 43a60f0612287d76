"""Operational logging (structlog): JSON lines when not a TTY, console when interactive.

The audit log is separate and never goes through here.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_LEVELS = logging.getLevelNamesMapping()
_level = logging.INFO


def enabled(level: str) -> bool:
    """Whether lines of ``level`` are written (skip building per-item lines that are not)."""
    return _LEVELS[level.upper()] >= _level


def configure(level: str = "info", *, json: bool | None = None, stream: Any = None) -> None:
    global _level  # noqa: PLW0603  # one process-wide setting, as structlog's own
    _level = _LEVELS[level.upper()]
    out = stream or sys.stderr
    if json is None:
        json = not out.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.dict_tracebacks,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_level),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


def get(name: str) -> Any:
    return structlog.get_logger(name)
