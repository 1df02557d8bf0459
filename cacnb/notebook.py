"""What every notebook does before its first figure: trust its parameters, find its run, say what model it shows.

- :func:`check_parameters` stops a papermill run whose ``-p`` names are not in the notebook's parameters cell
  (``-p nprocs 2`` would otherwise train one process); in JupyterLab it does nothing.
- :func:`resolve_interactive` turns ``interactive = None`` into "widgets when a live front-end shows them,
  static figures under papermill".
- :func:`run_dir` derives a run directory from the config exactly as training does (``Config.run_dir``);
  :func:`find_run` falls back to the newest trained run of the config (e.g. the one ``make demo`` wrote).
- :func:`describe_model` says whether a figure's model is trained, barely trained or random, and stamps that on
  the figures (:func:`cacnb.style.set_caveat`).
- :func:`execute` runs a notebook under papermill the way ``make demo`` does, without kernel log noise.
"""
from __future__ import annotations

import ast
import difflib
import os
from pathlib import Path
from typing import Mapping, Optional

from . import style
from .config import Config, load_config
from .runs import find_checkpoint, newest_run

# papermill's Python translator opens the cell it injects with exactly this comment line
PAPERMILL_HEADER = "# Parameters"
BARELY_TRAINED = 0.10   # below this fraction of the planned iterations a model counts as barely trained


class ParameterError(NameError):
    """A papermill parameter the notebook does not declare (a typo would otherwise be silently ignored)."""


# ---------------------------------------------------------------------------------------------------------------
# parameters


def assigned_names(source: str) -> list[str]:
    """Names assigned at the top level of a cell (``a = 1``, ``a: int = 1``, ``a, b = 1, 2``), in order."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    names: list[str] = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AnnAssign) else []
        for target in targets:
            names += [n for n in _target_names(target) if n not in names]
    return names


def _target_names(target) -> list[str]:
    """``a`` -> [a]; ``a, (b, *c)`` -> [a, b, c]; ``x.attr`` / ``x[0]`` assign no name."""
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, ast.Starred):
        return _target_names(target.value)
    if isinstance(target, (ast.Tuple, ast.List)):
        return [n for elt in target.elts for n in _target_names(elt)]
    return []


def unknown_parameters(declared: list[str], injected: list[str]) -> list[str]:
    """Error lines for each injected name the parameters cell does not declare, with the closest valid name."""
    lines = []
    for name in injected:
        if name in declared:
            continue
        close = difflib.get_close_matches(name, declared, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"valid names: {', '.join(declared)}"
        lines.append(f"unknown parameter {name!r}: {hint}")
    return lines


def _injected_and_declared(history: list[str]) -> Optional[tuple[list[str], list[str]]]:
    """From the kernel's input history: the names papermill injected, and those assigned before them.

    papermill runs the notebook from the top and inserts its cell right after the cell tagged ``parameters``, so
    what ran before the injected cell is the parameters cell (and any cell above it). Taking every earlier
    cell, not only the last, keeps a JupyterLab user who re-runs cells of an executed notebook out of order
    from a false alarm. Nothing injected (JupyterLab, a papermill run without ``-p``): None.
    """
    for i in range(len(history) - 1, 0, -1):
        if history[i].splitlines()[:1] == [PAPERMILL_HEADER]:
            declared: list[str] = []
            for source in history[1:i]:
                if source.splitlines()[:1] != [PAPERMILL_HEADER]:
                    declared += [n for n in assigned_names(source) if n not in declared]
            return assigned_names(history[i]), declared
    return None


def check_parameters(shell=None) -> None:
    """Raise :class:`ParameterError` when papermill injected a name the parameters cell does not declare.

    Call it as the first line of the cell after the parameters cell. Outside a kernel or without injected
    parameters it returns silently.
    """
    if shell is None:
        try:
            from IPython import get_ipython
        except ImportError:
            return
        shell = get_ipython()
    history = list(getattr(getattr(shell, "history_manager", None), "input_hist_raw", None) or [])
    found = _injected_and_declared(history)
    if found is None:
        return
    injected, declared = found
    problems = unknown_parameters(declared, injected)
    if problems:
        raise ParameterError("; ".join(problems) + ". Parameters this notebook takes: " + ", ".join(declared))


def papermill_injected(shell=None) -> bool:
    """True when the kernel ran a papermill-injected parameters cell."""
    if shell is None:
        from IPython import get_ipython  # lazy: IPython comes with the notebooks extra

        shell = get_ipython()
    history = list(getattr(getattr(shell, "history_manager", None), "input_hist_raw", None) or [])
    return _injected_and_declared(history) is not None


# ---------------------------------------------------------------------------------------------------------------
# widgets or static figures


def widget_frontend(shell=None, environ: Optional[Mapping[str, str]] = None) -> bool:
    """True when a live front-end that renders ipywidgets runs this kernel: JupyterLab / Notebook (Jupyter Server
    starts its kernels with ``JPY_SESSION_NAME``) or VS Code. False under papermill (an nbclient kernel has
    neither, and a run with ``-p`` shows an injected cell), plain Python, without ipywidgets, or when
    ``CACNB_STATIC_PLOTS=1``."""
    environ = os.environ if environ is None else environ
    if environ.get("CACNB_STATIC_PLOTS", "") not in ("", "0"):
        return False
    try:
        import ipywidgets  # noqa: F401  (only whether it is installed matters here)
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython() if shell is None else shell
    if shell is None or not hasattr(shell, "kernel"):
        return False
    live = bool(environ.get("JPY_SESSION_NAME")) or "__vsc_ipynb_file__" in getattr(shell, "user_ns", {})
    return live and not papermill_injected(shell)


def resolve_interactive(interactive: Optional[bool]) -> bool:
    """``interactive`` as given, or, when None, whether a widget front-end is attached (:func:`widget_frontend`)."""
    return widget_frontend() if interactive is None else bool(interactive)


# ---------------------------------------------------------------------------------------------------------------
# runs and checkpoints


def run_dir(config: "Config | str", mode: str = "semi", out_dir: Optional[str] = None,
            overrides: Optional[Mapping[str, object]] = None) -> Path:
    """The run dir training writes for ``config`` in ``mode`` (``<out_dir>/<config name>_<mode>``), absolute
    (resolved by :func:`cacnb.config.load_config` like every other path), so notebooks 02-05 find what notebook 03
    trained."""
    over = dict(overrides or {})
    over["train.mode"] = mode
    if out_dir is not None:
        over["train.out_dir"] = out_dir
    return load_config(config, over).run_dir


def find_run(config: "Config | str", mode: str = "semi", out_dir: Optional[str] = None,
             overrides: Optional[Mapping[str, object]] = None) -> Path:
    """:func:`run_dir`, or, when that holds no checkpoint, the newest trained run of the same config and mode
    under ``out_dir`` (``runs`` by default; :func:`cacnb.runs.newest_run`), saying which. Falls back to
    :func:`run_dir` when there is none, so the caller's message names the expected place."""
    expected = run_dir(config, mode, out_dir, overrides)
    if find_checkpoint(expected) is not None:
        return expected
    cfg = load_config(config, {"train.out_dir": out_dir} if out_dir is not None else None)
    found = newest_run(cfg.name, mode, cfg.train.out_dir)
    if found is None:
        return expected
    print(f"no checkpoint in {expected}; using the newest trained {cfg.name} run ({mode}): {found}")
    return found


def model_note(loaded: "str | os.PathLike | None", progress: Optional[tuple[int, int]] = None) -> Optional[str]:
    """A one-line warning when the model is random (``loaded`` None) or barely trained, else None."""
    if loaded is None:
        return "untrained model (random weights): figures show the machinery, not what CAC learns"
    if progress is None:
        return None
    done, planned = progress
    if planned and done < BARELY_TRAINED * planned:
        return (f"barely trained model: {done} of {planned} planned iterations "
                f"({100 * done / planned:.0f}%), figures are not representative")
    return None


def describe_model(loaded: "str | os.PathLike | None", progress: Optional[tuple[int, int]],
                   searched: "str | os.PathLike | None" = None) -> Optional[str]:
    """Show what the figures' model is, and stamp every following figure when it is random or barely trained.

    ``loaded``: the checkpoint loaded (None: a random model); ``progress``: its ``(iterations done, planned)``
    (``Run.progress`` of :func:`cacnb.runs.load_run`; None: not a training checkpoint). ``searched``: where a
    checkpoint was looked for. Returns the caveat (None for a trained model)."""
    from IPython.display import Markdown, display  # lazy: IPython comes with the notebooks extra

    note = model_note(loaded, progress)
    style.set_caveat(f"Note: {note}" if note else None)
    if note is None:
        print(f"loaded {loaded}")
        return None
    where = f" (no checkpoint in `{searched}`)" if loaded is None and searched else ""
    todo = ("Run notebook 03 (or `python -m cacnb.demo`) first, or pass `checkpoint`." if loaded is None else
            f"Loaded `{loaded}`; train longer for figures that show what CAC learns.")
    display(Markdown(f"**Note: {note}{where}.** {todo}"))
    return note


# ---------------------------------------------------------------------------------------------------------------
# running notebooks headless

# jupyter_client interrupts a kernel before shutting it down, which ipykernel logs as "ERROR | KeyboardInterrupt
# caught in kernel" after every clean run (and warns about its local TCP transport at start). Those are the
# kernel's own log lines, not the notebook's: a failing cell still raises PapermillExecutionError.
QUIET_KERNEL = ["--IPKernelApp.log_level=CRITICAL"]


def execute(notebook: "str | os.PathLike", target: "str | os.PathLike", parameters: Optional[Mapping] = None,
            cwd: "str | os.PathLike | None" = None, **kwargs):
    """``papermill.execute_notebook`` with the python3 kernel, no progress bar and a quiet kernel log."""
    import papermill  # lazy: only headless runs (demo, sweep, tests) need papermill

    return papermill.execute_notebook(str(notebook), str(target), parameters=dict(parameters or {}),
                                      kernel_name="python3", cwd=None if cwd is None else str(cwd),
                                      progress_bar=False, extra_arguments=QUIET_KERNEL, **kwargs)
