"""Start-up known-answer tests. An agent refuses to run when any fails (exit code 5).

Each check compares against published vectors (NIST/McGrew-Viega GCM, RFC 8032,
FIPS 180-2, the CRC32C check value) or, for the erasure codecs, against the
frozen output of the codec on a fixed block plus recovery after erasures.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

import crc32c
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ferry.crypto import suite
from ferry.crypto.keys import PublicKey, SecretKey
from ferry.errors import EnvelopeRejected, SelfTestError
from ferry.wire.fec import CODEC_ISAL, CODEC_ZFEC, get_codec

# McGrew & Viega, "The Galois/Counter Mode of Operation", test case 14 (AES-256).
GCM_CT_TAG = "cea7403d4d606b6e074ec5d3baf39d18d0d1c8a799996bf0265b98b5d48ab919"
# RFC 8032 section 7.1, TEST 1.
ED_SECRET = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"  # noqa: S105  # published RFC 8032 test key
ED_PUBLIC = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
ED_SIG = (
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065"
    "224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)
SHA256_ABC = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
CRC32C_CHECK = 0xE3069283  # CRC-32C of b"123456789"
# SHA-256 over the payloads of the 4 + 2 symbols of FEC_BLOCK (k=4, r=2, 64-byte symbols).
FEC_VECTORS = {
    CODEC_ZFEC: "c9bdfe27b084e2f8275081e6ca2e98202803986c716d797c198b9b8a1f805a33",
    CODEC_ISAL: "fa7943dcd42d3ddca697b4119e322731c1902466badf2fce03104164f6395dcb",
}
FEC_BLOCK = bytes((i * 7 + 3) & 255 for i in range(4 * 64))


def _check(name: str, ok: bool) -> None:
    if not ok:
        raise SelfTestError(f"self-test failed: {name}")


def _aead() -> None:
    out = AESGCM(bytes(32)).encrypt(bytes(12), bytes(16), None)
    _check("AES-256-GCM known answer", out.hex() == GCM_CT_TAG)
    aead = suite.PacketAead(bytes(range(32)))
    ct = aead.seal(7, b"hdr", b"payload")
    _check("packet AEAD round trip", aead.open(7, b"hdr", ct) == b"payload")
    try:
        aead.open(8, b"hdr", ct)
    except EnvelopeRejected:
        pass
    else:
        _check("packet AEAD rejects a wrong nonce", False)


def _signatures() -> None:
    key = SecretKey("ed25519", bytes.fromhex(ED_SECRET))
    _check("Ed25519 public key derivation", key.public.raw.hex() == ED_PUBLIC)
    _check("Ed25519 known answer", key.sign(b"").hex() == ED_SIG)
    _check(
        "Ed25519 verify", PublicKey("ed25519", key.public.raw).verify(bytes.fromhex(ED_SIG), b"")
    )
    _check("Ed25519 rejects a bad signature", not key.public.verify(bytes(64), b""))


def _hashes() -> None:
    _check("SHA-256 known answer", hashlib.sha256(b"abc").hexdigest() == SHA256_ABC)
    _check("CRC32C known answer", crc32c.crc32c(b"123456789") == CRC32C_CHECK)


def _hpke() -> None:
    for alg in ("x25519", "mlkem768x25519"):
        key = SecretKey.generate(alg)
        session_key = os.urandom(32)
        blob = suite.wrap_session_key(session_key, key.public, b"selftest")
        _check(
            f"HPKE {alg} round trip",
            suite.unwrap_session_key(blob, key, b"selftest") == session_key,
        )
        try:
            suite.unwrap_session_key(blob, key, b"other")
        except EnvelopeRejected:
            continue
        _check(f"HPKE {alg} binds info", False)


def _fec() -> None:
    for codec_id, expected in FEC_VECTORS.items():
        codec = get_codec(codec_id)
        symbols = codec.encode(FEC_BLOCK, 4, 2, 64)
        digest = hashlib.sha256(b"".join(s[codec.overhead :] for s in symbols)).hexdigest()
        _check(f"FEC codec {codec_id} known answer", digest == expected)
        survivors = {i: symbols[i] for i in (1, 3, 4, 5)}
        _check(f"FEC codec {codec_id} recovery", codec.decode(survivors, 4, 2, 64) == FEC_BLOCK)


CHECKS: tuple[Callable[[], None], ...] = (_hashes, _aead, _signatures, _hpke, _fec)


def run() -> None:
    """Run every known-answer test; raise SelfTestError on the first failure."""
    for check in CHECKS:
        try:
            check()
        except SelfTestError:
            raise
        except Exception as exc:  # a crashing primitive is a failed self-test
            raise SelfTestError(f"self-test failed: {check.__name__[1:]}: {exc}") from exc
