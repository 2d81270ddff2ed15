# Targets behind the README's two commands (bash run.sh lab|test, which installs make first):
#   make lab   - run lbd's main job (a live cluster demo on this machine)
#   make test  - install everything (apt packages, venv) and run lint, types, tests
#   make deb   - build dist/lbd_<version>_all.deb (debhelper + pybuild, as Debian does)
# Both are idempotent and need root on a Debian 12 machine.
#   make check - the fast loop, no root needed once the venv exists: ruff check,
#                ruff format --check, mypy, and the tests marked neither netns, root nor slow

VENV      ?= .venv
PY        := $(VENV)/bin/python
# The runtime libraries are Debian 12's own (the .deb depends on the same ones):
# the venv sees them through --system-site-packages, so the tests run on exactly
# the versions a packaged install runs on.
APT_PKGS  := python3 python3-venv python3-pip python3-nftables nftables systemd \
             iproute2 tcpdump conntrack keepalived procps \
             python3-pyroute2 python3-msgpack python3-cryptography python3-numpy \
             qemu-system-x86 busybox-static kmod
DEB_PKGS  := debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools \
             dpkg-dev
DIST      ?= dist
STAMP     := $(VENV)/.installed

.PHONY: lab test deps deb-deps deb vm-kernel lint typecheck pytest bench clean

lab: $(STAMP)
	$(VENV)/bin/lbd lab

test: $(STAMP) vm-kernel lint typecheck pytest

# apt-get install whichever of the packages $(1) are missing.
define apt_install
	@missing=""; for p in $(1); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
endef

deps:
	$(call apt_install,$(APT_PKGS))

deb-deps:
	$(call apt_install,$(DEB_PKGS))

# Debian 12's own kernel, unpacked (not installed) for tests/netns/test_vlan_vm.py,
# which boots it in qemu: this machine's kernel cannot make VLAN devices. The
# modules' index is built here because the guest has no depmod of its own to run.
VM_DIR    := build/vm
vm-kernel: $(VM_DIR)/.ready
$(VM_DIR)/.ready: | deps
	rm -rf $(VM_DIR) && mkdir -p $(VM_DIR)
	cd $(VM_DIR) && for attempt in lists-as-they-are updated-lists; do \
	  pkg=$$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $$2; exit}'); \
	  test -n "$$pkg" && apt-get download -q "$$pkg" && break; \
	  test $$attempt = updated-lists && { echo "vm-kernel: cannot download Debian's kernel" >&2; exit 1; }; \
	  apt-get update -qq; \
	done; \
	dpkg-deb -x "$$pkg"_*.deb root && rm -f "$$pkg"_*.deb
	depmod -b $(VM_DIR)/root $$(ls $(VM_DIR)/root/lib/modules)
	touch $@

# Built in a copy of the tree (build/deb/lbd), so that dpkg-buildpackage's
# output (which it writes to the parent directory) and debhelper's scratch files
# stay out of the checkout; the .deb ends in $(DIST)/.
deb: | deb-deps
	rm -rf build/deb && mkdir -p build/deb/lbd $(DIST)
	tar -cf - --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./$(DIST) \
	  --exclude='*.egg-info' --exclude=__pycache__ --exclude=.mypy_cache \
	  --exclude=.pytest_cache --exclude=.ruff_cache --exclude=.hypothesis . \
	  | tar -xf - -C build/deb/lbd
	# Debian's own tool chain, even where PATH puts another python3 first.
	cd build/deb/lbd && env PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b
	rm -f $(DIST)/lbd_*_all.deb
	mv build/deb/lbd_*_all.deb $(DIST)/
	@ls -l $(DIST)/lbd_*_all.deb

# Debian's python3-nftables binding only imports from /usr/bin/python3, so the
# venv is built on it with system site packages; the dependency floors are
# Debian 12's versions, so pip keeps Debian's copies instead of fetching newer ones.
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
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build/deb $(DIST)
