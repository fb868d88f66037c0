"""Write a benchmark's Markdown between its markers in the README (appending the block if it is absent)."""

from __future__ import annotations

import re
from pathlib import Path

from training.models import atomic_file

README = Path(__file__).resolve().parents[1] / "README.md"


def write_section(name: str, markdown: str, readme: Path = README) -> None:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = readme.read_text()
    block = f"{start}\n{markdown}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    updated = pattern.sub(lambda _: block, text) if pattern.search(text) else text + "\n" + block + "\n"
    with atomic_file(readme) as tmp:
        tmp.write_text(updated)
