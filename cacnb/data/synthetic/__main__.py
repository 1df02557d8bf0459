"""``python -m cacnb.data.synthetic`` (see :mod:`.cli`)."""
import sys

from .cli import main

sys.exit(main())
