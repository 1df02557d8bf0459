"""Pairs per second of the unlabeled pipeline, one worker, one thread, at the VOC settings.

    python benchmarks/bench_data.py [--pairs 320] [--rounds 3] [--images 16] [--no-photometric] [--profile]

Writes a few random ~500x375 JPEG / palette-PNG pairs (landscape and portrait) in the VOC layout into a temporary
folder, then times ``PairDataset`` (crop 320, base 400, pair scale [0.8, 2.0], stride 8, photometric aug on)
through a ``num_workers=0`` loader with ``torch.set_num_threads(1)``: decode + rescale + two crops + flips +
per-crop photometric augmentation + normalisation + collation, i.e. everything a DataLoader worker does.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cacnb.data.pairs import PairDataset
from cacnb.data.sampling import make_train_loader
from cacnb.data.voc import SegFiles


def write_fake_voc(root: Path, count: int, seed: int = 0) -> list[tuple[str, str]]:
    """Random smooth-ish images (JPEG q90) with blocky index labels, VOC file layout; returns the pair list."""
    rng = np.random.default_rng(seed)
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClassAug").mkdir(parents=True)
    pairs = []
    for i in range(count):
        h, w = (375, 500) if i % 3 else (500, 375)
        coarse = rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
        image = np.kron(coarse, np.ones((25, 25, 1), dtype=np.uint8))[:h, :w]
        image = np.clip(image.astype(np.int16) + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)
        label = np.kron(rng.integers(0, 21, (h // 50 + 1, w // 50 + 1)), np.ones((50, 50)))[:h, :w].astype(np.uint8)
        name = f"bench_{i:04d}"
        Image.fromarray(image).save(root / "JPEGImages" / f"{name}.jpg", quality=90)
        Image.fromarray(label, mode="L").convert("P").save(root / "SegmentationClassAug" / f"{name}.png")
        pairs.append((f"/JPEGImages/{name}.jpg", f"/SegmentationClassAug/{name}.png"))
    return pairs


def run(num_pairs: int, num_images: int, photometric: bool, batch_size: int, rounds: int = 3) -> list[tuple[float, float]]:
    """Per round: (pairs per wall-clock second, pairs per CPU-second of this process)."""
    with tempfile.TemporaryDirectory() as tmp:
        pairs = write_fake_voc(Path(tmp), num_images)
        ds = PairDataset(SegFiles(tmp, pairs), crop_size=320, base_size=400, scale_range=(0.8, 2.0), stride=8,
                         iou_bound=(0.1, 1.0), photometric=photometric)
        loader = iter(make_train_loader(ds, batch_size, seed=0, num_workers=0, pin_memory=False))
        for _ in range(2):  # warm-up (allocator, first-call dispatch)
            next(loader)
        steps = max(1, num_pairs // batch_size)
        results = []
        for _ in range(rounds):
            wall0, cpu0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                next(loader)
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            results.append((steps * batch_size / wall, steps * batch_size / cpu))
        return results


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=320)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-photometric", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table too")
    args = ap.parse_args()
    torch.set_num_threads(1)
    photometric = not args.no_photometric
    if args.profile:
        with torch.profiler.profile() as prof:
            run(min(args.pairs, 64), args.images, photometric, args.batch_size)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    results = run(args.pairs, args.images, photometric, args.batch_size, args.rounds)
    print(f"cpu: {cpu_model()} ({os.cpu_count()} cores), torch {torch.__version__}, threads 1, workers 0, "
          f"load avg {os.getloadavg()[0]:.1f}")
    for i, (wall_rate, cpu_rate) in enumerate(results):
        print(f"round {i}: {wall_rate:.1f} pairs/s wall clock, {cpu_rate:.1f} pairs per CPU-second")
    best_wall, best_cpu = max(r[0] for r in results), max(r[1] for r in results)
    print(f"PairDataset crop 320 base 400 photometric={photometric}: best {best_wall:.1f} pairs/s (wall clock), "
          f"{best_cpu:.1f} pairs per CPU-second")


if __name__ == "__main__":
    main()
