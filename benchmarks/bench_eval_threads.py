"""How many threads the sweep's own evaluation should take while another run trains beside it.

    python benchmarks/bench_eval_threads.py runs/demo/sweep/semi_s0            # after make demo
    python benchmarks/bench_eval_threads.py <run dir> --threads 2,1 --rounds 2

``make sweep`` runs two trainings side by side, one OpenMP thread each, and evaluates every finished run on the
test split (mIoU, then the consistency metrics) in its own process while the other run goes on training. This
reproduces that moment: a training loop of the benchmark's CAC step (``bench_step.py``'s inputs, one thread) runs
in one process, and after a few seconds the run's ``best.pt`` is evaluated in another with each thread count in
turn (A B A B). It prints the evaluation's seconds, the training step's milliseconds while the evaluation ran and
outside it, and the evaluation's results, which must not depend on the thread count beyond rounding.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def train_loop(seconds: float, out: Path) -> None:
    """The benchmark's CAC step (random inputs, random init) at one thread for ``seconds``: (start, duration) per
    step, to ``out``."""
    sys.path.insert(0, str(HERE))
    from bench_step import fake_batches

    from cacnb.config import load_config
    from cacnb.engine import build_optimizer, train_step
    from cacnb.loss import FeatureBank
    from cacnb.model import TrainingForward, build_model

    torch.set_num_threads(1)
    cfg = load_config("synthetic_context", {"model.pretrained": None})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "model.pretrained is None", UserWarning)
        model = build_model(cfg).train()
    optimizer, net = build_optimizer(model, cfg), TrainingForward(model)
    bank, gen = FeatureBank(cfg.loss.step_save), torch.Generator().manual_seed(0)
    batch_l, batch_u = fake_batches(cfg.train.batch_size, cfg.data.crop_size, cfg.data.num_classes,
                                    torch.device("cpu"))
    steps, start = [], time.time()
    while time.time() - start < seconds:
        tic = time.time()
        result = train_step(net, batch_l, batch_u, cfg, bank=bank, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        optimizer.step()
        steps.append((tic, time.time() - tic))
    out.write_text(json.dumps(steps))


def evaluate(run_dir: Path, threads: int, out: Path) -> None:
    """What the sweep does after a run: best.pt's test mIoU, then its consistency metrics, at ``threads``."""
    from cacnb.consistency import measure_run
    from cacnb.evaluate import evaluate_run
    from cacnb.runs import load_run

    torch.set_num_threads(threads)
    run = load_run(run_dir / "best.pt", config=run_dir / "config.json")
    start = time.time()
    result = evaluate_run(run, split="test", progress=False)
    middle = time.time()
    consistency = measure_run(run, split="test")
    end = time.time()
    out.write_text(json.dumps({"start": start, "end": end, "test_s": middle - start, "consistency_s": end - middle,
                               "miou": result["miou"], "agreement": consistency["agreement"],
                               "margin": consistency["margin"]}))


def one_round(run_dir: Path, threads: int, lead: float, folder: Path) -> dict:
    """A training loop, and after ``lead`` seconds the evaluation beside it; the loop outlasts the evaluation."""
    me = [sys.executable, str(Path(__file__).resolve())]
    train_out, eval_out = folder / f"train_{threads}.json", folder / f"eval_{threads}.json"
    tic = time.time()
    subprocess.run(me + ["--role", "eval", str(run_dir), "--threads", "1", "--out", str(eval_out)], check=True)
    budget = lead + 3 * (time.time() - tic) + 10  # enough for a slower evaluation beside the training
    trainer = subprocess.Popen(me + ["--role", "train", str(run_dir), "--seconds", str(budget),
                                     "--out", str(train_out)])
    time.sleep(lead)
    subprocess.run(me + ["--role", "eval", str(run_dir), "--threads", str(threads), "--out", str(eval_out)],
                   check=True)
    if trainer.wait() != 0:
        raise SystemExit("the training loop failed")
    ev, steps = json.loads(eval_out.read_text()), json.loads(train_out.read_text())
    during = [d for t, d in steps if t >= ev["start"] and t + d <= ev["end"]]
    alone = [d for t, d in steps[2:] if t + d < ev["start"] - 3 or t > ev["end"]]
    return {"threads": threads, "eval_s": ev["test_s"] + ev["consistency_s"], "test_s": ev["test_s"],
            "consistency_s": ev["consistency_s"], "step_during_ms": 1000 * statistics.mean(during) if during else None,
            "step_alone_ms": 1000 * statistics.mean(alone) if alone else None, "miou": ev["miou"],
            "agreement": ev["agreement"], "margin": ev["margin"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", help="a trained run dir with best.pt (e.g. runs/demo/sweep/semi_s0 after make demo)")
    p.add_argument("--threads", default="2,1", help="comma-separated thread counts for the evaluation")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--lead", type=float, default=12.0, help="seconds of training before the evaluation starts")
    p.add_argument("--role", choices=("bench", "train", "eval"), default="bench", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir).resolve()
    if not (run_dir / "best.pt").is_file():
        print(f"bench_eval_threads: {run_dir / 'best.pt'} does not exist: give a trained run dir "
              f"(make demo writes runs/demo/sweep/semi_s0)", file=sys.stderr)
        return 2
    if args.role == "train":
        train_loop(args.seconds, Path(args.out))
        return 0
    if args.role == "eval":
        evaluate(run_dir, int(args.threads), Path(args.out))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for r in range(args.rounds):
            for threads in (int(t) for t in args.threads.split(",")):
                rows.append({"round": r + 1, **one_round(run_dir, threads, args.lead, Path(folder))})
    print("| round | eval threads | test + consistency s | training step beside it, ms | training step alone, ms "
          "| test mIoU | agreement | margin |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['round']} | {row['threads']} | {row['test_s']:.1f} + {row['consistency_s']:.1f} | "
              f"{row['step_during_ms']:.0f} | {row['step_alone_ms']:.0f} | {100 * row['miou']:.4f} | "
              f"{100 * row['agreement']:.4f} | {row['margin']:.6f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
