"""``python -m sparamx ...``: the same as the ``sparamx`` command (``sparamx.cli``)."""

import sys

from .cli import main

sys.exit(main())
