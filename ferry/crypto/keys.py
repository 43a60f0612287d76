"""Key pairs, self-describing public key strings, and key files.

Algorithms (``alg``):

* ``ed25519`` -- signatures (outside signing key, audit checkpoint key).
* ``x25519`` -- HPKE KEM DHKEM(X25519, HKDF-SHA256) (inside key, classic).
* ``mlkem768x25519`` -- HPKE hybrid post-quantum KEM ML-KEM-768 + X25519 (inside key, default).

A public key string is ``ferry-pk:<alg>:<key id hex>:<base64url raw, no padding>``.
The key id is the first 8 bytes of ``SHA-256(b"ferry-key-id\\n" + alg + b"\\n" + raw)``;
it is recomputed and checked when a string is parsed, so a typo cannot
silently name another key.

A secret key file is text::

    # ferry secret key: role=<role> alg=<alg> id=<key id hex>
    ferry-sk:<alg>:<base64url raw secret>

It is created with ``O_CREAT | O_EXCL`` and mode 0600 (never overwritten) and
refused at load when group or others may read it.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem, x25519

from ferry.errors import KeyFileError

Alg = Literal["ed25519", "x25519", "mlkem768x25519"]
ALGS: tuple[Alg, ...] = ("ed25519", "x25519", "mlkem768x25519")
KEM_ALGS: tuple[Alg, ...] = ("x25519", "mlkem768x25519")

KEY_ID_LEN = 8
# Raw public key sizes per algorithm: ML-KEM-768 encapsulation key (1184) + X25519 (32).
_PUBLIC_LEN: dict[str, int] = {"ed25519": 32, "x25519": 32, "mlkem768x25519": 1184 + 32}
# Raw secret sizes: ML-KEM-768 seed (64) + X25519 private scalar (32).
_SECRET_LEN: dict[str, int] = {"ed25519": 32, "x25519": 32, "mlkem768x25519": 64 + 32}
# A public key string is at most this long (the hybrid key is ~1.6 kB of base64).
MAX_PUBLIC_KEY_STRING = 4096
# A secret key file is at most this long (comment line + base64 of 96 bytes).
MAX_SECRET_KEY_FILE = 4096

PUBLIC_PREFIX = "ferry-pk"
SECRET_PREFIX = "ferry-sk"  # noqa: S105  # a format tag, not a password


def _b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    pad = "=" * (-len(text) % 4)
    try:
        return base64.urlsafe_b64decode((text + pad).encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise KeyFileError("key material is not valid base64url") from exc


def key_id(alg: str, raw_public: bytes) -> bytes:
    """The 8-byte key id of a public key."""
    return hashlib.sha256(b"ferry-key-id\n" + alg.encode() + b"\n" + raw_public).digest()[
        :KEY_ID_LEN
    ]


@dataclass(frozen=True)
class PublicKey:
    """A public key of a known algorithm."""

    alg: Alg
    raw: bytes
    key_id: bytes = field(init=False)

    def __post_init__(self) -> None:
        if self.alg not in ALGS:
            raise KeyFileError(f"unknown key algorithm {self.alg!r}; known: {', '.join(ALGS)}")
        if len(self.raw) != _PUBLIC_LEN[self.alg]:
            raise KeyFileError(f"{self.alg} public key must be {_PUBLIC_LEN[self.alg]} bytes")
        object.__setattr__(self, "key_id", key_id(self.alg, self.raw))

    def to_string(self) -> str:
        return f"{PUBLIC_PREFIX}:{self.alg}:{self.key_id.hex()}:{_b64e(self.raw)}"

    @classmethod
    def from_string(cls, text: str) -> PublicKey:
        text = text.strip()
        if len(text) > MAX_PUBLIC_KEY_STRING:
            raise KeyFileError("public key string is too long")
        parts = text.split(":")
        if len(parts) != 4 or parts[0] != PUBLIC_PREFIX:
            raise KeyFileError(
                f"not a ferry public key (expected '{PUBLIC_PREFIX}:<alg>:<key id>:<key>')"
            )
        _, alg, kid, body = parts
        if alg not in ALGS:
            raise KeyFileError(f"unknown key algorithm {alg!r}; known: {', '.join(ALGS)}")
        key = cls(alg, _b64d(body))
        if key.key_id.hex() != kid.lower():
            raise KeyFileError(f"public key id {kid} does not match its key material")
        return key

    # --- crypto objects -------------------------------------------------------------
    def ed25519(self) -> ed25519.Ed25519PublicKey:
        if self.alg != "ed25519":
            raise KeyFileError(f"expected an ed25519 key, got {self.alg}")
        return _ed25519_public(self.raw)

    def hpke_public(self) -> x25519.X25519PublicKey | hpke.MLKEM768X25519PublicKey:
        if self.alg == "x25519":
            return x25519.X25519PublicKey.from_public_bytes(self.raw)
        if self.alg == "mlkem768x25519":
            try:
                return hpke.MLKEM768X25519PublicKey(
                    mlkem.MLKEM768PublicKey.from_public_bytes(self.raw[:1184]),
                    x25519.X25519PublicKey.from_public_bytes(self.raw[1184:]),
                )
            except ValueError as exc:
                raise KeyFileError("invalid ML-KEM-768+X25519 public key") from exc
        raise KeyFileError(f"a {self.alg} key cannot receive HPKE (need one of {KEM_ALGS})")

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True if ``signature`` is a valid Ed25519 signature of ``message``."""
        try:
            self.ed25519().verify(signature, message)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class SecretKey:
    """A secret key; ``public`` is derived from it."""

    alg: Alg
    raw: bytes = field(repr=False)
    public: PublicKey = field(init=False)

    def __post_init__(self) -> None:
        if self.alg not in ALGS:
            raise KeyFileError(f"unknown key algorithm {self.alg!r}")
        if len(self.raw) != _SECRET_LEN[self.alg]:
            raise KeyFileError(f"{self.alg} secret key must be {_SECRET_LEN[self.alg]} bytes")
        object.__setattr__(self, "public", PublicKey(self.alg, _derive_public(self.alg, self.raw)))

    @classmethod
    def generate(cls, alg: Alg) -> SecretKey:
        if alg == "ed25519":
            return cls(alg, ed25519.Ed25519PrivateKey.generate().private_bytes_raw())
        if alg == "x25519":
            return cls(alg, x25519.X25519PrivateKey.generate().private_bytes_raw())
        if alg == "mlkem768x25519":
            seed = os.urandom(64)
            return cls(alg, seed + x25519.X25519PrivateKey.generate().private_bytes_raw())
        raise KeyFileError(f"unknown key algorithm {alg!r}")

    def sign(self, message: bytes) -> bytes:
        if self.alg != "ed25519":
            raise KeyFileError(f"a {self.alg} key cannot sign")
        return _ed25519_private(self.raw).sign(message)

    def hpke_private(self) -> x25519.X25519PrivateKey | hpke.MLKEM768X25519PrivateKey:
        if self.alg == "x25519":
            return x25519.X25519PrivateKey.from_private_bytes(self.raw)
        if self.alg == "mlkem768x25519":
            return hpke.MLKEM768X25519PrivateKey(
                mlkem.MLKEM768PrivateKey.from_seed_bytes(self.raw[:64]),
                x25519.X25519PrivateKey.from_private_bytes(self.raw[64:]),
            )
        raise KeyFileError(f"a {self.alg} key cannot open HPKE")

    def to_file_text(self, role: str) -> str:
        return (
            f"# ferry secret key: role={role} alg={self.alg} id={self.public.key_id.hex()}\n"
            f"# keep this file private (mode 0600); its public key is:\n"
            f"# {self.public.to_string()}\n"
            f"{SECRET_PREFIX}:{self.alg}:{_b64e(self.raw)}\n"
        )


@functools.lru_cache(maxsize=64)
def _ed25519_public(raw: bytes) -> ed25519.Ed25519PublicKey:
    """Parsed keys are cached: parsing costs as much as a signature check."""
    return ed25519.Ed25519PublicKey.from_public_bytes(raw)


@functools.lru_cache(maxsize=16)
def _ed25519_private(raw: bytes) -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.from_private_bytes(raw)


def _derive_public(alg: str, raw: bytes) -> bytes:
    try:
        if alg == "ed25519":
            return ed25519.Ed25519PrivateKey.from_private_bytes(raw).public_key().public_bytes_raw()
        if alg == "x25519":
            return x25519.X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes_raw()
        mk = mlkem.MLKEM768PrivateKey.from_seed_bytes(raw[:64])
        xk = x25519.X25519PrivateKey.from_private_bytes(raw[64:])
        return mk.public_key().public_bytes_raw() + xk.public_key().public_bytes_raw()
    except ValueError as exc:
        raise KeyFileError(f"invalid {alg} secret key") from exc


def write_secret_key(path: Path, key: SecretKey, role: str) -> None:
    """Create ``path`` (mode 0600, O_EXCL: never overwrites) holding ``key``."""
    data = key.to_file_text(role).encode("ascii")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError as exc:
        raise KeyFileError(f"{path}: already exists; refusing to overwrite a key file") from exc
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot create key file: {exc.strerror}") from exc
    try:
        os.fchmod(fd, 0o600)  # the umask cannot widen 0600, but be explicit
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_public_key(path: Path, key: PublicKey) -> None:
    """Create ``path`` holding the public key string (never overwrites)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError as exc:
        raise KeyFileError(f"{path}: already exists; refusing to overwrite") from exc
    try:
        os.write(fd, (key.to_string() + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)


def load_secret_key(path: Path, expected_alg: tuple[Alg, ...] = ALGS) -> SecretKey:
    """Load a secret key file, refusing files readable by group or others."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot open secret key: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{path}: not a regular file")
        data = os.read(fd, MAX_SECRET_KEY_FILE + 1)
    finally:
        os.close(fd)
    lines = [
        ln.strip()
        for ln in data.decode("ascii", "replace").splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    if lines and lines[0].startswith(PUBLIC_PREFIX + ":"):  # (before the mode: a .pub is 0644)
        other = Path(path).with_suffix(".key")
        raise KeyFileError(
            f"{path}: this is a public key; a secret key file (ferry-sk:...) is needed here"
            + (f", such as {other}" if other != Path(path) and other.exists() else "")
        )
    if st.st_mode & 0o077:
        raise KeyFileError(
            f"{path}: secret key is accessible by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
        )
    if len(data) > MAX_SECRET_KEY_FILE:
        raise KeyFileError(f"{path}: too large for a key file")
    try:
        data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise KeyFileError(f"{path}: not a ferry secret key file") from exc
    if len(lines) != 1 or not lines[0].startswith(SECRET_PREFIX + ":"):
        raise KeyFileError(f"{path}: not a ferry secret key file")
    parts = lines[0].split(":")
    if len(parts) != 3:
        raise KeyFileError(f"{path}: malformed secret key line")
    alg = parts[1]
    if alg not in expected_alg:
        raise KeyFileError(f"{path}: key is {alg}, expected one of {', '.join(expected_alg)}")
    return SecretKey(alg, _b64d(parts[2]))


def load_public_key(value: str, base: Path | None = None) -> PublicKey:
    """Parse a public key given inline or as a path to a file holding one."""
    if value.startswith(PUBLIC_PREFIX + ":"):
        return PublicKey.from_string(value)
    path = Path(value)
    if base is not None and not path.is_absolute():
        path = base / path
    try:
        text = path.read_text(encoding="ascii")[:MAX_PUBLIC_KEY_STRING]
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{path}: cannot read public key") from exc
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if len(lines) != 1:
        raise KeyFileError(f"{path}: expected one public key line")
    return PublicKey.from_string(lines[0])
