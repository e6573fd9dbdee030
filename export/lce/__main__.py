"""``python -m export.lce SOURCE -o OUT_DIR``: see :mod:`export.lce.cli`."""

import sys

from .cli import main

sys.exit(main())
