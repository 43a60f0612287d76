"""The inside's folder writes on a share (a real FUSE mount, bindfs) and on a volume with no
hard links (a real exFAT file system, exfat-fuse on a loop device), neither of which has
O_TMPFILE: files are written under a hidden temp name first, fsynced there one by one, never
visible half-written under their own name, and never over another file; a temp file a crash
left behind is removed at start-up."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import (
    Share,
    application,
    drop_file,
    edit_yaml,
    fast_bulk,
    init,
    opaque,
    wait_files,
)

from ferry.client import Client
from ferry.place import NO_HARD_LINKS, SYNCFS_FLUSHES, TEMP_PREFIX, fs_type, remove_stale_temps
from inside.deliver import _link_copy, fsync_dir, link_under_free_name, write_new_files
from outside.quarantine import Quarantine

pytestmark = pytest.mark.integration


def test_the_share_has_no_o_tmpfile(network_share: Share) -> None:
    with pytest.raises(OSError) as info:  # (what makes the fallback needed at all)
        os.close(os.open(network_share.mount, os.O_TMPFILE | os.O_WRONLY, 0o600))
    assert info.value.errno == errno.EOPNOTSUPP


def test_messages_written_to_a_share_get_their_names_and_no_temp_is_left(
    network_share: Share,
) -> None:
    items = [(f"消息-{i}.json", f'{{"n": {i}}}'.encode(), b"") for i in range(3)]
    items = [(n, c, hashlib.sha256(c).digest()) for n, c, _ in items]
    (network_share.server / "消息-1.json").write_bytes(b"somebody else's")
    out = write_new_files(network_share.mount, items)
    assert [p.name for p in out] == ["消息-0.json", "消息-1 (2).json", "消息-2.json"]
    assert (network_share.server / "消息-1.json").read_bytes() == b"somebody else's"
    for path, (_, content, _) in zip(out, items, strict=True):
        assert (network_share.server / path.name).read_bytes() == content
    assert not [n for n in os.listdir(network_share.server) if n.startswith(TEMP_PREFIX)]
    again = write_new_files(network_share.mount, items[:1])  # a repeat after a crash
    assert again == out[:1]  # the same content under its name counts as delivered
    assert len(os.listdir(network_share.server)) == 4


def test_a_file_copied_onto_a_share_never_replaces_one(
    network_share: Share, tmp_path: Path
) -> None:
    src = tmp_path / "spooled"
    src.write_bytes(b"verified content" + b"trailer")
    (network_share.server / "report.pdf").write_bytes(b"already there")
    fd = os.open(src, os.O_RDONLY)
    try:
        with pytest.raises(FileExistsError):
            _link_copy(fd, 16, network_share.mount, network_share.mount / "report.pdf")
        _link_copy(fd, 16, network_share.mount, network_share.mount / "report (2).pdf")
    finally:
        os.close(fd)
    assert (network_share.server / "report.pdf").read_bytes() == b"already there"
    assert (network_share.server / "report (2).pdf").read_bytes() == b"verified content"
    assert sorted(os.listdir(network_share.server)) == ["report (2).pdf", "report.pdf"]


FUSE_MAGIC = 0x65735546


def fuse_requests(log: Path) -> list[tuple[int, str, int]]:
    """(request number, opcode, node id) of each request in a ``bindfs -d`` log."""
    found = re.findall(r"unique: (\d+), opcode: (\w+) \(\d+\), nodeid: (\d+)", log.read_text())
    return [(int(u), op, int(node)) for u, op, node in found]


def fuse_answers(log: Path) -> list[tuple[str, int]]:
    """(opcode, error: 0 or -errno) of each request in a ``bindfs -d`` log."""
    ops = dict(re.findall(r"unique: (\d+), opcode: (\w+)", log.read_text()))
    out = []
    for u, err in re.findall(r"unique: (\d+), (?:success|error: (-\d+))", log.read_text()):
        if u in ops:
            out.append((ops[u], int(err or 0)))
    return out


def test_each_file_written_to_a_share_is_fsynced_there_before_it_is_named(
    logged_share: tuple[Share, Path],
) -> None:
    """syncfs(2) on a FUSE mount never reaches the daemon (the kernel asks only virtiofs for
    it), so the one flush that does for a local disk would leave the files only in the file
    server's memory, and a power cut there would lose files ferry has called delivered."""
    share, log = logged_share
    fd = os.open(share.mount, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert fs_type(fd) == FUSE_MAGIC
        assert FUSE_MAGIC not in SYNCFS_FLUSHES
    finally:
        os.close(fd)
    items = [(f"application-{i}.json", b'{"n": %d}' % i, b"") for i in range(3)]
    items = [(n, c, hashlib.sha256(c).digest()) for n, c, _ in items]
    write_new_files(share.mount, items)
    fsync_dir(share.mount)
    requests = fuse_requests(log)
    naming = [u for u, op, _ in requests if op in {"LINK", "RENAME", "RENAME2"}]
    before = {node for u, op, node in requests if op == "FSYNC" and u < min(naming)}
    after = {node for u, op, node in requests if op == "FSYNC" and u > max(naming)}
    assert len(before) == 3  # every content on disk before any name, each of its own file
    # bindfs has no fsyncdir (ENOSYS): the kernel sends none after the first, so each file
    # is fsynced again once named (the file server commits its name along with it); FUSE
    # gives the named file a node of its own
    assert len(after) == 3
    assert ("FSYNCDIR", -38) in fuse_answers(log)
    for name, content, _ in items:
        assert (share.server / name).read_bytes() == content


def test_a_file_copied_onto_a_share_is_fsynced_there_once_named(
    logged_share: tuple[Share, Path], tmp_path: Path
) -> None:
    share, log = logged_share
    src = tmp_path / "spooled"
    src.write_bytes(b"verified content" + b"trailer")
    fd = os.open(src, os.O_RDONLY)
    try:
        target = link_under_free_name(src, fd, 16, share.mount, "report.pdf")
    finally:
        os.close(fd)
    assert (share.server / target.name).read_bytes() == b"verified content"
    requests = fuse_requests(log)
    (link,) = [u for u, op, _ in requests if op in {"LINK", "RENAME", "RENAME2"}]
    assert {node for u, op, node in requests if op == "FSYNC" and u < link}  # its content
    assert {node for u, op, node in requests if op == "FSYNC" and u > link}  # its name


def test_an_exfat_volume_has_no_hard_links_and_no_o_tmpfile(exfat_volume: Path) -> None:
    (exfat_volume / "a").write_bytes(b"x")
    with pytest.raises(OSError) as info:  # (what makes the rename stand-in needed)
        os.link(exfat_volume / "a", exfat_volume / "b")
    assert info.value.errno in NO_HARD_LINKS
    with pytest.raises(OSError) as info:
        os.close(os.open(exfat_volume, os.O_TMPFILE | os.O_WRONLY, 0o600))
    assert info.value.errno == errno.EOPNOTSUPP
    assert (exfat_volume / "A").exists()  # (one name, whatever its case)


def test_messages_written_to_exfat_never_replace_a_file_differing_only_in_case(
    exfat_volume: Path,
) -> None:
    """No hard links there: each file is renamed from its temp name, after a check, and never
    over a file, a name that differs only in case included."""
    (exfat_volume / "Notice-1.JSON").write_bytes(b"somebody else's")
    items = [(f"notice-{i}.json", f'{{"n": {i}}}'.encode(), b"") for i in range(3)]
    items = [(n, c, hashlib.sha256(c).digest()) for n, c, _ in items]
    out = write_new_files(exfat_volume, items)
    assert [p.name for p in out] == ["notice-0.json", "notice-1 (2).json", "notice-2.json"]
    assert (exfat_volume / "Notice-1.JSON").read_bytes() == b"somebody else's"
    for path, (_, content, _) in zip(out, items, strict=True):
        assert path.read_bytes() == content
    assert not [n for n in os.listdir(exfat_volume) if n.startswith(TEMP_PREFIX)]
    assert write_new_files(exfat_volume, items[2:]) == out[2:]  # a repeat: already there
    assert len(os.listdir(exfat_volume)) == 4


def test_a_spooled_file_delivered_onto_exfat_is_copied_and_never_replaces_one(
    exfat_volume: Path, tmp_path: Path
) -> None:
    """From the gateway's disk to another file system: copied under a temp name, fsynced,
    then renamed (no hard links) under the first free name."""
    src = tmp_path / "spooled"
    src.write_bytes(b"verified content" + b"trailer")
    (exfat_volume / "REPORT.PDF").write_bytes(b"already there")
    fd = os.open(src, os.O_RDONLY)
    try:
        with pytest.raises(FileExistsError):  # (its copy goes, not the file already there)
            _link_copy(fd, 16, exfat_volume, exfat_volume / "report.pdf")
        target = link_under_free_name(src, fd, 16, exfat_volume, "report.pdf")
        again = link_under_free_name(
            src,
            fd,
            16,
            exfat_volume,
            "report.pdf",
            same_sha256=hashlib.sha256(b"verified content").digest(),
        )
    finally:
        os.close(fd)
    assert target.name == "report (2).pdf"
    assert again == target
    assert (exfat_volume / "REPORT.PDF").read_bytes() == b"already there"
    assert target.read_bytes() == b"verified content"
    assert sorted(os.listdir(exfat_volume)) == ["REPORT.PDF", "report (2).pdf"]
    assert src.read_bytes() == b"verified content" + b"trailer"  # (the spool's is untouched)


def test_temps_a_crash_left_are_removed_and_nothing_else(tmp_path: Path) -> None:
    stale = tmp_path / f"{TEMP_PREFIX}{'ab' * 8}.part"
    stale.write_bytes(b"half")
    keep = [".ferry-notes.part", "report.part", ".ferry-0123456789abcdef.pdf", "a.json"]
    for name in keep:
        (tmp_path / name).write_bytes(b"x")
    assert remove_stale_temps(tmp_path) == 1
    assert sorted(os.listdir(tmp_path)) == sorted(keep)
    assert remove_stale_temps(tmp_path / "missing") == 0


def test_agents_deliver_files_and_messages_onto_an_exfat_volume(
    tmp_path: Path, agents: Any, exfat_volume: Path
) -> None:
    """Real agents over UDP; the inside's documents and messages folders are on an exFAT
    volume (no hard links, no O_TMPFILE, case-insensitive names)."""
    dep = init(tmp_path / "d")
    folders = {name: exfat_volume / name for name in ("documents", "messages")}
    for folder in folders.values():
        folder.mkdir()
    (folders["documents"] / "Report.PDF").write_bytes(b"a file somebody else put there")

    def inside(data: dict[str, Any]) -> None:
        opaque(data)
        for ch in data["channels"]:
            if ch["name"] in folders:
                ch["deliver"] = str(folders[ch["name"]])

    edit_yaml(dep["outside"]["config"], fast_bulk)
    edit_yaml(dep["inside"]["config"], inside)
    agents("inside", dep["inside"]["config"]).wait_event("inside_started")
    agents("outside", dep["outside"]["config"])
    files = {"report.pdf": os.urandom(300_000), "申请材料.docx": os.urandom(5000)}
    for name, data in files.items():
        drop_file(dep["channels"]["documents"]["drop"], name, data)
    with Client.from_config(dep["api"]["client_config"]) as client:
        for n in range(1, 4):
            client.submit("messages", application(n), schema="citizen-application", timeout=10)
    names = {f"citizen-application-{n:08d}.json" for n in range(1, 4)}
    delivered = wait_files(folders["messages"], names, timeout=30)
    for n in range(1, 4):
        assert json.loads(delivered[f"citizen-application-{n:08d}.json"]) == json.loads(
            application(n)
        )
    got = wait_files(folders["documents"], {"report (2).pdf", "申请材料.docx"}, timeout=30)
    assert got == {"report (2).pdf": files["report.pdf"], "申请材料.docx": files["申请材料.docx"]}
    assert (folders["documents"] / "Report.PDF").read_bytes() == b"a file somebody else put there"
    time.sleep(1.0)  # (nothing more arrives: no temp file, no second copy)
    assert sorted(os.listdir(folders["documents"])) == [
        "Report.PDF",
        "report (2).pdf",
        "申请材料.docx",
    ]
    assert sorted(os.listdir(folders["messages"])) == sorted(names)


def test_a_file_quarantined_on_a_share_and_its_reasons_are_fsynced_there_once_named(
    logged_share: tuple[Share, Path],
) -> None:
    """The outside's quarantine folder sits next to the drop folder: on a share, the clerk's
    file is moved into it there; the original's name goes, so the new one must be on the
    file server's disk (bindfs has no fsyncdir: each file's own fsync)."""
    share, log = logged_share
    drop, folder = share.mount / "drop", share.mount / "quarantine"
    drop.mkdir()
    (drop / "报告.docm").write_bytes(b"a macro-enabled document")
    record = Quarantine(folder).put_file(
        drop / "报告.docm", channel="documents", original_name="报告.docm",
        reason_code="TYPE_NOT_ALLOWED", message="not an allowed type",
    )  # fmt: skip
    assert not (share.server / "drop" / "报告.docm").exists()
    assert (
        share.server / "quarantine" / record.path.name
    ).read_bytes() == b"a macro-enabled document"
    requests = fuse_requests(log)
    renames = [u for u, op, _ in requests if op in {"RENAME", "RENAME2"}]
    assert len(renames) == 3  # the two reason files (from temps), then the file itself
    synced_after = {node for u, op, node in requests if op == "FSYNC" and u > renames[-1]}
    assert synced_after  # the moved file, under its new name
    between = {node for u, op, node in requests if op == "FSYNC" and renames[1] < u < renames[2]}
    assert len(between) == 2  # both reason files, once named, before the file is moved
