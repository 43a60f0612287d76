"""What ferry puts in folders people read (delivery folders inside; ``sent`` and quarantine
outside) has that folder's permissions, whatever the agent's umask: the systemd unit's
0077 made every delivered file and every reason file 0600, owned by the agent's group, so
neither the inner users nor the clerks could read them however the operator had set up the
folders. Real files, a real setgid folder of a real group; the agent's umask 0077."""

from __future__ import annotations

import grp
import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from ferry import place
from ferry.place import pinned_folder, share_like_folder, shared_mode
from inside.deliver import link_under_free_name, write_new_files
from outside.quarantine import Quarantine

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown to a group)")

GROUP = grp.getgrnam("users").gr_gid  # (Debian's: gid 100; root is not a member)
NOBODY = 65534
ROOT = str(Path(__file__).resolve().parents[2])


@pytest.fixture(autouse=True)
def umask_0077() -> Iterator[None]:
    old = os.umask(0o077)
    yield
    os.umask(old)


def _folder(path: Path, mode: int) -> Path:
    path.mkdir(parents=True)
    os.chown(path, 0, GROUP)
    os.chmod(path, mode)
    return path


def _perm(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return stat.S_IMODE(st.st_mode), st.st_gid


def test_modes_follow_the_folder_but_never_open_to_others() -> None:
    assert shared_mode(0o42750) == 0o640
    assert shared_mode(0o42770) == 0o660
    assert shared_mode(0o40755) == 0o640  # (nothing for others, even from a folder open to all)
    assert shared_mode(0o40700) == 0o600
    assert shared_mode(0o40500) == 0o600  # (the owner keeps read and write)
    assert shared_mode(0o42770, directory=True) == 0o2770
    assert shared_mode(0o41777, directory=True) == 0o1770
    assert shared_mode(0o40755, directory=True) == 0o750


def test_message_files_take_the_delivery_folders_permissions(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "messages", 0o2750)
    items = [(f"m{i}.json", b'{"n":%d}' % i, hashlib.sha256(b'{"n":%d}' % i).digest())
             for i in range(3)]  # fmt: skip
    paths = write_new_files(folder, items)
    assert [_perm(p) for p in paths] == [(0o640, GROUP)] * 3  # (before: 0600)


def test_a_file_linked_from_the_agents_storage_gets_the_folders_group_and_mode(
    tmp_path: Path,
) -> None:
    spool = tmp_path / "state" / "spool"
    spool.mkdir(parents=True, mode=0o700)
    src = spool / "object"
    src.write_bytes(b"report")
    assert _perm(src) == (0o600, 0)  # (the agent's own: private)
    folder = _folder(tmp_path / "deliver", 0o2770)
    fd = os.open(src, os.O_RDONLY)
    try:
        target = link_under_free_name(src, fd, 6, folder, "report.pdf")
    finally:
        os.close(fd)
    assert target == folder / "report.pdf"
    assert _perm(target) == (0o660, GROUP)  # (before: 0600, root's group)


def test_a_file_copied_to_a_delivery_folder_on_another_file_system(tmp_path: Path) -> None:
    src = tmp_path / "object"
    src.write_bytes(b"x" * 5000)
    shm = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        assert os.stat(shm).st_dev != os.stat(tmp_path).st_dev
        folder = _folder(shm / "deliver", 0o2750)
        fd = os.open(src, os.O_RDONLY)
        try:
            target = link_under_free_name(src, fd, 5000, folder, "big.bin")
        finally:
            os.close(fd)
        assert target.read_bytes() == b"x" * 5000
        assert _perm(target) == (0o640, GROUP)
    finally:
        shutil.rmtree(shm)


def test_subfolders_ferry_makes_take_their_parents_permissions(tmp_path: Path) -> None:
    shared = _folder(tmp_path / "sent", 0o2770)
    with pinned_folder(shared, ["a", "b"]) as (path, _):
        assert path == shared / "a" / "b"
    assert _perm(shared / "a") == (0o2770, GROUP)  # (before: 0700)
    assert _perm(shared / "a" / "b") == (0o2770, GROUP)
    open_to_all = tmp_path / "open"
    open_to_all.mkdir()
    os.chmod(open_to_all, 0o755)
    with pinned_folder(open_to_all, ["c"]):
        pass
    assert _perm(open_to_all / "c") == (0o750, 0)
    # a folder that was there already is left as it is
    (shared / "mine").mkdir()
    os.chmod(shared / "mine", 0o700)
    with pinned_folder(shared, ["mine", "d"]):
        pass
    assert _perm(shared / "mine")[0] == 0o700
    assert _perm(shared / "mine" / "d")[0] == 0o700


def test_reason_files_in_a_quarantine_folder_clerks_may_read(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "quarantine", 0o2750)
    bad = tmp_path / "drop" / "bad.exe"
    bad.parent.mkdir()
    bad.write_bytes(b"MZ" + b"\0" * 100)
    q = Quarantine(folder)
    put = q.put_file(bad, channel="documents", original_name="bad.exe",
                     reason_code="TYPE_NOT_ALLOWED", message="no programs", move=False)  # fmt: skip
    assert _perm(put.reason_txt) == (0o640, GROUP)  # (before: 0600)
    assert _perm(put.reason_json) == (0o640, GROUP)
    assert _perm(put.path) == (0o640, GROUP)  # (a copy ferry made)
    note = q.put_bytes(b"{}", channel="messages", original_name="m.json",
                       reason_code="SCHEMA", message="bad")  # fmt: skip
    assert _perm(note.reason_txt) == (0o640, GROUP)


@pytest.fixture
def public_tmp() -> Iterator[Path]:
    """A folder another user can reach (pytest's are under a folder only root may enter)."""
    base = Path(tempfile.mkdtemp(dir="/var/tmp"))
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base)


def test_a_group_the_agent_is_not_in_is_logged_once_and_the_file_still_delivered(
    public_tmp: Path,
) -> None:
    """Run as an unprivileged user (nobody, not in the folder's group): the kernel refuses
    the group. The file is delivered with the mode, in the agent's own group."""
    tmp_path = public_tmp
    folder = _folder(tmp_path / "deliver", 0o2777)  # (nobody may write here)
    os.chown(folder, 65534, GROUP)  # (its owner: the folder's group can still be set on it)
    script = f"""
import hashlib, json, os, sys
from pathlib import Path
from structlog.testing import capture_logs
from inside.deliver import write_new_files
from ferry.place import share_like_folder
with capture_logs() as logs:
    paths = write_new_files(Path({str(folder)!r}), [
        (f"m{{i}}.json", b"{{}}", hashlib.sha256(b"{{}}").digest()) for i in range(2)])
    st = [(oct(os.stat(p).st_mode & 0o7777), os.stat(p).st_gid) for p in paths]
print(json.dumps({{"st": st, "events": [e["event"] for e in logs]}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], user=65534, group=65534, extra_groups=[],
        capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}, umask=0o077,
    )  # fmt: skip
    got = json.loads(out.stdout.strip().splitlines()[-1])
    # (made in a setgid folder, the kernel gave them its group; the refusal is of the group
    # the agent asks for on a file that has another: checked below)
    assert got["st"] == [["0o660", GROUP], ["0o660", GROUP]]
    # a file linked in from the agent's own storage: its group cannot be changed
    src = tmp_path / "own"
    src.write_bytes(b"x")
    os.chown(src, 65534, 65534)
    script2 = f"""
import json, os
from structlog.testing import capture_logs
from ferry.place import share_like_folder
fd = os.open({str(src)!r}, os.O_RDONLY)
with capture_logs() as logs:
    for _ in range(3):
        share_like_folder(fd, os.stat({str(folder)!r}))
st = os.fstat(fd)
print(json.dumps({{"mode": oct(st.st_mode & 0o777), "gid": st.st_gid,
                   "events": [e["event"] for e in logs]}}))
"""
    out2 = subprocess.run(
        [sys.executable, "-c", script2], user=65534, group=65534, extra_groups=[],
        capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )  # fmt: skip
    got2 = json.loads(out2.stdout.strip().splitlines()[-1])
    assert got2["mode"] == "0o660"  # (the mode: its owner may set it)
    assert got2["gid"] == 65534  # (the group: refused)
    assert got2["events"] == ["shared_permissions_refused"]  # (once for the folder)


@pytest.fixture
def fchown_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel refuses the agent the folder's group (it is not in it)."""

    def refuse(fd: int, uid: int, gid: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(place.os, "fchown", refuse)
    monkeypatch.setattr(place, "_share_refused", set())


@pytest.mark.usefixtures("fchown_refused")
def test_a_refusal_in_process_is_logged_once_per_folder(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "deliver", 0o2750)
    files = []
    for i in range(3):
        f = tmp_path / f"f{i}"
        f.write_bytes(b"x")
        files.append(f)
    with capture_logs() as logs:
        for f in files:  # (as a file linked in from the agent's storage: named by the caller)
            fd = os.open(f, os.O_RDONLY)
            try:
                share_like_folder(fd, os.stat(folder), where=folder)
            finally:
                os.close(fd)
    refused = [e for e in logs if e["event"] == "shared_permissions_refused"]
    assert len(refused) == 1
    assert refused[0]["folder"] == str(folder)  # (not the agent's own storage)
    assert [_perm(f) for f in files] == [(0o640, 0)] * 3


def test_a_subfolder_made_by_an_agent_not_in_the_folders_group_is_like_its_parent(
    public_tmp: Path,
) -> None:
    """An agent not in the folder's group: the kernel dropped the setgid bit its fchmod asked
    for on a subfolder it made (silently, the call succeeded). Made with its mode exactly,
    it keeps the bit its parent passes on, and nothing needs saying."""
    folder = _folder(public_tmp / "sent", 0o2770)
    os.chown(folder, NOBODY, GROUP)  # (nobody may write; it is not in the group)
    script = f"""
import json, os
from pathlib import Path
from structlog.testing import capture_logs
from ferry.place import pinned_folder
with capture_logs() as logs:
    with pinned_folder(Path({str(folder)!r}), ["team"]):
        pass
print(json.dumps([e["event"] for e in logs]))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], user=NOBODY, group=NOBODY, extra_groups=[], umask=0o077,
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": ROOT},
    )  # fmt: skip
    assert "shared_permissions_refused" not in json.loads(out.stdout.strip().splitlines()[-1])
    assert _perm(folder / "team") == (0o2770, GROUP)


def test_a_root_agent_does_not_open_up_a_folder_renamed_into_the_place_of_its_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between ferry's mkdir and its open, a group member renames another user's private
    folder into place: the agent running as root would have given it the group's bits."""
    shared = _folder(tmp_path / "sent", 0o2770)
    private = tmp_path / "sent" / "alice-private"
    private.mkdir(mode=0o700)
    os.chown(private, NOBODY, NOBODY)
    before = _perm(private)
    assert not before[0] & 0o077
    real_mkdir = os.mkdir

    def mkdir_then_swap(path: Any, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        real_mkdir(path, mode, dir_fd=dir_fd)
        os.rename(shared / "team", shared / "ferrys")
        os.rename(private, shared / "team")

    monkeypatch.setattr(place.os, "mkdir", mkdir_then_swap)
    with pinned_folder(shared, ["team"]):
        pass
    assert _perm(shared / "team") == before  # (left as it was: not 2770 in the group)


def test_a_subfolder_keeps_its_setgid_bit_where_no_mode_may_name_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The systemd units refuse any mkdir or chmod whose mode names the setgid bit
    (RestrictSUIDSGID=): the subfolder is made without asking for it (its setgid parent
    passes it on) and its group bits are set through its access ACL."""
    real_fchmod, real_mkdir = os.fchmod, os.mkdir

    def no_setgid(mode: int) -> None:
        if mode & stat.S_ISGID:
            raise PermissionError(1, "Operation not permitted (RestrictSUIDSGID)")

    def fchmod(fd: int, mode: int) -> None:
        no_setgid(mode)
        real_fchmod(fd, mode)

    def mkdir(path: Any, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        no_setgid(mode)
        real_mkdir(path, mode, dir_fd=dir_fd)

    monkeypatch.setattr(place.os, "fchmod", fchmod)
    monkeypatch.setattr(place.os, "mkdir", mkdir)
    shared = _folder(tmp_path / "deliver", 0o2750)
    with capture_logs() as logs, pinned_folder(shared, ["2026", "11"]):
        pass
    assert _perm(shared / "2026") == (0o2750, GROUP)  # (before: refused, the file with it)
    assert _perm(shared / "2026" / "11") == (0o2750, GROUP)
    assert [e["event"] for e in logs] == []


def test_a_subfolder_a_share_shows_as_someone_elses_is_said_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A share that shows every file as another owner (NFS all_squash, CIFS forceuid): the
    folder just made is left as it is, said once (it was left 0700 silently)."""
    monkeypatch.setattr(place, "_share_refused", set())
    monkeypatch.setattr(place.os, "geteuid", lambda: 12345)
    shared = _folder(tmp_path / "sent", 0o2770)
    with capture_logs() as logs:
        for sub in ("a", "b"):
            with pinned_folder(shared, [sub]):
                pass
    refused = [e for e in logs if e["event"] == "shared_permissions_refused"]
    assert len(refused) == 1
    assert refused[0]["folder"] == str(shared)
    assert "not the agent's own folder" in refused[0]["error"]


@pytest.mark.usefixtures("fchown_refused")
def test_a_refusal_in_a_pinned_subfolder_names_its_path(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "deliver", 0o2750)
    src = tmp_path / "object"
    src.write_bytes(b"x")
    with capture_logs() as logs, pinned_folder(folder, ["2026"]) as (_, dir_fd):
        fd = os.open(src, os.O_RDONLY)
        try:
            link_under_free_name(src, fd, 1, Path(f"/proc/self/fd/{dir_fd}"), "a.txt")
        finally:
            os.close(fd)
    (refused,) = [e for e in logs if e["event"] == "shared_permissions_refused"]
    assert refused["folder"] == str(folder / "2026")  # (not /proc/self/fd/N)


def test_a_subfolder_under_a_default_acl_keeps_the_operators_entries(tmp_path: Path) -> None:
    """The operator gave the folder a default ACL naming another group: a subfolder ferry
    makes inherits it, and is not given a minimal ACL in its place."""
    shared = _folder(tmp_path / "deliver", 0o2750)
    other = 65534

    def acl(*entries: tuple[int, int, int]) -> bytes:
        return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)

    none = 0xFFFFFFFF
    default = acl((0x01, 7, none), (0x04, 5, none), (0x08, 5, other), (0x10, 5, none),
                  (0x20, 0, none))  # fmt: skip
    os.setxattr(shared, "system.posix_acl_default", default)
    with pinned_folder(shared, ["2026"]):
        pass
    made = shared / "2026"
    assert _perm(made) == (0o2750, GROUP)
    assert struct.pack("<HHI", 0x08, 5, other) in os.getxattr(made, "system.posix_acl_access")


def test_subfolders_are_made_with_their_mode_exactly_and_the_umask_is_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No chmod and no ACL after the mkdir (the units refuse a chmod naming the setgid bit,
    a file system may have no ACLs), and no moment with less than the mode; the agent's own
    umask (0077 here) stays for everything else."""

    def refuse(*args: object, **kw: object) -> None:
        raise AssertionError("not needed")

    monkeypatch.setattr(place.os, "fchmod", refuse)
    monkeypatch.setattr(place.os, "setxattr", refuse)
    shared = _folder(tmp_path / "deliver", 0o2750)
    with pinned_folder(shared, ["2026", "11"]):
        pass
    monkeypatch.undo()
    assert _perm(shared / "2026") == (0o2750, GROUP)
    assert _perm(shared / "2026" / "11") == (0o2750, GROUP)
    assert os.umask(0o077) == 0o077  # (the process's: untouched)
    (tmp_path / "private").write_bytes(b"x")
    assert _perm(tmp_path / "private")[0] == 0o600
    setuid = _folder(tmp_path / "both", 0o6750)
    with pinned_folder(setuid, ["sub"]):
        pass
    assert _perm(setuid / "sub") == (0o2750, GROUP)  # (no setuid: the units refuse it)
