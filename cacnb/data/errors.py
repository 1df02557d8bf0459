"""The one exception the data code raises for a dataset that is missing or broken.

Its message names the file or folder at fault and says what to do; :func:`with_readme` appends the pointer to
``data_README.md`` (at the repository root), which documents every layout cacnb reads.
"""
from __future__ import annotations

DATA_README = "data_README.md"


class DatasetError(RuntimeError):
    """A dataset folder, list file, image or label is missing or broken."""


def with_readme(message: str) -> str:
    """``message`` followed by where the expected layout is documented."""
    return f"{message.rstrip()}\nSee {DATA_README} (repository root) for the expected layout and where to get the data."
