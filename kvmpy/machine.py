"""The PC machine: guest RAM, buses, platform devices, vCPU threads, lifecycle.

The machine is accelerator-neutral: ``KvmAccel`` and ``TcgAccel`` supply the
vCPUs and the Platform (interrupt delivery); everything else is shared. It also
implements the monitor's VmControl protocol (status/pause/resume/reset/...).
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from typing import Callable

from .boot import layout
from .boot.loader import load_kernel
from .config import VmConfig
from .devices.bus import Bus
from .errors import ConfigError, HostError
from .events import EventLoop
from .memory import GuestMemory

log = logging.getLogger(__name__)

PM_BASE = 0x600
SCI_IRQ = 9
COM1_BASE, COM1_IRQ = 0x3F8, 4


class Machine:
    def __init__(self, cfg: VmConfig, console=None, accel: str | None = None,
                 events: EventLoop | None = None) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.console = console
        try:
            self.memory = GuestMemory.anonymous(layout.ram_layout(cfg.memory))
        except HostError as e:
            raise HostError(f"{cfg.source}: memory {cfg.memory >> 20}M (-m or key 'memory'): {e}") from None
        self.pio_bus = Bus("pio")
        self.mmio_bus = Bus("mmio")
        self.started_at = 0.0
        self.exit_status: int | None = None
        self.exit_reason = ""
        self._state = "prelaunch"
        self._listeners: list[Callable[[str, dict], None]] = []
        self._requests: "queue.Queue[tuple]" = queue.Queue()
        self._lock = threading.Condition()
        self.control_pending = False
        self._paused = False
        self._stopping = False
        self._parked = 0
        self.threads: list = []
        self._closers: list[Callable[[], None]] = []
        # The one loop every device and service waits on (kvmpy.events); the caller's
        # when it gives one (it then closes it), else the machine's own.
        self.events = events if events is not None else EventLoop(name=f"{cfg.name or 'vm'}-events")
        if events is None:
            self._closers.append(self.events.close)
        self.events.start()
        self.block_info: list[dict] = []
        self.net_info: list[dict] = []
        self.accel = None
        self.accel_name = accel or cfg.accel
        try:
            self.accel = make_accel(self.accel_name, self)
            self.platform = self.accel.platform
            self.vcpus = self.accel.vcpus
            self._build_devices()
            self._boot()
        except BaseException:
            self.close()
            raise

    # --- construction ------------------------------------------------------------
    def _build_devices(self) -> None:
        from .devices.serial import Serial16550
        from .devices.i8042 import I8042, KBD_IRQ
        from .devices.rtc import RTC_IRQ, RtcCmos
        from .devices.legacy import register_legacy_ports
        from .devices.acpi_pm import AcpiPm, PM_IO_LENGTH
        plat = self.platform
        con = self.console
        self.serial = Serial16550(irq=lambda level: plat.set_irq_level(COM1_IRQ, level),
                                  out=con.buffered_write if con is not None else (lambda data: None),
                                  on_rx_space=con.rx_space_available if con is not None else None,
                                  tx_batching=self._coalesced_port(COM1_BASE))
        self.pio_bus.register(COM1_BASE, 8, self.serial)
        if con is not None:
            con.attach(self.serial)
        guest_reset = lambda: self.request_reset(guest=True, reason="guest-reset")  # noqa: E731
        self.i8042 = I8042(on_reset=guest_reset, irq_kbd=lambda level: plat.set_irq_level(KBD_IRQ, level))
        self.i8042.register(self.pio_bus)
        low = min(self.cfg.memory, layout.PCI_HOLE_START)
        # KVM keeps its timers in the kernel; the RTC's interrupt needs one in userspace.
        wheel = getattr(self.accel, "timer_wheel", None)
        if wheel is None:
            from .devices.irqchip import TimerWheel
            wheel = TimerWheel(name="rtc-timer")
            self._closers.append(wheel.close)
        self.rtc = RtcCmos(low, self.cfg.memory - low, num_cpus=len(self.vcpus),
                           irq=lambda level: plat.set_irq_level(RTC_IRQ, level), timer_wheel=wheel)
        self._closers.append(self.rtc.close)
        self.pio_bus.register(0x70, 2, self.rtc)
        # Port 0x61 belongs to the PIT: KVM's in-kernel one, or the translator's irqchip.
        register_legacy_ports(self.pio_bus, on_exit=self._debug_exit, on_reset=guest_reset, port_b=False)
        self.acpi_pm = AcpiPm(on_sleep=self._acpi_sleep, sci=lambda level: plat.set_irq_level(SCI_IRQ, level))
        self.pio_bus.register(PM_BASE, PM_IO_LENGTH, self.acpi_pm)
        self.resettable = [self.serial, self.i8042, self.rtc, self.acpi_pm]
        self._build_pci()

    def _coalesced_port(self, port: int):
        """A tx_batching callback queueing OUTs to ``port`` in KVM's coalesced ring
        (None where the accelerator has none, and under ``trace = ["exits"]``, whose
        trace shows every port access)."""
        co = getattr(self.accel, "coalesced", None)
        if co is None or "exits" in getattr(self.cfg, "trace", ()):
            return None
        return lambda on: co.set_zone(port, 1, on)

    def _build_pci(self) -> None:
        from .devices.pci import PciBus, PciConfigIo
        self.pci = PciBus(self.mmio_bus, self.pio_bus, self.platform,
                          mmio_window=layout.PCI_MMIO_WINDOW, io_window=layout.PCI_IO_WINDOW)
        guest_reset = lambda: self.request_reset(guest=True, reason="guest-reset")  # noqa: E731
        self.pio_bus.register(0xCF8, 8, ConfigPortsWithResetControl(PciConfigIo(self.pci), guest_reset))
        for i, disk in enumerate(self.cfg.disks):
            self._add_disk(i, disk)
        for i, net in enumerate(self.cfg.nets):
            self._add_net(i, net)

    def _add_disk(self, index: int, disk) -> None:
        from .block import open_image
        from .devices.virtio.blk import VirtioBlk
        from .devices.virtio.pci import VirtioPciTransport
        driver = open_image(disk.path, disk.format, read_only=disk.readonly, guard_probe=True)
        self.on_close(driver.close)
        if disk.format is None:
            # QEMU's warning: after the open, so that a refused image is one line.
            if driver.format == "raw":
                log.warning("Image format was not specified for '%s' and probing guessed raw. Automatically "
                            "detecting the format is dangerous for raw images, write operations on block 0 "
                            "will be restricted. Specify the 'raw' format explicitly to remove the "
                            "restrictions.", disk.path)
            else:
                log.warning("Image format was not specified for '%s' and probing guessed %s. Specify the "
                            "format explicitly (format=%s).", disk.path, driver.format, driver.format)
        blk = VirtioBlk(driver, serial=disk.serial, read_only=disk.readonly, name=f"virtio-blk{index}")
        dev = VirtioPciTransport(self.platform, self.events, blk)
        self.on_close(dev.close)
        slot = self.pci.add(dev)
        self.resettable.append(dev)
        self.block_info.append({
            "device": f"virtio{index}", "qdev": f"/machine/peripheral-anon/device[{slot}]/virtio-backend",
            "locked": False, "removable": False, "type": "unknown", "tray_open": False,
            "inserted": {"file": disk.path, "drv": driver.format, "ro": bool(driver.read_only or disk.readonly),
                         "encrypted": False, "backing_file_depth": 0, "image": {
                             "filename": disk.path, "format": driver.format, "virtual-size": driver.size}},
        })

    def _add_net(self, index: int, net) -> None:
        from .devices.virtio.net import VirtioNet
        from .devices.virtio.pci import VirtioPciTransport
        from .tap import TapNetwork
        tapnet = TapNetwork.open(ifname=net.ifname or None, bridge=net.bridge or None, mac=net.mac or None,
                                 vm_name=self.name, index=index)
        self.on_close(tapnet.close)
        nic = VirtioNet(tapnet.tap, mac=tapnet.mac, vm_name=self.name, index=index, name=f"virtio-net{index}")
        dev = VirtioPciTransport(self.platform, self.events, nic)
        self.on_close(dev.close)
        self.pci.add(dev)
        self.resettable.append(dev)
        self.net_info.append({"name": f"net{index}", "type": "tap", "ifname": tapnet.tap.name,
                              "mac": ":".join(f"{b:02x}" for b in tapnet.mac), "bridge": tapnet.bridge or ""})

    def _boot(self) -> None:
        from .boot.acpi import PciRoot, build_acpi_tables
        if not self.cfg.kernel:
            raise ConfigError(f"{self.cfg.source}: no kernel given (key 'kernel' or --kernel)")
        windows = self.pci.windows()
        root = PciRoot(mem32=((windows["mmio"].base, windows["mmio"].end),), prt=tuple(self.pci.intx_routes()))
        # The MADT announces the vCPUs that exist (the translator may run fewer than asked).
        self.rsdp = build_acpi_tables(self.memory, layout.ACPI_BASE, num_cpus=len(self.vcpus),
                                      pm_base=PM_BASE, sci_irq=SCI_IRQ, pci_root=root)
        self.boot_state = load_kernel(self.memory, self.cfg.kernel, self.cfg.cmdline, self.cfg.initrd,
                                      rsdp_addr=self.rsdp, mem_size=self.cfg.memory)
        self.accel.load_boot_state(self.boot_state)

    # --- running ----------------------------------------------------------------------
    def start(self) -> None:
        from .vcpu.runner import VcpuThread
        self.started_at = time.time()
        self._set_state("running")
        self.threads = [VcpuThread(self, v, i) for i, v in enumerate(self.vcpus)]
        for t in self.threads:
            t.start()

    def wait(self) -> int:
        """Serve lifecycle requests until the VM ends; returns the exit status."""
        while True:
            req = self._requests.get()
            kind = req[0]
            if kind == "stop":
                _, status, reason = req
                self._stop_vcpus()
                if self.exit_status is None:
                    self.exit_status, self.exit_reason = status, reason
                break
            if kind == "reset":
                _, guest, reason = req
                if self.cfg.no_reboot:
                    self._stop_vcpus()
                    self.exit_status, self.exit_reason = 0, "reset with no_reboot"
                    self._emit("SHUTDOWN", {"guest": guest, "reason": reason})
                    break
                self._do_reset(guest, reason)
        self._set_state("shutdown")
        self.close()
        return self.exit_status or 0

    def _stop_vcpus(self) -> None:
        with self._lock:
            self._stopping = True
            self.control_pending = True
            self._lock.notify_all()
        for v in self.vcpus:
            v.kick()
        me = threading.current_thread()
        deadline = time.monotonic() + 5
        for t in self.threads:
            while t is not me and t.is_alive() and time.monotonic() < deadline:
                for v in self.vcpus:
                    v.kick()
                t.join(0.05)

    def _park_all(self) -> None:
        """Bring every vCPU out of the guest and hold it at its checkpoint."""
        with self._lock:
            self._paused = True
            self.control_pending = True
        alive = [t for t in self.threads if t.is_alive()]
        deadline = time.monotonic() + 5
        while True:
            for v in self.vcpus:
                v.kick()
            with self._lock:
                if self._parked >= len([t for t in alive if t.is_alive()]) or self._stopping:
                    return
                self._lock.wait(0.02)
            if time.monotonic() > deadline:
                log.warning("vCPUs did not stop within 5 s")
                return

    def _unpark_all(self) -> None:
        with self._lock:
            self._paused = False
            self.control_pending = self._stopping
            self._lock.notify_all()

    def _do_reset(self, guest: bool, reason: str) -> None:
        was_paused = self._state == "paused"
        self._park_all()
        for dev in self.resettable:
            reset = getattr(dev, "reset", None)
            if reset:
                reset()
        self.accel.reset()
        self._boot()
        self._emit("RESET", {"guest": guest, "reason": reason})
        if not was_paused:
            self._unpark_all()

    # --- called by vCPU threads ---------------------------------------------------------
    def vcpu_checkpoint(self, thread) -> bool:
        with self._lock:
            while True:
                if self._stopping:
                    return False
                if not self._paused:
                    return True
                self._parked += 1
                self._lock.notify_all()
                self._lock.wait()
                self._parked -= 1

    def vcpu_halted(self, thread) -> None:
        wait = getattr(self.accel, "wait_halted", None)
        if wait is not None:
            wait(thread.index)
        else:
            time.sleep(0.001)

    def vcpu_exited(self, thread) -> None:
        with self._lock:
            self._lock.notify_all()
        if not self._stopping and all(not t.is_alive() or t is thread for t in self.threads):
            self.request_shutdown(1, guest=False, reason="vcpus-exited")

    def vcpu_internal_error(self, thread, message: str) -> None:
        print(f"kvmpy: vCPU {thread.index}: {message}", file=sys.stderr, flush=True)
        dump = self._register_dump(thread.vcpu)
        if dump:
            print(dump, file=sys.stderr, flush=True)
        self._set_state("internal-error")
        self.request_shutdown(1, guest=False, reason="internal-error", message=message)
        with self._lock:
            self._stopping = True
            self.control_pending = True

    def _register_dump(self, vcpu) -> str:
        """QEMU-style register dump and Code= line; called on the vCPU's own thread."""
        from .vcpu.trace import register_dump
        try:
            return register_dump(vcpu.get_regs(), vcpu.get_sregs(), self.memory)
        except Exception as e:  # noqa: BLE001 - the error message above must not be lost to this
            log.debug("register dump failed", exc_info=True)
            return f"(registers unavailable: {e})"

    def guest_triple_fault(self, thread) -> None:
        log.info("vCPU %d: triple fault (shutdown); resetting like a PC", thread.index)
        self.request_reset(guest=True, reason="guest-reset")
        # Hold this vCPU until the reset (or stop) has been handled.
        with self._lock:
            self._paused = True
            self.control_pending = True

    # --- requests (any thread) ---------------------------------------------------------
    def request_shutdown(self, status: int, guest: bool, reason: str, message: str = "") -> None:
        if not getattr(self, "_shutdown_emitted", False):
            self._shutdown_emitted = True
            self._emit("SHUTDOWN", {"guest": guest, "reason": reason})
        self._requests.put(("stop", status, message or reason))
        with self._lock:
            self.control_pending = True

    def request_reset(self, guest: bool, reason: str) -> None:
        self._requests.put(("reset", guest, reason))

    def _debug_exit(self, value: int) -> None:
        self.request_shutdown(value & 0xFF, guest=True, reason="guest-shutdown")
        with self._lock:
            self._stopping = True
            self.control_pending = True

    def _acpi_sleep(self, slp_typ: int) -> None:
        from .devices.acpi_pm import SLP_TYP_S5
        if slp_typ != SLP_TYP_S5:
            log.info("guest asked for sleep type %d; only S5 (soft off) is supported", slp_typ)
            return
        self.request_shutdown(0, guest=True, reason="guest-shutdown")
        with self._lock:
            self._stopping = True
            self.control_pending = True

    # --- VmControl (monitor) ------------------------------------------------------------
    def status(self) -> str:
        return self._state

    def pause(self) -> None:
        if self._state != "running":
            return
        self._park_all()
        self._set_state("paused")
        self._emit("STOP", {})

    def resume(self) -> None:
        if self._state != "paused":
            return
        self._unpark_all()
        self._set_state("running")
        self._emit("RESUME", {})

    def reset(self) -> None:
        self.request_reset(guest=False, reason="host-qmp-system-reset")

    def powerdown(self) -> None:
        self._emit("POWERDOWN", {})
        self.acpi_pm.press_power_button()

    def quit(self) -> None:
        self.request_shutdown(0, guest=False, reason="host-qmp-quit")

    def vcpu_registers(self) -> list:
        """[(Regs, SRegs)] per vCPU, read with the vCPUs held outside the guest."""
        was_running = self._state == "running"
        if was_running:
            self._park_all()
        try:
            return [(v.get_regs(), v.get_sregs()) for v in self.vcpus]
        finally:
            if was_running:
                self._unpark_all()

    def kvm_info(self) -> dict:
        return {"enabled": self.accel.name == "kvm", "present": os.path.exists("/dev/kvm")}

    def cpus(self) -> list[dict]:
        out = []
        for i, t in enumerate(self.threads or [None] * len(self.vcpus)):
            out.append({"cpu-index": i, "thread-id": getattr(t, "native_id", None) or os.getpid(),
                        "qom-path": f"/machine/unattached/device[{i}]", "target": "x86_64",
                        "props": {"core-id": i, "thread-id": 0, "socket-id": 0}})
        return out

    def block_devices(self) -> list[dict]:
        return list(self.block_info)

    def network_devices(self) -> list[dict]:
        return list(self.net_info)

    def add_event_listener(self, callback: Callable[[str, dict], None]) -> None:
        self._listeners.append(callback)

    def remove_event_listener(self, callback: Callable[[str, dict], None]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def _emit(self, event: str, data: dict) -> None:
        for cb in list(self._listeners):
            try:
                cb(event, data)
            except Exception:
                log.debug("event listener failed", exc_info=True)

    def _set_state(self, state: str) -> None:
        if self._state != "internal-error" or state == "shutdown":
            self._state = state

    def on_close(self, fn: Callable[[], None]) -> None:
        self._closers.append(fn)

    def close(self) -> None:
        for fn in reversed(self._closers):
            try:
                fn()
            except Exception:
                log.debug("close hook failed", exc_info=True)
        self._closers.clear()
        if self.accel is not None:
            self.accel.close()
            self.accel = None


class ConfigPortsWithResetControl:
    """Ports 0xCF8-0xCFF: PCI config mechanism #1, except a byte write to 0xCF9,
    which is the PIIX reset control register (the FADT's RESET_REG)."""

    RESET_CONTROL = 1
    RESET_CPU = 0x04

    def __init__(self, config_io, on_reset: Callable[[], None]) -> None:
        self.config_io = config_io
        self.on_reset = on_reset
        self._reset_control = 0

    def read(self, offset: int, size: int) -> int:
        if offset == self.RESET_CONTROL and size == 1:
            return self._reset_control
        return self.config_io.read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == self.RESET_CONTROL and size == 1:
            self._reset_control = value & 0x0E
            if value & self.RESET_CPU:
                self.on_reset()
            return
        self.config_io.write(offset, size, value)


def kvm_usable() -> tuple[bool, str]:
    """Can a KVM VM be created here? (False, reason) when not."""
    from .kvm.api import KVM_DEVICE, Kvm
    if not os.path.exists(KVM_DEVICE):
        return False, f"{KVM_DEVICE} does not exist (no KVM module loaded, or not exposed to this container)"
    try:
        k = Kvm()
        k.close()
    except OSError as e:
        return False, f"{KVM_DEVICE}: {e.strerror or e}"
    return True, ""


def _software_nested_kvm() -> bool:
    return os.path.isdir("/sys/module/kvm_pvm")


def make_accel(name: str, machine: Machine):
    if name == "auto":
        # KVM when it can run a general guest. A software-nested backend (kvm_pvm)
        # emulates guest kernel code and fails on unmodified Linux: the translator is better.
        ok, _ = kvm_usable()
        name = "kvm" if ok and not _software_nested_kvm() else "tcg"
    if name == "kvm":
        ok, why = kvm_usable()
        if not ok:
            from .errors import UserError

            class KvmUnavailable(UserError):
                exit_status = 1
            raise KvmUnavailable(f"--enable-kvm: KVM is not usable: {why}")
        from .kvm.accel import KvmAccel
        return KvmAccel(machine)
    if name == "tcg":
        from .vcpu.tcg_accel import TcgAccel
        return TcgAccel(machine)
    raise ConfigError(f"unknown accelerator {name!r}")
