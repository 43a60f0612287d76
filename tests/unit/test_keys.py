"""ferry.crypto.keys: key files, public key strings, signatures, HPKE objects."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hpke

from ferry.crypto.keys import (
    ALGS,
    MAX_PUBLIC_KEY_STRING,
    MAX_SECRET_KEY_FILE,
    Alg,
    PublicKey,
    SecretKey,
    load_public_key,
    load_secret_key,
    write_public_key,
    write_secret_key,
)
from ferry.errors import KeyFileError

HPKE_KEMS: dict[Alg, hpke.KEM] = {
    "x25519": hpke.KEM.X25519,
    "mlkem768x25519": hpke.KEM.MLKEM768_X25519,
}


@pytest.fixture
def open_umask() -> Iterator[None]:
    """A umask of 0: key files must still come out 0600."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- secret key files --------------------------------------------------------------------


@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.usefixtures("open_umask")
def test_secret_key_file_round_trip_and_mode(tmp_path: Path, alg: Alg) -> None:
    key = SecretKey.generate(alg)
    path = tmp_path / "k.key"
    write_secret_key(path, key, "test-role")
    assert _mode(path) == 0o600
    text = path.read_text()
    assert f"role=test-role alg={alg} id={key.public.key_id.hex()}" in text
    loaded = load_secret_key(path)
    assert loaded == key
    assert loaded.public == key.public


def test_secret_key_write_is_exclusive(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    first = SecretKey.generate("ed25519")
    write_secret_key(path, first, "r")
    before = path.read_bytes()
    with pytest.raises(KeyFileError, match="already exists"):
        write_secret_key(path, SecretKey.generate("ed25519"), "r")
    assert path.read_bytes() == before
    assert load_secret_key(path) == first


def test_secret_key_write_does_not_follow_symlinks(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    (tmp_path / "k.key").symlink_to(target)
    with pytest.raises(KeyFileError):
        write_secret_key(tmp_path / "k.key", SecretKey.generate("ed25519"), "r")
    assert not target.exists()


def test_public_key_write_is_exclusive(tmp_path: Path) -> None:
    path = tmp_path / "k.pub"
    key = SecretKey.generate("ed25519").public
    write_public_key(path, key)
    with pytest.raises(KeyFileError, match="already exists"):
        write_public_key(path, SecretKey.generate("ed25519").public)
    assert load_public_key(str(path)) == key


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o606, 0o610])
def test_load_refuses_key_readable_by_others(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "k.key"
    write_secret_key(path, SecretKey.generate("ed25519"), "r")
    path.chmod(mode)
    with pytest.raises(KeyFileError, match="group or others"):
        load_secret_key(path)


def test_load_accepts_owner_only_modes(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    write_secret_key(path, SecretKey.generate("ed25519"), "r")
    path.chmod(0o400)
    assert load_secret_key(path).alg == "ed25519"


@pytest.mark.parametrize("mode", [0o644, 0o600])
def test_load_of_a_public_key_file_names_the_secret_one(tmp_path: Path, mode: int) -> None:
    """A config whose secret key names the .pub beside it: no "chmod 600" advice (that
    would not help), but what the file is and which one to use."""
    key = SecretKey.generate("x25519")
    write_secret_key(tmp_path / "portal.key", key, "api-client")
    pub = tmp_path / "portal.pub"
    write_public_key(pub, key.public)
    pub.chmod(mode)
    with pytest.raises(KeyFileError) as err:
        load_secret_key(pub)
    assert "chmod" not in str(err.value)
    assert "public key" in str(err.value)
    assert str(tmp_path / "portal.key") in str(err.value)


def test_load_refuses_symlinked_key(tmp_path: Path) -> None:
    real = tmp_path / "real.key"
    write_secret_key(real, SecretKey.generate("ed25519"), "r")
    link = tmp_path / "link.key"
    link.symlink_to(real)
    with pytest.raises(KeyFileError, match="cannot open"):
        load_secret_key(link)


def test_load_refuses_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot open"):
        load_secret_key(tmp_path / "nope.key")
    folder = tmp_path / "dir"
    folder.mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_secret_key(folder)


def _good_line(alg: Alg = "ed25519") -> str:
    return SecretKey.generate(alg).to_file_text("r").splitlines()[-1]


MALFORMED: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("comments only", b"# ferry secret key\n# nothing else\n"),
    ("garbage", b"hello world\n"),
    ("public key instead", SecretKey.generate("ed25519").public.to_string().encode()),
    ("two key lines", (_good_line() + "\n" + _good_line() + "\n").encode()),
    ("extra field", (_good_line() + ":extra\n").encode()),
    ("missing field", b"ferry-sk:ed25519\n"),
    ("bad base64", b"ferry-sk:ed25519:!!!not*base64!!!\n"),
    ("truncated", _good_line()[:-10].encode() + b"\n"),
    ("too long body", (_good_line() + "AAAA\n").encode()),
    ("hybrid truncated", _good_line("mlkem768x25519")[:-20].encode() + b"\n"),
    ("unknown alg", b"ferry-sk:rsa:AAAA\n"),
    ("not ascii", "ferry-sk:ed25519:\u00e9\u00e9\n".encode()),
    ("binary", b"\x00\xff\xfe" * 10),
    ("oversized", b"# " + b"x" * MAX_SECRET_KEY_FILE + b"\n" + _good_line().encode()),
]


@pytest.mark.parametrize("data", [m[1] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_load_rejects_malformed_files(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "k.key"
    path.write_bytes(data)
    path.chmod(0o600)
    with pytest.raises(KeyFileError):
        load_secret_key(path)


def test_load_rejects_wrong_algorithm(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    write_secret_key(path, SecretKey.generate("x25519"), "inside-kem")
    with pytest.raises(KeyFileError, match="key is x25519, expected one of ed25519"):
        load_secret_key(path, expected_alg=("ed25519",))
    assert load_secret_key(path, expected_alg=("x25519", "mlkem768x25519")).alg == "x25519"


def test_secret_key_repr_hides_material() -> None:
    key = SecretKey.generate("ed25519")
    assert key.raw.hex() not in repr(key)


# --- public key strings ------------------------------------------------------------------


@pytest.mark.parametrize("alg", ALGS)
def test_public_key_string_round_trip(tmp_path: Path, alg: Alg) -> None:
    public = SecretKey.generate(alg).public
    text = public.to_string()
    assert text.startswith(f"ferry-pk:{alg}:{public.key_id.hex()}:")
    assert len(text) <= MAX_PUBLIC_KEY_STRING
    assert PublicKey.from_string(text) == public
    assert PublicKey.from_string(f"  {text}\n") == public
    assert load_public_key(text) == public
    (tmp_path / "k.pub").write_text(f"# a comment\n{text}\n")
    assert load_public_key("k.pub", base=tmp_path) == public
    assert load_public_key(str(tmp_path / "k.pub")) == public


def _corrupt(text: str, index: int) -> str:
    char = text[index]
    return text[:index] + ("B" if char != "B" else "C") + text[index + 1 :]


@pytest.mark.parametrize("alg", ALGS)
def test_corrupted_key_id_is_rejected(alg: Alg) -> None:
    text = SecretKey.generate(alg).public.to_string()
    start = len(f"ferry-pk:{alg}:")
    kid = text[start : start + 16]
    wrong = format(int(kid, 16) ^ 1, "016x")
    with pytest.raises(KeyFileError, match="does not match"):
        PublicKey.from_string(text.replace(kid, wrong))


@pytest.mark.parametrize("alg", ALGS)
def test_corrupted_body_is_rejected(alg: Alg) -> None:
    text = SecretKey.generate(alg).public.to_string()
    body_start = text.rindex(":") + 1
    # A middle character: the last one of unpadded base64 may carry only ignored bits.
    with pytest.raises(KeyFileError):
        PublicKey.from_string(_corrupt(text, body_start + 5))


BAD_PUBLIC: list[tuple[str, str]] = [
    ("empty", ""),
    ("wrong prefix", "ferry-sk:ed25519:0011223344556677:AAAA"),
    ("too few parts", "ferry-pk:ed25519:AAAA"),
    ("unknown alg", "ferry-pk:rsa:0011223344556677:AAAA"),
    ("short body", "ferry-pk:ed25519:0011223344556677:AAAA"),
    ("bad base64", "ferry-pk:ed25519:0011223344556677:***"),
    ("too long", "ferry-pk:ed25519:0011223344556677:" + "A" * MAX_PUBLIC_KEY_STRING),
]


@pytest.mark.parametrize("text", [b[1] for b in BAD_PUBLIC], ids=[b[0] for b in BAD_PUBLIC])
def test_bad_public_key_strings(text: str) -> None:
    with pytest.raises(KeyFileError):
        PublicKey.from_string(text)


def test_load_public_key_file_problems(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot read"):
        load_public_key("missing.pub", base=tmp_path)
    two = tmp_path / "two.pub"
    key = SecretKey.generate("ed25519").public.to_string()
    two.write_text(f"{key}\n{key}\n")
    with pytest.raises(KeyFileError, match="one public key line"):
        load_public_key(str(two))


# --- crypto objects ----------------------------------------------------------------------


def test_sign_verify_round_trip() -> None:
    key = SecretKey.generate("ed25519")
    signature = key.sign(b"message")
    assert key.public.verify(signature, b"message")
    assert not key.public.verify(signature, b"massage")
    assert not SecretKey.generate("ed25519").public.verify(signature, b"message")
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    assert not key.public.verify(flipped, b"message")


@pytest.mark.parametrize("alg", ["x25519", "mlkem768x25519"])
def test_kem_keys_cannot_sign(alg: Alg) -> None:
    key = SecretKey.generate(alg)
    with pytest.raises(KeyFileError):
        key.sign(b"m")
    with pytest.raises(KeyFileError):
        key.public.ed25519()


def test_signing_keys_cannot_do_hpke() -> None:
    key = SecretKey.generate("ed25519")
    with pytest.raises(KeyFileError):
        key.hpke_private()
    with pytest.raises(KeyFileError):
        key.public.hpke_public()


@pytest.mark.parametrize("alg", ["x25519", "mlkem768x25519"])
def test_hpke_objects_build_and_interoperate(tmp_path: Path, alg: Alg) -> None:
    path = tmp_path / "kem.key"
    write_secret_key(path, SecretKey.generate(alg), "inside-kem")
    key = load_secret_key(path)
    public = PublicKey.from_string(key.public.to_string())
    suite = hpke.Suite(HPKE_KEMS[alg], hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)
    sealed = suite.encrypt(b"payload", public.hpke_public(), info=b"ferry-test")
    assert suite.decrypt(sealed, key.hpke_private(), info=b"ferry-test") == b"payload"


def test_generated_keys_differ() -> None:
    for alg in ALGS:
        assert SecretKey.generate(alg).raw != SecretKey.generate(alg).raw
