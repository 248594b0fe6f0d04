"""``python -m sockexec_py.gateway``: the same as ``sockexec-gateway``."""

import sys

from sockexec_py.gateway.cli import main

sys.exit(main())
