"""The pipeline's stages for one file, run inside a worker process.

``Engine.run`` takes one file through, in order (the first failing stage decides the reason):

1. file name policy (FILENAME_POLICY);
2. size limit (LIMIT_EXCEEDED);
3. YARA scan of the raw bytes (MALWARE_SIGNATURE);
4. identification by content, polyglots (POLYGLOT, MALFORMED, ENCRYPTED), extension
   agreement (TYPE_MISMATCH) and the channel's allowed types (TYPE_NOT_ALLOWED);
5. the format's sanitizer, which scans every object it decodes through the :class:`Context`
   and runs archive members through these same stages one level deeper;
6. a YARA scan of the output when the sanitizer wrote one.

Any exception other than :class:`~ferry.content.base.Reject` becomes FILTER_ERROR: nothing
is delivered unless every stage said yes. The report is deterministic except ``elapsed_ms``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ferry.content.base import FEATURES, Action, FeatureMode, Policy, Reject
from ferry.content.scan import Scanner
from outside.content import formats, names
from outside.content.identify import check_extension, describe, identify

# Members nested deeper than this are refused whatever the policy says (documents inside
# archives inside documents...): a hard stop for recursion.
MAX_NESTING = 8
HASH_CHUNK = 1024 * 1024


@dataclass
class Outcome:
    kind: str  # deliver_as_is | deliver_cleaned | reject
    type_name: str | None
    name: str
    reason: str | None = None
    message: str = ""
    actions: list[Action] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    output: Path | None = None


def file_digest(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


class FileContext:
    """The :class:`~ferry.content.base.Context` of one file (or archive member)."""

    def __init__(
        self,
        engine: Engine,
        policy: Policy,
        *,
        depth: int,
        where: str,
        name: str,
        workdir: Path,
    ) -> None:
        self.engine = engine
        self.policy = policy
        self.depth = depth
        self.where = where
        self.name = name
        self.workdir = workdir
        self.matches: list[dict[str, str]] = []
        self.scanned = 0
        self.members: list[dict[str, Any]] = []
        self.member_actions: list[Action] = []
        self._members_made = 0

    def _at(self, where: str) -> str:
        return f"{self.where}: {where}" if self.where and where else (where or self.where)

    def scan(self, data: bytes, where: str) -> None:
        self.scanned += 1
        found = self.engine.scanner.scan(data)
        if found:
            self.matches.extend({**m.to_json(), "where": self._at(where)} for m in found)
            raise Reject(
                "MALWARE_SIGNATURE",
                f"{self._at(where) or 'the file'} matches the signature {found[0].rule}",
            )

    def feature(self, name: str, present: int, where: str = "") -> bool:
        if present <= 0:
            return False
        mode: FeatureMode = self.policy.feature(name)
        if mode == "disallow":
            place = f" ({self._at(where)})" if self._at(where) else ""
            raise Reject(
                "ACTIVE_CONTENT_DISALLOWED",
                f"{FEATURES[name]}{place}: {present} found; this channel does not accept them",
            )
        return mode == "sanitize"

    def member_file(self, name: str, path: Path) -> tuple[Path, dict[str, Any]]:
        """Run a member (already in a file) through every stage one level deeper: the
        delivered file and the member's report. Raises Reject for the whole container."""
        where = f"{self.where}/{name}" if self.where else name
        depth = self.depth + 1
        if depth > MAX_NESTING:
            raise Reject("ARCHIVE_DEPTH", f"{where}: nested more than {MAX_NESTING} levels deep")
        self._members_made += 1
        work = self.workdir / f"m{depth}-{self._members_made}"
        work.mkdir()
        outcome = self.engine.run_one(
            self.policy, path, PurePosixPath(name).name, work, depth=depth, where=where
        )
        report = dict(outcome.report, path=name)
        self.members.append(report)
        if outcome.kind == "reject":
            assert outcome.reason is not None
            raise Reject(
                outcome.reason,
                outcome.message if where in outcome.message else f"{where}: {outcome.message}",
            )
        for a in outcome.actions:
            self.member_actions.append(
                Action(a.what, a.target, f"{name}: {a.where}" if a.where else name, a.count)
            )
        return (outcome.output or path), report

    def member(self, name: str, data: bytes) -> tuple[bytes, dict[str, Any]]:
        self._members_made += 1
        tmp = self.workdir / f"in-{self._members_made}{PurePosixPath(name).suffix[:16]}"
        tmp.write_bytes(data)
        try:
            out, report = self.member_file(name, tmp)
            return out.read_bytes(), report
        finally:
            tmp.unlink(missing_ok=True)


class Engine:
    """The stages, with one compiled scanner (one per worker process)."""

    def __init__(self, scanner: Scanner, sanitizers: Mapping[str, str] | None = None) -> None:
        self.scanner = scanner
        self.sanitizers = dict(sanitizers or {})

    def run(self, policy: Policy, src: Path, name: str, workdir: Path) -> Outcome:
        """Check one file. ``workdir`` (reused from file to file) is emptied first: what a
        refused archive's members, or a worker stopped mid-way, left there must not make the
        next file's check fail."""
        started = time.monotonic()
        _empty(workdir)
        outcome = self.run_one(policy, src, name, workdir, depth=0, where="")
        outcome.report["limits"] = _limits_json(policy)
        outcome.report["elapsed_ms"] = round((time.monotonic() - started) * 1000, 1)
        return outcome

    def run_one(
        self, policy: Policy, src: Path, name: str, workdir: Path, *, depth: int, where: str
    ) -> Outcome:
        ctx = FileContext(self, policy, depth=depth, where=where, name=name, workdir=workdir)
        sha_in, size_in = file_digest(src)
        report: dict[str, Any] = {
            "version": 1,
            "name": name,
            "delivered_name": None,
            "type": None,
            "verdict": "reject",
            "reason": None,
            "message": "",
            "sha256_in": sha_in,
            "sha256_out": None,
            "size_in": size_in,
            "size_out": None,
            "actions": [],
            "members": ctx.members,
            "scans": {
                "engine": "yara",
                "rules": self.scanner.digest,
                "objects": 0,
                "matches": ctx.matches,
            },
        }
        try:
            outcome = self._stages(ctx, src, name, size_in, report)
        except Reject as exc:
            message = _without_paths(exc.message, name, src, workdir)
            outcome = Outcome("reject", report["type"], name, exc.code, message)
        except RecursionError:
            outcome = Outcome(
                "reject", None, name, "FILTER_ERROR", "the file is nested too deeply to check"
            )
        except MemoryError:
            outcome = Outcome(
                "reject",
                None,
                name,
                "FILTER_ERROR",
                "checking the file needed more memory than allowed",
            )
        except Exception as exc:  # noqa: BLE001  # fail closed: any filter bug rejects the file
            kind = report.get("type") or "file"
            outcome = Outcome(
                "reject",
                None,
                name,
                "FILTER_ERROR",
                f"the {kind} filter failed ({type(exc).__name__})",
            )
        report["scans"]["objects"] = ctx.scanned
        if outcome.kind == "reject":
            for partial in workdir.glob(f"cleaned-{depth}.*"):  # nothing half-written stays
                partial.unlink(missing_ok=True)
            outcome.output = None
            report.update(
                verdict="reject",
                reason=outcome.reason,
                message=outcome.message,
                delivered_name=None,
                sha256_out=None,
                size_out=None,
            )
            report["actions"] = [a.to_json() for a in outcome.actions]
        outcome.report = report
        return outcome

    def _stages(
        self, ctx: FileContext, src: Path, name: str, size: int, report: dict[str, Any]
    ) -> Outcome:
        policy = ctx.policy
        checked = names.check_name(name)
        limit = policy.limits.max_bytes
        if size > limit:
            raise Reject("LIMIT_EXCEEDED", f"the file is {size} bytes; at most {limit} allowed")
        ctx.scanned += 1
        found = self.scanner.scan_file(src)
        if found:
            ctx.matches.extend({**m.to_json(), "where": ctx.where or "file"} for m in found)
            raise Reject("MALWARE_SIGNATURE", f"the file matches the signature {found[0].rule}")
        identity = identify(src.read_bytes(), checked)
        report["type"] = identity.type_name
        if not identity.supported:
            if identity.type_name != "unknown":  # the name may claim another type
                check_extension(identity, checked)
            raise Reject(
                "TYPE_NOT_ALLOWED",
                f"the file is {describe(identity.type_name)}; such files are not accepted",
            )
        check_extension(identity, checked)
        if identity.type_name not in policy.allowed_types:
            raise Reject(
                "TYPE_NOT_ALLOWED",
                f"{identity.type_name.upper()} files are not accepted on this channel "
                f"(accepted: {', '.join(sorted(policy.allowed_types)) or 'none'})",
            )
        sanitizer = formats.load(identity.type_name, self.sanitizers)
        dst = ctx.workdir / f"cleaned-{ctx.depth}.{names.CANONICAL_EXTENSIONS[identity.type_name]}"
        result = sanitizer(src, dst, ctx)
        actions = list(result.actions) + ctx.member_actions
        if result.cleaned:
            if not dst.is_file():
                raise Reject("FILTER_ERROR", f"the {identity.type_name} filter wrote no output")
            ctx.scanned += 1
            found = self.scanner.scan_file(dst)
            if found:
                ctx.matches.extend({**m.to_json(), "where": "cleaned output"} for m in found)
                raise Reject(
                    "MALWARE_SIGNATURE", f"the cleaned file matches the signature {found[0].rule}"
                )
            out = dst
        else:
            with contextlib.suppress(FileNotFoundError):
                dst.unlink()
            out = src
        if result.type_name not in names.CANONICAL_EXTENSIONS:
            raise Reject("FILTER_ERROR", f"the filter produced an unknown type {result.type_name}")
        sha_out, size_out = file_digest(out) if result.cleaned else (report["sha256_in"], size)
        delivered = names.delivered_name(checked, result.type_name)
        kind = "deliver_cleaned" if result.cleaned else "deliver_as_is"
        report.update(
            delivered_name=delivered,
            type=result.type_name,
            detected=identity.type_name,
            verdict=kind,
            sha256_out=sha_out,
            size_out=size_out,
            actions=[a.to_json() for a in actions],
            info=_jsonable(result.info),
        )
        return Outcome(
            kind,
            result.type_name,
            delivered,
            actions=actions,
            output=dst if result.cleaned else None,
        )


def _limits_json(policy: Policy) -> dict[str, Any]:
    from dataclasses import asdict  # noqa: PLC0415

    return asdict(policy.limits)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _without_paths(message: str, name: str, src: Path, workdir: Path) -> str:
    """A refusal's message without the gateway's own file paths (a parser's error may quote
    the file it read): it goes to the clerk or the API client, who know the file by name."""
    for path, instead in ((src, repr(name)), (workdir, "…")):
        if len(str(path)) > 1:  # (never "/" or ".")
            message = message.replace(str(path), instead)
    return message


def _empty(folder: Path) -> None:
    """Remove what is in ``folder`` (not following symlinks), keeping the folder."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
