"""ferry.audit.merkle: RFC 6962 tree, RFC 9162 proofs, C2SP checkpoint notes."""

from __future__ import annotations

import base64
import hashlib
import io

import pytest

from ferry.audit import merkle
from ferry.audit.merkle import (
    EMPTY_ROOT,
    MAX_NOTE_LINE,
    SIG_PREFIX,
    Checkpoint,
    CompactRange,
    MerkleTree,
    leaf_hash,
    node_hash,
    note_key_id,
    parse_notes,
    root_of,
    sign_checkpoint,
    verify_consistency,
    verify_inclusion,
)
from ferry.crypto.keys import SecretKey

KEY = SecretKey("ed25519", bytes(range(32)))
OTHER = SecretKey("ed25519", bytes(range(1, 33)))
ORIGIN = "outside.test/audit"

# The RFC 6962 test vectors of the certificate-transparency reference implementation
# (also used by Trillian and transparency-dev): leaf inputs and the root of each prefix.
CT_LEAVES = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    b"\x50\x51\x52\x53\x54\x55\x56\x57",
    b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
]
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_INCLUSION = {
    (0, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (5, 8): [
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
}
CT_CONSISTENCY = {
    (1, 1): [],
    (1, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (6, 8): [
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
    (2, 5): [
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    ],
}
CT_TREE = MerkleTree([leaf_hash(d) for d in CT_LEAVES])


def _leaves(n: int) -> list[bytes]:
    return [leaf_hash(f"record {i}".encode()) for i in range(n)]


def _flip(h: bytes) -> bytes:
    return bytes([h[0] ^ 1]) + h[1:]


# --- tree heads ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", range(len(CT_ROOTS)))
def test_roots_match_the_rfc6962_vectors(size: int) -> None:
    leaves = [leaf_hash(d) for d in CT_LEAVES[:size]]
    compact = CompactRange()
    for leaf in leaves:
        compact.append(leaf)
    assert root_of(leaves).hex() == CT_ROOTS[size]
    assert compact.root().hex() == CT_ROOTS[size]
    assert CT_TREE.root(size).hex() == CT_ROOTS[size]


def test_empty_tree_root_is_sha256_of_nothing() -> None:
    assert CompactRange().root() == EMPTY_ROOT == hashlib.sha256(b"").digest()
    assert MerkleTree().root() == EMPTY_ROOT


def test_compact_range_agrees_with_the_definition_up_to_130_leaves() -> None:
    leaves = _leaves(130)
    compact = CompactRange()
    tree = MerkleTree()
    for n, leaf in enumerate(leaves, 1):
        compact.append(leaf)
        tree.append(leaf)
        expected = root_of(leaves[:n])
        assert compact.root() == expected == tree.root()
        assert len(compact.hashes) == n.bit_count()  # O(log n) state


def test_compact_range_resumes_from_its_saved_state() -> None:
    leaves = _leaves(77)
    first = CompactRange()
    for leaf in leaves[:50]:
        first.append(leaf)
    resumed = CompactRange(first.size, first.hashes)
    for leaf in leaves[50:]:
        resumed.append(leaf)
    assert resumed.root() == root_of(leaves)
    assert first.copy().root() == first.root()


@pytest.mark.parametrize(("size", "count"), [(5, 1), (5, 3), (4, 0), (-1, 0)])
def test_compact_range_rejects_a_state_of_the_wrong_shape(size: int, count: int) -> None:
    with pytest.raises(ValueError, match=r"tree size|needs"):
        CompactRange(size, [bytes(32)] * count)


def test_node_hash_is_domain_separated_from_leaves() -> None:
    a, b = leaf_hash(b"a"), leaf_hash(b"b")
    assert node_hash(a, b) != leaf_hash(a + b)
    assert node_hash(a, b) == hashlib.sha256(b"\x01" + a + b).digest()


# --- inclusion proofs -------------------------------------------------------------------------


@pytest.mark.parametrize(("index", "size"), list(CT_INCLUSION))
def test_inclusion_proofs_match_the_vectors(index: int, size: int) -> None:
    proof = CT_TREE.inclusion_proof(index, size)
    assert [p.hex() for p in proof] == CT_INCLUSION[(index, size)]
    assert verify_inclusion(CT_TREE.leaf(index), index, size, proof, CT_TREE.root(size))


def test_every_inclusion_proof_verifies_and_every_tampering_fails() -> None:
    leaves = _leaves(40)
    tree = MerkleTree(leaves)
    for size in range(1, 41):
        root = tree.root(size)
        for index in range(size):
            proof = tree.inclusion_proof(index, size)
            assert len(proof) <= (size - 1).bit_length()
            leaf = leaves[index]
            assert verify_inclusion(leaf, index, size, proof, root)
            assert not verify_inclusion(_flip(leaf), index, size, proof, root)
            assert not verify_inclusion(leaf, index, size, proof, _flip(root))
            assert not verify_inclusion(leaf, size, size, proof, root)
            assert not verify_inclusion(leaf, index, size, [*proof, leaf], root)
            if index + 1 < size:
                assert not verify_inclusion(leaf, index + 1, size, proof, root)
            for i in range(len(proof)):
                bad = [*proof[:i], _flip(proof[i]), *proof[i + 1 :]]
                assert not verify_inclusion(leaf, index, size, bad, root)
            if proof:
                assert not verify_inclusion(leaf, index, size, proof[:-1], root)


def test_inclusion_proof_of_an_absent_leaf_is_refused() -> None:
    with pytest.raises(ValueError, match="not in a tree"):
        CT_TREE.inclusion_proof(8, 8)
    with pytest.raises(ValueError, match="beyond"):
        CT_TREE.root(9)
    assert not verify_inclusion(bytes(32), 0, 0, [], EMPTY_ROOT)
    assert not verify_inclusion(bytes(32), 0, 1, [b"short"], EMPTY_ROOT)


# --- consistency proofs -----------------------------------------------------------------------


@pytest.mark.parametrize(("old", "new"), list(CT_CONSISTENCY))
def test_consistency_proofs_match_the_vectors(old: int, new: int) -> None:
    proof = CT_TREE.consistency_proof(old, new)
    assert [p.hex() for p in proof] == CT_CONSISTENCY[(old, new)]
    assert verify_consistency(old, new, CT_TREE.root(old), CT_TREE.root(new), proof)


def test_every_consistency_proof_verifies_and_every_tampering_fails() -> None:
    leaves = _leaves(40)
    tree = MerkleTree(leaves)
    for new in range(41):
        new_root = tree.root(new)
        for old in range(new + 1):
            old_root = tree.root(old)
            proof = tree.consistency_proof(old, new)
            assert len(proof) <= max(new - 1, 0).bit_length() + 1
            assert verify_consistency(old, new, old_root, new_root, proof)
            if old in (0, new):
                assert proof == []
                if old == new:
                    assert not verify_consistency(old, new, old_root, _flip(new_root), proof)
                    assert not verify_consistency(old, new, old_root, new_root, [new_root])
                continue
            assert not verify_consistency(old, new, _flip(old_root), new_root, proof)
            assert not verify_consistency(old, new, old_root, _flip(new_root), proof)
            assert not verify_consistency(new, old, new_root, old_root, proof)
            assert not verify_consistency(old, new, old_root, new_root, [])
            for i in range(len(proof)):
                bad = [*proof[:i], _flip(proof[i]), *proof[i + 1 :]]
                assert not verify_consistency(old, new, old_root, new_root, bad)


def test_a_rewritten_or_shrunk_tree_is_not_consistent() -> None:
    leaves = _leaves(20)
    tree = MerkleTree(leaves)
    forged = MerkleTree([*leaves[:6], leaf_hash(b"forged"), *leaves[7:]])
    proof = forged.consistency_proof(10, 20)
    assert not verify_consistency(10, 20, tree.root(10), forged.root(20), proof)
    assert not verify_consistency(10, 20, tree.root(10), tree.root(20), proof)
    with pytest.raises(ValueError, match="exceeds"):
        tree.consistency_proof(21, 20)


# --- checkpoint notes -------------------------------------------------------------------------


def _note(size: int = 5, key: SecretKey = KEY, origin: str = ORIGIN) -> bytes:
    return sign_checkpoint(Checkpoint(origin, size, CT_TREE.root(size)), key)


def test_checkpoint_note_is_c2sp_tlog_checkpoint_with_a_signed_note_line() -> None:
    root = CT_TREE.root(5)
    note = _note(5)
    text = f"{ORIGIN}\n5\n{base64.b64encode(root).decode()}\n".encode()
    assert note.startswith(text + b"\n" + "\u2014 ".encode() + ORIGIN.encode() + b" ")
    assert note.endswith(b"\n")
    assert note.count(b"\n") == 5
    blob = base64.b64decode(note.split(b" ")[-1])
    key_id = hashlib.sha256(ORIGIN.encode() + b"\n\x01" + KEY.public.raw).digest()[:4]
    assert blob[:4] == key_id == note_key_id(ORIGIN, KEY.public)
    assert KEY.public.verify(blob[4:], text)  # plain Ed25519 over the text, as C2SP says


def test_notes_parse_back_with_their_positions() -> None:
    data = _note(3) + b"\n" + _note(5) + b"\n"
    parsed = parse_notes(data)
    assert parsed.error is None
    assert parsed.torn_at is None
    first, second = parsed.notes
    assert (first.checkpoint.size, second.checkpoint.size) == (3, 5)
    assert second.checkpoint.root == CT_TREE.root(5)
    assert (first.line, second.line) == (1, 7)
    assert second.offset == len(_note(3)) + 1
    assert second.end == len(data) - 1
    assert first.signature_status(KEY.public) == "valid"
    assert first.signature_status(OTHER.public) == "absent"


def test_a_note_signed_by_another_key_is_absent_and_a_bad_signature_invalid() -> None:
    (other,) = parse_notes(_note(5, OTHER)).notes
    assert other.signature_status(KEY.public) == "absent"
    note = bytearray(_note(5))
    note[-10] ^= 0x01  # inside the base64 signature, same key id
    (bad,) = parse_notes(bytes(note)).notes
    assert bad.signature_status(KEY.public) == "invalid"


def test_cosignatures_by_unknown_keys_are_ignored() -> None:
    text = Checkpoint(ORIGIN, 5, CT_TREE.root(5)).text()
    extra = SIG_PREFIX + b"witness.example " + base64.b64encode(b"\x01\x02\x03\x04" + bytes(64))
    note = _note(5) + extra + b"\n"
    (parsed,) = parse_notes(note).notes
    assert parsed.text == text
    assert len(parsed.signatures) == 2
    assert parsed.signature_status(KEY.public) == "valid"


@pytest.mark.parametrize(
    ("data", "line", "reason"),
    [
        (b"origin\n5\n", None, None),  # torn: ends inside the text
        (b"bad origin!\n5\nAAAA\n\n\xe2\x80\x94 x AAAA\n", 1, "bad origin line"),
        (b"o\n05\nAAAA\n\n\xe2\x80\x94 x AAAA\n", 2, "bad tree size line"),
        (b"o\n5\n!!!!\n\n\xe2\x80\x94 x AAAA\n", 3, "root line is not base64"),
        (b"o\n5\nAAAA\n\n\xe2\x80\x94 x AAAA\n", 3, "root line is not a base64 SHA-256"),
        (b"o\n5\n" + b"A" * 43 + b"=\next\n\n", 4, "extension lines"),
        (b"o\n5\n" + b"A" * 43 + b"=\n\nnot a signature\n", 5, "expected a signature"),
    ],
)
def test_malformed_notes_name_their_line(data: bytes, line: int | None, reason: str | None) -> None:
    parsed = parse_notes(data)
    if line is None:
        assert parsed.torn_at == 0
        assert parsed.error is None
        return
    assert parsed.error is not None
    assert parsed.error.line == line
    assert reason is not None
    assert reason in parsed.error.reason


def test_a_torn_final_note_is_reported_after_the_complete_ones() -> None:
    whole = _note(3) + b"\n"
    for cut in range(1, len(_note(5))):
        parsed = parse_notes(whole + _note(5)[:cut])
        assert len(parsed.notes) == 1, cut
        assert parsed.torn_at == len(whole)
        assert parsed.error is None


def test_a_note_torn_inside_a_later_signature_is_torn_whole() -> None:
    """A key rotation signs twice: a crash inside the second signature line leaves an
    incomplete note, cut off whole (not kept with one signature)."""
    whole = _note(3) + b"\n"
    two = sign_checkpoint(Checkpoint(ORIGIN, 5, CT_TREE.root(5)), KEY, OTHER)
    second = two.index(b"\n", two.index(SIG_PREFIX)) + 1  # where the second signature starts
    for cut in range(second + 1, len(two)):
        parsed = parse_notes(whole + two[:cut])
        assert len(parsed.notes) == 1, cut
        assert parsed.torn_at == len(whole), cut
        assert parsed.torn == two[:cut]
        assert parsed.error is None
    (note,) = parse_notes(two).notes  # the whole note, even without the blank line after it
    assert len(note.signatures) == 2


@pytest.mark.parametrize("separator", [b"", b"\n"])
@pytest.mark.parametrize("tail", [b"", b"\n"])
def test_at_most_one_blank_line_follows_a_note(separator: bytes, tail: bytes) -> None:
    data = _note(3) + separator + _note(5) + tail
    parsed = parse_notes(data)
    assert (parsed.error, parsed.torn_at) == (None, None)
    assert [n.checkpoint.size for n in parsed.notes] == [3, 5]
    assert parsed.size == len(data)


@pytest.mark.parametrize(
    ("data", "line", "notes", "reason"),
    [
        (b"\n" + _note(3), 1, 0, "a blank line before the first checkpoint"),
        (_note(3) + b"\n\n" + _note(5) + b"\n", 7, 1, "a second blank line"),
        (_note(3) + b"\n\n", 7, 1, "a second blank line"),
        (_note(3) + b"\n" * 100_000, 7, 1, "a second blank line"),
        (_note(3) + b"\nnot a note!\n", 7, 1, "bad origin line"),
        (_note(3) + b"\n" + b"A" * (MAX_NOTE_LINE + 1) + b"\n", 7, 1, "longer than 1024"),
        (_note(3) + b"\n" + SIG_PREFIX + b"x " + b"A" * 2000 + b"\n", 7, 1, "longer than"),
    ],
)
def test_bytes_after_a_note_that_are_no_note_are_malformed(
    data: bytes, line: int, notes: int, reason: str
) -> None:
    """Extra blank lines or junk after the last note are an error naming the line (a
    torn write leaves neither), not skipped or taken for a torn note."""
    parsed = parse_notes(data)
    assert parsed.error is not None
    assert parsed.torn_at is None
    assert (parsed.error.line, len(parsed.notes)) == (line, notes)
    assert reason in parsed.error.reason


def test_a_long_line_is_refused_after_reading_one_line_limit_of_it() -> None:
    data = _note(3) + b"\n" + b"A" * (8 << 20)
    stream = io.BytesIO(data)
    parsed = merkle.read_notes(stream)
    assert parsed.error is not None
    assert parsed.error.line == 7
    assert stream.tell() == len(_note(3)) + 1 + MAX_NOTE_LINE + 1  # no more of the line


def test_notes_are_read_one_at_a_time_from_where_a_stream_stands() -> None:
    """The witness reads on from just past the last note it took: one blank line first."""
    data = _note(3) + b"\n" + _note(5) + b"\n"
    stream = io.BytesIO(data)
    (first,) = merkle.read_notes(stream, max_notes=1).notes
    stream.seek(first.end)
    parsed = merkle.read_notes(stream, after_note=True, max_notes=1)
    (second,) = parsed.notes
    assert second.checkpoint.size == 5
    assert first.end + second.offset == len(_note(3)) + 1
    stream.seek(first.end + second.end)
    assert merkle.read_notes(stream, after_note=True) == merkle.ParsedNotes((), size=1)
    stream.seek(first.end)
    assert merkle.read_notes(stream).error is not None  # without after_note: a blank line


def test_origin_must_be_a_key_name() -> None:
    with pytest.raises(ValueError, match="origin"):
        sign_checkpoint(Checkpoint("has space", 1, bytes(32)), KEY)
