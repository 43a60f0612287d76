"""Hypothesis properties of the audit log: any single changed byte is detected; proofs hold.

Runs derandomized (a fixed seed per test) and without the example database, so a run is
reproducible.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ferry.audit import AuditLog, AuditObject, AuditSettings, Subject, verify
from ferry.audit import record as rec
from ferry.audit.merkle import (
    CompactRange,
    MerkleTree,
    leaf_hash,
    root_of,
    verify_consistency,
    verify_inclusion,
)
from ferry.crypto.keys import SecretKey

KEY = SecretKey("ed25519", bytes(range(32)))
EVENTS = ["intake.accepted", "verdict", "transfer.sent", "delivery.rejected", "link.state"]
SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

subjects = st.builds(
    Subject,
    kind=st.sampled_from(["clerk_folder", "user", "api_client", "component", "peer"]),
    id=st.text(min_size=1, max_size=40),
)
objects = st.none() | st.builds(
    AuditObject,
    item=st.none() | st.text(min_size=1, max_size=36),
    channel=st.none() | st.sampled_from(["files/default", "messages/portal"]),
    name=st.none() | st.text(max_size=80),
    size=st.none() | st.integers(0, 2**40),
    sha256=st.none() | st.binary(min_size=32, max_size=32).map(bytes.hex),
    seq=st.none() | st.integers(0, 2**32),
)
details = st.none() | st.dictionaries(
    st.text(min_size=1, max_size=10),
    st.integers(-(2**31), 2**31) | st.text(max_size=3000) | st.booleans(),
    max_size=4,
)
appends = st.lists(
    st.fixed_dictionaries(
        {
            "event": st.sampled_from(EVENTS),
            "subject": subjects,
            "result": st.sampled_from(["success", "failure", "rejected", "info"]),
            "reason": st.none() | st.text(min_size=1, max_size=60),
            "obj": objects,
            "detail": details,
        }
    ),
    min_size=1,
    max_size=40,
)


@SETTINGS
@given(records=appends, every=st.integers(1, 25), data=st.data())
def test_any_single_changed_byte_is_detected(
    records: list[dict[str, Any]], every: int, data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "audit"
        s = AuditSettings(origin="p.test/audit", checkpoint_every=every, max_segment_bytes=65536)
        with AuditLog(path, KEY, s) as log:
            for r in records:
                log.append(**r)
        assert verify(path, KEY.public).verified
        files = [*sorted(path.glob("audit-*.jsonl")), path / "checkpoints.log"]
        for _ in range(6):
            target = data.draw(st.sampled_from(files), label="file")
            original = target.read_bytes()
            at = data.draw(st.integers(0, len(original) - 1), label="offset")
            value = original[at] ^ data.draw(st.integers(1, 255), label="xor")
            target.write_bytes(original[:at] + bytes([value]) + original[at + 1 :])
            report = verify(path, KEY.public)
            assert not report.verified, (target.name, at, value)
            assert report.first is not None
            target.write_bytes(original)


@SETTINGS
@given(size=st.integers(1, 300), data=st.data())
def test_proofs_verify_and_any_tampered_proof_fails(size: int, data: st.DataObject) -> None:
    leaves = [leaf_hash(i.to_bytes(4, "big")) for i in range(size)]
    tree = MerkleTree(leaves)
    compact = CompactRange()
    for leaf in leaves:
        compact.append(leaf)
    root = tree.root()
    assert compact.root() == root

    index = data.draw(st.integers(0, size - 1), label="index")
    proof = tree.inclusion_proof(index)
    assert verify_inclusion(leaves[index], index, size, proof, root)
    old = data.draw(st.integers(1, size), label="old")
    cproof = tree.consistency_proof(old)
    assert verify_consistency(old, size, tree.root(old), root, cproof)
    assert tree.root(old) == root_of(leaves[:old])

    if proof:
        i = data.draw(st.integers(0, len(proof) - 1), label="hash")
        bit = data.draw(st.integers(0, 255), label="bit")
        bad = bytearray(proof[i])
        bad[bit // 8] ^= 1 << (bit % 8)
        tampered = [*proof[:i], bytes(bad), *proof[i + 1 :]]
        assert not verify_inclusion(leaves[index], index, size, tampered, root)
    if cproof:
        i = data.draw(st.integers(0, len(cproof) - 1), label="chash")
        bad = bytearray(cproof[i])
        bad[0] ^= 0x80
        tampered = [*cproof[:i], bytes(bad), *cproof[i + 1 :]]
        assert not verify_consistency(old, size, tree.root(old), root, tampered)
    other = data.draw(st.integers(0, size - 1), label="other")
    if leaves[other] != leaves[index]:
        assert not verify_inclusion(leaves[other], index, size, proof, root)


@SETTINGS
@given(
    r=appends.map(lambda rs: rs[0]),
    idx=st.integers(0, 2**53 - 1),
    us=st.integers(0, 4_102_444_799_999_999),
    prev=st.binary(min_size=32, max_size=32),
)
def test_the_writer_fast_path_encodes_exactly_the_validated_record(
    r: dict[str, Any], idx: int, us: int, prev: bytes
) -> None:
    try:
        full = rec.build(**r)
    except rec.AuditRecordInvalid:  # e.g. a name longer than the schema allows
        return
    line = rec.draft(**r).finish(idx, rec.format_ts(us), prev.hex())
    full.update(idx=idx, ts=rec.format_ts(us), prev=prev.hex())
    rec.validate(full)
    assert line == rec.encode(full)
    assert rec.decode(line) == full
