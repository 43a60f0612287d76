"""Write the visible corpus: ``python -m tests.corpus.make_corpus OUTDIR [--seed N]``.

Every ``tests/corpus/gen_*.py`` module present contributes ``cases(seed)``. Files are written
under neutral stored names (``0001.bin``: some case names cannot exist on disk, e.g. names over
255 bytes); ``expected.json`` maps each stored file to the name a clerk would drop it under,
the expected outcome and the attack or control class.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import pkgutil
from pathlib import Path

import tests.corpus
from tests.corpus.case import Case


def generator_modules() -> list[str]:
    return sorted(
        f"tests.corpus.{m.name}"
        for m in pkgutil.iter_modules(tests.corpus.__path__)
        if m.name.startswith("gen_")
    )


def all_cases(seed: int) -> list[Case]:
    out: list[Case] = []
    for module in generator_modules():
        out.extend(importlib.import_module(module).cases(seed))
    return out


def write(outdir: Path, seed: int) -> list[dict[str, object]]:
    outdir.mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, object]] = []
    for i, case in enumerate(all_cases(seed), 1):
        stored = f"{i:04d}.bin"
        (outdir / stored).write_bytes(case.data)
        entries.append(
            {
                "file": stored,
                "name": case.name,
                "expect": case.expect,
                "class": case.klass,
                "policy": dict(case.policy) if case.policy is not None else None,
                "sha256": hashlib.sha256(case.data).hexdigest(),
            }
        )
    doc = {"seed": seed, "generators": generator_modules(), "cases": entries}
    (outdir / "expected.json").write_text(json.dumps(doc, ensure_ascii=False, indent=2) + "\n")
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    entries = write(args.outdir, args.seed)
    hostile = sum(1 for e in entries if e["expect"] != "deliver")
    print(f"wrote {len(entries)} cases ({hostile} hostile) to {args.outdir}")


if __name__ == "__main__":
    main()
