"""``python -m calibkern``: the command-line program (:mod:`calibkern.cli`)."""

import sys

from .cli import main

sys.exit(main())
