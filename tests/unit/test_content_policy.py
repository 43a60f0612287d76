"""Content policy from configuration, the config schema and `ferry init`."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.config import load_outside_config
from ferry.content.base import Limits
from ferry.content.policy import SUPPORTED_TYPES, policy_from_config, policy_to_json
from ferry.errors import ConfigError
from ferry.provision import init_deployment


def test_round_trip() -> None:
    policy = policy_from_config(
        {
            "types": ["pdf", "jpg", "csv"],
            "features": {"macros": "disallow", "metadata": "allow"},
            "limits": {"max_bytes": "20M", "seconds": 5, "archive_depth": 1},
            "schemas": ["citizen-application"],
        }
    )
    assert policy.allowed_types == {"pdf", "jpeg", "csv"}
    assert policy.feature("macros") == "disallow"
    assert policy.feature("javascript") == "sanitize"
    assert policy.limits.max_bytes == 20 * 1024 * 1024
    assert policy.limits.seconds == 5.0
    assert policy.limits.json_depth == Limits().json_depth
    assert policy_from_config(policy_to_json(policy)) == policy


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ({}, "types"),
        ({"types": ["exe"]}, "not a type"),
        ({"types": ["pdf"], "features": {"telepathy": "allow"}}, "unknown feature"),
        ({"types": ["pdf"], "features": {"macros": "maybe"}}, "allow, sanitize or disallow"),
        ({"types": ["pdf"], "limits": {"pages": 3}}, "unknown limit"),
        ({"types": ["pdf"], "limits": {"archive_depth": 99}}, "expected 0..8"),
        ({"types": ["pdf"], "limits": {"max_bytes": "lots"}}, "size"),
        ({"types": ["pdf"], "colour": "blue"}, "unknown key"),
    ],
)
def test_refused(raw: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        policy_from_config(raw)


def test_init_documents_channel_accepts_every_type(tmp_path: Path) -> None:
    out = init_deployment(tmp_path / "d", port=47999)
    docs = out["channels"]["documents"]
    assert docs["quarantine"].endswith("quarantine/documents")
    assert Path(docs["quarantine"]).is_dir()
    assert Path(out["security_admin"]["secret_key"]).stat().st_mode & 0o077 == 0
    cfg = load_outside_config(Path(out["outside"]["config"]))
    channel = next(c for c in cfg.channels if c.name == "documents")
    assert channel.content is not None
    assert channel.content.allowed_types == frozenset(SUPPORTED_TYPES)


def test_config_content_errors_name_the_line(tmp_path: Path) -> None:
    out = init_deployment(tmp_path / "d", port=47998)
    config = Path(out["outside"]["config"])
    text = config.read_text().replace("types: [pdf,", "types: [exe, pdf,", 1)
    config.write_text(text)
    with pytest.raises(ConfigError, match=r"outside.yaml:\d+: .*types"):
        load_outside_config(config)
