"""``python -m sockexec_py``: the same as the ``sockexec-py`` command."""

import sys

from .broker.cli import main

sys.exit(main())
