"""Failover benchmark in real namespaces (lbd); run as ``python bench/failover_lab.py``.

The code is lbd.testbed.failover_lab, shared with its smoke test in tests/netns: see its
docstring for the options and what is measured.
"""

import sys

from lbd.testbed.failover_lab import main

if __name__ == "__main__":
    sys.exit(main())
