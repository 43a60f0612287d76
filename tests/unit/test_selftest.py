"""The start-up known-answer tests pass, and fail closed when any answer is wrong."""

from __future__ import annotations

import json

import pytest

from ferry import cli, selftest
from ferry.errors import SelfTestError
from ferry.wire import fec


def test_selftest_passes() -> None:
    selftest.run()


def test_every_check_runs() -> None:
    names = [check.__name__ for check in selftest.CHECKS]
    assert names == ["_hashes", "_aead", "_signatures", "_hpke", "_fec"]


@pytest.mark.parametrize(
    ("constant", "value", "message"),
    [
        ("SHA256_ABC", "00" * 32, "SHA-256 known answer"),
        ("CRC32C_CHECK", 0, "CRC32C known answer"),
        ("GCM_CT_TAG", "00" * 32, "AES-256-GCM known answer"),
        ("ED_PUBLIC", "00" * 32, "Ed25519 public key derivation"),
        ("ED_SIG", "00" * 64, "Ed25519 known answer"),
    ],
)
def test_a_wrong_expected_answer_fails_closed(
    monkeypatch: pytest.MonkeyPatch, constant: str, value: object, message: str
) -> None:
    monkeypatch.setattr(selftest, constant, value)
    with pytest.raises(SelfTestError, match=message):
        selftest.run()


@pytest.mark.parametrize("codec_id", [fec.CODEC_ZFEC, fec.CODEC_ISAL])
def test_a_wrong_fec_vector_fails_closed(monkeypatch: pytest.MonkeyPatch, codec_id: int) -> None:
    vectors = dict(selftest.FEC_VECTORS)
    vectors[codec_id] = "ff" * 32
    monkeypatch.setattr(selftest, "FEC_VECTORS", vectors)
    with pytest.raises(SelfTestError, match=f"FEC codec {codec_id} known answer"):
        selftest.run()


def test_a_codec_that_cannot_recover_fails_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    class Forgetful(fec.ZfecCodec):
        def decode(self, symbols: dict[int, bytes], k: int, r: int, symbol_size: int) -> bytes:
            return bytes(k * symbol_size)

    monkeypatch.setattr(selftest, "get_codec", lambda codec_id: Forgetful())
    monkeypatch.setattr(selftest, "FEC_VECTORS", {fec.CODEC_ZFEC: selftest.FEC_VECTORS[1]})
    with pytest.raises(SelfTestError, match="recovery"):
        selftest.run()


def test_a_crashing_primitive_is_a_failed_selftest(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(codec_id: int) -> fec.Codec:
        raise RuntimeError("library missing")

    monkeypatch.setattr(selftest, "get_codec", broken)
    with pytest.raises(SelfTestError, match="fec: library missing") as caught:
        selftest.run()
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert caught.value.exit_code == 5


def test_an_aead_that_accepts_a_wrong_nonce_fails_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Lenient(selftest.suite.PacketAead):
        def open(self, packet_number: int, header: bytes, ciphertext: bytes) -> bytes:
            return super().open(7, header, ciphertext)

    monkeypatch.setattr(selftest.suite, "PacketAead", Lenient)
    with pytest.raises(SelfTestError, match="rejects a wrong nonce"):
        selftest.run()


@pytest.mark.parametrize("side", ["outside", "inside"])
def test_agent_refuses_to_run_when_a_known_answer_fails(
    side: str, tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["init", str(tmp_path / "d"), "--json"]) == 0
    dep = json.loads(capsys.readouterr().out)
    monkeypatch.setattr(selftest, "SHA256_ABC", "00" * 32)
    rc = cli.main([side, "run", "-c", dep[side]["config"]])
    assert rc == 5
    assert "self-test failed: SHA-256 known answer" in capsys.readouterr().err
    # it refused before touching its state: no database was created
    assert not (tmp_path / "d" / side / "state" / f"{side}.db").exists()
