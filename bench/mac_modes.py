"""Which mac_mode works on which network; run as ``python bench/mac_modes.py``.

The code is lbd.testbed.mac_modes: see its docstring for the options and what is
measured.
"""

import sys

from lbd.testbed.mac_modes import main

if __name__ == "__main__":
    sys.exit(main())
