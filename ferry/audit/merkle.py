"""RFC 6962 / RFC 9162 Merkle tree over audit records, and C2SP signed checkpoints.

Pure: bytes and values in, values out (no files, clocks or threads).

Tree (RFC 9162 section 2.1, identical to C2SP ``merkle-tree``):

* leaf hash ``SHA-256(0x00 || record line without its newline)``;
* node hash ``SHA-256(0x01 || left || right)``;
* the tree of ``n`` leaves splits at ``k``, the largest power of two below ``n``;
  the empty tree's root is ``SHA-256("")``.

:class:`CompactRange` holds only the roots of the perfect subtrees of the
current tree (at most ``log2 n + 1`` hashes): append is amortised O(1) hashes,
memory O(log n). The writer and the verifier use it. :class:`MerkleTree` keeps
every complete level (about ``2n`` hashes) to produce inclusion and consistency
proofs in O(log^2 n); :func:`verify_inclusion` and :func:`verify_consistency`
are the RFC 9162 section 2.1.3.2 and 2.1.4.2 algorithms.

Checkpoints are C2SP ``tlog-checkpoint`` notes signed as C2SP ``signed-note``::

    <origin>\\n<size>\\n<base64 root>\\n\\n\\u2014 <origin> <base64(key id[4] || Ed25519 sig)>\\n

The signature is plain Ed25519 over the note text (the first three lines with
their newlines), as C2SP specifies, so standard note verifiers (Go
``sumdb/note``, sigsum, transparency-dev witnesses) accept ferry checkpoints.
Domain separation comes from the dedicated audit key, which signs nothing else,
and from the origin line. The key id is ``SHA-256(name || 0x0A || 0x01 || pk)[:4]``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from ferry.crypto.keys import PublicKey, SecretKey

HASH_LEN = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
# A tree size is a u64 in every transparency-log format (and a JSON-safe idx stays below 2^53).
MAX_TREE_SIZE = 2**63 - 1
# A checkpoint note is three short lines and a few signatures; anything longer is not ours.
MAX_NOTE_LINE = 1024
# C2SP: implementations may reject notes with more than 100 signatures.
MAX_NOTE_SIGNATURES = 100
SIG_PREFIX = "\u2014 ".encode()  # EM DASH + space starts every signature line
ED25519_SIG_TYPE = b"\x01"
_ORIGIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:~-]{0,254}")
_SIZE = re.compile(rb"0|[1-9][0-9]{0,18}")


def leaf_hash(data: bytes) -> bytes:
    """RFC 6962 leaf hash of one record line (without its newline)."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 6962 interior node hash."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly below ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


def root_of(leaves: Sequence[bytes]) -> bytes:
    """MTH over leaf hashes by the recursive definition (a reference for tests)."""
    if not leaves:
        return EMPTY_ROOT
    if len(leaves) == 1:
        return leaves[0]
    k = _split(len(leaves))
    return node_hash(root_of(leaves[:k]), root_of(leaves[k:]))


class CompactRange:
    """The right edge of a tree: the roots of its perfect subtrees, largest first."""

    __slots__ = ("_hashes", "_size")

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()) -> None:
        if not 0 <= size <= MAX_TREE_SIZE:
            raise ValueError("tree size out of range")
        if len(hashes) != size.bit_count() or any(len(h) != HASH_LEN for h in hashes):
            raise ValueError(f"a tree of size {size} needs {size.bit_count()} 32-byte hashes")
        self._size = size
        self._hashes = list(hashes)

    @property
    def size(self) -> int:
        return self._size

    @property
    def hashes(self) -> tuple[bytes, ...]:
        """The perfect subtree roots, largest subtree first (the saved state)."""
        return tuple(self._hashes)

    def append(self, leaf: bytes) -> None:
        """Add one leaf hash: merge equal-sized subtrees like a binary counter."""
        h, s = leaf, self._size
        hashes = self._hashes
        while s & 1:
            h = node_hash(hashes.pop(), h)
            s >>= 1
        hashes.append(h)
        self._size += 1

    def root(self) -> bytes:
        """The tree head: fold the subtree roots from the right."""
        if not self._hashes:
            return EMPTY_ROOT
        it = reversed(self._hashes)
        r = next(it)
        for h in it:
            r = node_hash(h, r)
        return r

    def copy(self) -> CompactRange:
        return CompactRange(self._size, self._hashes)


class MerkleTree:
    """All complete levels of a tree, for O(log^2 n) proofs. Memory about 2n hashes."""

    __slots__ = ("_levels",)

    def __init__(self, leaves: Sequence[bytes] = ()) -> None:
        self._levels: list[list[bytes]] = [[]]
        for leaf in leaves:
            self.append(leaf)

    @property
    def size(self) -> int:
        return len(self._levels[0])

    def append(self, leaf: bytes) -> None:
        if len(leaf) != HASH_LEN:
            raise ValueError("a leaf hash is 32 bytes")
        levels = self._levels
        levels[0].append(leaf)
        level, h = 0, leaf
        while len(levels[level]) % 2 == 0:
            h = node_hash(levels[level][-2], h)
            level += 1
            if level == len(levels):
                levels.append([])
            levels[level].append(h)

    def leaf(self, index: int) -> bytes:
        return self._levels[0][index]

    def _subtree(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]) for the ranges RFC 6962's recursion produces."""
        n = end - start
        if n & (n - 1) == 0 and start % n == 0:
            return self._levels[n.bit_length() - 1][start // n]
        k = _split(n)
        return node_hash(self._subtree(start, start + k), self._subtree(start + k, end))

    def _check_size(self, size: int | None) -> int:
        n = self.size if size is None else size
        if not 0 <= n <= self.size:
            raise ValueError(f"tree size {n} is beyond the {self.size} leaves held")
        return n

    def root(self, size: int | None = None) -> bytes:
        n = self._check_size(size)
        return EMPTY_ROOT if n == 0 else self._subtree(0, n)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """RFC 6962 PATH(index, D[0:size])."""
        n = self._check_size(size)
        if not 0 <= index < n:
            raise ValueError(f"leaf {index} is not in a tree of size {n}")
        proof: list[bytes] = []
        start, end, m = 0, n, index
        while end - start > 1:
            k = _split(end - start)
            if m < k:
                proof.append(self._subtree(start + k, end))
                end = start + k
            else:
                proof.append(self._subtree(start, start + k))
                start, m = start + k, m - k
        proof.reverse()
        return proof

    def consistency_proof(self, old_size: int, size: int | None = None) -> list[bytes]:
        """RFC 6962 PROOF(old_size, D[0:size]); empty for ``old_size`` 0 or equal sizes."""
        n = self._check_size(size)
        if not 0 <= old_size <= n:
            raise ValueError(f"old size {old_size} exceeds new size {n}")
        if old_size in (0, n):
            return []
        proof: list[bytes] = []
        start, end, m, whole = 0, n, old_size, True
        while m != end - start:
            k = _split(end - start)
            if m <= k:
                proof.append(self._subtree(start + k, end))
                end = start + k
            else:
                proof.append(self._subtree(start, start + k))
                start, m, whole = start + k, m - k, False
        if not whole:
            proof.append(self._subtree(start, end))
        proof.reverse()
        return proof


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """RFC 9162 section 2.1.3.2: is ``leaf`` at ``index`` of the tree ``(size, root)``?"""
    if not 0 <= index < size or any(len(p) != HASH_LEN for p in proof):
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(
    old_size: int, size: int, old_root: bytes, root: bytes, proof: Sequence[bytes]
) -> bool:
    """RFC 9162 section 2.1.4.2: does the tree ``(size, root)`` extend ``(old_size, old_root)``?"""
    if not 0 <= old_size <= size or any(len(p) != HASH_LEN for p in proof):
        return False
    if old_size == size:
        return not proof and old_root == root
    if old_size == 0:
        return not proof and old_root == EMPTY_ROOT
    if not proof:
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old_size - 1, size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == root


# --- checkpoints (C2SP tlog-checkpoint + signed-note) -------------------------------------


class NoteFormatError(ValueError):
    """A checkpoint note does not parse; ``line`` is 1-based within the parsed data."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.reason = message


def check_origin(origin: str) -> str:
    """An origin is a schema-less URL-like name without spaces or '+' (a note key name)."""
    if not _ORIGIN.fullmatch(origin):
        raise ValueError(
            f"bad audit log origin {origin!r}: use letters, digits and . _ / : ~ - (max 255)"
        )
    return origin


@dataclass(frozen=True)
class Checkpoint:
    """A tree head: the log's origin, its size and its root."""

    origin: str
    size: int
    root: bytes

    def text(self) -> bytes:
        """The signed text of the note (three lines, each ending in a newline)."""
        b64 = base64.b64encode(self.root).decode("ascii")
        return f"{self.origin}\n{self.size}\n{b64}\n".encode("ascii")


def note_key_id(name: str, public: PublicKey) -> bytes:
    """C2SP signed-note key id of an Ed25519 key."""
    return hashlib.sha256(name.encode() + b"\n" + ED25519_SIG_TYPE + public.raw).digest()[:4]


def sign_checkpoint(checkpoint: Checkpoint, key: SecretKey, *more: SecretKey) -> bytes:
    """The signed note of ``checkpoint``, named after its origin: one signature line by
    ``key``, then one by each of ``more`` (earlier audit keys during a rotation)."""
    check_origin(checkpoint.origin)
    text = checkpoint.text()
    lines = b""
    for k in (key, *more):
        blob = note_key_id(checkpoint.origin, k.public) + k.sign(text)
        lines += SIG_PREFIX + checkpoint.origin.encode() + b" " + base64.b64encode(blob) + b"\n"
    return text + b"\n" + lines


@dataclass(frozen=True)
class NoteSignature:
    name: str
    key_id: bytes
    signature: bytes


@dataclass(frozen=True)
class Note:
    """A parsed checkpoint note and where it sits in its file."""

    checkpoint: Checkpoint
    text: bytes
    signatures: tuple[NoteSignature, ...]
    line: int  # 1-based line of the origin line
    offset: int  # byte offset of the origin line
    end: int  # byte offset just past the note

    def signature_status(self, public: PublicKey) -> Literal["valid", "invalid", "absent"]:
        """Check the signature by ``public`` under the note's origin as key name.

        As C2SP requires, signatures by other keys are ignored: "absent" means
        no signature line names this key.
        """
        name = self.checkpoint.origin
        kid = note_key_id(name, public)
        for sig in self.signatures:
            if sig.name == name and sig.key_id == kid:
                ok = len(sig.signature) == 64 and public.verify(sig.signature, self.text)
                return "valid" if ok else "invalid"
        return "absent"

    def signature_by_any(self, keys: Iterable[PublicKey]) -> Literal["valid", "invalid", "absent"]:
        """ "valid" if one of ``keys`` signed the note (a rotation: the current audit key and
        earlier ones); else "invalid" if one of them has a signature that does not verify."""
        found: Literal["valid", "invalid", "absent"] = "absent"
        for key in keys:
            status = self.signature_status(key)
            if status == "valid":
                return status
            if status == "invalid":
                found = status
        return found


@dataclass(frozen=True)
class ParsedNotes:
    notes: tuple[Note, ...]  # the notes before any error
    torn_at: int | None = None  # offset of an incomplete final note (a crash mid-write)
    error: NoteFormatError | None = None  # the first malformed note


def _lines(data: bytes) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        end = len(data) if nl < 0 else nl + 1
        out.append((pos, data[pos:end]))
        pos = end
    return out


class _Incomplete(Exception):
    """The data ends inside a note."""


def _parse_text(lines: list[tuple[int, bytes]], i: int) -> tuple[Checkpoint, int]:
    """Parse origin, size and root lines starting at ``lines[i]``; return the next index."""
    fields: list[bytes] = []
    while True:
        if i >= len(lines) or not lines[i][1].endswith(b"\n"):
            raise _Incomplete
        body = lines[i][1][:-1]
        if body == b"":
            break
        if len(fields) == 3:
            raise NoteFormatError(i + 1, "extension lines are not used by ferry checkpoints")
        if len(body) > MAX_NOTE_LINE or body.startswith(SIG_PREFIX):
            raise NoteFormatError(i + 1, "expected a checkpoint text line")
        fields.append(body)
        i += 1
    if len(fields) != 3:
        raise NoteFormatError(i + 1, "a checkpoint has three lines: origin, size, root")
    origin_b, size_b, root_b = fields
    try:
        origin = check_origin(origin_b.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise NoteFormatError(i - 2, "bad origin line") from None
    if not _SIZE.fullmatch(size_b) or int(size_b) > MAX_TREE_SIZE:
        raise NoteFormatError(i - 1, "bad tree size line")
    try:
        root = base64.b64decode(root_b, validate=True)
    except binascii.Error:
        raise NoteFormatError(i, "root line is not base64") from None
    if len(root) != HASH_LEN or base64.b64encode(root) != root_b:
        raise NoteFormatError(i, "root line is not a base64 SHA-256 hash")
    return Checkpoint(origin, int(size_b), root), i + 1


def _parse_signature(lineno: int, body: bytes) -> NoteSignature:
    rest = body[len(SIG_PREFIX) :]
    name_b, sep, blob_b = rest.partition(b" ")
    try:
        name = name_b.decode("utf-8")
        blob = base64.b64decode(blob_b, validate=True)
    except (UnicodeDecodeError, binascii.Error):
        raise NoteFormatError(lineno, "malformed signature line") from None
    if not sep or not name or len(blob) < 5 or " " in name or "+" in name:
        raise NoteFormatError(lineno, "malformed signature line")
    if base64.b64encode(blob) != blob_b:  # one encoding per signature: no malleable bits
        raise NoteFormatError(lineno, "signature is not canonical base64")
    return NoteSignature(name, blob[:4], blob[4:])


def parse_notes(data: bytes) -> ParsedNotes:
    """Parse concatenated checkpoint notes (``checkpoints.log``).

    Notes may be separated by blank lines. An incomplete final note (the data
    ends inside it) is reported as ``torn_at``; any other malformation stops
    the parse and is returned as ``error``, naming the line.
    """
    lines = _lines(data)
    notes: list[Note] = []
    i = 0
    while i < len(lines):
        if lines[i][1] == b"\n":
            i += 1
            continue
        start = i
        try:
            checkpoint, i = _parse_text(lines, i)
            sigs: list[NoteSignature] = []
            while i < len(lines):
                line = lines[i][1]
                if not line.endswith(b"\n") and not sigs:
                    raise _Incomplete
                if not line.startswith(SIG_PREFIX) or not line.endswith(b"\n"):
                    break  # the next note starts here (maybe torn: the outer loop sees it)
                if len(sigs) == MAX_NOTE_SIGNATURES:
                    raise NoteFormatError(i + 1, "too many signatures")
                sigs.append(_parse_signature(i + 1, line[:-1]))
                i += 1
            if not sigs:
                if i >= len(lines):
                    raise _Incomplete
                raise NoteFormatError(i + 1, "expected a signature line")
        except _Incomplete:
            return ParsedNotes(tuple(notes), torn_at=lines[start][0])
        except NoteFormatError as exc:
            return ParsedNotes(tuple(notes), error=exc)
        offset = lines[start][0]
        end = lines[i - 1][0] + len(lines[i - 1][1])
        text_end = lines[start + 2][0] + len(lines[start + 2][1])
        notes.append(Note(checkpoint, data[offset:text_end], tuple(sigs), start + 1, offset, end))
    return ParsedNotes(tuple(notes))
