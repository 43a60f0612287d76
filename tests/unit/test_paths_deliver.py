"""Safe delivery names (inside.paths) and verified, atomic delivery (inside.deliver)."""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import shutil
import tempfile
import threading
import unicodedata
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest

from ferry.crypto.keys import SecretKey
from ferry.errors import EnvelopeRejected, FerryError, WireError
from ferry.names import NAME_MAX
from ferry.wire import records as rec
from ferry.wire.sender import build_trailer
from inside import deliver as deliver_mod
from inside import paths
from inside.deliver import (
    Alone,
    Delivered,
    Duplicate,
    deliver,
    deliver_batch,
    find_same_content,
    link_under_free_name,
    name_tag,
    restore_trailer,
    verify_object,
    write_new_files,
)
from inside.ledger import Ledger
from inside.paths import MAX_COLLISIONS, MAX_NAME_BYTES, candidate_names, contained, safe_name

SIGN = SecretKey("ed25519", bytes(range(32)))
OTHER_SIGN = SecretKey("ed25519", bytes(range(1, 33)))


# ---------------------------------------------------------------------- safe_name
@pytest.mark.parametrize(
    ("untrusted", "expected"),
    [
        ("report.pdf", "report.pdf"),
        ("../../etc/passwd", "passwd"),
        ("/etc/shadow", "shadow"),
        ("/", "unnamed"),
        ("dir/", "unnamed"),
        ("C:\\Windows\\System32\\evil.dll", "evil.dll"),
        ("..\\..\\boot.ini", "boot.ini"),
        ("a\x00b.txt", "a_b.txt"),
        ("tab\there\n", "tab_here_"),
        ("bell\x07\x1b[31m.txt", "bell__[31m.txt"),
        ("x\x7fy\x85z", "x_y_z"),
        ("invoice\u202efdp.exe", "invoicefdp.exe"),  # right-to-left override removed
        ("a\u200bb\u200dc\u2066d", "abcd"),
        ("\ufeffbom.txt", "bom.txt"),
        ('a:b*c?d"e<f>g|h', "a_b_c_d_e_f_g_h"),
        ("CON.txt", "_CON.txt"),
        ("con", "_con"),
        ("aux", "_aux"),
        ("AUX.tar.gz", "_AUX.tar.gz"),
        ("nul", "_nul"),
        ("COM1", "_COM1"),
        ("lpt9.log", "_lpt9.log"),
        ("COM10.txt", "COM10.txt"),
        ("CONSOLE.txt", "CONSOLE.txt"),
        ("", "unnamed"),
        (".", "unnamed"),
        ("..", "unnamed"),
        ("...", "unnamed"),
        (" ", "unnamed"),
        (" .bashrc", "bashrc"),
        ("report.pdf.", "report.pdf"),
        ("  spaced  ", "spaced"),
        ("e\u0301t\u00e9.txt", "\u00e9t\u00e9.txt"),  # NFC: decomposed e + acute is composed
        ("Cafe\u0301.txt", "Caf\u00e9.txt"),
        ("\u6587\u4ef6.txt", "\u6587\u4ef6.txt"),
        # what the outside's name policy refuses, made harmless should it come all the same
        ("COM0", "_COM0"),
        ("LPT0.log", "_LPT0.log"),
        ("COM\u00b9.txt", "_COM\u00b9.txt"),
        ("CONIN$", "_CONIN$"),
        ("clock$.txt", "_clock$.txt"),
        ("CON .txt", "_CON .txt"),
        ("readme.txt.bat", "readme.txt_bat"),
        ("photo.jpg .js", "photo.jpg _js"),
        ("invoice.pdf.EXE", "invoice.pdf_EXE"),
        ("setup.exe", "setup.exe"),  # (one extension: as the outside allows on opaque channels)
        ("-rf", "_-rf"),
        ("--help.txt", "_--help.txt"),
        ("line\u2028sep\u2029.txt", "line_sep_.txt"),
        (
            "\u7533\u8bf7\u3000\u6750\u6599.pdf",
            "\u7533\u8bf7\u3000\u6750\u6599.pdf",
        ),  # (ideographic space kept)
    ],
)
def test_safe_name(untrusted: str, expected: str) -> None:
    assert safe_name(untrusted) == expected


def test_nfc_makes_both_spellings_one_name() -> None:
    decomposed = "re\u0301sume\u0301.pdf"
    composed = "r\u00e9sum\u00e9.pdf"
    assert decomposed != composed
    assert safe_name(decomposed) == safe_name(composed) == composed


def test_long_ascii_name_keeps_its_suffix() -> None:
    name = safe_name("a" * 996 + ".pdf")  # 1000 bytes
    assert name == "a" * (MAX_NAME_BYTES - 4) + ".pdf"
    assert len(name.encode()) == MAX_NAME_BYTES


@pytest.mark.parametrize(
    "untrusted",
    [
        "\u00e9" * 500,  # 2-byte characters
        "\u6587" * 400 + ".txt",  # 3-byte characters
        "\U0001f600" * 300 + ".tar.gz",  # 4-byte characters
        "a" * 300 + "." + "b" * 20,  # a suffix too long to keep
        "x" * 250 + " " * 10 + ".pdf",
    ],
)
def test_long_names_are_cut_on_character_boundaries(untrusted: str) -> None:
    name = safe_name(untrusted)
    encoded = name.encode()  # a cut inside a character would not decode back
    assert MAX_NAME_BYTES - 4 <= len(encoded) <= MAX_NAME_BYTES
    assert encoded.decode() == name
    assert untrusted.startswith(name[:10])
    suffix = PurePosixPath(untrusted).suffix
    if len(suffix.encode()) <= 16:
        assert name.endswith(suffix)


def test_suffix_is_dropped_when_longer_than_16_bytes() -> None:
    name = safe_name("a" * 300 + "." + "b" * 20)
    assert name == "a" * MAX_NAME_BYTES


@pytest.mark.parametrize("untrusted", ["e\u200b\u0301.txt", "A\u202e\u030a"])
def test_safe_name_output_is_nfc_and_a_fixed_point(untrusted: str) -> None:
    name = safe_name(untrusted)
    assert unicodedata.is_normalized("NFC", name)
    assert safe_name(name) == name


def test_names_that_skip_the_cleaning_need_none() -> None:
    """safe_name leaves names made only of plain characters as they are, without looking at
    each character: every such character must be one the full cleaning keeps, and NFC must
    not change it. Widening that set to one character the cleaning changes fails here."""
    plain = [chr(i) for i in range(0x110000) if paths._PLAIN.fullmatch(chr(i))]
    assert len(plain) > 60  # letters, digits and the usual punctuation of file names
    assert all(ord(c) < 0x80 for c in plain)
    for c in plain:
        assert paths._clean_char(c) == c, repr(c)
        assert unicodedata.normalize("NFC", c) == c
    for c in '/\\:*?"<>|\x00\x7f\u200b\u202e\u00e9':
        assert not paths._PLAIN.fullmatch(f"a{c}b"), repr(c)


@pytest.mark.parametrize(
    "untrusted",
    ["citizen-application-00000001.json", "Report (2) final_v3.pdf", " .hidden. ", "CON.txt",
     "a~b#c&d@e=f+g,h'i.txt", "x" * 250 + ".json"],
)  # fmt: skip
def test_plain_names_are_cleaned_as_any_other(
    untrusted: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(paths, "_PLAIN", re.compile(r"(?!)"))  # never matches: full cleaning
    expected = safe_name(untrusted)
    monkeypatch.undo()
    assert paths._PLAIN.fullmatch(untrusted)
    assert safe_name(untrusted) == expected


# ------------------------------------------------------------------ candidate_names
@pytest.mark.parametrize(
    ("name", "first"),
    [
        ("report.pdf", ["report.pdf", "report (2).pdf", "report (3).pdf"]),
        ("archive.tar.gz", ["archive.tar.gz", "archive.tar (2).gz", "archive.tar (3).gz"]),
        ("README", ["README", "README (2)", "README (3)"]),
        ("unnamed", ["unnamed", "unnamed (2)", "unnamed (3)"]),
        ("_CON.txt", ["_CON.txt", "_CON (2).txt", "_CON (3).txt"]),
    ],
)
def test_candidate_names(name: str, first: list[str]) -> None:
    assert list(itertools.islice(candidate_names(name), 3)) == first


def test_candidate_names_are_bounded() -> None:
    names = list(candidate_names("a.b"))
    assert len(names) == MAX_COLLISIONS
    assert names[-1] == f"a ({MAX_COLLISIONS}).b"
    assert len(set(names)) == len(names)


def test_candidates_of_a_long_safe_name_stay_under_255_bytes() -> None:
    name = safe_name("\U0001f600" * 300 + ".txt")
    last = list(candidate_names(name))[-1]
    assert len(last.encode()) <= 255


# ------------------------------------------------------------------------ contained
ROOT = PurePosixPath("/srv/inbox/documents")


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "/abs", "a\x00b"])
def test_contained_refuses_unsafe_components(name: str) -> None:
    with pytest.raises(ValueError, match="unsafe delivery name"):
        contained(ROOT, name)


@pytest.mark.parametrize("name", ["report.pdf", "..hidden", "a..b", "_CON", " x"])
def test_contained_joins_one_component(name: str) -> None:
    assert contained(ROOT, name) == ROOT / name
    assert contained(ROOT, name).parent == ROOT


# -------------------------------------------------------------------------- deliver
class Box:
    """A tmp inside: a spool folder, a delivery folder and a real ledger."""

    def __init__(self, root: Path) -> None:
        self.spool = root / "spool"
        self.out = root / "documents"
        self.spool.mkdir()
        self.out.mkdir()
        self.ledger = Ledger(root / "state")
        self.folders = {"documents": self.out}

    def spool_object(
        self,
        oid: bytes,
        content: bytes,
        *,
        name: str = "report.pdf",
        channel: str = "documents",
        key: SecretKey = SIGN,
        **changes: object,
    ) -> tuple[Path, int]:
        fields: dict[str, object] = {
            "object_id": oid,
            "kind": "file",
            "channel": channel,
            "seq": 1,
            "name": name,
            "media_type": "application/pdf",
            "size": len(content),
            "sha256": hashlib.sha256(content).digest(),
            "created_us": 1_700_000_000_000_000,
            "mtime_us": 1_699_000_000_000_000,
            "sender": SIGN.public.key_id,
            **changes,
        }
        stream = content + build_trailer(rec.Manifest(**fields), key)  # type: ignore[arg-type]
        path = self.spool / f"{oid.hex()}.part"
        path.write_bytes(stream)
        return path, len(stream)

    def deliver(self, path: Path, oid: bytes, length: int) -> Delivered | Duplicate:
        return deliver(
            path, oid, length, sender=SIGN.public, folders=self.folders, ledger=self.ledger
        )

    def delivered_files(self) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in self.out.iterdir()}


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Box]:
    b = Box(tmp_path)
    yield b
    b.ledger.close()


OID_A = bytes(range(16))
OID_B = bytes(range(1, 17))
CONTENT = b"%PDF-1.7\n" + bytes(range(256)) * 40


def test_deliver_a_valid_object(box: Box) -> None:
    path, length = box.spool_object(OID_A, CONTENT)
    result = box.deliver(path, OID_A, length)
    assert isinstance(result, Delivered)
    assert result.path == box.out / "report.pdf"
    assert result.manifest.object_id == OID_A
    assert box.delivered_files() == {"report.pdf": CONTENT}  # the trailer is cut off
    assert not path.exists()
    assert box.ledger.state_of(OID_A) == "delivered"
    [(oid, where, name, sha)] = box.ledger.in_state("delivered")
    assert (oid, where, name, sha) == (
        OID_A,
        str(box.out / "report.pdf"),
        "report.pdf",
        hashlib.sha256(CONTENT).digest(),
    )


def test_deliver_an_empty_object(box: Box) -> None:
    path, length = box.spool_object(OID_A, b"", name="empty.txt")
    result = box.deliver(path, OID_A, length)
    assert isinstance(result, Delivered)
    assert box.delivered_files() == {"empty.txt": b""}


def test_deliver_uses_the_safe_name(box: Box) -> None:
    path, length = box.spool_object(OID_A, CONTENT, name="../../etc/passwd")
    result = box.deliver(path, OID_A, length)
    assert isinstance(result, Delivered)
    assert result.path == box.out / "passwd"
    assert result.manifest.name == "../../etc/passwd"  # the ledger keeps what was claimed
    assert box.delivered_files() == {"passwd": CONTENT}


def _refused(box: Box, path: Path, oid: bytes = OID_A) -> None:
    assert box.delivered_files() == {}
    assert box.ledger.state_of(oid) is None
    assert path.exists()  # kept for the agent to move to rejected/


@pytest.mark.parametrize("offset", [0, len(CONTENT) // 2, len(CONTENT) - 1])
def test_tampered_content_is_refused(box: Box, offset: int) -> None:
    path, length = box.spool_object(OID_A, CONTENT)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(data)
    with pytest.raises(WireError, match="SHA-256"):
        box.deliver(path, OID_A, length)
    _refused(box, path)


def test_tampered_manifest_is_refused(box: Box) -> None:
    path, length = box.spool_object(OID_A, CONTENT)
    data = bytearray(path.read_bytes())
    data[len(CONTENT) + 5] ^= 0x01  # inside the signed manifest
    path.write_bytes(data)
    with pytest.raises(EnvelopeRejected):
        box.deliver(path, OID_A, length)
    _refused(box, path)


def test_manifest_signed_by_another_key_is_refused(box: Box) -> None:
    path, length = box.spool_object(OID_A, CONTENT, key=OTHER_SIGN)
    with pytest.raises(EnvelopeRejected):
        box.deliver(path, OID_A, length)
    _refused(box, path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sender": OTHER_SIGN.public.key_id}, "another sender key"),
        ({"size": len(CONTENT) - 1}, "manifest size"),
        ({"sha256": bytes(32)}, "SHA-256"),
    ],
)
def test_inconsistent_signed_manifest_is_refused(
    box: Box, changes: dict[str, object], message: str
) -> None:
    path, length = box.spool_object(OID_A, CONTENT, **changes)
    with pytest.raises(WireError, match=message):
        box.deliver(path, OID_A, length)
    _refused(box, path)


def test_wrong_object_id_is_refused(box: Box) -> None:
    path, length = box.spool_object(OID_A, CONTENT)
    with pytest.raises(WireError, match="object id"):
        box.deliver(path, OID_B, length)
    _refused(box, path, OID_B)
    assert box.ledger.state_of(OID_A) is None


@pytest.mark.parametrize("delta", [-1, 1])
def test_wrong_object_length_is_refused(box: Box, delta: int) -> None:
    path, length = box.spool_object(OID_A, CONTENT)
    with pytest.raises(WireError, match="size"):
        box.deliver(path, OID_A, length + delta)
    _refused(box, path)


def test_object_without_a_trailer_is_refused(box: Box) -> None:
    path = box.spool / "raw.part"
    path.write_bytes(CONTENT)
    with pytest.raises(WireError, match="trailer"):
        box.deliver(path, OID_A, len(CONTENT))
    _refused(box, path)


@pytest.mark.parametrize("size", [0, 1, 7])
def test_object_shorter_than_a_trailer_tail_is_a_wire_error(box: Box, size: int) -> None:
    path = box.spool / "short.part"
    path.write_bytes(b"x" * size)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(WireError):
            verify_object(fd, OID_A, size, SIGN.public)
    finally:
        os.close(fd)


def test_unknown_channel_is_refused(box: Box) -> None:
    path, length = box.spool_object(OID_A, CONTENT, channel="images")
    with pytest.raises(FerryError, match="no file folder"):
        box.deliver(path, OID_A, length)
    assert box.delivered_files() == {}


def test_collision_gets_a_numbered_name_and_leaves_the_first_untouched(box: Box) -> None:
    first, length_a = box.spool_object(OID_A, CONTENT)
    second, length_b = box.spool_object(OID_B, b"second version")
    a = box.deliver(first, OID_A, length_a)
    b = box.deliver(second, OID_B, length_b)
    assert isinstance(a, Delivered)
    assert isinstance(b, Delivered)
    assert b.path == box.out / "report (2).pdf"
    assert box.delivered_files() == {"report.pdf": CONTENT, "report (2).pdf": b"second version"}
    assert box.ledger.state_of(OID_B) == "delivered"


def test_existing_files_and_symlinks_are_never_overwritten(box: Box, tmp_path: Path) -> None:
    (box.out / "report.pdf").write_bytes(b"someone else's file")
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"outside the folder")
    (box.out / "report (2).pdf").symlink_to(outside)
    path, length = box.spool_object(OID_A, CONTENT)
    result = box.deliver(path, OID_A, length)
    assert isinstance(result, Delivered)
    assert result.path == box.out / "report (3).pdf"
    assert (box.out / "report.pdf").read_bytes() == b"someone else's file"
    assert outside.read_bytes() == b"outside the folder"
    assert (box.out / "report (3).pdf").read_bytes() == CONTENT


def test_an_already_delivered_id_is_a_duplicate(box: Box) -> None:
    path, length = box.spool_object(OID_A, CONTENT)
    assert isinstance(box.deliver(path, OID_A, length), Delivered)
    again, length = box.spool_object(OID_A, CONTENT)
    result = box.deliver(again, OID_A, length)
    assert result == Duplicate(OID_A)
    assert not again.exists()
    assert box.delivered_files() == {"report.pdf": CONTENT}


def test_a_rejected_id_is_not_delivered_later(box: Box) -> None:
    box.ledger.record(OID_A, "rejected", reason="bad signature")
    path, length = box.spool_object(OID_A, CONTENT)
    assert box.deliver(path, OID_A, length) == Duplicate(OID_A)
    assert box.delivered_files() == {}


# ------------------------------------------------ the trailer, kept in the ledger meanwhile
class Held:
    """A ``checking`` context that says whether it is held."""

    def __init__(self) -> None:
        self.held = False

    def __enter__(self) -> None:
        self.held = True

    def __exit__(self, *exc: object) -> None:
        self.held = False


def test_the_trailer_is_in_the_ledger_before_it_is_cut_off_and_forgotten_once_delivered(
    box: Box,
) -> None:
    path, length = box.spool_object(OID_A, CONTENT)
    trailer = path.read_bytes()[len(CONTENT) :]
    checking = Held()
    seen: dict[str, object] = {}

    def recheck(manifest: rec.Manifest, spooled: Path) -> None:
        seen["held while re-checked"] = checking.held
        seen["size re-checked"] = spooled.stat().st_size  # still the whole object
        seen["trailer then"] = box.ledger.trailer_of(OID_A)

    def on_linked(manifest: rec.Manifest, target: Path) -> None:
        seen["held while linked"] = checking.held
        seen["size linked"] = path.stat().st_size
        seen["trailer linked"] = box.ledger.trailer_of(OID_A)
        seen["state linked"] = box.ledger.state_of(OID_A)

    result = deliver(
        path, OID_A, length, sender=SIGN.public, folders=box.folders, ledger=box.ledger,
        recheck=recheck, on_linked=on_linked, checking=checking,
    )  # fmt: skip
    assert isinstance(result, Delivered)
    assert seen == {
        "held while re-checked": True,
        "size re-checked": length,
        "trailer then": None,
        "held while linked": False,
        "size linked": len(CONTENT),
        "trailer linked": trailer,
        "state linked": "delivering",
    }
    assert box.ledger.trailer_of(OID_A) is None
    assert box.delivered_files() == {"report.pdf": CONTENT}


def test_a_refused_recheck_leaves_the_object_whole(box: Box) -> None:
    path, length = box.spool_object(OID_A, CONTENT)

    def refuse(manifest: rec.Manifest, spooled: Path) -> None:
        raise FerryError("the re-check refuses it")

    with pytest.raises(FerryError, match="refuses"):
        deliver(
            path, OID_A, length, sender=SIGN.public, folders=box.folders, ledger=box.ledger,
            recheck=refuse,
        )  # fmt: skip
    assert path.stat().st_size == length
    assert box.ledger.state_of(OID_A) is None
    assert box.delivered_files() == {}


def test_a_trailer_put_back_makes_the_object_verify_again(box: Box) -> None:
    path, length = box.spool_object(OID_A, CONTENT)

    def crash(manifest: rec.Manifest, target: Path) -> None:
        raise RuntimeError("killed after the link")

    with pytest.raises(RuntimeError):
        deliver(
            path, OID_A, length, sender=SIGN.public, folders=box.folders, ledger=box.ledger,
            on_linked=crash,
        )  # fmt: skip
    assert path.stat().st_size == len(CONTENT)
    trailer = box.ledger.trailer_of(OID_A)
    assert trailer is not None
    assert restore_trailer(path, len(CONTENT), trailer) == length
    fd = os.open(path, os.O_RDONLY)
    try:
        assert (
            verify_object(fd, OID_A, length, SIGN.public).sha256 == hashlib.sha256(CONTENT).digest()
        )
    finally:
        os.close(fd)
    box.ledger.record(OID_A, "delivered")
    assert box.ledger.trailer_of(OID_A) is None


# -------------------------------------------------------------------- deliver_batch
def _batch(box: Box, jobs: list[tuple[Path, bytes, int]], **kw: object) -> list[object]:
    return deliver_batch(  # type: ignore[arg-type]
        jobs, sender=SIGN.public, folders=box.folders, ledger=box.ledger, **kw
    )


def _oid(n: int) -> bytes:
    return bytes([n]) * 16


def test_a_batch_is_delivered_in_one_go_each_under_a_name_of_its_own(box: Box) -> None:
    (box.out / "report.pdf").write_bytes(b"somebody else's")
    contents = [CONTENT + bytes([n]) for n in range(4)]
    names = ["report.pdf", "report.pdf", "plan.pdf", "../etc/report.pdf"]
    jobs = []
    for n, (content, name) in enumerate(zip(contents, names, strict=True)):
        path, length = box.spool_object(_oid(n), content, name=name, seq=n + 1)
        jobs.append((path, _oid(n), length))
    trailers = {
        oid: path.read_bytes()[len(c) :] for (path, oid, _), c in zip(jobs, contents, strict=True)
    }
    seen: list[dict[str, object]] = []

    def on_linked(files: list[tuple[rec.Manifest, Path]]) -> None:
        seen.append(
            {
                "files": [(m.object_id, p.name) for m, p in files],
                "states": {box.ledger.state_of(m.object_id) for m, _ in files},
                "trailers kept": all(
                    box.ledger.trailer_of(m.object_id) == trailers[m.object_id] for m, _ in files
                ),
                "in place": all(
                    p.read_bytes() == c for (_, p), c in zip(files, contents, strict=True)
                ),
            }
        )

    results = _batch(box, jobs, on_linked=on_linked)
    assert [type(r) for r in results] == [Delivered] * 4
    wanted = ["report (2).pdf", "report (3).pdf", "plan.pdf", "report (4).pdf"]
    assert [r.path.name for r in results] == wanted  # type: ignore[attr-defined]
    assert seen == [
        {
            "files": [(_oid(n), wanted[n]) for n in range(4)],
            "states": {"delivering"},
            "trailers kept": True,
            "in place": True,
        }
    ]
    assert box.delivered_files() == {
        "report.pdf": b"somebody else's",
        **dict(zip(wanted, contents, strict=True)),
    }
    for n in range(4):
        assert box.ledger.state_of(_oid(n)) == "delivered"
        assert box.ledger.trailer_of(_oid(n)) is None
        assert box.ledger.row_of(_oid(n))["path"] == str(box.out / wanted[n])  # type: ignore[index]
    assert list(box.spool.iterdir()) == []


def test_a_batch_leaves_each_file_it_cannot_deliver_to_be_delivered_alone(box: Box) -> None:
    good, length_good = box.spool_object(_oid(1), CONTENT, name="good.pdf")
    bad, length_bad = box.spool_object(_oid(2), CONTENT, name="bad.pdf")
    data = bytearray(bad.read_bytes())
    data[10] ^= 1  # (its SHA-256 differs)
    bad.write_bytes(data)
    stray, length_stray = box.spool_object(_oid(3), CONTENT, name="x.pdf", channel="other")
    again, length_again = box.spool_object(_oid(4), CONTENT, name="again.pdf")
    box.ledger.record(_oid(4), "delivered")  # (a repeat of one delivered before)
    jobs = [
        (good, _oid(1), length_good),
        (bad, _oid(2), length_bad),
        (stray, _oid(3), length_stray),
        (again, _oid(4), length_again),
    ]
    results = _batch(box, jobs)
    assert [type(r) for r in results] == [Delivered, Alone, Alone, Duplicate]
    assert box.delivered_files() == {"good.pdf": CONTENT}
    assert bad.read_bytes() == data  # untouched, for deliver() to refuse with its reason
    assert stray.stat().st_size == length_stray
    assert box.ledger.state_of(_oid(2)) is None
    assert box.ledger.state_of(_oid(3)) is None
    assert not again.exists()
    with pytest.raises(WireError, match="SHA-256"):
        box.deliver(bad, _oid(2), length_bad)


def test_a_batch_whose_records_fail_is_left_delivering_and_settles_as_after_a_crash(
    box: Box,
) -> None:
    jobs = []
    for n in range(3):
        path, length = box.spool_object(_oid(n), CONTENT + bytes([n]), name=f"f{n}.pdf")
        jobs.append((path, _oid(n), length))

    def audit_down(files: list[tuple[rec.Manifest, Path]]) -> None:
        raise FerryError("the audit log cannot be written")

    results = _batch(box, jobs, on_linked=audit_down)
    assert [type(r) for r in results] == [Alone] * 3
    for n, (path, oid, length) in enumerate(jobs):
        assert box.ledger.state_of(oid) == "delivering"
        assert (box.out / f"f{n}.pdf").read_bytes() == CONTENT + bytes([n])  # linked
        trailer = box.ledger.trailer_of(oid)
        assert trailer is not None
        assert restore_trailer(path, len(CONTENT) + 1, trailer) == length


def test_a_batch_for_a_folder_on_another_file_system_is_left_to_copy(box: Box) -> None:
    shm = Path("/dev/shm")
    if os.stat(shm).st_dev == os.stat(box.spool).st_dev:
        pytest.skip("/dev/shm is on the spool's file system here")
    folder = Path(tempfile.mkdtemp(dir=shm))
    try:
        box.folders["documents"] = folder
        jobs = []
        for n in range(2):
            path, length = box.spool_object(_oid(n), CONTENT, name=f"f{n}.pdf")
            jobs.append((path, _oid(n), length))
        assert [type(r) for r in _batch(box, jobs)] == [Alone, Alone]
        assert list(folder.iterdir()) == []
        assert box.ledger.state_of(_oid(0)) is None
        result = box.deliver(*jobs[0])  # (copied across)
        assert isinstance(result, Delivered)
        assert (folder / "f0.pdf").read_bytes() == CONTENT
    finally:
        shutil.rmtree(folder)


def test_a_file_for_a_channel_with_no_folder_is_refused_before_its_content_is_read(
    box: Box, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(Hashing gigabytes first would hold up every channel's checks meanwhile.)"""
    content = CONTENT * 50
    path, length = box.spool_object(OID_A, content, channel="elsewhere")
    reads: list[int] = []
    real = os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        reads.append(offset)
        return real(fd, n, offset)

    monkeypatch.setattr(os, "pread", pread)
    with pytest.raises(FerryError, match="no file folder"):
        box.deliver(path, OID_A, length)
    assert reads  # (the trailer)
    assert min(reads) >= len(content)  # never the content
    _refused(box, path)


def test_a_fifo_planted_under_the_next_name_holds_nothing_up(tmp_path: Path) -> None:
    """Message names are predictable (<schema>-<seq>.json): an inner user who plants a FIFO
    there made the check for an earlier copy open it and wait for ever (the channel with it)."""
    folder = tmp_path / "messages"
    folder.mkdir()
    os.mkfifo(folder / "notice-00000042.json")
    body = b'{"a":1}'
    out: list[object] = []
    work = threading.Thread(
        target=lambda: out.append(
            write_new_files(folder, [("notice-00000042.json", body, hashlib.sha256(body).digest())])
        ),
        daemon=True,
    )
    work.start()
    work.join(10)
    assert not work.is_alive()
    assert out == [[folder / "notice-00000042 (2).json"]]
    assert (folder / "notice-00000042 (2).json").read_bytes() == body
    assert find_same_content(folder, "notice-00000042.json", b"x" * 32) is None


def test_a_kept_subfolder_swapped_for_a_symlink_meanwhile_gets_nothing(
    box: Box, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The subfolder was checked, then the file linked by its path some milliseconds later:
    an inner user who swapped the folder for a symlink in between had the file land wherever
    the symlink pointed (another channel's folder, the agent's state). The folder is now
    pinned when it is checked, and the file goes into that very folder."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    real = deliver_mod.link_under_free_name

    def swapped(*args: object, **kw: object) -> Path:
        os.rename(box.out / "inbox", box.out / "inbox-moved")  # (as the inner user does)
        os.symlink(elsewhere, box.out / "inbox")
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(deliver_mod, "link_under_free_name", swapped)
    path, length = box.spool_object(OID_A, CONTENT, path="inbox")
    result = deliver(
        path, OID_A, length, sender=SIGN.public, folders=box.folders, ledger=box.ledger,
        subfolders={"documents": True},
    )  # fmt: skip
    assert isinstance(result, Delivered)
    assert list(elsewhere.iterdir()) == []
    assert (box.out / "inbox-moved" / "report.pdf").read_bytes() == CONTENT
    assert result.path == box.out / "inbox" / "report.pdf"  # (where it was made)


def _plant_every_numbered_name(folder: Path, name: str) -> None:
    for candidate in candidate_names(name):
        os.close(os.open(folder / candidate, os.O_CREAT | os.O_WRONLY, 0o600))


def test_every_numbered_name_planted_still_leaves_the_item_a_name(tmp_path: Path) -> None:
    """An inner user who may write in the delivery folder plants report.pdf, report (2).pdf
    ... report (10000).pdf: the message still gets a name, tagged with its random id."""
    folder = tmp_path / "messages"
    folder.mkdir()
    _plant_every_numbered_name(folder, "notice-00000042.json")
    body = b'{"a":1}'
    sha = hashlib.sha256(body).digest()
    oid = bytes.fromhex("a1b2c3d4e5f6") + os.urandom(10)
    out = write_new_files(folder, [("notice-00000042.json", body, sha)], [name_tag(oid)])
    assert out == [folder / "notice-00000042 (a1b2c3d4e5f6).json"]
    assert out[0].read_bytes() == body
    # a repeat (a crash before the ledger said so) finds it there: no second copy
    again = write_new_files(folder, [("notice-00000042.json", body, sha)], [name_tag(oid)])
    assert again == out
    assert len(os.listdir(folder)) == MAX_COLLISIONS + 1
    assert find_same_content(folder, "notice-00000042.json", sha, name_tag(oid)) == out[0]
    with pytest.raises(FerryError, match="no free name"):  # (without a tag, as before)
        write_new_files(folder, [("notice-00000042.json", b"{}", hashlib.sha256(b"{}").digest())])


@pytest.mark.slow  # (10,000 files planted: seconds)
def test_a_file_gets_its_tagged_name_when_every_numbered_one_is_planted(tmp_path: Path) -> None:
    folder = tmp_path / "documents"
    folder.mkdir()
    _plant_every_numbered_name(folder, "report.pdf")
    src = tmp_path / "spooled"
    src.write_bytes(b"%PDF-1.7 the report")
    fd = os.open(src, os.O_RDONLY)
    try:
        target = link_under_free_name(src, fd, 19, folder, "report.pdf", tag="0123456789ab")
    finally:
        os.close(fd)
    assert target == folder / "report (0123456789ab).pdf"
    assert target.read_bytes() == b"%PDF-1.7 the report"


def test_the_tag_comes_after_every_numbered_name_and_fits() -> None:
    names = list(candidate_names("x" * 251 + ".pdf", tag="0123456789ab"))
    assert len(names) == MAX_COLLISIONS + 1
    assert names[-1].endswith(" (0123456789ab).pdf")
    assert len(names[-1].encode()) <= NAME_MAX
    assert names[:-1] == list(candidate_names("x" * 251 + ".pdf"))


@pytest.mark.slow  # (10,000 files planted: seconds)
def test_deliver_and_deliver_batch_use_the_item_tag_past_the_numbered_names(box: Box) -> None:
    _plant_every_numbered_name(box.out, "report.pdf")
    path, length = box.spool_object(OID_A, CONTENT)
    result = box.deliver(path, OID_A, length)
    assert isinstance(result, Delivered)
    assert result.path == box.out / f"report ({OID_A[:6].hex()}).pdf"
    assert result.path.read_bytes() == CONTENT
    path, length = box.spool_object(OID_B, CONTENT + b"2", seq=2)
    [done] = _batch(box, [(path, OID_B, length)])
    assert isinstance(done, Delivered)
    assert done.path == box.out / f"report ({OID_B[:6].hex()}).pdf"
