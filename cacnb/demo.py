"""``make demo``: execute every notebook in order on the context benchmark (``synthetic_context``), on CPU.

    python -m cacnb.demo --out runs/demo

Each notebook is run by papermill (as JupyterLab would: the kernel's cwd is ``notebooks/``) and saved executed
under ``--out``:

1. A short pretraining builds the demo's backbone when it is missing (:mod:`cacnb.pretrain`, recipe ``short``);
   00 writes the benchmark's synthetic set when it is missing and checks it; 01 shows the model with it.
2. Training is a one-seed sweep (:mod:`cacnb.sweep`, as ``make sweep`` but 1 seed and a short schedule): notebook
   03 is executed once for the supervised baseline and once for CAC, side by side, each kept in its run dir
   ``<out>/sweep/<mode>_s0/03_training.ipynb``, and both checkpoints are evaluated on the test split.
3. 02 explains the trained CAC model's loss; 04 evaluates it on test against the baseline; 05 visualises it; 06
   reads the one-seed sweep back.

One seed cannot show significance: the demo prints that beside its numbers, with the command of the full study.
Widgets are off (``interactive=False``): the executed notebooks are static files. Re-running is cheap: finished
runs are skipped.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from . import sweep
from .config import load_config
from .notebook import execute
from .paths import project_root
from .pretrain import ensure_pretrained
from .results import read_results

DEMO_CONFIG = "synthetic_context"
# The benchmark's schedule, shortened so that all of make demo fits in 10 minutes on 2 cores: 200 iterations with
# CAC from iteration 100 (before it, the two runs train identically), validation on the first 100 val images,
# test on the first 100 test images (the sweep, notebooks 04 and 05 alike), and the short pretraining recipe
# (about half a minute; cacnb.pretrain.RECIPES["short"]) instead of the study's.
DEMO_OVERRIDES = {"model.pretrained": "pretrained/synthetic_resnet18_short.pth", "train.epochs": 2,
                  "loss.epoch_start_unsup": 1, "train.val_every": 1, "data.val_max_images": 100,
                  "data.test_max_images": 100}
DEMO_MODES = ("supervised", "semi")
SWEEP_DIR = "{out}/sweep"
DEMO_PARAMETERS = {
    "00_data_setup": {"config": DEMO_CONFIG},
    "01_model": {"config": DEMO_CONFIG, "weights": DEMO_OVERRIDES["model.pretrained"]},
    "02_loss_walkthrough": {"config": DEMO_CONFIG, "out_dir": SWEEP_DIR, "interactive": False,
                            "overrides": {"train.run_name": "semi_s0"}},
    "04_evaluation": {"config": DEMO_CONFIG, "run_dir": SWEEP_DIR + "/semi_s0",
                      "baseline_dir": SWEEP_DIR + "/supervised_s0", "split": "test",
                      "max_images": DEMO_OVERRIDES["data.test_max_images"]},
    "05_visualization": {"config": DEMO_CONFIG, "run_dir": SWEEP_DIR + "/semi_s0", "interactive": False,
                         "split": "test", "n_consistency": DEMO_OVERRIDES["data.test_max_images"]},
    "06_results": {"sweep_dir": SWEEP_DIR},
}
# training (03, through the sweep) comes right after 01, so that 02 explains a trained model
DEMO_ORDER = ["00_data_setup", "01_model", "03_training", "02_loss_walkthrough", "04_evaluation",
              "05_visualization", "06_results"]
STUDY_COMMAND = "make sweep   # 5 seeds x supervised / semi / full (+ ablations), the full schedule, 95 % intervals"


def _format(value, out: str):
    if isinstance(value, str):
        return value.format(out=out)
    if isinstance(value, dict):
        return {k: _format(v, out) for k, v in value.items()}
    return value


def notebook_parameters(notebook: Path, out: str) -> dict:
    """The demo's parameters for ``notebook``, restricted to those its ``parameters`` cell declares."""
    import papermill  # lazy: an optional dependency (the notebooks / dev extras), needed only here

    wanted = _format(DEMO_PARAMETERS.get(notebook.stem, {}), out)
    declared = papermill.inspect_notebook(str(notebook))
    return {k: v for k, v in wanted.items() if k in declared}


def sweep_argv(out: str) -> list[str]:
    """The one-seed sweep of the demo: notebook 03 once per row, two runs side by side."""
    sets = sum((["--set", f"{k}={v}"] for k, v in DEMO_OVERRIDES.items()), [])
    return ["--config", DEMO_CONFIG, "--modes", ",".join(DEMO_MODES), "--seeds", "0", "--jobs", "2",
            "--out", SWEEP_DIR.format(out=out), *sets]


class DemoError(RuntimeError):
    """A step of the demo failed; the message says where to look."""


def train(out: str) -> None:
    code = sweep.main(sweep_argv(out))
    if code:
        raise DemoError(f"the demo's training sweep failed (exit {code}); see {SWEEP_DIR.format(out=out)}/"
                        f"results.csv and the sweep.log of each run")


def run_notebooks(out: str = "runs/demo", only: "list[str] | None" = None) -> list[Path]:
    root = project_root(Path(__file__).resolve().parent) or Path.cwd()
    out_dir = root / out
    out_dir.mkdir(parents=True, exist_ok=True)
    found = {nb.stem: nb for nb in (root / "notebooks").glob("[0-9][0-9]_*.ipynb")}
    stems = [stem for stem in DEMO_ORDER if stem in found] + sorted(set(found) - set(DEMO_ORDER))
    if only:
        stems = [stem for stem in stems if any(stem.startswith(o) for o in only)]
    done = []
    for stem in stems:
        tic = time.perf_counter()
        if stem == "01_model":  # 01 shows the demo's backbone (03's sweep builds it itself when 01 is skipped)
            ensure_pretrained(DEMO_OVERRIDES["model.pretrained"])
        if stem == "03_training":
            print(f"[demo] 03_training through a one-seed sweep: python -m cacnb.sweep {' '.join(sweep_argv(out))}",
                  flush=True)
            train(out)
        else:
            nb, target = found[stem], out_dir / f"{stem}.ipynb"
            params = notebook_parameters(nb, out)
            print(f"[demo] {nb.name} {params}", flush=True)
            execute(nb, target, params, cwd=root / "notebooks")
            done.append(target)
        print(f"[demo] {stem} done in {time.perf_counter() - tic:.0f} s", flush=True)
    return done


def cac_start_iteration() -> int:
    """The iteration after which the demo's CAC term is on (loss.epoch_start_unsup epochs of training)."""
    cfg = load_config(DEMO_CONFIG, DEMO_OVERRIDES)
    return cfg.loss.epoch_start_unsup * cfg.train.iters_per_epoch


def summary(out: str) -> str:
    """The demo's comparison: test mIoU of each row, with the one-seed caveat and the study's command."""
    root = project_root(Path(__file__).resolve().parent) or Path.cwd()
    folder = root / SWEEP_DIR.format(out=out)
    lines = [f"Executed notebooks: {root / out}"]
    try:
        rows = read_results(folder)
    except FileNotFoundError:
        return "\n".join(lines + [f"  no training results in {folder}"])
    labels = {"supervised": "supervised baseline", "semi": "CAC (semi)", "full": "all labeled (full)"}
    for row in rows:
        if row["status"] == "ok" and not math.isnan(row["test_miou"]):
            lines.append(f"  {labels.get(row['mode'], row['mode']):20s} test mIoU {row['test_miou']:.2f}% "
                         f"(best-on-val checkpoint; val {row['val_miou']:.2f}%)  ({folder / row['run']})")
            if math.isfinite(row["test_miou_final"]) and row["final_iter"] != row["best_iter"]:
                lines.append(f"  {'':20s} best.pt is iteration {row['best_iter']}; the final checkpoint (iteration "
                             f"{row['final_iter']}) gives test mIoU {row['test_miou_final']:.2f}%")
            if row["mode"] == "semi" and row["best_iter"] <= cac_start_iteration():
                lines.append(f"  {'':20s} that best.pt precedes CAC, which switched on after iteration "
                             f"{cac_start_iteration()}: it is the baseline's model, and only the final "
                             f"checkpoints compare CAC")
            if math.isfinite(row["test_agreement"]):
                lines.append(f"  {'':20s} cross-context agreement {row['test_agreement']:.2f}%, feature margin "
                             f"{row['test_margin']:.3f} (positive {row['test_pos_sim']:.3f} vs other classes "
                             f"{row['test_other_sim']:.3f})")
    lines.append("  ONE seed and a shortened schedule: this difference cannot show significance. The study with "
                 "intervals:")
    lines.append(f"    {STUDY_COMMAND}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cacnb.demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/demo", help="folder for executed notebooks and runs (project-relative)")
    p.add_argument("--only", nargs="*", help="run only notebooks whose name starts with these prefixes")
    args = p.parse_args(argv)
    tic = time.perf_counter()
    try:
        run_notebooks(args.out, args.only)
    except DemoError as e:
        print(f"cacnb.demo: error: {e}", file=sys.stderr)
        return 1
    print(summary(args.out))
    total = round(time.perf_counter() - tic)
    print(f"[demo] total {total} s ({total // 60} min {total % 60} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
