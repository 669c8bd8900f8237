"""``python -m otad.ctl``: the same as the ``otactl`` console script."""

from __future__ import annotations

import sys

from otad.ctl import main

if __name__ == "__main__":
    sys.exit(main())
