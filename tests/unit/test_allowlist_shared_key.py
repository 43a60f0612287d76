"""An allow-list folder where several files name the same key: every one of them is refused
(which one an operator meant cannot be told), however many there are and in whatever order
they are read; the other files' keys are unaffected."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.crypto.keys import SecretKey
from ferry.zmqsec import Allowlist, z85_public


def _entry(folder: Path, name: str, key: SecretKey, channels: str) -> None:
    (folder / f"{name}.yaml").write_text(
        f"version: 1\nname: {name}\npublic_key: {key.public.to_string()}\nchannels: {channels}\n"
    )


@pytest.mark.parametrize("copies", [2, 3, 4])
def test_a_key_in_several_allow_list_files_is_refused_in_all_of_them(
    tmp_path: Path, copies: int
) -> None:
    shared, other = SecretKey.generate("x25519"), SecretKey.generate("x25519")
    names = ["fifth", "seventh", "sixth", "zeta"][:copies]
    for n, name in enumerate(names):  # (read in name order: fifth, seventh, sixth, zeta)
        _entry(tmp_path, name, shared, "[messages, documents]" if n else "[messages]")
    _entry(tmp_path, "portal", other, "[messages]")
    allow = Allowlist(tmp_path)
    assert allow.lookup(z85_public(shared.public).decode()) is None
    assert sorted(allow.errors) == sorted(f"{name}.yaml" for name in names)
    assert all("all of them refused" in e for e in allow.errors.values()), allow.errors
    client = allow.lookup(z85_public(other.public).decode())
    assert client is not None
    assert client.name == "portal"
    assert len(allow) == 1
