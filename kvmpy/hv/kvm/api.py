"""Thin typed wrappers over /dev/kvm ioctls: Kvm (system), Vm, KvmVcpu.

Every failing ioctl raises KvmError carrying the ioctl's name and the errno text.
All structs come from the compiler-checked cffi module (``_build.py``).
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import threading

from .. import exits
from ..exits import DecodedExits
from ..regs import DTable, Regs, Segment, SRegs, GPR_NAMES, SEGMENT_NAMES
from ._kvm_cffi import ffi, lib

KVM_DEVICE = os.environ.get("KVMPY_KVM_DEVICE", "/dev/kvm")  # override for unusual hosts
KICK_SIGNAL = signal.SIGUSR1


class KvmError(OSError):
    """A KVM ioctl failed: ``KvmError("KVM_CREATE_VM", errno)``."""

    def __init__(self, what: str, err: int) -> None:
        super().__init__(err, f"{what}: {os.strerror(err)}")
        self.what = what


def _ioctl(fd: int, name: str, arg=0) -> int:
    request = getattr(lib, name)
    while True:
        if isinstance(arg, int):
            ret = lib.ioctl(fd, request, ffi.cast("unsigned long", arg))
        else:
            ret = lib.ioctl(fd, request, arg)
        if ret >= 0:
            return ret
        err = ffi.errno
        if err != errno.EINTR:
            raise KvmError(name, err)


# Capabilities kvmpy uses, with what each is for (shown by `kvmpy info kvm`).
CAPABILITIES = {
    "IRQCHIP": ("KVM_CAP_IRQCHIP", "in-kernel PIC/IOAPIC/LAPIC", True),
    "PIT2": ("KVM_CAP_PIT2", "in-kernel 8254 PIT", True),
    "USER_MEMORY": ("KVM_CAP_USER_MEMORY", "guest RAM from our mmap", True),
    "SET_TSS_ADDR": ("KVM_CAP_SET_TSS_ADDR", "real-mode TSS for VT-x", True),
    "EXT_CPUID": ("KVM_CAP_EXT_CPUID", "KVM_GET_SUPPORTED_CPUID", True),
    "IOEVENTFD": ("KVM_CAP_IOEVENTFD", "virtio doorbells without a userspace exit", False),
    "IRQFD": ("KVM_CAP_IRQFD", "virtio interrupts from the I/O thread", False),
    "IRQ_ROUTING": ("KVM_CAP_IRQ_ROUTING", "MSI-X vectors as GSI routes", False),
    "SIGNAL_MSI": ("KVM_CAP_SIGNAL_MSI", "direct MSI injection", False),
    "IMMEDIATE_EXIT": ("KVM_CAP_IMMEDIATE_EXIT", "race-free vCPU kick", False),
    "COALESCED_MMIO": ("KVM_CAP_COALESCED_MMIO", "batched MMIO writes", False),
    "COALESCED_PIO": ("KVM_CAP_COALESCED_PIO", "batched port writes", False),
    "EXIT_ON_EMULATION_FAILURE": ("KVM_CAP_EXIT_ON_EMULATION_FAILURE", "instruction bytes on emulation failure", False),
    "TSC_DEADLINE_TIMER": ("KVM_CAP_TSC_DEADLINE_TIMER", "TSC-deadline LAPIC timer", False),
    "MP_STATE": ("KVM_CAP_MP_STATE", "AP startup state", False),
}


class Kvm:
    """The /dev/kvm system handle."""

    def __init__(self, path: str | None = None) -> None:
        path = path or KVM_DEVICE
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            self.api_version = _ioctl(self.fd, "KVM_GET_API_VERSION")
            if self.api_version != lib.KVM_API_VERSION:
                raise KvmError("KVM_GET_API_VERSION", errno.EINVAL)
            self.vcpu_mmap_size = _ioctl(self.fd, "KVM_GET_VCPU_MMAP_SIZE")
        except BaseException:
            os.close(self.fd)
            raise

    def check_extension(self, cap_name: str) -> int:
        return _ioctl(self.fd, "KVM_CHECK_EXTENSION", getattr(lib, cap_name))

    def capabilities(self) -> dict[str, int]:
        return {short: self.check_extension(cname) for short, (cname, _, _) in CAPABILITIES.items()}

    def max_vcpus(self) -> int:
        return self.check_extension("KVM_CAP_MAX_VCPUS") or self.check_extension("KVM_CAP_NR_VCPUS") or 4

    def supported_cpuid(self) -> list[tuple[int, int, int, int, int, int, int]]:
        """[(function, index, flags, eax, ebx, ecx, edx)] from KVM_GET_SUPPORTED_CPUID."""
        n = 128
        while True:
            buf = ffi.new("struct kvm_cpuid2 *", {"nent": n, "entries": n})
            try:
                _ioctl(self.fd, "KVM_GET_SUPPORTED_CPUID", buf)
                break
            except KvmError as e:
                if e.errno != errno.E2BIG or n > 4096:
                    raise
                n *= 2
        return [(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                for e in (buf.entries[i] for i in range(buf.nent))]

    def msr_index_list(self) -> list[int]:
        n = 512
        buf = ffi.new("struct kvm_msr_list *", {"nmsrs": n, "indices": n})
        _ioctl(self.fd, "KVM_GET_MSR_INDEX_LIST", buf)
        return [buf.indices[i] for i in range(buf.nmsrs)]

    def create_vm(self) -> "Vm":
        return Vm(self, _ioctl(self.fd, "KVM_CREATE_VM", 0))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Vm:
    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        self.vcpus: list[KvmVcpu] = []

    def check_extension(self, cap_name: str) -> int:
        return _ioctl(self.fd, "KVM_CHECK_EXTENSION", getattr(lib, cap_name))

    def set_user_memory_region(self, slot: int, gpa: int, size: int, host_addr: int, flags: int = 0) -> None:
        region = ffi.new("struct kvm_userspace_memory_region *", {
            "slot": slot, "flags": flags, "guest_phys_addr": gpa,
            "memory_size": size, "userspace_addr": host_addr})
        _ioctl(self.fd, "KVM_SET_USER_MEMORY_REGION", region)

    def get_dirty_log(self, slot: int, bitmap) -> None:
        """Fill ``bitmap`` (a cffi buffer, one bit per page of the slot) with the pages
        written since the last call; KVM clears its log as it copies."""
        log = ffi.new("struct kvm_dirty_log *")
        log.slot = slot
        log.dirty_bitmap = bitmap
        _ioctl(self.fd, "KVM_GET_DIRTY_LOG", log)

    def set_tss_addr(self, addr: int) -> None:
        _ioctl(self.fd, "KVM_SET_TSS_ADDR", addr)

    def set_identity_map_addr(self, addr: int) -> None:
        _ioctl(self.fd, "KVM_SET_IDENTITY_MAP_ADDR", ffi.new("__u64 *", addr))

    def create_irqchip(self) -> None:
        _ioctl(self.fd, "KVM_CREATE_IRQCHIP")

    def create_pit2(self) -> None:
        _ioctl(self.fd, "KVM_CREATE_PIT2", ffi.new("struct kvm_pit_config *", {"flags": lib.KVM_PIT_SPEAKER_DUMMY}))

    def enable_cap(self, cap_name: str, *args: int) -> None:
        cap = ffi.new("struct kvm_enable_cap *", {"cap": getattr(lib, cap_name)})
        for i, a in enumerate(args):
            cap.args[i] = a
        _ioctl(self.fd, "KVM_ENABLE_CAP", cap)

    def irq_line(self, irq: int, level: bool) -> None:
        _ioctl(self.fd, "KVM_IRQ_LINE", ffi.new("struct kvm_irq_level *", {"irq": irq, "level": int(level)}))

    def signal_msi(self, address: int, data: int) -> int:
        msi = ffi.new("struct kvm_msi *", {"address_lo": address & 0xFFFFFFFF,
                                            "address_hi": address >> 32, "data": data})
        return _ioctl(self.fd, "KVM_SIGNAL_MSI", msi)

    def set_gsi_routing(self, routes: list[tuple]) -> None:
        """routes: ("irqchip", gsi, chip, pin) or ("msi", gsi, address, data)."""
        table = ffi.new("struct kvm_irq_routing *", {"nr": len(routes), "entries": len(routes)})
        for i, route in enumerate(routes):
            e = table.entries[i]
            if route[0] == "irqchip":
                _, gsi, chip, pin = route
                e.gsi, e.type = gsi, lib.KVM_IRQ_ROUTING_IRQCHIP
                e.u.irqchip.irqchip, e.u.irqchip.pin = chip, pin
            else:
                _, gsi, address, data = route
                e.gsi, e.type = gsi, lib.KVM_IRQ_ROUTING_MSI
                e.u.msi.address_lo, e.u.msi.address_hi, e.u.msi.data = address & 0xFFFFFFFF, address >> 32, data
        _ioctl(self.fd, "KVM_SET_GSI_ROUTING", table)

    def irqfd(self, fd: int, gsi: int, deassign: bool = False) -> None:
        _ioctl(self.fd, "KVM_IRQFD", ffi.new("struct kvm_irqfd *", {
            "fd": fd, "gsi": gsi, "flags": lib.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0}))

    def ioeventfd(self, fd: int, addr: int, length: int, datamatch: int | None, pio: bool,
                  deassign: bool = False) -> None:
        flags = 0
        if datamatch is not None:
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
        if pio:
            flags |= lib.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= lib.KVM_IOEVENTFD_FLAG_DEASSIGN
        _ioctl(self.fd, "KVM_IOEVENTFD", ffi.new("struct kvm_ioeventfd *", {
            "datamatch": datamatch or 0, "addr": addr, "len": length, "fd": fd, "flags": flags}))

    def coalesced_zone(self, addr: int, size: int, pio: bool, register: bool = True) -> None:
        """KVM_(UN)REGISTER_COALESCED_MMIO: writes there are queued in the ring page
        of the vCPU mmap instead of exiting (reads still exit)."""
        zone = ffi.new("struct kvm_coalesced_mmio_zone *", {"addr": addr, "size": size, "pio": int(pio)})
        _ioctl(self.fd, "KVM_REGISTER_COALESCED_MMIO" if register else "KVM_UNREGISTER_COALESCED_MMIO", zone)

    def get_irqchip_state(self) -> list[bytes]:
        """PIC master, PIC slave and IOAPIC state, to restore on system reset."""
        out = []
        for chip in (lib.KVM_IRQCHIP_PIC_MASTER, lib.KVM_IRQCHIP_PIC_SLAVE, lib.KVM_IRQCHIP_IOAPIC):
            st = ffi.new("struct kvm_irqchip *", {"chip_id": chip})
            _ioctl(self.fd, "KVM_GET_IRQCHIP", st)
            out.append(bytes(ffi.buffer(st)))
        return out

    def set_irqchip_state(self, states: list[bytes]) -> None:
        for blob in states:
            st = ffi.new("struct kvm_irqchip *")
            ffi.buffer(st)[:] = blob
            _ioctl(self.fd, "KVM_SET_IRQCHIP", st)

    def get_pit_state(self) -> bytes:
        st = ffi.new("struct kvm_pit_state2 *")
        _ioctl(self.fd, "KVM_GET_PIT2", st)
        return bytes(ffi.buffer(st))

    def set_pit_state(self, blob: bytes) -> None:
        st = ffi.new("struct kvm_pit_state2 *")
        ffi.buffer(st)[:] = blob
        _ioctl(self.fd, "KVM_SET_PIT2", st)

    def create_vcpu(self, index: int) -> "KvmVcpu":
        vcpu = KvmVcpu(self, index, _ioctl(self.fd, "KVM_CREATE_VCPU", index))
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _install_kick_handler() -> None:
    # A C handler (kvmpy_install_kick_handler says why not signal.signal), installed
    # from whichever thread creates the first vCPU: sigaction is process-wide.
    if lib.kvmpy_install_kick_handler(KICK_SIGNAL) != 0:
        raise KvmError("sigaction(KICK_SIGNAL)", ffi.errno)


_SEG_FIELDS = ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g", "avl", "unusable")


# Read once: a cffi constant costs a lookup on every use, and run() is the hot path.
_EXIT_IO, _EXIT_MMIO, _EXIT_HLT, _EXIT_INTR = lib.KVM_EXIT_IO, lib.KVM_EXIT_MMIO, lib.KVM_EXIT_HLT, lib.KVM_EXIT_INTR
_IO_OUT = lib.KVM_EXIT_IO_OUT
_run_loop = lib.kvmpy_run_loop
# Views of kvm_run's I/O data kept per vCPU, by (offset, length): KVM puts the data
# at one fixed offset and the lengths are size x count, so a handful ever occur.
_IO_VIEWS_KEPT = 64


class KvmVcpu:
    """A KVM vCPU offering the run protocol of kvmpy.hv.exits (kvmpy.hv.protocol.Vcpu)."""

    def __init__(self, vm: Vm, index: int, fd: int) -> None:
        self.vm = vm
        self.index = index
        self.fd = fd
        self._mm = mmap.mmap(fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._mv = memoryview(self._mm)
        self._run = ffi.cast("struct kvm_run *", ffi.from_buffer(self._mm))
        self._io = lib.kvmpy_run_io(self._run)
        self._mmio = lib.kvmpy_run_mmio(self._run)
        self._mmio_data_off = int(ffi.cast("uintptr_t", self._mmio.data)) - int(ffi.cast("uintptr_t", self._run))
        self.thread_id: int | None = None   # pthread id of the thread in run(), for kick()
        self.native_id: int | None = None
        self.io_port = self.io_size = self.io_count = 0
        self.io_write = False
        self.io_data: memoryview = self._mv[0:0]
        self.mmio_addr = self.mmio_size = 0
        self.mmio_write = False
        self.mmio_data: memoryview = self._mv[0:0]
        self.internal_error = ""
        self.system_event = 0
        self._run_size = vm.kvm.vcpu_mmap_size
        # The C loop's state: this vCPU's kvm_run, the claimed map (``use_exit_map``),
        # what it answered without returning, the access it decoded last.
        self._loop = ffi.new("struct kvmpy_vcpu_loop *")
        self._loop.fd, self._loop.run, self._loop.run_size = fd, self._run, self._run_size
        ring_at = lib.KVM_COALESCED_MMIO_PAGE_OFFSET * mmap.PAGESIZE
        if self._run_size >= ring_at + mmap.PAGESIZE:
            # The VM's one ring, mapped into every vCPU's kvm_run mmap.
            self._loop.ring = ffi.cast("struct kvm_coalesced_mmio_ring *", ffi.cast("char *", self._run) + ring_at)
        self._access = memoryview(ffi.buffer(self._loop.access)).cast("Q")
        self._exit_map = ffi.NULL
        self._report_every_exit = False
        self._io_views: dict[tuple[int, int], memoryview] = {}
        self._mmio_views = [self._mv[self._mmio_data_off:self._mmio_data_off + n] for n in range(9)]
        _install_kick_handler()

    @property
    def run_mmap(self) -> mmap.mmap:
        """The kvm_run mmap (its later pages hold the VM's coalesced-write ring)."""
        return self._mm

    def use_exit_map(self, exit_map) -> None:
        """From now on run() answers the port and MMIO accesses that ``exit_map``
        (a ``struct kvmpy_exit_map *`` its accelerator keeps current) shows no device
        claims, in C, and returns only for the rest (see ``kvmpy_run_loop``)."""
        self._exit_map = exit_map
        self._loop.map = ffi.NULL if self._report_every_exit else exit_map

    @property
    def report_every_exit(self) -> bool:
        """True: run() returns after every exit, even an unclaimed access (the exits
        tracer and the profiler account for each one)."""
        return self._report_every_exit

    @report_every_exit.setter
    def report_every_exit(self, on: bool) -> None:
        self._report_every_exit = on
        self._loop.map = ffi.NULL if on else self._exit_map

    def loop_stats(self) -> dict[str, int]:
        """Accesses the C loop answered itself (unclaimed ports and MMIO, and the
        claimed port reads a device published an answer to), how often it returned,
        and how many of those returns were one access decoded for the vCPU loop's
        fast path."""
        st = self._loop.stats
        return {"pio_served": st.pio_served, "mmio_served": st.mmio_served, "returned": st.returned,
                "decoded": st.decoded, "published_served": st.published_served}

    def decoded_exits(self) -> DecodedExits | None:
        """The vCPU loop's fast path (kvmpy.hv.exits.DecodedExits); None while every
        exit is reported. Called on the thread that will run the vCPU."""
        if self._report_every_exit:
            return None
        self._note_thread()
        native = (int(ffi.cast("uintptr_t", ffi.addressof(lib, "kvmpy_run_decoded"))),
                  int(ffi.cast("uintptr_t", self._loop)), int(ffi.cast("uintptr_t", self._loop.access)))
        return DecodedExits(lib.kvmpy_run_decoded, self._loop, self._access, self.exit_kind, native)

    def _note_thread(self) -> None:
        if self.thread_id is None:
            self.thread_id = threading.get_ident()
            self.native_id = threading.get_native_id()

    # --- the run protocol -------------------------------------------------
    def run(self) -> int:
        if self.thread_id is None:
            self._note_thread()
        return self.exit_kind(_run_loop(self._loop))

    def exit_kind(self, reason: int) -> int:
        """The exit the C loop returned (a KVM exit reason, or -errno) as run() reports
        it, with the exit attributes set."""
        run = self._run
        if reason == _EXIT_IO:
            io = self._io
            size, count = io.size, io.count
            self.io_port, self.io_size, self.io_count = io.port, size, count
            self.io_write = io.direction == _IO_OUT
            key = (io.data_offset, size * count)
            view = self._io_views.get(key)
            if view is None:
                off, n = key
                if off + n > self._run_size:
                    self.internal_error = f"KVM_EXIT_IO data outside kvm_run (offset {off:#x} + {n})"
                    return exits.EXIT_INTERNAL_ERROR
                view = self._mv[off:off + n]
                if len(self._io_views) < _IO_VIEWS_KEPT:
                    self._io_views[key] = view
            self.io_data = view
            return exits.EXIT_IO
        if reason == _EXIT_MMIO:
            m = self._mmio
            length = min(m.len, 8)
            self.mmio_addr, self.mmio_size, self.mmio_write = m.phys_addr, length, bool(m.is_write)
            self.mmio_data = self._mmio_views[length]
            return exits.EXIT_MMIO
        if reason < 0:
            err = -reason
            if err in (errno.EINTR, errno.EAGAIN):
                run.immediate_exit = 0
                return exits.EXIT_INTR
            raise KvmError("KVM_RUN", err)
        if reason == _EXIT_HLT:
            return exits.EXIT_HLT
        if reason == _EXIT_INTR:
            run.immediate_exit = 0
            return exits.EXIT_INTR
        if reason == lib.KVM_EXIT_SHUTDOWN:
            return exits.EXIT_SHUTDOWN
        if reason == lib.KVM_EXIT_SYSTEM_EVENT:
            t = lib.kvmpy_run_system_event(run).type
            self.system_event = (exits.SYSTEM_EVENT_RESET if t == lib.KVM_SYSTEM_EVENT_RESET
                                 else exits.SYSTEM_EVENT_SHUTDOWN)
            return exits.EXIT_SYSTEM_EVENT
        if reason in (lib.KVM_EXIT_IRQ_WINDOW_OPEN, lib.KVM_EXIT_IOAPIC_EOI):
            return exits.EXIT_INTR
        if reason == lib.KVM_EXIT_DEBUG:
            return exits.EXIT_DEBUG
        self.internal_error = self._describe_failure(reason)
        return exits.EXIT_INTERNAL_ERROR

    def _describe_failure(self, reason: int) -> str:
        run = self._run
        if reason == lib.KVM_EXIT_INTERNAL_ERROR:
            internal = lib.kvmpy_run_internal(run)
            sub = internal.suberror
            names = {lib.KVM_INTERNAL_ERROR_EMULATION: "emulation failure",
                     lib.KVM_INTERNAL_ERROR_SIMUL_EX: "simultaneous exceptions",
                     lib.KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failure"}
            text = f"KVM internal error, {names.get(sub, f'suberror {sub}')}"
            if sub == lib.KVM_INTERNAL_ERROR_EMULATION:
                ef = lib.kvmpy_run_emulation_failure(run)
                if ef.ndata >= 3 and ef.flags & lib.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
                    n = min(ef.insn_size, 15)
                    text += ", instruction bytes " + bytes(ef.insn_bytes[0:n]).hex(" ")
            try:
                text += f" at rip {self.get_regs().rip:#x}"
            except KvmError:
                pass
            return text
        if reason == lib.KVM_EXIT_FAIL_ENTRY:
            fe = lib.kvmpy_run_fail_entry(run)
            return f"KVM entry failure, hardware reason {fe.hardware_entry_failure_reason:#x}"
        if reason == lib.KVM_EXIT_UNKNOWN:
            return f"KVM unknown exit, hardware reason {lib.kvmpy_run_hw_exit_reason(run):#x}"
        return f"unhandled KVM exit reason {reason}"

    def kick(self) -> None:
        """Make run() return EXIT_INTR soon; callable from any thread."""
        self._run.immediate_exit = 1
        tid = self.thread_id
        if tid is not None and tid != threading.get_ident():
            try:
                signal.pthread_kill(tid, KICK_SIGNAL)
            except (ProcessLookupError, OSError):
                pass

    # --- state ---------------------------------------------------------------
    def get_regs(self) -> Regs:
        r = ffi.new("struct kvm_regs *")
        _ioctl(self.fd, "KVM_GET_REGS", r)
        return Regs(**{n: getattr(r, n) for n in GPR_NAMES})

    def set_regs(self, regs: Regs) -> None:
        r = ffi.new("struct kvm_regs *", {n: getattr(regs, n) for n in GPR_NAMES})
        _ioctl(self.fd, "KVM_SET_REGS", r)

    def get_sregs(self) -> SRegs:
        s = ffi.new("struct kvm_sregs *")
        _ioctl(self.fd, "KVM_GET_SREGS", s)
        out = SRegs()
        for name in SEGMENT_NAMES:
            seg = getattr(s, name)
            setattr(out, name, Segment(**{f: getattr(seg, f) for f in _SEG_FIELDS}))
        out.gdt = DTable(s.gdt.base, s.gdt.limit)
        out.idt = DTable(s.idt.base, s.idt.limit)
        for f in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"):
            setattr(out, f, getattr(s, f))
        return out

    def set_sregs(self, sregs: SRegs) -> None:
        s = ffi.new("struct kvm_sregs *")
        _ioctl(self.fd, "KVM_GET_SREGS", s)   # keeps interrupt_bitmap as KVM has it
        for name in SEGMENT_NAMES:
            seg, src = getattr(s, name), getattr(sregs, name)
            for f in _SEG_FIELDS:
                setattr(seg, f, getattr(src, f))
        s.gdt.base, s.gdt.limit = sregs.gdt.base, sregs.gdt.limit
        s.idt.base, s.idt.limit = sregs.idt.base, sregs.idt.limit
        for f in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"):
            setattr(s, f, getattr(sregs, f))
        _ioctl(self.fd, "KVM_SET_SREGS", s)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        n = len(indices)
        buf = ffi.new("struct kvm_msrs *", {"nmsrs": n, "entries": n})
        for i, idx in enumerate(indices):
            buf.entries[i].index = idx
        got = _ioctl(self.fd, "KVM_GET_MSRS", buf)
        return {buf.entries[i].index: buf.entries[i].data for i in range(got)}

    def set_msrs(self, values: dict[int, int]) -> None:
        n = len(values)
        buf = ffi.new("struct kvm_msrs *", {"nmsrs": n, "entries": n})
        for i, (idx, val) in enumerate(values.items()):
            buf.entries[i].index, buf.entries[i].data = idx, val
        done = _ioctl(self.fd, "KVM_SET_MSRS", buf)
        if done != n:
            bad = list(values)[done]
            raise KvmError(f"KVM_SET_MSRS (MSR {bad:#x})", errno.EINVAL)

    def set_cpuid(self, entries: list[tuple[int, int, int, int, int, int, int]]) -> None:
        n = len(entries)
        buf = ffi.new("struct kvm_cpuid2 *", {"nent": n, "entries": n})
        for i, (fn, idx, flags, a, b, c, d) in enumerate(entries):
            e = buf.entries[i]
            e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx = fn, idx, flags, a, b, c, d
        _ioctl(self.fd, "KVM_SET_CPUID2", buf)

    def get_lapic(self) -> bytearray:
        st = ffi.new("struct kvm_lapic_state *")
        _ioctl(self.fd, "KVM_GET_LAPIC", st)
        return bytearray(ffi.buffer(st.regs))

    def set_lapic(self, regs: bytes) -> None:
        st = ffi.new("struct kvm_lapic_state *")
        ffi.buffer(st.regs)[:] = regs
        _ioctl(self.fd, "KVM_SET_LAPIC", st)

    def get_mp_state(self) -> int:
        st = ffi.new("struct kvm_mp_state *")
        _ioctl(self.fd, "KVM_GET_MP_STATE", st)
        return st.mp_state

    def set_mp_state(self, state: int) -> None:
        _ioctl(self.fd, "KVM_SET_MP_STATE", ffi.new("struct kvm_mp_state *", {"mp_state": state}))

    # ``--trace profile``'s members of the Vcpu protocol: KVM keeps no counters the
    # profiler reads, and a running vCPU's registers are the kernel's until it exits.
    can_sample_rip = False

    def set_profiling(self, on: bool) -> None:
        pass

    def sample_rip(self) -> int | None:
        return None

    def stats(self) -> dict | None:
        return None

    def close(self) -> None:
        if self.fd >= 0:
            self._io = self._mmio = self._run = None
            self.io_data = self.mmio_data = None
            for view in (*self._io_views.values(), *self._mmio_views):
                view.release()
            self._io_views.clear()
            self._mmio_views = []
            self._mv.release()
            self._mm.close()
            os.close(self.fd)
            self.fd = -1
