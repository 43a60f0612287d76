"""ZIP: structure checks before decompression, bounded inflation, members through the
pipeline, a rebuilt archive."""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

import pytest
from content_helpers import delivered, engine, policy, run

from ferry.content.base import Reject
from outside.content import zipstruct
from tests.corpus.gen_basic import (
    EICAR,
    _zip,
    encrypted_zip,
    lying_zip,
    overlap_zip,
    pe_stub,
    symlink_zip,
)


def members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def test_benign_rebuilt_with_checked_members(tmp_path: Path) -> None:
    data = _zip(
        [
            ("a/readme.txt", b"hello\n"),
            ("a/", b""),
            ("t.csv", b"x,=1+1\n"),
            ("w.txt", "中文".encode("gb18030")),
        ]
    )
    out = run(tmp_path, data, "bundle.zip")
    assert out.kind == "deliver_cleaned"
    got = members(delivered(out, data))
    assert got == {"a/readme.txt": b"hello\n", "t.csv": b"x,'=1+1\n", "w.txt": "中文".encode()}
    assert {m["path"] for m in out.report["members"]} == {"a/readme.txt", "t.csv", "w.txt"}
    assert any(a.where.startswith("t.csv") for a in out.actions)


def test_timestamps_kept(tmp_path: Path) -> None:
    out = run(tmp_path, _zip([("a.txt", b"a")]), "x.zip")
    with zipfile.ZipFile(out.output) as zf:  # type: ignore[arg-type]
        assert zf.infolist()[0].date_time == (2024, 5, 6, 7, 8, 10)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (_zip([("zeros.txt", b"\0" * (8 << 20))]), "ARCHIVE_BOMB"),
        (lying_zip(), "ARCHIVE_BOMB"),
        (overlap_zip(), "ARCHIVE_BOMB"),
        (_zip([("../evil.txt", b"x")]), "ARCHIVE_TRAVERSAL"),
        (_zip([("a/../../evil.txt", b"x")]), "ARCHIVE_TRAVERSAL"),
        (_zip([("/etc/evil", b"x")]), "ARCHIVE_TRAVERSAL"),
        (_zip([("C:/evil.txt", b"x")]), "ARCHIVE_TRAVERSAL"),
        (_zip([("a\\..\\evil.txt", b"x")]), "ARCHIVE_TRAVERSAL"),
        (_zip([("a.txt", b"x"), ("A.TXT", b"y")]), "ARCHIVE_TRAVERSAL"),
        (symlink_zip(), "ARCHIVE_TRAVERSAL"),
        (encrypted_zip(), "ENCRYPTED"),
        (_zip([("CON.txt", b"x")]), "FILENAME_POLICY"),
        (_zip([("x\u202etxt.exe", b"x")]), "FILENAME_POLICY"),
        (_zip([("ok.txt", EICAR)]), "MALWARE_SIGNATURE"),
        (_zip([("ok.txt", b"plain " + EICAR)], zipfile.ZIP_STORED), "MALWARE_SIGNATURE"),
        (_zip([("tool.exe", pe_stub())]), "TYPE_NOT_ALLOWED"),
        (_zip([("data.json", b'{"a":1,"a":2}')]), "MALFORMED"),
        (_zip([(f"f{i}", b"") for i in range(1001)]), "LIMIT_EXCEEDED"),
        (_zip([("d.zip", _zip([("e.zip", _zip([("f.txt", b"f")]))]))]), "ARCHIVE_DEPTH"),
    ],
)
def test_refused(tmp_path: Path, data: bytes, code: str) -> None:
    out = run(tmp_path, data, "x.zip")
    assert (out.reason, out.kind) == (code, "reject"), out.message
    assert out.output is None


def test_depth_limit_follows_policy(tmp_path: Path) -> None:
    nested = _zip([("inner.zip", _zip([("a.txt", b"a")]))])
    assert run(tmp_path, nested, "a.zip").kind == "deliver_cleaned"
    assert run(tmp_path, nested, "b.zip", policy(limits={"archive_depth": 1})).reason == (
        "ARCHIVE_DEPTH"
    )
    flat = _zip([("a.txt", b"a")])
    assert run(tmp_path, flat, "c.zip", policy(limits={"archive_depth": 0})).reason == (
        "ARCHIVE_DEPTH"
    )


def test_ratio_and_expanded_limits(tmp_path: Path) -> None:
    data = _zip([("a.txt", b"ab" * (1 << 20))])
    assert run(tmp_path, data, "a.zip").reason == "ARCHIVE_BOMB"
    assert run(tmp_path, data, "b.zip", policy(limits={"archive_ratio": 5000})).kind != "reject"
    small = policy(limits={"archive_expanded": 1000, "archive_ratio": 5000})
    assert run(tmp_path, data, "c.zip", small).reason == "ARCHIVE_BOMB"


def test_member_renamed_to_delivered_type(tmp_path: Path) -> None:
    data = _zip([("docs/note.md", b"# hi\n"), ("docs/note.txt", b"x\n")])
    got = members(delivered(run(tmp_path, data, "a.zip"), data))
    assert set(got) == {"docs/note.txt", "docs/note (2).txt"}


def test_crc_mismatch(tmp_path: Path) -> None:
    data = bytearray(_zip([("a.txt", b"hello world " * 10)]))
    struct.pack_into("<L", data, 14, 0xDEADBEEF)  # local header CRC
    cd = data.rfind(b"PK\x01\x02")
    struct.pack_into("<L", data, cd + 16, 0xDEADBEEF)
    assert run(tmp_path, bytes(data), "a.zip").reason == "MALFORMED"


@pytest.mark.parametrize(
    "data",
    [b"PK\x03\x04" + bytes(40), _zip([("a", b"a")])[:-5]],
)
def test_damaged_structure(data: bytes) -> None:
    with pytest.raises(Reject) as err:
        zipstruct.read_directory(data, 100)
    assert err.value.code in ("MALFORMED", "POLYGLOT")


def test_unsupported_method(tmp_path: Path) -> None:
    data = _zip([("a.txt", b"a" * 100)], zipfile.ZIP_BZIP2)
    assert run(tmp_path, data, "a.zip").reason == "MALFORMED"


def test_a_refused_member_leaves_nothing_that_fails_the_next_file(tmp_path: Path) -> None:
    """The work folder is reused from file to file (one per drop-folder lane, one for all API
    uploads): a zip refused for one member left its extracted members there, and every zip
    after it failed FILTER_ERROR (FileExistsError) until the agent was restarted."""
    work = tmp_path / "work"
    work.mkdir()
    ok = _zip([("a.txt", b"hello\n"), ("b.txt", b"world\n")])
    bad = _zip([("data.json", b'{"a":1,"a":2}'), ("a.txt", b"fine\n")])
    for n, (data, kind) in enumerate(
        [(ok, "deliver_cleaned"), (bad, "reject"), (ok, "deliver_cleaned"), (bad, "reject")]
    ):
        src = tmp_path / f"in-{n}.zip"
        src.write_bytes(data)
        out = engine().run(policy(), src, "bundle.zip", work)
        assert out.kind == kind, (n, out.reason, out.message)
        if kind == "reject":
            assert out.reason == "MALFORMED", out.message
