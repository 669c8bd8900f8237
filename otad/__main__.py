"""``python -m otad``: the same as the ``otad`` console script."""

from __future__ import annotations

import sys

from otad.cli import main

if __name__ == "__main__":
    sys.exit(main())
