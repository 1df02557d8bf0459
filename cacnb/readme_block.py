"""The README paste: a results table written by a tool lands between a README's marker lines, never typed.

The study's block sits between ``<!-- cacnb-results:begin -->`` and ``<!-- cacnb-results:end -->``; a named block
(``make demo``'s is ``demo``) between ``<!-- cacnb-results:NAME:begin -->`` and ``<!-- cacnb-results:NAME:end -->``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .paths import atomic_write_text

README_BEGIN = "<!-- cacnb-results:begin -->"
README_END = "<!-- cacnb-results:end -->"


def readme_markers(block: Optional[str] = None) -> tuple[str, str]:
    """The marker lines of a README block: the study's (``block=None``) or a named one, e.g. ``demo``."""
    if block is None:
        return README_BEGIN, README_END
    return f"<!-- cacnb-results:{block}:begin -->", f"<!-- cacnb-results:{block}:end -->"


def paste_into_readme(results_md: "str | Path", readme: "str | Path", block: Optional[str] = None) -> Path:
    """Replace what lies between the README's result markers (:func:`readme_markers` of ``block``) by
    ``results.md`` (its title dropped, its ``##`` headings made ``####`` to sit under the README's own section),
    atomically. A README without both markers is an error naming them."""
    readme = Path(readme)
    text = readme.read_text()
    first, last = readme_markers(block)
    begin, end = text.find(first), text.find(last)
    if begin < 0 or end < begin:
        raise ValueError(f"{readme} has no '{first}' ... '{last}' block; add both marker lines where "
                         f"the results table belongs")
    body = Path(results_md).read_text().splitlines()
    body = [("##" + line if line.startswith("## ") else line) for line in body if not line.startswith("# ")]
    block = first + "\n" + "\n".join(body).strip("\n") + "\n"
    atomic_write_text(readme, text[:begin] + block + text[end:])
    return readme
