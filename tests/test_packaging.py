"""`pip install .` gives a complete kvmpy: a fresh virtualenv, the checkout installed
into it (the cffi module and the C translator built by pip), and the `kvmpy` command
run from outside the tree, where nothing of the checkout is importable."""
# The native parts: the KVM cffi module, the translator, the vCPU loop's claimed-access
# server (kvmpy.vcpu._claimed), libslirp's cffi module (kvmpy.net._slirp_cffi, user-mode
# networking) and the two virtio data planes.

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import KVM_SKIP_REASON, ROOT, guest_path

# one pip install for the module, on one xdist worker
pytestmark = pytest.mark.xdist_group("packaging")

# What a source tree holds that an install must not lean on: built artefacts,
# the developer's venv, caches.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "*.so", "*.o", "*.d", "__pycache__",
                                    "*.egg-info", ".hypothesis", ".pytest_cache", "guest-cache",
                                    "_kvm_cffi.c", "_slirp_cffi.c", "_dataplane_cffi.c", "_netplane_cffi.c")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv with kvmpy pip-installed from a copy of the checkout's sources."""
    base = tmp_path_factory.mktemp("pkg")
    src = base / "src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
    venv = base / "venv"
    base_python = getattr(sys, "_base_executable", sys.executable)
    r = subprocess.run([base_python, "-m", "venv", str(venv)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot make a virtualenv with {base_python}: {r.stderr.strip()[-300:]}")
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                          "--disable-pip-version-check", str(src)],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-3000:]
    return venv


def kvmpy_command(venv, args, cwd, timeout=120):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(venv / "bin" / "kvmpy"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_installed_package_has_its_native_parts(installed, tmp_path):
    py = installed / "bin" / "python"
    r = subprocess.run([str(py), "-c", "import kvmpy, kvmpy._tcg, kvmpy.vcpu._claimed, kvmpy.hv.kvm._kvm_cffi, kvmpy.net._slirp_cffi; "
                        "from kvmpy.devices.virtio import dataplane; assert dataplane.available(), "
                        "dataplane.unavailable_reason(); from kvmpy.devices.virtio import netplane; "
                        "assert netplane.available(), netplane.unavailable_reason(); print(kvmpy.__file__)"],
                       cwd=tmp_path, capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
    assert r.returncode == 0, r.stderr
    # imported from the venv, not from the checkout
    assert r.stdout.strip().startswith(str(installed)), r.stdout


def test_installed_kvmpy_info_kvm(installed, tmp_path):
    r = kvmpy_command(installed, ["info", "kvm", "--json"], cwd=tmp_path)
    info = json.loads(r.stdout)
    assert "verdict" in info and "backend" in info, r.stdout
    if KVM_SKIP_REASON:
        assert r.returncode != 0, r.stdout
    else:
        assert r.returncode == 0, r.stdout + r.stderr


def test_installed_kvmpy_runs_a_guest_on_the_translator(installed, tmp_path):
    kernel = tmp_path / "hello.elf"
    shutil.copy(guest_path("hello"), kernel)
    r = kvmpy_command(installed, ["run", "--accel", "tcg", "-m", "64", "--kernel", str(kernel),
                                  "--append", "from-outside"], cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Hello from kvmpy test guest" in r.stdout
    assert "cmdline: from-outside" in r.stdout


def test_installed_kvmpy_runs_a_guest_under_kvm(installed, tmp_path):
    if KVM_SKIP_REASON:
        pytest.skip(KVM_SKIP_REASON)
    kernel = tmp_path / "hello.elf"
    shutil.copy(guest_path("hello"), kernel)
    r = kvmpy_command(installed, ["run", "--enable-kvm", "-m", "64", "--kernel", str(kernel)], cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.rstrip().endswith("guest: done"), r.stdout[-2000:]


def test_installed_kvmpy_system_x86_64_runs_a_guest(installed, tmp_path):
    """The QEMU-spelling entry point is installed beside `kvmpy`."""
    kernel = tmp_path / "hello.elf"
    shutil.copy(guest_path("hello"), kernel)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = subprocess.run([str(installed / "bin" / "kvmpy-system-x86_64"), "-accel", "tcg", "-m", "64", "-nographic",
                        "-kernel", str(kernel), "-append", "from-qemu-spelling"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "cmdline: from-qemu-spelling" in r.stdout
