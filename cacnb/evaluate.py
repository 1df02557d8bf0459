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
import warnings
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cacnb import dist
from cacnb.metrics import ConfusionMeter, nan_to_none

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


def _bare(model: torch.nn.Module) -> torch.nn.Module:
    """Unwrap DDP / torch.compile so evaluation forwards never trigger DDP's collectives."""
    from cacnb.engine import unwrap

    return unwrap(model)


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
    net = _bare(model)
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


def format_table(result: dict, class_names: Optional[Sequence[str]] = None) -> str:
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
    p.add_argument("--config", default="synthetic", help="preset name or JSON file (ours or official CAC)")
    p.add_argument("--checkpoint", required=True, help="checkpoint path (cacnb best.pt/last.pt or official)")
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


def load_eval_config(source, overrides: Iterable[str] = (), data_dir: Optional[str] = None):
    """The config to evaluate with: ``source`` + overrides (a dict of dotted keys, or ``key=value`` strings),
    no ImageNet weights (a checkpoint follows)."""
    from cacnb.config import load_config, parse_overrides

    extra = parse_overrides(overrides)
    if data_dir:
        extra["data.data_dir"] = data_dir
    cfg = load_config(source, extra)
    cfg.model.pretrained = None
    return cfg


def build_val(cfg, split: str = "val"):
    """``cacnb.data.build_eval_dataset`` (val or test) with a hint when the list or dataset is missing."""
    from cacnb.data import build_eval_dataset

    try:
        return build_eval_dataset(cfg.data, split)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{e}\nThe {split} split for dataset {cfg.data.dataset!r} under data.data_dir={cfg.data.data_dir!r} "
            f"(split_dir={cfg.data.split_dir!r}) could not be found. Point --data-dir / --set data.data_dir=... at "
            f"the dataset, or data.split_dir at a folder holding val.txt (notebook 00 sets the data up).") from e


def checkpoint_mismatch(path, cfg) -> Optional[str]:
    """How the config saved in a checkpoint differs from ``cfg`` (classes, backbone, projector), else None.

    cacnb checkpoints save our config; official CAC checkpoints save their JSON config, which is mapped first.
    Without a saved config the loader's own message (naming the tensor whose shape differs) explains.
    """
    saved = _saved_config(path)
    if saved is None:
        return None
    saved = saved.to_dict()
    problems = []
    for section, key in (("data", "num_classes"), ("model", "backbone"), ("model", "proj_dim"),
                         ("model", "output_stride")):
        theirs = saved.get(section, {}).get(key)
        ours = getattr(getattr(cfg, section), key)
        if theirs is not None and theirs != ours:
            problems.append(f"{section}.{key} is {theirs!r} in the checkpoint but {ours!r} in the config")
    return "; ".join(problems) or None


def load_for_eval(cfg, checkpoint, device) -> torch.nn.Module:
    """Build the model of ``cfg`` and load ``checkpoint`` (ours or official) into it, with a mismatch hint.

    A file that is unsafe to unpickle or corrupt is refused with that reason first; weights or buffers holding
    NaN/Inf (a diverged run) are refused naming the tensor."""
    from cacnb.checkpoint_io import CorruptCheckpointError, UnsafeCheckpointError, check_finite_state
    from cacnb.model import build_model, load_checkpoint
    from cacnb.paths import resolve

    path = resolve(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint!r} not found (looked at {path})")
    with warnings.catch_warnings():  # the checkpoint replaces the random init, so its warning is moot
        warnings.filterwarnings("ignore", message="model.pretrained is None")
        model = build_model(cfg)
    try:
        load_checkpoint(model, path)
    except (UnsafeCheckpointError, CorruptCheckpointError):
        raise  # about the file itself, not the model: its message leads
    except Exception as e:
        why = checkpoint_mismatch(path, cfg)
        hint = f" ({why})" if why else ""
        raise ValueError(f"checkpoint {path} does not fit the model of config {cfg.name!r}{hint}. Pass the config "
                         f"the checkpoint was trained with (its run dir's config.json), or fix the setting with "
                         f"--set.\nLoader said: {e}") from e
    check_finite_state(model.state_dict(), f"checkpoint {path}")
    return model.to(device)


# ---------------------------------------------------------------------------------------------------------------
# notebook helpers: checkpoints of run dirs


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def find_checkpoint(run_dir) -> Optional[Path]:
    """``best.pt`` of a run dir, else ``last.pt``, else None."""
    from cacnb.paths import resolve

    folder = resolve(run_dir)
    for name in ("best.pt", "last.pt"):
        if (folder / name).is_file():
            return folder / name
    return None


def config_for_checkpoint(config, checkpoint=None, *, data_dir: Optional[str] = None,
                          overrides: Iterable[str] = ()):
    """The config to rebuild a checkpoint's model with: the data section of ``config`` (preset or JSON, plus
    ``data_dir`` and overrides), and -- when the checkpoint is a cacnb one that saved its config -- the model
    section and ``data.num_classes`` it was trained with, so a demo run with non-default sizes loads as is."""
    from cacnb.paths import resolve

    cfg = load_eval_config(config, overrides, data_dir)
    if checkpoint is None or not resolve(checkpoint).is_file():
        return cfg
    trained = _saved_config(resolve(checkpoint))
    if trained is not None:
        cfg.model = trained.model
        cfg.model.pretrained = None
        cfg.data.num_classes = trained.data.num_classes
    return cfg


def _saved_config(path):
    """The Config a checkpoint was trained with (ours, or an official CAC JSON config mapped), else None."""
    from cacnb.config import Config, ConfigError, from_official, is_official_json
    from cacnb.model import safe_load

    try:
        ckpt = safe_load(path)
    except Exception:  # unreadable: the loader's own error says why
        return None
    saved = ckpt.get("config") if isinstance(ckpt, dict) else None
    if not isinstance(saved, dict):
        return None
    try:
        return from_official(saved) if is_official_json(saved) else Config.from_dict(saved)
    except (ConfigError, TypeError, ValueError, KeyError):
        return None


def model_from_checkpoint(config, checkpoint, *, data_dir: Optional[str] = None, overrides: Iterable[str] = (),
                          device=None, allow_random: bool = False):
    """``(model, cfg, loaded)``: the model of :func:`config_for_checkpoint` with ``checkpoint`` loaded
    (``loaded`` = its path). With ``allow_random`` a missing checkpoint gives a randomly initialised model and
    ``loaded=None`` instead of an error (notebook 05 uses that to stay runnable before any training)."""
    from cacnb.paths import resolve

    device = torch.device(device) if device is not None else default_device()
    path = resolve(checkpoint) if checkpoint else None
    if path is None or not path.is_file():
        if not allow_random:
            raise FileNotFoundError(f"checkpoint {checkpoint!r} not found (looked at {path}); train first "
                                    f"(notebook 03 or `python -m cacnb.demo`) or pass another path")
        from cacnb.model import build_model

        cfg = load_eval_config(config, overrides, data_dir)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the random-backbone warning: the caller reports it
            return build_model(cfg).to(device).eval(), cfg, None
    cfg = config_for_checkpoint(config, path, data_dir=data_dir, overrides=overrides)
    model = load_for_eval(cfg, path, device)  # loader warnings (e.g. a projector kept at init) stay visible
    return model.eval(), cfg, path


def evaluate_checkpoint(config, checkpoint, *, data_dir: Optional[str] = None, mode: str = "whole",
                        crop_size: Optional[int] = None, slide_stride: Optional[int] = None,
                        scales: Sequence[float] = (1.0,), flip: bool = False, max_images: Optional[int] = None,
                        overrides: Iterable[str] = (), progress: bool = True, device=None,
                        split: str = "val") -> dict:
    """Evaluate a checkpoint on the ``split`` ("val", or "test" where the dataset has one) of ``config``
    (notebook 04's one call). Returns the :func:`evaluate` dict plus ``cfg``, ``checkpoint``, ``class_names``
    and ``split``. ``device``: default CUDA if there is one, else CPU."""
    from cacnb.data.palette import class_names

    model, cfg, path = model_from_checkpoint(config, checkpoint, data_dir=data_dir, overrides=overrides,
                                             device=device)
    dataset = build_val(cfg, split)
    if mode == "slide" and crop_size is None:
        crop_size = cfg.data.crop_size
    result = evaluate(model, dataset, cfg.data.num_classes, mode=mode, crop_size=crop_size,
                      slide_stride=slide_stride, scales=scales, flip=flip, ignore_index=cfg.data.ignore_index,
                      max_images=max_images, progress=progress)
    names = list(class_names(cfg.data.dataset))[:cfg.data.num_classes]  # the synthetic sets use the first VOC ids
    result.update(cfg=cfg, checkpoint=path, class_names=names, split=split)
    return result


def run_summary(run_dir, config, **evaluate_kwargs) -> Optional[dict]:
    """A run's per-class IoU for comparisons: evaluate its best/last checkpoint if there is one, else take the
    best ``val`` line of its ``metrics.jsonl``; None if the run dir has neither. ``source`` says which."""
    from cacnb.paths import resolve
    from cacnb.runlog import best_val

    ckpt = find_checkpoint(run_dir)
    if ckpt is not None:
        result = evaluate_checkpoint(config, ckpt, **evaluate_kwargs)
        return {"miou": result["miou"], "iou": result["iou"], "pixel_acc": result["pixel_acc"],
                "source": f"evaluated {ckpt}"}
    if evaluate_kwargs.get("split", "val") != "val":
        return None  # metrics.jsonl only holds val numbers
    if (resolve(run_dir) / "metrics.jsonl").is_file():
        best = best_val(resolve(run_dir))
        if best is not None:
            iou = [float("nan") if v is None else float(v) for v in best.get("iou", [])]
            return {"miou": best["miou"], "iou": iou, "pixel_acc": best.get("pixel_acc"),
                    "source": f"best val line (iteration {best.get('iter')}) of {resolve(run_dir)}/metrics.jsonl"}
    return None


def run(argv: Optional[Sequence[str]] = None) -> dict:
    """Parse the command line, evaluate, print the table on rank 0, write ``--out``; returns the result."""
    args = _parser().parse_args(argv)
    device = dist.init_from_env()
    try:
        cfg = load_eval_config(args.config, args.overrides, args.data_dir)
        from cacnb.data.palette import class_names

        dataset = build_val(cfg, args.split)
        model = load_for_eval(cfg, args.checkpoint, device)
        mode = args.mode or cfg.train.eval_mode
        crop = args.crop or (cfg.data.crop_size if mode == "slide" else None)
        result = evaluate(model, dataset, cfg.data.num_classes, mode=mode, crop_size=crop,
                          slide_stride=args.stride, scales=args.scales, flip=args.flip,
                          ignore_index=cfg.data.ignore_index, max_images=args.max_images,
                          progress=not args.no_progress)
        names = class_names(cfg.data.dataset)
        if dist.is_main():
            print(f"{cfg.name}: {args.checkpoint} on {result['num_images']} {args.split} images "
                  f"(mode={mode}, scales={list(args.scales)}, flip={args.flip}, world={dist.get_world_size()})")
            print(format_table(result, names))
            if args.out:
                from cacnb.paths import atomic_write_text

                payload = result_to_json(result, names, config=cfg.name, checkpoint=str(args.checkpoint),
                                         split=args.split, mode=mode, crop_size=crop, slide_stride=args.stride,
                                         scales=list(args.scales), flip=args.flip)
                atomic_write_text(Path(args.out), json.dumps(payload, indent=2) + "\n")
                print(f"wrote {args.out}")
        return result
    finally:
        dist.cleanup()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry: user errors (missing files, bad config or checkpoint) print one message, exit code 2."""
    from cacnb.checkpoint_io import CheckpointError
    from cacnb.data.errors import DatasetError

    try:
        run(argv)
    except (FileNotFoundError, ValueError, DatasetError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
