"""``python -m sparamx.serve ARTIFACT``: the server (:mod:`sparamx.serve.app`)."""

import sys

from .app import main

if __name__ == "__main__":
    sys.exit(main())
