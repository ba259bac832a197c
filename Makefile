# kvmpy: `make test` installs what is missing, builds, and runs the whole suite;
# `make run` boots the default guest.
PYTHON ?= python3
APT_PACKAGES = qemu-system-x86 qemu-utils libnbd-bin busybox-static e2fsprogs iproute2 acpica-tools \
               netcat-openbsd socat \
               gcc make binutils libffi-dev
STAMP = .build-stamp

.PHONY: all deps build guests guest test run bench fuzz clean

all: build

deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	    dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	@$(PYTHON) -c "import cffi, pytest, hypothesis, unicorn, capstone, qemu.qmp, pyroute2, pytun" 2>/dev/null || \
	    $(PYTHON) -m pip install -q -r requirements-dev.txt

build:
	$(PYTHON) setup.py -q build_ext --inplace
	$(MAKE) -s -C tests/guests

guests:
	$(MAKE) -C tests/guests

guest: deps
	$(PYTHON) -m kvmpy guest build --out guest-cache

test: deps build
	$(PYTHON) -m pytest -q -ra tests

run: deps build
	@if [ -n "$(RUN_ARGS)" ]; then $(PYTHON) -m kvmpy run $(RUN_ARGS); else \
	    $(PYTHON) -m kvmpy guest build --out guest-cache && $(PYTHON) -m kvmpy run guest-cache/vm.toml; fi

bench: deps build
	$(PYTHON) -m bench

# Every test that honours KVMPY_FUZZ explores ten times more (fresh random examples).
fuzz: deps build
	KVMPY_FUZZ=1 $(PYTHON) -m pytest -q -ra tests

clean:
	rm -rf build kvmpy/kvm/_kvm_cffi*.so kvmpy/_tcg*.so kvmpy/kvm/_kvm_cffi.c
	$(MAKE) -C tests/guests clean
