"""Daemon cost: CPU and RSS of real lbd daemons; run as ``python bench/cost.py``.

The code is lbd.testbed.cost, shared with its smoke test in tests/netns: see its
docstring for the options and what is measured.
"""

import sys

from lbd.testbed.cost import main

if __name__ == "__main__":
    sys.exit(main())
