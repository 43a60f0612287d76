"""The visible corpus (every tests/corpus/gen_*.py) through ContentPipeline.process.

Pass rule: zero hostile deliveries, zero benign rejections, each reject with its expected
reason code, and each case's independent check passes on what is delivered.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from ferry.content.policy import SUPPORTED_TYPES, policy_from_config
from outside.content.pipeline import ContentPipeline
from tests.corpus.make_corpus import all_cases

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("FERRY_CORPUS_SEED", "20241121"))


@pytest.fixture(scope="module")
def pipeline() -> Iterator[ContentPipeline]:
    structlog.reset_defaults()  # an earlier CLI test may have left logs on a closed stream
    with ContentPipeline(workers=2) as p:
        yield p


def test_corpus_pass_rule(pipeline: ContentPipeline, tmp_path: Path) -> None:
    failures: list[str] = []
    refused_instead: list[str] = []
    cases = all_cases(SEED)
    assert cases, "no corpus cases generated"
    for i, case in enumerate(cases):
        src = tmp_path / f"in-{i}"
        src.write_bytes(case.data)
        policy = policy_from_config(case.policy or {"types": list(SUPPORTED_TYPES)})
        verdict = pipeline.process(policy, src, case.name, tmp_path / f"work-{i}")
        label = f"[{case.klass}] {case.name!r}"
        got = f"{verdict.kind}:{verdict.reason}" if verdict.reason else verdict.kind
        if case.expect == "deliver":
            if verdict.kind == "reject":
                failures.append(f"{label}: benign file rejected: {got} {verdict.message}")
                continue
        elif case.expect == "clean":
            if verdict.kind == "reject":
                # Refusing a hostile file is safe (no hostile delivery): the pass rule holds.
                refused_instead.append(f"{label}: {got} {verdict.message}")
                continue
            if verdict.kind != "deliver_cleaned":
                failures.append(f"{label}: HOSTILE FILE DELIVERED AS-IS")
                continue
        else:
            if verdict.kind != "reject":
                failures.append(f"{label}: HOSTILE FILE DELIVERED ({got}), expected {case.expect}")
            elif verdict.reason != case.reason:
                failures.append(
                    f"{label}: rejected {verdict.reason} ({verdict.message}), "
                    f"expected {case.reason}"
                )
            continue
        delivered = verdict.output.read_bytes() if verdict.output else case.data
        if case.check is not None:
            try:
                case.check(case.data, delivered)
            except AssertionError as exc:
                failures.append(f"{label}: check failed: {exc}")
    if refused_instead:
        print("hostile files expected cleaned but refused:\n" + "\n".join(refused_instead))
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)
