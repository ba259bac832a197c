"""Guest physical memory layout of a kvmpy PC.

Low memory holds the boot structures (as a BIOS would leave them), RAM runs to
the start of the PCI hole, and the rest of RAM is placed above 4 GiB.
"""

GDT_ADDR = 0x500
IDT_ADDR = 0x520                  # an empty IDT: no interrupts until the kernel loads its own
PVH_START_INFO_ADDR = 0x6000
PVH_MEMMAP_ADDR = 0x6100          # hvm_memmap_table_entry[], up to 64 entries
PVH_MODLIST_ADDR = 0x6800
ZERO_PAGE_ADDR = 0x7000           # Linux boot_params
PML4_ADDR = 0x9000                # identity page tables: PML4, PDPT, 4 page directories
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000                  # 4 pages, 0xB000-0xEFFF, map 4 GiB with 2 MiB pages
BOOT_STACK_TOP = 0x8FF0
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000
EBDA_START = 0x9FC00
ACPI_BASE = 0xE0000               # ACPI tables and a BIOS-area copy of the RSDP
ACPI_SIZE = 0x20000
HIGH_MEMORY = 0x100000            # kernels load at 1 MiB and up
# The legacy VGA window: not RAM, so its accesses reach the VGA device (text mode at
# 0xB8000) as on a PC; e820 already reserves 0x9FC00-0xFFFFF.
VGA_WINDOW = (0xA0000, 0xC0000)

PCI_HOLE_START = 0xC0000000       # 3 GiB: RAM above this moves to 4 GiB
PCI_MMIO_WINDOW = (0xC0000000, 0xFEBFFFFF)
PCI_IO_WINDOW = (0xC000, 0xFFFF)
IOAPIC_ADDR = 0xFEC00000
LAPIC_ADDR = 0xFEE00000
TSS_ADDR = 0xFFFBD000             # three pages KVM needs on VT-x for real mode
IDENTITY_MAP_ADDR = 0xFFFBC000
FOUR_GIB = 1 << 32
# Under firmware the PCI holes are QEMU's i440FX ones, because the firmware, not kvmpy,
# places the BARs and each firmware has its own rule: SeaBIOS fills the top of the
# 32-bit hole, OVMF starts at max(2 GiB, end of low RAM) and puts 64-bit BARs in a
# window of its own above RAM (32-64 GiB for Debian 12's; newer ones size it from the
# CPU's address width). The hole below 4 GiB runs from the end of low RAM to the
# IOAPIC; the one above from the end of RAM, rounded up to 1 GiB, to 2^40 or to the
# physical address width the vCPUs' CPUID 0x80000008 announces, whichever is lower
# (QEMU's pc_pci_hole64 likewise ends within phys-bits): a BAR above what the guest
# believes it can address would be unreachable to its drivers.
FIRMWARE_PCI_MMIO64_END = (1 << 40) - 1
FIRMWARE_PCI_MMIO64_ALIGN = 1 << 30
# QEMU's places for KVM's real-mode pages, below the IOAPIC: where a firmware image
# larger than 256 KiB (OVMF's 2 MiB and up) covers TSS_ADDR.
FIRMWARE_TSS_ADDR = 0xFEFFD000
FIRMWARE_IDENTITY_MAP_ADDR = 0xFEFFC000

BOOT_CS = 0x10
BOOT_DS = 0x18
BOOT_TSS = 0x20

E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3


def ram_layout(mem_size: int) -> list[tuple[int, int]]:
    """[(gpa, size)] for ``mem_size`` bytes of RAM, leaving the PCI hole below 4 GiB."""
    low_end = min(mem_size, PCI_HOLE_START)
    vga_start, vga_end = VGA_WINDOW
    if low_end <= vga_end:
        low = [(0, min(low_end, vga_start))]
    else:
        low = [(0, vga_start), (vga_end, low_end - vga_end)]
    if mem_size <= PCI_HOLE_START:
        return low
    return [*low, (FOUR_GIB, mem_size - PCI_HOLE_START)]


def e820_map(mem_size: int) -> list[tuple[int, int, int]]:
    """[(addr, size, type)] as the boot protocols hand them to the kernel."""
    low_end = min(mem_size, PCI_HOLE_START)
    entries = [
        (0, EBDA_START, E820_RAM),
        (EBDA_START, ACPI_BASE - EBDA_START, E820_RESERVED),
        (ACPI_BASE, ACPI_SIZE, E820_RESERVED),
        (HIGH_MEMORY, low_end - HIGH_MEMORY, E820_RAM),
    ]
    if mem_size > PCI_HOLE_START:
        entries.append((FOUR_GIB, mem_size - PCI_HOLE_START, E820_RAM))
    return entries


def firmware_pci_windows(mem_size: int, phys_bits: int) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """((base, end), (base, end) or None), ends inclusive: the 32- and 64-bit PCI
    memory windows of a machine booting through firmware with ``mem_size`` bytes of
    RAM and vCPUs announcing ``phys_bits`` of physical address (the bus decodes BARs
    there and ACPI _CRS announces them); no 64-bit window when RAM leaves no room for
    one below that width (the machine refuses such a RAM size)."""
    low_end = min(mem_size, PCI_HOLE_START)
    mmio32 = (low_end, IOAPIC_ADDR - 1)
    ram_end = FOUR_GIB + max(0, mem_size - PCI_HOLE_START)
    align = FIRMWARE_PCI_MMIO64_ALIGN
    base64 = (ram_end + align - 1) // align * align
    end64 = firmware_pci_mmio64_end(phys_bits)
    if base64 > end64:
        return mmio32, None
    return mmio32, (base64, end64)


def firmware_pci_mmio64_end(phys_bits: int) -> int:
    """The last address of the 64-bit PCI window under firmware (inclusive)."""
    return min(FIRMWARE_PCI_MMIO64_END, (1 << phys_bits) - 1)


def firmware_max_memory(phys_bits: int) -> int:
    """The most RAM (in 2 MiB steps, as vm.toml allows) that leaves a 64-bit PCI
    window under firmware below ``phys_bits`` of physical address; 0 if none does."""
    end64 = firmware_pci_mmio64_end(phys_bits)
    last_base = end64 // FIRMWARE_PCI_MMIO64_ALIGN * FIRMWARE_PCI_MMIO64_ALIGN
    if last_base < FOUR_GIB:          # the window never starts below 4 GiB, whatever the RAM
        return 0
    return (last_base - FOUR_GIB + PCI_HOLE_START) // (2 << 20) * (2 << 20)
