#!/usr/bin/env python
"""Copy generated tables into the docs between their markers.

    python scripts/sync_docs.py

* ``<!-- fault-table:begin/end -->``: ``docs/fault_table.md``, written by
  ``scripts/fault_table.py`` from the JSON the fault tests write.
* ``<!-- convergence:begin/end -->``: ``benchmarks/results/convergence/convergence.md``,
  written by ``benchmarks/convergence.py``.

Each block may appear in any of ``TARGETS`` (README.md and docs/results.md); a missing
source leaves its block as it is.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = {
    "fault-table": ROOT / "docs" / "fault_table.md",
    "convergence": ROOT / "benchmarks" / "results" / "convergence" / "convergence.md",
}


TARGETS = (ROOT / "README.md", ROOT / "docs" / "results.md")


def sync(targets: tuple[Path, ...] = TARGETS) -> list[str]:
    """Replace every block whose source exists in every target; returns the names replaced."""
    done = []
    for target in targets:
        done += [f"{target.name}:{name}" for name in _sync_one(target)]
    return done


def _sync_one(readme: Path) -> list[str]:
    text = readme.read_text()
    done = []
    for name, source in BLOCKS.items():
        if not source.exists():
            continue
        pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
        body = source.read_text().strip() + "\n"
        text, n = pattern.subn(lambda m, body=body: m.group(1) + body + m.group(2), text)
        if n:
            done.append(name)
    readme.write_text(text)
    return done


if __name__ == "__main__":
    print("synced:", ", ".join(sync()) or "nothing")
