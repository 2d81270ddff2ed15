"""keepalived (VRRP) side by side with lbd; run as ``python bench/keepalived_lab.py``.

The code is lbd.testbed.keepalived_lab, shared with its smoke test in tests/netns: see its
docstring for the options and what is measured.
"""

import sys

from lbd.testbed.keepalived_lab import main

if __name__ == "__main__":
    sys.exit(main())
