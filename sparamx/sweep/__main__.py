"""``python -m sparamx.sweep SWEEP.yaml``: a sweep (:mod:`sparamx.sweep.runner`)."""

import sys

from .runner import main

if __name__ == "__main__":
    sys.exit(main())
