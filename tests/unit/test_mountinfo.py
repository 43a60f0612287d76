"""Which file system a drop folder is on (outside.watch.filesystem_type), and which are shares."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from outside.watch import filesystem_type, is_network_filesystem

# /proc/self/mountinfo lines: id parent major:minor root point options [tags] - type source super
MOUNTINFO = r"""22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:26 / /srv rw,relatime shared:5 - xfs /dev/sdb1 rw
31 30 0:50 / /srv/share rw,relatime - cifs //fileserver/clerks rw,vers=3.1.1
32 30 0:51 / /srv/share\040with\040spaces rw,relatime - nfs4 server:/export rw
33 22 0:52 / /mnt/box rw,nosuid - fuse.sshfs user@host:/drop rw
34 33 0:53 / /mnt/box rw,relatime - tmpfs tmpfs rw
35 22 0:54 / /mnt/ntfs rw - fuseblk /dev/sdc1 rw
garbage line without a separator
36 22 0:55 / /short
"""


@pytest.mark.parametrize(
    ("path", "fstype"),
    [
        ("/", "ext4"),
        ("/etc/passwd", "ext4"),
        ("/srv", "xfs"),
        ("/srv/shared/x", "xfs"),  # /srv/share is a mount, /srv/shared is not under it
        ("/srv/share", "cifs"),
        ("/srv/share/drop/documents", "cifs"),
        ("/srv/share with spaces/drop", "nfs4"),  # \040 in mountinfo is a space
        ("/mnt/box/drop", "tmpfs"),  # the later mount on the same point hides the earlier
        ("/mnt/ntfs", "fuseblk"),
        ("/short/x", "ext4"),  # a malformed line is skipped
    ],
)
def test_the_longest_mount_point_above_a_path_names_its_file_system(path: str, fstype: str) -> None:
    assert filesystem_type(path, MOUNTINFO) == fstype


def test_nothing_readable_is_unknown() -> None:
    assert filesystem_type("/srv", "") == ""
    assert filesystem_type("/srv", "no mounts at all\n") == ""


@pytest.mark.parametrize(
    ("fstype", "network"),
    [
        ("cifs", True),
        ("smb3", True),
        ("nfs", True),
        ("nfs4", True),
        ("9p", True),
        ("virtiofs", True),
        ("fuse", True),
        ("fuse.sshfs", True),
        ("fuse.rclone", True),
        ("fuseblk", False),  # ntfs-3g on a local disk: every write goes through this host
        ("ext4", False),
        ("xfs", False),
        ("tmpfs", False),
        ("", False),
    ],
)
def test_shares_are_told_from_local_file_systems(fstype: str, network: bool) -> None:
    assert is_network_filesystem(fstype) is network


@pytest.mark.skipif(shutil.which("findmnt") is None, reason="util-linux findmnt not installed")
@pytest.mark.parametrize("path", ["/", "/proc/self", "/dev/shm", "/sys/fs"])
def test_the_real_mount_table_agrees_with_findmnt(path: str, tmp_path: Path) -> None:
    """This machine's own /proc/self/mountinfo, with findmnt (util-linux) as the referee."""
    for target in (Path(path), tmp_path):
        expected = subprocess.run(
            ["findmnt", "-n", "-o", "FSTYPE", "-T", str(target)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert filesystem_type(target) == expected[-1]  # mounts stacked on one point: the top
