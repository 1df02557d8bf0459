"""Benchmark: cacnb's streamed directional contrastive loss against a plain one-matrix implementation.

    python benchmarks/bench_loss.py                      # CPU, plus CUDA when available
    python benchmarks/bench_loss.py --sizes 3200x25600 --repeats 3 --devices cpu
    python benchmarks/bench_loss.py --devices cuda --json out.json   # also one JSON record per row

Each (device, size, confidence scenario, variant) runs in a fresh subprocess, so the variants never share
allocator state. Time is the median over ``--repeats`` runs of forward + backward, after one warm-up run. The
table also gives the speed-up in process CPU time (user + sys of all threads), which other load on a shared
machine disturbs much less than wall time; on CUDA only the wall time means anything.

Peak memory is what the computation adds over its inputs:

* CPU: the subprocess builds its inputs, resets the kernel's peak-RSS counter (writing ``5`` to
  ``/proc/self/clear_refs`` sets VmHWM to the current RSS), runs forward + backward once and reports
  ``VmHWM - VmRSS(before)``. This counts every page the run touched, whatever allocated it. Where
  clear_refs is not writable it falls back to the growth of ``ru_maxrss`` (valid when the run's peak exceeds
  the input-building peak, which holds for the plain variant).
* CUDA: ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` around the run.

Confidence scenarios: ``uniform`` draws both confidences from U(0, 1) (44% of positions pass the directional
mask in one direction); ``all-active`` makes every position pass in exactly one direction, the worst case for
the streamed kernel (which only processes anchors whose weight is set). Labels are uniform over 21 classes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

C = 128
NUM_CLASSES = 21
SCENARIOS = ("uniform", "all-active")


def plain_loss(feat_a, feat_b, conf_a, conf_b, label_a, label_b, neg_feat, neg_label, t=0.1, thresh=0.75):
    """The formula with the whole [n, N] matrix per direction, autograd through everything."""
    losses = []
    for q, k, lab, c_self, c_other in ((feat_a, feat_b, label_a, conf_a, conf_b),
                                       (feat_b, feat_a, label_b, conf_b, conf_a)):
        w = ((c_other > thresh) & (c_other > c_self)).float()
        pos = (q * k.detach()).sum(1, keepdim=True) / t                     # [n, 1]
        neg = (q @ neg_feat.T) / t                                           # [n, N]
        neg = neg.masked_fill(lab[:, None] == neg_label[None, :], float("-inf"))
        per_anchor = torch.logsumexp(torch.cat([pos, neg], 1), 1) - pos[:, 0]
        losses.append((w * per_anchor).sum() / w.sum().clamp(min=1))
    return losses


def fast_loss(*inputs, chunk_size=4096):
    from cacnb.loss import directional_contrastive_loss
    return directional_contrastive_loss(*inputs, chunk_size=chunk_size)


def make_inputs(n, big_n, scenario, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    unit = lambda rows: torch.nn.functional.normalize(torch.randn(rows, C, generator=g), dim=1)  # noqa: E731
    feat_a, feat_b, neg = unit(n), unit(n), unit(big_n)
    if scenario == "uniform":
        conf_a, conf_b = torch.rand(n, generator=g), torch.rand(n, generator=g)
    else:
        b_wins = torch.rand(n, generator=g) < 0.5
        conf_a = torch.where(b_wins, 0.8, 0.9)
        conf_b = torch.where(b_wins, 0.9, 0.8)
    label_a, label_b = (torch.randint(NUM_CLASSES, (n,), generator=g) for _ in range(2))
    neg_label = torch.randint(NUM_CLASSES, (big_n,), generator=g)
    tensors = [feat_a, feat_b, conf_a, conf_b, label_a, label_b, neg, neg_label]
    tensors = [t.to(device) for t in tensors]
    tensors[0].requires_grad_(True)
    tensors[1].requires_grad_(True)
    return tensors


def run_once(variant, inputs):
    for t in inputs[:2]:
        t.grad = None
    loss_a, loss_b = (plain_loss if variant == "plain" else fast_loss)(*inputs)
    (loss_a + loss_b).backward()
    if inputs[0].is_cuda:
        torch.cuda.synchronize()
    return float(loss_a + loss_b)


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def measure_peak_cpu(variant, inputs):
    """Bytes of resident memory the run adds over the state before it (see the module docstring)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kb("VmRSS")
        run_once(variant, inputs)
        return (_status_kb("VmHWM") - before) * 1024, "VmHWM-reset"
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run_once(variant, inputs)
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024, "ru_maxrss-delta"


def measure_peak_cuda(variant, inputs):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run_once(variant, inputs)
    return torch.cuda.max_memory_allocated() - before, "max_memory_allocated"


def worker(args):
    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device(args.device)
    run_once(args.variant, make_inputs(64, 512, args.scenario, device))  # thread pools, kernels, allocator
    inputs = make_inputs(args.n, args.big_n, args.scenario, device)
    measure = measure_peak_cuda if device.type == "cuda" else measure_peak_cpu
    peak, method = measure(args.variant, inputs)
    times, cpu_times, value = [], [], None
    for _ in range(args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        value = run_once(args.variant, inputs)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    print(json.dumps({"ms": 1000 * statistics.median(times), "cpu_ms": 1000 * statistics.median(cpu_times),
                      "peak_mb": peak / 2**20, "method": method, "loss": value}))


def spawn(device, n, big_n, scenario, variant, repeats):
    cmd = [sys.executable, __file__, "--worker", "--device", device, "--n", str(n), "--big-n", str(big_n),
           "--scenario", scenario, "--variant", variant, "--repeats", str(repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="3200x25600,6400x51200", help="comma-separated n x N")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--devices", default="cpu,cuda", help="cuda is skipped when unavailable")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file (a list of records)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--big-n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--scenario", default="uniform", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="fast", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    devices = [d for d in args.devices.split(",") if d != "cuda" or torch.cuda.is_available()]
    print(f"# torch {torch.__version__}, CPU: {cpu_model()}, {os.cpu_count()} cores, threads = cores"
          + (f", GPU: {torch.cuda.get_device_name()}" if "cuda" in devices else ", CUDA: not available"))
    print("| device | n | N | conf | plain ms | ours ms | speed-up | speed-up (CPU time) | plain peak MB | "
          "ours peak MB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    records = []
    for device in devices:
        for size in args.sizes.split(","):
            n, big_n = (int(v) for v in size.lower().split("x"))
            for scenario in args.scenarios.split(","):
                res = {v: spawn(device, n, big_n, scenario, v, args.repeats) for v in ("plain", "fast")}
                print(_row(device, n, big_n, scenario, res["plain"], res["fast"]), flush=True)
                records.append({"device": device, "n": n, "N": big_n, "scenario": scenario, **res})
                if args.json:  # rewritten after every row, so a run cut short keeps what it measured
                    with open(args.json, "w") as f:
                        json.dump(records, f, indent=1)


def _row(device, n, big_n, scenario, plain, fast):
    if "error" in plain or "error" in fast:
        return f"| {device} | {n} | {big_n} | {scenario} | {plain.get('error', '')} | {fast.get('error', '')} |"
    agree = abs(plain["loss"] - fast["loss"]) <= 1e-4 * max(1.0, abs(plain["loss"]))
    return (f"| {device} | {n} | {big_n} | {scenario} | {plain['ms']:.0f} | {fast['ms']:.0f} | "
            f"{plain['ms'] / fast['ms']:.1f}x | {plain['cpu_ms'] / fast['cpu_ms']:.1f}x | "
            f"{plain['peak_mb']:.0f} | {fast['peak_mb']:.0f} | "
            f"1/{plain['peak_mb'] / max(fast['peak_mb'], 1e-9):.0f} |" + ("" if agree else " LOSS MISMATCH"))


if __name__ == "__main__":
    main()
