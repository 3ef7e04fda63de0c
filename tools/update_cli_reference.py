"""Rewrites the README's CLI reference (between the cli-reference markers) from the parsers.

  python tools/update_cli_reference.py   # from the repository root, after changing any option

tests/test_cli.py fails when the README's section differs from `minift.cli.reference_markdown()`.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BEGIN = "<!-- cli-reference:begin -->\n"
END = "<!-- cli-reference:end -->"


def main() -> int:
    from minift.cli import reference_markdown

    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        sys.stderr.write(f"{readme}: no {BEGIN.strip()} ... {END} section to rewrite\n")
        return 1
    new = text[: start + len(BEGIN)] + reference_markdown() + text[end:]
    if new != text:
        readme.write_text(new, encoding="utf-8")
        print(f"{readme}: CLI reference rewritten")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
