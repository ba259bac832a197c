"""The cffi KVM layer against the real /dev/kvm: ioctls, exits, registers, kick."""

from __future__ import annotations

import threading
import time

import pytest

from kvmpy.hv.kvm.api import Kvm, KvmError
from kvmpy.hv.kvm._kvm_cffi import ffi
from kvmpy.memory import GuestMemory
from kvmpy.hv import exits

pytestmark = pytest.mark.usefixtures("kvm_required")


@pytest.fixture
def real_mode_vm():
    kvm = Kvm()
    vm = kvm.create_vm()
    vm.set_tss_addr(0xFFFBD000)
    vm.create_irqchip()
    mem = GuestMemory.anonymous([(0, 0x10000)])   # 64 KiB: anything above is MMIO
    region = mem.regions[0]
    vm.set_user_memory_region(0, 0, region.size, int(ffi.cast("uintptr_t", ffi.from_buffer(region.mm))))
    vcpu = vm.create_vcpu(0)

    def start(code: bytes, at: int = 0x1000):
        mem.write(at, code)
        s = vcpu.get_sregs()
        s.cs.base, s.cs.selector = 0, 0
        vcpu.set_sregs(s)
        r = vcpu.get_regs()
        r.rip, r.rflags = at, 2
        vcpu.set_regs(r)
        return vcpu

    yield start, mem, vm
    vm.close()
    mem.close()
    kvm.close()


def test_api_version_and_capabilities():
    kvm = Kvm()
    try:
        assert kvm.api_version == 12
        caps = kvm.capabilities()
        assert caps["IRQCHIP"] and caps["USER_MEMORY"]
        assert kvm.max_vcpus() >= 1
        cpuid = kvm.supported_cpuid()
        assert any(leaf[0] == 0 for leaf in cpuid) and any(leaf[0] == 1 for leaf in cpuid)
    finally:
        kvm.close()


def test_failing_ioctl_names_itself():
    kvm = Kvm()
    vm = kvm.create_vm()
    try:
        with pytest.raises(KvmError) as info:
            vm.set_user_memory_region(0, 0x123, 0x1000, 0x1000)   # unaligned guest address
        assert "KVM_SET_USER_MEMORY_REGION" in str(info.value)
        assert info.value.errno != 0
    finally:
        vm.close()
        kvm.close()


def test_port_out_and_in_exits(real_mode_vm):
    start, mem, vm = real_mode_vm
    # mov dx,0x3f8; mov al,'K'; out dx,al; in al,dx; mov [0x2000],al; mov al,1; out 0xf4,al
    code = bytes([0xBA, 0xF8, 0x03, 0xB0, 0x4B, 0xEE, 0xEC, 0xA2, 0x00, 0x20, 0xB0, 0x01, 0xE6, 0xF4])
    vcpu = start(code)
    assert vcpu.run() == exits.EXIT_IO
    assert (vcpu.io_port, vcpu.io_size, vcpu.io_write, bytes(vcpu.io_data)) == (0x3F8, 1, True, b"K")
    assert vcpu.run() == exits.EXIT_IO
    assert (vcpu.io_port, vcpu.io_write) == (0x3F8, False)
    vcpu.io_data[:] = b"\x5a"
    assert vcpu.run() == exits.EXIT_IO
    assert vcpu.io_port == 0xF4 and bytes(vcpu.io_data) == b"\x01"
    assert mem.read(0x2000, 1) == b"\x5a"


def test_rep_outsb_reports_count(real_mode_vm):
    start, mem, vm = real_mode_vm
    mem.write(0x3000, b"hello")
    # mov si,0x3000; mov cx,5; mov dx,0x3f8; cld; rep outsb; mov al,0; out 0xf4,al
    code = bytes([0xBE, 0x00, 0x30, 0xB9, 0x05, 0x00, 0xBA, 0xF8, 0x03, 0xFC, 0xF3, 0x6E, 0xB0, 0x00, 0xE6, 0xF4])
    vcpu = start(code)
    seen = b""
    while True:
        assert vcpu.run() == exits.EXIT_IO
        if vcpu.io_port == 0xF4:
            break
        assert vcpu.io_port == 0x3F8 and vcpu.io_write
        seen += bytes(vcpu.io_data)
    assert seen == b"hello"


def test_mmio_read_outside_ram(real_mode_vm):
    start, mem, vm = real_mode_vm
    # mov ax,0x2000; mov ds,ax; mov eax,[0x10] (guest physical 0x20010: no RAM there);
    # xor bx,bx; mov ds,bx; mov [0x4000],eax; mov al,0; out 0xf4,al
    code = bytes([0xB8, 0x00, 0x20, 0x8E, 0xD8, 0x66, 0xA1, 0x10, 0x00,
                  0x31, 0xDB, 0x8E, 0xDB, 0x66, 0xA3, 0x00, 0x40, 0xB0, 0x00, 0xE6, 0xF4])
    vcpu = start(code)
    assert vcpu.run() == exits.EXIT_MMIO
    assert (vcpu.mmio_addr, vcpu.mmio_size, vcpu.mmio_write) == (0x20010, 4, False)
    vcpu.mmio_data[:] = (0xCAFEF00D).to_bytes(4, "little")
    assert vcpu.run() == exits.EXIT_IO and vcpu.io_port == 0xF4
    assert mem.read_u32(0x4000) == 0xCAFEF00D


def test_kick_interrupts_a_spinning_guest(real_mode_vm):
    start, mem, vm = real_mode_vm
    vcpu = start(bytes([0xEB, 0xFE]))   # jmp $
    result = {}

    def runner():
        result["kind"] = vcpu.run()

    t = threading.Thread(target=runner)
    t.start()
    time.sleep(0.2)
    vcpu.kick()
    t.join(5)
    assert not t.is_alive(), "kick did not bring the vCPU out of KVM_RUN"
    assert result["kind"] == exits.EXIT_INTR


def test_regs_and_msrs_round_trip(real_mode_vm):
    start, mem, vm = real_mode_vm
    vcpu = start(bytes([0xF4]))
    r = vcpu.get_regs()
    r.rax, r.r15 = 0x1122334455667788, 42
    vcpu.set_regs(r)
    r2 = vcpu.get_regs()
    assert (r2.rax, r2.r15) == (0x1122334455667788, 42)
    vcpu.set_msrs({0xC0000102: 0xFFFF800000001000})
    assert vcpu.get_msrs([0xC0000102]) == {0xC0000102: 0xFFFF800000001000}
    with pytest.raises(KvmError):
        vcpu.set_msrs({0xDEADBEEF: 1})


def test_cpuid_announces_tsc_deadline_only_when_kvm_has_it():
    from kvmpy.hv.kvm.cpu_setup import CPUID_1_ECX_TSC_DEADLINE, cpuid_for_vcpu
    supported = [(1, 0, 0, 0, 0, 0, 0), (0xB, 0, 1, 0, 0, 0, 0)]
    leaf1 = lambda table: next(e for e in table if e[0] == 1)  # noqa: E731
    assert not leaf1(cpuid_for_vcpu(supported, 0, 1))[5] & CPUID_1_ECX_TSC_DEADLINE
    assert leaf1(cpuid_for_vcpu(supported, 0, 1, tsc_deadline=True))[5] & CPUID_1_ECX_TSC_DEADLINE
