"""ferry.config: YAML with line numbers, schema validation, conversion, cross-checks."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator

from ferry import config
from ferry.config import MAX_CONFIG_BYTES, load_config, load_inside_config, load_outside_config
from ferry.config_types import InsideConfig, OutsideConfig, PreviousServerKey
from ferry.crypto.keys import SecretKey
from ferry.errors import ConfigError
from ferry.provision import init_deployment

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = ("outside-config.schema.json", "inside-config.schema.json")

# Line numbers in the cases below refer to these texts; keep them in step.
OUTSIDE = """\
version: 1
role: outside
state_dir: state
keys:
  signing_key: keys/s.key
  inside_public_key: keys/i.pub
link:
  transport: udp
  packet_size: 1472
  rate: 800M
  fec:
    codec: isal
    source: 64
    repair: 16
  udp:
    host: 127.0.0.1
    port: 47000
channels:
  - name: documents
    drop: drop/documents
    max_size: 4G
  - name: photos
    drop: drop/photos
outside:
  poll_interval: 0.5
"""

INSIDE = """\
version: 1
role: inside
state_dir: state
keys:
  kem_key: keys/k.key
  outside_public_key: keys/o.pub
link:
  udp: {host: 0.0.0.0, port: 47000, rcvbuf: 8M}
channels:
  - name: documents
    deliver: deliver/documents
inside:
  degraded_after: 3
  down_after: 10
  max_object_size: 1T
"""


def _write(tmp_path: Path, text: str | bytes, name: str = "outside.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    return path


def _error(load: Callable[[Path], object], path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load(path)
    return str(info.value)


# --- schemas -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEMAS)
def test_schema_copies_are_identical(name: str) -> None:
    packaged = REPO / "ferry" / "schemas" / name
    assert packaged.read_bytes() == (REPO / "schemas" / name).read_bytes(), (
        f"schemas/{name} differs from ferry/schemas/{name} (the canonical copy): copy it over"
    )


@pytest.mark.parametrize("name", SCHEMAS)
def test_schema_is_valid_draft_2020_12(name: str) -> None:
    schema = config.load_schema(name)  # through importlib.resources, as when installed
    Draft202012Validator.check_schema(schema)
    assert schema == json.loads((REPO / "schemas" / name).read_text())


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_object_in_schema_refuses_unknown_keys(name: str) -> None:
    def walk(node: object) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object":
                assert node.get("additionalProperties") is False, node
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config.load_schema(name))


# --- good configs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("transport", "kem"), [("udp", "mlkem768x25519"), ("udp", "x25519"), ("serial", "x25519")]
)
def test_generated_configs_load(tmp_path: Path, transport: str, kem: str) -> None:
    info = init_deployment(
        tmp_path,
        transport=transport,
        kem=kem,
        port=47001,
        serial_devices=("/dev/pts/7", "/dev/pts/8"),
        channels=("documents", "photos"),
    )
    out = load_config(Path(info["outside"]["config"]))
    ins = load_config(Path(info["inside"]["config"]))
    assert isinstance(out, OutsideConfig)
    assert isinstance(ins, InsideConfig)
    assert out.link == ins.link
    assert out.link.digest() == ins.link.digest()
    assert out.link.transport == transport
    assert out.link.kem == kem
    assert out.signing_key == Path(info["outside"]["signing_key"])
    assert out.inside_public_key == info["outside"]["inside_public_key"]
    assert out.state_dir == Path(info["outside"]["state_dir"])
    assert ins.kem_key == Path(info["inside"]["kem_key"])
    assert ins.outside_public_key == info["inside"]["outside_public_key"]
    assert [c.name for c in out.channels] == ["documents", "photos", "messages"]
    assert [c.kind for c in out.channels] == ["files", "files", "messages"]
    for channel in out.channels[:2]:
        assert str(channel.drop) == info["channels"][channel.name]["drop"]
        assert str(channel.sent) == info["channels"][channel.name]["sent"]
        assert str(channel.quarantine) == info["channels"][channel.name]["quarantine"]
    for ichannel in ins.channels:
        assert str(ichannel.deliver) == info["channels"][ichannel.name]["deliver"]
    assert out.api is not None
    assert out.api.endpoint == info["api"]["endpoint"]
    assert str(out.api.clients) == info["api"]["allowlist"]
    assert ins.consumers.endpoint == info["consumers"]["endpoint"]
    assert (
        out.channels[2].schemas
        == ins.channels[2].schemas
        == (
            "citizen-application",
            "agency-notice",
        )
    )
    if transport == "udp":
        assert out.udp.port == ins.udp.port == 47001
    else:
        assert (out.serial.device, ins.serial.device) == ("/dev/pts/7", "/dev/pts/8")
    assert load_outside_config(out.source) == out
    assert load_inside_config(ins.source) == ins


def test_values_paths_and_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, OUTSIDE)
    monkeypatch.chdir("/")  # relative paths follow the config file, not the working folder
    cfg = load_outside_config(path)
    assert cfg.source == path
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.signing_key == tmp_path / "keys/s.key"
    assert cfg.inside_public_key == str(tmp_path / "keys/i.pub")
    assert cfg.link.rate_bps == 800_000_000
    assert cfg.link.fec.interleave == 32  # default from config_types
    assert cfg.link.heartbeat_interval == 1.0
    docs, photos = cfg.channels
    assert docs.max_size == 4 * 2**30
    assert photos.max_size == 4 * 2**30  # default
    # sent defaults to <drop>/../sent/<name>
    assert docs.sent == tmp_path / "drop/sent/documents"
    assert docs.after_send == "move"


def test_numbers_are_normalised(tmp_path: Path) -> None:
    text = OUTSIDE.replace("    max_size: 4G\n", "    max_size: 4G\n    settle_seconds: 2\n")
    text = text.replace("  packet_size: 1472\n", "  packet_size: 1472\n  heartbeat_interval: 1\n")
    cfg = load_outside_config(_write(tmp_path, text))
    assert type(cfg.channels[0].settle_seconds) is float
    assert type(cfg.link.heartbeat_interval) is float  # the link digest hashes its JSON form
    assert type(cfg.poll_interval) is float
    assert cfg.link.digest() == load_outside_config(_write(tmp_path, OUTSIDE)).link.digest()


def test_inside_values(tmp_path: Path) -> None:
    cfg = load_inside_config(_write(tmp_path, INSIDE, "inside.yaml"))
    assert cfg.udp.host == "0.0.0.0"
    assert cfg.udp.rcvbuf == 8 * 2**20
    assert cfg.max_object_size == 2**40
    assert cfg.spool_reserve is None  # (the agent's default: see test_spool_reserve)
    assert isinstance(cfg.degraded_after, float)
    assert cfg.down_after == 10.0
    assert cfg.retention_days == 30.0
    assert cfg.link.transport == "udp"
    assert cfg.channels[0].deliver == tmp_path / "deliver/documents"


@pytest.mark.parametrize(
    ("rate", "bps"), [("1200", 1200), ("1.5G", 1_500_000_000), ("100k", 100_000), ("9600", 9600)]
)
def test_rate_suffixes(tmp_path: Path, rate: str, bps: int) -> None:
    text = OUTSIDE.replace("rate: 800M", f"rate: {rate}")
    assert load_outside_config(_write(tmp_path, text)).link.rate_bps == bps


@pytest.mark.parametrize(
    ("size", "value"), [("1", 1), ("1.5k", 1536), ("2M", 2 * 2**20), ("1T", 2**40), ("'10'", 10)]
)
def test_size_suffixes(tmp_path: Path, size: str, value: int) -> None:
    text = OUTSIDE.replace("max_size: 4G", f"max_size: {size}")
    assert load_outside_config(_write(tmp_path, text)).channels[0].max_size == value


def test_inline_public_key(tmp_path: Path) -> None:
    pub = SecretKey.generate("mlkem768x25519").public.to_string()
    text = OUTSIDE.replace("inside_public_key: keys/i.pub", f"inside_public_key: {pub}")
    assert load_outside_config(_write(tmp_path, text)).inside_public_key == pub


def test_load_config_dispatches_on_role(tmp_path: Path) -> None:
    assert isinstance(load_config(_write(tmp_path, OUTSIDE)), OutsideConfig)
    assert isinstance(load_config(_write(tmp_path, INSIDE, "inside.yaml")), InsideConfig)


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    assert load_outside_config(_write(tmp_path, b"\xef\xbb\xbf" + OUTSIDE.encode()))


# --- bad configs: (id, edit of the text, line, what the message must name) ---------------

Edit = Callable[[str], str | bytes]


def _sub(old: str, new: str) -> Edit:
    def edit(text: str) -> str:
        assert old in text, old
        return text.replace(old, new, 1)

    return edit


OUTSIDE_BAD: list[tuple[str, Edit, int, tuple[str, ...]]] = [
    (
        "unknown top-level key",
        lambda t: t + "bogus: 1\n",
        26,
        ("unknown key 'bogus' at top level", "valid: version, role, state_dir, keys, link"),
    ),
    (
        "unknown nested key",
        _sub("    repair: 16\n", "    repair: 16\n    bogus: 2\n"),
        15,
        ("unknown key 'bogus' in link.fec", "valid: codec, source, repair, interleave"),
    ),
    (
        "unknown key in a channel",
        _sub("    drop: drop/photos\n", "    drop: drop/photos\n    deliver: x\n"),
        24,
        ("unknown key 'deliver' in channels[1]", "valid: name, kind, drop, sent"),
    ),
    (
        "wrong type",
        _sub("packet_size: 1472", 'packet_size: "big"'),
        9,
        ("link.packet_size", "expected an integer", "'big'"),
    ),
    (
        "float for int",
        _sub("packet_size: 1472", "packet_size: 1472.0"),
        9,
        ("link.packet_size", "expected an integer", "1472.0"),
    ),
    ("bool for int", _sub("port: 47000", "port: yes"), 17, ("link.udp.port", "got true")),
    (
        "out of range",
        _sub("source: 64", "source: 200"),
        13,
        ("link.fec.source", "from 1 to 128", "200"),
    ),
    ("enum", _sub("codec: isal", "codec: lz4"), 12, ("link.fec.codec", "'isal', 'zfec'")),
    ("version", _sub("version: 1", "version: 2"), 1, ("version", "expected 1")),
    ("wrong role", _sub("role: outside", "role: inside"), 2, ("role", "expected 'outside'")),
    (
        "missing required key",
        _sub("  signing_key: keys/s.key\n", ""),
        4,
        ("missing required key 'signing_key' in keys",),
    ),
    (
        "missing channel drop",
        _sub("    drop: drop/photos\n", ""),
        22,
        ("missing required key 'drop' in channels[1]",),
    ),
    ("null value", _sub("state_dir: state", "state_dir:"), 3, ("state_dir", "expected a string")),
    (
        "duplicate key",
        _sub("  transport: udp\n", "  transport: udp\n  transport: serial\n"),
        9,
        ("duplicate key 'transport' in link", "first at line 8"),
    ),
    ("YAML syntax error", _sub("rate: 800M", "rate: 800M: x"), 10, ("YAML error",)),
    ("anchor", _sub("state_dir: state", "state_dir: &s state"), 3, ("anchors and aliases",)),
    ("alias", _sub("state_dir: state", "state_dir: *s"), 3, ("anchors and aliases",)),
    ("merge key", _sub("  transport: udp\n", "  <<: {transport: udp}\n"), 8, ("merge keys",)),
    ("python tag", _sub("host: 127.0.0.1", "host: !!python/name:os.system x"), 16, ("tag",)),
    ("non-string key", lambda t: t + "7: x\n", 26, ("key '7' at top level is not a string",)),
    ("non-mapping top level", lambda t: "- a\n- b\n", 1, ("top level must be a mapping",)),
    ("scalar top level", lambda t: "just words\n", 1, ("top level must be a mapping",)),
    ("empty file", lambda t: "", 1, ("empty",)),
    ("two documents", lambda t: t + "---\nversion: 1\n", 26, ("single document",)),
    ("too deep", lambda t: t + "x: " + "[" * 40 + "]" * 40 + "\n", 26, ("nesting deeper",)),
    (
        "oversize file",
        lambda t: t + "#" * MAX_CONFIG_BYTES + "\n",
        1,
        (f"larger than {MAX_CONFIG_BYTES} bytes",),
    ),
    (
        "non-UTF-8 bytes",
        lambda t: t.encode().replace(b"127.0.0.1", b"127.0.0.\xff"),
        16,
        ("not UTF-8", "0xff"),
    ),
    ("control character", _sub("host: 127.0.0.1", "host: 127\x00"), 16, ("#x0000",)),
    ("huge integer", _sub("port: 47000", "port: " + "9" * 5000), 17, ("link.udp.port",)),
    ("nan", _sub("poll_interval: 0.5", "poll_interval: .nan"), 25, ("outside.poll_interval",)),
    (
        "duplicate channel names",
        _sub("name: photos", "name: documents"),
        22,
        ("channels[1].name", "duplicate channel name 'documents'", "line 19"),
    ),
    (
        "bad channel name",
        _sub("name: photos", 'name: "../x"'),
        22,
        ("channels[1].name", "'../x'", "channel name"),
    ),
    (
        "upper-case channel name",
        _sub("name: photos", "name: Photos"),
        22,
        ("channels[1].name",),
    ),
    (
        "bad size suffix",
        _sub("max_size: 4G", "max_size: 4X"),
        21,
        ("channels[0].max_size", "size in bytes", "'4X'"),
    ),
    ("zero size", _sub("max_size: 4G", "max_size: 0"), 21, ("channels[0].max_size",)),
    (
        "zero rescan",
        _sub("    max_size: 4G\n", "    max_size: 4G\n    rescan_seconds: 0\n"),
        22,
        ("channels[0].rescan_seconds", "from 0.1 to 86400, got 0"),
    ),
    (
        "rescan not a number",
        _sub("    max_size: 4G\n", "    max_size: 4G\n    rescan_seconds: often\n"),
        22,
        ("channels[0].rescan_seconds", "'often'"),
    ),
    (
        "fractional size",
        _sub("max_size: 4G", "max_size: 0.3k"),
        21,
        ("channels[0].max_size", "not a whole number"),
    ),
    ("rate too low", _sub("rate: 800M", "rate: 1k"), 10, ("link.rate", "1200")),
    ("rate integer too low", _sub("rate: 800M", "rate: 100"), 10, ("link.rate", "1200")),
    ("rate with T", _sub("rate: 800M", "rate: 1T"), 10, ("link.rate", "rate in bits")),
    (
        "zfec symbol budget",
        lambda t: t.replace("isal", "zfec").replace("64", "128").replace("16", "128"),
        14,
        ("link.fec", "<= 255"),
    ),
    ("empty channel list", lambda t: t.split("channels:")[0] + "channels: []\n", 18, ("at least",)),
    (
        "overlapping drop folders",
        _sub("drop: drop/photos", "drop: drop/documents/photos"),
        23,
        ("channels[1].drop", "overlaps"),
    ),
    (
        "sent inside a drop folder",
        _sub("    max_size: 4G\n", "    max_size: 4G\n    sent: drop/photos/done\n"),
        22,
        ("channels[0].sent", "overlaps drop folder"),
    ),
    (
        "state_dir inside a drop folder",
        _sub("state_dir: state", "state_dir: drop/photos/state"),
        3,
        ("state_dir", "overlaps"),
    ),
    (
        "malformed inline public key",
        _sub("inside_public_key: keys/i.pub", "inside_public_key: ferry-pk:x25519:00:abc"),
        6,
        ("keys.inside_public_key",),
    ),
]


@pytest.mark.parametrize(
    ("edit", "line", "needles"), [c[1:] for c in OUTSIDE_BAD], ids=[c[0] for c in OUTSIDE_BAD]
)
def test_bad_outside_config(
    tmp_path: Path, edit: Edit, line: int, needles: tuple[str, ...]
) -> None:
    path = _write(tmp_path, edit(OUTSIDE))
    message = _error(load_outside_config, path)
    assert message.startswith(f"{path}:{line}: "), message
    for needle in needles:
        assert needle in message, (needle, message)
    assert _error(load_config, path).startswith(f"{path}:"), "load_config must agree"


def test_inline_key_of_the_wrong_algorithm(tmp_path: Path) -> None:
    signing = SecretKey.generate("ed25519").public.to_string()
    kem = SecretKey.generate("x25519").public.to_string()  # link.kem is mlkem768x25519
    for pub in (signing, kem):
        text = OUTSIDE.replace("inside_public_key: keys/i.pub", f"inside_public_key: {pub}")
        path = _write(tmp_path, text)
        message = _error(load_outside_config, path)
        assert message.startswith(f"{path}:6: keys.inside_public_key: "), message
        assert "expected mlkem768x25519" in message


def test_several_errors_are_reported_in_line_order(tmp_path: Path) -> None:
    text = OUTSIDE.replace("source: 64", "source: 0").replace("state_dir: state", "state_dir: 5")
    path = _write(tmp_path, text)
    first, second = _error(load_outside_config, path).splitlines()
    assert first.startswith(f"{path}:3: state_dir")
    assert second.startswith(f"{path}:13: link.fec.source")


INSIDE_BAD: list[tuple[str, Edit, int, tuple[str, ...]]] = [
    (
        "down_after not after degraded_after",
        _sub("down_after: 10", "down_after: 2"),
        14,
        ("inside.down_after", "greater than", "inside.degraded_after"),
    ),
    (
        "degraded_after past the default down_after",
        lambda t: t.replace("  down_after: 10\n", "").replace(
            "degraded_after: 3", "degraded_after: 30"
        ),
        13,
        ("inside.down_after (10.0)",),
    ),
    (
        "outside-only key in a channel",
        _sub("    deliver: deliver/documents\n", "    deliver: d\n    drop: x\n"),
        12,
        ("unknown key 'drop' in channels[0]", "valid: name, kind, deliver"),
    ),
    (
        "outside section in the inside config",
        lambda t: t + "outside:\n  poll_interval: 1\n",
        16,
        ("unknown key 'outside' at top level", "inside"),
    ),
    (
        "a retention shorter than the longest repeat schedule",
        _sub("down_after: 10", "down_after: 10\n  retention_days: 7"),
        15,
        ("inside.retention_days", "8"),
    ),
    (
        "spool_reserve not a size",
        _sub("max_object_size: 1T", "max_object_size: 1T\n  spool_reserve: lots"),
        16,
        ("inside.spool_reserve", "'lots'"),
    ),
    ("flow mapping value", _sub("port: 47000", "port: -1"), 8, ("link.udp.port", "from 1")),
    ("rcvbuf too small", _sub("rcvbuf: 8M", "rcvbuf: 1k"), 8, ("link.udp.rcvbuf", "4096")),
    ("missing deliver", _sub("    deliver: deliver/documents\n", ""), 10, ("'deliver'",)),
    (
        "nested deliver folders",
        lambda t: t.replace("inside:\n", "  - name: b\n    deliver: deliver\ninside:\n"),
        13,
        ("channels[1].deliver", "overlaps"),
    ),
    (
        "signing key of the wrong algorithm",
        lambda t: t.replace("keys/o.pub", SecretKey.generate("x25519").public.to_string()),
        6,
        ("keys.outside_public_key", "expected ed25519"),
    ),
]


@pytest.mark.parametrize(
    ("edit", "line", "needles"), [c[1:] for c in INSIDE_BAD], ids=[c[0] for c in INSIDE_BAD]
)
def test_bad_inside_config(tmp_path: Path, edit: Edit, line: int, needles: tuple[str, ...]) -> None:
    path = _write(tmp_path, edit(INSIDE), "inside.yaml")
    message = _error(load_inside_config, path)
    assert message.startswith(f"{path}:{line}: "), message
    for needle in needles:
        assert needle in message, (needle, message)


def test_load_config_needs_a_known_role(tmp_path: Path) -> None:
    path = _write(tmp_path, OUTSIDE.replace("role: outside\n", ""))
    assert _error(load_config, path).startswith(f"{path}:1: missing required key 'role'")
    path = _write(tmp_path, OUTSIDE.replace("role: outside", "role: middle"))
    assert _error(load_config, path).startswith(f"{path}:2: role: expected 'outside' or 'inside'")


def test_outside_loader_refuses_inside_config(tmp_path: Path) -> None:
    path = _write(tmp_path, INSIDE, "inside.yaml")
    message = _error(load_outside_config, path)
    assert f"{path}:2: role: expected 'outside', got 'inside'" in message


def test_rescan_seconds_is_per_files_channel(tmp_path: Path) -> None:
    text = OUTSIDE.replace("    max_size: 4G\n", "    max_size: 4G\n    rescan_seconds: 3\n")
    docs, photos = load_outside_config(_write(tmp_path, text)).channels
    assert docs.rescan_seconds == 3.0
    assert type(docs.rescan_seconds) is float
    assert photos.rescan_seconds is None  # the watcher's default (30 s, 2 s on a share)
    info = init_deployment(tmp_path / "d", transport="udp", kem="x25519", port=47003)
    path = Path(info["outside"]["config"])
    data = yaml.safe_load(path.read_text())
    (ch,) = [c for c in data["channels"] if c.get("kind") == "messages"]
    ch["rescan_seconds"] = 2
    path.write_text(yaml.safe_dump(data))
    message = _error(load_outside_config, path)
    assert "rescan_seconds: a messages channel has no folders" in message


def test_unreadable_paths(tmp_path: Path) -> None:
    assert "cannot read config" in _error(load_config, tmp_path / "missing.yaml")
    assert "is a folder" in _error(load_config, tmp_path)


@pytest.mark.parametrize("where", ["channel", "api"])
def test_a_message_limit_above_16_mib_is_refused(tmp_path: Path, where: str) -> None:
    """A message is held in memory and crosses as one bundle: the inside reads back at most
    MAX_MESSAGE_SIZE plus its manifest, so a config may not accept more."""
    info = init_deployment(tmp_path, transport="udp", kem="x25519", port=47002)
    path = Path(info["outside"]["config"])
    data = yaml.safe_load(path.read_text())
    ok = load_outside_config(path)
    assert ok.api is not None  # the generated deployment has an API and a messages channel
    if where == "api":
        data["api"]["max_message_size"] = "17M"
    else:
        (ch,) = [c for c in data["channels"] if c.get("kind") == "messages"]
        ch["max_message_size"] = "17M"
    path.write_text(yaml.safe_dump(data))
    message = _error(load_outside_config, path)
    assert "max_message_size: at most 16 MiB" in message
    key = "api" if where == "api" else "messages"
    data_ok = yaml.safe_load(path.read_text())
    if key == "api":
        data_ok["api"]["max_message_size"] = "16M"
    else:
        for c in data_ok["channels"]:
            if c.get("kind") == "messages":
                c["max_message_size"] = "16M"
    path.write_text(yaml.safe_dump(data_ok))
    assert load_outside_config(path).source == path  # the limit itself is allowed


@pytest.mark.parametrize(
    ("side", "section", "key", "value", "needle"),
    [
        ("outside", "api", "max_connections", 0, "api.max_connections"),
        ("outside", "api", "max_connections_per_address", "many", "'many'"),
        ("outside", "api", "max_connections", 2.5, "expected an integer"),
        ("inside", "consumers", "max_connections", -1, "consumers.max_connections"),
        ("inside", "consumers", "max_connections_per_address", 10**7, "1000000"),
    ],
)
def test_connection_limits(
    tmp_path: Path, side: str, section: str, key: str, value: object, needle: str
) -> None:
    """Each server socket holds at most max_connections, max_connections_per_address of them
    from one address (default 1000 and 100); anything but a positive integer is refused."""
    info = init_deployment(tmp_path, transport="udp", kem="x25519", port=47004)
    path = Path(info[side]["config"])
    load = load_outside_config if side == "outside" else load_inside_config
    params = getattr(load(path), section)
    assert (params.max_connections, params.max_connections_per_address) == (1000, 100)
    data = yaml.safe_load(path.read_text())
    data[section]["max_connections"] = 7
    data[section]["max_connections_per_address"] = 3
    path.write_text(yaml.safe_dump(data))
    params = getattr(load(path), section)
    assert (params.max_connections, params.max_connections_per_address) == (7, 3)
    data[section][key] = value
    path.write_text(yaml.safe_dump(data))
    message = _error(load, path)
    assert needle in message, message


# --- CURVE server keys during a rotation -------------------------------------------------

API = """\
api:
  endpoint: tcp://127.0.0.1:47100
  server_key: keys/api-new.key
  clients: api-clients
  previous_server_keys:
    - key: keys/api-old.key
      endpoint: tcp://127.0.0.1:47101
"""  # lines 26-32 after OUTSIDE

CONSUMERS = """\
consumers:
  endpoint: tcp://127.0.0.1:47200
  server_key: keys/c-new.key
  clients: consumer-clients
  previous_server_keys:
    - key: keys/c-old.key
      endpoint: tcp://127.0.0.1:47201
"""  # lines 16-22 after INSIDE


def test_previous_server_keys(tmp_path: Path) -> None:
    api = load_outside_config(_write(tmp_path, OUTSIDE + API)).api
    assert api is not None
    assert api.previous_server_keys == (
        PreviousServerKey(tmp_path / "keys/api-old.key", "tcp://127.0.0.1:47101"),
    )
    text = INSIDE + CONSUMERS.replace(
        "  previous_server_keys:\n", "  publish: tcp://127.0.0.1:47300\n  previous_server_keys:\n"
    )
    text += "    - key: keys/c-older.key\n      publish: tcp://127.0.0.1:47301\n"
    consumers = load_inside_config(_write(tmp_path, text, "inside.yaml")).consumers
    assert consumers.previous_server_keys == (
        PreviousServerKey(tmp_path / "keys/c-old.key", "tcp://127.0.0.1:47201"),
        PreviousServerKey(tmp_path / "keys/c-older.key", None, "tcp://127.0.0.1:47301"),
    )
    assert load_outside_config(_write(tmp_path, OUTSIDE)).api is None


ENTRY = "    - key: keys/api-old.key\n      endpoint: tcp://127.0.0.1:47101\n"
SERVER_KEYS_BAD: list[tuple[str, str, Edit, int, tuple[str, ...]]] = [
    (
        "the current key again",
        "outside",
        _sub("- key: keys/api-old.key", "- key: keys/./api-new.key"),
        31,
        ("api.previous_server_keys[0].key", "same file as the current server_key"),
    ),
    (
        "the current endpoint",
        "outside",
        _sub("endpoint: tcp://127.0.0.1:47101", "endpoint: tcp://127.0.0.1:47100"),
        32,
        ("api.previous_server_keys[0].endpoint", "already in use", "gets a new one"),
    ),
    (
        "one endpoint for two earlier keys",
        "outside",
        lambda t: t + ENTRY.replace("api-old", "api-older"),
        34,
        ("api.previous_server_keys[1].endpoint", "already in use"),
    ),
    (
        "one key file twice",
        "outside",
        lambda t: t + ENTRY.replace("47101", "47102"),
        33,
        ("api.previous_server_keys[1].key", "same file as an earlier entry"),
    ),
    (
        "more than three",
        "outside",
        lambda t: t + "".join(ENTRY.replace("old", f"old{i}") for i in range(3)),
        30,
        ("api.previous_server_keys",),
    ),
    (
        "no endpoint",
        "outside",
        _sub("      endpoint: tcp://127.0.0.1:47101\n", ""),
        31,
        ("'endpoint'",),
    ),
    (
        "a publish endpoint where the consumers publish nothing",
        "inside",
        lambda t: t + "      publish: tcp://127.0.0.1:47202\n",
        23,
        ("consumers.previous_server_keys[0].publish", "consumers has no publish of its own"),
    ),
    (
        "neither endpoint nor publish",
        "inside",
        _sub("      endpoint: tcp://127.0.0.1:47201\n", ""),
        21,
        ("consumers.previous_server_keys[0]: needs 'endpoint' or 'publish'",),
    ),
]


# --- audit keys during a rotation --------------------------------------------------------

AUDIT_OUT = """\
audit:
  dir: audit
  key: keys/audit-2.key
  previous_keys: [keys/audit.key]
"""  # lines 26-29 after OUTSIDE

AUDIT_IN = """\
audit:
  dir: audit
  key: keys/audit-2.key
  previous_keys: [keys/audit.key]
  mirror_dir: mirror
  peer_public_key: keys/outside-audit-2.pub
  previous_peer_public_keys: [keys/outside-audit.pub]
"""  # lines 16-22 after INSIDE


def test_previous_audit_keys(tmp_path: Path) -> None:
    out = load_outside_config(_write(tmp_path, OUTSIDE + AUDIT_OUT)).audit
    assert out is not None
    assert out.previous_keys == (tmp_path / "keys/audit.key",)
    ins = load_inside_config(_write(tmp_path, INSIDE + AUDIT_IN, "inside.yaml")).audit
    assert ins is not None
    assert ins.previous_keys == (tmp_path / "keys/audit.key",)
    assert ins.previous_peer_public_keys == (str(tmp_path / "keys/outside-audit.pub"),)
    plain = INSIDE + AUDIT_IN.replace("  previous_peer_public_keys: [keys/outside-audit.pub]\n", "")
    ins = load_inside_config(_write(tmp_path, plain, "inside.yaml")).audit
    assert ins is not None
    assert ins.previous_peer_public_keys == ()


AUDIT_KEYS_BAD: list[tuple[str, str, Edit, int, tuple[str, ...]]] = [
    (
        "the current key again",
        "outside",
        _sub("[keys/audit.key]", "[keys/./audit-2.key]"),
        29,
        ("audit.previous_keys[0]", "same file as audit.key"),
    ),
    (
        "one key file twice",
        "outside",
        _sub("[keys/audit.key]", "[keys/audit.key, keys/../keys/audit.key]"),
        29,
        ("audit.previous_keys[1]", "same file as an earlier entry"),
    ),
    (
        "more than three",
        "outside",
        _sub("[keys/audit.key]", "[keys/a.key, keys/b.key, keys/c.key, keys/d.key]"),
        29,
        ("audit.previous_keys",),
    ),
    (
        "not a list",
        "outside",
        _sub("[keys/audit.key]", "keys/audit.key"),
        29,
        ("audit.previous_keys",),
    ),
    (
        "the current peer key again",
        "inside",
        _sub("[keys/outside-audit.pub]", "[keys/outside-audit-2.pub]"),
        22,
        ("audit.previous_peer_public_keys[0]", "same key as an earlier one"),
    ),
    (
        "an earlier peer key that is not ed25519",
        "inside",
        _sub("[keys/outside-audit.pub]", "['ferry-pk:x25519:" + "A" * 43 + "=']"),
        22,
        ("audit.previous_peer_public_keys[0]",),
    ),
    (
        "earlier peer keys without a current one",
        "inside",
        _sub("  mirror_dir: mirror\n  peer_public_key: keys/outside-audit-2.pub\n", ""),
        20,
        ("audit.previous_peer_public_keys: needs audit.peer_public_key",),
    ),
    (
        "an earlier peer key on the outside",
        "outside",
        lambda t: t + "  previous_peer_public_keys: [keys/outside-audit.pub]\n",
        30,
        ("previous_peer_public_keys",),
    ),
]


# the earlier keys of a rotation: (name, side, edit, line, needles) on each section's text
ROTATION_BAD = [("server", *c) for c in SERVER_KEYS_BAD] + [("audit", *c) for c in AUDIT_KEYS_BAD]
ROTATION_TEXTS = {
    "server": {"outside": OUTSIDE + API, "inside": INSIDE + CONSUMERS},
    "audit": {"outside": OUTSIDE + AUDIT_OUT, "inside": INSIDE + AUDIT_IN},
}


@pytest.mark.parametrize(
    ("keys", "side", "edit", "line", "needles"),
    [(c[0], *c[2:]) for c in ROTATION_BAD],
    ids=[f"{c[0]}: {c[1]}" for c in ROTATION_BAD],
)
def test_bad_previous_keys(
    tmp_path: Path, keys: str, side: str, edit: Edit, line: int, needles: tuple[str, ...]
) -> None:
    text = edit(ROTATION_TEXTS[keys][side])
    if side == "outside":
        path, load = _write(tmp_path, text), load_outside_config
    else:
        path, load = _write(tmp_path, text, "inside.yaml"), load_inside_config
    message = _error(load, path)
    assert message.startswith(f"{path}:{line}: "), message
    for needle in needles:
        assert needle in message, (needle, message)


def test_spool_reserve_is_a_size_on_either_side(tmp_path: Path) -> None:
    out = load_outside_config(_write(tmp_path, OUTSIDE + "  spool_reserve: 1G\n"))
    assert out.spool_reserve == 2**30
    assert type(out.poll_interval) is float  # (the other keys as before)
    ins = load_inside_config(_write(tmp_path, INSIDE + "  spool_reserve: 64M\n", "inside.yaml"))
    assert ins.spool_reserve == 64 * 2**20
    bad = _write(tmp_path, OUTSIDE + "  spool_reserve: 0\n")
    assert "outside.spool_reserve" in _error(load_outside_config, bad)
