"""Run ``ferry.cli`` with its wall clock moved: ``python shifted_clock.py SECONDS ARGS...``.

For tests of what days passing (or a clock set wrong) does to an agent: ``time.time`` and
``time.time_ns`` are moved by SECONDS; monotonic clocks are not."""

from __future__ import annotations

import runpy
import sys
import time

offset = float(sys.argv[1])
_wall, _wall_ns = time.time, time.time_ns
time.time = lambda: _wall() + offset
time.time_ns = lambda: _wall_ns() + int(offset * 1e9)
sys.argv = ["ferry.cli", *sys.argv[2:]]
runpy.run_module("ferry.cli", run_name="__main__", alter_sys=True)
