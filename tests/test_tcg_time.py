"""The translator's clocks: the TSC frequency it announces (CPUID 0x15/0x16), and
each LAPIC's timer, kept by its own vCPU."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time

from support.tcg import TcgVcpu  # noqa: F401 - skips the module where kvmpy._tcg is not built
from support.tcg import regs, set_real_mode

from kvmpy.config import VmConfig
from kvmpy.devices.bus import Bus
from kvmpy.devices.lapic import REG_LVT_TIMER, REG_SVR, REG_TIMER_DCR, REG_TIMER_ICR
from kvmpy.events import EventLoop
from kvmpy.hv import exits
from kvmpy.hv.tcg.accel import CRYSTAL_HZ, IDLE_WAIT, TcgAccel
from kvmpy.memory import GuestMemory

MEASURE = "from kvmpy import _tcg; print(_tcg.Cpu(0).host_tsc_hz())"


@contextlib.contextmanager
def translator(cpus: int = 1):
    """A TcgAccel on 16 MiB of RAM whose event loop never runs: whatever fires a
    LAPIC timer here is a vCPU's own thread."""
    class Host:
        cfg = VmConfig(cpus=cpus, memory=16 << 20)
        memory = GuestMemory.anonymous([(0, 16 << 20)])
        pio_bus, mmio_bus = Bus("pio"), Bus("mmio")
        events = EventLoop(name="never-started")

    accel = TcgAccel(Host)
    try:
        yield accel, Host.memory
    finally:
        accel.close()
        Host.memory.close()


def arm_one_shot_20ms(lapic) -> int:
    """Program the LAPIC timer as Linux's one-shot mode does (vector 0xEC); its deadline."""
    lapic.write(REG_SVR, 4, 0x1FF)
    lapic.write(REG_TIMER_DCR, 4, 0xB)                  # divide by 1
    lapic.write(REG_LVT_TIMER, 4, 0xEC)                 # one-shot, vector 0xEC
    lapic.write(REG_TIMER_ICR, 4, CRYSTAL_HZ // 50)     # 20 ms
    due = lapic.timer_interrupt_due_ns
    assert due is not None and not lapic.has_pending()
    return due


def run_spinning_until_the_alarm(v, memory) -> None:
    """Run ``v`` on a `jmp $` with IF=0 in real mode: only its LAPIC timer's alarm (or,
    after 2 s, the rescue kick the test then fails on) ends the run."""
    memory.write(0x1000, b"\xeb\xfe")
    set_real_mode(v)
    v.set_regs(regs(rip=0x1000, rflags=2))
    rescue = threading.Timer(2.0, v.kick)
    rescue.start()
    try:
        assert v.run() == exits.EXIT_INTR
    finally:
        rescue.cancel()


def test_every_process_measures_the_same_tsc_frequency():
    """Each VM process measures the host TSC once and announces it to its guest: a
    measurement a preemption can skew gave each VM another clock rate (they spread by
    ~150 ppm on a loaded host); bracketed reads keep them within a few ppm."""
    values = sorted(int(subprocess.run([sys.executable, "-c", MEASURE], capture_output=True, text=True,
                                       check=True, timeout=60).stdout) for _ in range(5))
    assert values[0] > 100_000_000, values
    assert values[-1] - values[0] <= values[0] // 200_000, f"spread {values}"   # 5 ppm


def test_a_halted_vcpu_wakes_at_its_lapic_deadline_by_itself():
    """HLT sleeps until the guest's own timer deadline, not a poll interval, and the
    vCPU's thread expires the timer itself: here the machine's event loop never runs,
    so nothing else could fire it."""
    with translator() as (accel, _memory):
        lapic = accel.irqchip.lapics[0]
        due = arm_one_shot_20ms(lapic)
        accel.wait_halted(0)
        woke = time.monotonic_ns()
        assert woke >= due
        assert woke - due < IDLE_WAIT * 1e9 / 2, "slept on past the deadline"
        assert lapic.has_pending() and lapic.intr_ack() == 0xEC
        v = accel.vcpus[0]
        assert v.stats()["halt_until_deadline_ns"] > 10_000_000
        accel.wait_halted(0)        # nothing armed now: the timer fired once, and only once
        assert not lapic.has_pending()


def test_a_running_vcpu_gets_its_lapic_timer_from_the_core_alarm():
    """A vCPU running guest code (here a `jmp $`) leaves run() at its LAPIC deadline by
    the C core's own alarm and expires the timer on its own thread: the machine's
    event loop never runs, so no other Python thread takes the GIL for a tick."""
    with translator() as (accel, memory):
        v, lapic = accel.vcpus[0], accel.irqchip.lapics[0]
        due = arm_one_shot_20ms(lapic)
        accel.before_guest_entry(0)
        run_spinning_until_the_alarm(v, memory)
        left = time.monotonic_ns()
        assert left >= due and left - due < 250_000_000, (left - due) / 1e6
        assert not lapic.has_pending(), "expired by the vCPU's thread, not before"
        accel.before_guest_entry(0)
        assert lapic.has_pending() and lapic.intr_ack() == 0xEC
        assert v.stats()["alarm_kicks"] == 1
        assert accel.timer_wheel.fired == 0, "the machine's wheel fired nothing"


def test_each_lapic_timer_is_kept_by_its_own_vcpu():
    """On a two-CPU machine, CPU 1's LAPIC timer ends CPU 1's run by CPU 1's alarm:
    not CPU 0's, and not the machine's wheel (whose loop never runs here)."""
    with translator(cpus=2) as (accel, memory):
        bsp, ap = accel.vcpus
        lapic = accel.irqchip.lapics[1]
        ap.reset(wait_sipi=False)
        due = arm_one_shot_20ms(lapic)
        run_spinning_until_the_alarm(ap, memory)
        left = time.monotonic_ns()
        assert left >= due and left - due < 250_000_000, (left - due) / 1e6
        accel.before_guest_entry(1)
        assert lapic.has_pending() and lapic.intr_ack() == 0xEC
        assert not accel.irqchip.lapics[0].has_pending()
        assert (bsp.stats()["alarm_kicks"], ap.stats()["alarm_kicks"]) == (0, 1)
        assert accel.timer_wheel.fired == 0, "the machine's wheel fired nothing"
