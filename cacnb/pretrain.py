"""``python -m cacnb.pretrain``: the paper's ImageNet step in miniature.

The paper fine-tunes an ImageNet-pretrained ResNet (backbone at lr / 10). On the synthetic benchmark there is no
ImageNet, so this trains the backbone as an **image classifier** on a classification set of the same world, made
for this purpose only (:mod:`cacnb.data.synthetic.classification`: one object per image, its appearance as the
class, its own seed streams, no segmentation labels, no context rule), and writes it in **torchvision's ResNet
state-dict format** (``conv1.weight``, ``layer1.0...``, ``fc.*``) at the path ``model.pretrained`` reads. Every run
then loads it through the same strict code as real ImageNet weights (:func:`cacnb.checkpoint_io.load_imagenet_weights`).

Training: cross-entropy, SGD (momentum 0.9, Nesterov) with a linear warm-up and the poly schedule per iteration,
random flips and translations. The held-out split (its own seed stream) gives the top-1 reported in the metadata.

Beside the weights, ``<file>.json`` records the recipe (the set's version and every setting), the held-out top-1,
the time and the command. A file whose recipe differs from the current one is **stale**: ``python -m
cacnb.pretrain`` (and :func:`ensure_pretrained`, which ``make sweep`` and ``make demo`` call) rebuilds it, saying
why; a current one is reused.

    python -m cacnb.pretrain                 # the benchmark's backbone: pretrained/synthetic_resnet18.pth
    python -m cacnb.pretrain --recipe short  # the demo's shorter one: pretrained/synthetic_resnet18_short.pth

Exit codes: 0 done (or already current), 2 bad arguments or an unwritable output.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
import torchvision
from tqdm.auto import tqdm

from .data.synthetic import classification
from .data.transforms import normalize
from .engine import poly_factor
from .paths import StorageError, atomic_write, atomic_write_text, resolve


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the pretrained weights; a changed field makes a kept file stale."""
    backbone: str = "resnet18"
    train_images: int = 12000    # distinct images of the pretraining set
    heldout_images: int = 1000   # images of its held-out split (top-1 only)
    epochs: int = 3
    batch: int = 64
    lr: float = 0.1
    weight_decay: float = 5e-4
    warmup_iters: int = 100
    size: int = 64               # image side in pixels
    shift: int = 6               # random translation, pixels
    seed: int = 0

    def describe(self) -> dict:
        return {**dataclasses.asdict(self), "set": classification.describe(self.seed, self.size)}


RECIPES = {
    "full": Recipe(),                                              # the benchmark's (make pretrain, make sweep)
    "short": Recipe(train_images=3000, heldout_images=500, epochs=2, warmup_iters=50),   # make demo's
}
# the files the presets name, and the recipe each one is built with
PRETRAINED_FILES = {"pretrained/synthetic_resnet18.pth": "full", "pretrained/synthetic_resnet18_short.pth": "short"}


def metadata_path(weights: "str | Path") -> Path:
    return Path(str(weights) + ".json")


def status(weights: "str | Path", recipe: Recipe) -> Optional[str]:
    """None when ``weights`` exists and was built with ``recipe``; else why it must be (re)built."""
    weights, meta = Path(weights), metadata_path(weights)
    if not weights.is_file():
        return f"{weights} does not exist"
    if not meta.is_file():
        return f"{weights} has no metadata file {meta.name}, so its recipe is unknown"
    try:
        saved = json.loads(meta.read_text()).get("recipe")
    except (OSError, json.JSONDecodeError) as e:
        return f"{meta} is unreadable ({e})"
    if saved != recipe.describe():
        changed = sorted(k for k in set(saved or {}) | set(recipe.describe())
                         if (saved or {}).get(k) != recipe.describe().get(k))
        return f"{weights} is stale: its recipe differs in {', '.join(changed)}"
    if saved_digest(meta) != file_digest(weights):
        return f"{weights} does not match the digest in {meta.name} (changed or truncated)"
    return None


def file_digest(path: "str | Path") -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def saved_digest(meta: Path) -> Optional[str]:
    return json.loads(meta.read_text()).get("sha256")


# ---------------------------------------------------------------------------------------------------------------
# training


def _augment(images: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and translations (by up to ``shift`` px, edges replicated) of a uint8 batch."""
    n, _, h, w = images.shape
    padded = F.pad(images.float(), (shift, shift, shift, shift), mode="replicate")   # [n, 3, h+2s, w+2s]
    dy, dx = torch.randint(0, 2 * shift + 1, (2, n), generator=generator).tolist()
    flips = torch.rand(n, generator=generator) < 0.5
    out = torch.stack([padded[i, :, y:y + h, x:x + w] for i, (y, x) in enumerate(zip(dy, dx))])
    out[flips] = out[flips].flip(-1)
    return out


def _lr(recipe: Recipe, it: int, total: int) -> float:
    """Linear warm-up over ``warmup_iters``, then the poly schedule to 0 (power 0.9) over the rest."""
    if it < recipe.warmup_iters:
        return recipe.lr * (it + 1) / recipe.warmup_iters
    return recipe.lr * poly_factor(it - recipe.warmup_iters, total - recipe.warmup_iters)


@torch.no_grad()
def top1(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 256) -> float:
    """Fraction of ``images`` (uint8) whose argmax class is the label; the model's mode is restored."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(images), batch):
        logits = model(normalize(images[start:start + batch]))
        correct += int((logits.argmax(1) == labels[start:start + batch]).sum())
    model.train(was_training)
    return correct / len(images)


def train_classifier(recipe: Recipe, progress: bool = True) -> tuple[torch.nn.Module, dict]:
    """Render the set, train the classifier; return it with its held-out top-1 and timings."""
    tic = time.perf_counter()
    images, labels = classification.make_classification_set(recipe.train_images, "train", recipe.seed,
                                                             recipe.size, progress=progress)
    held_images, held_labels = classification.make_classification_set(recipe.heldout_images, "heldout",
                                                                       recipe.seed, recipe.size)
    render_s = time.perf_counter() - tic
    torch.manual_seed(recipe.seed)
    model = getattr(torchvision.models, recipe.backbone)(weights=None, num_classes=len(classification.CLASS_NAMES))
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=0.9, nesterov=True,
                                weight_decay=recipe.weight_decay)
    generator = torch.Generator().manual_seed(recipe.seed)
    per_epoch = len(images) // recipe.batch
    total = per_epoch * recipe.epochs
    bar = tqdm(total=total, desc=f"pretrain {recipe.backbone}", unit="it", disable=not progress)
    tic, it = time.perf_counter(), 0
    for _ in range(recipe.epochs):
        order = torch.randperm(len(images), generator=generator)
        for b in range(per_epoch):
            index = order[b * recipe.batch:(b + 1) * recipe.batch]
            x = normalize(_augment(images[index], recipe.shift, generator))
            loss = F.cross_entropy(model(x), labels[index])
            for group in optimizer.param_groups:
                group["lr"] = _lr(recipe, it, total)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            it += 1
            bar.update(1)
            if it % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    train_s = time.perf_counter() - tic
    accuracy = top1(model, held_images, held_labels)
    return model, {"heldout_top1": accuracy, "render_seconds": render_s,
                   "train_seconds": train_s, "iterations": total, "images_seen": total * recipe.batch}


def write_pretrained(model: torch.nn.Module, out: "str | Path", recipe: Recipe, stats: dict,
                     command: str) -> Path:
    """The state dict (torchvision names) atomically at ``out``, then its metadata file (written last)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    atomic_write(out, lambda tmp: torch.save(state, tmp))
    meta = {"generator": "cacnb.pretrain", "recipe": recipe.describe(), **stats, "command": command,
            "written": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "sha256": file_digest(out),
            "classes": list(classification.CLASS_NAMES)}
    atomic_write_text(metadata_path(out), json.dumps(meta, indent=2) + "\n")
    return out


def pretrain(recipe_name: str = "full", out: "str | Path | None" = None, *, force: bool = False,
             progress: bool = True, command: Optional[str] = None) -> Path:
    """Build the pretrained backbone of ``recipe_name`` at ``out`` (default: its file in
    :data:`PRETRAINED_FILES`) unless a current one is there (``force`` rebuilds anyway). Returns the path."""
    if recipe_name not in RECIPES:
        raise ValueError(f"unknown recipe {recipe_name!r}; choose one of {sorted(RECIPES)}")
    recipe = RECIPES[recipe_name]
    out = resolve(out or default_file(recipe_name))
    why = status(out, recipe)
    if why is None and not force:
        print(f"[cacnb.pretrain] {out} is current (recipe {recipe_name!r}); kept", flush=True)
        return out
    print(f"[cacnb.pretrain] building {out}: {why or '--force'}", flush=True)
    model, stats = train_classifier(recipe, progress=progress)
    command = command or f"python -m cacnb.pretrain --recipe {recipe_name} --out {out}"
    write_pretrained(model, out, recipe, stats, command)
    print(f"[cacnb.pretrain] wrote {out}: held-out top-1 {100 * stats['heldout_top1']:.2f}% over "
          f"{len(classification.CLASS_NAMES)} appearance classes, {stats['train_seconds']:.0f} s training "
          f"({stats['images_seen']} images seen) + {stats['render_seconds']:.0f} s rendering", flush=True)
    return out


def default_file(recipe_name: str) -> str:
    return next(path for path, name in PRETRAINED_FILES.items() if name == recipe_name)


def recipe_for(weights: "str | Path | None") -> Optional[str]:
    """The recipe that builds ``weights`` when it is one of :data:`PRETRAINED_FILES` (resolved), else None."""
    if not weights:
        return None
    target = resolve(weights)
    return next((name for path, name in PRETRAINED_FILES.items() if resolve(path) == target), None)


def ensure_pretrained(weights: "str | Path | None", progress: bool = True) -> Optional[Path]:
    """Build ``weights`` if it is a synthetic pretrained file (see :data:`PRETRAINED_FILES`) that is missing or
    stale; other paths (real ImageNet files) and None are left alone. Returns the path it ensured, or None."""
    name = recipe_for(weights)
    if name is None:
        return None
    return pretrain(name, weights, progress=progress)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cacnb.pretrain", description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default="full", choices=sorted(RECIPES),
                   help="full: the benchmark's backbone (about 10 min on 2 cores); short: the demo's")
    p.add_argument("--out", default=None, help="weights file (default: the recipe's file under pretrained/)")
    p.add_argument("--force", action="store_true", help="rebuild even if a current file exists")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            print("cacnb.pretrain: error: --threads must be >= 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    command = "python -m cacnb.pretrain " + shlex.join(list(sys.argv[1:] if argv is None else argv))
    try:
        pretrain(args.recipe, args.out, force=args.force, command=command)
    except StorageError as e:
        print(f"cacnb.pretrain: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
