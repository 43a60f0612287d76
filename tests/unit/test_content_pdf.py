"""PDF sanitizer (pikepdf rebuild) and the inside lexer re-check."""

# ruff: noqa: E501  (fixtures are literal PDF/XML byte strings; wrapping them hurts reading)

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pikepdf
import pytest
from content_helpers import run as run_pipeline
from PIL import Image

from ferry.content.base import Limits, Reject
from inside.recheck import recheck_bytes
from inside.recheck.pdf import decode_name
from outside.content.formats.pdf import sanitize
from tests.content_ctx import ctx, run
from tests.corpus.build_docs import first_extra, incremental_update, raw_pdf, simple_pdf, stream_obj

PAGES = [["Notice of meeting", "Room 101, 9:00"], ["Agenda", "1. Budget"], ["Annex"]]
FE = first_extra(len(PAGES))
JS = b"<< /S /JavaScript /JS (app.alert\\('x'\\)) >>"
EICAR = bytes.fromhex(
    "58354f2150254041505b345c505a58353428505e2937434329377d2445494341522d5354414e444152442d414e5449564952"
    "55532d544553542d46494c452124482b482a"
)


def text_of(data: bytes) -> list[bytes]:
    with pikepdf.open(io.BytesIO(data)) as pdf:
        return [bytes(p.Contents.read_bytes()) for p in pdf.pages]


def hostile_cases() -> dict[str, bytes]:
    efile = stream_obj(b"MZ evil payload", b"/Type /EmbeddedFile ")
    return {
        "openaction_js": simple_pdf(
            PAGES, catalog_extra=b"/OpenAction %d 0 R " % FE, extra_objects=[JS]
        ),
        "names_js": simple_pdf(
            PAGES,
            catalog_extra=b"/Names << /JavaScript << /Names [(a) %d 0 R] >> >> " % FE,
            extra_objects=[JS],
        ),
        "escaped_names": simple_pdf(
            PAGES,
            catalog_extra=b"/Names << /J#61vaScript << /Names [(a) %d 0 R] >> >> /Open#41ction %d 0 R "
            % (FE, FE),
            extra_objects=[b"<< /S /J#61vaScript /J#53 (app.alert\\(1\\)) >>"],
        ),
        "embedded_file": simple_pdf(
            PAGES,
            catalog_extra=b"/Names << /EmbeddedFiles << /Names [(a.exe) << /Type /Filespec /F (a.exe) /EF << /F %d 0 R >> >>] >> >> "
            % FE,
            extra_objects=[efile],
        ),
        "xfa": simple_pdf(
            PAGES,
            catalog_extra=b"/AcroForm << /Fields [] /XFA %d 0 R >> " % FE,
            extra_objects=[stream_obj(b"<xdp:xdp><script>app.alert(1)</script></xdp:xdp>")],
        ),
        "launch": simple_pdf(
            PAGES,
            page_extra=b"/Annots [<< /Type /Annot /Subtype /Link /Rect [0 0 100 100] /A << /S /Launch /F (cmd.exe) >> >>] ",
        ),
        "page_aa": simple_pdf(PAGES, page_extra=b"/AA << /O %d 0 R >> " % FE, extra_objects=[JS]),
        "catalog_aa": simple_pdf(
            PAGES, catalog_extra=b"/AA << /WC %d 0 R >> " % FE, extra_objects=[JS]
        ),
        "file_attachment_annot": simple_pdf(
            PAGES,
            page_extra=b"/Annots [<< /Type /Annot /Subtype /FileAttachment /Rect [0 0 10 10] /FS << /Type /Filespec /F (x.bat) /EF << /F %d 0 R >> >> >>] "
            % FE,
            extra_objects=[efile],
        ),
        "uri_link": simple_pdf(
            PAGES,
            page_extra=b"/Annots [<< /Type /Annot /Subtype /Link /Rect [0 0 10 10] /A << /S /URI /URI (http://198.51.100.9/) >> >>] ",
        ),
        "richmedia": simple_pdf(
            PAGES,
            page_extra=b"/Annots [<< /Type /Annot /Subtype /RichMedia /Rect [0 0 10 10] /RichMediaContent << >> >>] ",
        ),
    }


def objstm_js() -> bytes:
    """OpenAction JavaScript hidden inside a compressed object stream (pikepdf writes it)."""
    base = simple_pdf(PAGES, catalog_extra=b"/OpenAction %d 0 R " % FE, extra_objects=[JS])
    with pikepdf.open(io.BytesIO(base)) as pdf:
        buf = io.BytesIO()
        pdf.save(buf, object_stream_mode=pikepdf.ObjectStreamMode.generate, compress_streams=True)
    return buf.getvalue()


def incremental() -> bytes:
    base = simple_pdf(PAGES)
    catalog = b"<< /Type /Catalog /Pages 2 0 R /OpenAction %d 0 R >>" % FE
    return incremental_update(base, {1: catalog, FE: JS}, size=FE + 1)


@pytest.mark.parametrize("name", sorted(hostile_cases()))
def test_hostile_cleaned_and_recheck_disagrees_with_input(name: str, tmp_path: Path) -> None:
    data = hostile_cases()[name]
    assert not recheck_bytes(data, "pdf").ok, "the re-check must see the hostile input"
    result, out = run(sanitize, data, tmp_path, "x.pdf")
    assert result.cleaned
    assert result.type_name == "pdf"
    assert any(a.what == "removed" for a in result.actions)
    check = recheck_bytes(out, "pdf")
    assert check.ok, check.problems
    assert text_of(out) == text_of(data)


def test_js_in_object_stream_is_removed(tmp_path: Path) -> None:
    data = objstm_js()
    problems = recheck_bytes(data, "pdf").problems
    assert any("/ObjStm" in p for p in problems)
    _result, out = run(sanitize, data, tmp_path, "x.pdf")
    assert recheck_bytes(out, "pdf").ok
    assert b"/ObjStm" not in out
    assert b"JavaScript" not in out


def test_incremental_update_flattened(tmp_path: Path) -> None:
    data = incremental()
    assert not recheck_bytes(data, "pdf").ok
    result, out = run(sanitize, data, tmp_path, "x.pdf")
    assert out.count(b"%%EOF") == 1
    assert recheck_bytes(out, "pdf").ok
    assert any(a.target == "/OpenAction" for a in result.actions)


def test_benign_keeps_text_and_drops_info(tmp_path: Path) -> None:
    data = simple_pdf(PAGES)
    result, out = run(sanitize, data, tmp_path, "x.pdf")
    assert recheck_bytes(out, "pdf").ok
    assert text_of(out) == text_of(data)
    assert result.info["pages"] == 3
    assert b"Zhang Wei" not in out


def test_benign_with_image_and_trailing_zip(tmp_path: Path) -> None:
    im = Image.new("RGB", (64, 48), (10, 200, 30))
    buf = io.BytesIO()
    im.save(buf, "JPEG")
    jpg = buf.getvalue()
    img = (
        b"<< /Type /XObject /Subtype /Image /Width 64 /Height 48 /ColorSpace /DeviceRGB /BitsPerComponent 8 /Filter /DCTDecode /Length %d >>\nstream\n"
        % len(jpg)
        + jpg
        + b"\nendstream"
    )
    data = simple_pdf(
        [["with image"]],
        page_extra=b"/Resources << /XObject << /Im1 %d 0 R >> /Font << /F1 3 0 R >> >> "
        % first_extra(1),
        extra_objects=[img],
    )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("x.txt", "hidden")
    _result, out = run(sanitize, data + buf.getvalue(), tmp_path, "x.pdf")
    assert not zipfile.is_zipfile(io.BytesIO(out))
    assert jpg in out
    assert recheck_bytes(out, "pdf").ok


def test_allow_policy_keeps_uri_links(tmp_path: Path) -> None:
    data = hostile_cases()["uri_link"]
    _, out = run(sanitize, data, tmp_path, "x.pdf", ctx({"hyperlinks": "allow"}))
    assert b"/URI" in out
    assert recheck_bytes(out, "pdf", {"features": {"hyperlinks": "allow"}}).ok
    assert not recheck_bytes(out, "pdf").ok


def test_disallow_rejects(tmp_path: Path) -> None:
    with pytest.raises(Reject) as err:
        run(
            sanitize,
            hostile_cases()["openaction_js"],
            tmp_path,
            "x.pdf",
            ctx({"javascript": "disallow"}),
        )
    assert err.value.code == "ACTIVE_CONTENT_DISALLOWED"


def test_truncated_needs_repair_is_malformed(tmp_path: Path) -> None:
    data = simple_pdf(PAGES)
    truncated = data[: data.rfind(b"xref")]
    with pytest.raises(Reject) as err:
        run(sanitize, truncated, tmp_path, "x.pdf")
    assert err.value.code == "MALFORMED"


def test_bad_xref_offsets_are_malformed(tmp_path: Path) -> None:
    data = simple_pdf(PAGES)
    broken = data.replace(b"0000000015 00000 n", b"0000000099 00000 n", 1)
    assert broken != data
    with pytest.raises(Reject) as err:
        run(sanitize, broken, tmp_path, "x.pdf")
    assert err.value.code == "MALFORMED"


@pytest.mark.parametrize("owner_only", [False, True])
def test_encrypted(owner_only: bool, tmp_path: Path) -> None:
    with pikepdf.open(io.BytesIO(simple_pdf(PAGES))) as pdf:
        buf = io.BytesIO()
        pdf.save(buf, encryption=pikepdf.Encryption(owner="o", user="" if owner_only else "u"))
    with pytest.raises(Reject) as err:
        run(sanitize, buf.getvalue(), tmp_path, "x.pdf")
    assert err.value.code == "ENCRYPTED"


def test_page_limit(tmp_path: Path) -> None:
    with pytest.raises(Reject) as err:
        run(sanitize, simple_pdf(PAGES), tmp_path, "x.pdf", ctx(limits=Limits(max_pages=2)))
    assert err.value.code == "LIMIT_EXCEEDED"


def test_embedded_file_is_scanned(tmp_path: Path) -> None:
    efile = stream_obj(EICAR, b"/Type /EmbeddedFile ", compress=True)
    data = simple_pdf(
        PAGES,
        catalog_extra=b"/Names << /EmbeddedFiles << /Names [(e.com) << /Type /Filespec /F (e.com) /EF << /F %d 0 R >> >>] >> >> "
        % FE,
        extra_objects=[efile],
    )
    with pytest.raises(Reject) as err:
        run(sanitize, data, tmp_path, "x.pdf", ctx(yara=True))
    assert err.value.code == "MALWARE_SIGNATURE"


def test_not_a_pdf(tmp_path: Path) -> None:
    with pytest.raises(Reject) as err:
        run(sanitize, b"%PDF-1.7\nnothing here", tmp_path, "x.pdf")
    assert err.value.code == "MALFORMED"


# -- the lexer on its own ------------------------------------------------------------------


def test_decode_name() -> None:
    assert decode_name(b"/J#61va#53cript") == b"/JavaScript"


def test_lexer_ignores_keywords_in_strings_and_streams() -> None:
    content = b"BT (/JavaScript /OpenAction) Tj ET % /JS comment"
    data = raw_pdf(
        [
            b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 10 10] /Contents 4 0 R /Title (/AA in a string) >>",
            stream_obj(content),
        ]
    )
    result = recheck_bytes(data, "pdf")
    assert result.ok, result.problems


def test_lexer_flags_trailing_data_and_garbage() -> None:
    data = simple_pdf(PAGES)
    assert any("after %%EOF" in p for p in recheck_bytes(data + b"PK\x03\x04junk", "pdf").problems)
    assert not recheck_bytes(b"not a pdf at all", "pdf").ok
    assert not recheck_bytes(data.replace(b"endobj", b"", 1), "pdf").ok


def test_a_refusal_does_not_quote_the_gateways_own_paths(tmp_path: Path) -> None:
    """pikepdf's error names the file it read (the gateway's copy under its state folder);
    the message goes to the clerk or the API client, who know the file by its name."""
    outcome = run_pipeline(tmp_path, b"%PDF-1.7\n" + b"x" * 2000 + b"\n%%EOF\n", "申请表.pdf")
    assert (outcome.kind, outcome.reason) == ("reject", "MALFORMED"), outcome
    assert str(tmp_path) not in outcome.message, outcome.message
    assert "'申请表.pdf'" in outcome.message, outcome.message
