"""``ferry send`` and ``ferry status``: the outer API from the command line.

Exit codes (docs/API.md, "Exit codes of ferry send and ferry status"): 0 accepted, or a
known submission (status); 1 status of an unknown id, or an unexpected failure; 2 usage (bad
arguments or id, a file that cannot be read); 3 config (also a config of another role); 4 key
file; 9 rejected (TOO_LARGE found locally too); 11 no answer, or the key refused; 13 busy
until the timeout.

With ``--json`` exactly one JSON object is printed on stdout, whatever the outcome.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import signal
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NoReturn

from ferry.errors import ConfigError, FerryError, KeyFileError, UsageError

if TYPE_CHECKING:
    from ferry.client import Ack, Client

# The outside's default limit on a message (api.max_message_size and a messages channel's
# max_message_size): a client cannot ask the server for its own, and a larger frame makes the
# server drop the connection rather than answer. What `ferry send` reads of a message at most.
DEFAULT_MESSAGE_LIMIT = 1024 * 1024
# The default limit on a file of a files channel (max_size): what `ferry send` copies at most
# of an upload from stdin or a pipe to a temporary file (an upload needs its size and hash).
DEFAULT_UPLOAD_LIMIT = 4 * 1024**3
SPOOL_PIECE = 1 << 20
# The most --message-limit may say (a sanity bound: far above any message a gateway takes).
MAX_MESSAGE_LIMIT = 256 * 1024 * 1024

_ERROR_CODES: tuple[tuple[type[FerryError], str], ...] = (
    (UsageError, "USAGE"),
    (ConfigError, "CONFIG"),
    (KeyFileError, "KEY_FILE"),
)


def cmd_send(args: argparse.Namespace) -> int:
    from ferry.client import new_submission_id  # noqa: PLC0415  # keep `ferry --help` fast

    sid = None  # (an id given is shown once it is known to be one)
    # SIGTERM (timeout(1), systemd) as Ctrl-C: the id is still told, a temporary copy removed
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        try:
            _check_id(args.id)
            sid = args.id or new_submission_id()
            try:
                ack = _send(args, sid)
            except OSError as exc:  # the input: missing, a folder, unreadable, no room to spool
                where = os.fsdecode(exc.filename) if exc.filename else args.file
                raise UsageError(f"cannot read {where!r}: {exc.strerror or exc}") from exc
        except FerryError as exc:
            return _failed(args, sid, exc, retry_hint=True)
        except KeyboardInterrupt:
            return _interrupted(args, sid)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if args.json:
        text = json.dumps(ack.as_dict())
    else:
        dup = " (already accepted earlier)" if ack.duplicate else ""
        text = f"accepted{dup}: item {ack.item}, channel {ack.channel}, seq {ack.seq}, id {ack.id}"
    try:
        print(text, flush=True)
    except OSError as exc:  # (a closed pipe, a full disk): the gateway has it all the same
        _quiet_stdout()
        print(
            f"ferry: error: accepted (item {ack.item}, submission id {ack.id}), but the answer "
            f"could not be written: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _interrupted(args: argparse.Namespace, sid: str | None) -> int:
    """Stopped (Ctrl-C, SIGTERM) before the answer: the submission may have reached the
    gateway; its id is what makes sending again safe."""
    message = "stopped before the gateway's answer; it may have the submission"
    if args.json:
        out = {"status": "ERROR", "id": sid, "code": "INTERRUPTED", "message": message}
        print(json.dumps(out | {"retry_after": None}))
    print(f"ferry: error: {message}" + (f" (submission id {sid})" if sid else ""), file=sys.stderr)
    if sid:
        print(
            f"ferry: hint: send again with --id {sid}: if the first one arrived, the gateway "
            "answers with the same item, it does not make a second",
            file=sys.stderr,
        )
    return 130


def _quiet_stdout() -> None:
    """stdout could not be written: point it at /dev/null so Python's own flush at exit does
    not fail again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def cmd_status(args: argparse.Namespace) -> int:
    from ferry.client import Client  # noqa: PLC0415

    try:
        _check_id(args.id)
        with Client.from_config(args.config) as client:
            body = client.status(args.id, timeout=args.timeout)
    except FerryError as exc:
        return _failed(args, args.id, exc, retry_hint=False)
    print(json.dumps(body, ensure_ascii=False))
    return 0 if body.get("state") != "unknown" else 1


def _check_id(sid: str | None) -> None:
    from ferry.client import check_submission_id  # noqa: PLC0415

    if sid is not None:
        check_submission_id(sid)


def _send(args: argparse.Namespace, sid: str) -> Ack:
    """Send ``args.file`` as a message or an upload, as the channel takes it."""
    from ferry.client import ApiRejected, Client  # noqa: PLC0415

    limit = args.message_limit
    st = None if args.file == "-" else os.stat(args.file)
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{args.file!r} is a folder: send its files one by one")
    size = st.st_size if st is not None and stat.S_ISREG(st.st_mode) else None  # (None: a stream)
    with Client.from_config(args.config) as client:
        if size is not None and (args.upload or size > limit):
            try:
                return _upload(client, args, sid, Path(args.file))
            except ApiRejected as exc:
                if args.upload or exc.reason_code != "WRONG_CHANNEL_KIND":
                    raise
            raise _too_large(  # (a messages channel: the file is a message too large for it)
                f"{size} bytes", limit, f"; channel {args.channel!r} takes messages, not files"
            )
        if args.upload:  # stdin or a pipe
            with _spooled(args, args.file) as path:
                return _upload(client, args, sid, path)
        from ferry.client import read_input  # noqa: PLC0415

        data = read_input(args.file, limit)  # (no more than limit + 1 bytes in memory)
        if len(data) > limit:
            raise _too_large(
                f"more than {limit} bytes",
                limit,
                "; a files channel takes larger files with --upload --name NAME",
            )
        try:
            return client.submit(
                args.channel, data, schema=args.schema, submission_id=sid, timeout=args.timeout
            )
        except ApiRejected as exc:
            if exc.reason_code != "WRONG_CHANNEL_KIND":
                raise
            if size is not None:  # a files channel: upload the file instead
                return _upload(client, args, sid, Path(args.file))
            if args.name is None:
                raise ApiRejected(
                    exc.reason_code, f"{exc.message}: send it with --upload --name NAME"
                ) from exc
        with _spooled(args, data) as path:
            return _upload(client, args, sid, path)


def _upload(client: Client, args: argparse.Namespace, sid: str, path: Path) -> Ack:
    return client.upload(
        args.channel, path, name=args.name, submission_id=sid, timeout=args.timeout
    )


def _too_large(what: str, limit: int, hint: str = "") -> FerryError:
    from ferry.client import ApiRejected  # noqa: PLC0415

    return ApiRejected(
        "TOO_LARGE", f"message of {what}; the limit is {limit} bytes (--message-limit){hint}"
    )


@contextlib.contextmanager
def _spooled(args: argparse.Namespace, source: str | bytes) -> Iterator[Path]:
    """A temporary copy of an upload read from stdin or a pipe (an upload announces its size
    and SHA-256 before its first byte), of at most ``--upload-limit`` bytes."""
    if args.name is None:
        raise UsageError(
            "an upload from stdin or a pipe needs --name NAME (the file's name inside)"
        )
    with tempfile.NamedTemporaryFile(prefix="ferry-send-") as tmp:
        if isinstance(source, bytes):
            tmp.write(source)
        elif source == "-":
            _copy(sys.stdin.buffer, tmp, args.upload_limit)
        else:
            with open(source, "rb") as f:
                _copy(f, tmp, args.upload_limit)
        tmp.flush()
        yield Path(tmp.name)


def _copy(src: IO[bytes], dst: IO[bytes], limit: int) -> None:
    copied = 0
    while piece := src.read(SPOOL_PIECE):
        copied += len(piece)
        if copied > limit:
            from ferry.client import ApiRejected  # noqa: PLC0415

            raise ApiRejected("TOO_LARGE", f"upload of more than {limit} bytes (--upload-limit)")
        dst.write(piece)


def _failed(args: argparse.Namespace, sid: str | None, exc: FerryError, *, retry_hint: bool) -> int:
    """Say what went wrong, on stderr, and with --json as one object on stdout; the exit
    code is the error's."""
    from ferry.client import ApiBusy, ApiRejected, ApiUnavailable  # noqa: PLC0415

    out: dict[str, Any] = {
        "status": "ERROR",
        "id": sid,
        "code": next((code for cls, code in _ERROR_CODES if isinstance(exc, cls)), "ERROR"),
        "message": str(exc),
        "retry_after": None,
    }
    hint = None
    if isinstance(exc, ApiRejected):
        out.update(status="REJECTED", code=exc.reason_code, message=exc.message)
        if exc.path:
            out["path"] = exc.path
    elif isinstance(exc, ApiBusy):
        out.update(status="BUSY", code=exc.code, retry_after=exc.retry_after)
        hint = f"send again with --id {sid} in {exc.retry_after:g} s or later"
    elif isinstance(exc, ApiUnavailable):
        out["code"] = exc.code
        if exc.code in {"NO_ANSWER", "CONNECTION_DROPPED"}:
            hint = (
                f"send again with --id {sid}: if the first one arrived, the gateway answers "
                "with the same item, it does not make a second"
            )
    if args.json:
        print(json.dumps(out))
    known = f" (submission id {sid})" if sid and retry_hint else ""
    print(f"ferry: error: {exc}{known}", file=sys.stderr)
    if hint and retry_hint:
        print(f"ferry: hint: {hint}", file=sys.stderr)
    return exc.exit_code


def _size(text: str, most: int = 1 << 40) -> int:
    """A byte count option: a positive integer, at most ``most``."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 0 < n <= most:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of bytes from 1 to {most} (a whole number)"
        )
    return n


def _message_size(text: str) -> int:
    return _size(text, MAX_MESSAGE_LIMIT)


def _seconds(text: str) -> float:
    """A time-out option: a number of seconds, more than 0, at most a day."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= 86400:  # (also refuses nan and inf)
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 0 to 86400")
    return seconds


def usage_error(parser: argparse.ArgumentParser, words: list[str], message: str) -> NoReturn:
    """argparse's error (of ``ferry`` or of its send and status commands), and for ``ferry
    send --json`` and ``ferry status --json`` (``words``: the arguments parsed) also the one
    JSON object of every outcome."""
    if "--json" in words and {"send", "status"} & set(words):
        out = {"status": "ERROR", "id": None, "code": "USAGE", "message": message}
        print(json.dumps(out | {"retry_after": None}))
    parser.print_usage(sys.stderr)
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def add_parsers(sub: Any, words: list[str]) -> None:
    """``ferry send`` and ``ferry status`` (``sub``: the subparsers of ``ferry``; ``words``:
    the arguments to be parsed, see :func:`usage_error`)."""
    sd = sub.add_parser("send", help="submit a JSON message or upload a file through the outer API")
    sd.add_argument(
        "-c", "--config", required=True, help="API client config (ferry init writes one)"
    )
    sd.add_argument("--channel", required=True)
    sd.add_argument("file", help="file to send, or - for stdin")
    sd.add_argument(
        "--schema",
        help="message schema (default: the first of the channel's schemas the message matches)",
    )
    sd.add_argument(
        "--id",
        help="submission id, 1-128 printable ASCII characters (default: a new UUID, shown in "
        "every error); sending again with it is safe",
    )
    sd.add_argument(
        "--upload",
        action="store_true",
        help="send as a file upload, not a message (from stdin or a pipe: with --name)",
    )
    sd.add_argument(
        "--name", help="the file's name inside (default: its own; needed from stdin or a pipe)"
    )
    sd.add_argument(
        "--message-limit",
        type=_message_size,
        default=DEFAULT_MESSAGE_LIMIT,
        help="the gateway's message size limit: larger files are uploaded, larger input for a "
        "messages channel is refused here as TOO_LARGE (default 1 MiB, the gateway's default)",
    )
    sd.add_argument(
        "--upload-limit",
        type=_size,
        default=DEFAULT_UPLOAD_LIMIT,
        help="most bytes of an upload from stdin or a pipe (copied to a temporary file first; "
        "default 4 GiB, a files channel's default max_size)",
    )
    sd.add_argument(
        "--timeout", type=_seconds, help="seconds to wait for the acknowledgement (up to a day)"
    )
    sd.add_argument(
        "--json", action="store_true", help="print the outcome as one JSON object, always"
    )
    sd.set_defaults(func=cmd_send)
    sd.error = functools.partial(usage_error, sd, words)

    ss = sub.add_parser("status", help="where is my submission (accepted, sent, repeats)")
    ss.add_argument("-c", "--config", required=True)
    ss.add_argument("id", help="the submission id")
    ss.add_argument("--timeout", type=_seconds)
    ss.add_argument("--json", action="store_true", help="errors as JSON too (the answer always is)")
    ss.set_defaults(func=cmd_status)
    ss.error = functools.partial(usage_error, ss, words)
