"""Shared fixtures: skip with a visible reason when KVM, root or a tool is missing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from hypothesis import settings

# CI explores a fixed set of examples (the same on every run, so a red CI is about
# the change, not the dice); `make fuzz` and local runs explore fresh ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI") and not os.environ.get("KVMPY_FUZZ"):
    settings.load_profile("ci")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST_DIR = os.path.join(ROOT, "tests", "guests", "build")

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# Test modules import the scaffolding in tests/support/ as `support`, from the repo
# root and in xdist workers alike, whatever pytest's import mode.
TESTS_DIR = os.path.join(ROOT, "tests")
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)


# `make test-quick`: the unit tests of models, parsers and the translator's pieces,
# under a minute on 2 cores. Every other module boots guests, runs QEMU or VM
# processes, or explores a long oracle, and is marked `guest` (new modules too,
# until they are listed here).
QUICK_MODULES = {
    "test_acpi", "test_block_badimage", "test_block_fuzz", "test_block_overlap", "test_block_probe",
    "test_block_errors", "test_block_qcow2", "test_boot",
    "test_config", "test_device_state", "test_events", "test_hmp", "test_hv_protocol", "test_i8042", "test_ide",
    "test_ioapic", "test_nbd_protocol",
    "test_irqchip", "test_kvm_api", "test_lapic", "test_legacy", "test_pc_table", "test_pci", "test_pic",
    "test_pit", "test_plugin_virtio_rng", "test_procfs", "test_qmp", "test_qmp_statevm", "test_rtc",
    "test_serial", "test_tcg_build", "test_usernet_unit", "test_virtiofs_unit",
    "test_tcg_robustness", "test_tcg_smp", "test_tcg_system", "test_tcg_x87", "test_virtio_pci",
    "test_virtio_queue", "test_virtio_state", "test_qemu_cli",
}


# tests/nested/ runs inside the nested-KVM L1 only; on the host each of its checks
# is reported by name through tests/test_nested_kvm.py, which boots the L1.
if os.environ.get("KVMPY_NESTED_L1") != "1":
    collect_ignore_glob = ["nested/*"]


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rpartition(".")[2] not in QUICK_MODULES:
            item.add_marker(pytest.mark.guest)


def _kvm_reason() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm is missing on this host"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not accessible to this user"
    try:
        from kvmpy.hv.kvm.api import Kvm
        Kvm().close()
    except Exception as e:  # noqa: BLE001 - any failure means: skip with the reason
        return f"KVM cannot be opened: {e}"
    return None


KVM_SKIP_REASON = _kvm_reason()


@pytest.fixture
def kvm_required():
    if KVM_SKIP_REASON:
        pytest.skip(KVM_SKIP_REASON)


@pytest.fixture
def root_required():
    if os.geteuid() != 0:
        pytest.skip("needs root")


@pytest.fixture
def netns():
    """A network namespace of our own (deleted afterwards): the only place test traffic goes."""
    import uuid
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespace, tap, bridge)")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("/dev/net/tun is missing")
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        pytest.skip("iproute2 'ip netns' is not available")
    name = f"kvmpytest-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                        "net.ipv6.conf.default.disable_ipv6=1"], capture_output=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def guest_path(name: str) -> str:
    path = os.path.join(GUEST_DIR, f"{name}.elf")
    if not os.path.exists(path):
        pytest.fail(f"test guest {path} is missing: run `make -C tests/guests`")
    return path


def tool_required(name: str) -> str:
    path = shutil.which(name)
    if not path:
        pytest.skip(f"{name} is not installed")
    return path


def run_kvmpy(args: list[str], timeout: float = 60, input: bytes | None = None,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python3 -m kvmpy ARGS`` and return the completed process (bytes output)."""
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    if env:
        e.update(env)
    return subprocess.run([sys.executable, "-m", "kvmpy", *args], cwd=ROOT, env=e,
                          input=input if input is not None else b"", capture_output=True, timeout=timeout)
