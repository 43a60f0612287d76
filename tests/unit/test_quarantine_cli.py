"""`ferry quarantine list | show | release`: signed, idempotent releases."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from ferry.cli import main
from ferry.crypto.keys import SecretKey, load_public_key, load_secret_key, write_secret_key
from ferry.errors import KeyFileError, UsageError
from ferry.place import rename_new
from ferry.provision import init_deployment
from outside import quarantine_cli
from outside.quarantine import Quarantine
from outside.quarantine_cli import (
    RELEASES,
    list_items,
    overrides_by_sha,
    release_item,
    show_item,
    verify_record,
)

REPORT_SHA = hashlib.sha256(b"report\n").hexdigest()


@pytest.fixture
def deployment(tmp_path: Path) -> dict[str, object]:
    out = init_deployment(tmp_path / "d", port=47997)
    q = Quarantine(Path(out["channels"]["documents"]["quarantine"]))
    src = tmp_path / "dropped.txt"
    src.write_bytes(b"report\n")
    q.put_file(
        src,
        channel="documents",
        original_name="报告 2024.txt",
        reason_code="FILENAME_POLICY",
        message="bad name",
        sha256=REPORT_SHA,  # (as a content refusal records it: what was checked)
        details={"report": {"version": 1, "verdict": "reject"}},
    )
    return out


def _paths(out: dict[str, object]) -> tuple[Path, Path, Path, Path]:
    ch = out["channels"]["documents"]  # type: ignore[index]
    admin = out["security_admin"]  # type: ignore[index]
    return (
        Path(ch["quarantine"]),
        Path(ch["drop"]),
        Path(admin["secret_key"]),
        Path(admin["public_key"]),
    )


def test_release_is_signed_and_idempotent(deployment: dict[str, object]) -> None:
    folder, drop, secret, public = _paths(deployment)
    key, trusted = load_secret_key(secret), load_public_key(str(public))
    [item] = list_items(folder, trusted)
    assert item["reason_code"] == "FILENAME_POLICY"
    assert not item["released"]
    seen: list[dict[str, object]] = []
    first = release_item(
        folder,
        item["stored_name"],
        channel="documents",
        drop=drop,
        key=key,
        trusted=trusted,
        override="FILENAME_POLICY",
        on_record=seen.append,
    )
    assert first["status"] == "released"
    assert (drop / first["resubmitted_as"]).read_bytes() == b"report\n"
    assert verify_record(seen[0], trusted)
    assert overrides_by_sha(folder, trusted) == {REPORT_SHA: {"FILENAME_POLICY"}}
    second = release_item(
        folder, item["stored_name"], channel="documents", drop=drop, key=key, trusted=trusted
    )
    assert second["status"] == "already released"
    assert second["resubmitted_as"] is None
    assert len(list(drop.iterdir())) == 1
    assert len((folder / RELEASES).read_text().splitlines()) == 1
    assert list_items(folder, trusted)[0]["released"]
    tampered = dict(seen[0], override="MALWARE_SIGNATURE")
    assert not verify_record(tampered, trusted)


def test_list_and_show_count_only_signed_release_lines(deployment: dict[str, object]) -> None:
    folder, drop, secret, public = _paths(deployment)
    trusted = load_public_key(str(public))
    [item] = list_items(folder, trusted)
    stored = item["stored_name"]
    with open(folder / RELEASES, "a", encoding="utf-8") as f:  # forged: no admin signature
        f.write(json.dumps({"stored_name": stored, "admin_key_id": "00", "signature": "AA=="}))
        f.write("\n")
    [item] = list_items(folder, trusted)
    assert not item["released"]
    assert item["unverified_release_lines"] == 1
    shown = show_item(folder, stored, trusted)
    assert (shown["released"], shown["unverified_release_lines"]) == (False, 1)
    release_item(
        folder, stored, channel="documents", drop=drop, key=load_secret_key(secret), trusted=trusted
    )
    [item] = list_items(folder, trusted)
    assert item["released"]
    assert item["unverified_release_lines"] == 1
    [unkeyed] = list_items(folder, None)  # no trusted key at hand: nothing counts
    assert not unkeyed["released"]
    assert unkeyed["unverified_release_lines"] == 2


def test_release_needs_the_trusted_key(deployment: dict[str, object], tmp_path: Path) -> None:
    folder, drop, _, public = _paths(deployment)
    other = SecretKey.generate("ed25519")
    with pytest.raises(KeyFileError):
        release_item(
            folder,
            list_items(folder, load_public_key(str(public)))[0]["stored_name"],
            channel="documents",
            drop=drop,
            key=other,
            trusted=load_public_key(str(public)),
        )
    assert not list(drop.iterdir())


def test_hostile_reasons_cannot_be_overridden(tmp_path: Path) -> None:
    folder, drop = tmp_path / "q", tmp_path / "drop"
    src = tmp_path / "x.txt"
    src.write_bytes(b"x")
    Quarantine(folder).put_file(
        src, channel="c", original_name="x.txt", reason_code="MALWARE_SIGNATURE", message="EICAR"
    )
    key = SecretKey.generate("ed25519")
    with pytest.raises(UsageError, match="cannot be overridden"):
        release_item(
            folder,
            "x.txt",
            channel="c",
            drop=drop,
            key=key,
            trusted=key.public,
            override="MALWARE_SIGNATURE",
        )


def test_cli(deployment: dict[str, object], capsys: pytest.CaptureFixture[str]) -> None:
    __, drop, secret, _ = _paths(deployment)
    config = deployment["outside"]["config"]  # type: ignore[index]
    assert main(["quarantine", "list", "-c", config, "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    name = row["stored_name"]
    assert main(["quarantine", "show", "-c", config, "--channel", "documents", name]) == 0
    assert "Content report" in capsys.readouterr().out
    wrong = Path(str(secret) + ".other")
    write_secret_key(wrong, SecretKey.generate("ed25519"), "security-admin")
    assert (
        main(
            [
                "quarantine",
                "release",
                "-c",
                config,
                name,
                "--channel",
                "documents",
                "--key",
                str(wrong),
            ]
        )
        == KeyFileError.exit_code
    )
    args = [
        "quarantine",
        "release",
        "-c",
        config,
        name,
        "--channel",
        "documents",
        "--key",
        str(secret),
        "--json",
    ]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "released"
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "already released"
    assert len(list(drop.iterdir())) == 1


@pytest.mark.parametrize("across", [False, True], ids=["same file system", "another"])
def test_a_release_cut_short_leaves_the_item_in_quarantine_and_a_rerun_resubmits_it(
    deployment: dict[str, object], monkeypatch: pytest.MonkeyPatch, across: bool
) -> None:
    """A crash in the middle of the move: the file is in the quarantine folder still (not
    stranded under a hidden temp name in the drop folder, which the watcher ignores), and
    running the release again puts it in the drop folder."""
    folder, drop, secret, public = _paths(deployment)
    if across:
        if os.stat("/dev/shm").st_dev == os.stat(folder).st_dev:
            pytest.skip("/dev/shm is on the quarantine folder's file system here")
        drop = Path(tempfile.mkdtemp(dir="/dev/shm"))
    key, trusted = load_secret_key(secret), load_public_key(str(public))
    [item] = list_items(folder, trusted)
    real = quarantine_cli.rename_new
    calls: list[Path] = []

    def crash_on_the_name(src: Path, dst: Path) -> None:
        calls.append(Path(src))
        if not across or Path(src).parent == drop:  # (across: the copy's rename to its name)
            raise OSError(errno.EIO, "the machine went down here")
        real(src, dst)  # (across: EXDEV, so it is copied)

    monkeypatch.setattr(quarantine_cli, "rename_new", crash_on_the_name)
    try:
        with pytest.raises(OSError, match="went down"):
            release_item(
                folder, item["stored_name"], channel="documents", drop=drop, key=key,
                trusted=trusted,
            )  # fmt: skip
        assert (folder / item["stored_name"]).read_bytes() == b"report\n"
        assert list(drop.iterdir()) == []  # nothing stranded there, no temp either
        monkeypatch.setattr(quarantine_cli, "rename_new", real)
        again = release_item(
            folder, item["stored_name"], channel="documents", drop=drop, key=key, trusted=trusted
        )
        assert again["status"] == "already released"
        assert again["resubmitted_as"] == "报告 2024.txt"
        assert [p.name for p in drop.iterdir()] == ["报告 2024.txt"]
        assert (drop / "报告 2024.txt").read_bytes() == b"report\n"
        assert not (folder / item["stored_name"]).exists()
    finally:
        if across:
            shutil.rmtree(drop)
    assert [p.parent for p in calls] == ([folder, drop] if across else [folder])


def test_rename_new_never_replaces_a_file(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "b").write_bytes(b"b")
    with pytest.raises(FileExistsError):
        rename_new(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b").read_bytes() == b"b"
    rename_new(tmp_path / "a", tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "c"]
    assert (tmp_path / "c").read_bytes() == b"a"


def test_an_item_that_is_a_symlink_is_never_released(
    deployment: dict[str, object], tmp_path: Path
) -> None:
    """However a symlink came to stand where an item's file was, a release does not follow it
    (it would copy a file from elsewhere into the drop folder, to be sent)."""
    folder, drop, secret, public = _paths(deployment)
    key, trusted = load_secret_key(secret), load_public_key(str(public))
    [item] = list_items(folder, trusted)
    elsewhere = tmp_path / "secret.key"
    elsewhere.write_text("not to be sent\n")
    (folder / item["stored_name"]).unlink()
    os.symlink(elsewhere, folder / item["stored_name"])
    assert not show_item(folder, item["stored_name"], trusted)["present"]
    with pytest.raises(UsageError, match="no file to release"):
        release_item(
            folder, item["stored_name"], channel="documents", drop=drop, key=key, trusted=trusted
        )
    assert not drop.exists() or list(drop.iterdir()) == []


def test_an_override_is_refused_for_an_item_that_is_no_longer_what_was_checked(
    deployment: dict[str, object],
) -> None:
    """The recorded SHA-256 is what the checks saw; an item changed since (its clerk swapped or
    rewrote it) is not released past its refusal: the admin would sign content never
    checked. Without --override it goes back to be checked again, under its own hash."""
    folder, drop, secret, public = _paths(deployment)
    key, trusted = load_secret_key(secret), load_public_key(str(public))
    [item] = list_items(folder, trusted)
    (folder / item["stored_name"]).write_bytes(b"something else\n")
    with pytest.raises(UsageError, match="no longer the content that was checked"):
        release_item(
            folder, item["stored_name"], channel="documents", drop=drop, key=key,
            trusted=trusted, override="FILENAME_POLICY",
        )  # fmt: skip
    seen: list[dict[str, object]] = []
    done = release_item(
        folder, item["stored_name"], channel="documents", drop=drop, key=key,
        trusted=trusted, on_record=seen.append,
    )  # fmt: skip
    assert (drop / done["resubmitted_as"]).read_bytes() == b"something else\n"
    assert seen[0]["sha256"] == hashlib.sha256(b"something else\n").hexdigest()
    assert overrides_by_sha(folder, trusted) == {}
