"""Audit records: building, encoding, decoding and schema validation.

Pure: values in, bytes out. The writer (:mod:`ferry.audit.log`) assigns ``idx``,
``ts`` and ``prev`` under its lock and calls :func:`encode`; the bytes it
returns are what is written, hashed into the tree and verified, and nothing is
ever re-serialised.

A record is one JSON object on one line: ASCII only (``ensure_ascii``), no
insignificant whitespace, top-level keys in a fixed order (``v idx ts event
result reason subject object corr detail prev``), nested keys sorted. The
schema is ``schemas/audit-record.schema.json``; docs/AUDIT.md describes each field.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson
from jsonschema import Draft202012Validator, validators

from ferry.config import load_schema
from ferry.errors import FerryError

SCHEMA_NAME = "audit-record.schema.json"
RECORD_VERSION = 1
# A record is metadata, never content: 16 KiB leaves room for a long path and a
# detail map while bounding what the verifier reads per line from an untrusted file.
MAX_RECORD_BYTES = 16 * 1024
ZERO_HASH = "0" * 64  # ``prev`` of record 0
TS_PLACEHOLDER = "1970-01-01T00:00:00.000000Z"

Result = Literal["success", "failure", "rejected", "info"]
SubjectKind = Literal["clerk_folder", "user", "api_client", "component", "peer"]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class AuditError(FerryError):
    """The audit log cannot be opened or used as asked (names the file and the problem)."""


class AuditUnavailable(AuditError):
    """The audit log cannot write (disk full, read-only, I/O error) or is closed.

    Callers must not acknowledge or perform the audited action: stop intake and
    transfers until :attr:`ferry.audit.AuditLog.healthy` is true again.
    """


class AuditTimeout(AuditUnavailable):
    """A record did not become durable within the time allowed."""


class AuditRecordInvalid(AuditError):
    """A record does not validate against the audit record schema: a programming error."""


# --- subjects and objects ---------------------------------------------------------------


@dataclass(frozen=True)
class Subject:
    """Who acted: a clerk folder, a user, an API client, a component or the peer agent."""

    kind: SubjectKind
    id: str
    name: str | None = None

    @classmethod
    def component(cls, name: str) -> Subject:
        return cls("component", name)

    @classmethod
    def clerk_folder(cls, path: str, channel: str | None = None) -> Subject:
        return cls("clerk_folder", path, channel)

    @classmethod
    def api_client(cls, client_id: str, name: str | None = None) -> Subject:
        return cls("api_client", client_id, name)

    @classmethod
    def user(cls, name: str) -> Subject:
        return cls("user", name)

    def to_json(self) -> dict[str, str]:
        out = {"id": self.id, "kind": self.kind}
        if self.name is not None:
            out["name"] = self.name
        return out


@dataclass(frozen=True)
class AuditObject:
    """What was acted on. Every field is optional; unset fields are left out of the record."""

    kind: str | None = None
    item: str | None = None
    channel: str | None = None
    name: str | None = None
    name_sha256: str | None = None
    media_type: str | None = None
    size: int | None = None
    sha256: str | None = None
    seq: int | None = None
    epoch: str | None = None
    session: str | None = None
    path: str | None = None
    key_id: str | None = None

    def to_json(self) -> dict[str, str | int]:
        out: dict[str, str | int] = {}
        for name in _OBJECT_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


_OBJECT_FIELDS = tuple(sorted(f.name for f in fields(AuditObject)))


# --- batch records ------------------------------------------------------------------------

# A batch record (docs/AUDIT.md §2) lists several items in ``object.items``: the message
# path writes one per batch rather than one per message. Entries are split so that each
# record stays well inside MAX_RECORD_BYTES (subject, shared fields and detail are small).
MAX_BATCH_ITEMS = 64  # the schema's maxItems
_BATCH_BYTES = 12 * 1024
# Entry fields that belong in the record's detail when it is read one item at a time.
ENTRY_DETAIL = frozenset({"submission", "schema"})


def item_batches(entries: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """``entries`` (one dict per item) in runs that each fit one batch record."""
    runs: list[list[dict[str, Any]]] = []
    run: list[dict[str, Any]] = []
    used = 0
    for entry in entries:
        size = len(orjson.dumps(entry)) + 1
        if run and (len(run) >= MAX_BATCH_ITEMS or used + size > _BATCH_BYTES):
            runs.append(run)
            run, used = [], 0
        run.append(entry)
        used += size
    if run:
        runs.append(run)
    return runs


def per_item(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """A record as one record per item it is about.

    A batch record gives one record for each well-formed entry of ``object.items``:
    the shared object fields plus the entry's own, the entry's ``submission`` and
    ``schema`` in ``detail``, and ``corr`` set to the entry's item id. Any other
    record is returned as it is. For readers of a log (replay, reconcile); the
    record may come from an untrusted file, so odd entries are skipped, not trusted.
    """
    obj = rec.get("object")
    if type(obj) is not dict or "items" not in obj:
        return [rec]
    entries = obj["items"]
    if type(entries) is not list:
        return []
    shared = {k: v for k, v in obj.items() if k != "items"}
    detail = rec.get("detail")
    base_detail = detail if type(detail) is dict else {}
    out = []
    for entry in entries:
        if type(entry) is not dict or type(entry.get("item")) is not str or not entry["item"]:
            continue
        one_obj = dict(shared)
        one_detail = dict(base_detail)
        for key, value in entry.items():
            (one_detail if key in ENTRY_DETAIL else one_obj)[key] = value
        one = dict(rec)
        one["object"] = one_obj
        one["corr"] = entry["item"]
        if one_detail:
            one["detail"] = one_detail
        out.append(one)
    return out


# --- time ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _second(seconds: int) -> str:
    return (_EPOCH + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S")


def format_ts(us: int) -> str:
    """ISO 8601 UTC with microseconds: ``2026-11-21T19:15:44.123456Z``."""
    seconds, micro = divmod(us, 1_000_000)
    return f"{_second(seconds)}.{micro:06d}Z"


def parse_ts(text: str) -> int:
    """Microseconds since the epoch of a record timestamp (raises ValueError)."""
    dt = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    delta = dt - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


# --- building and encoding ----------------------------------------------------------------


_FLAT = frozenset({str, int, bool, type(None)})


def _normalise(value: object) -> Any:
    """Sort nested mapping keys so equal details always encode to equal bytes."""
    if type(value) is dict and all(
        type(k) is str and type(v) in _FLAT for k, v in value.items()
    ):  # the common case: a flat detail
        return dict(sorted(value.items()))
    if isinstance(value, Mapping):
        return {str(k): _normalise(v) for k, v in sorted(value.items(), key=lambda kv: kv[0])}
    if isinstance(value, list | tuple):
        return [
            {k: x if type(x) in _FLAT else _normalise(x) for k, x in sorted(v.items())}
            if type(v) is dict  # (a batch record's entries, many: one pass each)
            else _normalise(v)
            for v in value
        ]
    return value


def build(
    event: str,
    *,
    subject: Subject,
    result: Result,
    reason: str | None = None,
    obj: AuditObject | Mapping[str, object] | None = None,
    detail: Mapping[str, object] | None = None,
    corr: str | None = None,
) -> dict[str, Any]:
    """A validated record with placeholder ``idx``, ``ts`` and ``prev``.

    The writer fills those three in (they are always valid) and encodes it.
    Raises :class:`AuditRecordInvalid` if the record does not match the schema.
    """
    rec: dict[str, Any] = {
        "v": RECORD_VERSION,
        "idx": 0,
        "ts": TS_PLACEHOLDER,
        "event": event,
        "result": result,
        "reason": reason,
        "subject": subject.to_json(),
    }
    target = obj.to_json() if isinstance(obj, AuditObject) else _normalise(obj or {})
    if target:  # an object with no field set is left out
        rec["object"] = target
    if corr is not None:
        rec["corr"] = corr
    if detail is not None:
        rec["detail"] = _normalise(detail)
    rec["prev"] = ZERO_HASH
    validate(rec)
    return rec


_HEAD = b'{"v":1,"idx":0,"ts":"' + TS_PLACEHOLDER.encode() + b'",'
_TAIL = b',"prev":"' + ZERO_HASH.encode() + b'"}'


@dataclass(frozen=True, slots=True)
class Draft:
    """A validated record without its index, time and ``prev``: the writer's input."""

    event: str
    body: bytes  # the encoded fields from "event" to "detail"

    def finish(self, idx: int, ts: str, prev: str) -> bytes:
        """The line bytes (as :func:`encode` of the whole record gives them)."""
        return b'{"v":1,"idx":%d,"ts":"%s",%s,"prev":"%s"}' % (
            idx,
            ts.encode("ascii"),
            self.body,
            prev.encode("ascii"),
        )


def draft(
    event: str,
    *,
    subject: Subject,
    result: Result,
    reason: str | None = None,
    obj: AuditObject | Mapping[str, object] | None = None,
    detail: Mapping[str, object] | None = None,
    corr: str | None = None,
) -> Draft:
    """:func:`build` and encode a record, leaving ``idx``, ``ts`` and ``prev`` to the writer."""
    rec = build(
        event, subject=subject, result=result, reason=reason, obj=obj, detail=detail, corr=corr
    )
    line = encode(rec)
    assert line.startswith(_HEAD), line  # the fixed key order of build()
    assert line.endswith(_TAIL), line
    return Draft(event, line[len(_HEAD) : -len(_TAIL)])


def _finite(value: object) -> bool:
    """No NaN or infinity anywhere (orjson would write them as null)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


def encode(rec: Mapping[str, Any]) -> bytes:
    """The exact line bytes of a record, without the newline.

    orjson when the result is ASCII (almost always; about 10x faster), else the standard
    library with ``\\uXXXX`` escapes. Both give compact JSON in the dict's key order.
    """
    if _finite(rec.get("detail")):
        try:
            fast = orjson.dumps(rec)
        except (TypeError, orjson.JSONEncodeError):
            fast = b""
        if fast and fast.isascii():
            return fast
    try:
        text = json.dumps(rec, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise AuditRecordInvalid(f"audit record is not JSON-serialisable: {exc}") from exc
    return text.encode("ascii")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key in a JSON object")
    return out


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)


def decode(line: bytes) -> dict[str, Any]:
    """Parse one record line (raises ValueError): ASCII JSON object, no duplicate keys."""
    if len(line) > MAX_RECORD_BYTES:
        raise ValueError(f"record longer than {MAX_RECORD_BYTES} bytes")
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("record is not ASCII") from None
    try:
        value = _DECODER.decode(text)
    except RecursionError:  # (16 KiB of brackets is deep enough for that)
        raise ValueError("record nested too deeply") from None
    if not isinstance(value, dict):
        raise ValueError("record is not a JSON object")
    return value


# --- schema validation --------------------------------------------------------------------

# JSON Schema counts 4.0 as an integer; an audit record must not (as in ferry.config).
_StrictValidator = validators.extend(  # type: ignore[no-untyped-call]  # untyped in types-jsonschema
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _, v: isinstance(v, int) and not isinstance(v, bool)
    ),
)


def _has_float_integer(rec: Mapping[str, Any]) -> bool:
    """A float with an integral value where the schema wants an integer?

    The integer fields callers fill are in ``object`` (and its ``items``); ``idx`` and
    the details of ``audit.*`` records are written by the log itself. (In a record
    read back, a changed number is caught by the hash chain anyway.)
    """
    obj = rec.get("object")
    values = obj.values() if isinstance(obj, dict) else ()
    if any(type(v) is float and v.is_integer() for v in (rec.get("idx"), *values)):
        return True
    entries = obj.get("items") if isinstance(obj, dict) else None
    return isinstance(entries, list) and any(  # an entry's integers: seq and size
        type(e.get("seq")) is float or type(e.get("size")) is float
        for e in entries
        if isinstance(e, dict)
    )


@functools.cache
def _checker() -> Callable[[Mapping[str, Any]], list[str]]:
    """Error messages of a record against the schema.

    Uses ``jsonschema_rs`` (about 150x faster) when it is installed, else the
    ``jsonschema`` reference implementation; both read the same schema file.
    """
    schema = load_schema(SCHEMA_NAME)
    try:
        rs: Any = importlib.import_module("jsonschema_rs")
    except ImportError:
        rs = None
    if rs is not None:
        fast = rs.validator_for(schema)

        def check_fast(rec: Mapping[str, Any]) -> list[str]:
            if fast.is_valid(rec):
                # jsonschema_rs, like the spec, takes 4.0 for an integer: refuse floats
                # with integral values at integer places by a second, strict pass.
                if not _has_float_integer(rec):
                    return []
                return check_ref(rec)
            return [_fmt(list(e.instance_path), e.message) for e in fast.iter_errors(rec)]

        ref = _StrictValidator(schema)

        def check_ref(rec: Mapping[str, Any]) -> list[str]:
            return [_fmt(list(e.absolute_path), e.message) for e in ref.iter_errors(rec)]

        return check_fast
    ref_only = _StrictValidator(schema)

    def check(rec: Mapping[str, Any]) -> list[str]:
        return [_fmt(list(e.absolute_path), e.message) for e in ref_only.iter_errors(rec)]

    return check


def _fmt(path: list[Any], message: str) -> str:
    where = ".".join(str(p) for p in path) or "(record)"
    return f"{where}: {message}"


def record_errors(rec: Mapping[str, Any]) -> list[str]:
    """Why ``rec`` does not match the audit record schema (empty if it does)."""
    return _checker()(rec)


def validate(rec: Mapping[str, Any]) -> None:
    """Raise :class:`AuditRecordInvalid` unless ``rec`` matches the schema."""
    errors = record_errors(rec)
    if errors:
        event = rec.get("event", "?")
        raise AuditRecordInvalid(f"invalid audit record ({event}): " + "; ".join(errors[:5]))


@functools.cache
def events() -> frozenset[str]:
    """The event vocabulary (the schema's enum)."""
    return frozenset(load_schema(SCHEMA_NAME)["properties"]["event"]["enum"])
