"""Fault injection: a tiny 2-process gloo CAC run, killed or signalled at random moments and resumed each time.

    python benchmarks/faults.py --rounds 5                 # ~1 min per round on 2 shared CPU cores
    python benchmarks/faults.py --rounds 20 --seed 3 --keep /tmp/faults

First an uninterrupted reference run. Then the same run again, N times interrupted at a random moment (start-up,
a step, a checkpoint write, a validation) by one of

* ``kill9``: SIGKILL to torchrun and every worker (a node lost, an OOM kill);
* ``term-all``: SIGTERM to torchrun, its ranks and their loader workers (``scancel``, ``kill -TERM``);
* ``term-agent``: SIGTERM to torchrun only (SLURM's ``--signal=B:TERM``), which forwards it to the workers,

and restarted with the same command each time, which resumes from ``last.pt``. A round survives when the next
start resumes (the lock is free, the checkpoint loads) and, after a SIGTERM, the run had saved the very step it
stopped at. At the end the resumed run must equal the reference bit for bit (CPU runs are deterministic), leave
no ``.tmp`` file, and log every training iteration exactly once. Prints ``rounds survived / rounds run``.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cacnb.config import load_config, save_config  # noqa: E402
from cacnb.data.synthetic import make_synthetic_voc  # noqa: E402
from cacnb.launch import descendants, torchrun_command, worker_env  # noqa: E402
from cacnb.runlog import read_metrics, split_kinds  # noqa: E402

FAULTS = ("kill9", "term-all", "term-agent")


def tiny_config(data_dir: Path, out_dir: Path, name: str, epochs: int, iters: int):
    return load_config("synthetic", {
        "data.data_dir": str(data_dir), "data.n_labeled": 8, "data.crop_size": 64, "data.base_size": 80,
        "data.num_workers": 0, "data.val_max_images": 2, "model.backbone": "resnet18", "model.pretrained": None,
        "loss.selected_num": 64, "loss.epoch_start_unsup": 1, "train.epochs": epochs,
        "train.iters_per_epoch": iters, "train.batch_size": 4, "train.batch_size_unsup": 4, "train.log_every": 1,
        "train.ckpt_every": 2, "train.out_dir": str(out_dir), "train.run_name": name})


def start(config: Path) -> subprocess.Popen:
    env = worker_env(2, {"OMP_NUM_THREADS": "1", "CACNB_DIST_TIMEOUT": "120", "CACNB_TQDM_INTERVAL": "60"})
    return subprocess.Popen(torchrun_command(config, 2), cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def inject(proc: subprocess.Popen, fault: str) -> None:
    """torchrun starts each rank in a session of its own: its process group does not reach them."""
    everyone = [proc.pid, *descendants(proc.pid)]
    if fault == "kill9":
        targets, sig = everyone, signal.SIGKILL
    elif fault == "term-all":
        targets, sig = everyone, signal.SIGTERM
    else:
        targets, sig = [proc.pid], signal.SIGTERM
    for pid in targets:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def strike_moment(proc: subprocess.Popen, run_dir: Path, rng: random.Random, total: int, step_s: float,
                  rounds_left: int) -> tuple[float, str]:
    """Wait for a random moment of this start: in one round of five during start-up (a random 0.5-8 s), else
    when a random iteration still to come is logged (drawn from this round's share of what is left, so that
    every round interrupts real work), plus a random fraction of a step (which lands in a step, a checkpoint
    write or a validation). Returns (seconds since the start, what was aimed at)."""
    tic = time.monotonic()
    done = logged_iters(run_dir)
    if rng.random() < 0.2 or (done and done[-1] >= total - 1):
        wait = rng.uniform(0.5, 8.0)
        while proc.poll() is None and time.monotonic() - tic < wait:
            time.sleep(0.05)
        return time.monotonic() - tic, "during start-up"
    base = done[-1] if done else 0
    target = rng.randint(base + 1, base + max(1, (total - 1 - base) // max(1, rounds_left)))
    while proc.poll() is None and (not logged_iters(run_dir) or logged_iters(run_dir)[-1] < target):
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, step_s))
    return time.monotonic() - tic, f"after iteration {target}"


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    ranks = descendants(proc.pid)  # now: once torchrun is gone, its orphans can no longer be found
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *descendants(proc.pid)]:
            os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return -999, out
    for pid in ranks:  # a killed torchrun leaves its ranks running: nothing may outlive the round
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.returncode, out


def logged_iters(run_dir: Path) -> list[int]:
    try:
        return [r["iter"] for r in split_kinds(read_metrics(run_dir)).get("train", [])]
    except FileNotFoundError:
        return []


def saved_iteration(run_dir: Path) -> int:
    path = run_dir / "last.pt"
    return int(torch.load(path, weights_only=True)["iteration"]) if path.exists() else 0


def compare(ref: Path, run: Path, total: int, epochs: int) -> list[str]:
    problems = []
    a = torch.load(ref / "last.pt", weights_only=True)
    b = torch.load(run / "last.pt", weights_only=True)
    differing = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    if differing:
        problems.append(f"{len(differing)} tensors differ from the reference, e.g. {differing[:3]}")
    if a["iteration"] != b["iteration"]:
        problems.append(f"iteration {b['iteration']} vs reference {a['iteration']}")
    leftovers = sorted(p.name for p in run.glob(".*.tmp"))
    if leftovers:
        problems.append(f".tmp files left: {leftovers}")
    kinds = split_kinds(read_metrics(run))
    iters = [r["iter"] for r in kinds.get("train", [])]
    if iters != list(range(1, total + 1)):
        dup = sorted({i for i in iters if iters.count(i) > 1})
        missing = sorted(set(range(1, total + 1)) - set(iters))
        problems.append(f"metrics.jsonl train iterations: duplicated {dup}, missing {missing}")
    vals = [r["iter"] for r in kinds.get("val", [])]
    ref_vals = [r["iter"] for r in split_kinds(read_metrics(ref)).get("val", [])]
    if vals != ref_vals:
        problems.append(f"val records at {vals}, reference at {ref_vals}")
    ref_miou = [r["miou"] for r in split_kinds(read_metrics(ref)).get("val", [])]
    if [r["miou"] for r in kinds.get("val", [])] != ref_miou:
        problems.append("val mIoU differs from the reference")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--iters", type=int, default=6, help="iterations per epoch")
    p.add_argument("--keep", default=None, help="work folder to keep (default: a temporary one, removed)")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="cacnb_faults_"))
    total = args.epochs * args.iters
    try:
        data = work / "data"
        if not (data / "VOCdevkit").exists():
            make_synthetic_voc(data, num_train=24, num_val=4, seed=0, progress=False)
        ref_cfg = save_config(tiny_config(data, work, "reference", args.epochs, args.iters), work / "ref.json")
        shutil.rmtree(work / "reference", ignore_errors=True)
        tic = time.monotonic()
        code, out = finish(start(ref_cfg), 600)
        ref_wall = time.monotonic() - tic
        if code != 0:
            print(out[-3000:])
            print("reference run failed")
            return 1
        step_s = ref_wall / total  # an upper bound: start-up counts too
        print(f"reference: {total} iterations in {ref_wall:.1f} s", flush=True)

        cfg = save_config(tiny_config(data, work, "faulty", args.epochs, args.iters), work / "faulty.json")
        run_dir = work / "faulty"
        shutil.rmtree(run_dir, ignore_errors=True)
        survived = 0
        for round_ in range(1, args.rounds + 1):
            fault = rng.choice(FAULTS)
            proc = start(cfg)
            delay, moment = strike_moment(proc, run_dir, rng, total, step_s, args.rounds - round_ + 1)
            finished = proc.poll() is not None
            if not finished:
                inject(proc, fault)
            code, out = finish(proc, 180)
            saved, logged = saved_iteration(run_dir), logged_iters(run_dir)
            ok, note = code != -999, ""
            if code == -999:
                note = "hung: killed after 180 s"
            elif fault != "kill9" and not finished and "interrupted: stopped by a signal" in out:
                ok &= bool(logged) and saved == logged[-1]  # SIGTERM: the step it stopped at is saved
                note = "saved the step it stopped at" if ok else "did NOT save the step it stopped at"
            elif fault != "kill9" and not finished and logged and logged[-1] == total:
                note = "signalled after the last step"
            elif fault != "kill9" and not finished:
                note = "signalled during start-up, before its handler was installed"
            survived += ok
            print(f"round {round_}: {fault} {moment}, {delay:.1f} s after the start -> exit {code}, last.pt at "
                  f"{saved}, {len(logged)} logged{', ' + note if note else ''}: {'ok' if ok else 'FAILED'}", flush=True)
            if not ok:
                print(out[-3000:])
        code, out = finish(start(cfg), 600)  # the final resume runs to the end
        problems = [] if code == 0 else [f"final resume exited with {code}:\n{out[-3000:]}"]
        if code == 0:
            problems += compare(work / "reference", run_dir, total, args.epochs)
        for problem in problems:
            print("PROBLEM:", problem)
        print(f"final weights bit-equal to the reference: {not problems}")
        print(f"rounds survived / rounds run: {survived} / {args.rounds}")
        return 0 if survived == args.rounds and not problems else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
