"""``python -m bench``: run the broker benchmarks (see ``--help``)."""

import sys

from .cli import main

sys.exit(main(prog="python -m bench"))
