# kvmpy: `make test` installs what is missing, builds, and runs the whole suite;
# `make run` boots the default guest.
#
# Everything Python runs from a project virtualenv (.venv) made with $(PYTHON), so
# nothing is ever installed into the system interpreter (Debian's python3 is
# "externally managed", PEP 668). `make test PYTHON=/usr/bin/python3` picks the
# interpreter; the venv is made again when it changes.
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
# pytest-xdist workers (0: one process). A module whose tests share one costly fixture
# (an L1 boot, a pip install) is one xdist_group, so one worker runs it all.
TEST_WORKERS ?= auto
APT_PACKAGES = qemu-system-x86 qemu-utils libnbd-bin python3-libnbd busybox-static e2fsprogs iproute2 acpica-tools \
               netcat-openbsd socat xorriso seabios qemu-system-data ovmf \
               console-setup-linux x11proto-dev chromium \
               gcc make binutils libffi-dev linux-libc-dev python3-venv python3-dev
# user-mode networking (kvmpy.net._slirp_cffi is built against it)
APT_PACKAGES += libslirp-dev
# smb=DIR on a user NIC runs smbd (tests/test_usernet_smb.py)
APT_PACKAGES += samba
# the virtio-blk data plane's io_uring (kvmpy/devices/virtio/_dataplane_build.py links liburing)
APT_PACKAGES += liburing-dev
# the cache-mode tests watch a flush's system calls (tests/test_blk_cache.py)
APT_PACKAGES += strace

.PHONY: all deps venv build guests guest test test-quick run bench fuzz clean distclean novnc test-tcg-modes

all: build

# boot media tests: grub-mkrescue's BIOS and UEFI images (with xorriso above)
APT_PACKAGES += grub-pc-bin grub-efi-amd64-bin mtools

deps: venv
	@missing=""; for p in $(APT_PACKAGES); do \
	    dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	@if [ ! -f $(VENV)/.deps-stamp ] || [ requirements-dev.txt -nt $(VENV)/.deps-stamp ] \
	        || [ pyproject.toml -nt $(VENV)/.deps-stamp ] || [ setup.py -nt $(VENV)/.deps-stamp ]; then \
	    echo "installing Python packages into $(VENV)"; \
	    $(VPY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt && \
	    $(VPY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . && \
	    touch $(VENV)/.deps-stamp; \
	fi

# The venv records which interpreter made it; another PYTHON= makes it anew.
# python3-venv is the one Debian package this step needs before `deps` can run apt.
venv:
	@base="$$($(PYTHON) -c 'import sys; print(sys.executable, sys.version.split()[0])')" || exit 1; \
	if [ ! -x $(VPY) ] || [ "$$(cat $(VENV)/.base-python 2>/dev/null)" != "$$base" ]; then \
	    if ! $(PYTHON) -c 'import ensurepip, venv' 2>/dev/null; then \
	        echo "$(PYTHON) cannot make a virtualenv: installing python3-venv"; \
	        if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	        $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq python3-venv || exit 1; \
	    fi; \
	    echo "creating $(VENV) with $$base"; \
	    $(PYTHON) -m venv --clear $(VENV) && echo "$$base" > $(VENV)/.base-python; \
	fi

build: deps
	$(VPY) setup.py -q build_ext --inplace
	$(MAKE) -s -C tests/guests
	$(MAKE) -s novnc

# The browser console's RFB client: noVNC's library (MPL-2.0) from npm, vendored once
# into kvmpy/display/novnc (not in git; kvmpy never fetches it at run time).
NOVNC_VERSION = 1.4.0
NOVNC_DIR = kvmpy/display/novnc
novnc: $(NOVNC_DIR)/.version-$(NOVNC_VERSION)
$(NOVNC_DIR)/.version-$(NOVNC_VERSION):
	@if ! command -v npm >/dev/null; then echo "npm not found: the browser console (websocket=) has no noVNC"; exit 0; fi; \
	tmp=$$(mktemp -d); \
	if (cd $$tmp && npm pack -q @novnc/novnc@$(NOVNC_VERSION) >/dev/null) && \
	   rm -rf $(NOVNC_DIR) && mkdir -p $(NOVNC_DIR) && \
	   tar -xzf $$tmp/novnc-novnc-$(NOVNC_VERSION).tgz -C $(NOVNC_DIR) --strip-components=1 \
	       package/core package/vendor package/LICENSE.txt package/AUTHORS; then \
	    touch $@; \
	else echo "could not fetch noVNC from npm: the browser console (websocket=) has no page"; \
	    rm -rf $(NOVNC_DIR); fi; rm -rf $$tmp

guests:
	$(MAKE) -C tests/guests

guest: build
	$(VPY) -m kvmpy guest build --out guest-cache

test: build
	$(VPY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadgroup tests

# Unit tests only: no guest boots, no QEMU, no images bigger than a few MiB.
test-quick: build
	$(VPY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadgroup -m "not guest" tests

run: build
	@if [ -n "$(RUN_ARGS)" ]; then $(VPY) -m kvmpy run $(RUN_ARGS); else \
	    $(VPY) -m kvmpy guest build --out guest-cache && $(VPY) -m kvmpy run guest-cache/vm.toml; fi

bench: build
	$(VPY) -m bench

# Every test that honours KVMPY_FUZZ explores ten times more (fresh random examples).
# The translator's tests in the native tier's other two modes (make test runs the
# default, blocks compiled once hot): every block compiled before its first run, and none.
TCG_MODE_TESTS = tests/test_tcg_oracle.py tests/test_tcg_oracle_mmx.py tests/test_tcg_oracle_x87.py \
	tests/test_tcg_guests.py tests/test_tcg_smp.py tests/test_tcg_system.py tests/test_tcg_native.py
test-tcg-modes: build
	KVMPY_TCG_NATIVE_THRESHOLD=0 $(VPY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadgroup $(TCG_MODE_TESTS)
	KVMPY_TCG_NATIVE_THRESHOLD=off $(VPY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadgroup $(TCG_MODE_TESTS)

fuzz: build
	KVMPY_FUZZ=1 $(VPY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadgroup tests

clean:
	rm -rf build kvmpy/hv/kvm/_kvm_cffi*.so kvmpy/_tcg*.so kvmpy/vcpu/_claimed*.so kvmpy/net/_slirp_cffi*.so \
		kvmpy/devices/virtio/_dataplane_cffi*.so kvmpy/devices/virtio/_netplane_cffi*.so
	$(MAKE) -C tests/guests clean

distclean: clean
	rm -rf $(VENV) *.egg-info
