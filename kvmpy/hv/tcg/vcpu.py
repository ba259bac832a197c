"""TcgVcpu: the C translator (kvmpy._tcg) behind the vCPU run protocol of kvmpy.hv.exits.

Used where KVM cannot run the guest. Guest RAM is shared with the device models:
the C side holds buffer exports of the GuestMemory mmaps (no copies), so call
``close()`` before ``GuestMemory.close()``. Addresses outside RAM regions become
EXIT_MMIO; port I/O becomes EXIT_IO. Both stop *at* the instruction and complete
it on the next ``run()`` with whatever the loop wrote into ``io_data`` /
``mmio_data`` (reads), exactly like KVM's emulator.

The vCPU loop's fast path (``decoded_exits``) gets one port or MMIO access of up to
8 bytes back from C as four numbers (``Cpu.run_decoded``). Without Python, the core
also rings doorbells (``add_doorbell``: an eventfd per virtio queue notify address,
as KVM's ioeventfd), queues one-byte writes to the ports of a ``PortQueue``
(``set_port_queue``, kvmpy.hv.tcg.portqueue) and leaves run() at a deadline
(``kick_at``: its alarm thread, for the LAPIC timer).

HLT with no deliverable interrupt returns EXIT_HLT and the vCPU stays halted
(``run()`` keeps returning EXIT_HLT) until ``request_interrupt()`` makes an
interrupt deliverable or ``set_regs`` moves rip.

SMP: every vCPU runs in its own thread on the same RAM. ``request_init()`` /
``request_sipi(vector)`` / ``request_nmi()`` may be called from any thread (the
LAPIC's ICR writer); run() applies them. An AP made with ``wait_sipi=True`` (or after
INIT) executes nothing, run() returns EXIT_HLT, until a SIPI starts it in real mode
at CS = vector<<8, IP = 0. ``interruptible`` says whether a vector requested now is
taken before the next instruction; otherwise ``request_irq_window()`` makes run()
return EXIT_INTR as soon as it would be.

Guest writes to pages holding translated code are caught by the translator
itself (page-granular invalidation). Writes that bypass it, device DMA into
guest RAM (virtio), or another TcgVcpu's writes, must be followed by
``invalidate_ram(gpa, size)`` on every TcgVcpu; it may be called from any thread
while run() executes (the range is applied at the next block boundary).

Only the instruction sets advertised through ``set_cpuid`` (filtered by
``filter_cpuid``) are implemented: the integer ISA, x87 (c_ext/x87.c), MMX, SSE/SSE2/SSE3/
SSSE3/SSE4.1/SSE4.2, fxsave/fxrstor, cmpxchg16b, popcnt/lzcnt, BMI1/BMI2 (VEX-encoded),
ADX, MOVBE, RDRAND/RDSEED; no AVX, XSAVE or SYSENTER.
"""

from __future__ import annotations

import logging
import threading

from .. import exits
from ..regs import DTable, Regs, Segment, SRegs

log = logging.getLogger(__name__)

try:
    from ... import _tcg
except ImportError as exc:  # pragma: no cover - reported by the caller
    _tcg = None
    _IMPORT_ERROR = exc
else:
    _IMPORT_ERROR = None

# CPUID bits the translator implements; everything else the machine offers is masked
# so the guest never picks an instruction set extension we would #UD on.
# fpu pse tsc msr pae cx8 apic mtrr pge cmov pat clflush mmx fxsr sse sse2 htt (no sysenter)
_LEAF1_EDX = sum(1 << b for b in (0, 3, 4, 5, 6, 8, 9, 12, 13, 15, 16, 19, 23, 24, 25, 26, 28))
# sse3 ssse3 cx16 sse4.1/4.2 movbe popcnt rdrand hypervisor
_LEAF1_ECX = sum(1 << b for b in (0, 9, 13, 19, 20, 22, 23, 30, 31))
_EXT1_EDX = sum(1 << b for b in (11, 20, 26, 27, 29))           # syscall nx pdpe1gb rdtscp lm
_EXT1_ECX = sum(1 << b for b in (0, 5))                          # lahf_lm abm(lzcnt)
_LEAF7_EBX = sum(1 << b for b in (0, 3, 8, 18, 19))             # fsgsbase bmi1 bmi2 rdseed adx
_LEAF7_EDX = (1 << 26) | (1 << 29)                               # ibrs/ibpb, arch_capabilities (msrs 0x48 0x49 0x10a)


def filter_cpuid(entries):
    """Mask a machine's CPUID table to what the translator executes."""
    out = []
    for e in entries:
        fn, idx, flags, a, b, c, d = e
        if 0x40000000 <= fn <= 0x400000FF:
            continue   # KVM paravirt leaves: kvmclock & co. are KVM-only MSRs
        if fn == 1:
            c &= _LEAF1_ECX
            d &= _LEAF1_EDX
        elif fn == 7:
            if idx == 0:
                a = 0
                b &= _LEAF7_EBX
                d &= _LEAF7_EDX
            else:
                b = d = 0
            c = 0
        elif fn == 0xD:
            a = b = c = d = 0
        elif fn == 0x80000001:
            c &= _EXT1_ECX
            d &= _EXT1_EDX
        out.append((fn, idx, flags, a, b, c, d))
    return out


def _seg_tuple(s: Segment):
    return (s.base, s.limit & 0xFFFFFFFF, s.selector & 0xFFFF, s.type, s.present, s.dpl, s.db, s.s,
            s.l, s.g, s.avl, s.unusable)


def _seg_from(t) -> Segment:
    base, limit, sel, typ, present, dpl, db, s, l, g, avl, unusable = t
    return Segment(base=base, limit=limit, selector=sel, type=typ, present=present, dpl=dpl, db=db,
                   s=s, l=l, g=g, avl=avl, unusable=unusable)


_SEG_ORDER = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
_REG_ORDER = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
              "r12", "r13", "r14", "r15", "rip", "rflags")


# executions before a block is compiled when nothing says otherwise: the C side's
# NATIVE_DEFAULT_THRESHOLD (c_ext/native/native.h), for `--tcg-native on` over an
# environment that turned the tier off
NATIVE_DEFAULT_THRESHOLD = 50


def start_tsc_calibration() -> None:
    """Begin measuring the host TSC's frequency (TcgVcpu.host_tsc_hz) now, so the 20 ms
    it takes pass while the machine is built rather than in the accelerator's set-up."""
    if _tcg is not None:        # without the module the accelerator reports it
        _tcg.start_tsc_calibration()


def new_port_queue():
    """A machine's queue of port writes, for set_port_queue on each of its vCPUs."""
    return _tcg.PortQueue()


class TcgVcpu:
    """A vCPU run by the C translator, with the same run protocol as the KVM backend."""

    def __init__(self, memory, cpu_index: int = 0, wait_sipi: bool = False) -> None:
        if _tcg is None:
            raise RuntimeError(f"kvmpy._tcg is not built ({_IMPORT_ERROR}); run "
                               "`python3 setup.py build_ext --inplace`")
        self.memory = memory
        self.cpu_index = cpu_index
        self._cpu = _tcg.Cpu(cpu_index)
        if wait_sipi:
            self._cpu.reset(wait_sipi=True)
        # set by kick(): a thread waiting for this halted vCPU wakes up
        self.wakeup = threading.Event()
        self._regions = None
        self._protection = -1
        self._generation = -1
        self._sync_memory()
        # The translator returns every exit whatever this says (kvmpy.hv.protocol.Vcpu).
        self.report_every_exit = True
        self.io_port = 0
        self.io_size = 0
        self.io_write = False
        self.io_count = 0
        self.io_data = memoryview(b"")
        self.mmio_addr = 0
        self.mmio_size = 0
        self.mmio_write = False
        self.mmio_data = memoryview(b"")
        self.internal_error = ""
        self.system_event = 0
        # --trace profile: time halted before the guest's LAPIC timer deadline (what it
        # asked to sleep) and after it (the wake-up's lateness); TcgAccel.wait_halted adds
        self.halt_until_deadline_ns = 0
        self.halt_past_deadline_ns = 0

    def _sync_memory(self) -> None:
        self._generation = self.memory.generation
        every = [*self.memory.regions, *self.memory.device_regions.values()]
        regions = [(r.gpa, r.size) for r in every]
        if regions != self._regions:
            self._cpu.clear_ram()
            for r in every:
                self._cpu.add_ram(r.gpa, r.view, self.memory.is_readonly(r))
            self._regions = regions
            self._protection = self.memory.protection_generation
        self._watch_memory()

    def _sync_protection(self) -> None:
        for r in self.memory.regions:
            self._cpu.set_ram_readonly(r.gpa, self.memory.is_readonly(r))
        self._protection = self.memory.protection_generation
        self._watch_memory()

    def _watch_memory(self) -> None:
        # run_decoded compares these itself before each entry, as run() does below
        self._cpu.watch_memory(self.memory, self._generation, self._protection, len(self.memory.regions))

    def _memory_current(self) -> None:
        if self.memory.generation != self._generation or len(self.memory.regions) != len(self._regions or ()):
            self._sync_memory()
        elif self._protection != self.memory.protection_generation:
            self._sync_protection()

    def close(self) -> None:
        """Release the RAM buffer exports (GuestMemory.close() needs that)."""
        if self._cpu is not None:
            self.io_data = self.mmio_data = memoryview(b"")
            self._cpu.clear_ram()
            self._regions = None

    # ---- run protocol ----

    def decoded_exits(self) -> exits.DecodedExits:
        """The loop's fast path: one port or MMIO access (up to 8 bytes) comes back from
        C as four numbers in ``access`` rather than through exit_access()'s tuple and
        memoryview, and needs no Python in between (kvmpy.hv.exits.DecodedExits)."""
        access = [0, 0, 0, 0]      # run_decoded's state is the access itself
        return exits.DecodedExits(self._cpu.run_decoded, access, access, self.exit_kind)

    def run(self) -> int:
        self._memory_current()
        return self.exit_kind(self._cpu.run())

    def exit_kind(self, code: int) -> int:
        """What run() (or run_decoded) returned as the exit kind, with the exit
        attributes set; after RUN_RESYNC_MEMORY the RAM map is synced and the loop
        goes round again (EXIT_INTR)."""
        if code == exits.EXIT_IO:
            _, port, size, write, count, data = self._cpu.exit_access()
            self.io_port, self.io_size, self.io_write, self.io_count = port, size, bool(write), count
            self.io_data = data
        elif code == exits.EXIT_MMIO:
            _, addr, size, write, _count, data = self._cpu.exit_access()
            self.mmio_addr, self.mmio_size, self.mmio_write = addr, size, bool(write)
            self.mmio_data = data
        elif code == exits.EXIT_INTERNAL_ERROR:
            self.internal_error = self._cpu.error()
            log.debug("translator internal error: %s", self.internal_error)  # the machine reports it
        elif code == _tcg.RUN_RESYNC_MEMORY:
            self._memory_current()
            return exits.EXIT_INTR
        return code

    def add_doorbell(self, fd: int, addr: int, size: int, datamatch: int | None, pio: bool) -> None:
        """Guest writes to ``addr`` (``size`` bytes, 0: any; of ``datamatch``, None: any)
        signal the eventfd ``fd`` from C, with no exit: the translator's ioeventfd.
        Thread-safe, also while run() executes."""
        self._cpu.add_doorbell(fd, addr, size, datamatch, pio)

    def remove_doorbell(self, fd: int) -> None:
        """Once this returns no write signals ``fd``. Thread-safe."""
        self._cpu.remove_doorbell(fd)

    def kick(self) -> None:
        self._cpu.kick()
        self.wakeup.set()

    def set_port_queue(self, queue) -> None:
        """One-byte OUTs to the ports of ``queue`` (a kvmpy._tcg.PortQueue, new_port_queue();
        None: none) wait there instead of exiting (kvmpy.hv.tcg.portqueue). Not while
        run() executes."""
        self._cpu.set_port_queue(queue)

    def kick_at(self, deadline_ns: int | None) -> None:
        """run() returns EXIT_INTR, as after kick(), once time.monotonic_ns() reaches
        ``deadline_ns`` (None: no deadline): the C core's own alarm thread, no Python
        runs for it. Thread-safe."""
        self._cpu.kick_at(deadline_ns)

    def request_interrupt(self, vector: int) -> None:
        self._cpu.request_interrupt(vector)

    def request_nmi(self) -> None:
        self._cpu.request_nmi()

    def request_irq_window(self) -> None:
        self._cpu.request_irq_window()

    def request_init(self) -> None:
        self._cpu.request_init()

    def request_sipi(self, vector: int) -> None:
        self._cpu.request_sipi(vector)

    def reset(self, wait_sipi: bool = False) -> None:
        """Power-on state now (run() must not be executing); an AP waits for a SIPI."""
        self._cpu.reset(wait_sipi=wait_sipi)

    @property
    def interruptible(self) -> bool:
        return self._cpu.interruptible

    @property
    def wait_sipi(self) -> bool:
        return self._cpu.wait_sipi

    @property
    def nmi_blocked(self) -> bool:
        return self._cpu.nmi_blocked

    def set_cpuid(self, entries) -> None:
        """entries: (function, index, flags, eax, ebx, ecx, edx) tuples or objects with those fields."""
        rows = []
        for e in entries:
            if isinstance(e, tuple):
                rows.append(tuple(int(x) for x in e))
            else:
                rows.append((e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx))
        self._cpu.set_cpuid(filter_cpuid(rows))

    def invalidate_ram(self, gpa: int, size: int) -> None:
        self._cpu.invalidate(gpa, size)

    @property
    def halted(self) -> bool:
        return self._cpu.halted

    def stats(self) -> dict:
        return {**self._cpu.stats(), "halt_until_deadline_ns": self.halt_until_deadline_ns,
                "halt_past_deadline_ns": self.halt_past_deadline_ns}

    def serve_pm_timer(self, port: int, origin_ns: int, bits: int) -> None:
        """Answer reads of the 4 bytes at ``port`` in C as the ACPI PM timer: ``(monotonic_ns
        - origin_ns) * 3.579545 MHz``, low ``bits`` bits (kvmpy.devices.acpi_pm.PmTimerClock);
        port 0: exit for them again. Not while run() executes."""
        self._cpu.set_pm_timer(port, origin_ns, bits)

    def set_native_threshold(self, threshold: int | None) -> None:
        """Executions before a block runs as host code (0: from its first run); None
        keeps every block interpreted. Drops the translations made so far."""
        self._cpu.set_native_threshold(threshold)

    @property
    def native_threshold(self) -> int | None:
        return self._cpu.native_threshold

    def set_profiling(self, on: bool) -> None:
        """Time the slow memory paths too (two clock reads each)."""
        self._cpu.set_profiling(on)

    can_sample_rip = True           # kvmpy._tcg keeps the RIP where another thread can read it

    def sample_rip(self) -> int | None:
        """Thread-safe, while run() executes: the guest's RIP now (a sample), None if halted."""
        return self._cpu.sample_rip()

    def host_tsc_hz(self) -> int:
        """The frequency of the guest's TSC (the host's), measured once per process."""
        return self._cpu.host_tsc_hz()

    # ---- state ----

    def get_regs(self) -> Regs:
        return Regs(**dict(zip(_REG_ORDER, self._cpu.get_regs())))

    def set_regs(self, regs: Regs) -> None:
        self._cpu.set_regs(tuple(getattr(regs, n) & 0xFFFFFFFFFFFFFFFF for n in _REG_ORDER))

    def get_sregs(self) -> SRegs:
        segs, gdt, idt, cr0, cr2, cr3, cr4, cr8, efer, apic = self._cpu.get_sregs()
        sr = SRegs(gdt=DTable(*gdt), idt=DTable(*idt), cr0=cr0, cr2=cr2, cr3=cr3, cr4=cr4, cr8=cr8,
                   efer=efer, apic_base=apic)
        for name, t in zip(_SEG_ORDER, segs):
            setattr(sr, name, _seg_from(t))
        return sr

    def set_sregs(self, sregs: SRegs) -> None:
        segs = tuple(_seg_tuple(getattr(sregs, n)) for n in _SEG_ORDER)
        self._cpu.set_sregs((segs, (sregs.gdt.base, sregs.gdt.limit), (sregs.idt.base, sregs.idt.limit),
                             sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4, sregs.cr8, sregs.efer,
                             sregs.apic_base))

    def get_msrs(self, indices) -> dict:
        out = {}
        for i in indices:
            v = self._cpu.get_msr(i)
            if v is not None:
                out[i] = v
        return out

    def set_msrs(self, values: dict) -> None:
        for i, v in values.items():
            if not self._cpu.set_msr(i, v & 0xFFFFFFFFFFFFFFFF):
                log.warning("translator: MSR %#x not supported, write ignored", i)

    # for tests / debugging
    def get_xmm(self, n: int) -> bytes:
        return self._cpu.get_xmm(n)

    def set_xmm(self, n: int, data: bytes) -> None:
        self._cpu.set_xmm(n, data)

    def get_fpu(self) -> tuple[int, int, int, bytes]:
        """(FCW, FSW, full tag word, R0-R7 in physical order as 8 x 10 bytes)."""
        return self._cpu.get_fpu()

    def set_fpu(self, fcw: int, fsw: int, ftw: int, regs: bytes) -> None:
        self._cpu.set_fpu(fcw, fsw, ftw, regs)
