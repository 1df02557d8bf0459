"""``python -m cacnb.train``: the arguments, the one error block on stderr, and the exit codes.

Exit codes: 0 done, 2 bad input (config, data, checkpoint, run dir in use, storage), 3 diverged (NaN/Inf),
130 / 143 stopped by SIGINT / SIGTERM after saving, 1 an unexpected failure (its traceback, tagged with the rank).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

from ..config import PRESETS, valid_keys
from ..interrupts import Interrupted
from . import __doc__ as PACKAGE_DOC  # the package docstring: the command's description
from .errors import USER_ERRORS, PeerFailed, TrainingDiverged
from .loop import train

PEER_EXIT_DELAY_S = 3.0  # how long the other ranks wait for rank 0 to exit first after it refused to start


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cacnb.train", description=PACKAGE_DOC.split("\n")[0])
    p.add_argument("--config", default="synthetic",
                   help=f"a preset ({', '.join(PRESETS)}), our config.json, or an official CAC JSON file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="typed override, repeatable, e.g. --set train.epochs=2 --set data.data_dir=/data/voc")
    p.add_argument("--resume", default=None, help="checkpoint to resume from (default: <run dir>/last.pt)")
    p.add_argument("--force", action="store_true",
                   help="resume even though the data, split or schedule settings changed since the checkpoint")
    p.add_argument("--make-synthetic", action="store_true",
                   help="write the synthetic dataset at data.data_dir if it is missing there (by default only "
                        "at the preset's own data dir)")
    p.add_argument("--list-keys", action="store_true", help="print every config key and exit")
    return p.parse_args(argv)


def report(kind: str, message: str) -> None:
    """One error block on stderr; every line carries the rank so :mod:`cacnb.launch` can show the failing rank's
    own message first, even among other ranks' output."""
    rank, world = _launch_rank()
    tag = f"cacnb.train[rank {rank}]" if world > 1 else "cacnb.train"
    lines = str(message).rstrip().splitlines() or [""]
    print("\n".join([f"{tag}: {kind}: {lines[0]}"] + [f"{tag}:   {line}" for line in lines[1:]]),
          file=sys.stderr, flush=True)


def _launch_rank() -> tuple[int, int]:
    """(rank, world size) as torchrun set them: still known after the process group is gone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list_keys:
        print("\n".join(valid_keys()))
        return 0
    try:
        overrides = list(args.set) + ([f"train.resume={args.resume}"] if args.resume else [])
        train(args.config, overrides, force=args.force, make_synthetic=args.make_synthetic)
    except PeerFailed:
        # Rank 0 prints the reason and exits 2. Leave after it, or torchrun sees this rank end first, stops rank 0
        # with SIGTERM and reports its exit code as -15 instead of its own.
        time.sleep(PEER_EXIT_DELAY_S)
        return 2
    except USER_ERRORS as e:
        report("error", e)
        return 2
    except TrainingDiverged as e:
        report("stopped", e)
        return 3
    except Interrupted as e:
        if _launch_rank()[0] == 0:
            report("interrupted", e)
        return e.exit_code
    except BaseException as e:  # an unexpected failure: its traceback, tagged with the rank
        if isinstance(e, KeyboardInterrupt):
            report("interrupted", "KeyboardInterrupt before training started; nothing was saved")
            return 130
        report(f"failed with {type(e).__name__}", "".join(traceback.format_exception(e)))
        return 1
    return 0
