"""The one error tree of ferry.

Every error ferry raises on purpose derives from :class:`FerryError`. Each
class has a stable exit code used by the CLI (``ferry ... ; echo $?``).

The receiver's fuzz invariant: on any input bytes, receive-side wire code
raises only :class:`WireError` or :class:`EnvelopeRejected`.
"""

from __future__ import annotations


class FerryError(Exception):
    """Base of all ferry errors. Exit code 1."""

    exit_code = 1


class UsageError(FerryError):
    """Local misuse of a command or API (bad arguments, missing files). Exit code 2."""

    exit_code = 2


class ConfigError(FerryError):
    """A configuration file is invalid: the message names the file, line and key. Exit code 3."""

    exit_code = 3


class KeyFileError(FerryError):
    """A key file is missing, malformed, of the wrong role, or readable by others. Exit code 4."""

    exit_code = 4


class SelfTestError(FerryError):
    """A start-up known-answer test failed; the agent refuses to run. Exit code 5."""

    exit_code = 5


class WireError(FerryError):
    """Malformed untrusted bytes: bad magic, version, length or structure. Exit code 6.

    Raised for anything read from the link that does not parse. Never carries
    secret material in its message.
    """

    exit_code = 6


class EnvelopeRejected(WireError):
    """Authentication or decryption failed (opaque on purpose, like Fernet's InvalidToken).

    One class for every reason a sealed packet, a signature or a session
    announcement fails to verify, so no oracle leaks which check failed.
    """

    exit_code = 7


class ReplayRejected(WireError):
    """A packet, announcement or object was seen before or is older than the replay window."""

    exit_code = 8


class PolicyRejection(FerryError):
    """An item was refused by policy (size, type, name). An audited outcome, not a crash."""

    exit_code = 9

    def __init__(self, reason_code: str, message: str) -> None:
        super().__init__(f"{reason_code}: {message}")
        self.reason_code = reason_code


class UnsafePathError(PolicyRejection):
    """A file name or path would escape its folder or is not allowed."""

    exit_code = 10

    def __init__(self, message: str) -> None:
        super().__init__("FILENAME_POLICY", message)


class ChannelError(FerryError):
    """A transport (UDP socket, serial tty) could not be opened or failed. Exit code 11."""

    exit_code = 11


class StateError(FerryError):
    """The agent's state database is unusable (corrupt, locked, wrong version). Exit code 12."""

    exit_code = 12
