"""The clerk's original, once taken: moved to the channel's ``sent`` folder under its own
name or the first free numbered one, never over a file and never past the 255-byte name
limit (ferry.names.candidate_names, outside.intake._place_original)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
from intake_helpers import Gateway

from ferry.names import MAX_COLLISIONS, NAME_MAX, candidate_names
from outside.intake import _place_original, _Placed


@pytest.mark.parametrize(
    "name",
    [
        "x" * 251 + ".pdf",  # 255 bytes: " (2)" must come out of the stem
        "申" * 83 + ".txt",  # 253 bytes, three per character: no character is cut
        "y" * 255,  # no extension
        "z" * 200 + "." + "e" * 54,  # an "extension" too long to keep apart
        os.fsdecode(b"\xff" * 250 + b".doc"),  # undecodable bytes, as os.listdir gives them
    ],
)
def test_every_numbered_name_fits_and_none_repeats(name: str) -> None:
    names = list(candidate_names(name))
    assert names[0] == name
    assert len(names) == MAX_COLLISIONS == len(set(names))
    for n, candidate in enumerate(names[1:], start=2):
        raw = os.fsencode(candidate)
        assert len(raw) <= NAME_MAX
        assert f" ({n})" in candidate
        raw.decode("utf-8", "surrogateescape")  # whole characters only
    if name.endswith((".pdf", ".txt", ".doc")):
        assert all(c.endswith(name[-4:]) for c in names)


def test_short_names_keep_their_stem_and_extension() -> None:
    assert list(itertools.islice(candidate_names("report.pdf"), 3)) == [
        "report.pdf",
        "report (2).pdf",
        "report (3).pdf",
    ]
    assert list(itertools.islice(candidate_names("archive.tar.gz"), 2))[1] == "archive.tar (2).gz"


def _place(src: Path, target: Path) -> _Placed:
    """_place_original by the two folders' descriptors, as the intake calls it."""
    a = os.open(src.parent, os.O_RDONLY | os.O_DIRECTORY)
    b = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return _place_original(a, src.name, b, target.name)
    finally:
        os.close(a)
        os.close(b)


def test_a_taken_name_is_never_replaced(tmp_path: Path) -> None:
    src, taken = tmp_path / "a.txt", tmp_path / "sent.txt"
    src.write_bytes(b"new")
    taken.write_bytes(b"somebody else's")
    assert _place(src, taken) is _Placed.TAKEN
    assert taken.read_bytes() == b"somebody else's"
    assert src.read_bytes() == b"new"


def test_a_move_cut_short_after_the_link_is_finished(tmp_path: Path) -> None:
    src, target = tmp_path / "a.txt", tmp_path / "sent.txt"
    src.write_bytes(b"original")
    os.link(src, target)  # a crash between the link and the unlink
    assert _place(src, target) is _Placed.MOVED
    assert not src.exists()
    assert target.read_bytes() == b"original"


def test_a_symlink_in_sent_is_a_taken_name(tmp_path: Path) -> None:
    src, target = tmp_path / "a.txt", tmp_path / "sent.txt"
    src.write_bytes(b"original")
    target.symlink_to(tmp_path / "nowhere")
    assert _place(src, target) is _Placed.TAKEN
    assert target.is_symlink()
    assert src.exists()


def test_a_long_name_sent_twice_gets_a_numbered_name_that_fits(gateway: Gateway) -> None:
    name = "申" * 83 + ".txt"  # 253 bytes: "<stem> (2).txt" would be 257
    sent = gateway.channel.sent
    assert sent is not None
    assert gateway.drop_file(name, b"first version\n")
    assert gateway.drop_file(name, b"second version\n")
    assert not (gateway.drop / name).exists()  # both originals left the drop folder
    numbered = [n for n in os.listdir(sent) if n != name]
    assert (sent / name).read_bytes() == b"first version\n"
    assert len(numbered) == 1
    assert numbered[0].endswith(" (2).txt")
    assert numbered[0].startswith("申" * 80)
    assert len(numbered[0].encode()) <= NAME_MAX
    assert (sent / numbered[0]).read_bytes() == b"second version\n"
