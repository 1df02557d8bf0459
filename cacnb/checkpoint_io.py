"""Reading weights safely and strictly: ImageNet ResNet files, our checkpoints, official CAC checkpoints.

* :func:`safe_load` never unpickles arbitrary objects: ``torch.load(weights_only=True)`` plus exactly the numpy
  scalar/dtype types official CAC files hold (``monitor_best`` is a ``numpy.float64``).
* :func:`load_checkpoint` is strict. The official code falls back to a non-strict load that can evaluate a
  half-loaded model; here any missing or unexpected key refuses the load, before the model is touched. The one
  allowed gap is the projector of an official *supervised* checkpoint (it never had one).
* :func:`official_to_ours` / :func:`ours_to_official` rename keys by the prefix table :data:`OFFICIAL_PREFIXES`.
"""
from __future__ import annotations

import os
import pickle
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
import torch.nn as nn

from cacnb.paths import resolve

IMAGENET_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-19c8e357.pth",
    "resnet101": "https://download.pytorch.org/models/resnet101-5d3b4d8f.pth",
}

# (official prefix, our prefix). Official names: DeepLabv3+ as in CAC's encoder; ours: CACModel's attributes.
OFFICIAL_PREFIXES: tuple[tuple[str, str], ...] = (
    ("encoder.backbone.", "backbone."),
    *((f"encoder.aspp.aspp{i}.atrous_conv.", f"aspp.convs.{i - 1}.0.") for i in range(1, 5)),
    *((f"encoder.aspp.aspp{i}.bn.", f"aspp.convs.{i - 1}.1.") for i in range(1, 5)),
    ("encoder.aspp.global_avg_pool.1.", "aspp.convs.4.1."),
    ("encoder.aspp.global_avg_pool.2.", "aspp.convs.4.2."),
    ("encoder.aspp.conv1.", "aspp.project.0."),
    ("encoder.aspp.bn1.", "aspp.project.1."),
    ("encoder.decoder.conv1.", "decoder.low_proj.0."),
    ("encoder.decoder.bn1.", "decoder.low_proj.1."),
    *((f"encoder.decoder.last_conv.{i}.", f"decoder.fuse.{i}.") for i in (0, 1, 4, 5)),
    ("classifier.1.", "classifier.1."),
    ("project.0.", "projector.0."),
    ("project.2.", "projector.2."),
)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# the name of the backbones cacnb.pretrain builds for the synthetic benchmark (written in the torchvision format)
SYNTHETIC_PRETRAINED_PREFIX = "synthetic_"  # DistributedDataParallel, torch.compile
FORMAT = "cacnb-checkpoint"
# entries of a cacnb training checkpoint that only resuming needs; best.pt goes without them
RESUME_ONLY_KEYS = ("optimizer", "scaler", "bank", "rng")


class CheckpointError(RuntimeError):
    """A weights file does not fit the model (keys or shapes); the message says which and what to change."""


class CorruptCheckpointError(CheckpointError):
    """The file does not unpickle at all: truncated, overwritten, or not a torch checkpoint."""


class UnsafeCheckpointError(CheckpointError):
    """A file holds pickled objects beyond tensors and plain containers, so it is not read at all."""


# ---------------------------------------------------------------------------------------------------------------
# safe unpickling


def _numpy_globals() -> list:
    """numpy scalars pickle as ``multiarray.scalar(dtype, bytes)``; numpy 1 files name ``numpy.core``, numpy 2
    ``numpy._core``. Only plain numeric/bool dtypes are allowed (no object or structured dtypes)."""
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    allowed: list = [np.dtype, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes)
                    if n.endswith("DType") and n not in ("ObjectDType", "VoidDType", "StringDType")]
    return allowed


def safe_load(path: "str | os.PathLike") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` allowing exactly numpy scalars and dtypes.

    Anything else (a class from a training script, a reduce to ``os.system``, ...) raises
    :class:`UnsafeCheckpointError` naming the file and the refused global; a file that does not unpickle at all,
    or a truncated archive, raises :class:`CorruptCheckpointError` saying it is corrupt or not a torch checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _unpickling_error(path, str(e)) from None
    except RuntimeError as e:  # torch's zip reader: a truncated or half-copied file
        if "PytorchStreamReader" not in str(e):
            raise
        reason = str(e).split(". ")[0]
        raise CorruptCheckpointError(f"{path} is corrupt or not a torch checkpoint (the archive is incomplete, "
                                     f"e.g. a truncated copy: {reason})") from None
    except OSError as e:  # the zip reader on some truncations ("Invalid argument"); a permission error stays
        if isinstance(e, (FileNotFoundError, PermissionError)):
            raise
        raise CorruptCheckpointError(f"{path} is corrupt or not a torch checkpoint (reading its archive failed: "
                                     f"{e.strerror or e}; e.g. a truncated copy)") from None


def _unpickling_error(path: Path, message: str) -> CheckpointError:
    """Tell a refused global (weights_only's "Unsupported global: GLOBAL x") from a file that is not a
    checkpoint at all: only the first is a safety refusal, the second is corruption or a wrong file."""
    found = re.search(r"GLOBAL ([\w.]+)", message)
    if found is None and "Unsupported global" not in message:
        # keep only torch's diagnosis: the rest of its message suggests weights_only=False, which we never want
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", message)
        reason = detail.group(1).strip() if detail else message.strip().splitlines()[0]
        return CorruptCheckpointError(f"{path} is corrupt or not a torch checkpoint (unpickling failed: "
                                      f"{reason})")
    offender = found.group(1) if found else "an unsupported object"
    return UnsafeCheckpointError(
        f"{path} holds arbitrary pickled objects ({offender}), which cacnb refuses to unpickle because "
        "loading them could run code. Only tensors, plain containers and numpy scalars are read. If you made "
        "this file and trust it, re-save just its state dict: torch.save({'state_dict': sd}, path).")


def first_nonfinite(state: Mapping[str, Any]) -> Optional[str]:
    """Name of the first floating-point tensor (weight or buffer, e.g. BatchNorm running statistics) of a state
    dict holding NaN or Inf, else None."""
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            return name
    return None


def check_finite_state(state: Mapping[str, Any], source: str) -> None:
    """Refuse weights or buffers that are not finite: the model would predict garbage (or one class)."""
    bad = first_nonfinite(state)
    if bad is not None:
        raise CheckpointError(f"{source} holds non-finite values (NaN/Inf) in {bad!r}: the run diverged before "
                              f"it was saved. Use an earlier checkpoint of the run, or retrain with a lower "
                              f"optim.lr")


# ---------------------------------------------------------------------------------------------------------------
# key mapping


def _rename(sd: Mapping[str, Any], table) -> "OrderedDict[str, Any]":
    out = OrderedDict()
    for key, value in sd.items():
        for src, dst in table:
            if key.startswith(src):
                key = dst + key[len(src):]
                break
        out[key] = value
    return out


def official_to_ours(sd: Mapping[str, Any]) -> "OrderedDict[str, Any]":
    """Official CAC names (``module.`` already stripped) -> ours. Unknown keys are kept so a strict load
    reports them as unexpected."""
    return _rename(sd, OFFICIAL_PREFIXES)


def ours_to_official(sd: Mapping[str, Any]) -> "OrderedDict[str, Any]":
    """Our names -> official CAC names (without the ``module.`` prefix DataParallel adds)."""
    return _rename(sd, [(dst, src) for src, dst in OFFICIAL_PREFIXES])


def strip_wrappers(sd: Mapping[str, Any]) -> "OrderedDict[str, Any]":
    """Remove ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes."""
    out = OrderedDict()
    for key, value in sd.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def _is_official(sd: Mapping[str, Any]) -> bool:
    return any(k.startswith(("encoder.", "project.")) for k in sd)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


# ---------------------------------------------------------------------------------------------------------------
# strict loading


def infer_backbone(sd: Mapping[str, Any], prefix: str = "backbone.") -> str | None:
    """Guess the ResNet depth of a state dict from its layer3 block count and block type."""
    blocks = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"layer3\.(\d+)\.", k))}
    if not blocks:
        return None
    bottleneck = any(k.startswith(prefix + "layer1.0.conv3.") for k in sd)
    depth = {(True, 6): "resnet50", (True, 23): "resnet101", (False, 2): "resnet18", (False, 6): "resnet34"}
    return depth.get((bottleneck, max(blocks) + 1))


def _suggest(key: str, ckpt_shape, model_shape) -> str:
    if key.startswith("classifier."):
        return f"set data.num_classes={ckpt_shape[0]} (the checkpoint's number of classes)"
    if key.startswith("projector.2."):
        return f"set model.proj_dim={ckpt_shape[0]}"
    return "set model.backbone to the checkpoint's backbone"


def _check_shapes(sd: Mapping[str, Any], expected: Mapping[str, torch.Tensor], source: str) -> None:
    for key, value in sd.items():
        if key in expected and tuple(value.shape) != tuple(expected[key].shape):
            ckpt, ours = tuple(value.shape), tuple(expected[key].shape)
            raise CheckpointError(f"{source}: {key} has shape {list(ckpt)} in the file but {list(ours)} in the "
                                  f"model; {_suggest(key, ckpt, ours)}")


def _key_report(missing: list[str], unexpected: list[str], sd, backbone: str, prefix: str, source: str) -> str:
    lines = [f"{source} does not match the model ({backbone}); refusing a partial load."]
    guess = infer_backbone(sd, prefix)
    if guess and guess != backbone:
        lines.append(f"The file looks like a {guess} model: set model.backbone={guess}.")
    for what, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            more = " ..." if len(keys) > 40 else ""
            lines.append(f"{what} keys ({len(keys)}, cacnb names): {', '.join(keys[:40])}{more}")
    return "\n".join(lines)


def load_state_dict_strict(model: nn.Module, sd: Mapping[str, Any], source: str,
                           allow_missing: tuple[str, ...] = (), backbone: str = "?",
                           prefix: str = "backbone.") -> list[str]:
    """Check every key and shape first, then load; the model is untouched if anything is off.

    ``num_batches_tracked`` may be absent (files from older torch). Keys under ``allow_missing`` prefixes keep
    their current values; returns the names of those kept keys.
    """
    expected = model.state_dict()
    optional = [k for k in expected if k.endswith("num_batches_tracked") or k.startswith(allow_missing)]
    missing = [k for k in expected if k not in sd and k not in optional]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise CheckpointError(_key_report(missing, unexpected, sd, backbone, prefix, source))
    _check_shapes(sd, expected, source)
    kept = [k for k in optional if k not in sd and not k.endswith("num_batches_tracked")]
    full = OrderedDict(sd)  # a fresh dict without _metadata: BatchNorm fills absent num_batches_tracked
    full.update({k: expected[k] for k in kept})
    model.load_state_dict(full, strict=True)
    return kept


def load_imagenet_weights(model: nn.Module, path: "str | os.PathLike") -> None:
    """Load a torchvision-format ResNet state dict (old ``resnet50-19c8e357.pth`` or newer files) into
    ``model.backbone``; only ``fc.*`` is ignored, everything else must match."""
    path = Path(path)
    name = getattr(model, "backbone_name", "resnet50")
    if not path.is_file() and path.name.startswith(SYNTHETIC_PRETRAINED_PREFIX):
        raise FileNotFoundError(
            f"the synthetic benchmark's pretrained {name} backbone is not at {path}. Build it with `make pretrain` "
            f"(python -m cacnb.pretrain; about 10 minutes on 2 CPU cores; `make sweep` and `make demo` build "
            f"theirs when missing), or set model.pretrained=null to train from random weights")
    if not path.is_file():
        url = IMAGENET_URLS.get(name, IMAGENET_URLS["resnet50"])
        raise FileNotFoundError(
            f"ImageNet weights for {name} not found at {path}. Download {url} and put it at "
            f"pretrained/{url.rsplit('/', 1)[1]} in the project root (or point model.pretrained at it); "
            "model.pretrained=None trains from random weights, which will not match the paper.")
    _load_imagenet_sd(model, safe_load(path), str(path))


def _load_imagenet_sd(model: nn.Module, obj: Any, source: str) -> None:
    if not _is_state_dict(obj):
        raise CheckpointError(f"{source} is not a torchvision ResNet state dict (a flat name -> tensor mapping)")
    sd = OrderedDict((k, v) for k, v in strip_wrappers(obj).items() if not k.startswith("fc."))
    load_state_dict_strict(model.backbone, sd, source, backbone=getattr(model, "backbone_name", "?"), prefix="")


def _model_state(obj: Any, source: str) -> tuple[Mapping[str, Any], str]:
    """Find the state dict in a loaded file; returns it with the file's kind."""
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        return obj["model"], "cacnb"
    if isinstance(obj, Mapping) and "state_dict" in obj and _is_state_dict(obj["state_dict"]):
        return obj["state_dict"], "official"
    if _is_state_dict(obj):
        return obj, "state_dict"
    keys = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(f"{source}: no model weights found (expected a cacnb checkpoint, an official CAC "
                          f"checkpoint with 'state_dict', or a state dict); top-level: {keys}")


def load_checkpoint(model: nn.Module, path: "str | os.PathLike") -> dict:
    """Strictly load our checkpoint, a bare state dict, or an official CAC checkpoint into ``model``.

    Returns the file's top-level dict (for a bare state dict ``{"model": sd}``) plus ``"source"``
    (``cacnb`` | ``official`` | ``state_dict``) and ``"kept_at_init"`` (keys left as initialised).
    """
    path = Path(path)
    obj = safe_load(path)
    return load_model_state(model, obj, str(path))


def load_model_state(model: nn.Module, obj: Any, source: str) -> dict:
    """Strictly load the weights of an already read checkpoint object ``obj`` (see :func:`load_checkpoint`, which
    reads the file first); ``source`` names it in errors. Returns what :func:`load_checkpoint` returns."""
    sd, kind = _model_state(obj, source)
    sd = strip_wrappers(sd)
    official = _is_official(sd)
    if official:
        sd = official_to_ours(sd)
    allow = ("projector.",) if official and not any(k.startswith("projector.") for k in sd) else ()
    kept = load_state_dict_strict(model, sd, source, allow_missing=allow,
                                  backbone=getattr(model, "backbone_name", "?"))
    if kept:
        warnings.warn(f"{source} has no projector (an official supervised-mode checkpoint): the projector "
                      "stays at its initial weights", stacklevel=3)
    info = dict(obj) if kind != "state_dict" else {"model": obj}
    info.update(source=kind, kept_at_init=kept)
    return info


def load_weights(model: nn.Module, path: "str | os.PathLike") -> str:
    """Notebook helper: load either ImageNet ResNet weights or a checkpoint, whichever ``path`` holds.
    Returns ``"imagenet"`` or the checkpoint kind."""
    path = resolve(path)
    obj = safe_load(path)
    if _is_state_dict(obj) and "conv1.weight" in strip_wrappers(obj):
        _load_imagenet_sd(model, obj, str(path))
        return "imagenet"
    return load_model_state(model, obj, str(path))["source"]
