"""Flood benchmark: forged heartbeats at a cluster; run as ``python bench/flood.py``.

The code is lbd.testbed.flood, shared with its smoke test in tests/netns: see its
docstring for the options and what is measured.
"""

import sys

from lbd.testbed.flood import main

if __name__ == "__main__":
    sys.exit(main())
