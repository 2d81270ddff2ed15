# Targets behind the README's two commands (bash run.sh lab|test, which installs make first):
#   make lab   - run lbd's main job (a live cluster demo on this machine)
#   make test  - install everything (apt packages, venv) and run lint, types, tests
# Both are idempotent and need root on a Debian 12 machine.
#   make check - the fast loop, no root needed once the venv exists: ruff check,
#                ruff format --check, mypy, and the tests marked neither netns, root nor slow

VENV      ?= .venv
PY        := $(VENV)/bin/python
APT_PKGS  := python3 python3-venv python3-pip python3-nftables nftables systemd \
             iproute2 tcpdump conntrack keepalived procps
STAMP     := $(VENV)/.installed

.PHONY: lab test deps lint typecheck pytest bench clean

lab: $(STAMP)
	$(VENV)/bin/lbd lab

test: $(STAMP) lint typecheck pytest

deps:
	@missing=""; for p in $(APT_PKGS); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# Debian's python3-nftables binding only imports from /usr/bin/python3, so the
# venv is built on it with system site packages; pinned minimums make pip put
# current msgpack/cryptography into the venv instead of Debian's older copies.
$(STAMP): pyproject.toml | deps
	/usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The fast loop, as any user once the venv exists: never installs anything (that needs
# root), writes nothing in the checkout when it cannot (mypy's cache then goes unused),
# and runs every step even after one fails (-k), to show all that is wrong at once; two
# at a time (-j2: mypy beside pytest), each step's output kept together.
.PHONY: check check-ruff check-format check-mypy check-pytest
CHECK_MARKS := not netns and not root and not slow
check:
	@test -x $(VENV)/bin/pytest || { echo "make check: no venv in $(VENV);" \
	  "build it once, as root: make $(STAMP)" >&2; exit 2; }
	@$(MAKE) --no-print-directory -k -j2 --output-sync=target \
	  check-ruff check-format check-mypy check-pytest

check-ruff:
	$(VENV)/bin/ruff check --no-cache .

check-format:
	$(VENV)/bin/ruff format --check --no-cache --output-format concise .

check-mypy:
	@cache=.mypy_cache; [ -w $$cache ] || { [ -w . ] && [ ! -e $$cache ]; } || cache=/dev/null; \
	echo "$(VENV)/bin/mypy --cache-dir=$$cache"; $(VENV)/bin/mypy --cache-dir=$$cache

check-pytest:
	LBD_FUZZ_SCALE=0.1 $(VENV)/bin/pytest -q -p no:cacheprovider -m "$(CHECK_MARKS)"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check --output-format concise .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP)
	$(VENV)/bin/pytest -q

bench: $(STAMP)
	$(PY) bench/ownership.py --json
	$(PY) bench/wire.py --json
	$(PY) bench/failover_sim.py --json

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
