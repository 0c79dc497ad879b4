"""Print (or write between markers) the communicator capability table generated from the registry.

    python -m hpcsgd.comm                       # print the Markdown table
    python -m hpcsgd.comm --write FILE [FILE]   # replace the block between
                                                # <!-- comm-table:begin --> and <!-- comm-table:end -->
    python -m hpcsgd.comm --check FILE [FILE]   # exit 1 if a block differs from the registry
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from hpcsgd.comm import capability_table

BEGIN, END = "<!-- comm-table:begin -->", "<!-- comm-table:end -->"


def replace_block(text: str, table: str) -> str:
    """``text`` with the table block replaced; ValueError if the markers are missing."""
    pattern = re.compile(rf"({re.escape(BEGIN)}\n).*?({re.escape(END)})", re.S)
    new, n = pattern.subn(lambda m: m.group(1) + table + m.group(2), text)
    if not n:
        raise ValueError(f"no {BEGIN} ... {END} block")
    return new


def main(argv: list[str]) -> int:
    table = capability_table()
    if not argv:
        sys.stdout.write(table)
        return 0
    mode, files = argv[0], argv[1:]
    if mode not in ("--write", "--check") or not files:
        print(__doc__, file=sys.stderr)
        return 2
    stale = []
    for f in files:
        path = Path(f)
        text = path.read_text()
        new = replace_block(text, table)
        if new != text:
            stale.append(f)
            if mode == "--write":
                path.write_text(new)
    if mode == "--check" and stale:
        print(f"communicator table out of date in {', '.join(stale)}: run python -m hpcsgd.comm --write",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
