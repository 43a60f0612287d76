"""DropWatcher with real watchdog observers on tmp folders."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

import pytest
from cli_helpers import Share
from structlog.testing import capture_logs
from watchdog.observers.api import BaseObserver, EventEmitter

from ferry.errors import UsageError
from outside.watch import (
    MAX_DEPTH,
    NETWORK_RESCAN_SECONDS,
    DropWatcher,
    Ready,
    Refused,
    WatchSpec,
    is_network_filesystem,
)

pytestmark = pytest.mark.integration

SETTLE = 0.2

Make = Callable[..., DropWatcher]
Seen = tuple[list[Ready], list[Refused]]


@pytest.fixture
def make() -> Iterator[Make]:
    started: list[DropWatcher] = []

    def start(*specs: WatchSpec, **kwargs: object) -> DropWatcher:
        w = DropWatcher(specs, **kwargs)  # type: ignore[arg-type]
        w.start()
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


def collect(
    w: DropWatcher,
    seconds: float,
    until: Callable[[list[Ready], list[Refused]], bool] | None = None,
) -> Seen:
    """Poll for up to ``seconds``; stop early once ``until`` holds."""
    ready: list[Ready] = []
    refused: list[Refused] = []
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        r, f = w.poll(min(left, 0.05))
        ready += r
        refused += f
        if until is not None and until(ready, refused):
            break
    return ready, refused


def names(items: list[Ready] | list[Refused]) -> list[str]:
    return sorted(str(i.relpath) for i in items)


def has(n: int) -> Callable[[list[Ready], list[Refused]], bool]:
    return lambda ready, _refused: len(ready) >= n


class _DeafEmitter(EventEmitter):
    def queue_events(self, timeout: float) -> None:
        time.sleep(timeout)  # hears nothing: every event is "lost"


class DeafObserver(BaseObserver):
    """A real watchdog observer whose emitters never report an event."""

    def __init__(self) -> None:
        super().__init__(_DeafEmitter, timeout=0.05)


def test_files_present_at_start_are_reported_once(tmp_path: Path, make: Make) -> None:
    (tmp_path / "a.txt").write_bytes(b"12345")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "inner.txt").write_bytes(b"x")  # flat: subfolders are ignored
    w = make(WatchSpec("c", tmp_path, settle_seconds=SETTLE), rescan_interval=0.2)
    ready, refused = collect(w, 1.0, has(1))
    more, _ = collect(w, 0.4)  # a couple of rescans later: still once
    ready += more
    assert [(r.relpath, r.size, r.channel) for r in ready] == [(PurePosixPath("a.txt"), 5, "c")]
    assert ready[0].path == tmp_path / "a.txt"
    assert refused == []


def test_slow_writer_is_reported_once_complete(tmp_path: Path, make: Make) -> None:
    settle = 0.5  # five times the pause between chunks: margin for a loaded machine
    w = make(WatchSpec("c", tmp_path, settle_seconds=settle))
    chunks = [os.urandom(1000) for _ in range(4)]
    finished = threading.Event()

    def writer() -> None:
        with open(tmp_path / "slow.bin", "wb") as f:  # one open: no close event until the end
            for chunk in chunks:
                f.write(chunk)
                f.flush()
                time.sleep(0.1)  # shorter than settle
        finished.set()

    t = threading.Thread(target=writer)
    t.start()
    ready, _ = collect(w, 2.0, lambda r, _f: finished.is_set() and bool(r))
    more, _ = collect(w, settle + 0.1)
    ready += more
    t.join()
    assert finished.is_set()
    assert len(ready) == 1
    assert ready[0].size == sum(map(len, chunks)) == (tmp_path / "slow.bin").stat().st_size


def test_writer_keeping_the_file_open_settles(tmp_path: Path, make: Make) -> None:
    w = make(WatchSpec("c", tmp_path, settle_seconds=SETTLE))
    collect(w, 0.1)
    with open(tmp_path / "open.bin", "wb") as f:
        f.write(b"data")
        f.flush()
        written = time.monotonic()
        ready, _ = collect(w, 2.0, has(1))
        reported = time.monotonic()
        assert [r.size for r in ready] == [4]
        assert reported - written >= SETTLE * 0.9  # by the settle rule: no close was seen yet
    again, _ = collect(w, 0.4)  # the close changes nothing: not reported twice
    assert again == []


def test_close_and_rename_into_place_are_quick(tmp_path: Path, make: Make) -> None:
    drop, staging = tmp_path / "drop", tmp_path / "staging"
    drop.mkdir()
    staging.mkdir()
    w = make(WatchSpec("c", drop, settle_seconds=3.0))
    collect(w, 0.1)
    cases: list[tuple[str, Callable[[], object]]] = [
        ("closed.txt", lambda: (drop / "closed.txt").write_bytes(b"a" * 10)),
        ("renamed.pdf", lambda: os.rename(drop / "renamed.pdf.part", drop / "renamed.pdf")),
        ("moved_in.pdf", lambda: os.rename(staging / "moved_in.pdf", drop / "moved_in.pdf")),
    ]
    (drop / "renamed.pdf.part").write_bytes(b"b" * 20)
    (staging / "moved_in.pdf").write_bytes(b"c" * 30)
    for name, act in cases:
        t0 = time.monotonic()
        act()
        ready, _ = collect(w, 2.0, has(1))
        assert names(ready) == [name]
        assert time.monotonic() - t0 < 1.0  # well under settle_seconds


def test_ignored_names_are_never_reported(tmp_path: Path, make: Make) -> None:
    junk = [".hidden", "~$report.docx", "a.part", "b.TMP", "c.crdownload", "d.partial"]
    junk += ["e.swp", "f.txt~"]
    for n in junk[:4]:
        (tmp_path / n).write_bytes(b"early")
    w = make(WatchSpec("c", tmp_path, settle_seconds=SETTLE), rescan_interval=0.2)
    for n in junk[4:]:
        (tmp_path / n).write_bytes(b"late")
    (tmp_path / "ok.txt").write_bytes(b"ok")
    ready, refused = collect(w, 1.0, has(1))
    more, refused2 = collect(w, 0.4)  # rescans too
    ready += more
    refused += refused2
    assert names(ready) == ["ok.txt"]
    assert refused == []


def test_symlinks_and_fifos_are_refused_once_never_followed(tmp_path: Path, make: Make) -> None:
    drop, secret = tmp_path / "drop", tmp_path / "secret"
    drop.mkdir()
    secret.mkdir()
    (secret / "passwords.txt").write_bytes(b"hunter2")
    os.symlink(secret / "passwords.txt", drop / "early-link.txt")
    os.mkfifo(drop / "early-fifo")
    w = make(WatchSpec("c", drop, recursive=True, settle_seconds=SETTLE), rescan_interval=0.2)
    ready, refused = collect(w, 0.3)  # the initial scan
    os.symlink(secret / "passwords.txt", drop / "late-link.txt")
    os.symlink(secret, drop / "dir-link")
    os.mkfifo(drop / "late-fifo")
    ready2, refused2 = collect(w, 0.5)  # events, then rescans
    ready += ready2
    refused += refused2
    assert ready == []
    got = {str(r.relpath): r.reason for r in refused}
    assert len(refused) == len(got) == 5  # each reported exactly once
    assert got.keys() == {"early-link.txt", "late-link.txt", "dir-link", "early-fifo", "late-fifo"}
    assert "symbolic link" in got["dir-link"]
    assert "FIFO" in got["late-fifo"]


def test_recursive_and_flat(tmp_path: Path, make: Make) -> None:
    flat, deep = tmp_path / "flat", tmp_path / "deep"
    for root in (flat, deep):
        (root / "sub" / "deeper").mkdir(parents=True)
        (root / ".git").mkdir()
        (root / "top.txt").write_bytes(b"t")
        (root / "sub" / "a.txt").write_bytes(b"a")
        (root / "sub" / "deeper" / "b.txt").write_bytes(b"b")
        (root / ".git" / "c.txt").write_bytes(b"c")
    w = make(
        WatchSpec("flat", flat, settle_seconds=SETTLE),
        WatchSpec("deep", deep, recursive=True, settle_seconds=SETTLE),
    )
    for root in (flat, deep):
        (root / "new" / "x").mkdir(parents=True)  # after start: found through events
        (root / "new" / "x" / "d.txt").write_bytes(b"d")
    ready, refused = collect(w, 1.5, has(5))
    more, refused2 = collect(w, 0.3)
    ready += more
    refused += refused2
    by_channel = {c: names([r for r in ready if r.channel == c]) for c in ("flat", "deep")}
    assert by_channel["flat"] == ["top.txt"]
    assert by_channel["deep"] == ["new/x/d.txt", "sub/a.txt", "sub/deeper/b.txt", "top.txt"]
    assert refused == []


def test_depth_limit(tmp_path: Path, make: Make) -> None:
    ok_dir = tmp_path.joinpath(*(f"d{i}" for i in range(MAX_DEPTH)))
    too_deep = ok_dir / "deeper" / "deepest"
    too_deep.mkdir(parents=True)
    (ok_dir / "ok.txt").write_bytes(b"ok")
    (too_deep / "no.txt").write_bytes(b"no")
    w = make(WatchSpec("c", tmp_path, recursive=True, settle_seconds=SETTLE))
    ready, refused = collect(w, 1.0, lambda r, f: bool(r and f))
    assert [len(r.relpath.parts) for r in ready] == [MAX_DEPTH + 1]
    assert [r.relpath.name for r in refused] == ["deeper"]
    (too_deep / "late.txt").write_bytes(b"late")  # events from below the limit: nothing new
    ready, refused = collect(w, 0.4)
    assert ready == [] == refused


def test_a_folder_path_too_long_to_travel_is_refused_once(tmp_path: Path, make: Make) -> None:
    """Folders of 255-byte names nested 16 deep make paths longer than PATH_MAX, where no
    file can be opened by name: the files there were neither taken nor refused, and no one
    was told. The first folder whose path below the drop folder passes what a manifest
    carries (1,024 bytes) is refused, once, so the clerk gets a note."""
    fd = os.open(tmp_path, os.O_RDONLY)
    for _ in range(MAX_DEPTH):
        os.mkdir("d" * 255, dir_fd=fd)
        inner = os.open("d" * 255, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = inner
    os.close(os.open("report.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    os.close(fd)
    (tmp_path / "ok.txt").write_bytes(b"ok")
    w = make(WatchSpec("c", tmp_path, recursive=True, settle_seconds=SETTLE))
    ready, refused = collect(w, 1.0, lambda r, f: bool(r and f))
    assert names(ready) == ["ok.txt"]
    assert [len(r.relpath.parts) for r in refused] == [5]  # (4 x 256 bytes = 1,024: fits)
    assert refused[0].reason == "folder path longer than 1024 bytes"
    ready, refused = collect(w, 0.4)
    assert ready == [] == refused  # (once)
    inside = tmp_path.joinpath(*["d" * 255] * 5)  # what comes later below it: nothing new
    (inside / "late.txt").write_bytes(b"late")
    (inside / "more").mkdir()
    (inside / "more" / "deeper.txt").write_bytes(b"deeper")
    ready, refused = collect(w, 0.6)
    assert ready == [] == refused


def test_pause_and_resume(tmp_path: Path, make: Make) -> None:
    w = make(WatchSpec("c", tmp_path, settle_seconds=SETTLE))
    collect(w, 0.1)
    w.pause("c")
    (tmp_path / "held.txt").write_bytes(b"h")
    os.mkfifo(tmp_path / "fifo")
    ready, refused = collect(w, 3 * SETTLE)
    assert ready == [] == refused
    t0 = time.monotonic()
    w.resume("c")
    ready, refused = collect(w, 1.0, lambda r, f: bool(r and f))
    assert time.monotonic() - t0 < 0.5
    assert names(ready) == ["held.txt"]
    assert names(refused) == ["fifo"]


def test_done_and_changes(tmp_path: Path, make: Make) -> None:
    drop, sent = tmp_path / "drop", tmp_path / "sent"
    drop.mkdir()
    sent.mkdir()
    w = make(WatchSpec("c", drop, settle_seconds=SETTLE), rescan_interval=0.2)
    (drop / "a.txt").write_bytes(b"first")
    first, _ = collect(w, 1.0, has(1))
    assert [r.size for r in first] == [5]
    assert collect(w, 0.3)[0] == []  # unchanged, rescanned: not reported again

    os.rename(first[0].path, sent / "a.txt")  # what intake does
    w.done(first[0].path)
    (drop / "a.txt").write_bytes(b"second!")
    second, _ = collect(w, 1.0, has(1))
    assert [(r.relpath.name, r.size) for r in second] == [("a.txt", 7)]

    with open(drop / "a.txt", "ab") as f:  # changed after the report, done() not called
        f.write(b" and more")
    third, _ = collect(w, 1.0, has(1))
    assert [r.size for r in third] == [16]


def test_drop_folder_deleted_and_recreated(tmp_path: Path, make: Make) -> None:
    drop = tmp_path / "drop"
    with capture_logs() as logs:
        w = make(WatchSpec("c", drop, settle_seconds=SETTLE), folder_retry=0.2)  # missing
        collect(w, 0.5)  # several retries
        drop.mkdir()
        (drop / "one.txt").write_bytes(b"1")
        first, _ = collect(w, 1.5, has(1))
        shutil.rmtree(drop)
        collect(w, 0.2)
        drop.mkdir()
        (drop / "two.txt").write_bytes(b"2")
        second, _ = collect(w, 1.5, has(1))
    assert names(first) == ["one.txt"]
    assert names(second) == ["two.txt"]
    events = [e["event"] for e in logs if e["event"].startswith("drop_folder")]
    # Several retries each time the folder is missing, but one message per absence.
    assert events == [
        "drop_folder_unavailable",
        "drop_folder_watched",
        "drop_folder_lost",
        "drop_folder_unavailable",
        "drop_folder_watched",
    ]


def test_drop_folder_moved_away_and_replaced(tmp_path: Path, make: Make) -> None:
    drop, old = tmp_path / "drop", tmp_path / "old"
    drop.mkdir()
    w = make(WatchSpec("c", drop, settle_seconds=SETTLE), rescan_interval=0.2, folder_retry=0.2)
    collect(w, 0.1)
    with capture_logs() as logs:
        os.rename(drop, old)  # no event for the watched folder itself: the rescan notices
        drop.mkdir()
        (drop / "new.txt").write_bytes(b"n")
        (old / "stale.txt").write_bytes(b"s")
        ready, _ = collect(w, 1.5, has(1))
        more, _ = collect(w, 0.3)
    assert names(ready + more) == ["new.txt"]
    assert all(r.path.parent == drop for r in ready)
    lost = [e for e in logs if e["event"] == "drop_folder_lost"]
    assert [e["why"] for e in lost] == ["replaced"]
    assert [e["event"] for e in logs].count("drop_folder_watched") == 1


@pytest.mark.parametrize(("rescan", "found"), [(0.2, True), (60.0, False)])
def test_rescan_finds_files_whose_events_were_lost(
    tmp_path: Path, make: Make, rescan: float, found: bool
) -> None:
    w = make(
        WatchSpec("c", tmp_path, settle_seconds=SETTLE),
        rescan_interval=rescan,
        observer_factory=DeafObserver,
    )
    collect(w, 0.1)  # the initial scan is done: only a rescan can see what comes next
    (tmp_path / "missed.txt").write_bytes(b"m")
    # Found within rescan + settle; not within 0.6 s when the next rescan is a minute away.
    ready, _ = collect(w, 1.0 if found else 0.6, has(1))
    assert names(ready) == (["missed.txt"] if found else [])


def test_tracking_is_bounded(tmp_path: Path, make: Make) -> None:
    drop, sent = tmp_path / "drop", tmp_path / "sent"
    drop.mkdir()
    sent.mkdir()
    for i in range(4):
        (drop / f"{i}.txt").write_bytes(b"x")
    with capture_logs() as logs:
        w = make(WatchSpec("c", drop, settle_seconds=SETTLE), rescan_interval=0.2, max_tracked=2)
        first, _ = collect(w, 1.0, has(2))
        more, _ = collect(w, 0.3)  # a rescan: still nothing beyond the cap
        assert len(first) == 2
        assert more == []
        for r in first:
            os.rename(r.path, sent / r.path.name)
            w.done(r.path)
        second, _ = collect(w, 1.0, has(2))
    assert sorted(names(first) + names(second)) == ["0.txt", "1.txt", "2.txt", "3.txt"]
    assert "watch_tracking_full" in [e["event"] for e in logs]


def test_each_channel_rescans_on_its_own_schedule(tmp_path: Path, make: Make) -> None:
    fast, slow = tmp_path / "fast", tmp_path / "slow"
    fast.mkdir()
    slow.mkdir()
    w = make(
        WatchSpec("fast", fast, settle_seconds=SETTLE, rescan_seconds=0.2),
        WatchSpec("slow", slow, settle_seconds=SETTLE),  # the watcher's 60 s
        rescan_interval=60,
        observer_factory=DeafObserver,  # no events: only scans find files
    )
    collect(w, 0.1)  # the initial scan of both
    (fast / "f.txt").write_bytes(b"f")
    (slow / "s.txt").write_bytes(b"s")
    ready, _ = collect(w, 1.5)
    assert [(r.channel, str(r.relpath)) for r in ready] == [("fast", "f.txt")]


def test_zero_rescan_seconds_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="rescan_seconds must be positive"):
        DropWatcher([WatchSpec("c", tmp_path, rescan_seconds=0)])


def test_a_share_is_found_and_rescanned_often_by_default(network_share: Share, make: Make) -> None:
    """Files the file server writes raise no inotify event on the share's mount; the scan
    every NETWORK_RESCAN_SECONDS finds them."""
    with capture_logs() as logs:
        w = make(WatchSpec("c", network_share.mount, settle_seconds=SETTLE))  # real inotify
        collect(w, 0.3)  # attached and scanned once
        (network_share.server / "from-a-clerk.txt").write_bytes(b"written on the server")
        started = time.monotonic()
        ready, _ = collect(w, NETWORK_RESCAN_SECONDS + 3, has(1))
    took = time.monotonic() - started
    assert names(ready) == ["from-a-clerk.txt"]
    assert took < NETWORK_RESCAN_SECONDS + 2, took
    (watched,) = [e for e in logs if e["event"] == "drop_folder_watched"]
    assert is_network_filesystem(watched["filesystem"]), watched
    assert watched["rescan_seconds"] == NETWORK_RESCAN_SECONDS
    assert "drop_folder_network_rescan_slow" not in [e["event"] for e in logs]


def test_inotify_alone_misses_what_the_server_writes(network_share: Share, make: Make) -> None:
    """The control for the test above: with scans a minute apart, nothing is found, though
    the file is there to list; and the slow setting is flagged in the log."""
    with capture_logs() as logs:
        w = make(WatchSpec("c", network_share.mount, settle_seconds=SETTLE, rescan_seconds=60))
        collect(w, 0.3)
        (network_share.server / "unseen.txt").write_bytes(b"x")
        ready, _ = collect(w, NETWORK_RESCAN_SECONDS + 1.5)
    assert ready == []
    assert (network_share.mount / "unseen.txt").exists()
    (slow,) = [e for e in logs if e["event"] == "drop_folder_network_rescan_slow"]
    assert slow["rescan_seconds"] == 60
    # written through the mount (this host), it is an event as usual
    (network_share.mount / "local.txt").write_bytes(b"y")
    ready, _ = collect(w, 2.0, has(1))
    assert names(ready) == ["local.txt"]
