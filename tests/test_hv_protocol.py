"""The accelerators against their declared protocols (kvmpy.hv.protocol), the machine
against the vCPU loop's (VcpuHost), and the direction of imports between them.

Every member a Protocol declares must exist on every implementation: callers use
them without asking (no getattr), so a missing one would only show up as an
AttributeError on the one path that needs it.
"""

from __future__ import annotations

import ast
import os
import typing

import pytest

from conftest import KVM_SKIP_REASON, ROOT, guest_path
from kvmpy.config import VmConfig
from kvmpy.events import EventLoop
from kvmpy.devices.bus import Bus
from kvmpy.hv import protocol
from kvmpy.memory import GuestMemory
from kvmpy.vcpu.runner import VcpuHost

MiB = 1 << 20


def declared_members(proto: type) -> set[str]:
    """Attributes and methods ``proto`` and the protocols it extends declare."""
    names: set[str] = set()
    for klass in proto.__mro__:
        if klass in (typing.Protocol, typing.Generic, object):
            continue
        names |= set(vars(klass).get("__annotations__", {}))
        names |= {n for n, v in vars(klass).items() if callable(v) and not n.startswith("_")}
    return names


def missing(obj: object, proto: type) -> list[str]:
    return sorted(n for n in declared_members(proto) if not hasattr(obj, n))


class Host:
    """The least an accelerator is built from (protocol.AccelHost)."""

    def __init__(self, cpus: int = 2) -> None:
        self.cfg = VmConfig(cpus=cpus, memory=64 * MiB)
        self.memory = GuestMemory.anonymous([(0, 64 * MiB)])
        self.pio_bus = Bus("pio")
        self.mmio_bus = Bus("mmio")
        self.events = EventLoop(name="test-host-events")


def check_accel(accel) -> None:
    assert missing(accel, protocol.Accel) == []
    assert missing(accel.platform, protocol.Platform) == []
    for vcpu in accel.vcpus:
        assert missing(vcpu, protocol.Vcpu) == []
    if accel.port_write_queue is not None:
        assert missing(accel.port_write_queue, protocol.PortWriteQueue) == []
    if accel.published_port_reads is not None:
        assert missing(accel.published_port_reads, protocol.PublishedPortReads) == []
    # the loop's once-per-thread decisions read these as plain booleans
    assert isinstance(accel.software_doorbells, bool)
    assert isinstance(accel.needs_before_guest_entry, bool)
    assert type(accel.phys_bits) is int and 32 <= accel.phys_bits <= 52


def test_the_protocols_declare_what_their_callers_use():
    assert {"run", "kick", "io_data", "mmio_data", "get_regs", "set_sregs", "get_msrs"} <= declared_members(protocol.Vcpu)
    assert {"doorbell_write", "set_irq_level", "msi_eventfd", "add_doorbell"} <= declared_members(protocol.Platform)
    assert {"timer_wheel", "port_write_queue", "vcpu_thread_started", "before_guest_entry", "wait_halted",
            "load_boot_state", "reset", "close"} <= declared_members(protocol.Accel)


def test_translator_implements_the_accelerator_protocol():
    pytest.importorskip("kvmpy._tcg")
    from kvmpy.hv.tcg.accel import TcgAccel
    host = Host()
    accel = TcgAccel(host)
    try:
        check_accel(accel)
        assert accel.timer_wheel is not None and accel.port_write_queue is not None
        # the C core rings doorbells itself (TranslatorPlatform): no write reaches the loop
        assert not accel.software_doorbells and accel.needs_before_guest_entry
        fd = accel.platform.add_doorbell(0xC000, 2, None, False)
        assert accel.platform.doorbell_write(0xC000, 2, 0, False) is False
        accel.platform.remove_doorbell(fd)
        from kvmpy.hv.kvm.cpu_setup import announced_phys_bits
        from kvmpy.hv.tcg.accel import translator_cpuid
        assert announced_phys_bits(translator_cpuid(2)) == accel.phys_bits == 40, "QEMU's TCG default"
    finally:
        accel.close()
        host.memory.close()


def test_kvm_implements_the_accelerator_protocol():
    if KVM_SKIP_REASON:
        pytest.skip(KVM_SKIP_REASON)
    from kvmpy.hv.kvm.accel import KvmAccel
    host = Host()
    accel = KvmAccel(host)
    try:
        check_accel(accel)
        assert accel.timer_wheel is None and accel.published_port_reads is not None
        assert not accel.software_doorbells and not accel.needs_before_guest_entry
        from kvmpy.hv.kvm.cpu_setup import announced_phys_bits
        assert accel.phys_bits == announced_phys_bits(accel.kvm.supported_cpuid()), "the host's, as KVM passes it"
        # ioeventfds take doorbell writes in the kernel: none ever reaches the loop
        fd = accel.platform.add_doorbell(0xC000, 2, None, True)
        assert accel.platform.doorbell_write(0xC000, 2, 0, True) is False
        accel.platform.remove_doorbell(fd)
    finally:
        accel.close()
        host.memory.close()


def test_machine_is_a_vcpu_host():
    pytest.importorskip("kvmpy._tcg")
    from kvmpy.machine import Machine
    m = Machine(VmConfig(accel="tcg", memory=64 * MiB, kernel=guest_path("hello")))
    try:
        assert missing(m, VcpuHost) == []
        assert m.trace_exits is False
    finally:
        m.close()


def test_select_refuses_an_unknown_accelerator():
    from kvmpy.errors import ConfigError
    from kvmpy.hv.select import make_accel
    with pytest.raises(ConfigError, match="unknown accelerator 'xen'"):
        make_accel("xen", Host())


# --- the direction of imports ---------------------------------------------------------

def _module_imports() -> dict[str, set[str]]:
    """kvmpy module -> the kvmpy modules it imports anywhere (lazily and for typing too)."""
    top = os.path.join(ROOT, "kvmpy")
    paths = {}
    for dirpath, _, files in os.walk(top):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                paths[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in paths}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1])
                    source = base + ("." + node.module if node.module else "")
                else:
                    source = node.module or ""
                for a in node.names:
                    full = f"{source}.{a.name}"
                    deps.add(full if full in paths else source)
        graph[name] = {d for d in deps if d in paths} - {name}
    return graph


def _under(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_imports_go_one_way():
    graph = _module_imports()
    bad = []
    for name, deps in graph.items():
        for dep in deps:
            if _under(name, "kvmpy.devices") and _under(dep, "kvmpy.hv", "kvmpy.vcpu", "kvmpy.machine"):
                bad.append((name, dep))
            if _under(name, "kvmpy.hv") and _under(dep, "kvmpy.vcpu", "kvmpy.machine"):
                bad.append((name, dep))
            if _under(name, "kvmpy.vcpu") and _under(dep, "kvmpy.machine"):
                bad.append((name, dep))
    assert bad == []


def test_no_import_circle_through_the_accelerators_or_the_loop():
    graph = _module_imports()

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            for dep in graph[todo.pop()]:
                if dep == goal:
                    return True
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return False

    ours = [n for n in graph if _under(n, "kvmpy.hv", "kvmpy.vcpu", "kvmpy.machine")]
    assert [n for n in ours if reaches(n, n)] == []


# A literal getattr/hasattr in kvmpy asks whether something has a member; where that
# something is ours, the member belongs in its declaration (a Protocol or a base-class
# default) instead. What remains asks the platform or a library, or reads a label.
PROBES_ALLOWED = {
    ("kvmpy/block/direct.py", "statx"): "libc's statx is missing from glibc before 2.28",
    ("kvmpy/devices/virtio/fuse_server.py", "O_TMPFILE"): "the os module has it only where the platform does",
    ("kvmpy/memory.py", "MAP_NORESERVE"): "the mmap module's constants depend on the Python version",
    ("kvmpy/memory.py", "MADV_HUGEPAGE"): "the mmap module's constants depend on the Python version",
    ("kvmpy/memory.py", "MADV_DONTFORK"): "the mmap module's constants depend on the Python version",
    ("kvmpy/tap/__init__.py", "code"): "pyroute2's exceptions, not ours, carry the netlink error code",
    ("kvmpy/vcpu/profile.py", "name"): "a device's label in the report; a plug-in device need not name itself",
}


def test_no_member_of_ours_is_found_by_getattr():
    found = set()
    for dirpath, _dirs, files in os.walk(os.path.join(ROOT, "kvmpy")):
        for filename in files:
            if not filename.endswith(".py"):
                continue
            path = os.path.join(dirpath, filename)
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                        and node.func.id in ("getattr", "hasattr") and len(node.args) >= 2
                        and isinstance(node.args[1], ast.Constant)):
                    found.add((os.path.relpath(path, ROOT), node.args[1].value, node.lineno))
    unexplained = sorted(f"{path}:{line}: {name}" for path, name, line in found
                         if (path, name) not in PROBES_ALLOWED)
    assert unexplained == [], "declare these members instead of probing for them: " + ", ".join(unexplained)
    stale = set(PROBES_ALLOWED) - {(path, name) for path, name, _line in found}
    assert not stale, f"allowed probes that are gone: {sorted(stale)}"
