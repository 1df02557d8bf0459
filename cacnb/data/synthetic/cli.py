"""``python -m cacnb.data.synthetic``: write a synthetic VOC-format set from the command line."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ...paths import resolve
from ..errors import DatasetError
from .writer import STYLES, make_synthetic_voc, scene_style


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cacnb.data.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="data/synthetic", help="folder that will hold VOCdevkit/")
    parser.add_argument("--num-train", type=int, default=240)
    parser.add_argument("--num-val", type=int, default=40)
    parser.add_argument("--num-test", type=int, default=0, help="images of a held-out test split (0: none)")
    parser.add_argument("--style", default="objects", choices=sorted(STYLES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-size", type=int, default=None, help="smallest image side (default: the style's)")
    parser.add_argument("--max-size", type=int, default=None, help="largest image side (default: the style's)")
    parser.add_argument("--force", action="store_true", help="regenerate even if the dataset exists")
    args = parser.parse_args(argv)

    try:
        default_lo, default_hi = scene_style(args.style).size_range
        make_synthetic_voc(resolve(args.root), args.num_train, args.num_val, args.seed, num_test=args.num_test,
                           style=args.style, size_range=(args.min_size or default_lo, args.max_size or default_hi),
                           overwrite=args.force)
    except (DatasetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2  # bad input
    return 0

