"""``python -m clip_surgery``: the command line (what ``torchrun -m clip_surgery`` starts)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
