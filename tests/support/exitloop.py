"""An in-process KVM or translator machine for the exit-loop tests: the guest's console
captured, and the vCPUs' C-loop counters (KvmVcpu.loop_stats) at hand; and the
decoded-exit loop of kvmpy/vcpu/runner.py, cut down to port accesses, for tests that
drive a lone translator vCPU."""

from __future__ import annotations

import threading
import time
from typing import Callable

from kvmpy.config import DeviceConfig, VmConfig
from kvmpy.hv import exits
from kvmpy.machine import Machine

MiB = 1 << 20


class CapturedConsole:
    """The UART's console, keeping what the guest printed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._out = bytearray()
        self.writes = 0          # buffered_write calls: the UART hands a burst over in one

    def attach(self, uart) -> None:
        pass

    def rx_space_available(self) -> None:
        pass

    def buffered_write(self, data: bytes) -> None:
        with self._lock:
            self._out += data
            self.writes += 1

    def text(self) -> str:
        with self._lock:
            return self._out.decode(errors="replace")

    def byte_count(self) -> int:
        """Bytes the guest wrote to THR (the test guests poll LSR once before each)."""
        with self._lock:
            return len(self._out)


class RecordingPorts:
    """A bus device that keeps every write in order and answers reads with ``answer``."""

    def __init__(self, answer: int = 0x5A) -> None:
        self.writes: list[tuple[int, int, int]] = []
        self.reads = 0
        self.answer = answer

    def read(self, offset: int, size: int) -> int:
        self.reads += 1
        return self.answer

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


class EchoRegister:
    """A bus device keeping every write in order; each read answers the last value
    (written or read) plus one, cut to the read's size, and becomes the last value."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, int, int]] = []
        self.reads = 0
        self.last = 0

    def read(self, offset: int, size: int) -> int:
        self.reads += 1
        self.last = (self.last + 1) & ((1 << (8 * size)) - 1)
        return self.last

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))
        self.last = value


def attach_echo_registers(m) -> tuple[EchoRegister, EchoRegister]:
    """exitstorm.elf's echo= registers on machine ``m``: at port 0x300 and at MMIO
    0xfeb20000 (its cmdline's port= and mmioecho=)."""
    port_dev, mmio_dev = EchoRegister(), EchoRegister()
    m.pio_bus.register(0x300, 1, port_dev)
    m.mmio_bus.register(0xFEB20000, 8, mmio_dev)
    return port_dev, mmio_dev


def echo_writes(rounds: int) -> tuple[list, list]:
    """The writes exitstorm.elf's echo= mode makes: at the port, at the MMIO register."""
    values = [(i * 0x9E3779B97F4A7C15) % 2**64 for i in range(rounds)]
    sized = [[(0, n, v & ((1 << (8 * n)) - 1)) for n in (1, 2, 4, 8)] for v in values]
    port = [w for ws in sized for w in ws[:3]] + [(0, 1, 0xA0 + i) for i in range(16)]
    return port, [w for ws in sized for w in ws]


def kvm_machine(guest: str, cmdline: str, pci_testdev: bool = False) -> tuple[Machine, CapturedConsole]:
    devices = [DeviceConfig(type="pci-testdev")] if pci_testdev else []
    cfg = VmConfig(accel="kvm", memory=64 * MiB, kernel=guest, cmdline=cmdline, devices=devices)
    console = CapturedConsole()
    return Machine(cfg, console=console), console


def tcg_machine(guest: str, cmdline: str, disks: list | None = None) -> tuple[Machine, CapturedConsole]:
    """The same on the translator (its exit counters are in each vCPU's stats())."""
    cfg = VmConfig(accel="tcg", memory=64 * MiB, kernel=guest, cmdline=cmdline, disks=disks or [])
    console = CapturedConsole()
    return Machine(cfg, console=console), console


def loop_totals(machine: Machine) -> dict[str, int]:
    totals = {"pio_served": 0, "mmio_served": 0, "returned": 0, "decoded": 0, "published_served": 0}
    for v in machine.vcpus:
        for k, n in v.loop_stats().items():
            totals[k] += n
    return totals


def run_to_end(machine: Machine, timeout: float = 60) -> int:
    """Start, wait for the guest's own exit (a watchdog quits it after ``timeout``)."""
    watchdog = threading.Timer(timeout, machine.quit)
    watchdog.daemon = True
    watchdog.start()
    try:
        machine.start()
        return machine.wait()
    finally:
        watchdog.cancel()


def wait_until(predicate, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# What exitloop.elf's console=N prints between "console<" and ">console": N bytes, this
# line over and over, cut at N.
CONSOLE_LINE = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-=+*"


def expected_console(n: int) -> str:
    return "".join(CONSOLE_LINE[:min(64, n - i)] for i in range(0, n, 64))


def printed_console(out: str) -> str:
    """What the guest printed between its console< and >console marks."""
    return out[out.index("console<") + len("console<"):out.index(">console")]


def serve_port_exits_to_hlt(vcpu, queued, write: Callable[[int, int, int], None],
                            read: Callable[[int, int], int] | None = None) -> None:
    """Run a translator vCPU through ``decoded_exits()`` to its HLT, ordered as the vCPU
    loop orders them: ``queued`` (its TcgPortWrites) is drained before an exit flagged
    DECODED_AFTER_QUEUED is served and after the HLT. A port write goes to
    ``write(port, size, value)``, a port read is answered with ``read(port, size)``;
    any other exit, or a read where ``read`` is None, fails the test."""
    run, state, access, exit_kind, _native = vcpu.decoded_exits()
    while True:
        code = run(state)
        if code > exits.DECODED_MMIO_READ:
            queued.drain()
            code -= exits.DECODED_AFTER_QUEUED
        if code == exits.DECODED_PIO_WRITE:
            write(access[0], access[1], access[2])
        elif code == exits.DECODED_PIO_READ and read is not None:
            access[3] = read(access[0], access[1])
        else:
            assert exit_kind(code) == exits.EXIT_HLT, f"exit {code} where only port accesses and HLT were expected"
            queued.drain()
            return
