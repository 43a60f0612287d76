"""ferry.provision: `ferry init` folder layout, permissions, refusal to overwrite; keygen."""

from __future__ import annotations

import json
import shutil
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from ferry.config import load_client_config, load_inside_config, load_outside_config
from ferry.crypto.keys import load_public_key, load_secret_key
from ferry.errors import KeyFileError, UsageError
from ferry.provision import (
    KEY_ROLES,
    _ephemeral_range,
    free_tcp_port,
    free_udp_port,
    init_deployment,
    keygen,
)


def _mode(path: str | Path) -> int:
    return stat.S_IMODE(Path(path).stat().st_mode)


def _all_paths(info: dict[str, Any]) -> list[str]:
    found: list[str] = []
    for value in info.values():
        if isinstance(value, dict):
            found += _all_paths(value)
        elif isinstance(value, str) and value.startswith("/"):
            found.append(value)
    return found


def test_init_creates_everything(tmp_path: Path) -> None:
    info = init_deployment(tmp_path / "site", channels=("documents", "photos"))
    json.dumps(info)  # JSON-able, for `ferry init --json`
    root = tmp_path / "site"
    out, ins = root / "outside", root / "inside"
    assert info["root"] == str(root)
    assert info["outside"] == {
        "config": str(out / "outside.yaml"),
        "signing_key": str(out / "keys/outside-signing.key"),
        "signing_public_key": str(out / "keys/outside-signing.pub"),
        "inside_public_key": str(out / "keys/inside-kem.pub"),
        "state_dir": str(out / "state"),
        "audit_dir": str(out / "audit"),
        "audit_key": str(out / "keys/audit.key"),
        "audit_public_key": str(out / "keys/audit.pub"),
        "service": str(out / "ferry-outside.service"),
    }
    assert info["inside"] == {
        "config": str(ins / "inside.yaml"),
        "kem_key": str(ins / "keys/inside-kem.key"),
        "kem_public_key": str(ins / "keys/inside-kem.pub"),
        "outside_public_key": str(ins / "keys/outside-signing.pub"),
        "state_dir": str(ins / "state"),
        "audit_dir": str(ins / "audit"),
        "audit_key": str(ins / "keys/audit.key"),
        "audit_public_key": str(ins / "keys/audit.pub"),
        "audit_mirror_dir": str(ins / "audit-outside-mirror"),
        "outside_audit_public_key": str(ins / "keys/outside-audit.pub"),
        "service": str(ins / "ferry-inside.service"),
    }
    assert info["channels"]["photos"] == {
        "drop": str(out / "drop/photos"),
        "sent": str(out / "sent/photos"),
        "deliver": str(ins / "deliver/photos"),
        "quarantine": str(out / "quarantine/photos"),
    }
    assert set(info["channels"]) == {"documents", "photos", "messages"}
    assert info["channels"]["messages"] == {
        "kind": "messages",
        "deliver": str(ins / "deliver/messages"),
    }
    for side, key in (("api", "api-server"), ("consumers", "consumer-server")):
        assert Path(info[side]["client_config"]).is_file()
        assert _mode(Path(info[side]["client_key"])) == 0o600
        assert Path(info[side]["allowlist_entry"]).parent == Path(info[side]["allowlist"])
        assert _mode(Path(info[side]["server_key"])) == 0o600
        assert Path(info[side]["server_key"]).name == f"{key}.key"
    assert info["link"]["transport"] == "udp"
    assert info["link"]["udp"]["host"] == "127.0.0.1"
    assert 1 <= info["link"]["udp"]["port"] <= 65535
    for path in _all_paths(info):
        assert Path(path).is_absolute()
        assert Path(path).exists(), path


def test_init_permissions(tmp_path: Path) -> None:
    info = init_deployment(tmp_path)
    for side in ("outside", "inside"):
        assert _mode(tmp_path / side / "keys") == 0o700
        assert _mode(info[side]["state_dir"]) == 0o700
    assert _mode(info["outside"]["signing_key"]) == 0o600
    assert _mode(info["inside"]["kem_key"]) == 0o600
    for public in ("signing_public_key", "inside_public_key"):
        assert _mode(info["outside"][public]) & 0o022 == 0  # nobody else may replace it
    assert _mode(info["outside"]["config"]) & 0o022 == 0


def test_init_keys_match_across_sides(tmp_path: Path) -> None:
    info = init_deployment(tmp_path, kem="x25519")
    signing = load_secret_key(Path(info["outside"]["signing_key"]), ("ed25519",))
    kem = load_secret_key(Path(info["inside"]["kem_key"]), ("x25519",))
    assert load_public_key(info["inside"]["outside_public_key"]) == signing.public
    assert load_public_key(info["outside"]["signing_public_key"]) == signing.public
    assert load_public_key(info["outside"]["inside_public_key"]) == kem.public
    assert load_public_key(info["inside"]["kem_public_key"]) == kem.public
    assert "role=outside-signing" in Path(info["outside"]["signing_key"]).read_text()
    assert "role=inside-kem" in Path(info["inside"]["kem_key"]).read_text()


def test_init_configs_load_and_are_commented(tmp_path: Path) -> None:
    info = init_deployment(tmp_path, port=47123, rate_bps=1_500_000_000)
    out = load_outside_config(Path(info["outside"]["config"]))
    ins = load_inside_config(Path(info["inside"]["config"]))
    assert out.udp.port == ins.udp.port == info["link"]["udp"]["port"] == 47123
    assert out.link.rate_bps == 1_500_000_000
    assert out.link.digest() == ins.link.digest()
    assert ins.spool_reserve is None  # (written commented out: see the agent's default)
    assert '  # spool_reserve: "256M"\n' in Path(info["inside"]["config"]).read_text()
    assert out.spool_reserve is None
    assert '  # spool_reserve: "256M"\n' in Path(info["outside"]["config"]).read_text()
    text = Path(info["outside"]["config"]).read_text()
    for key in ("signing_key:", "packet_size:", "rate:", "interleave:", "after_send:"):
        line = next(i for i, ln in enumerate(text.splitlines()) if ln.strip().startswith(key))
        assert text.splitlines()[line - 1].strip().startswith("#"), f"{key} has no comment"


def test_init_serial(tmp_path: Path) -> None:
    info = init_deployment(tmp_path, transport="serial", serial_devices=("/dev/ttyA", "/dev/ttyB"))
    assert info["link"] == {
        "transport": "serial",
        "serial": {"outside_device": "/dev/ttyA", "inside_device": "/dev/ttyB"},
    }
    out = load_outside_config(Path(info["outside"]["config"]))
    ins = load_inside_config(Path(info["inside"]["config"]))
    assert (out.link.transport, out.serial.device, ins.serial.device) == (
        "serial",
        "/dev/ttyA",
        "/dev/ttyB",
    )


def test_init_twice_refuses(tmp_path: Path) -> None:
    init_deployment(tmp_path)
    config = tmp_path / "outside" / "outside.yaml"
    before = config.read_bytes()
    with pytest.raises(UsageError, match="already holds a config"):
        init_deployment(tmp_path)
    assert config.read_bytes() == before


@pytest.mark.parametrize("side", ["outside", "inside"])
def test_init_refuses_any_existing_config(tmp_path: Path, side: str) -> None:
    (tmp_path / side).mkdir()
    (tmp_path / side / "mine.yml").write_text("x: 1\n")
    with pytest.raises(UsageError, match="already holds a config"):
        init_deployment(tmp_path)
    assert not (tmp_path / "outside" / "keys").exists()


def test_init_refuses_existing_key_files(tmp_path: Path) -> None:
    keys = tmp_path / "inside" / "keys"
    keys.mkdir(parents=True)
    (keys / "inside-kem.key").write_text("precious")
    with pytest.raises(UsageError, match="refusing to overwrite"):
        init_deployment(tmp_path)
    assert (keys / "inside-kem.key").read_text() == "precious"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"transport": "tcp"},
        {"kem": "ed25519"},
        {"port": 0},
        {"port": 70000},
        {"rate_bps": 100},
        {"channels": ()},
        {"channels": ("../x",)},
        {"channels": ("Docs",)},
        {"channels": ("a", "a")},
    ],
)
def test_init_bad_arguments(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        init_deployment(tmp_path, **kwargs)
    assert not (tmp_path / "outside").exists()


def test_free_udp_port() -> None:
    assert 1024 <= free_udp_port() <= 65535


# --- keygen ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "file_role", "alg"),
    [
        ("outside-signing", "outside-signing", "ed25519"),
        ("inside-kem", "inside-kem", "mlkem768x25519"),
        ("inside-kem-x25519", "inside-kem", "x25519"),
        ("audit", "audit", "ed25519"),
    ],
)
def test_keygen_roles(tmp_path: Path, role: str, file_role: str, alg: str) -> None:
    info = keygen(role, tmp_path)
    assert set(info) == {"role", "alg", "key_id", "secret_key", "public_key", "public_key_string"}
    assert (info["role"], info["alg"]) == (file_role, alg)
    assert info["secret_key"] == str(tmp_path / f"{role}.key")
    assert info["public_key"] == str(tmp_path / f"{role}.pub")
    assert _mode(info["secret_key"]) == 0o600
    secret = load_secret_key(Path(info["secret_key"]))
    assert secret.alg == alg
    assert secret.public.key_id.hex() == info["key_id"]
    assert secret.public.to_string() == info["public_key_string"]
    assert load_public_key(info["public_key"]) == secret.public
    assert f"role={file_role}" in Path(info["secret_key"]).read_text()


def test_keygen_roles_table_is_complete() -> None:
    assert set(KEY_ROLES) == {
        "outside-signing",
        "inside-kem",
        "inside-kem-x25519",
        "audit",
        "api-server",
        "api-client",
        "consumer-server",
        "consumer",
        "security-admin",
    }


def test_keygen_name_and_new_folder(tmp_path: Path) -> None:
    info = keygen("audit", tmp_path / "new", name="audit-2025")
    assert info["secret_key"] == str(tmp_path / "new" / "audit-2025.key")
    assert _mode(tmp_path / "new") == 0o700


def test_keygen_never_overwrites(tmp_path: Path) -> None:
    first = keygen("audit", tmp_path)
    with pytest.raises(UsageError, match="already exists"):
        keygen("audit", tmp_path)
    assert load_secret_key(Path(first["secret_key"])).public.key_id.hex() == first["key_id"]
    (tmp_path / "other.pub").write_text("x")
    with pytest.raises(UsageError, match="already exists"):
        keygen("audit", tmp_path, name="other")
    assert not (tmp_path / "other.key").exists()


def test_keygen_half_pair_is_cleaned_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_: object) -> None:
        raise KeyFileError("disk full")

    monkeypatch.setattr("ferry.provision.write_public_key", fail)
    with pytest.raises(KeyFileError, match="disk full"):
        keygen("audit", tmp_path)
    assert not (tmp_path / "audit.key").exists()


@pytest.mark.parametrize(("role", "name"), [("root", None), ("audit", "../x"), ("audit", ".key")])
def test_keygen_bad_arguments(tmp_path: Path, role: str, name: str | None) -> None:
    with pytest.raises(UsageError):
        keygen(role, tmp_path, name=name)


def test_ports_chosen_for_a_deployment_are_outside_the_ephemeral_range() -> None:
    """A port from that range (what a bind to port 0 gives) can be taken by any outgoing
    connection before the agent binds it: the agent then fails to start (a CI flake)."""
    low, high = _ephemeral_range()
    ports = [free_tcp_port() for _ in range(20)] + [free_udp_port() for _ in range(20)]
    assert not [p for p in ports if low <= p <= high]
    for port in ports[:3]:  # free indeed
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))


def test_client_configs_travel_with_their_key_files(tmp_path: Path) -> None:
    """A client config names its key files relative to itself: the three files copied to the
    client's host (another folder) load there, once the originals are gone."""
    info = init_deployment(tmp_path / "d", port=47996)
    copies = []
    for side in ("api", "consumers"):
        config = Path(info[side]["client_config"])
        cfg = load_client_config(config)
        host = tmp_path / f"{side}-host"
        host.mkdir()
        for f in (config, cfg.client_key, Path(cfg.server_public_key)):
            shutil.copy2(f, host / f.name)
        copies.append(host / config.name)
    shutil.rmtree(tmp_path / "d" / "clients")
    for copy in copies:
        moved = load_client_config(copy)
        assert moved.client_key.parent == copy.parent
        assert load_secret_key(moved.client_key, ("x25519",)).alg == "x25519"
        assert load_public_key(moved.server_public_key, copy.parent).alg == "x25519"
