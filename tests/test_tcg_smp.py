"""SMP on the translator: several kvmpy._tcg CPUs, each run() in its own Python
thread (run() releases the GIL), on one guest RAM.

Locked read-modify-writes lose no update, page walks of one vCPU do not undo
another's page-table writes, code one vCPU translated is dropped when another
writes it, INIT/SIPI/NMI and the interrupt window behave like the hardware (and
KVM's in-kernel LAPIC), and the machine starts APs only through INIT-SIPI.
"""

from __future__ import annotations

import struct
import threading
import time

import pytest

from support.tcg import TcgVcpu, assemble, identity_map_2m, make_memory, regs, set_long_mode
from kvmpy.hv import exits

CODE = 0x100000
STACK = 0x90000
DATA = 0x200000          # its own 2 MiB page, never code


def long_cpus(mem, n: int, entry: int, stacks: int = STACK) -> list:
    cpus = []
    for i in range(n):
        v = TcgVcpu(mem, i)
        set_long_mode(v)
        v.set_regs(regs(rip=entry, rsp=stacks - i * 0x1000, rdi=i, rflags=2))
        cpus.append(v)
    return cpus


def run_all(cpus, timeout: float = 60) -> list[int]:
    """run() every CPU in its own thread at the same time; each until it leaves with
    something other than EXIT_INTR. A CPU still running at the timeout is kicked and
    reported as None."""
    results: list = [None] * len(cpus)
    start = threading.Barrier(len(cpus))
    stop = threading.Event()

    def go(k):
        start.wait()
        while True:
            kind = cpus[k].run()
            if kind != exits.EXIT_INTR or stop.is_set():
                results[k] = kind if not stop.is_set() else None
                return

    threads = [threading.Thread(target=go, args=(k,)) for k in range(len(cpus))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        stop.set()
        for v in cpus:
            v.kick()
        for t in threads:
            t.join(5)
    return results


@pytest.fixture
def memory():
    mem = make_memory(4 << 20)
    identity_map_2m(mem, 1)
    made = []
    yield mem, made
    for v in made:
        v.close()
    mem.close()


COUNTERS = """
    # rdi = cpu index; N iterations of every kind of atomic increment
        mov r8, {base}
        mov ecx, {n}
    loop:
        mov eax, 1
        lock xadd dword ptr [r8], eax          # counter 0
        lock inc qword ptr [r8 + 8]            # counter 1
        lock add dword ptr [r8 + 16], 1        # counter 2
    retry:                                     # counter 3: a cmpxchg loop, as C11 atomics do
        mov eax, dword ptr [r8 + 24]
        lea edx, [rax + 1]
        lock cmpxchg dword ptr [r8 + 24], edx
        jnz retry
    acquire:                                   # counter 4: plain inc under an xchg spinlock
        mov eax, 1
        xchg dword ptr [r8 + 32], eax
        test eax, eax
        jz locked
        pause
        jmp acquire
    locked:
        inc dword ptr [r8 + 40]
        mov dword ptr [r8 + 32], 0
        lock bts dword ptr [r8 + 48], edi      # every CPU sets its own bit
        dec ecx
        jnz loop
        hlt
    .balign 64
    counters:
        .fill 64, 1, 0
"""


@pytest.mark.parametrize("where,n,ncpus", [
    ("data page", 100000, 2),
    ("data page", 20000, 4),
    # the counters share the 4 KiB page of the running code: every locked write
    # invalidates the translation both vCPUs are executing
    ("code page", 1000, 2),
])
def test_locked_increments_lose_nothing(memory, where, n, ncpus):
    mem, made = memory
    code, syms = assemble(COUNTERS.format(base="OFFSET counters" if where == "code page" else DATA, n=n), CODE)
    mem.write(CODE, code)
    base = syms["counters"] if where == "code page" else DATA
    cpus = long_cpus(mem, ncpus, CODE)
    made.extend(cpus)
    assert run_all(cpus) == [exits.EXIT_HLT] * ncpus
    xadd, inc, add, cmpxchg = (mem.read_u32(base), mem.read_u64(base + 8), mem.read_u32(base + 16),
                               mem.read_u32(base + 24))
    spin, locked_inc, bits = mem.read_u32(base + 32), mem.read_u32(base + 40), mem.read_u32(base + 48)
    total = n * ncpus
    assert (xadd, inc, add, cmpxchg, locked_inc) == (total,) * 5
    assert spin == 0 and bits == (1 << ncpus) - 1
    if where == "code page":
        assert sum(v.stats()["invalidations"] for v in cpus) > 0


def test_page_walks_do_not_undo_page_table_writes(memory):
    """vCPU 1 walks a 4 KiB mapping over and over (invlpg; load), setting the accessed
    bit each time; vCPU 0 meanwhile clears that bit and counts in the PTE's ignored bits
    with locked RMWs. A walker that wrote back the entry it read would lose counts."""
    mem, made = memory
    PT = 0x9000
    mem.write_u64(0x3000 + 8 * 1, PT | 3)           # PD[1]: 2-4 MiB through a page table
    for i in range(512):
        mem.write_u64(PT + 8 * i, (0x200000 + (i << 12)) | 3)
    pte = PT + 8 * 5
    target = 0x200000 + (5 << 12)
    n = 1000000
    src = f"""
        test edi, edi
        jnz walker
    wait_walker:
        cmp byte ptr [started], 0
        je wait_walker
        mov ecx, {n}
    writer:
        lock and qword ptr [{pte}], -33                  # clear A
        mov rax, 1
        shl rax, 52
        lock add qword ptr [{pte}], rax                  # bits 52..58: count (ignored by the MMU)
        dec ecx
        jnz writer
        mov byte ptr [done], 1
        hlt
    walker:
        mov byte ptr [started], 1
    walk:
        inc r9
        invlpg [{target}]
        mov rax, qword ptr [{target}]
        cmp byte ptr [done], 0
        je walk
        hlt
    .balign 4096
    done:
        .byte 0
    started:
        .byte 0
    """
    code, syms = assemble(src, CODE)
    mem.write(CODE, code)
    cpus = long_cpus(mem, 2, CODE)
    made.extend(cpus)
    assert run_all(cpus) == [exits.EXIT_HLT] * 2
    assert cpus[1].get_regs().r9 > 100            # the walks overlapped the writes
    entry = mem.read_u64(pte)
    assert (entry >> 52) & 0x7F == n % 128
    assert entry & 0x000FFFFFFFFFF000 == target    # address and permissions intact
    assert entry & 3 == 3


def test_code_written_by_another_vcpu_is_retranslated(memory):
    """vCPU 0 spins on `mov eax, 0` it has translated; vCPU 1 rewrites the immediate.
    vCPU 1 wrote the same page before it became code, so it held a fast write
    permission for it, which it must drop once vCPU 0 marks the page as code."""
    mem, made = memory
    src = """
        test edi, edi
        jnz patcher
        mov byte ptr [ready], 1
    spin:
    patch:
        mov eax, 0
        test eax, eax
        jz spin
        hlt
    patcher:
        mov byte ptr [scratch], 1              # a write tag for the page while it is data
    wait:
        cmp byte ptr [ready], 0
        je wait
        mov ecx, 100000                        # let vCPU 0 spin in its translation a while
    delay:
        dec ecx
        jnz delay
        mov byte ptr [patch + 1], 7
        hlt
    ready:
        .byte 0
    scratch:
        .byte 0
    """
    code, syms = assemble(src, CODE)
    assert syms["patch"] >> 12 == syms["scratch"] >> 12 == syms["ready"] >> 12
    mem.write(CODE, code)
    cpus = long_cpus(mem, 2, CODE)
    made.extend(cpus)
    assert run_all(cpus, timeout=20) == [exits.EXIT_HLT] * 2
    assert cpus[0].get_regs().rax == 7
    assert cpus[0].stats()["invalidations"] >= 1


def test_dma_invalidation_reaches_a_running_vcpu(memory):
    """invalidate_ram from another thread while run() executes (how device DMA is
    reported) drops the translation the vCPU is looping in."""
    mem, made = memory
    code, syms = assemble("""
    spin:
        mov eax, 0
        test eax, eax
        jz spin
        hlt
    """, CODE)
    mem.write(CODE, code)
    (v,) = long_cpus(mem, 1, CODE)
    made.append(v)
    result = []
    t = threading.Thread(target=lambda: result.append(v.run()))
    t.start()
    time.sleep(0.1)
    mem.write(syms["spin"] + 1, struct.pack("<I", 3))    # behind the translator's back
    v.invalidate_ram(syms["spin"], 8)
    t.join(10)
    if t.is_alive():
        v.kick()
        t.join(5)
    assert result == [exits.EXIT_HLT]
    assert v.get_regs().rax == 3


# ---- INIT / SIPI ------------------------------------------------------------------

def test_ap_waits_for_sipi_then_starts_in_real_mode(memory):
    mem, made = memory
    code, _ = assemble("""
        mov ax, cs
        mov bx, 0x55
        hlt
    """, 0, bits=16)
    mem.write(0x9A000, code)
    ap = TcgVcpu(mem, 1, wait_sipi=True)
    made.append(ap)
    assert ap.wait_sipi
    for _ in range(3):
        assert ap.run() == exits.EXIT_HLT      # executes nothing, however often it is run
    assert ap.get_regs().rip == 0xFFF0
    ap.request_interrupt(0x40)                 # a waiting CPU drops interrupts and NMIs
    ap.request_nmi()
    assert ap.run() == exits.EXIT_HLT and ap.wait_sipi
    ap.request_sipi(0x9A)
    assert ap.run() == exits.EXIT_HLT
    assert not ap.wait_sipi
    r, sr = ap.get_regs(), ap.get_sregs()
    assert (sr.cs.selector, sr.cs.base) == (0x9A00, 0x9A000)
    assert r.rax & 0xFFFF == 0x9A00 and r.rbx & 0xFFFF == 0x55
    assert r.rip == len(code)
    assert sr.cr0 & 1 == 0
    # a second SIPI outside wait-for-SIPI is ignored
    ap.request_sipi(0x10)
    assert ap.run() == exits.EXIT_HLT
    assert ap.get_sregs().cs.base == 0x9A000


def test_init_returns_a_running_cpu_to_wait_for_sipi(memory):
    mem, made = memory
    code, syms = assemble("spin: inc rbx\n jmp spin", CODE)
    mem.write(CODE, code)
    (v,) = long_cpus(mem, 1, CODE)
    made.append(v)
    apic_base = v.get_msrs([0x1B])[0x1B]
    result = []
    t = threading.Thread(target=lambda: result.append(v.run()))
    t.start()
    time.sleep(0.05)
    v.request_init()                           # from another thread, while it runs
    t.join(10)
    assert result == [exits.EXIT_HLT]
    assert v.wait_sipi
    r, sr = v.get_regs(), v.get_sregs()
    assert (r.rip, sr.cs.selector, sr.cs.base) == (0xFFF0, 0xF000, 0xFFFF0000)
    assert r.rbx == 0 and r.rflags == 2
    assert (sr.cr0, sr.efer, sr.cr3) == (0x60000010, 0, 0)
    assert v.get_msrs([0x1B])[0x1B] == apic_base        # INIT keeps IA32_APIC_BASE
    # INIT then SIPI queued before the CPU runs: both apply, in order
    mem.write(0x8000, assemble("mov cx, 0x77\n hlt", 0, bits=16)[0])
    v.request_init()
    v.request_sipi(0x08)
    assert v.run() == exits.EXIT_HLT
    assert v.get_regs().rcx & 0xFFFF == 0x77
    # SIPI then INIT: the INIT wins, the CPU waits
    v.request_sipi(0x08)
    v.request_init()
    assert v.run() == exits.EXIT_HLT and v.wait_sipi


# ---- NMI and the interrupt window -------------------------------------------------

def _long_machine(source, handlers):
    from test_tcg_system import LongMachine
    return LongMachine(source, handlers)


def test_nmi_ignores_if_and_is_blocked_until_iret():
    m = _long_machine("""
        cli
    spin:
        pause
        jmp spin
    nmi:
        inc dword ptr [0x70000]
        hlt
        nop
    resume:                  # set_regs moving rip ends the halt
        iretq
    """, {2: ("nmi",)})
    try:
        v = m.vcpu
        v.request_nmi()
        assert v.run() == exits.EXIT_HLT                 # in the handler, IF=0 all along
        assert m.mem.read_u32(0x70000) == 1 and v.nmi_blocked
        v.request_nmi()                                  # blocked: stays pending
        assert v.run() == exits.EXIT_HLT
        assert m.mem.read_u32(0x70000) == 1
        r = v.get_regs()
        r.rip = m.syms["resume"]
        v.set_regs(r)
        assert v.run() == exits.EXIT_HLT                 # iretq unblocks: the second one arrives
        assert m.mem.read_u32(0x70000) == 2
        r = v.get_regs()
        r.rip = m.syms["resume"]
        v.set_regs(r)
        kick = threading.Timer(0.2, v.kick)
        kick.start()
        assert v.run() == exits.EXIT_INTR                # back in the loop, nothing pending
        kick.join()
        assert m.mem.read_u32(0x70000) == 2 and not v.nmi_blocked
        assert m.syms["spin"] <= v.get_regs().rip <= m.syms["nmi"]
    finally:
        m.close()


def test_interrupt_window_opens_after_sti_shadow():
    m = _long_machine("""
        cli
        mov ecx, 1000
    busy:
        dec ecx
        jnz busy
        sti
        nop                  # the interrupt shadow of sti covers this one
    open:
        jmp open
    handler:
        hlt
    """, {0x40: ("handler",)})
    try:
        v = m.vcpu
        assert not v.interruptible                       # IF=0 before the first instruction
        v.request_irq_window()
        assert v.run() == exits.EXIT_INTR
        assert v.get_regs().rip == m.syms["open"]
        assert v.interruptible
        v.request_interrupt(0x40)
        assert v.run() == exits.EXIT_HLT
        assert v.get_regs().rip == m.syms["handler"] + 1
    finally:
        m.close()


# ---- the machine: TcgAccel ----------------------------------------------------------

def test_accel_starts_aps_waiting_and_reset_puts_them_back():
    """TcgAccel: one vCPU per cfg.cpus, APs held until the LAPIC's INIT-SIPI, each with
    its own APIC id in CPUID; system_reset puts every AP back into wait-for-SIPI."""
    from conftest import guest_path
    from kvmpy.config import VmConfig
    from kvmpy.machine import Machine
    m = Machine(VmConfig(kernel=guest_path("smp"), cpus=3, memory=64 << 20), accel="tcg")
    try:
        vcpus = m.accel.vcpus
        assert len(vcpus) == 3
        assert [v.wait_sipi for v in vcpus] == [False, True, True]
        code, _ = assemble("mov eax, 1\n cpuid\n hlt", 0, bits=16)
        m.memory.write(0x9A000, code)
        lapics = m.accel.irqchip.lapics
        for i in (1, 2):
            assert vcpus[i].run() == exits.EXIT_HLT and vcpus[i].wait_sipi
            lapics[i].sipi(0x9A)                 # without INIT first? the AP waits since power-on
            lapics[i].init()
            lapics[i].sipi(0x9A)
            assert vcpus[i].run() == exits.EXIT_HLT and not vcpus[i].wait_sipi
            ebx = vcpus[i].get_regs().rbx
            assert (ebx >> 24, (ebx >> 16) & 0xFF) == (i, 3)     # APIC id, logical count
            assert vcpus[i].get_regs().rip == len(code)
        m.accel.reset()
        assert [v.wait_sipi for v in vcpus] == [False, True, True]
        assert vcpus[1].get_regs().rip == 0xFFF0
        assert not lapics[1].bsp and lapics[1].wait_for_sipi
    finally:
        m.close()
