"""Validation / test inference and the ``python -m cacnb.evaluate`` command (the paper's ``--test`` path).

Inference modes (one image at a time, since val images differ in size):

* ``whole``: the full image, padded bottom/right to a multiple of 8 (reflection padding, as the official CAC
  evaluation does), logits cropped back to the image. The VOC protocol.
* ``slide``: ``crop_size`` windows every ``slide_stride`` pixels, the last window flush with the border;
  overlapping logits are averaged. An image smaller than a window is padded up to it first. The Cityscapes
  protocol (full 1024x2048 images do not fit the training crop).
* multi-scale + flip (any mode): the image is resized by each factor in ``scales`` (and mirrored if ``flip``), run
  through the base mode, and the **softmax probabilities** are resized back and averaged; the prediction is
  their argmax. Averaging probabilities rather than logits keeps one over-confident scale from dominating.

With a single scale and no flip the prediction is the argmax of the logits themselves.

Distributed: rank r evaluates images ``range(n)[r::world]`` -- every image exactly once, no padding duplicates
(a padded DistributedSampler, like the official val loader, counts an image twice when n is odd on 2 GPUs) --
and the integer confusion matrices are summed over ranks, so the result equals a single-process run exactly.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cacnb import dist
from cacnb.checkpoint_io import CheckpointError

from cacnb.data import build_eval_dataset, palette
from cacnb.data.errors import DatasetError
from cacnb.metrics import ConfusionMeter, nan_to_none
from cacnb.model import unwrap
from cacnb.paths import atomic_write_text, resolve
from cacnb.runlog import best_val
from cacnb.runs import Run, find_checkpoint, load_run

MODES = ("whole", "slide")
PAD_MULTIPLE = 8


# ---------------------------------------------------------------------------------------------------------------
# inference on one image


def _pad_bottom_right(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pad ``x`` [B,3,H,W] to at least ``height`` x ``width``: reflection where it fits, zeros (= the mean colour
    of normalised images) where the pad is larger than the image."""
    pad_h, pad_w = max(0, height - x.shape[-2]), max(0, width - x.shape[-1])
    if pad_h == 0 and pad_w == 0:
        return x
    if pad_h < x.shape[-2] and pad_w < x.shape[-1]:
        return F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
    return F.pad(x, (0, pad_w, 0, pad_h), mode="constant", value=0.0)


def predict_whole(model: torch.nn.Module, image: torch.Tensor, multiple: int = PAD_MULTIPLE) -> torch.Tensor:
    """Logits ``[B,K,H,W]`` of the whole image, padded to a multiple of ``multiple`` and cropped back."""
    h, w = image.shape[-2:]
    padded = _pad_bottom_right(image, math.ceil(h / multiple) * multiple, math.ceil(w / multiple) * multiple)
    return model(padded)[..., :h, :w]


def _window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Window offsets along one axis: every ``stride`` pixels, plus one flush with the far border."""
    starts = list(range(0, max(size - crop, 0) + 1, stride))
    if starts[-1] + crop < size:
        starts.append(size - crop)
    return starts


def predict_slide(model: torch.nn.Module, image: torch.Tensor, crop_size: int,
                  slide_stride: Optional[int] = None) -> torch.Tensor:
    """Logits ``[B,K,H,W]`` by a sliding ``crop_size`` window (stride default: 2/3 of the crop), averaging the
    logits where windows overlap."""
    stride = int(slide_stride or max(1, math.ceil(crop_size * 2 / 3)))
    if crop_size < 1 or stride < 1:
        raise ValueError(f"sliding window needs crop_size >= 1 and stride >= 1, got {crop_size}, {stride}")
    h, w = image.shape[-2:]
    padded = _pad_bottom_right(image, crop_size, crop_size)
    ph, pw = padded.shape[-2:]
    total: Optional[torch.Tensor] = None
    count = torch.zeros(1, 1, ph, pw, device=image.device)
    for top in _window_starts(ph, crop_size, stride):
        for left in _window_starts(pw, crop_size, stride):
            window = padded[..., top:top + crop_size, left:left + crop_size]
            logits = predict_whole(model, window).float()  # [B,K,crop,crop]
            if total is None:
                total = logits.new_zeros(logits.shape[0], logits.shape[1], ph, pw)
            total[..., top:top + crop_size, left:left + crop_size] += logits
            count[..., top:top + crop_size, left:left + crop_size] += 1
    return (total / count)[..., :h, :w]


def predict_logits(model: torch.nn.Module, image: torch.Tensor, mode: str = "whole",
                   crop_size: Optional[int] = None, slide_stride: Optional[int] = None) -> torch.Tensor:
    """One forward pass of the base mode (``whole`` or ``slide``) at the image's own size."""
    if mode == "whole":
        return predict_whole(model, image)
    if mode == "slide":
        if not crop_size:
            raise ValueError("mode='slide' needs crop_size (e.g. the training crop, cfg.data.crop_size)")
        return predict_slide(model, image, crop_size, slide_stride)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def predict(model: torch.nn.Module, image: torch.Tensor, *, mode: str = "whole",
            crop_size: Optional[int] = None, slide_stride: Optional[int] = None,
            scales: Sequence[float] = (1.0,), flip: bool = False) -> torch.Tensor:
    """Scores ``[B,K,H,W]`` whose argmax is the prediction.

    Single scale without flip: the logits. Otherwise: the mean softmax probability over scales x {plain, flipped},
    each resized back to the input size (bilinear).
    """
    scales = tuple(float(s) for s in scales) or (1.0,)
    if scales == (1.0,) and not flip:
        return predict_logits(model, image, mode, crop_size, slide_stride)
    h, w = image.shape[-2:]
    probs: Optional[torch.Tensor] = None
    n = 0
    for scale in scales:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        scaled = image if size == (h, w) else F.interpolate(image, size=size, mode="bilinear",
                                                             align_corners=False)
        for mirrored in ((False, True) if flip else (False,)):
            x = scaled.flip(-1) if mirrored else scaled
            logits = predict_logits(model, x, mode, crop_size, slide_stride).float()
            if mirrored:
                logits = logits.flip(-1)
            if logits.shape[-2:] != (h, w):
                logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            p = logits.softmax(1)
            probs = p if probs is None else probs + p
            n += 1
    return probs / n


# ---------------------------------------------------------------------------------------------------------------
# dataset evaluation


def shard_indices(n: int, rank: Optional[int] = None, world_size: Optional[int] = None) -> list[int]:
    """This rank's images: ``range(n)[rank::world]`` (each image on exactly one rank, no duplicates)."""
    rank = dist.get_rank() if rank is None else rank
    world_size = dist.get_world_size() if world_size is None else world_size
    return list(range(n))[rank::world_size]


def evaluate(model: torch.nn.Module, dataset, num_classes: int, *, mode: str = "whole",
             crop_size: Optional[int] = None, slide_stride: Optional[int] = None,
             scales: Sequence[float] = (1.0,), flip: bool = False, ignore_index: int = 255,
             max_images: Optional[int] = None, progress: bool = True) -> dict:
    """mIoU of ``model`` on ``dataset`` (items ``{"image": [3,H,W], "label": [H,W], ...}``).

    Returns ``{"miou", "iou" (list, NaN for absent classes), "pixel_acc", "confusion" ([K,K] int64, CPU),
    "num_images"}``. Under a process group every rank must call it; each evaluates its shard and the confusion
    matrix is summed over ranks, so all ranks return the same numbers. The model is put in eval mode for the
    duration and returned to its previous mode afterwards.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    net = unwrap(model)  # bare: evaluation forwards must never trigger DDP's collectives
    device = next(net.parameters()).device
    n = len(dataset) if max_images is None else min(len(dataset), int(max_images))
    meter = ConfusionMeter(num_classes, ignore_index, device=device)
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode():
            indices = shard_indices(n)
            bar = tqdm(indices, desc="evaluate", disable=not (progress and dist.is_main()), leave=False)
            for i in bar:
                item = dataset[i]
                image = item["image"].unsqueeze(0).to(device)  # [1,3,H,W]
                label = item["label"].to(device)               # [H,W]
                scores = predict(net, image, mode=mode, crop_size=crop_size, slide_stride=slide_stride,
                                 scales=scales, flip=flip)
                meter.update(scores.argmax(1)[0], label)
    finally:
        net.train(was_training)
    meter.all_reduce()
    out = meter.compute()
    out["num_images"] = n
    return out


# ---------------------------------------------------------------------------------------------------------------
# the command line


def format_iou_table(result: dict, class_names: Optional[Sequence[str]] = None) -> str:
    """A plain-text per-class IoU table followed by mIoU and pixel accuracy."""
    ious = result["iou"]
    names = list(class_names) if class_names and len(class_names) == len(ious) else [str(i) for i in
                                                                                      range(len(ious))]
    width = max(12, max(len(s) for s in names))
    lines = [f"{'class':<{width}}  IoU (%)", "-" * (width + 9)]
    for name, v in zip(names, ious):
        lines.append(f"{name:<{width}}  " + ("    n/a" if math.isnan(v) else f"{100 * v:7.2f}"))
    lines.append("-" * (width + 9))
    lines.append(f"{'mIoU':<{width}}  {100 * result['miou']:7.2f}")
    lines.append(f"{'pixel acc':<{width}}  {100 * result['pixel_acc']:7.2f}")
    return "\n".join(lines)


def result_to_json(result: dict, class_names: Optional[Sequence[str]] = None, **extra) -> dict:
    """JSON-ready copy of an :func:`evaluate` result (NaN -> null, confusion as nested lists)."""
    ious = nan_to_none(result["iou"])
    out = dict(extra)
    out.update({
        "miou": nan_to_none([result["miou"]])[0],
        "pixel_acc": nan_to_none([result["pixel_acc"]])[0],
        "num_images": result.get("num_images"),
        "iou": ious,
        "confusion": torch.as_tensor(result["confusion"]).tolist(),
    })
    if class_names and len(class_names) == len(ious):
        out["class_names"] = list(class_names)
        out["iou_by_class"] = dict(zip(class_names, ious))
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cacnb.evaluate",
                                description="Evaluate a cacnb or official CAC checkpoint on the val (or test) "
                                            "split.")
    p.add_argument("--config", default=None,
                   help="preset name or JSON file (ours or official CAC); default: the run's config.json, else the "
                        "config saved in the checkpoint")
    p.add_argument("--checkpoint", required=True,
                   help="a run dir (its best.pt, else last.pt) or a checkpoint file (cacnb or official CAC)")
    p.add_argument("--split", choices=("val", "test"), default="val",
                   help="val (checkpoint selection) or test (reporting only; needs ImageSets/Segmentation/test.txt "
                        "or data.split_dir/test.txt)")
    p.add_argument("--mode", choices=MODES, default=None, help="default: the config's train.eval_mode")
    p.add_argument("--crop", type=int, default=None, help="sliding-window size (default: data.crop_size)")
    p.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: 2/3 of the crop)")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0], help="e.g. 0.75 1 1.25")
    p.add_argument("--flip", action="store_true", help="add horizontally flipped passes")
    p.add_argument("--data-dir", default=None, help="shortcut for --set data.data_dir=...")
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. data.split_dir=lists")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--max-images", type=int, default=None, help="evaluate only the first N images of the split")
    p.add_argument("--no-progress", action="store_true")
    return p


def build_val(cfg, split: str = "val"):
    """``cacnb.data.build_eval_dataset`` (val or test) with a hint when the list or dataset is missing."""
    try:
        return build_eval_dataset(cfg.data, split)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{e}\nThe {split} split for dataset {cfg.data.dataset!r} under data.data_dir={cfg.data.data_dir!r} "
            f"(split_dir={cfg.data.split_dir!r}) could not be found. Point --data-dir / --set data.data_dir=... at "
            f"the dataset, or data.split_dir at a folder holding val.txt (notebook 00 sets the data up).") from e


# ---------------------------------------------------------------------------------------------------------------
# evaluating an opened run (notebooks, sweep, the command line)


def evaluate_run(run: Run, *, split: str = "val", mode: str = "whole", crop_size: Optional[int] = None,
                 slide_stride: Optional[int] = None, scales: Sequence[float] = (1.0,), flip: bool = False,
                 max_images: Optional[int] = None, progress: bool = True) -> dict:
    """Evaluate an opened run (:func:`cacnb.runs.load_run`) on the ``split`` ("val", or "test" where the dataset
    has one) of its config. Returns the :func:`evaluate` dict plus ``cfg``, ``checkpoint``, ``class_names`` and
    ``split``."""
    cfg = run.config
    dataset = build_val(cfg, split)
    if mode == "slide" and crop_size is None:
        crop_size = cfg.data.crop_size
    result = evaluate(run.model, dataset, cfg.data.num_classes, mode=mode, crop_size=crop_size,
                      slide_stride=slide_stride, scales=scales, flip=flip, ignore_index=cfg.data.ignore_index,
                      max_images=max_images, progress=progress)
    # the synthetic sets use the first VOC ids
    names = list(palette.class_names(cfg.data.dataset))[:cfg.data.num_classes]
    result.update(cfg=cfg, checkpoint=run.checkpoint, class_names=names, split=split)
    return result


def run_summary(run_dir, *, config=None, data_dir: Optional[str] = None, **evaluate_kwargs) -> Optional[dict]:
    """A run's per-class IoU for comparisons: evaluate its best/last checkpoint if there is one, else take the
    best ``val`` line of its ``metrics.jsonl``; None if the run dir has neither. ``source`` says which."""
    folder = resolve(run_dir)
    if find_checkpoint(folder) is not None:
        run = load_run(folder, config=config, data_dir=data_dir)
        result = evaluate_run(run, **evaluate_kwargs)
        return {"miou": result["miou"], "iou": result["iou"], "pixel_acc": result["pixel_acc"],
                "source": f"evaluated {run.checkpoint}"}
    if evaluate_kwargs.get("split", "val") != "val" or not (folder / "metrics.jsonl").is_file():
        return None  # metrics.jsonl only holds val numbers
    best = best_val(folder)
    if best is None:
        return None
    iou = [float("nan") if v is None else float(v) for v in best.get("iou", [])]
    return {"miou": best["miou"], "iou": iou, "pixel_acc": best.get("pixel_acc"),
            "source": f"best val line (iteration {best.get('iter')}) of {folder}/metrics.jsonl"}


def cli(argv: Optional[Sequence[str]] = None) -> dict:
    """Parse the command line, evaluate, print the table on rank 0, write ``--out``; returns the result."""
    args = _parser().parse_args(argv)
    device = dist.init_from_env()
    try:
        run = load_run(args.checkpoint, config=args.config, overrides=args.overrides, data_dir=args.data_dir,
                       device=device)
        cfg = run.config
        mode = args.mode or cfg.train.eval_mode
        crop = args.crop or (cfg.data.crop_size if mode == "slide" else None)
        result = evaluate_run(run, split=args.split, mode=mode, crop_size=crop, slide_stride=args.stride,
                              scales=args.scales, flip=args.flip, max_images=args.max_images,
                              progress=not args.no_progress)
        names = result["class_names"]
        if dist.is_main():
            print(f"{cfg.name}: {run.checkpoint} on {result['num_images']} {args.split} images "
                  f"(mode={mode}, scales={list(args.scales)}, flip={args.flip}, world={dist.get_world_size()})")
            print(format_iou_table(result, names))
            if args.out:
                payload = result_to_json(result, names, config=cfg.name, checkpoint=str(run.checkpoint),
                                         split=args.split, mode=mode, crop_size=crop, slide_stride=args.stride,
                                         scales=list(args.scales), flip=args.flip)
                atomic_write_text(Path(args.out), json.dumps(payload, indent=2) + "\n")
                print(f"wrote {args.out}")
        return result
    finally:
        dist.cleanup()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry: user errors (missing files, bad config or checkpoint) print one message, exit code 2."""
    try:
        cli(argv)
    except (FileNotFoundError, ValueError, DatasetError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
