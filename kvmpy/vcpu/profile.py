"""``--trace profile``: where a run's time goes, printed when the machine closes.

Each vCPU is wrapped (like the exits tracer) so the loop in kvmpy.vcpu.runner stays
the same code. The wrapper reads the clock only around ``run()``: the time inside it
is the CPU (the translator's C core, or KVM), the time from its return to the next
call is the exit's handling, charged to the bus device that served the exit (or to
HLT idle for a halt, where the loop sleeps until an interrupt). The translator adds
its own counters (kvmpy._tcg's stats): instructions executed, blocks translated and
the time spent translating them, slow memory paths (TLB misses, MMIO, page-crossing
accesses) and their time, the ACPI PM timer reads it answered without an exit, and
how much of each halt came before the guest's LAPIC timer deadline (what the guest
asked to sleep) and after it (the wake-up's lateness), the exits that took the
loop's decoded fast path (which the wrapper times as well), the doorbells and
LAPIC timer deadlines the core served without Python. Serial output (port 0x3f8) is
watched for the first byte and for the first line that mentions init.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

from ..hv.exits import (DECODED_AFTER_QUEUED, DECODED_MMIO_READ, DECODED_PIO_READ, DECODED_PIO_WRITE,
                        EXIT_HLT, EXIT_INTR, EXIT_IO, EXIT_MMIO, DecodedExits)
from ..threadname import NamedThread

COM1 = 0x3F8
COM1_LCR = COM1 + 3
LCR_DLAB = 0x80        # while set, writes to COM1 are the divisor, not output
SAMPLE_INTERVAL = 0.01  # seconds between guest RIP samples (each takes the GIL)
TOP_SAMPLES = 12
# What marks "init" on the console: the kernel starting it (without `quiet`) or the
# default guest's own banner.
INIT_MARKERS = (b"Run /init", b"kvmpy guest: init", b"Run /sbin/init")
SERIAL_KEEP = 4096     # bytes of console tail kept to find a marker split across writes


class BootProfile:
    """The counters of one machine's run; one ProfiledVcpu per vCPU feeds it."""

    def __init__(self, pio_bus, mmio_bus, out: TextIO | None = None) -> None:
        self.pio_bus = pio_bus
        self.mmio_bus = mmio_bus
        self.out = out
        self.started = time.perf_counter()
        self.first_serial: float | None = None
        self.init_seen: float | None = None
        self._serial_tail = b""
        self._lock = threading.Lock()
        self.vcpus: list[ProfiledVcpu] = []
        self._reported = False
        self.samples: dict[int, int] = {}      # guest RIP -> times seen running there
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()

    def wrap(self, vcpu, index: int) -> ProfiledVcpu:
        p = ProfiledVcpu(self, vcpu, index)
        with self._lock:
            self.vcpus.append(p)
            if self._sampler is None and vcpu.can_sample_rip:
                self._sampler = NamedThread(target=self._sample, name="profile-sampler", daemon=True)
                self._sampler.start()
        return p

    def _sample(self) -> None:
        # Where the guest spends the time inside the CPU: a histogram of RIPs, sampled
        # (with `nokaslr` on the kernel command line they match System.map).
        while not self._stop.wait(SAMPLE_INTERVAL):
            for p in list(self.vcpus):
                try:
                    rip = p.sample_rip()
                except Exception:  # the vCPU closed under us
                    return
                if rip is not None:
                    self.samples[rip] = self.samples.get(rip, 0) + 1

    def serial_bytes(self, data: bytes) -> None:
        now = time.perf_counter() - self.started
        with self._lock:
            if self.first_serial is None:
                self.first_serial = now
            if self.init_seen is None:
                self._serial_tail = (self._serial_tail + data)[-SERIAL_KEEP:]
                if any(m in self._serial_tail for m in INIT_MARKERS):
                    self.init_seen = now
                    self._serial_tail = b""

    def device_name(self, bus, addr: int) -> str:
        hit = bus.find(addr)
        if hit is None:
            return f"{bus.name} {addr:#x} (unclaimed)"
        base, dev = hit
        return f"{bus.name} {base:#x} {getattr(dev, 'name', None) or type(dev).__name__}"

    def report(self) -> str:
        """The breakdown as text (also written to ``out``, stderr by default, once)."""
        wall = time.perf_counter() - self.started
        self._stop.set()
        insns = translated = decode_ns = exec_ns = slow = slow_ns = gil_ns = pm_timer_reads = 0
        decoded = doorbells = alarms = 0
        halt_asked_ns = halt_late_ns = 0
        native: dict[str, int] = {}
        have_stats = False
        helper_ops: dict[int, int] = {}
        run_s = hlt_s = intr_s = 0.0
        runs = hlts = 0
        devices: dict[str, list[float]] = {}
        for p in self.vcpus:
            st = p.final_stats()
            if st:
                have_stats = True
                insns += st.get("insns", 0)
                translated += st.get("translated_blocks", 0)
                decode_ns += st.get("decode_ns", 0)
                exec_ns += st.get("exec_ns", 0)
                slow += st.get("slow_mem", 0)
                slow_ns += st.get("slow_mem_ns", 0)
                gil_ns += st.get("gil_wait_ns", 0)
                pm_timer_reads += st.get("pm_timer_reads", 0)
                decoded += st.get("decoded_exits", 0)
                doorbells += st.get("doorbells_rung", 0)
                alarms += st.get("alarm_kicks", 0)
                halt_asked_ns += st.get("halt_until_deadline_ns", 0)
                halt_late_ns += st.get("halt_past_deadline_ns", 0)
                for key in ("native_insns", "native_helper_insns", "native_blocks", "native_compile_ns",
                            "native_chained", "native_indirect"):
                    native[key] = native.get(key, 0) + st.get(key, 0)
                for op, n in st.get("native_helper_ops", {}).items():
                    helper_ops[op] = helper_ops.get(op, 0) + n
            run_s += p.run_s
            runs += p.runs
            hlt_s += p.hlt_s
            hlts += p.hlts
            intr_s += p.intr_s
            for name, (n, t) in p.devices.items():
                acc = devices.setdefault(name, [0, 0.0])
                acc[0] += n
                acc[1] += t
        lines = [f"kvmpy profile: {wall:.2f} s wall, {len(self.vcpus)} vCPU(s)"]
        fs = f"{self.first_serial:.2f} s" if self.first_serial is not None else "none"
        it = f"{self.init_seen:.2f} s" if self.init_seen is not None else "not seen"
        lines.append(f"  first serial byte   {fs}; init on the console {it}")
        lines.append(f"  in the CPU (run)    {run_s:8.2f} s over {runs} entries (all vCPUs)")
        if have_stats:
            lines.append(f"    guest instructions {insns} ({insns / max(exec_ns, 1) * 1e3:.0f} MIPS in the core)")
            lines.append(f"    translation        {translated} blocks, {decode_ns / 1e9:.2f} s "
                         f"({decode_ns / max(translated, 1) / 1e3:.1f} us per block)")
            lines.append(f"    C core executing   {exec_ns / 1e9:.2f} s")
            if native:
                in_blocks = native["native_insns"]
                own = in_blocks - native["native_helper_insns"]
                lines.append(f"    native tier        {native['native_blocks']} blocks compiled in "
                             f"{native['native_compile_ns'] / 1e9:.3f} s; {100.0 * in_blocks / max(insns, 1):.1f} % "
                             f"of instructions in compiled blocks, {100.0 * own / max(insns, 1):.1f} % as host code, "
                             f"{native['native_chained']} direct jumps between compiled blocks, "
                             f"{native.get('native_indirect', 0)} returns and indirect jumps found compiled")
                if helper_ops:
                    top = sorted(helper_ops.items(), key=lambda kv: -kv[1])[:12]
                    lines.append("    still through the interpreter's handler (op: count): " +
                                 ", ".join(f"{op:#x}: {n}" for op, n in top))
            lines.append(f"    slow memory paths  {slow} (TLB misses, MMIO, page crossings, code-page writes), "
                         f"{slow_ns / 1e9:.2f} s")
            lines.append(f"    waiting for the GIL after exits {gil_ns / 1e9:.2f} s (other Python threads)")
            lines.append(f"    PM timer reads answered in the core, without an exit: {pm_timer_reads}")
            lines.append(f"    exits returned decoded (the loop's fast path) {decoded}; doorbells rung in the "
                         f"core {doorbells}; LAPIC timer deadlines met by the core's alarm {alarms}")
        lines.append(f"  HLT idle            {hlt_s:8.2f} s over {hlts} halts")
        if have_stats:
            lines.append(f"    before the guest's timer deadline {halt_asked_ns / 1e9:.2f} s, "
                         f"woken after it {halt_late_ns / 1e9:.3f} s")
        lines.append(f"  interrupt windows   {intr_s:8.2f} s")
        total_dev = sum(t for _n, t in devices.values())
        lines.append(f"  device exits        {total_dev:8.2f} s over {sum(n for n, _t in devices.values())} exits:")
        for name, (n, t) in sorted(devices.items(), key=lambda kv: -kv[1][1])[:20]:
            lines.append(f"    {t:8.3f} s {n:9d}  {t / max(n, 1) * 1e6:7.1f} us each  {name}")
        nsamples = sum(self.samples.values())
        if nsamples:
            lines.append(f"  guest RIP samples   {nsamples} (every {SAMPLE_INTERVAL * 1e3:.0f} ms, running vCPUs):")
            for rip, n in sorted(self.samples.items(), key=lambda kv: -kv[1])[:TOP_SAMPLES]:
                lines.append(f"    {100.0 * n / nsamples:5.1f} %  {rip:#018x}")
        text = "\n".join(lines)
        with self._lock:
            if self._reported:
                return text
            self._reported = True
        out = self.out if self.out is not None else sys.stderr
        print(text, file=out, flush=True)
        return text


class ProfiledVcpu:
    """A vCPU whose run() is timed; every other attribute is the vCPU's own."""

    def __init__(self, profile: BootProfile, vcpu, index: int) -> None:
        self._profile = profile
        self._vcpu = vcpu
        self.index = index
        self.run_s = self.hlt_s = self.intr_s = 0.0
        self.runs = self.hlts = 0
        self.devices: dict[str, list] = {}      # name -> [exits, seconds]
        self._names: dict[tuple[int, int], str] = {}
        self._pending: str | None = None        # what the time since the last exit goes to
        self._returned = 0.0
        self._stats: dict | None = None
        self._dlab = False
        vcpu.set_profiling(True)

    def __getattr__(self, name):
        # A proxy: what the loop and the machine ask beyond run() is the vCPU's own.
        return getattr(self._vcpu, name)

    def _charge(self, now: float) -> None:
        """The time since the last exit, to what that exit was."""
        pending = self._pending
        if pending is None:
            return
        spent = now - self._returned
        if pending == "hlt":
            self.hlt_s += spent
        elif pending == "intr":
            self.intr_s += spent
        else:
            acc = self.devices.get(pending)
            if acc is None:
                acc = self.devices[pending] = [0, 0.0]
            acc[0] += 1
            acc[1] += spent

    def _ran(self, now: float) -> None:
        after = time.perf_counter()
        self.run_s += after - now
        self.runs += 1
        self._returned = after

    def _port_write(self, port: int, data: bytes) -> None:
        if port == COM1 and not self._dlab:
            self._profile.serial_bytes(data)
        elif port == COM1_LCR:
            self._dlab = bool(data[-1] & LCR_DLAB)

    def run(self) -> int:
        now = time.perf_counter()
        self._charge(now)
        vcpu = self._vcpu
        kind = vcpu.run()
        self._ran(now)
        return self._noted(kind)

    def _noted(self, kind: int) -> int:
        vcpu = self._vcpu
        if kind == EXIT_IO:
            port = vcpu.io_port
            self._pending = self._name(0, port)
            if vcpu.io_write:
                self._port_write(port, bytes(vcpu.io_data))
        elif kind == EXIT_MMIO:
            self._pending = self._name(1, vcpu.mmio_addr)
        elif kind == EXIT_HLT:
            self.hlts += 1
            self._pending = "hlt"
        elif kind == EXIT_INTR:
            self._pending = "intr"
        else:
            self._pending = None
        return kind

    def decoded_exits(self) -> DecodedExits | None:
        """The vCPU's fast path, timed as run() is: the profile then sees the exits as
        the loop serves them without it (where the backend still offers it while every
        exit is reported: the translator)."""
        inner = self._vcpu.decoded_exits()
        if inner is None:
            return None
        # Not the native entry: the profile times each run.
        run_decoded, state, access, exit_kind, _native = inner

        def run(state_) -> int:
            now = time.perf_counter()
            self._charge(now)
            code = run_decoded(state_)
            self._ran(now)
            plain = code - DECODED_AFTER_QUEUED if code > DECODED_MMIO_READ else code
            if DECODED_PIO_WRITE <= plain <= DECODED_MMIO_READ:
                self._pending = self._name(0 if plain <= DECODED_PIO_READ else 1, access[0])
                if plain == DECODED_PIO_WRITE:
                    self._port_write(access[0], (access[2] & 0xFF).to_bytes(1, "little"))
            return code

        return DecodedExits(run, state, access, lambda code: self._noted(exit_kind(code)))

    def _name(self, space: int, addr: int) -> str:
        key = (space, addr)
        name = self._names.get(key)
        if name is None:
            p = self._profile
            name = self._names[key] = p.device_name(p.mmio_bus if space else p.pio_bus, addr)
        return name

    def close(self) -> None:
        """On the vCPU thread as it ends: keep the CPU's final counters."""
        self._stats = self.final_stats()

    def final_stats(self) -> dict | None:
        if self._stats is not None:
            return self._stats
        try:
            return self._vcpu.stats()
        except Exception:  # a closed vCPU: nothing more to add
            return None
