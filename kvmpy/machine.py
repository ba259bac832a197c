"""The running PC: guest RAM, buses, vCPU threads and the run state around them.

The machine is accelerator-neutral: an accelerator (kvmpy.hv.protocol.Accel, KVM
or the translator) supplies the vCPUs and the Platform (interrupt delivery). Its
devices are kvmpy.pc's table, built by kvmpy.builder; the machine gives them a
DeviceContext and answers their GuestPower requests. It keeps the run state
(start, pause, resume, reset, stop, wait, close, events to listeners), is the host
of its vCPU threads (kvmpy.vcpu.runner.VcpuHost), and is the monitors' VmControl
(kvmpy.monitor.control).
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable

from .boot import layout
from .boot.firmware import (FirmwareMemory, boot_devices_of, fill_fw_cfg, find_image, firmware_kind,
                            firmware_ram_layout, read_image)
from .boot.loader import BootFiles, load_kernel
from .builder import PlacedDevice, build_devices
from .config import VmConfig
from .devices.acpi_pm import PM_TMR_OFFSET, AcpiPm
from .devices.bus import Bus
from .devices.context import DeviceContext
from .devices.timers import TimerWheel
from .devices.pci import PciBus
from .errors import ConfigError, HostError
from .events import EventLoop, Worker
from .hv.select import kvm_device_present, make_accel
from .memory import GuestMemory
from .net.announce import AnnounceParameters, Announcer     # imported now: the sandbox forbids it later
from .monitor.control import ControlError
from .pc import ACPI_PM, FW_CFG, SERIAL, MediaError, RemovableMedia, pc_devices, write_acpi_tables
from .vcpu.profile import BootProfile

if TYPE_CHECKING:  # pragma: no cover - neither imports this module
    from .hv.protocol import Vcpu
    from .hv.regs import Regs, SRegs
    from .vcpu.runner import VcpuThread

log = logging.getLogger(__name__)


def firmware_pci_windows_or_refuse(cfg: VmConfig, phys_bits: int):
    """layout.firmware_pci_windows, or ConfigError on key 'memory' where the RAM leaves
    no room for the 64-bit window below the vCPUs' physical address width (QEMU
    refuses such a machine too: "phys-bits too low")."""
    mmio_window, mmio64_window = layout.firmware_pci_windows(cfg.memory, phys_bits)
    if mmio64_window is None:
        most = layout.firmware_max_memory(phys_bits)
        clamped = (1 << phys_bits) - 1 <= layout.FIRMWARE_PCI_MMIO64_END
        why = f"the {phys_bits}-bit physical addresses the vCPUs announce" if clamped else "its end at 1T"
        raise ConfigError(f"{cfg.source}: key 'memory': {cfg.memory >> 20}M of RAM leaves no room for the "
                          f"firmware's 64-bit PCI window below {why} (at most {most >> 20}M)")
    return mmio_window, mmio64_window


def virtio_transports(placed: list[PlacedDevice]) -> list[PlacedDevice]:
    """The placed devices that are virtio PCI transports. Only a factory that makes one
    imports their module, so a VM without one never loads the virtio modules (about a
    sixteenth of the run path's imports); while that module is not loaded, no
    transport can exist."""
    module = sys.modules.get("kvmpy.devices.virtio.pci")
    if module is None:
        return []
    return [p for p in placed if isinstance(p.device, module.VirtioPciTransport)]


class Machine:
    def __init__(self, cfg: VmConfig, console=None, accel: str | None = None,
                 events: EventLoop | None = None) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.console = console
        self.firmware_kind = firmware_kind(cfg)
        self.firmware: FirmwareMemory | None = None
        image = None
        if self.firmware_kind != "none":
            image = read_image(find_image(self.firmware_kind, cfg.bios, cfg.source), cfg.source)
        # UEFI's variable store, checked and locked before anything else is set up
        self._vars_store: tuple[int, int, int] | None = None
        if cfg.firmware_vars:
            from .boot.firmware import open_vars_store
            self._vars_store = open_vars_store(cfg, len(image) if image is not None else 0)
        try:
            ram = firmware_ram_layout(cfg.memory) if image is not None else layout.ram_layout(cfg.memory)
        except BaseException:
            self._close_vars_store()
            raise
        try:
            self.memory = GuestMemory.anonymous(ram)
        except HostError as e:
            self._close_vars_store()
            raise HostError(f"{cfg.source}: memory {cfg.memory >> 20}M (-m or key 'memory'): {e}") from None
        if self.firmware_kind == "uefi":
            log.warning("UEFI is experimental%s", "" if cfg.firmware_vars else
                        ": without a variable store (firmware_vars, --firmware-vars) OVMF keeps its "
                        "variables in RAM, so boot entries and settings last until the VM stops")
        if image is not None:
            # Before the accelerator, which maps every region once.
            self.firmware = FirmwareMemory(self.memory, image)
        self.pio_bus = Bus("pio")
        self.mmio_bus = Bus("mmio")
        # ``--trace profile``: the breakdown of the run, printed as the machine closes
        self.profile = BootProfile(self.pio_bus, self.mmio_bus) if "profile" in cfg.trace else None
        self.started_at = 0.0
        self.exit_status: int | None = None
        self.exit_reason = ""
        self._state = "prelaunch"
        self._listeners: list[Callable[[str, dict], None]] = []
        # Run state. ``_lock`` guards what the vCPU threads read at their checkpoint:
        # ``_holds`` (why they must stay out of the guest: a user's stop, a reset in
        # progress, a register read, a triple fault awaiting its reset), ``_stopping``
        # and ``_parked``. ``_transition`` makes each monitor command and each reset one
        # step: a `cont` cannot release vCPUs in the middle of a reset.
        self._lock = threading.Condition()
        self._transition = threading.RLock()
        self._holds: collections.Counter[str] = collections.Counter()
        # Requests for wait(): the stop (first one wins) and one pending reset (resets
        # asked for while one is pending are one reset, as QEMU's reset request is a flag).
        self._stop_request: tuple[int, str] | None = None
        self._reset_request: tuple[bool, str] | None = None
        self._shutdown_emitted = False
        # Disks' requests kept by werror/rerror=stop, retried on `cont` (BlockErrors).
        self._io_retries: list[Callable[[], None]] = []
        self.control_pending = False
        self._stopping = False
        self._parked = 0
        self.threads: list = []
        self._announcer = None      # kvmpy.net.announce.Announcer, made by the first announce-self
        self._closers: list[Callable[[], None]] = [self._close_vars_store]
        # Parking the vCPUs for an I/O error waits for them, which the event loop
        # (where disks report errors) must never do.
        self._io_error_stops = Worker(f"{cfg.name or 'vm'}-io-error")
        self._closers.append(self._io_error_stops.close)
        # The one loop every device and service waits on (kvmpy.events); the caller's
        # when it gives one (it then closes it), else the machine's own.
        self.events = events if events is not None else EventLoop(name=f"{cfg.name or 'vm'}-events")
        if events is None:
            self._closers.append(self.events.close)
        self.events.start()
        self.accel = None
        self._boot_files: BootFiles | None = None
        # kernel, initrd and linuxboot ROM for a firmware boot with --kernel, read once
        self._linux_files: tuple[bytes, bytes | None, bytes] | None = None
        # Looked at once: a sandboxed process (kvmpy.sandbox) cannot look later.
        self._kvm_present = kvm_device_present()
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
        """The PC of kvmpy.pc's table, on the accelerator's platform."""
        # KVM keeps its timers in the kernel; the RTC's interrupt needs one in userspace.
        wheel = self.accel.timer_wheel
        if wheel is None:
            wheel = TimerWheel(name="rtc-timer", events=self.events)
            self._closers.append(wheel.close)
        host_bridge = None
        if self.firmware is not None:
            from .devices.pci.host_bridge import I440fxHostBridge
            host_bridge = self.host_bridge = I440fxHostBridge(on_pam=self.firmware.pam_changed)
        mmio_window, mmio64_window = layout.PCI_MMIO_WINDOW, None
        if self.firmware is not None:
            mmio_window, mmio64_window = firmware_pci_windows_or_refuse(self.cfg, self.accel.phys_bits)
        self.pci = PciBus(self.mmio_bus, self.pio_bus, self.platform,
                          mmio_window=mmio_window, io_window=layout.PCI_IO_WINDOW,
                          mmio64_window=mmio64_window, host_bridge=host_bridge)
        context = DeviceContext(
            name=self.name, platform=self.platform, events=self.events, config=self.cfg, power=self,
            timer_wheel=wheel, pci=self.pci, num_cpus=len(self.vcpus), console=self.console, block_errors=self,
            # The exits trace shows every port access, so none may be queued.
            port_write_queue=None if self.trace_exits else self.accel.port_write_queue,
            # Where every exit is reported (the exits trace, the profiler) the
            # accelerator answers no read itself, published ones included.
            published_port_reads=self.accel.published_port_reads)
        self._start_iothreads()
        self.devices = build_devices(pc_devices(self.cfg), context, self.pio_bus, self.mmio_bus, self.on_close)
        self._virtio_transports = virtio_transports(self.devices.placed)
        # query-iothreads is answered once the sandbox has closed and nothing can be
        # imported: the data plane's list is taken now where there can be an iothread
        # (a virtio device, a configured one); anywhere else there is none to list.
        self._list_iothreads: Callable[[], list[dict]] = lambda: []
        if self._virtio_transports or self.cfg.iothreads:
            from .devices.virtio.dataplane import iothreads
            self._list_iothreads = iothreads
        self._attach_firmware_vars()
        self._serve_pm_timer()
        self._attach_display()

    def _start_iothreads(self) -> None:
        """The configured iothreads (-object iothread, [[iothread]]) run from the start,
        also those no disk names, as QEMU starts one for each object and
        query-iothreads lists it: until a disk gives it queues it waits in poll()."""
        if not self.cfg.iothreads:
            return
        from .devices.virtio.dataplane import available as dataplane_available, iothread as named_iothread
        if not dataplane_available():
            log.warning("iothreads %s: kvmpy was built without its native data plane, which runs them; "
                        "no thread runs for them and the disks' queues are served by the event loop",
                        ", ".join(self.cfg.iothreads))
            return
        for name in self.cfg.iothreads:
            try:
                named_iothread(name)
            except OSError as e:
                raise HostError(f"{self.cfg.source}: iothread {name}: {e.strerror}") from None

    def _attach_firmware_vars(self) -> None:
        """UEFI's variable store as QEMU's second pflash, right below the firmware code:
        a flash device (kvmpy.devices.pflash) over the user's file, which it keeps."""
        self.firmware_vars = None
        if self._vars_store is None:
            return
        from .devices.pflash import Pflash
        fd, size, base = self._vars_store
        self.firmware_vars = Pflash(fd, size, name="pflash-vars")
        self._closers.append(self.firmware_vars.close)      # closers run last first: synced, then closed
        self.mmio_bus.register(base, size, self.firmware_vars)

    def _close_vars_store(self) -> None:
        if self._vars_store is not None:
            os.close(self._vars_store[0])
            self._vars_store = None

    def _serve_pm_timer(self) -> None:
        """Let the accelerator answer PM timer reads from the model's clock, and follow
        it when a restore moves it; not while the exits trace must show every access."""
        if self.trace_exits:
            return
        pm = self.devices.get(ACPI_PM, AcpiPm)
        port = self.devices.entry(ACPI_PM).slots[0].base + PM_TMR_OFFSET
        pm.timer_clock_changed.append(lambda clock: self.accel.serve_pm_timer(port, clock))
        self.accel.serve_pm_timer(port, pm.timer_clock)

    def _attach_display(self) -> None:
        """The screen the monitors and the VNC server see (kvmpy.display), where the
        machine has a VGA. The VNC socket is made here, before any sandbox."""
        self.display = None
        if self.cfg.display.vga == "none":
            return
        from .devices.vga import Vga
        from .display.display import Display
        from .pc import VGA, KeyboardControllerPorts
        keyboard = self.devices.get("i8042", KeyboardControllerPorts).controller
        self.display = Display(self.devices.get(VGA, Vga), keyboard, self.events)
        spec = self.cfg.display.vnc
        if spec:
            from .display.keymap import Keymap
            from .display.vnc import VncServer, parse_vnc_spec
            keymap = Keymap(self.cfg.display.keymap, self.cfg.display.keymaps_dir)
            try:
                server = VncServer(parse_vnc_spec(spec, f"vnc {spec}"), self.display, self.events, keymap,
                                   name=self.name)
            except OSError as e:
                raise HostError(f"{self.cfg.source}: vnc {spec}: {e.strerror or e}") from None
            self.display.vnc = server
            self._closers.append(server.close)

    def _boot(self) -> None:
        if self.firmware is not None:
            self._boot_firmware()
            return
        if not self.cfg.kernel:
            raise ConfigError(f"{self.cfg.source}: no kernel given (key 'kernel' or --kernel)")
        if self._boot_files is None:
            self._boot_files = BootFiles(self.cfg.kernel, self.cfg.initrd, self.cfg.multiboot_modules)
            self._closers.append(self._boot_files.close)
        self.rsdp = write_acpi_tables(self.devices, self.pci, self.memory, num_cpus=len(self.vcpus))
        self.boot_state = load_kernel(self.memory, self.cfg.kernel, self.cfg.cmdline, self.cfg.initrd,
                                      rsdp_addr=self.rsdp, mem_size=self.cfg.memory, files=self._boot_files)
        if self.display is not None:
            from .boot.screen import announce_vga_text
            announce_vga_text(self.memory)
        self.accel.load_boot_state(self.boot_state)

    def _boot_firmware(self) -> None:
        """Power-on for the firmware: ROM state back, fw_cfg filled; the vCPUs are at
        the reset vector already (both accelerators make them so, and reset them so)."""
        self.host_bridge.reset()            # PAM closed: also protects the shadow again
        self.firmware.reset()
        if self.firmware_vars is not None:
            self.firmware_vars.reset()
        from .devices.fw_cfg import FwCfg
        fw_cfg = self.devices.get(FW_CFG, FwCfg)
        serial_port = None
        if self.cfg.serial != "none":
            serial_port = self.devices.entry(SERIAL).slots[0].base
        from .pc import acpi_loader_files
        extra: dict[str, bytes] = acpi_loader_files(self.devices, self.pci, len(self.vcpus))
        first: tuple[str, ...] = ()
        if self.cfg.kernel:
            # -kernel with firmware: QEMU's way, the option ROM loads it from fw_cfg.
            from .boot.firmware import LINUXBOOT_BOOT_PATH, LINUXBOOT_ROM_FILE, linux_boot_items
            if self._linux_files is None:
                self._linux_files = self._read_linux_files()
            kernel, initrd, rom = self._linux_files
            linux_boot_items(fw_cfg, kernel, initrd, self.cfg.cmdline or "", self.cfg.memory, self.cfg.source)
            extra[LINUXBOOT_ROM_FILE] = rom
            first = (LINUXBOOT_BOOT_PATH,)
        fill_fw_cfg(fw_cfg, self.cfg, len(self.vcpus), boot_devices_of(self.devices), serial_port,
                    extra_files=extra, first_boot_paths=first)

    def _read_linux_files(self) -> tuple[bytes, bytes | None, bytes]:
        from .boot.firmware import find_linuxboot_rom

        def read(path: str, what: str) -> bytes:
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError as e:
                raise ConfigError(f"{self.cfg.source}: {what} {path}: {e.strerror}") from None
        rom_path = find_linuxboot_rom(self.cfg.source)
        return (read(self.cfg.kernel, "kernel"),
                read(self.cfg.initrd, "initrd") if self.cfg.initrd else None,
                read(rom_path, "option ROM"))

    # --- running ----------------------------------------------------------------------
    @property
    def trace_exits(self) -> bool:
        return "exits" in self.cfg.trace

    def start(self) -> None:
        from .vcpu.runner import VcpuThread
        self.started_at = time.time()
        with self._transition:
            # A `stop` that came in before the start (the monitors listen first) holds
            # the vCPUs from their first instruction, as QEMU's -S does until `cont`.
            if self._state == "prelaunch":
                self._set_state("running")
            self.threads = [VcpuThread(self, v, i) for i, v in enumerate(self.vcpus)]
            for t in self.threads:
                t.start()

    def wait(self) -> int:
        """Serve lifecycle requests until the VM ends; returns the exit status.
        A stop wins over any reset still pending, so `quit` is never queued behind resets."""
        while True:
            with self._lock:
                while self._stop_request is None and self._reset_request is None:
                    self._lock.wait()
                stop, reset = self._stop_request, self._reset_request
                self._reset_request = None
            if stop is not None:
                self._stop_vcpus()
                if self.exit_status is None:
                    self.exit_status, self.exit_reason = stop
                break
            guest, reason = reset
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

    def _hold(self, why: str) -> None:
        """Bring every vCPU out of the guest and keep it at its checkpoint until
        ``_release(why)``; returns once all are there (or the VM is stopping)."""
        with self._lock:
            self._holds[why] += 1
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

    def _release(self, why: str, all_of_them: bool = False) -> None:
        with self._lock:
            if all_of_them:
                del self._holds[why]
            elif self._holds[why] > 0:
                self._holds[why] -= 1
            self._holds = +self._holds          # drop reasons counted down to zero
            if not self._holds:
                self.control_pending = self._stopping
                self._lock.notify_all()

    def _do_reset(self, guest: bool, reason: str) -> None:
        with self._transition:
            self._hold("reset")
            try:
                self.devices.reset()
                # The disks' resets dropped the requests these would retry.
                self._io_retries.clear()
                self.accel.reset()
                self._boot()
            finally:
                # A vCPU that triple-faulted or asked for the reset waited for it; a user's stop stays.
                self._release("triple-fault", all_of_them=True)
                self._release("guest-reset", all_of_them=True)
                self._release("reset")
            self._emit("RESET", {"guest": guest, "reason": reason})

    # --- called by vCPU threads ---------------------------------------------------------
    def vcpu_checkpoint(self, thread: VcpuThread) -> bool:
        with self._lock:
            while True:
                if self._stopping:
                    return False
                if not self._holds:
                    return True
                self._parked += 1
                self._lock.notify_all()
                self._lock.wait()
                self._parked -= 1

    def vcpu_halted(self, thread: VcpuThread) -> None:
        self.accel.wait_halted(thread.index)

    def vcpu_exited(self, thread: VcpuThread) -> None:
        with self._lock:
            self._lock.notify_all()
        if not self._stopping and all(not t.is_alive() or t is thread for t in self.threads):
            self.request_shutdown(1, guest=False, reason="vcpus-exited")

    def vcpu_internal_error(self, thread: VcpuThread, message: str) -> None:
        print(f"kvmpy: vCPU {thread.index}: {message}", file=sys.stderr, flush=True)
        dump = self._register_dump(thread.vcpu)
        if dump:
            print(dump, file=sys.stderr, flush=True)
        self._set_state("internal-error")
        self.request_shutdown(1, guest=False, reason="internal-error", message=message)
        with self._lock:
            self._stopping = True
            self.control_pending = True

    def _register_dump(self, vcpu: Vcpu) -> str:
        """QEMU-style register dump and Code= line; called on the vCPU's own thread."""
        from .vcpu.trace import register_dump
        try:
            return register_dump(vcpu.get_regs(), vcpu.get_sregs(), self.memory)
        except Exception as e:  # noqa: BLE001 - the error message above must not be lost to this
            log.debug("register dump failed", exc_info=True)
            return f"(registers unavailable: {e})"

    def guest_triple_fault(self, thread: VcpuThread) -> None:
        log.info("vCPU %d: triple fault (shutdown); resetting like a PC", thread.index)
        # Every vCPU waits at its checkpoint until the reset (or a stop) is done; this
        # one cannot wait for itself to park, so the hold is only set here.
        with self._lock:
            self._holds["triple-fault"] += 1
            self.control_pending = True
        self.request_reset(guest=True, reason="guest-reset")

    # --- requests (any thread) ---------------------------------------------------------
    def request_shutdown(self, status: int, guest: bool, reason: str, message: str = "") -> None:
        if not self._shutdown_emitted:
            self._shutdown_emitted = True
            self._emit("SHUTDOWN", {"guest": guest, "reason": reason})
        with self._lock:
            if self._stop_request is None:
                self._stop_request = (status, message or reason)
            self.control_pending = True
            self._lock.notify_all()

    def request_reset(self, guest: bool, reason: str) -> None:
        with self._lock:
            if self._reset_request is None:
                self._reset_request = (guest, reason)
            self._lock.notify_all()

    # --- GuestPower: what the guest asks through its devices (any vCPU thread) ------------
    def guest_reset(self) -> None:
        # A PC's reset (0xCF9, the keyboard controller, port 0x92) takes effect at
        # once: no vCPU may run on past it. SeaBIOS's reboot writes 0xCF9 and then
        # executes int3 to triple-fault should the write not have reset the machine.
        with self._lock:
            self._holds["guest-reset"] += 1
            self.control_pending = True
        self.request_reset(guest=True, reason="guest-reset")

    def guest_power_off(self, status: int) -> None:
        self.request_shutdown(status & 0xFF, guest=True, reason="guest-shutdown")
        # The asking vCPU must not run on past its power-off.
        with self._lock:
            self._stopping = True
            self.control_pending = True

    # --- BlockErrors: a disk's host I/O error (event loop thread) ---------------------------
    def io_error(self, device: str, node_name: str, operation: str, action: str, nospace: bool,
                 reason: str, retry: Callable[[], None] | None = None) -> None:
        # As QEMU's blk_error_action: the event first, so BLOCK_IO_ERROR comes before STOP.
        self._emit("BLOCK_IO_ERROR", {"device": device, "node-name": node_name, "operation": operation,
                                      "action": action, "nospace": nospace, "reason": reason})
        if action != "stop":
            return
        self._io_error_stops.submit(lambda: self._stop_for_io_error(retry))

    def _stop_for_io_error(self, retry: Callable[[], None] | None) -> None:
        with self._transition:
            if retry is not None:
                self._io_retries.append(retry)
            # A VM already paused stays "paused", as QEMU's vm_stop leaves a stopped VM
            # alone; its `cont` retries the request all the same.
            if self._state != "running" or self._stopping:
                return
            self._hold("io-error")
            self._hold_native_data_planes(True)
            self._set_state("io-error")
        self._emit("STOP", {})

    # --- VmControl (monitor) ------------------------------------------------------------
    def status(self) -> str:
        return self._state

    def pause(self) -> None:
        with self._transition:
            if self._state not in ("running", "prelaunch"):
                return
            self._hold("user")
            self._hold_native_data_planes(True)
            self._set_state("paused")
        self._emit("STOP", {})

    def resume(self) -> None:
        with self._transition:
            if self._state == "paused":
                self._release("user")
            elif self._state == "io-error":
                self._release("io-error", all_of_them=True)
            else:
                return
            self._set_state("running")
            self._hold_native_data_planes(False)
            retries, self._io_retries = self._io_retries, []
        self._emit("RESUME", {})
        # A request that fails again stops the VM again, as in QEMU.
        for retry in retries:
            self.events.call_soon(retry)

    def _hold_native_data_planes(self, held: bool) -> None:
        """While the VM is not running its disks' queues are the event loop's alone
        (as without native data planes), so their indices are all in Python."""
        for placed in self._virtio_transports:
            placed.device.hold_native(held)

    def reset(self) -> None:
        self.request_reset(guest=False, reason="host-qmp-system-reset")

    def powerdown(self) -> None:
        self._emit("POWERDOWN", {})
        self.devices.get(ACPI_PM, AcpiPm).press_power_button()

    def quit(self) -> None:
        self.request_shutdown(0, guest=False, reason="host-qmp-quit")

    def vcpu_registers(self) -> list[tuple[Regs, SRegs]]:
        """[(Regs, SRegs)] per vCPU, read with the vCPUs held outside the guest."""
        with self._transition:
            self._hold("registers")
            try:
                return [(v.get_regs(), v.get_sregs()) for v in self.vcpus]
            finally:
                self._release("registers")

    def kvm_info(self) -> dict:
        return {"enabled": self.accel.name == "kvm", "present": self._kvm_present}

    def cpus(self) -> list[dict]:
        out = []
        for i, t in enumerate(self.threads or [None] * len(self.vcpus)):
            # Before start() there are no vCPU threads yet: the process stands in.
            thread_id = t.native_id if t is not None and t.native_id else os.getpid()
            out.append({"cpu-index": i, "thread-id": thread_id,
                        "qom-path": f"/machine/unattached/device[{i}]", "target": "x86_64",
                        "props": {"core-id": i, "thread-id": 0, "socket-id": 0}})
        return out

    def block_devices(self) -> list[dict]:
        return self.devices.query("block")

    def network_devices(self) -> list[dict]:
        return self.devices.query("net")

    def iothreads(self) -> list[dict]:
        return self._list_iothreads()

    def announce_self(self, params: AnnounceParameters) -> None:
        with self._transition:      # two monitors' first announce-self make one announcer
            if self._announcer is None:
                self._announcer = Announcer(self.events, self._nics_to_announce)
                self._closers.append(self._announcer.close)
        self._announcer.start(params)

    def _nics_to_announce(self) -> list:
        """(name as info network shows it, its announce round) per NIC."""
        return [(f"net{placed.entry.options['index']}", placed.device.device.announce_self)
                for placed in self._virtio_transports if placed.entry.query == "net"]

    def eject(self, device: str, force: bool = False) -> None:
        try:
            RemovableMedia(self.devices).eject(device, force)
        except MediaError as e:
            raise ControlError(str(e)) from None

    def change_medium(self, device: str, filename: str, format: str | None = None) -> None:
        try:
            RemovableMedia(self.devices).change(device, filename, format)
        except MediaError as e:
            raise ControlError(str(e)) from None

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
        if self.profile is not None:
            self.profile.report()
        for fn in reversed(self._closers):
            try:
                fn()
            except Exception:
                log.debug("close hook failed", exc_info=True)
        self._closers.clear()
        if self.accel is not None:
            self.accel.close()
            self.accel = None

    # --- DisplayControl (monitor/control.py) ---------------------------------------------
    def _display_or_fail(self):
        from .monitor.control import ControlError
        if self.display is None:
            raise ControlError("There is no QemuConsole I can screendump from.")
        return self.display

    def screendump(self, filename: str, fmt: str = "ppm") -> None:
        from .monitor.control import ControlError
        display = self._display_or_fail()
        try:
            display.screendump(filename, fmt)
        except OSError as e:
            # The sandbox (on by default) refuses opening files once the VM runs.
            hint = " (with the sandbox on, kvmpy opens no new files: --sandbox off)" \
                if e.errno == errno.EACCES else ""
            raise ControlError(f"Could not open '{filename}': {e.strerror}{hint}") from None

    def send_keys(self, keys: list[int], hold_ms: int = 100) -> None:
        self._display_or_fail().send_keys(keys, hold_ms)

    def vnc_info(self) -> dict:
        display = self.display
        if display is None or display.vnc is None:
            return {"enabled": False}
        return display.vnc.info()

    def set_vnc_password(self, password: str) -> None:
        from .monitor.control import ControlError
        display = self.display
        if display is None or display.vnc is None:
            raise ControlError("Could not set password")
        display.vnc.password = password
