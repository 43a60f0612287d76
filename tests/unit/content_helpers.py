"""Helpers for the content tests: the pipeline's stages in-process, and hostile sanitizers
that the worker-isolation tests load into real worker processes."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from ferry.content.base import Context, FormatResult, Policy
from ferry.content.policy import SUPPORTED_TYPES, policy_from_config
from ferry.content.scan import Scanner
from outside.content.engine import Engine, Outcome


@lru_cache(maxsize=1)
def engine() -> Engine:
    return Engine(Scanner())


def policy(**content: Any) -> Policy:
    content.setdefault("types", list(SUPPORTED_TYPES))
    return policy_from_config(content)


def run(tmp: Path, data: bytes, name: str, pol: Policy | None = None) -> Outcome:
    """One file through every stage (no worker process)."""
    n = len(list(tmp.glob("src-*")))
    src = tmp / f"src-{n}"
    src.write_bytes(data)
    work = tmp / f"work-{n}"
    work.mkdir()
    return engine().run(pol or policy(), src, name, work)


def delivered(outcome: Outcome, original: bytes) -> bytes:
    assert outcome.kind != "reject", f"{outcome.reason}: {outcome.message}"
    return outcome.output.read_bytes() if outcome.output is not None else original


# ----------------------------------------------------------------------------- hostile filters
def crash(src: Path, dst: Path, ctx: Context) -> FormatResult:
    os.abort()


def loop(src: Path, dst: Path, ctx: Context) -> FormatResult:
    n = 0
    while True:  # burn CPU forever
        n += 1


def hog(src: Path, dst: Path, ctx: Context) -> FormatResult:
    blocks = []
    for _ in range(2048):  # 2 GiB in 1 MiB pieces, each touched
        blocks.append(bytearray(1024 * 1024))
    return FormatResult("txt", cleaned=False, info={"blocks": len(blocks)})


def raises(src: Path, dst: Path, ctx: Context) -> FormatResult:
    raise ValueError("a bug in a filter")


def escape(src: Path, dst: Path, ctx: Context) -> FormatResult:
    """Claims a cleaned output but writes a symlink to somewhere else."""
    os.symlink("/etc/passwd", dst)
    return FormatResult("txt", cleaned=True)


def big_write(src: Path, dst: Path, ctx: Context) -> FormatResult:
    with dst.open("wb") as fh:
        for _ in range(8192):
            fh.write(b"\0" * (1024 * 1024))
    return FormatResult("txt", cleaned=True)
