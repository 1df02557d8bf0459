"""``python -m cacnb.sweep``: see :mod:`cacnb.sweep`."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
