"""The resume policy: which checkpoint a run continues from, and which config changes it accepts.

A run dir that already holds ``last.pt`` resumes from it (``train.resume`` names another checkpoint). A checkpoint
of a different run (:data:`DIFFERENT_RUN_KEYS`) is refused; one whose data, split or schedule changed
(:data:`RUN_DEFINING_KEYS`) is refused unless ``--force``; :data:`RESUME_FREE_KEYS` may change without comment and
every other change is reported.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .. import dist
from ..checkpoint_io import CheckpointError
from ..config import Config
from ..runs import config_diff, describe_diff, training_state

# keys whose change makes the checkpoint another run's: its weights or its meaning do not carry over
DIFFERENT_RUN_KEYS = ("train.mode", "model.backbone", "model.output_stride", "model.proj_dim", "data.num_classes",
                      "data.dataset")
# keys whose change breaks the continuation (other data, another split, other crops or data order): refused
# unless --force
RUN_DEFINING_KEYS = ("data.data_dir", "data.n_labeled", "data.split_seed", "data.split_dir", "data.ignore_index",
                     "data.crop_size", "data.base_size", "data.scale_range", "data.pair_scale_range",
                     "data.iou_bound", "data.stride", "train.iters_per_epoch", "train.batch_size",
                     "train.batch_size_unsup", "train.seed", "loss.epoch_start_unsup")
# keys that may change on resume without comment
RESUME_FREE_KEYS = ("train.resume", "train.max_iters", "data.num_workers", "data.val_max_images",
                    "data.test_max_images", "train.compile",
                    "train.log_every", "model.pretrained")


def read_resume_state(cfg: Config, run_dir: Path, *, force: bool = False) -> Optional[tuple["Path | str", dict]]:
    """``(path, checkpoint)`` to resume from (``train.resume``, else ``<run_dir>/last.pt``), or None to start
    fresh. Every rank must call it: rank 0 decides whether there is one, since ranks that disagreed (a node
    without the shared run dir) would desync and hang."""
    path = cfg.train.resume or (run_dir / "last.pt")
    if cfg.train.resume and not Path(path).exists():
        raise FileNotFoundError(f"--resume {path}: no such checkpoint")
    found = dist.broadcast_object(Path(path).exists() if dist.is_main() else None)
    if not found:
        return None
    if not Path(path).exists():
        raise FileNotFoundError(f"rank {dist.get_rank()} cannot see {path}, which rank 0 resumes from: the run dir "
                                f"must be on a file system that every node shares")
    state = training_state(path)
    check_same_run(state.get("config") or {}, cfg, path, force=force)
    return path, state


def check_same_run(saved: dict, cfg: Config, path, *, force: bool = False) -> None:
    """Refuse to resume a checkpoint of a different run (another mode, backbone, ...) in the same run dir, or
    one whose data, split or schedule changed (unless ``force``); report every other changed key."""
    changes = config_diff(saved, cfg, skip=RESUME_FREE_KEYS)
    different = [k for k in DIFFERENT_RUN_KEYS if k in changes]
    if different:
        raise CheckpointError(f"{path} belongs to a different run ({describe_diff(changes, different)}). Choose "
                              f"another train.run_name or train.out_dir, or move that run away")
    defining = [k for k in RUN_DEFINING_KEYS if k in changes]
    if defining and not force:
        raise CheckpointError(f"{path}: resuming would change the run's data or split "
                              f"({describe_diff(changes, defining)}), so the continuation would not be the run it "
                              f"claims to be. Restore the saved "
                              f"values (its config.json), start a new run (another train.run_name), or pass "
                              f"--force to resume anyway")
    rest = [k for k in changes if k not in defining]
    if (rest or defining) and dist.is_main():
        forced = f" (--force: {describe_diff(changes, defining)})" if defining else ""
        print(f"[cacnb] resuming {path} with changed settings: {describe_diff(changes, rest) or 'none other'}"
              f"{forced}", flush=True)
