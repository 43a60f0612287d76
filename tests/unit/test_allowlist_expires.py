"""An allow-list entry's ``expires``: written as operators write YAML (quoted or not, in UTC
or with their own offset, or a date alone), the same instant; without an offset (a local
time, ambiguous) refused with a reason. The key is refused from that instant on."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from ferry.config import load_allowlist_entry
from ferry.crypto.keys import SecretKey
from ferry.errors import ConfigError
from ferry.zmqsec import Allowlist, z85_public

KEY = SecretKey.generate("x25519")
NOON_UTC = int(datetime.datetime(2027, 6, 30, 12, tzinfo=datetime.UTC).timestamp() * 1e6)


def _entry(folder: Path, expires: str) -> Path:
    path = folder / "portal.yaml"
    path.write_text(
        f"version: 1\nname: portal\npublic_key: {KEY.public.to_string()}\n"
        f"channels: [messages]\nexpires: {expires}\n"
    )
    return path


@pytest.mark.parametrize(
    ("written", "instant"),
    [
        ('"2027-06-30T12:00:00Z"', NOON_UTC),
        ("2027-06-30T12:00:00Z", NOON_UTC),  # unquoted: YAML reads a date-time
        ('"2027-06-30T20:00:00+08:00"', NOON_UTC),
        ("2027-06-30T20:00:00+08:00", NOON_UTC),
        ("2027-06-30 12:00:00", NOON_UTC),  # unquoted, no offset: YAML means UTC
        ("2027-06-30", NOON_UTC - 12 * 3600 * 10**6),  # a date alone: its first instant
    ],
)
def test_expires_as_operators_write_it(tmp_path: Path, written: str, instant: int) -> None:
    assert load_allowlist_entry(_entry(tmp_path, written)).expires_us == instant


def test_a_quoted_local_time_without_offset_is_refused_with_a_reason(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expires"):
        load_allowlist_entry(_entry(tmp_path, '"2027-06-30T12:00:00"'))


def test_the_key_is_refused_from_that_instant(tmp_path: Path) -> None:
    _entry(tmp_path, "2027-06-30T20:00:00+08:00")
    now = [NOON_UTC / 1e6 - 1]
    allow = Allowlist(tmp_path, clock=lambda: now[0])
    key = z85_public(KEY.public).decode()
    assert allow.lookup(key) is not None
    now[0] += 1
    assert allow.lookup(key) is None
