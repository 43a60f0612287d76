"""Sequence numbers of file items: an API upload and a clerk's file on the same channel, taken
at the same moment by two threads, never get the same number, and no number is skipped."""

from __future__ import annotations

import threading
from pathlib import Path

from ferry.config_types import OutsideChannel
from ferry.crypto.keys import SecretKey
from outside.intake import spool_file_item
from outside.spool import Spool

ROUNDS = 60


def test_two_threads_spooling_on_one_channel_number_every_item_once(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "state")
    key = SecretKey.generate("ed25519")
    channel = OutsideChannel("documents", drop=tmp_path / "drop", sent=None)
    work = tmp_path / "work"
    work.mkdir()
    failures: list[BaseException] = []
    start = threading.Barrier(2)

    def take(who: str) -> None:
        start.wait()
        for i in range(ROUNDS):
            owned = work / f"{who}-{i}"
            owned.write_bytes(who.encode() * (1 + i * 4099))  # hashing takes a while
            try:
                spool_file_item(spool, key, channel, owned, name=f"{who}-{i}.pdf", subject=who)
            except Exception as exc:  # noqa: BLE001  # collected, asserted below
                failures.append(exc)

    threads = [threading.Thread(target=take, args=(w,)) for w in ("api", "folder")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    seqs = sorted(item.seq for item in spool.due(2**62, limit=10 * ROUNDS))
    assert seqs == list(range(1, 2 * ROUNDS + 1))
    spool.close()
