"""File-name policy and the gateway-chosen delivered name."""

from __future__ import annotations

import pytest

from ferry.content.base import Reject
from outside.content.names import check_name, delivered_name, split_extension


@pytest.mark.parametrize(
    "name",
    [
        "invoice\u202efdp.exe",
        "report\u200b.pdf",
        "a\u2066b.txt",
        "bell\x07.txt",
        "tab\there.txt",
        "c1\x85.txt",
        "CON.txt",
        "con",
        "Aux.pdf",
        "NUL.tar.gz",
        "COM1.csv",
        "lpt9.txt",
        "COM\u00b9.txt",
        "invoice.pdf.exe",
        "photo.jpg .js",
        "letter.docx.scr",
        "data.txt.ps1",
        "a" * 252 + ".txt",
        "名" * 90 + ".txt",
        "trailing.exe.",
        "trailing space ",
        " leading.txt",
        "",
        ".",
        "..",
        "a:b.txt",
        "a/b.txt",
        'quote".txt',
        "pipe|.txt",
    ],
)
def test_refused_names(name: str) -> None:
    with pytest.raises(Reject) as err:
        check_name(name)
    assert err.value.code == "FILENAME_POLICY"
    assert err.value.message


@pytest.mark.parametrize(
    "name",
    [
        "report.pdf",
        "预算 2024.xlsx",
        "v1.2 notes.txt",
        "setup.exe",
        "README",
        "eicar.com.txt",
        "a" * 251 + ".txt",
        "résumé.docx",
        "invoice.exe.pdf",
        ".hidden.txt",
    ],
)
def test_accepted_names(name: str) -> None:
    assert check_name(name) == name


def test_nfc_normalised() -> None:
    decomposed = "re\u0301sume\u0301.txt"
    assert check_name(decomposed) == "r\u00e9sum\u00e9.txt"


@pytest.mark.parametrize(
    ("name", "type_name", "expected"),
    [
        ("report.PDF", "pdf", "report.pdf"),
        ("photo.jpeg", "jpeg", "photo.jpg"),
        ("anim.gif", "png", "anim.png"),
        ("macro.docm", "docx", "macro.docx"),
        ("README", "txt", "README.txt"),
        ("invoice.exe.pdf", "pdf", "invoice_exe.pdf"),
        ("v1.2 notes.txt", "txt", "v1.2 notes.txt"),
        (".hidden.txt", "txt", "hidden.txt"),
        ("x" * 250 + ".txt", "txt", "x" * 196 + ".txt"),
    ],
)
def test_delivered_name(name: str, type_name: str, expected: str) -> None:
    assert delivered_name(check_name(name), type_name) == expected


def test_split_extension() -> None:
    assert split_extension("a.B") == ("a", "b")
    assert split_extension("noext") == ("noext", "")
    assert split_extension(".profile") == (".profile", "")
