"""Train CAC (or the supervised baseline): ``python -m cacnb.train --config <preset|json> [--set key=value ...]``.

The same command runs as one process (CPU or one GPU) and unchanged under torchrun::

    torchrun --standalone --nproc_per_node=4 -m cacnb.train --config voc_r50_1323 --set data.data_dir=/data/voc
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500 \\
             -m cacnb.train --config voc_r101_1323

Batch sizes in the config are global; each rank takes ``batch / world_size``. Rank 0 writes the run dir, under
an exclusive lock (a second run started into the same dir exits with code 2 naming the holder).
A run dir that already holds ``last.pt`` resumes from it, so re-running a notebook continues the run; a changed
model, data or split setting is refused unless ``--force``. SIGTERM / SIGINT (SLURM preemption, Ctrl-C) finish the
current step (under torchrun: the steps up to the next log line, where the ranks agree to stop after the same one),
save ``last.pt`` and exit with code 128 + signal; a second Ctrl-C exits at once. A broken file met by a training
loader mid-run stops every rank before that step the same way: ``last.pt`` of the last completed step, then exit
code 2 with the loader's message naming the file; fixed, the same command resumes.

A step never waits for the device: its loss terms and statistics stay there and are read, with the NaN/Inf check,
once per ``train.log_every`` steps (and before every checkpoint). A NaN/Inf stops the run at that read, naming the
first bad iteration and loss term; no checkpoint is written from a diverged state.

Exit codes: 0 done, 2 bad input (config, data, checkpoint, run dir in use, storage), 3 diverged (NaN/Inf),
130 / 143 stopped by SIGINT / SIGTERM after saving.

The modules:

- :mod:`.loop` -- :func:`train` and the :class:`Trainer` loop: steps, log lines, checkpoint and validation cadence
- :mod:`.bootstrap` -- what runs before the first step: start-up checks, dataset, lock, model, resume, run files
- :mod:`.resume` -- the resume policy: which checkpoint, which config changes are refused or reported
- :mod:`.step_metrics` -- the device-side sums and NaN/Inf codes between two log lines, their ratios
- :mod:`.errors` -- the errors training stops with; :mod:`.cli` -- arguments, error report, exit codes
"""
from __future__ import annotations

from .bootstrap import default_synthetic_dir, ensure_dataset, rank0_decides
from .cli import main, parse_args, report
from .errors import USER_ERRORS, PeerFailed, TrainingDiverged
from .loop import Trainer, parameter_digest, train
from .resume import DIFFERENT_RUN_KEYS, RESUME_FREE_KEYS, RUN_DEFINING_KEYS, check_same_run
from .step_metrics import Stopwatch, TrainMetrics, with_ratios

__all__ = ["train", "main", "Trainer", "TrainingDiverged", "PeerFailed", "USER_ERRORS", "ensure_dataset",
           "default_synthetic_dir", "rank0_decides", "parse_args", "report", "parameter_digest", "check_same_run",
           "DIFFERENT_RUN_KEYS", "RUN_DEFINING_KEYS", "RESUME_FREE_KEYS", "Stopwatch", "TrainMetrics",
           "with_ratios"]
