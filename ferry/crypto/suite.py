"""The crypto suite of wire version 1.

* Packets: AES-256-GCM under a 32-byte session key; nonce = 4 zero bytes ||
  packet number (u64, big-endian); the 20-byte cleartext packet header is the
  associated data. A session key never sees the same packet number twice.
* Session keys travel HPKE-sealed (RFC 9180 base mode, single shot) to the
  inside's public key: KEM ML-KEM-768+X25519 (default) or DHKEM(X25519), KDF
  HKDF-SHA256, AEAD AES-256-GCM. The HPKE ``info`` binds the announcement
  header, so a wrapped key cannot be lifted into another announcement.
* Signatures: Ed25519 with a domain-separation label per record type.

Every authentication failure raises :class:`ferry.errors.EnvelopeRejected`
and nothing else.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ferry.crypto.keys import PublicKey, SecretKey
from ferry.errors import EnvelopeRejected, KeyFileError

AEAD_AES256GCM = 1
KEM_X25519 = 1
KEM_MLKEM768X25519 = 2
KEM_IDS = {"x25519": KEM_X25519, "mlkem768x25519": KEM_MLKEM768X25519}
SESSION_KEY_LEN = 32
TAG_LEN = 16
# HPKE blob = enc || ciphertext(32-byte key) || tag: 32+48 (X25519) or 1120+48 (hybrid).
WRAPPED_LEN = {KEM_X25519: 32 + SESSION_KEY_LEN + TAG_LEN, KEM_MLKEM768X25519: 1120 + 48}

_HPKE_KEM = {KEM_X25519: hpke.KEM.X25519, KEM_MLKEM768X25519: hpke.KEM.MLKEM768_X25519}


def _suite(kem_id: int) -> hpke.Suite:
    return hpke.Suite(_HPKE_KEM[kem_id], hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


def wrap_session_key(session_key: bytes, recipient: PublicKey, info: bytes) -> bytes:
    """HPKE-seal ``session_key`` to the inside's public KEM key."""
    kem_id = KEM_IDS.get(recipient.alg)
    if kem_id is None:
        raise KeyFileError(f"{recipient.alg} is not a KEM key")
    return _suite(kem_id).encrypt(session_key, recipient.hpke_public(), info=info)


def unwrap_session_key(blob: bytes, recipient: SecretKey, info: bytes) -> bytes:
    """Open an HPKE-sealed session key; any failure is :class:`EnvelopeRejected`."""
    kem_id = KEM_IDS.get(recipient.alg)
    if kem_id is None or len(blob) != WRAPPED_LEN[kem_id]:
        raise EnvelopeRejected("session key not decryptable")
    try:
        key = _suite(kem_id).decrypt(blob, recipient.hpke_private(), info=info)
    except (InvalidTag, ValueError) as exc:
        raise EnvelopeRejected("session key not decryptable") from exc
    if len(key) != SESSION_KEY_LEN:
        raise EnvelopeRejected("session key not decryptable")
    return key


def nonce_for(packet_number: int) -> bytes:
    """The 12-byte GCM nonce of a packet number."""
    return b"\x00\x00\x00\x00" + packet_number.to_bytes(8, "big")


class PacketAead:
    """AES-256-GCM sealing and opening of packets under one session key."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if len(key) != SESSION_KEY_LEN:
            raise ValueError("session key must be 32 bytes")
        self._aead = AESGCM(key)

    def seal(self, packet_number: int, header: bytes, plaintext: bytes) -> bytes:
        return self._aead.encrypt(nonce_for(packet_number), plaintext, header)

    def open(self, packet_number: int, header: bytes, ciphertext: bytes) -> bytes:
        try:
            return self._aead.decrypt(nonce_for(packet_number), ciphertext, header)
        except InvalidTag:
            raise EnvelopeRejected("packet failed authentication") from None


def sign(key: SecretKey, label: bytes, message: bytes) -> bytes:
    """Ed25519 signature over ``label || 0x00 || message``."""
    return key.sign(label + b"\x00" + message)


def verify(key: PublicKey, label: bytes, message: bytes, signature: bytes) -> None:
    """Raise :class:`EnvelopeRejected` unless ``signature`` is valid."""
    if len(signature) != 64 or not key.verify(signature, label + b"\x00" + message):
        raise EnvelopeRejected("signature verification failed")
