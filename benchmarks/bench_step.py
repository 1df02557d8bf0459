"""Training-step throughput and peak memory of a full CAC step (supervised CE + both crops + DC loss + SGD).

    python benchmarks/bench_step.py                 # CUDA: the paper's VOC R-50 step; CPU: reduced sizes
    python benchmarks/bench_step.py --preset voc_r50_1323 --batch 8 --crop 320 --steps 20 --amp
    python benchmarks/bench_step.py --compile --json out.json    # torch.compile, one JSON record per run

Images/s counts every image the step encodes: B labeled crops + 2 x B unlabeled crops. Random inputs with a
fixed half-size overlap box; the numbers measure compute, not data loading (see bench_data.py for that).
``--amp``, ``--channels-last`` and ``--compile`` set the config keys the trainer reads (``train.amp``,
``model.channels_last``, ``train.compile``) and apply them as it does: bf16 autocast around the step, NHWC
weights and inputs, ``torch.compile`` of the step's forward. ``first_step_s`` is the first warm-up step, which
holds the compilation.
"""
from __future__ import annotations

import argparse
import json
import resource
import time
import warnings

import torch

from cacnb.config import load_config
from cacnb.engine import build_optimizer, train_step
from cacnb.loss import FeatureBank
from cacnb.model import TrainingForward, build_model


def fake_batches(batch: int, crop: int, num_classes: int, device):
    g = torch.Generator().manual_seed(0)
    half = (crop // 2) // 8 * 8
    batch_l = {"image": torch.randn(batch, 3, crop, crop, generator=g),
               "label": torch.randint(0, num_classes, (batch, crop, crop), generator=g)}
    overlap = torch.tensor([[0, 0, half, half], [crop - half, crop - half, crop, crop]]).expand(batch, 2, 4)
    batch_u = {"image": torch.randn(batch, 2, 3, crop, crop, generator=g), "overlap": overlap.clone(),
               "flip": torch.zeros(batch, 2, dtype=torch.bool)}
    # the overlap boxes and flips stay on the host, as the loader gives them (train_step reads them there)
    return ({k: v.to(device) for k, v in batch_l.items()},
            {k: v.to(device) if k == "image" else v for k, v in batch_u.items()})


def bench(preset: str, batch: int, crop: int, steps: int, warmup: int, amp: bool, channels_last: bool,
          device: torch.device, compile_model: bool = False) -> dict:
    over = {"model.pretrained": None, "data.crop_size": crop, "model.channels_last": channels_last,
            "train.amp": amp, "train.compile": compile_model}
    cfg = load_config(preset, over)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "model.pretrained is None", UserWarning)
        model = build_model(cfg).to(device).train()
    optimizer = build_optimizer(model, cfg)
    net = TrainingForward(model)  # the training step's forward
    if cfg.train.compile:
        net = torch.compile(net)  # as the trainer does
    use_amp = cfg.train.amp and device.type == "cuda"  # the trainer's rule: bf16 autocast on CUDA only
    bank = FeatureBank(cfg.loss.step_save).to(device)
    gen = torch.Generator().manual_seed(0)
    batch_l, batch_u = fake_batches(batch, crop, cfg.data.num_classes, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            result = train_step(net, batch_l, batch_u, cfg, bank=bank, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        optimizer.step()

    warmup_s = []
    for _ in range(warmup):
        tic = time.perf_counter()
        step()
        _sync(device)
        warmup_s.append(time.perf_counter() - tic)
    tic = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = (time.perf_counter() - tic) / steps
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"preset": preset, "backbone": cfg.model.backbone, "batch": f"{batch}+{batch} pairs", "crop": crop,
            "amp": use_amp, "channels_last": channels_last, "compile": compile_model,
            "ms_per_step": 1000 * seconds, "images_per_s": 3 * batch / seconds, "peak_mb": peak,
            "first_step_s": warmup_s[0] if warmup_s else None, "steps": steps,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default=None)
    p.add_argument("--batch", type=int, default=None, help="labeled crops per step (= unlabeled pairs)")
    p.add_argument("--crop", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the step's forward (train.compile)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file (a list of records)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:  # the paper's per-step work on one GPU: 8 labeled + 8 pairs at crop 320, ResNet-50
        runs = [(args.preset or "voc_r50_1323", args.batch or 8, args.crop or 320)]
    elif args.preset:  # an explicit preset is measured once, at the larger CPU size
        runs = [(args.preset, args.batch or 2, args.crop or 160)]
    else:     # reduced sizes that finish in about a minute on 2 cores
        runs = [("synthetic", args.batch or 4, args.crop or 128),
                ("voc_r50_1323", args.batch or 2, args.crop or 160)]
    steps = args.steps or (20 if cuda else 3)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    print(f"{'preset':14s} {'backbone':9s} {'batch':12s} {'crop':>5s} {'ms/step':>9s} {'img/s':>7s} "
          f"{'peak MB':>8s}")
    results = []
    for preset, batch, crop in runs:
        r = bench(preset, batch, crop, steps, args.warmup, args.amp, args.channels_last, device, args.compile)
        results.append(r)
        print(f"{r['preset']:14s} {r['backbone']:9s} {r['batch']:12s} {r['crop']:5d} {r['ms_per_step']:9.0f} "
              f"{r['images_per_s']:7.2f} {r['peak_mb']:8.0f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if not cuda:
        print("(CPU peak MB is the process's maximum resident set size, model and inputs included)")


if __name__ == "__main__":
    main()
