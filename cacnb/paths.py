"""Path resolution that behaves the same from the repo root, from ``notebooks/`` (JupyterLab's kernel cwd) and
under papermill: relative paths such as ``data/synthetic`` or ``runs/demo`` mean the project root's."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Optional


def project_root(start: Optional[Path] = None) -> Optional[Path]:
    """The nearest folder at or above ``start`` (default: cwd) holding cacnb's pyproject.toml, else None."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file() and (folder / "cacnb").is_dir():
            return folder
    return None


def resolve(path: "str | os.PathLike", must_exist: bool = False) -> Path:
    """Absolute paths stay; a relative path is taken from cwd if it exists there, else from the project root."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_absolute():
        return p
    if p.exists():
        return p.resolve()
    root = project_root()
    candidate = (root / p) if root is not None else p.resolve()
    if must_exist and not candidate.exists():
        raise FileNotFoundError(f"{path}: not found relative to {Path.cwd()} nor to the project root {root}")
    return candidate


def atomic_write(path: "str | os.PathLike", write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    A crash or an exception never leaves a torn file under ``path``: the previous version stays until the new
    one is complete, and the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
