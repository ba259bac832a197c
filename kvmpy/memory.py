"""Guest physical memory: anonymous mmaps shared by KVM, the translator and device models.

Every access with a guest-supplied address goes through ``view``/``read``/``write``,
which refuse anything outside a RAM region with GuestMemoryError. Device models
get memoryview slices straight into guest RAM (no copies on the data path).
"""

from __future__ import annotations

import mmap
from bisect import bisect_right
from dataclasses import dataclass

from .errors import GuestMemoryError, HostError

# Python's mmap module names MAP_NORESERVE only from 3.12; 0x4000 is its value in
# Linux's UAPI (asm-generic/mman-common.h and x86's), the only kernel kvmpy runs on.
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


HUGE_PAGE = 2 << 20


def _anonymous_ram(gpa: int, size: int) -> tuple[mmap.mmap, memoryview]:
    """An anonymous mapping for RAM at ``gpa`` and the view of its ``size`` bytes.

    A region of 2 MiB or more gets a view whose host address is congruent to its
    guest address modulo 2 MiB, and is madvised for transparent huge pages (as
    QEMU does): only then can KVM map guest RAM with 2 MiB pages in the nested
    page tables, one fault per 2 MiB instead of per 4 KiB, which counts most
    where every such fault is costly (nested KVM)."""
    # MAP_NORESERVE: a guest's RAM is a ceiling, not a commitment. Without it the
    # kernel's overcommit heuristic refuses any single mapping larger than RAM+swap
    # (-m 900G on a 24 GiB host) although a guest touches only what it uses; pages
    # are allocated on first touch either way, and nothing here touches them. The
    # price is the one every overcommitting VMM pays: a guest that really uses more
    # than the host has meets the OOM killer rather than a refusal at start.
    # Under vm.overcommit_memory=2 the kernel ignores the flag and may refuse.
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    if size < HUGE_PAGE:
        mm = mmap.mmap(-1, size, flags=flags, prot=prot)
        _not_inherited(mm)
        return mm, memoryview(mm)
    mm = mmap.mmap(-1, size + HUGE_PAGE, flags=flags, prot=prot)
    _not_inherited(mm)
    import ctypes
    probe = ctypes.c_char.from_buffer(mm)
    host = ctypes.addressof(probe)
    del probe                          # the buffer export, or mm could not be closed
    pad = (gpa - host) % HUGE_PAGE      # a multiple of the page size: both are page aligned
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_HUGEPAGE, pad, size)
        except OSError:
            pass                        # THP disabled: 4 KiB pages, as before
    return mm, memoryview(mm)[pad:pad + size]


def _not_inherited(mm: mmap.mmap) -> None:
    """Guest RAM stays out of any child the VMM forks (the cleanup helper of
    --runas and the sandbox), as QEMU marks it: a child has no business with the
    guest's memory, and copy-on-write would charge the host for it once more."""
    if hasattr(mmap, "MADV_DONTFORK"):
        try:
            mm.madvise(mmap.MADV_DONTFORK)
        except OSError:
            pass


@dataclass(frozen=True)
class RamRegion:
    """A run of guest-physical addresses backed by host memory (RAM, ROM or device memory)."""

    gpa: int
    size: int
    mm: mmap.mmap | None  # the mapping (may be larger than size: see _anonymous_ram); None for device memory
    view: memoryview    # the region's size bytes, sliced for accesses; what KVM maps

    @property
    def end(self) -> int:
        return self.gpa + self.size


class GuestMemory:
    """A set of non-overlapping RAM regions in guest physical address space."""

    def __init__(self) -> None:
        # Device memory the guest maps at an address it chooses (a framebuffer BAR):
        # not RAM (no DMA, not in total_size), but the translator maps it as RAM.
        # ``generation`` changes with every map/unmap so a vCPU resyncs cheaply.
        self.device_regions: dict[str, RamRegion] = {}
        self.generation = 0
        self.regions: list[RamRegion] = []
        self._starts: list[int] = []
        # Called as cb(gpa, length) after a device wrote guest RAM (DMA). The
        # translator listens, to drop translated code in those pages; under KVM
        # the list is empty and devices skip the bookkeeping.
        self.dma_listeners: list = []
        # Regions the guest may read but not write (firmware ROM, shadow RAM that
        # the chipset write-protects): the accelerators map them so that guest
        # writes exit as MMIO, which nothing claims, so they are dropped as on a PC.
        self._readonly: set[int] = set()
        # Called as cb(region, readonly) when a region's protection changes (KVM
        # re-registers its slot); bumped for the translator, which looks before
        # every entry into the guest on the vCPU's own thread.
        self.protection_listeners: list = []
        self.protection_generation = 0

    def notify_dma_write(self, gpa: int, length: int) -> None:
        for cb in self.dma_listeners:
            cb(gpa, length)

    @classmethod
    def anonymous(cls, layout: list[tuple[int, int]]) -> "GuestMemory":
        """Build memory from ``[(gpa, size), ...]``, each backed by a fresh anonymous mmap."""
        mem = cls()
        try:
            for gpa, size in layout:
                mem.add_region(gpa, size)
        except BaseException:
            mem.close()
            raise
        return mem

    def add_region(self, gpa: int, size: int) -> RamRegion:
        if size <= 0 or gpa < 0 or gpa % mmap.PAGESIZE or size % mmap.PAGESIZE:
            raise ValueError(f"RAM region {gpa:#x}+{size:#x} must be page aligned and non-empty")
        for r in self.regions:
            if gpa < r.end and r.gpa < gpa + size:
                raise ValueError(f"RAM region {gpa:#x}+{size:#x} overlaps {r.gpa:#x}+{r.size:#x}")
        try:
            mm, view = _anonymous_ram(gpa, size)
        except OSError as e:
            raise HostError(f"cannot map {size >> 20} MiB of guest RAM at {gpa:#x}: {e.strerror}") from None
        region = RamRegion(gpa, size, mm, view)
        self.regions.append(region)
        self.regions.sort(key=lambda r: r.gpa)
        self._starts = [r.gpa for r in self.regions]
        return region

    def add_rom(self, gpa: int, data: bytes, size: int | None = None) -> RamRegion:
        """A read-only region at ``gpa`` holding ``data`` (padded with zeros to
        ``size``, the page-rounded length of data by default)."""
        if size is None:
            size = -(-len(data) // mmap.PAGESIZE) * mmap.PAGESIZE
        region = self.add_region(gpa, size)
        region.view[:len(data)] = data
        self._readonly.add(region.gpa)
        return region

    def writable_view(self, gpa: int, length: int) -> memoryview:
        """``view`` for a device's write into guest memory (DMA): ROM refuses it
        with GuestMemoryError, as a PC's ROM ignores bus-master writes."""
        r = self._region(gpa, length)
        if r.gpa in self._readonly:
            raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is ROM")
        off = gpa - r.gpa
        return r.view[off:off + length]

    def is_readonly(self, region: RamRegion) -> bool:
        return region.gpa in self._readonly

    def set_readonly(self, gpa: int, readonly: bool) -> None:
        """Write-protect (or open) the region starting at ``gpa``."""
        region = self._region(gpa, 1)
        if region.gpa != gpa:
            raise ValueError(f"no RAM region starts at {gpa:#x}")
        if (gpa in self._readonly) == readonly:
            return
        if readonly:
            self._readonly.add(gpa)
        else:
            self._readonly.discard(gpa)
        self.protection_generation += 1
        for cb in list(self.protection_listeners):
            cb(region, readonly)

    @property
    def total_size(self) -> int:
        return sum(r.size for r in self.regions)

    def _region(self, gpa: int, length: int) -> RamRegion:
        i = bisect_right(self._starts, gpa) - 1
        if i >= 0 and length >= 0:
            r = self.regions[i]
            if gpa + length <= r.end:
                return r
        raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is outside RAM")

    def contains(self, gpa: int, length: int) -> bool:
        try:
            self._region(gpa, length)
            return True
        except GuestMemoryError:
            return False

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable memoryview of guest RAM; the range must lie inside one region."""
        r = self._region(gpa, length)
        off = gpa - r.gpa
        return r.view[off:off + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view(gpa, len(data))[:] = data

    # One load or store each (a memoryview item is copied whole), as a vCPU running
    # meanwhile sees it; struct's pack_into would zero the field before storing it
    # (see devices/virtio/queue.py). Native order: the host is x86-64.

    def read_u16(self, gpa: int) -> int:
        return self.view(gpa, 2).cast("H")[0]

    def read_u32(self, gpa: int) -> int:
        return self.view(gpa, 4).cast("I")[0]

    def read_u64(self, gpa: int) -> int:
        return self.view(gpa, 8).cast("Q")[0]

    def write_u16(self, gpa: int, value: int) -> None:
        self.view(gpa, 2).cast("H")[0] = value & 0xFFFF

    def write_u32(self, gpa: int, value: int) -> None:
        self.view(gpa, 4).cast("I")[0] = value & 0xFFFFFFFF

    def write_u64(self, gpa: int, value: int) -> None:
        self.view(gpa, 8).cast("Q")[0] = value & 0xFFFFFFFFFFFFFFFF

    def map_device_region(self, region_id: str, gpa: int, view: memoryview) -> RamRegion:
        """Map ``view`` (owned by a device, page aligned) at ``gpa`` as ``region_id``,
        replacing where it was mapped before. Refuses overlap with RAM."""
        size = len(view)
        if size <= 0 or gpa < 0 or gpa % mmap.PAGESIZE or size % mmap.PAGESIZE:
            raise ValueError(f"device region {gpa:#x}+{size:#x} must be page aligned and non-empty")
        for r in self.regions:
            if gpa < r.end and r.gpa < gpa + size:
                raise ValueError(f"device region {gpa:#x}+{size:#x} overlaps RAM {r.gpa:#x}+{r.size:#x}")
        region = RamRegion(gpa, size, None, view)
        self.device_regions[region_id] = region
        self.generation += 1
        return region

    def unmap_device_region(self, region_id: str) -> RamRegion | None:
        region = self.device_regions.pop(region_id, None)
        if region is not None:
            self.generation += 1
        return region

    def close(self) -> None:
        for r in self.regions:
            r.view.release()
            r.mm.close()
        self.device_regions.clear()     # their owners release them
        self.regions.clear()
        self._starts.clear()
        self._readonly.clear()
