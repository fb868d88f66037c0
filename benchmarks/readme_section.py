"""Write a benchmark's Markdown between its markers in the docs (the benchmarks' ``--write-readme``).

Each generated block sits between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` in exactly one of
:data:`DOCUMENTS`: results in ``docs/results.md``, speed in ``docs/performance.md``, the threads table in
``docs/operations.md``, the fit ceiling and the trainer ablation in ``docs/design.md``. :func:`write_section`
finds the file that holds the block's markers and replaces the block there; a block found nowhere is appended
to ``docs/results.md`` (or to the file named).
"""

from __future__ import annotations

import re
from pathlib import Path

from training.storage import atomic_file

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results.md"
DOCUMENTS = (
    RESULTS,
    REPO / "docs" / "performance.md",
    REPO / "docs" / "operations.md",
    REPO / "docs" / "design.md",
    REPO / "README.md",
)
"""The files searched for a block's markers, in this order."""


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def find_section(name: str, documents: tuple[Path, ...] | None = None) -> Path | None:
    """The one file of ``documents`` (default :data:`DOCUMENTS`) that holds block ``name``'s start marker
    (``None``: none does). A block whose markers are in several files, or whose start has no end after it, is
    an error: which copy to write would be a guess."""
    start, end = markers(name)
    documents = DOCUMENTS if documents is None else documents
    found = [path for path in documents if path.is_file() and start in path.read_text()]
    if len(found) > 1:
        raise ValueError(f"the markers of '{name}' are in several files: {', '.join(map(str, found))}")
    if found and end not in found[0].read_text().split(start, 1)[1]:
        raise ValueError(f"{found[0]}: '{start}' has no '{end}' after it")
    return found[0] if found else None


def write_section(name: str, markdown: str, target: Path | None = None) -> Path:
    """Write ``markdown`` between block ``name``'s markers in ``target`` (default: the file that holds them,
    else ``docs/results.md``, where the block is appended); the file written."""
    target = Path(target) if target is not None else find_section(name) or RESULTS
    start, end = markers(name)
    text = target.read_text() if target.is_file() else ""
    block = f"{start}\n{markdown}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    updated = pattern.sub(lambda _: block, text) if pattern.search(text) else text + "\n" + block + "\n"
    with atomic_file(target) as tmp:
        tmp.write_text(updated)
    return target
