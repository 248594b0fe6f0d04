"""``python -m bench``: run the broker benchmarks (see ``--help``)."""

import sys

from .run import main

sys.exit(main(prog="python -m bench"))
