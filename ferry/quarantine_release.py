"""What both sides' quarantine CLIs share: signed, idempotent, audited releases.

A quarantine folder holds items as ``<stored name>`` + ``<stored name>.reason.json`` and one
append-only ``releases.jsonl``. A release, under the folder's lock (:func:`locked`):

1. checks the security-admin key against the trusted public key (:func:`check_admin_key`);
2. if a verified line of ``releases.jsonl`` already names the item, only finishes what an
   interrupted release left undone and reports ``already released`` (never twice);
3. appends a signed ``quarantine.released`` record (:func:`new_record`, :func:`append_release`:
   fsynced), and only then hands the item on (the outside: back to its drop folder; the
   inside: into its channel's delivery folder, then a second signed line,
   ``delivery.delivered`` (:func:`delivered_record`), says under which path).

A CLI cannot write the agent's audit log (the running agent holds its lock), so each agent
follows ``releases.jsonl`` (:class:`ReleaseAuditor`) and records every line: a release as
``quarantine.released``, a delivered line as ``delivery.delivered`` (with the path, so that
auditors check that file like any other delivery): at once while it runs, at its next start
otherwise. A line whose signature does not verify is recorded as a failed
``quarantine.released`` and never trusted.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ferry.crypto.keys import PublicKey, SecretKey, load_public_key
from ferry.errors import KeyFileError, UsageError
from ferry.jsondoc import canonical

if TYPE_CHECKING:  # the audit modules load slowly; `ferry --help` builds this module's parser
    from ferry.audit.agent import AgentAudit
    from ferry.audit.record import AuditObject

RELEASES = "releases.jsonl"
REASON_JSON = ".reason.json"
EVENT = "quarantine.released"
# The second line of an inside release: where the released file was delivered.
DELIVERED_EVENT = "delivery.delivered"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ITEM_ID = re.compile(r"[0-9a-f]{32}")
MAX_DELIVERED_PATH = 4096  # (the audit schema's bound on object.path)
SIGNING_CONTEXT = b"ferry-quarantine-release-v1\n"
# Where each agent and CLI looks for the trusted security-admin public key (next to its config).
ADMIN_PUBLIC_KEY = "keys/security-admin.pub"
# releases.jsonl larger than this is not read whole (a folder with that many releases is
# an incident of its own).
MAX_RELEASES_BYTES = 64 * 1024 * 1024
# Seconds between an agent's looks at releases.jsonl; bytes of new lines read per look.
RELEASE_SCAN_INTERVAL = 2.0
MAX_RELEASE_SCAN = 4 * 1024 * 1024
# Offsets already recorded, per releases.jsonl, in the agent's state folder.
AUDITED_STATE = "releases-audited.json"
HASH_CHUNK = 1024 * 1024


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def sha256_file(path: Path) -> str:
    """The SHA-256 of a regular file (never through a symlink: OSError)."""
    digest = hashlib.sha256()
    with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- reading
def releases(folder: Path) -> Iterator[dict[str, Any]]:
    """Every well-formed line of the folder's releases.jsonl (not yet verified)."""
    path = folder / RELEASES
    try:
        if path.stat().st_size > MAX_RELEASES_BYTES:
            raise UsageError(f"{path} is too large to read")
        lines = path.read_text("utf-8").splitlines()
    except FileNotFoundError:
        return
    for line in lines:
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and "stored_name" in record:
                yield record


def previous_release(folder: Path, stored_name: str, trusted: PublicKey) -> dict[str, Any] | None:
    """The verified release of this item, if any (a forged line cannot block a release)."""
    return _signed_line(folder, stored_name, trusted, delivered=False)


def previous_delivery(folder: Path, stored_name: str, trusted: PublicKey) -> dict[str, Any] | None:
    """The verified line naming where this item's release delivered it, if any."""
    return _signed_line(folder, stored_name, trusted, delivered=True)


def _signed_line(
    folder: Path, stored_name: str, trusted: PublicKey, *, delivered: bool
) -> dict[str, Any] | None:
    return next(
        (
            r
            for r in releases(folder)
            if r["stored_name"] == stored_name
            and (r.get("event") == DELIVERED_EVENT) == delivered
            and verify_record(r, trusted)
        ),
        None,
    )


def _release_lines(
    folder: Path, trusted: PublicKey | None
) -> tuple[set[str], collections.Counter[str]]:
    """Items with a release line signed by ``trusted``, and per item the lines that are not
    (forged or altered, or every line when no trusted key is at hand)."""
    verified: set[str] = set()
    unverified: collections.Counter[str] = collections.Counter()
    for r in releases(folder):
        name = str(r["stored_name"])
        if trusted is not None and verify_record(r, trusted):
            if r.get("event") != DELIVERED_EVENT:  # (a delivered line follows its release)
                verified.add(name)
        else:
            unverified[name] += 1
    return verified, unverified


def _mark_released(
    doc: dict[str, Any], verified: set[str], unverified: collections.Counter[str]
) -> None:
    name = doc["stored_name"]
    doc["released"] = name in verified
    if unverified[name]:  # a line the key did not sign: say so, never count it as a release
        doc["unverified_release_lines"] = unverified[name]


def list_items(folder: Path, trusted: PublicKey | None) -> list[dict[str, Any]]:
    """Every quarantined item's reason document, oldest first, plus ``released`` (a release
    line signed by ``trusted``; None: the key is missing and nothing counts as released)."""
    verified, unverified = _release_lines(folder, trusted)
    items = []
    for path in sorted(folder.glob("*" + REASON_JSON)) if folder.is_dir() else []:
        try:
            doc = json.loads(path.read_text("ascii"))
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict):
            continue
        doc["stored_name"] = doc.get("stored_name") or path.name[: -len(REASON_JSON)]
        _mark_released(doc, verified, unverified)
        items.append(doc)
    items.sort(key=lambda d: (str(d.get("quarantined_at")), str(d["stored_name"])))
    return items


def show_item(folder: Path, stored_name: str, trusted: PublicKey | None) -> dict[str, Any]:
    """One item's reason document plus ``released`` (as in :func:`list_items`) and
    ``present`` (the file is there)."""
    check_stored_name(stored_name)
    path = folder / (stored_name + REASON_JSON)
    try:
        doc: dict[str, Any] = json.loads(path.read_text("ascii"))
    except FileNotFoundError:
        raise UsageError(f"no quarantined item {stored_name!r} in {folder}") from None
    doc["stored_name"] = doc.get("stored_name") or stored_name
    _mark_released(doc, *_release_lines(folder, trusted))
    try:  # (a regular file, not a symlink: a release never follows one)
        doc["present"] = stat.S_ISREG(os.lstat(folder / stored_name).st_mode)
    except OSError:
        doc["present"] = False
    return doc


def admin_key_if_present(config: Path, given: str | None = None) -> PublicKey | None:
    """The trusted security-admin public key for ``list`` and ``show`` (None if the file
    is missing: they still work, and count no release line as verified)."""
    path = Path(given) if given else config.parent / ADMIN_PUBLIC_KEY
    return load_public_key(str(path)) if given or path.is_file() else None


# ----------------------------------------------------------------------------- signing
def _signed_bytes(record: Mapping[str, Any]) -> bytes:
    body = {k: v for k, v in record.items() if k != "signature"}
    return SIGNING_CONTEXT + canonical(body)


def sign_record(record: dict[str, Any], key: SecretKey) -> dict[str, Any]:
    signature = key.sign(_signed_bytes(record))
    return dict(record, signature=base64.b64encode(signature).decode("ascii"))


def verify_record(record: Mapping[str, Any], trusted: PublicKey) -> bool:
    try:
        signature = base64.b64decode(str(record["signature"]), validate=True)
        if record.get("admin_key_id") != trusted.key_id.hex():
            return False
        return trusted.verify(signature, _signed_bytes(record))
    except (KeyError, ValueError, TypeError):
        return False


# ----------------------------------------------------------------------------- release
def check_stored_name(stored_name: str) -> None:
    if not stored_name or "/" in stored_name or stored_name in (".", "..") or "\0" in stored_name:
        raise UsageError(f"not an item name: {stored_name!r}")


def check_admin_key(key: SecretKey, trusted: PublicKey) -> None:
    if key.alg != "ed25519" or key.public != trusted:
        raise KeyFileError(
            "this key is not the security-admin key trusted by this gateway "
            f"(expected key id {trusted.key_id.hex()})"
        )


def trusted_admin_key(config: Path, given: str | None = None) -> PublicKey:
    """The trusted security-admin public key: ``given``, or the one next to the config."""
    return load_public_key(given or str(config.parent / ADMIN_PUBLIC_KEY))


@contextlib.contextmanager
def locked(folder: Path, *, wait: bool = True) -> Iterator[int]:
    """The folder, opened without following links and exclusively locked (a release holds
    it); ``wait=False``: BlockingIOError at once if someone else holds it."""
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(dfd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield dfd
    finally:
        os.close(dfd)


def new_record(
    doc: Mapping[str, Any],
    stored_name: str,
    sha256: str,
    *,
    channel: str,
    key: SecretKey,
    override: str | None,
    note: str,
    clock: Callable[[], str],
) -> dict[str, Any]:
    """The signed ``quarantine.released`` record of one item (``doc``: its reason document)."""
    record = {
        "version": 1,
        "event": EVENT,
        "channel": channel,
        "stored_name": stored_name,
        "original_name": doc.get("original_name"),
        "item_id": doc.get("item_id"),
        "sha256": sha256,
        "reason_code": doc.get("reason_code"),
        "override": override,
        "note": note,
        "released_at": clock(),
        "admin_key_id": key.public.key_id.hex(),
    }
    return sign_record(record, key)


def delivered_record(
    release: Mapping[str, Any],
    path: Path,
    size: int,
    *,
    key: SecretKey,
    clock: Callable[[], str],
) -> dict[str, Any]:
    """The signed line saying where a released item was delivered (``release``: its
    release record)."""
    record = {
        "version": 1,
        "event": DELIVERED_EVENT,
        "channel": release.get("channel"),
        "stored_name": release.get("stored_name"),
        "original_name": release.get("original_name"),
        "item_id": release.get("item_id"),
        "sha256": release.get("sha256"),
        "size": size,
        "delivered_as": str(path),
        "delivered_at": clock(),
        "admin_key_id": key.public.key_id.hex(),
    }
    return sign_record(record, key)


def append_release(folder: Path, record: Mapping[str, Any]) -> None:
    """Append one line to releases.jsonl and fsync it (a release: before the item moves)."""
    line = json.dumps(record, ensure_ascii=True, sort_keys=True) + "\n"
    fd = os.open(folder / RELEASES, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, line.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)


def log_fields(record: Mapping[str, Any]) -> dict[str, Any]:
    """A release record as structlog fields (the event name is the log line's)."""
    return {k: v for k, v in record.items() if k not in ("signature", "event")}


# ----------------------------------------------------------------------------- audit
class ReleaseAuditor:
    """An agent's follower of its quarantine folders' releases.jsonl.

    :meth:`scan` records each new line as ``quarantine.released`` (``failure`` with
    BAD_SIGNATURE when the admin key did not sign it), or a signed delivered line as
    ``delivery.delivered`` and then calls ``on_delivered(item id, path)``. The offsets
    recorded so far are kept in the state folder, so each line is recorded once, also across
    restarts."""

    def __init__(
        self,
        audit: AgentAudit,
        state_dir: Path,
        admin_key: PublicKey | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_delivered: Callable[[str, str], None] | None = None,
    ) -> None:
        self._audit = audit
        self._admin_key = admin_key
        self._clock = clock
        self._on_delivered = on_delivered
        self._state = state_dir / AUDITED_STATE
        try:
            self._offsets: dict[str, int] = json.loads(self._state.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self._offsets = {}
        # Each channel's intake thread scans its own quarantine folder (one on a share that
        # stops answering holds up that thread alone): what they share is under the lock,
        # and no folder is read while it is held.
        self._lock = threading.Lock()
        self._next_scan: dict[str, float] = {}
        self._scanning: set[str] = set()

    @classmethod
    def for_agent(
        cls,
        audit: AgentAudit,
        state_dir: Path,
        config: Path,
        on_delivered: Callable[[str, str], None] | None = None,
    ) -> ReleaseAuditor:
        """The auditor of an agent whose config is ``config`` (trusting the admin key next to
        it; without one, every release line is recorded as a failure)."""
        admin = config.parent / ADMIN_PUBLIC_KEY
        trusted = load_public_key(str(admin)) if admin.is_file() else None
        return cls(audit, state_dir, trusted, on_delivered=on_delivered)

    def scan(self, folders: Mapping[Path, str | None]) -> None:
        """Record the new lines of each folder's releases.jsonl (``folders``: folder → its
        channel, or None when the records name their channels); each folder at most every
        RELEASE_SCAN_INTERVAL seconds, and by one thread at a time."""
        now = self._clock()
        for folder, channel in folders.items():
            path = folder / RELEASES
            key = str(path)
            with self._lock:
                if now < self._next_scan.get(key, -math.inf) or key in self._scanning:
                    continue
                self._next_scan[key] = now + RELEASE_SCAN_INTERVAL
                self._scanning.add(key)
                done = self._offsets.get(key, 0)
            try:
                recorded: list[int] = []
                end = self._scan_file(path, channel, done, recorded)
                if end > 0 and self._on_disk(recorded):
                    with self._lock:
                        self._offsets[key] = done + end
                        self._save_offsets()
            finally:
                with self._lock:
                    self._scanning.discard(key)

    def _on_disk(self, recorded: list[int]) -> bool:
        """Wait for the records of a scan on disk: only then may the read position move past
        their lines (else a power cut could keep the position and lose the records). False
        if the log cannot write: the position stays, the lines are recorded again later
        (twice, perhaps, rather than never)."""
        from ferry import log  # noqa: PLC0415  # (slow imports: see TYPE_CHECKING above)
        from ferry.audit.record import AuditUnavailable  # noqa: PLC0415

        if not recorded:
            return True
        try:
            self._audit.log.wait_durable(max(recorded))
        except AuditUnavailable as exc:
            log.get("quarantine").error("release_records_not_on_disk", error=str(exc))
            return False
        return True

    def _save_offsets(self) -> None:
        """The read positions, durably (a temp file synced, renamed, the folder synced)."""
        tmp = self._state.with_name(self._state.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(self._offsets))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._state)
        fd = os.open(self._state.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _scan_file(self, path: Path, channel: str | None, done: int, recorded: list[int]) -> int:
        """Record the lines of ``path`` past offset ``done`` (each record's index added to
        ``recorded``); return how many bytes of it were recorded (a partial last line waits
        for the next scan)."""
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return 0
        if size <= done:
            return 0
        with open(path, "rb") as f:
            f.seek(done)
            data = f.read(min(size - done, MAX_RELEASE_SCAN))
        end = 0
        while (nl := data.find(b"\n", end)) >= 0:
            if not self._record(channel, data[end:nl], recorded):
                return end  # the audit log refused: this line again at the next scan
            end = nl + 1
        if end == 0 and len(data) == MAX_RELEASE_SCAN and self._record(channel, b"", recorded):
            end = len(data)  # a line longer than that: recorded as bad, skipped
        return end

    def _record(self, channel: str | None, line: bytes, recorded: list[int]) -> bool:
        """Record one line (its index added to ``recorded``); False if the audit log refused
        it (the line is tried again)."""
        from ferry.audit.record import AuditObject, Subject  # noqa: PLC0415

        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise TypeError("not an object")
            good = self._admin_key is not None and verify_record(record, self._admin_key)
        except (ValueError, TypeError):
            record, good = {}, False
        item = record.get("item_id")
        item = item if isinstance(item, str) and _ITEM_ID.fullmatch(item) else None
        sha256 = record.get("sha256")
        obj = AuditObject(
            kind="file",
            item=item,
            channel=channel or (str(record.get("channel") or "")[:256] or None),
            name=str(record.get("original_name") or "")[:1024] or None,
            sha256=sha256 if isinstance(sha256, str) and _SHA256.fullmatch(sha256) else None,
        )
        who = str(record.get("admin_key_id") or "unknown")[:64]
        why = "BAD_SIGNATURE: a release line not signed by the admin key"
        if good and record.get("event") == DELIVERED_EVENT:
            path, size = record.get("delivered_as"), record.get("size")
            stored = record.get("stored_name")
            if (
                isinstance(path, str)
                and 0 < len(path) <= MAX_DELIVERED_PATH
                and type(size) is int
                and size >= 0
                and isinstance(stored, str)
            ):
                return self._delivered(
                    dataclasses.replace(obj, path=path, size=size), who, stored, recorded
                )
            good = False  # signed, yet not a delivered line this code writes: never trusted
            why = "BAD_RECORD: a signed delivered line without a usable path, size or name"
        idx = self._audit.try_record(
            EVENT,
            subject=Subject.user(f"security-admin:{who}"),
            result="success" if good else "failure",
            reason=None if good else why,
            obj=obj,
            detail={
                k: str(record[k])[:256]
                for k in ("stored_name", "reason_code", "override", "released_at", "note")
                if record.get(k)
            },
            corr=item,
        )
        if idx is None:
            return False
        recorded.append(idx)
        return True

    def _delivered(self, obj: AuditObject, who: str, stored_name: str, recorded: list[int]) -> bool:
        """Record a signed delivered line (``obj`` has its path and size); then tell the
        agent. False if the audit log refused it."""
        from ferry.audit.record import Subject  # noqa: PLC0415

        idx = self._audit.try_record(
            DELIVERED_EVENT,
            subject=Subject.user(f"security-admin:{who}"),
            obj=obj,
            detail={"released": True, "stored_name": stored_name[:256]},
            corr=obj.item,
        )
        if idx is None:
            return False
        recorded.append(idx)
        if self._on_delivered is not None and obj.item is not None and obj.path is not None:
            self._on_delivered(obj.item, obj.path)
        return True


# ----------------------------------------------------------------------------- CLI
Handler = Callable[[argparse.Namespace], int]


def add_quarantine_parser(
    sub: Any,
    handlers: Mapping[str, Handler],
    *,
    config_help: str,
    item_help: str,
    release_help: str,
    channel_help: str,
    override: bool,
    channel_actions: tuple[str, ...] = ("list", "show", "release"),
) -> None:
    """Register ``quarantine list | show | release`` under ``sub`` (a subparsers object);
    ``--channel`` on ``channel_actions``, ``--override`` on ``release`` when ``override``."""
    qp = sub.add_parser("quarantine", help="list, inspect and release quarantined files")
    qsub = qp.add_subparsers(dest="quarantine_action", required=True)
    for action, helptext in (
        ("list", "list quarantined items"),
        ("show", "show one item's reason and report"),
        ("release", release_help),
    ):
        p = qsub.add_parser(action, help=helptext)
        p.add_argument("-c", "--config", required=True, help=config_help)
        if action in channel_actions:
            p.add_argument("--channel", help=channel_help)
        p.add_argument("--json", action="store_true")
        if action != "list":
            p.add_argument("item", help=item_help)
        p.add_argument(
            "--admin-public",
            help="trusted security-admin public key, which signs release lines "
            f"(default: {ADMIN_PUBLIC_KEY} next to the config)",
        )
        if action == "release":
            p.add_argument("--key", required=True, help="the security-admin secret key file")
            if override:
                p.add_argument("--override", help="the item's reason code to accept for this file")
            p.add_argument("--note", help="why the item is released (kept in the record)")
        p.set_defaults(func=handlers[action])


def print_list(rows: list[dict[str, Any]], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    if not rows:
        print("no quarantined items")
    for r in rows:
        flag = " (released)" if r["released"] else ""
        print(
            f"{r.get('channel')}  {r['stored_name']}  {r.get('reason_code')}  "
            f"{r.get('quarantined_at')}{flag}"
        )
        print(f"    {r.get('message')}")


def print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False, indent=2))
