"""Many lbd peers in one process (cost.py's large clusters); python bench/peer_emulator.py.

The code is lbd.testbed.peer_emulator, shared with its smoke test in tests/netns: see its
docstring for the options and what is measured.
"""

import sys

from lbd.testbed.peer_emulator import main

if __name__ == "__main__":
    sys.exit(main())
