#!/bin/bash
# The README's two commands on a fresh Debian 12 machine, as root:
#   bash run.sh lab    - run lbd's main job
#   bash run.sh test   - install everything and run lint, types and all tests
# A fresh Debian may lack make; everything else is installed by the Makefile.
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v make >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq make
fi
exec make "${1:-lab}"
