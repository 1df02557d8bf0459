"""``python -m cacnb.train`` and torchrun's ``-m cacnb.train``: see :mod:`cacnb.train`."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
