"""The drop-folder watcher with many files tracked when clerks create many subfolders at once.

Each new subfolder is scanned, and the watcher then forgets tracked entries below it that
vanished. That used to walk every tracked entry once per new folder (20,000 files and 400 new
folders: one poll of about 31 s, during which no file was taken); the scans of one poll are
now pruned together, in one pass.

    .venv/bin/python bench/watch_folders.py [--files 20000] [--folders 400]

Real files in a temporary folder, the real watchdog observer (inotify).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import structlog

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from outside.watch import DropWatcher, WatchSpec  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--folders", type=int, default=400)
    args = ap.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        drop = Path(tmp) / "drop"
        drop.mkdir()
        for i in range(args.files):
            (drop / f"f{i}.txt").write_bytes(b"x")
        watcher = DropWatcher([WatchSpec("c", drop, recursive=True, settle_seconds=3600)])
        watcher.start()
        try:
            t = time.monotonic()
            watcher.poll(0)
            first = time.monotonic() - t
            for i in range(args.folders):
                (drop / f"d{i}").mkdir()
            time.sleep(0.5)  # (the observer's events reach the watcher)
            t = time.monotonic()
            watcher.poll(0)
            then = time.monotonic() - t
        finally:
            watcher.stop()
    print(f"{args.files} files tracked: first scan {first:.2f} s")
    print(f"{args.folders} new folders: the poll that took them in {then:.2f} s")


if __name__ == "__main__":
    main()
