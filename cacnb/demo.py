"""``make demo``: execute every notebook in order on the embedded synthetic dataset, on CPU.

    python -m cacnb.demo --out runs/demo

Each notebook is run by papermill (as JupyterLab would: the kernel's cwd is ``notebooks/``) and saved executed
under ``--out``. Notebook 00 writes the synthetic dataset when it is missing; notebook 03 trains the supervised
baseline and CAC *before* 02, so the loss walkthrough explains the trained CAC model; 04 and 05 evaluate and
visualise them. Every notebook after 03 gets the same ``out_dir`` and finds its runs through ``Config.run_dir``.
Widgets are off (``interactive=False``): the executed notebooks are static files. Re-running is cheap: finished
runs are not retrained.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .config import load_config
from .notebook import execute
from .paths import project_root
from .runlog import best_val

DEMO_CONFIG = "synthetic"
DEMO_PARAMETERS = {
    "00_data_setup": {"dataset": "synthetic", "data_dir": "data/synthetic"},
    "01_model": {"config": DEMO_CONFIG},
    "03_training": {"config": DEMO_CONFIG, "nproc": 1, "out_dir": "{out}", "also_supervised": True},
    "02_loss_walkthrough": {"config": DEMO_CONFIG, "out_dir": "{out}", "interactive": False},
    "04_evaluation": {"config": DEMO_CONFIG, "out_dir": "{out}"},
    "05_visualization": {"config": DEMO_CONFIG, "out_dir": "{out}", "interactive": False},
}
# the order the demo runs them in: training (03) first, so that 02 explains a trained model
DEMO_ORDER = list(DEMO_PARAMETERS)


def demo_run_dir(out: str, mode: str) -> Path:
    """Where notebook 03 trains the demo config in ``mode`` under ``out`` (``Config.run_dir``)."""
    return Path(load_config(DEMO_CONFIG, {"train.out_dir": out, "train.mode": mode}).run_dir)


def notebook_parameters(notebook: Path, out: str) -> dict:
    """The demo's parameters for ``notebook``, restricted to those its ``parameters`` cell declares."""
    import papermill

    wanted = {k: (v.format(out=out) if isinstance(v, str) else v)
              for k, v in DEMO_PARAMETERS.get(notebook.stem, {}).items()}
    declared = papermill.inspect_notebook(str(notebook))
    return {k: v for k, v in wanted.items() if k in declared}


def run_notebooks(out: str = "runs/demo", only: "list[str] | None" = None) -> list[Path]:
    root = project_root(Path(__file__).resolve().parent) or Path.cwd()
    out_dir = root / out
    out_dir.mkdir(parents=True, exist_ok=True)
    found = {nb.stem: nb for nb in (root / "notebooks").glob("[0-9][0-9]_*.ipynb")}
    notebooks = [found[stem] for stem in DEMO_ORDER if stem in found]
    notebooks += sorted(nb for stem, nb in found.items() if stem not in DEMO_ORDER)
    if only:
        notebooks = [nb for nb in notebooks if any(nb.stem.startswith(o) for o in only)]
    done = []
    for nb in notebooks:
        target = out_dir / nb.name
        params = notebook_parameters(nb, out)
        print(f"[demo] {nb.name} {params}", flush=True)
        tic = time.perf_counter()
        execute(nb, target, params, cwd=root / "notebooks")
        print(f"[demo] {nb.name} done in {time.perf_counter() - tic:.0f} s -> {target}", flush=True)
        done.append(target)
    return done


def summary(out: str) -> str:
    root = project_root(Path(__file__).resolve().parent) or Path.cwd()
    lines = [f"Executed notebooks: {root / out}"]
    for mode, label in (("supervised", "supervised baseline"), ("semi", "CAC (semi)")):
        run = root / demo_run_dir(out, mode)
        try:
            best = best_val(run)
        except FileNotFoundError:
            best = None
        if best is not None:
            lines.append(f"  {label:20s} best val mIoU {100 * best['miou']:.2f}%  ({run})")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cacnb.demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/demo", help="folder for executed notebooks and runs (project-relative)")
    p.add_argument("--only", nargs="*", help="run only notebooks whose name starts with these prefixes")
    args = p.parse_args(argv)
    tic = time.perf_counter()
    run_notebooks(args.out, args.only)
    print(summary(args.out))
    total = round(time.perf_counter() - tic)
    print(f"[demo] total {total} s ({total // 60} min {total % 60} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
