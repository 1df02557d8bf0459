"""``make demo``: execute every notebook in order on the embedded synthetic dataset, on CPU.

    python -m cacnb.demo --out runs/demo

Each notebook is run by papermill (as JupyterLab would: the kernel's cwd is ``notebooks/``) and saved executed
under ``--out``. Notebook 00 writes the synthetic dataset when it is missing; notebook 03 trains the supervised
baseline and CAC; 04 and 05 evaluate and visualise them. Re-running is cheap: finished runs are not retrained.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .paths import project_root
from .runlog import best_val

DEMO_PARAMETERS = {
    "00_data_setup": {"dataset": "synthetic", "data_dir": "data/synthetic"},
    "01_model": {"config": "synthetic"},
    "02_loss_walkthrough": {"config": "synthetic"},
    "03_training": {"config": "synthetic", "nproc": 1, "out_dir": "{out}", "also_supervised": True},
    "04_evaluation": {"config": "synthetic", "run_dir": "{out}/synthetic_semi",
                      "baseline_dir": "{out}/synthetic_supervised"},
    "05_visualization": {"config": "synthetic", "checkpoint": "{out}/synthetic_semi/best.pt"},
}


def notebook_parameters(notebook: Path, out: str) -> dict:
    """The demo's parameters for ``notebook``, restricted to those its ``parameters`` cell declares."""
    import papermill

    wanted = {k: (v.format(out=out) if isinstance(v, str) else v)
              for k, v in DEMO_PARAMETERS.get(notebook.stem, {}).items()}
    declared = papermill.inspect_notebook(str(notebook))
    return {k: v for k, v in wanted.items() if k in declared}


def run_notebooks(out: str = "runs/demo", only: "list[str] | None" = None) -> list[Path]:
    import papermill

    root = project_root(Path(__file__).resolve().parent) or Path.cwd()
    out_dir = root / out
    out_dir.mkdir(parents=True, exist_ok=True)
    notebooks = sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if only:
        notebooks = [nb for nb in notebooks if any(nb.stem.startswith(o) for o in only)]
    done = []
    for nb in notebooks:
        target = out_dir / nb.name
        params = notebook_parameters(nb, out)
        print(f"[demo] {nb.name} {params}", flush=True)
        tic = time.perf_counter()
        papermill.execute_notebook(str(nb), str(target), parameters=params, kernel_name="python3",
                                   cwd=str(root / "notebooks"), progress_bar=False)
        print(f"[demo] {nb.name} done in {time.perf_counter() - tic:.0f} s -> {target}", flush=True)
        done.append(target)
    return done


def summary(out: str) -> str:
    root = project_root(Path(__file__).resolve().parent) or Path.cwd()
    lines = [f"Executed notebooks: {root / out}"]
    for name in ("synthetic_supervised", "synthetic_semi"):
        run = root / out / name
        try:
            best = best_val(run)
        except FileNotFoundError:
            best = None
        label = "supervised baseline" if name.endswith("supervised") else "CAC (semi)"
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
    print(f"[demo] total {time.perf_counter() - tic:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
