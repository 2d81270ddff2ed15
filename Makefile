# Targets behind the README's two commands (bash run.sh lab|test, which installs make first):
#   make lab   - run lbd's main job (a live cluster demo on this machine)
#   make test  - install everything (apt packages, venv) and run lint, types, tests
# Both are idempotent and need root on a Debian 12 machine.

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

lint: $(STAMP)
	$(VENV)/bin/ruff check .

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
