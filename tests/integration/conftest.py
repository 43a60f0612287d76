"""Fixtures for integration tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cli_helpers import Agent, Share


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[Callable[..., Agent]]:
    started: list[Agent] = []

    def start(side: str, config: str, *, clock_offset: float = 0.0) -> Agent:
        a = Agent(side, config, tmp_path / f"{side}-{len(started)}.log", clock_offset=clock_offset)
        started.append(a)
        return a

    yield start
    for a in started:
        a.stop()


@pytest.fixture
def small_audit_disk(tmp_path: Path):
    """Mount a tmpfs (2 MiB unless told); yield a function that moves a folder onto it."""
    mounts: list[Path] = []

    def mount(folder: str | Path, size: str = "2m") -> Path:
        folder = Path(folder)
        saved = tmp_path / f"saved-{len(mounts)}"
        shutil.copytree(folder, saved)
        for p in folder.iterdir():
            p.unlink()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(folder)],
            check=True,
        )
        mounts.append(folder)
        for p in saved.iterdir():
            shutil.copy2(p, folder / p.name)
        return folder

    yield mount
    for m in mounts:
        subprocess.run(["umount", "-l", str(m)], check=False)


@pytest.fixture
def network_share(tmp_path: Path) -> Iterator[Share]:
    """A real FUSE file system (bindfs) over a folder. Like an SMB or NFS share, inotify on
    the mount reports only what is written through it, not what the server side writes."""
    if shutil.which("bindfs") is None or not Path("/dev/fuse").exists():
        pytest.skip("bindfs (FUSE) is not installed")  # tasks.py installs it when root
    share = Share(tmp_path / "fileserver", tmp_path / "share")
    share.server.mkdir()
    share.mount.mkdir()
    subprocess.run(["bindfs", str(share.server), str(share.mount)], check=True)
    try:
        yield share
    finally:
        subprocess.run(["umount", "-l", str(share.mount)], check=False)


@pytest.fixture
def logged_share(tmp_path: Path) -> Iterator[tuple[Share, Path]]:
    """A bindfs share whose daemon writes each FUSE request it gets to a log (``-d``): what
    reaches the file server, as opposed to what the kernel keeps to itself."""
    if shutil.which("bindfs") is None or not Path("/dev/fuse").exists():
        pytest.skip("bindfs (FUSE) is not installed")  # tasks.py installs it when root
    share = Share(tmp_path / "fileserver", tmp_path / "share")
    share.server.mkdir()
    share.mount.mkdir()
    log = tmp_path / "fuse-requests.log"
    with log.open("wb") as out:
        daemon = subprocess.Popen(
            ["bindfs", "-d", str(share.server), str(share.mount)],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not os.path.ismount(share.mount):
            assert daemon.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        yield share, log
    finally:
        subprocess.run(["umount", "-l", str(share.mount)], check=False)
        daemon.wait(10)


@pytest.fixture
def exfat_volume(tmp_path: Path) -> Iterator[Path]:
    """A real exFAT file system (exfat-fuse on a loop device over an image file), as on a USB
    disk or a volume formatted for Windows: no hard links (EPERM), no O_TMPFILE, names that
    differ only in case are the same name."""
    tools = ("mkfs.exfat", "mount.exfat-fuse", "losetup")
    if os.geteuid() != 0 or not all(map(shutil.which, tools)) or not Path("/dev/fuse").exists():
        pytest.skip("exFAT tools (exfatprogs, exfat-fuse) or root missing")  # tasks.py: root
    image, mount = tmp_path / "exfat.img", tmp_path / "exfat"
    with image.open("wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.exfat", str(image)], check=True, capture_output=True)
    made = subprocess.run(
        ["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=False
    )
    if made.returncode != 0:
        pytest.skip(f"no loop device: {made.stderr.strip()}")
    loop = made.stdout.strip()
    mount.mkdir()
    try:
        subprocess.run(["mount.exfat-fuse", loop, str(mount)], check=True, capture_output=True)
        try:
            yield mount
        finally:
            subprocess.run(["umount", str(mount)], check=False)
    finally:
        subprocess.run(["losetup", "--detach", loop], check=False)
