"""Process plumbing shared by the agents (ferry.runtime)."""

from __future__ import annotations

import gc

from ferry import runtime


def test_settle_gc_freezes_what_survived_start_up_and_collects_young_objects_less_often() -> None:
    threshold = gc.get_threshold()
    survivor = [object() for _ in range(1000)]  # (kept alive: frozen, not collected)
    try:
        gc.unfreeze()  # (an agent run in-process by an earlier test may have settled it)
        gc.set_threshold(700, threshold[1], threshold[2])
        assert gc.get_freeze_count() == 0
        runtime.settle_gc()
        assert gc.get_freeze_count() >= len(survivor)
        assert gc.get_threshold()[0] == runtime.GC_YOUNG_THRESHOLD > 700
        assert gc.get_threshold()[1:] == threshold[1:]
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
