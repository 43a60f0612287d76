"""OFD sanitizer (OFD-A style rebuild) and the inside OFD re-check."""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from ferry.content.base import Limits, Reject
from inside.recheck import recheck_bytes
from outside.content.formats.ofd import sanitize
from tests.content_ctx import ctx, run
from tests.corpus.build_docs import ofd, zip_bytes

PAGES = ["关于会议的通知", "请各单位于五月十二日前报送材料。"]


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (0, 0, 255)).save(buf, "PNG")
    return buf.getvalue()


def text_codes(data: bytes) -> list[str]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return [
            t
            for n in sorted(zf.namelist())
            if n.endswith("Content.xml")
            for t in re.findall(r"<ofd:TextCode[^>]*>([^<]*)<", zf.read(n).decode())
        ]


HOSTILE: dict[str, dict[str, Any]] = {
    "actions": {"actions": True},
    "attachment": {"attachment": b"MZ\x90\x00 payload"},
    "multimedia": {"multimedia": True},
    "custom_tags": {"custom_tags": True},
    "extensions": {"extensions": True},
    "external_font": {"external_font": "http://198.51.100.7/simsun.ttf"},
    "external_image": {"external_image": "\\\\198.51.100.7\\share\\x.png"},
    "signatures": {"signatures": True},
    "stray_member": {"extra_members": [("Doc_0/Res/payload.exe", b"MZ\x90\x00")]},
    "everything": {
        "actions": True,
        "attachment": b"MZ",
        "multimedia": True,
        "custom_tags": True,
        "extensions": True,
        "external_font": "file:///c:/f.ttf",
        "signatures": True,
    },
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_cleaned(name: str, tmp_path: Path) -> None:
    data = ofd(PAGES, image=png(), **HOSTILE[name])
    assert not recheck_bytes(data, "ofd").ok, "the re-check must see the hostile input"
    result, out = run(sanitize, data, tmp_path, "x.ofd")
    assert result.cleaned
    assert result.type_name == "ofd"
    after = recheck_bytes(out, "ofd")
    assert after.ok, after.problems
    assert text_codes(out) == PAGES
    with zipfile.ZipFile(io.BytesIO(out)) as zf:
        assert zf.read("Doc_0/Res/image_5.png") == png()
        blob = b"".join(zf.read(n) for n in zf.namelist())
    for bad in (
        b"198.51.100.7",
        b"MZ\x90",
        b"Actions",
        b"Attachment",
        b"CustomTag",
        b"Extension",
        b"Signature",
        b"Video",
    ):
        assert bad not in blob, bad


def test_benign_preserved(tmp_path: Path) -> None:
    data = ofd(PAGES, image=png(), metadata=False)
    assert recheck_bytes(data, "ofd").ok
    result, out = run(sanitize, data, tmp_path, "x.ofd")
    assert text_codes(out) == PAGES
    assert result.info["pages"] == 2
    assert recheck_bytes(out, "ofd").ok


def test_metadata_scrubbed_docid_kept(tmp_path: Path) -> None:
    _, out = run(sanitize, ofd(PAGES), tmp_path, "x.ofd")
    with zipfile.ZipFile(io.BytesIO(out)) as zf:
        head = zf.read("OFD.xml").decode()
    assert "DocID" in head
    assert "王芳" not in head
    assert "CustomData" not in head


@pytest.mark.parametrize(
    ("kw", "code"),
    [
        ({"dtd": True}, "XML_DTD_FORBIDDEN"),
        ({"traversal_member": True}, "ARCHIVE_TRAVERSAL"),
        ({"traversal_locator": True}, "ARCHIVE_TRAVERSAL"),
    ],
)
def test_rejected(kw: dict[str, Any], code: str, tmp_path: Path) -> None:
    data = ofd(PAGES, **kw)
    assert not recheck_bytes(data, "ofd").ok
    with pytest.raises(Reject) as err:
        run(sanitize, data, tmp_path, "x.ofd")
    assert err.value.code == code


def test_disallow_and_allow(tmp_path: Path) -> None:
    data = ofd(PAGES, attachment=b"report text")
    with pytest.raises(Reject) as err:
        run(sanitize, data, tmp_path, "x.ofd", ctx({"embedded_files": "disallow"}))
    assert err.value.code == "ACTIVE_CONTENT_DISALLOWED"
    policy = {"embedded_files": "allow", "metadata": "allow", "custom_data": "allow"}
    _, out = run(sanitize, data, tmp_path, "y.ofd", ctx(policy))
    with zipfile.ZipFile(io.BytesIO(out)) as zf:
        assert zf.read("Doc_0/Attachs/readme.exe") == b"report text"
    assert recheck_bytes(out, "ofd", {"features": policy}).ok


def test_structure_errors(tmp_path: Path) -> None:
    data = ofd(PAGES)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    for broken in (
        {k: v for k, v in members.items() if k != "OFD.xml"},
        {k: v for k, v in members.items() if "Page_1" not in k},
        {
            **members,
            "OFD.xml": members["OFD.xml"].replace(b"Doc_0/Document.xml", b"http://x/Document.xml"),
        },
    ):
        with pytest.raises(Reject) as err:
            run(sanitize, zip_bytes(broken.items()), tmp_path, "x.ofd")
        assert err.value.code == "MALFORMED"
    with pytest.raises(Reject) as err:
        run(sanitize, data, tmp_path, "x.ofd", ctx(limits=Limits(max_pages=1)))
    assert err.value.code == "LIMIT_EXCEEDED"
