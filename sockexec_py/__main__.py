"""``python -m sockexec_py``: the same as the ``sockexec-py`` command."""

import sys

from .cli import main

sys.exit(main())
