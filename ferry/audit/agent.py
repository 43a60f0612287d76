"""An agent's audit log: opening it from the config, and the records of the agent's own life.

:class:`AgentAudit` opens the :class:`~ferry.audit.log.AuditLog` named by the config's
``audit:`` section and writes, at start-up:

* ``agent.abnormal_termination`` when the previous run left its run marker behind (it was
  killed or crashed), with the previous pid and start time;
* ``config.loaded``, or ``config.changed`` when the config file's SHA-256 differs from the
  one recorded by the previous run;
* ``agent.started`` (pid, version, config SHA-256);

and, from :meth:`AgentAudit.keys_in_use`, ``key.activated`` for each key the agent uses that
its previous run did not, and ``key.retired`` for each it no longer uses (a key rotation).

:meth:`AgentAudit.close` writes ``agent.stopped`` and removes the marker. docs/AUDIT.md §7
lists every record the agents write.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from ferry import __version__, log
from ferry.audit.log import AuditLog, AuditSettings
from ferry.audit.merkle import check_origin
from ferry.audit.record import (
    AuditObject,
    AuditUnavailable,
    Result,
    Subject,
    format_ts,
    item_batches,
)
from ferry.audit.segments import CHECKPOINTS_FILE
from ferry.config_types import AuditParams
from ferry.crypto.keys import PublicKey, SecretKey, load_secret_key
from ferry.errors import ConfigError

_log = log.get("audit.agent")

RUN_MARKER = "agent.running"
# Seconds between audit.exported records while records flow to the SIEM.
EXPORT_NOTE_INTERVAL = 600.0
CONFIG_HASH = "config.sha256"
KEYS_IN_USE = "keys-in-use.json"


def default_origin(side: str, key: SecretKey) -> str:
    """The log's name in its checkpoints when the config names none: stable per audit key."""
    return f"ferry/{side}/{key.public.key_id.hex()[:16]}"


def open_audit_log(params: AuditParams, side: str) -> AuditLog:
    """Open (or create, or resume) the audit log an agent config names."""
    key = load_secret_key(params.key, ("ed25519",))
    previous = [load_secret_key(p, ("ed25519",)) for p in params.previous_keys]
    settings = AuditSettings(
        origin=params.origin or existing_origin(params.dir) or default_origin(side, key),
        checkpoint_every=params.checkpoint_every,
        checkpoint_interval=params.checkpoint_interval,
        side=side,
    )
    return AuditLog(params.dir, key, settings, previous_keys=previous)


def existing_origin(directory: Path) -> str | None:
    """The name an existing log gave itself (the first line of its ``checkpoints.log``), so
    that a log whose origin comes from its first key keeps it after a key rotation."""
    try:
        with open(directory / CHECKPOINTS_FILE, "rb") as f:
            first = f.readline(257)  # an origin is at most 255 bytes
    except FileNotFoundError:
        return None
    try:
        origin = first.rstrip(b"\n").decode("utf-8")
        check_origin(origin)
    except (UnicodeDecodeError, ValueError):
        return None  # the log itself is then refused when it opens, with the reason
    return origin


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_durably(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _hex_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{2,64}", value) else None


class AgentAudit:
    """The audit log of one running agent (``side`` is "outside" or "inside")."""

    def __init__(
        self, params: AuditParams | None, side: str, state_dir: Path, config_file: Path
    ) -> None:
        if params is None:
            raise ConfigError(
                f"{config_file}: no 'audit:' section. ferry keeps a tamper-evident audit log "
                "and will not run without one: add audit: {dir: ..., key: ...} "
                "(ferry init writes it; ferry keygen --role audit makes the key)"
            )
        self.side = side
        self.subject = Subject.component(f"{side}-agent")
        self.log = open_audit_log(params, side)
        self._marker = state_dir / RUN_MARKER
        self._hash_file = state_dir / CONFIG_HASH
        self._keys_file = state_dir / KEYS_IN_USE
        self._start(config_file)
        self._export_stop = threading.Event()
        self._export: threading.Thread | None = None
        self._exported_at = 0.0
        if params.siem:
            self._start_export(params, state_dir)

    def _start_export(self, params: AuditParams, state_dir: Path) -> None:
        """Follow the log and send it to the SIEM on a thread of its own: never blocks it."""
        from ferry.audit.siem import Destination, Exporter  # noqa: PLC0415

        assert params.siem is not None
        exporter = Exporter(
            params.dir,
            Destination.parse(params.siem),
            state_dir,
            origin=self.log.origin,
            on_exported=self._exported,
            durable=lambda: self.log.durable_size,
        )

        def run() -> None:
            try:
                exporter.run(self._export_stop)
            except Exception:  # noqa: BLE001  # the export must never take the agent down
                _log.exception("siem_export_stopped")

        self._export = threading.Thread(target=run, name="siem-export", daemon=True)
        self._export.start()
        _log.info("siem_export_started", destination=params.siem)

    def _exported(self, first: int, last: int) -> None:
        # At most one record per EXPORT_NOTE_INTERVAL, and none for a range of one record
        # (the previous audit.exported itself), so an idle log stays idle.
        now = time.monotonic()
        if last <= first or now - self._exported_at < EXPORT_NOTE_INTERVAL:
            return
        self._exported_at = now
        self.try_record(
            "audit.exported",
            subject=Subject.component("siem-export"),
            result="info",
            detail={"first": first, "last": last},
        )

    @property
    def failed(self) -> bool:
        """True while the log cannot write: intake and transfers must stop."""
        return self.log.failed.is_set()

    def _start(self, config_file: Path) -> None:
        if self._marker.exists():
            try:
                prev = json.loads(self._marker.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                prev = {}
            detail = {k: prev[k] for k in ("pid", "started") if k in prev}
            self.log.append(
                "agent.abnormal_termination",
                subject=self.subject,
                result="failure",
                reason="the previous run did not stop cleanly (killed, crashed or power lost)",
                detail=detail,
            )
        digest = _sha256_file(config_file)
        try:
            previous = self._hash_file.read_text(encoding="ascii").strip()
        except OSError:
            previous = ""
        obj = AuditObject(kind="config", path=str(config_file), sha256=digest)
        if previous and previous != digest:
            self.log.append(
                "config.changed",
                subject=self.subject,
                result="info",
                obj=obj,
                detail={"previous_sha256": previous},
            )
        else:
            self.log.append("config.loaded", subject=self.subject, result="info", obj=obj)
        idx = self.log.append(
            "agent.started",
            subject=self.subject,
            result="success",
            detail={"pid": os.getpid(), "version": __version__, "config_sha256": digest},
        )
        self.log.wait_durable(idx)  # the start is on disk before the agent does anything
        _write_durably(self._hash_file, digest + "\n")
        _write_durably(
            self._marker, json.dumps({"pid": os.getpid(), "started": self.log_time()}) + "\n"
        )

    def own_keys(self) -> list[tuple[str, PublicKey, bool]]:
        """This side's audit keys, as :meth:`keys_in_use` takes them: the current one, and
        earlier ones still signing alongside it during a rotation."""
        log = self.log
        return [("audit", log.public_key, True)] + [
            ("audit", k, False) for k in log.previous_public_keys
        ]

    def keys_in_use(self, keys: list[tuple[str, PublicKey, bool]]) -> None:
        """Record which keys this run uses, given as (role, public key, current): each one
        the previous run did not use gets ``key.activated``, each it used that is gone gets
        ``key.retired``; durable before the agent goes on. (A rotation is a config change:
        ``config.changed`` says that the file changed, these say which keys did.)"""
        now = {f"{role}:{key.key_id.hex()}": (role, key, current) for role, key, current in keys}
        try:
            before = json.loads(self._keys_file.read_text(encoding="utf-8"))
            if not isinstance(before, dict):
                raise TypeError("not an object")
        except FileNotFoundError:
            before = {}
        except (OSError, ValueError, TypeError) as exc:  # unreadable: start over, and say so
            _log.warning("keys_in_use_unreadable", path=str(self._keys_file), error=str(exc))
            before = {}
        last = 0
        for ident, (role, key, current) in now.items():
            if ident not in before:
                last = self.log.append(
                    "key.activated",
                    subject=self.subject,
                    result="info",
                    obj=AuditObject(kind="key", key_id=key.key_id.hex()),
                    detail={"role": role, "alg": key.alg, "current": current},
                )
        for ident, old in before.items():
            if ident not in now and isinstance(old, dict):
                last = self.log.append(
                    "key.retired",
                    subject=self.subject,
                    result="info",
                    obj=AuditObject(kind="key", key_id=_hex_or_none(old.get("key_id"))),
                    detail={"role": str(old.get("role", ""))[:64], "alg": str(old.get("alg"))},
                )
        if last:
            self.log.wait_durable(last)
        record = {
            ident: {"role": role, "key_id": key.key_id.hex(), "alg": key.alg, "current": current}
            for ident, (role, key, current) in now.items()
        }
        _write_durably(self._keys_file, json.dumps(record, sort_keys=True, indent=1) + "\n")

    @staticmethod
    def log_time() -> str:
        return format_ts(time.time_ns() // 1000)

    def record(
        self,
        event: str,
        *,
        subject: Subject | None = None,
        result: Result = "success",
        reason: str | None = None,
        obj: AuditObject | Mapping[str, object] | None = None,
        detail: Mapping[str, object] | None = None,
        corr: str | None = None,
        durable: bool = False,
    ) -> int:
        """Append one record (raises AuditUnavailable while the log cannot write)."""
        return self.log.append(
            event,
            subject=subject or self.subject,
            result=result,
            reason=reason,
            obj=obj,
            detail=detail,
            corr=corr,
            durable=durable,
        )

    def record_items(
        self,
        event: str,
        *,
        subject: Subject,
        shared: Mapping[str, object],
        entries: list[dict[str, object]],
        detail: Mapping[str, object] | None = None,
        recorded: Callable[[list[dict[str, object]]], None] | None = None,
    ) -> int:
        """Append batch records (docs/AUDIT.md §2) for ``entries``, one dict per item.

        ``shared`` holds the object fields every entry has in common. Entries are split
        into records that fit; ``recorded(run)`` is called after each record is appended
        (so a caller retrying after AuditUnavailable can skip what is already in).
        Returns the index of the last record, or -1 when ``entries`` is empty.
        """
        last = -1
        for run in item_batches(entries):
            last = self.record(event, subject=subject, obj={**shared, "items": run}, detail=detail)
            if recorded is not None:
                recorded(run)
        return last

    def try_record(self, event: str, **kw: object) -> int | None:
        """Append a record whose loss must not stop the caller (it is already stopping, or
        the event is informational); a refusal is logged as an error."""
        try:
            return self.record(event, **kw)  # type: ignore[arg-type]
        except AuditUnavailable as exc:
            _log.error("audit_record_refused", audit_event=event, error=str(exc))
            return None

    def close(self, *, clean: bool = True) -> None:
        """Write ``agent.stopped`` (when ``clean``), remove the run marker, close the log."""
        self._export_stop.set()
        if self._export is not None:
            self._export.join(timeout=5)
        try:
            if clean:
                self.record("agent.stopped", result="success", durable=True)
                self._marker.unlink(missing_ok=True)
        except AuditUnavailable as exc:
            _log.error("audit_stop_not_recorded", error=str(exc))
        finally:
            self.log.close()
