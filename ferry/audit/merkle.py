"""RFC 6962 / RFC 9162 Merkle tree over audit records, and C2SP signed checkpoints.

Pure: bytes, values or a binary stream in, values out (no paths, clocks or threads).

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
import io
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

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


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
class NoteSignature:
    name: str
    key_id: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
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
        earlier ones); else "invalid" if one of them has a signature that does not verify.
        Only the keys that have a signature line are checked (looked up by key id)."""
        name = self.checkpoint.origin
        named = {sig.key_id for sig in self.signatures if sig.name == name}
        found: Literal["valid", "invalid", "absent"] = "absent"
        for key in keys:
            if note_key_id(name, key) not in named:
                continue
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
    size: int = 0  # bytes read: all the data, unless an error or max_notes stopped the parse
    torn: bytes = b""  # the incomplete final note (from torn_at to the end of the data)


# The longest line a note may have, with its newline: a reader never holds more of a line.
_LINE_LIMIT = MAX_NOTE_LINE + 1


@dataclass(frozen=True, slots=True)
class _Line:
    number: int  # 1-based
    offset: int
    raw: bytes  # with its newline, if it has one
    complete: bool  # it has its newline

    @property
    def blank(self) -> bool:
        return self.raw == b"\n"


class _Incomplete(Exception):
    """The data ends inside a note."""


class LineSource(Protocol):
    """What the note readers read from: a binary file, or anything with its ``readline``."""

    def readline(self, size: int = -1, /) -> bytes: ...


class _LineReader:
    """The lines of a binary stream, each read with a bounded length."""

    def __init__(self, stream: LineSource) -> None:
        self._stream = stream
        self.number = 0
        self.offset = 0  # bytes read so far

    def next(self) -> _Line | None:
        raw = self._stream.readline(_LINE_LIMIT)
        if not raw:
            return None
        self.number += 1
        line = _Line(self.number, self.offset, raw, raw[-1:] == b"\n")
        self.offset += len(raw)
        if not line.complete and len(raw) > MAX_NOTE_LINE:
            raise NoteFormatError(line.number, f"line longer than {MAX_NOTE_LINE} bytes")
        return line


def _text_line(line: _Line | None, field: int) -> bytes:
    """The body of the origin (0), size (1) or root (2) line of a note, checked."""
    if line is None or not line.complete:
        raise _Incomplete
    body = line.raw[:-1]
    if body == b"":
        raise NoteFormatError(line.number, "a checkpoint has three lines: origin, size, root")
    if body.startswith(SIG_PREFIX):
        raise NoteFormatError(line.number, "expected a checkpoint text line")
    if field == 0:
        try:
            check_origin(body.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise NoteFormatError(line.number, "bad origin line") from None
    elif field == 1:
        if not _SIZE.fullmatch(body) or int(body) > MAX_TREE_SIZE:
            raise NoteFormatError(line.number, "bad tree size line")
    else:
        try:
            root = base64.b64decode(body, validate=True)
        except binascii.Error:
            raise NoteFormatError(line.number, "root line is not base64") from None
        if len(root) != HASH_LEN or base64.b64encode(root) != body:
            raise NoteFormatError(line.number, "root line is not a base64 SHA-256 hash")
    return body


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


def _read_note(reader: _LineReader, first: _Line, held: list[bytes]) -> tuple[Note, _Line | None]:
    """Read the note whose origin line is ``first``; return it and the line after it.

    ``held`` collects the note's raw lines (at most ``MAX_NOTE_SIGNATURES + 5`` bounded
    lines), so that an incomplete note can be reported with its bytes.
    """
    fields: list[bytes] = []
    line: _Line | None = first
    for field in range(3):
        if line is not None:
            held.append(line.raw)
        fields.append(_text_line(line, field))
        line = reader.next()
    if line is None or not line.complete:
        raise _Incomplete
    held.append(line.raw)
    if not line.blank:
        raise NoteFormatError(line.number, "extension lines are not used by ferry checkpoints")
    sigs: list[NoteSignature] = []
    end = 0
    while True:
        line = reader.next()
        if line is None:
            if not sigs:
                raise _Incomplete
            break
        if not line.complete:
            # A partial signature line is this note's (torn) end; anything else starts the
            # next note (which then is the torn one).
            if not sigs or line.raw[: len(SIG_PREFIX)] == SIG_PREFIX[: len(line.raw)]:
                held.append(line.raw)
                raise _Incomplete
            break
        if not line.raw.startswith(SIG_PREFIX):
            if not sigs:
                raise NoteFormatError(line.number, "expected a signature line")
            break
        if len(sigs) == MAX_NOTE_SIGNATURES:
            raise NoteFormatError(line.number, "too many signatures")
        held.append(line.raw)
        sigs.append(_parse_signature(line.number, line.raw[:-1]))
        end = line.offset + len(line.raw)
    origin, size, root = fields
    checkpoint = Checkpoint(origin.decode("ascii"), int(size), base64.b64decode(root))
    text = origin + b"\n" + size + b"\n" + root + b"\n"
    note = Note(checkpoint, text, tuple(sigs), first.number, first.offset, end)
    return note, line


class NoteReader:
    """The notes of a binary stream, one at a time: :func:`read_notes` without keeping them.

    Memory is one note (bounded lines) whatever the stream holds. :meth:`next` returns
    None at the end of the notes; then :attr:`torn_at`, :attr:`torn`, :attr:`error` and
    :attr:`size` say how the data ended, as in :class:`ParsedNotes`.
    """

    def __init__(self, stream: LineSource, *, after_note: bool = False) -> None:
        self._reader = _LineReader(stream)
        self._after_note = after_note
        self._started = False
        self._done = False
        self._line: _Line | None = None
        self.torn_at: int | None = None
        self.torn = b""
        self.error: NoteFormatError | None = None

    @property
    def size(self) -> int:
        """Bytes read so far."""
        return self._reader.offset

    def __iter__(self) -> Iterator[Note]:
        while (note := self.next()) is not None:
            yield note

    def next(self) -> Note | None:
        if self._done:
            return None
        held: list[bytes] = []
        try:
            if not self._started:
                self._started = True
                line = self._reader.next()
                if line is not None and line.blank:
                    if not self._after_note:
                        raise NoteFormatError(
                            line.number, "a blank line before the first checkpoint"
                        )
                    line = _after_separator(self._reader)
                self._line = line
            if self._line is None:
                self._done = True
                return None
            note, line = _read_note(self._reader, self._line, held)
        except _Incomplete:
            self._done = True
            self.torn = b"".join(held)
            self.torn_at = self._reader.offset - len(self.torn)
            return None
        except NoteFormatError as exc:
            self._done = True
            self.error = exc
            return None
        try:
            if line is not None and line.blank:
                line = _after_separator(self._reader)
        except NoteFormatError as exc:  # (after the note, which is whole: it is returned)
            self._done = True
            self.error = exc
        self._line = line
        return note


def read_notes(
    stream: LineSource, *, after_note: bool = False, max_notes: int | None = None
) -> ParsedNotes:
    """Parse concatenated checkpoint notes (``checkpoints.log``) from a binary stream.

    The stream is read line by line, each line bounded by ``MAX_NOTE_LINE`` bytes, so
    memory is bounded per note whatever the stream holds (the notes returned are kept:
    :class:`NoteReader` reads them one at a time). The format is the writer's:
    each note is followed by one blank line. At most one blank line may follow a note
    (none is tolerated: the writer may have stopped before writing it); a blank line
    before the first note or a second one after a note is malformed. An incomplete
    final note (the data ends inside it) is reported as ``torn_at`` with its bytes as
    ``torn``; any other malformation stops the parse and is returned as ``error``,
    naming the line. Lines and offsets count from where the stream stands.

    ``after_note``: the stream stands just past a note, so one blank line may come
    first. ``max_notes``: stop after that many notes (``size`` then says how far the
    parse read: past the line after the last note, if there is one).
    """
    reader = NoteReader(stream, after_note=after_note)
    notes: list[Note] = []
    while max_notes is None or len(notes) < max_notes:
        note = reader.next()
        if note is None:
            break
        notes.append(note)
    return ParsedNotes(tuple(notes), reader.torn_at, reader.error, reader.size, reader.torn)


def _after_separator(reader: _LineReader) -> _Line | None:
    """The line after the blank line that follows a note: not another blank line."""
    line = reader.next()
    if line is not None and line.blank:
        raise NoteFormatError(
            line.number,
            "a second blank line after a checkpoint (one blank line separates checkpoints)",
        )
    return line


def parse_notes(data: bytes) -> ParsedNotes:
    """:func:`read_notes` of bytes in memory."""
    return read_notes(io.BytesIO(data))
