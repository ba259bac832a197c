"""The C translator as the machine's accelerator (kvmpy.hv.protocol.Accel; no KVM needed).

What KVM does in the kernel is done here in software: the interrupt controllers
and the PIT (kvmpy.devices.irqchip), interrupt lines and MSIs through a
SoftPlatform, doorbells rung by the C core (TranslatorPlatform). ``cfg.cpus`` vCPUs, each in its
own thread on the shared guest RAM: the BSP starts in the boot state, the APs wait
for INIT-SIPI from the LAPIC like on a PC (and like KVM's in-kernel LAPIC).
"""

from __future__ import annotations

import logging
import threading
from fractions import Fraction
from typing import TYPE_CHECKING

from ...devices.platform import SoftPlatform
from ...errors import UserError
from .portqueue import TcgPortWrites, TcgPublishedReads

if TYPE_CHECKING:  # pragma: no cover
    from ...boot.common import BootState
    from ...devices.acpi_pm import PmTimerClock
    from ..protocol import AccelHost

log = logging.getLogger(__name__)

# What the translator advertises: an Intel CPU of a model QEMU offers (its "Broadwell":
# family 6, model 61, stepping 2, the first with every leaf-7 extension announced below,
# ADX and RDSEED) without the extensions the translator does not implement (no AVX,
# XSAVE, x2APIC, PCID, TSX...). A real vendor sends Linux down the
# vendor's init path (cache and topology leaves, TSC frequency from CPUID 0x15) rather
# than generic init, which reports SMT siblings and assumes Meltdown.
VENDOR = b"GenuineIntel"  # 12 bytes: ebx, edx, ecx order below
SIGNATURE = 0x000306D2    # family 6, model 0x3D, stepping 2
BRAND = b"Intel Core Processor (Broadwell)"     # QEMU's model-id for it

# The LAPIC timer's clock (the bus_hz given to the LAPIC models below), announced as
# the crystal of CPUID 0x15: Linux derives the LAPIC timer period from it and skips
# calibrating the timer against the PIT. 25 MHz, a common Intel crystal: Linux
# computes crystal_kHz * EBX in 32 bits, and a slower crystal leaves EBX room for a
# TSC/crystal ratio within a few ppm of the TSC (1 GHz allowed errors of ~100 ppm).
CRYSTAL_HZ = 25_000_000

# CPUID 7.0 EBX: BMI1, BMI2, RDSEED and ADX (c_ext/insn_bmi.h); no AVX2, whose
# VEX encodings stay #UD along with every other AVX one
LEAF7_EBX = (1 << 3) | (1 << 8) | (1 << 18) | (1 << 19)


# How long a halted vCPU sleeps without a wake-up; every event that can end a halt
# (interrupt, INIT/SIPI, pause/stop) kicks it, so this is only a safety net.
IDLE_WAIT = 0.5


def _brand_leaves() -> list[tuple[int, int, int, int, int, int, int]]:
    text = BRAND.ljust(48, b"\0")[:47] + b"\0"
    rows = []
    for k in range(3):
        chunk = text[16 * k:16 * k + 16]
        regs = [int.from_bytes(chunk[4 * j:4 * j + 4], "little") for j in range(4)]
        rows.append((0x80000002 + k, 0, 0, *regs))
    return rows


def _cache_leaf(subleaf: int, kind: int, level: int, size: int, ways: int, cores_minus_1: int):
    """One CPUID 4 sub-leaf: a cache of ``size`` bytes, 64-byte lines, private to a core."""
    line = 64
    sets = size // (ways * line)
    eax = kind | (level << 5) | (1 << 8) | (0 << 14) | (cores_minus_1 << 26)
    ebx = (line - 1) | (0 << 12) | ((ways - 1) << 22)
    return (4, subleaf, 1, eax, ebx, sets - 1, 0)


def tsc_ratio(tsc_hz: int) -> tuple[int, int]:
    """CPUID 0x15's TSC/crystal ratio (EBX, EAX) for a TSC of ``tsc_hz``: Linux 6.1
    computes crystal_kHz * EBX / EAX in 32 bits, so EBX must stay under 2^32 /
    crystal_kHz (171798 for 25 MHz); the closest fraction within that bound keeps the
    guest's clock within a few ppm of the TSC."""
    limit = (1 << 32) // (CRYSTAL_HZ // 1000) - 1
    ratio = Fraction(tsc_hz // 1000, CRYSTAL_HZ // 1000)
    best = ratio.limit_denominator(max(1, min(int(limit / ratio), (1 << 32) - 1)))
    while best.numerator > limit:
        best = ratio.limit_denominator(max(1, best.denominator - 1))
    return best.numerator, best.denominator


# The physical address width the translator's CPUID announces (its page walker takes
# 52-bit frames; 40 bits is what QEMU's TCG CPUs announce by default).
TRANSLATOR_PHYS_BITS = 40


def translator_cpuid(num_cpus: int, apic_id: int = 0, tsc_hz: int = 0) -> list[tuple[int, int, int, int, int, int, int]]:
    """CPUID of one vCPU: ``num_cpus`` single-thread cores in one package (what KVM's
    table says too), so Linux's topology code sees as many cores as the MADT lists
    and one thread per core. ``tsc_hz``: the TSC's frequency (CPUID 0x15/0x16), 0 if
    unknown (Linux then calibrates it)."""
    shift = max(0, (num_cpus - 1).bit_length())
    ebx = int.from_bytes(VENDOR[0:4], "little")
    edx = int.from_bytes(VENDOR[4:8], "little")
    ecx = int.from_bytes(VENDOR[8:12], "little")
    leaf1_edx = (1 << 0) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 8) | (1 << 9) | (1 << 13) | (1 << 15) \
        | (1 << 19) | (1 << 23) | (1 << 24) | (1 << 25) | (1 << 26)   # fpu tsc msr pae cx8 apic pge cmov clflush mmx fxsr sse sse2
    # sse3 ssse3 cx16 sse4.1 sse4.2 movbe popcnt rdrand hypervisor
    leaf1_ecx = (1 << 0) | (1 << 9) | (1 << 13) | (1 << 19) | (1 << 20) | (1 << 22) | (1 << 23) | (1 << 30) \
        | (1 << 31)
    if num_cpus > 1:
        leaf1_edx |= 1 << 28          # HTT: EBX[23:16] holds the package's logical count
    leaf1_ebx = (apic_id & 0xFF) << 24 | (min(num_cpus, 255) << 16) | (8 << 8)   # clflush 64 bytes
    significant = 1                   # KVM_CPUID_FLAG_SIGNIFCANT_INDEX: leaf 0xB has sub-leaves
    cores_minus_1 = min((1 << shift) - 1, 63)
    rows = [
        (0, 0, 0, 0x16 if tsc_hz else 0xD, ebx, ecx, edx),
        (1, 0, 0, SIGNATURE, leaf1_ebx, leaf1_ecx, leaf1_edx),
        (2, 0, 0, 0x0000FF01, 0, 0, 0),   # descriptor 0xFF: the caches are in leaf 4
        _cache_leaf(0, 1, 1, 32 << 10, 8, cores_minus_1),     # L1 data 32 KiB 8-way
        _cache_leaf(1, 2, 1, 32 << 10, 8, cores_minus_1),     # L1 instruction
        _cache_leaf(2, 3, 2, 4 << 20, 16, cores_minus_1),     # L2 4 MiB 16-way, as QEMU's legacy cache
        (4, 3, significant, 0, 0, 0, 0),
        # bmi1 bmi2 rdseed adx (the bits of QEMU's Haswell/Broadwell); IBRS/IBPB
        # (IA32_SPEC_CTRL, IA32_PRED_CMD) and IA32_ARCH_CAPABILITIES: msr_read/msr_write
        (7, 0, significant, 0, LEAF7_EBX, 0, (1 << 26) | (1 << 29)),
        # x2APIC topology: SMT level of one thread, core level of num_cpus
        (0xB, 0, significant, 0, 1, (1 << 8) | 0, apic_id),
        (0xB, 1, significant, shift, num_cpus, (2 << 8) | 1, apic_id),
        (0xB, 2, significant, 0, 0, 2, apic_id),
        (0x80000000, 0, 0, 0x80000008, 0, 0, 0),
        (0x80000001, 0, 0, 0, 0, 1 | (1 << 5), (1 << 11) | (1 << 20) | (1 << 29)),   # lahf abm(lzcnt), syscall nx lm
        *_brand_leaves(),
        (0x80000006, 0, 0, 0, 0, (4096 << 16) | (8 << 12) | 64, 0),      # L2: 4 MiB, 16-way (code 8), 64-byte lines
        (0x80000007, 0, 0, 0, 0, 0, 1 << 8),                               # invariant TSC
        (0x80000008, 0, 0, (48 << 8) | TRANSLATOR_PHYS_BITS, 0, 0, 0),      # 48-bit virtual addresses
    ]
    if tsc_hz:
        numerator, denominator = tsc_ratio(tsc_hz)
        rows.append((0x15, 0, 0, denominator, numerator, CRYSTAL_HZ, 0))
        mhz = tsc_hz // 1_000_000
        rows.append((0x16, 0, 0, mhz, mhz, CRYSTAL_HZ // 1_000_000, 0))
    return rows


class VcpuTimer:
    """A LAPIC's timer kept by its own vCPU instead of the machine's timer wheel: the C
    core's alarm (TcgVcpu.kick_at) makes run() return EXIT_INTR at the deadline, and
    the vCPU's thread fires the callback before its next entry (fire_if_due), so no
    other Python thread wakes up, and takes the GIL, for each of the guest's ticks.
    The same interface as a WheelTimer (``arm``, ``cancel``, ``armed``)."""

    __slots__ = ("_vcpu", "callback", "deadline", "token", "_lock")

    def __init__(self, vcpu, callback) -> None:
        self._vcpu = vcpu
        self.callback = callback
        self.deadline: int | None = None
        self.token: object = None
        self._lock = threading.Lock()

    def arm(self, deadline_ns: int, token: object = None) -> None:
        with self._lock:
            self.deadline, self.token = int(deadline_ns), token
            self._vcpu.kick_at(self.deadline)

    def cancel(self) -> None:
        with self._lock:
            self.deadline = self.token = None
            self._vcpu.kick_at(None)

    @property
    def armed(self) -> bool:
        return self.deadline is not None

    def fire_if_due(self, now: int) -> None:
        """On the vCPU's thread: run the callback if the deadline has passed (the
        callback checks the token, as it does a wheel's late call)."""
        with self._lock:
            deadline, token = self.deadline, self.token
            if deadline is None or now < deadline:
                return
            self.deadline = self.token = None
            self._vcpu.kick_at(None)
        self.callback(deadline, token)


class VcpuTimerWheel:
    """The timer wheel of one CPU's LAPIC (SoftIrqChip's ``lapic_timer_wheels``): the
    timer it hands out is a VcpuTimer of that CPU's own vCPU, so which vCPU keeps a
    LAPIC's timer is fixed by the CPU index the wheel was made for; the PIT's timer
    stays on the machine's wheel."""

    def __init__(self, vcpu, clock) -> None:
        self.clock = clock
        self._vcpu = vcpu
        self.lapic_timer: VcpuTimer | None = None

    def timer(self, callback) -> VcpuTimer:
        self.lapic_timer = VcpuTimer(self._vcpu, callback)
        return self.lapic_timer


class TranslatorPlatform(SoftPlatform):
    """SoftPlatform whose doorbells every vCPU's C core rings itself (TcgVcpu.add_doorbell):
    a virtio queue notify signals its eventfd without leaving C, as KVM's ioeventfd
    does in the kernel, so the vCPU loop never looks at a write for them."""

    def __init__(self, vcpus, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self._vcpus = vcpus

    def add_doorbell(self, addr: int, size: int, datamatch: int | None, pio: bool) -> int:
        fd = super().add_doorbell(addr, size, datamatch, pio)
        for v in self._vcpus:
            v.add_doorbell(fd, addr, size, datamatch, pio)
        return fd

    def remove_doorbell(self, fd: int) -> None:
        # out of every core first: the eventfd is closed after this
        for v in self._vcpus:
            v.remove_doorbell(fd)
        super().remove_doorbell(fd)

    def doorbell_write(self, addr: int, size: int, value: int, pio: bool) -> bool:
        return False        # the cores took every doorbell write before it became an exit


class TcgAccel:
    name = "tcg"
    software_doorbells = False       # the C core rings them (TranslatorPlatform)
    needs_before_guest_entry = True  # interrupts go into the CPU from here
    phys_bits = TRANSLATOR_PHYS_BITS

    def __init__(self, host: AccelHost) -> None:
        try:
            from .vcpu import NATIVE_DEFAULT_THRESHOLD, TcgVcpu, new_port_queue
        except ImportError as e:
            raise UserError(f"the translator (kvmpy._tcg) is not available: {e}; "
                            "build it with `make build` or run with --enable-kvm") from None
        from ...devices.irqchip import SoftIrqChip
        from ...devices.timers import TimerWheel
        self.memory = host.memory
        num_cpus = host.cfg.cpus
        # APIC id = index: what the MADT announces and the LAPIC model reports
        self.vcpus = [TcgVcpu(host.memory, i, wait_sipi=i != 0) for i in range(num_cpus)]
        for i, v in enumerate(self.vcpus):
            v.set_cpuid(translator_cpuid(num_cpus, i, v.host_tsc_hz()))
            if host.cfg.tcg_native is False:
                v.set_native_threshold(None)
            elif host.cfg.tcg_native and v.native_threshold is None:
                v.set_native_threshold(NATIVE_DEFAULT_THRESHOLD)
        self.timer_wheel = TimerWheel(events=host.events)
        # The UART's THR and the RTC's index writes wait in the cores' queue (as KVM's
        # coalesced PIO); not under --trace profile, which watches every console byte.
        self.port_write_queue: TcgPortWrites | None = None
        # Published port reads (the UART's LSR) live beside the queue; the exits trace
        # must see every read, so there they all leave the cores.
        self.published_port_reads: TcgPublishedReads | None = None
        if "profile" not in host.cfg.trace:
            queue = new_port_queue()
            for v in self.vcpus:
                v.set_port_queue(queue)
            self.port_write_queue = TcgPortWrites(queue, host.pio_bus.write, host.pio_bus.write_burst,
                                                  host.events)
            if "exits" not in host.cfg.trace:
                self.published_port_reads = TcgPublishedReads(queue)
        # The platform devices KVM keeps in the kernel: 8259s, IOAPIC, LAPIC, PIT (and port 0x61).
        self._lapic_wheels = [VcpuTimerWheel(v, self.timer_wheel.clock) for v in self.vcpus]
        self.irqchip = SoftIrqChip(num_cpus, cpu_kick=self._kick, timer_wheel=self.timer_wheel,
                                   lapic_timer_wheels=self._lapic_wheels,
                                   on_init=self._init_cpu, on_sipi=self._sipi_cpu, bus_hz=CRYSTAL_HZ)
        self.irqchip.register(host.pio_bus, host.mmio_bus, port_b=True)
        self.platform = TranslatorPlatform(self.vcpus, host.memory, on_irq=self.irqchip.set_irq_level,
                                           on_msi=self.irqchip.send_msi, events=host.events)
        host.memory.dma_listeners.append(self._dma_written)

    def _dma_written(self, gpa: int, length: int) -> None:
        # Device writes bypass the translator's write tracking: drop code translated there.
        for v in self.vcpus:
            v.invalidate_ram(gpa, length)

    def _kick(self, cpu: int) -> None:
        if 0 <= cpu < len(self.vcpus):
            self.vcpus[cpu].kick()

    # INIT / SIPI from a LAPIC (called on the ICR writer's thread, outside the chip
    # lock): queued on the target, which applies them inside its own run().
    def _init_cpu(self, cpu: int) -> None:
        if 0 <= cpu < len(self.vcpus):
            self.vcpus[cpu].request_init()
            self.vcpus[cpu].wakeup.set()

    def _sipi_cpu(self, cpu: int, vector: int) -> None:
        if 0 <= cpu < len(self.vcpus):
            self.vcpus[cpu].request_sipi(vector)
            self.vcpus[cpu].wakeup.set()

    # --- what each vCPU thread's loop calls ------------------------------------------
    def vcpu_thread_started(self, index: int) -> None:
        self.irqchip.set_current_cpu(index)

    def before_guest_entry(self, index: int) -> None:
        """Move what the interrupt controllers have for this CPU into the CPU.

        An NMI goes in at once (the CPU holds it while an NMI handler runs). A
        maskable interrupt is acknowledged only when the CPU takes it before its next
        instruction (IF=1, no interrupt shadow), as KVM injects; otherwise the CPU is
        asked to come back (EXIT_INTR) as soon as it could take one, and the vector
        stays in the LAPIC's IRR meanwhile, where a higher one can overtake it."""
        chip = self.irqchip
        v = self.vcpus[index]
        timer = self._lapic_wheels[index].lapic_timer
        if timer is not None and timer.deadline is not None:
            timer.fire_if_due(self.timer_wheel.clock())
        if v.wait_sipi or chip.lapics[index].wait_for_sipi:
            return          # an AP before its SIPI takes nothing (the LAPIC keeps it pending)
        if chip.take_nmi(index):
            v.request_nmi()
        if chip.has_pending(index):
            if v.interruptible:
                vector = chip.intr_ack(index)
                if vector >= 0:
                    v.request_interrupt(vector)
            else:
                v.request_irq_window()

    def wait_halted(self, index: int) -> None:
        """Sleep until something can end this vCPU's halt (every such event kicks it)."""
        v = self.vcpus[index]
        lapic = self.irqchip.lapics[index]
        v.wakeup.clear()        # before the checks: a kick after them ends the wait
        if lapic.wait_for_sipi:
            v.wakeup.wait(IDLE_WAIT)
            return
        if v.wait_sipi:
            return              # the LAPIC took a SIPI; its request is on the way to the CPU
        if lapic.nmi_pending or (v.interruptible and self.irqchip.has_pending(index)):
            return
        clock = self.timer_wheel.clock
        due = lapic.timer_interrupt_due_ns
        start = clock()
        if due is None:
            v.wakeup.wait(IDLE_WAIT)
            return
        # Wake at the guest's own deadline and expire its timer here: waiting for the
        # wheel's loop thread to fire it and kick us cost milliseconds per halt on a
        # loaded host (the vCPU's LAPIC timer is what ends almost every idle halt).
        if due > start and v.wakeup.wait(min((due - start) / 1e9, IDLE_WAIT)):
            v.halt_until_deadline_ns += max(0, min(clock(), due) - start)
            return
        timer = self._lapic_wheels[index].lapic_timer
        if timer is not None:
            timer.fire_if_due(clock())
        lapic.expire_timer_if_due()
        end = clock()
        v.halt_until_deadline_ns += max(0, min(end, due) - start)
        v.halt_past_deadline_ns += max(0, end - max(due, start))

    def serve_pm_timer(self, port: int, clock: PmTimerClock | None) -> None:
        # Linux reads the PM timer to check the TSC and calibrate against it; the
        # counter is a pure function of time, so the C core computes it (stats:
        # pm_timer_reads) instead of an exit to the model per read.
        for v in self.vcpus:
            if clock is None:
                v.serve_pm_timer(0, 0, 32)
            else:
                v.serve_pm_timer(port, clock.origin_ns, clock.bits)

    def load_boot_state(self, boot: BootState) -> None:
        v = self.vcpus[0]
        v.set_sregs(boot.sregs)
        v.set_regs(boot.regs)

    def reset(self) -> None:
        """system_reset: every vCPU at power-on, the APs waiting for a SIPI again (the
        machine then loads the BSP's boot state). The vCPU threads are parked."""
        for i, v in enumerate(self.vcpus):
            v.reset(wait_sipi=i != 0)
        self.irqchip.reset()
        # The loader rewrites guest RAM from Python, behind the translator's back:
        # drop every translated block.
        for v in self.vcpus:
            for region in self.memory.regions:
                v.invalidate_ram(region.gpa, region.size)

    def close(self) -> None:
        if self.port_write_queue is not None:
            self.port_write_queue.close()      # the last queued writes reach their device
        if self._dma_written in self.memory.dma_listeners:
            self.memory.dma_listeners.remove(self._dma_written)
        self.platform.close()
        self.irqchip.close()
        self.timer_wheel.close()
        for v in self.vcpus:          # before guest RAM goes: the vCPU holds exports of it
            v.close()
