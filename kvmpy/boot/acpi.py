"""ACPI tables for a PC-like machine, built as bytes and written to guest RAM.

``build_acpi_tables`` lays the tables out from ``base`` (16-byte aligned; the
FACS 64-byte aligned), all inside ``ACPI_REGION_SIZE`` bytes:

    base + 0x000  RSDP (ACPI 2.0, 36 bytes)      -> returned address
    then          XSDT, RSDT, FACS, FADT, DSDT, MADT, [MCFG]

and, unless ``base`` already lies there, a copy of the RSDP at ``bios_rsdp_copy``
(0xE0000 by default, the start of the 0xE0000-0xFFFFF area guests scan when no
boot protocol hands them the RSDP; PVH guests take the returned address from
start_info.rsdp_paddr). The machine should mark [base, base + ACPI_REGION_SIZE)
and 0xE0000-0xFFFFF reserved (or ACPI) in its E820 map. Putting ``base`` at
0xE0000 keeps everything in the BIOS area.

The FADT describes full (not hardware-reduced) ACPI with the fixed hardware of
kvmpy.devices.acpi_pm at ``pm_base``, SCI on ``sci_irq`` (level, active high
through a MADT override as QEMU does), a fixed-feature power button, the RTC
century byte 0x32 and optionally the 0xCF9 reset register. Addresses and IRQs
are the devices' own constants (COM1, RTC, KBD_DATA, PM_BLOCK, PCI_CONFIG_PORTS),
the same ones the machine's device table places the devices at. The DSDT is
hand-assembled AML: \\_S5 (SLP_TYP shared with acpi_pm), processor devices,
COM1 (PNP0501), the RTC (PNP0B00, no IRQ: kvmpy raises no RTC interrupts yet,
so Linux's rtc-cmos runs without alarms rather than waiting for them), the
keyboard controller (PNP0303; a PS/2 mouse node, PNP0F13, only where a display has a mouse)
and, when asked, the PCI root bridge with its bus/IO/memory windows, _PRT and a
motherboard reservation of the MMCONFIG area.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterable, Sequence

from ..devices import acpi_pm
from ..devices.i8042 import AUX_IRQ, KBD_COMMAND, KBD_DATA
from ..devices.pci.config_ports import PCI_CONFIG_PORTS, RESET_CONTROL_PORT, RESET_VALUE
from ..devices.rtc import REG_CENTURY, RTC
from ..devices.serial import COM1
from ..errors import ConfigError, GuestMemoryError
from ..memory import GuestMemory

OEM_ID = b"KVMPY "
OEM_TABLE_ID = b"KVMPYVM "
CREATOR_ID = b"KVPY"
ACPI_REGION_SIZE = 0x10000
BIOS_RSDP_COPY = 0xE0000

IOAPIC_ADDRESS = 0xFEC00000
IOAPIC_ID = 0  # what KVM's in-kernel IOAPIC reports in its ID register
LAPIC_ADDRESS = 0xFEE00000
RTC_CENTURY_INDEX = REG_CENTURY
MAX_CPUS = 255  # xAPIC MADT entries carry 8-bit ids; 0xff is the broadcast id


@dataclass(frozen=True)
class PciRoot:
    """Windows of the PCI root bridge as its _CRS reports them (inclusive ends)."""

    bus_start: int = 0
    bus_end: int = 0xFF
    io: Sequence[tuple[int, int]] = ((0x0000, 0x0CF7), (0x0D00, 0xFFFF))
    mem32: Sequence[tuple[int, int]] = ((0xC0000000, 0xFEBFFFFF),)
    mem64: Sequence[tuple[int, int]] = ()
    # (device slot, INTx pin 0..3 = INTA..INTD, GSI) for the _PRT
    prt: Sequence[tuple[int, int, int]] = ()


@dataclass(frozen=True)
class Mcfg:
    """The MCFG table's one entry: where PCI Express configuration space is mapped."""

    base: int
    start_bus: int = 0
    end_bus: int = 0xFF
    segment: int = 0

    @property
    def size(self) -> int:
        return (self.end_bus - self.start_bus + 1) << 20


# --------------------------------------------------------------------- AML
def _pkglength(content_len: int) -> bytes:
    """PkgLength whose value counts itself plus ``content_len`` bytes."""
    if content_len + 1 < 0x40:
        return bytes((content_len + 1,))
    for extra in (1, 2, 3):
        total = content_len + 1 + extra
        if total < 1 << (4 + 8 * extra):
            out = [(extra << 6) | (total & 0x0F)]
            rest = total >> 4
            for _ in range(extra):
                out.append(rest & 0xFF)
                rest >>= 8
            return bytes(out)
    raise ValueError("AML package too large")


def _nameseg(seg: str) -> bytes:
    seg = seg.upper()
    if not 1 <= len(seg) <= 4 or not (seg[0].isalpha() or seg[0] == "_"):
        raise ValueError(f"bad AML name segment {seg!r}")
    return seg.ljust(4, "_").encode("ascii")


def aml_name(path: str) -> bytes:
    out = b""
    if path.startswith("\\"):
        out, path = b"\\", path[1:]
    segs = [s for s in path.split(".") if s]
    if not segs:
        return out + b"\x00"
    if len(segs) == 1:
        return out + _nameseg(segs[0])
    if len(segs) == 2:
        return out + b"\x2e" + _nameseg(segs[0]) + _nameseg(segs[1])
    return out + b"\x2f" + bytes((len(segs),)) + b"".join(_nameseg(s) for s in segs)


def aml_int(v: int) -> bytes:
    if v == 0:
        return b"\x00"
    if v == 1:
        return b"\x01"
    if v <= 0xFF:
        return b"\x0a" + struct.pack("<B", v)
    if v <= 0xFFFF:
        return b"\x0b" + struct.pack("<H", v)
    if v <= 0xFFFFFFFF:
        return b"\x0c" + struct.pack("<I", v)
    return b"\x0e" + struct.pack("<Q", v)


def aml_string(s: str) -> bytes:
    return b"\x0d" + s.encode("ascii") + b"\x00"


def eisa_id(s: str) -> int:
    """The 32-bit compressed EISA id ("PNP0A03" -> 0x030ad041)."""
    if len(s) != 7:
        raise ValueError(f"bad EISA id {s!r}")
    vendor = ((ord(s[0]) - 0x40) << 10) | ((ord(s[1]) - 0x40) << 5) | (ord(s[2]) - 0x40)
    return struct.unpack("<I", struct.pack(">HH", vendor, int(s[3:], 16)))[0]


def aml_eisa(s: str) -> bytes:
    return aml_int(eisa_id(s))


def aml_def_name(path: str, obj: bytes) -> bytes:
    return b"\x08" + aml_name(path) + obj


def aml_package(elements: Iterable[bytes]) -> bytes:
    elements = list(elements)
    body = bytes((len(elements),)) + b"".join(elements)
    return b"\x12" + _pkglength(len(body)) + body


def aml_buffer(data: bytes) -> bytes:
    body = aml_int(len(data)) + data
    return b"\x11" + _pkglength(len(body)) + body


def aml_scope(path: str, body: bytes) -> bytes:
    content = aml_name(path) + body
    return b"\x10" + _pkglength(len(content)) + content


def aml_device(path: str, body: bytes) -> bytes:
    content = aml_name(path) + body
    return b"\x5b\x82" + _pkglength(len(content)) + content


# resource descriptors (ACPI 6.4 section 6.4)
def res_io(base: int, length: int) -> bytes:
    return struct.pack("<BBHHBB", 0x47, 0x01, base, base, 0x01, length)


def res_irq(irq: int) -> bytes:
    return struct.pack("<BH", 0x22, 1 << irq)


def res_word_bus(start: int, end: int) -> bytes:
    return struct.pack("<BHBBBHHHHH", 0x88, 13, 2, 0x0C, 0, 0, start, end, 0, end - start + 1)


def res_word_io(start: int, end: int) -> bytes:
    # type-specific 0x03: ISA and non-ISA ranges
    return struct.pack("<BHBBBHHHHH", 0x88, 13, 1, 0x0C, 0x03, 0, start, end, 0, end - start + 1)


def res_dword_mem(start: int, end: int, consumer: bool = False) -> bytes:
    gflags = 0x0D if consumer else 0x0C
    return struct.pack("<BHBBBIIIII", 0x87, 23, 0, gflags, 0x01, 0, start, end, 0, end - start + 1)


def res_qword_mem(start: int, end: int, consumer: bool = False) -> bytes:
    gflags = 0x0D if consumer else 0x0C
    return struct.pack("<BHBBBQQQQQ", 0x8A, 43, 0, gflags, 0x01, 0, start, end, 0, end - start + 1)


def res_template(*descriptors: bytes) -> bytes:
    return aml_buffer(b"".join(descriptors) + b"\x79\x00")


# ------------------------------------------------------------------- tables
def _checksum(data: bytes | bytearray) -> int:
    return (-sum(data)) & 0xFF


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    length = 36 + len(body)
    header = bytearray(struct.pack("<4sIBB6s8sI4sI", signature, length, revision, 0,
                                   OEM_ID, OEM_TABLE_ID, 1, CREATOR_ID, 1))
    table = header + body
    table[9] = _checksum(table)
    return bytes(table)


def gas(space: int, bit_width: int, address: int, access_size: int = 0) -> bytes:
    return struct.pack("<BBBBQ", space, bit_width, 0, access_size, address)


def build_dsdt(num_cpus: int, pci: PciRoot | None, mcfg: Mcfg | None,
               kbd: bool = True, com1: bool = True, rtc: bool = True, mouse: bool = False) -> bytes:
    s5 = acpi_pm.SLP_TYP_S5
    body = aml_def_name("\\_S5", aml_package([aml_int(s5), aml_int(s5), aml_int(0), aml_int(0)]))
    sb = b""
    for cpu in range(num_cpus):
        sb += aml_device(f"C{cpu:03X}", aml_def_name("_HID", aml_string("ACPI0007"))
                         + aml_def_name("_UID", aml_int(cpu)))
    if com1:
        sb += aml_device("COM1", aml_def_name("_HID", aml_eisa("PNP0501"))
                         + aml_def_name("_UID", aml_int(1))
                         + aml_def_name("_CRS", res_template(res_io(COM1.base, COM1.length), res_irq(COM1.irq))))
    if rtc:
        sb += aml_device("RTC", aml_def_name("_HID", aml_eisa("PNP0B00"))
                         + aml_def_name("_CRS", res_template(res_io(RTC.base, RTC.length))))
    if kbd:
        sb += aml_device("KBD", aml_def_name("_HID", aml_eisa("PNP0303"))
                         + aml_def_name("_CRS", res_template(res_io(KBD_DATA.base, KBD_DATA.length),
                                                             res_io(KBD_COMMAND.base, KBD_COMMAND.length),
                                                             res_irq(KBD_DATA.irq))))
    if mouse:
        # The i8042's AUX port has a mouse: without this node Linux's i8042 skips the port.
        sb += aml_device("MOU", aml_def_name("_HID", aml_eisa("PNP0F13"))
                         + aml_def_name("_CRS", res_template(res_irq(AUX_IRQ))))
    if pci is not None:
        hid = "PNP0A08" if mcfg is not None else "PNP0A03"
        dev = aml_def_name("_HID", aml_eisa(hid))
        if mcfg is not None:
            dev += aml_def_name("_CID", aml_eisa("PNP0A03"))
        dev += aml_def_name("_UID", aml_int(0))
        dev += aml_def_name("_BBN", aml_int(pci.bus_start))
        dev += aml_def_name("_SEG", aml_int(mcfg.segment if mcfg else 0))
        res = [res_word_bus(pci.bus_start, pci.bus_end), res_io(PCI_CONFIG_PORTS.base, PCI_CONFIG_PORTS.length)]
        res += [res_word_io(a, b) for a, b in pci.io]
        res += [res_dword_mem(a, b) for a, b in pci.mem32]
        res += [res_qword_mem(a, b) for a, b in pci.mem64]
        dev += aml_def_name("_CRS", res_template(*res))
        if pci.prt:
            entries = [aml_package([aml_int((slot << 16) | 0xFFFF), aml_int(pin), aml_int(0),
                                    aml_int(gsi)]) for slot, pin, gsi in pci.prt]
            dev += aml_def_name("_PRT", aml_package(entries))
        sb += aml_device("PCI0", dev)
    if mcfg is not None:
        # Linux accepts MMCONFIG only where firmware reserves it as a motherboard resource
        end = mcfg.base + mcfg.size - 1
        sb += aml_device("MRES", aml_def_name("_HID", aml_eisa("PNP0C02"))
                         + aml_def_name("_UID", aml_int(1))
                         + aml_def_name("_CRS", res_template(
                             res_qword_mem(mcfg.base, end, consumer=True) if end > 0xFFFFFFFF
                             else res_dword_mem(mcfg.base, end, consumer=True))))
    body += aml_scope("\\_SB", sb)
    return sdt(b"DSDT", 2, body)


def build_madt(num_cpus: int, sci_irq: int, ioapic: bool) -> bytes:
    body = struct.pack("<II", LAPIC_ADDRESS, 1)  # PCAT_COMPAT: the 8259s exist too
    for cpu in range(num_cpus):
        body += struct.pack("<BBBBI", 0, 8, cpu, cpu, 1)
    if ioapic:
        body += struct.pack("<BBBBII", 1, 12, IOAPIC_ID, 0, IOAPIC_ADDRESS, 0)
        body += struct.pack("<BBBBIH", 2, 10, 0, 0, 2, 0)  # IRQ0 -> GSI 2 (the PIT)
        # SCI: level triggered, active high (flags: polarity 01, trigger 11)
        body += struct.pack("<BBBBIH", 2, 10, 0, sci_irq, sci_irq, 0x000D)
    body += struct.pack("<BBBHB", 4, 6, 0xFF, 0, 1)  # LINT1 is NMI on every CPU
    return sdt(b"APIC", 4, body)


def build_mcfg(m: Mcfg) -> bytes:
    body = b"\x00" * 8 + struct.pack("<QHBBI", m.base, m.segment, m.start_bus, m.end_bus, 0)
    return sdt(b"MCFG", 1, body)


def build_facs() -> bytes:
    facs = bytearray(64)
    struct.pack_into("<4sI", facs, 0, b"FACS", 64)
    facs[32] = 1  # version
    return bytes(facs)


def build_fadt(facs: int, dsdt: int, pm_base: int, sci_irq: int, timer_32bit: bool,
               reset_reg: tuple[int, int] | None) -> bytes:
    f = bytearray(276 - 36)

    def put(offset: int, fmt: str, *values: int | bytes) -> None:
        struct.pack_into(fmt, f, offset - 36, *values)

    evt = pm_base + acpi_pm.PM1_EVT_OFFSET
    cnt = pm_base + acpi_pm.PM1_CNT_OFFSET
    tmr = pm_base + acpi_pm.PM_TMR_OFFSET
    gpe = pm_base + acpi_pm.GPE0_OFFSET
    put(36, "<II", facs, dsdt)
    put(45, "<BH", 0, sci_irq)  # preferred profile: unspecified
    put(48, "<IBBBB", 0, 0, 0, 0, 0)  # no SMI_CMD: always in ACPI mode
    put(56, "<IIIIIIII", evt, 0, cnt, 0, 0, tmr, gpe, 0)
    put(88, "<BBBBBBBB", acpi_pm.PM1_EVT_LENGTH, acpi_pm.PM1_CNT_LENGTH, 0,
        acpi_pm.PM_TMR_LENGTH, acpi_pm.GPE0_LENGTH, 0, 0, 0)
    put(96, "<HHHH", 0x0FFF, 0xFFFF, 0, 0)  # no C2/C3
    put(104, "<BBBBB", 0, 0, 0, 0, RTC_CENTURY_INDEX)
    put(109, "<H", 0x0001 | 0x0002 | 0x0004)  # legacy devices, 8042, no VGA
    flags = (1 << 0) | (1 << 2) | (1 << 5)  # WBINVD, C1, sleep button not fixed
    if timer_32bit:
        flags |= 1 << 8  # TMR_VAL_EXT
    if reset_reg is not None:
        flags |= 1 << 10  # RESET_REG_SUP
        put(116, "<12sB", gas(1, 8, reset_reg[0], 1), reset_reg[1])
    put(112, "<I", flags)
    put(131, "<B", 0)  # FADT minor version
    put(132, "<QQ", facs, dsdt)
    put(148, "<12s", gas(1, 8 * acpi_pm.PM1_EVT_LENGTH, evt))
    put(172, "<12s", gas(1, 8 * acpi_pm.PM1_CNT_LENGTH, cnt))
    put(208, "<12s", gas(1, 8 * acpi_pm.PM_TMR_LENGTH, tmr))
    put(220, "<12s", gas(1, 8 * acpi_pm.GPE0_LENGTH, gpe))
    put(268, "<8s", b"KVMPY\x00\x00\x00")
    return sdt(b"FACP", 6, bytes(f))


def build_rsdp(rsdt: int, xsdt: int) -> bytes:
    r = bytearray(struct.pack("<8sB6sBIIQB3s", b"RSD PTR ", 0, OEM_ID, 2, rsdt, 36, xsdt, 0, b"\0\0\0"))
    r[8] = _checksum(r[:20])
    r[32] = _checksum(r)
    return bytes(r)


def _align(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


@dataclass(frozen=True)
class _Tables:
    """The tables laid out from ``xsdt_at``, each pointer already aimed at its
    table's address (addresses are relative when the layout starts at 0)."""

    xsdt_at: int
    xsdt: bytes
    rsdt_at: int
    rsdt: bytes
    facs_at: int
    fadt_at: int
    fadt: bytes
    dsdt_at: int
    dsdt: bytes
    madt_at: int
    madt: bytes
    mcfg_at: int
    mcfg: bytes | None
    end: int
    pointers: tuple[int, ...]       # the tables the XSDT/RSDT list, in order


def _lay_out(start: int, num_cpus: int, pm_base: int, sci_irq: int, ioapic: bool, pci_mcfg: Mcfg | None,
             pci_root: PciRoot | None, timer_32bit: bool, reset_reg: tuple[int, int] | None,
             mouse: bool = False) -> _Tables:
    # fixed order; addresses are known before the pointing tables are built
    dsdt = build_dsdt(num_cpus, pci_root, pci_mcfg, mouse=mouse)
    madt = build_madt(num_cpus, sci_irq, ioapic)
    mcfg = build_mcfg(pci_mcfg) if pci_mcfg is not None else None
    n_entries = 2 + (1 if mcfg else 0)  # FADT, MADT, MCFG
    xsdt_at = start
    rsdt_at = _align(xsdt_at + 36 + 8 * n_entries, 16)
    facs_at = _align(rsdt_at + 36 + 4 * n_entries, 64)
    fadt_at = _align(facs_at + 64, 16)
    dsdt_at = _align(fadt_at + 276, 16)
    madt_at = _align(dsdt_at + len(dsdt), 16)
    mcfg_at = _align(madt_at + len(madt), 16)
    end = mcfg_at + (len(mcfg) if mcfg else 0)
    fadt = build_fadt(facs_at, dsdt_at, pm_base, sci_irq, timer_32bit, reset_reg)
    pointers = (fadt_at, madt_at) + ((mcfg_at,) if mcfg else ())
    xsdt = sdt(b"XSDT", 1, b"".join(struct.pack("<Q", p) for p in pointers))
    rsdt = sdt(b"RSDT", 1, b"".join(struct.pack("<I", p) for p in pointers))
    return _Tables(xsdt_at, xsdt, rsdt_at, rsdt, facs_at, fadt_at, fadt, dsdt_at, dsdt, madt_at, madt,
                   mcfg_at, mcfg, end, pointers)


@dataclass(frozen=True)
class LoaderTables:
    """ACPI tables for a firmware that places them itself (QEMU's fw_cfg files):
    ``tables`` (etc/acpi/tables) and ``rsdp`` (etc/acpi/rsdp) hold offsets into
    the tables blob where addresses go, and ``loader`` (etc/table-loader) says
    which fields to turn into addresses and which checksums to fix then."""

    tables: bytes
    rsdp: bytes
    loader: bytes


TABLES_FILE = "etc/acpi/tables"
RSDP_FILE = "etc/acpi/rsdp"


def build_loader_tables(num_cpus: int, pm_base: int = acpi_pm.PM_BLOCK.base, sci_irq: int = acpi_pm.SCI_IRQ,
                        ioapic: bool = True, pci_mcfg: Mcfg | None = None, pci_root: PciRoot | None = None,
                        timer_32bit: bool = True,
                        reset_reg: tuple[int, int] | None = (RESET_CONTROL_PORT, RESET_VALUE),
                        mouse: bool = False) -> LoaderTables:
    """The same tables as ``build_acpi_tables``, for the firmware's table loader."""
    from ..devices.fw_cfg import TableLoader
    if not 1 <= num_cpus <= MAX_CPUS:
        raise ConfigError(f"cpus = {num_cpus}: the ACPI tables describe 1 to {MAX_CPUS} CPUs")
    t = _lay_out(0, num_cpus, pm_base, sci_irq, ioapic, pci_mcfg, pci_root, timer_32bit, reset_reg, mouse)
    blob = bytearray(t.end)
    for at, data in ((t.xsdt_at, t.xsdt), (t.rsdt_at, t.rsdt), (t.facs_at, build_facs()), (t.fadt_at, t.fadt),
                     (t.dsdt_at, t.dsdt), (t.madt_at, t.madt)) + (((t.mcfg_at, t.mcfg),) if t.mcfg else ()):
        blob[at:at + len(data)] = data
    checksummed = ((t.xsdt_at, t.xsdt), (t.rsdt_at, t.rsdt), (t.fadt_at, t.fadt), (t.dsdt_at, t.dsdt),
                   (t.madt_at, t.madt)) + (((t.mcfg_at, t.mcfg),) if t.mcfg else ())
    rsdp = bytearray(build_rsdp(t.rsdt_at, t.xsdt_at))
    # The loader's contract (QEMU's bios-linker-loader): a checksum field is zero until
    # ADD_CHECKSUM fills it. OVMF stores the checksum of the range as it finds it, field
    # included, so a precomputed one would stay in the sum and OVMF would find no table.
    for at, _data in checksummed:
        blob[at + 9] = 0
    rsdp[8] = rsdp[32] = 0
    loader = TableLoader()
    loader.allocate(RSDP_FILE, 16, fseg=True)
    loader.allocate(TABLES_FILE, 64)
    # pointers first: each checksum below is computed over the patched table
    for field in (36, 40):                                   # FIRMWARE_CTRL, DSDT
        loader.add_pointer(TABLES_FILE, TABLES_FILE, t.fadt_at + field, 4)
    for field in (132, 140):                                 # X_FIRMWARE_CTRL, X_DSDT
        loader.add_pointer(TABLES_FILE, TABLES_FILE, t.fadt_at + field, 8)
    for i in range(len(t.pointers)):
        loader.add_pointer(TABLES_FILE, TABLES_FILE, t.xsdt_at + 36 + 8 * i, 8)
        loader.add_pointer(TABLES_FILE, TABLES_FILE, t.rsdt_at + 36 + 4 * i, 4)
    loader.add_pointer(RSDP_FILE, TABLES_FILE, 16, 4)
    loader.add_pointer(RSDP_FILE, TABLES_FILE, 24, 8)
    for at, data in checksummed:
        loader.add_checksum(TABLES_FILE, at + 9, at, len(data))
    loader.add_checksum(RSDP_FILE, 8, 0, 20)
    loader.add_checksum(RSDP_FILE, 32, 0, 36)
    return LoaderTables(tables=bytes(blob), rsdp=bytes(rsdp), loader=loader.blob())


def build_acpi_tables(memory: GuestMemory, base: int, num_cpus: int,
                      pm_base: int = acpi_pm.PM_BLOCK.base, sci_irq: int = acpi_pm.SCI_IRQ,
                      ioapic: bool = True, pci_mcfg: Mcfg | tuple | None = None,
                      pci_root: PciRoot | None = None, timer_32bit: bool = True,
                      reset_reg: tuple[int, int] | None = (RESET_CONTROL_PORT, RESET_VALUE),
                      bios_rsdp_copy: int | None = BIOS_RSDP_COPY, mouse: bool = False) -> int:
    """Write the tables into guest RAM; returns the RSDP's guest physical address.

    ``pci_mcfg``: ``Mcfg`` or (base, start_bus, end_bus[, segment]) for an MCFG
    table (and a PNP0C02 reservation); ``pci_root``: the root bridge to describe
    (defaults to ``PciRoot()`` when an MCFG is given). ``timer_32bit`` must match
    the AcpiPm device. ``reset_reg`` is (port, value) or None.
    """
    if not 1 <= num_cpus <= MAX_CPUS:
        raise ConfigError(f"cpus = {num_cpus}: the ACPI tables describe 1 to {MAX_CPUS} CPUs")
    if not 0 < pm_base <= 0xFFFF - acpi_pm.PM_IO_LENGTH or not 0 <= sci_irq < 16:
        raise ValueError(f"bad PM block {pm_base:#x} or SCI {sci_irq}")
    if base % 16:
        raise ValueError(f"ACPI base {base:#x} must be 16-byte aligned")
    if isinstance(pci_mcfg, tuple):
        pci_mcfg = Mcfg(*pci_mcfg)
    if pci_mcfg is not None and pci_root is None:
        pci_root = PciRoot(bus_start=pci_mcfg.start_bus, bus_end=pci_mcfg.end_bus)

    rsdp_at = base
    t = _lay_out(_align(rsdp_at + 36, 16), num_cpus, pm_base, sci_irq, ioapic, pci_mcfg, pci_root,
                 timer_32bit, reset_reg, mouse)
    end = t.end
    if end - base > ACPI_REGION_SIZE:
        raise ValueError(f"ACPI tables need {end - base:#x} bytes, more than {ACPI_REGION_SIZE:#x}")
    rsdp = build_rsdp(t.rsdt_at, t.xsdt_at)
    xsdt_at, xsdt, rsdt_at, rsdt, facs_at, fadt_at, fadt, dsdt_at, dsdt, madt_at, madt, mcfg_at, mcfg = (
        t.xsdt_at, t.xsdt, t.rsdt_at, t.rsdt, t.facs_at, t.fadt_at, t.fadt, t.dsdt_at, t.dsdt, t.madt_at,
        t.madt, t.mcfg_at, t.mcfg)
    placed = [(rsdp_at, rsdp), (xsdt_at, xsdt), (rsdt_at, rsdt), (facs_at, build_facs()),
              (fadt_at, fadt), (dsdt_at, dsdt), (madt_at, madt)]
    if mcfg:
        placed.append((mcfg_at, mcfg))
    try:
        memory.view(base, end - base)[:] = bytes(end - base)
        for addr, data in placed:
            memory.write(addr, data)
        if bios_rsdp_copy is not None and not BIOS_RSDP_COPY <= base < 0x100000:
            if memory.contains(bios_rsdp_copy, 36):
                memory.write(bios_rsdp_copy, rsdp)
    except GuestMemoryError as e:
        raise ConfigError(f"ACPI tables at {base:#x}-{end:#x} do not fit in guest RAM ({e})") from None
    return rsdp_at
