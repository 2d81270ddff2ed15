"""Soak: a random fault schedule on real daemons; run as ``python bench/soak.py``.

The code is lbd.testbed.soak, shared with its smoke test in tests/netns: see its
docstring for the options and what is measured.
"""

import sys

from lbd.testbed.soak import main

if __name__ == "__main__":
    sys.exit(main())
