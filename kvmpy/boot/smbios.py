"""SMBIOS tables for the firmware, as QEMU hands them over in fw_cfg: the
structures in etc/smbios/smbios-tables and a 2.1 entry point in
etc/smbios/smbios-anchor, whose address and checksums the firmware fills in
(SeaBIOS src/fw/biostables.c smbios_romfile_setup; it adds the type 0 BIOS
information itself). Structures: 1 (system), 3 (chassis), 4 (one per CPU),
16/17/19 (memory array, device, mapped ranges), 32 (boot status), 127 (end);
layouts of the SMBIOS 2.8 specification.
"""

from __future__ import annotations

import struct

MANUFACTURER = "kvmpy"
PRODUCT = "Standard PC (i440FX + PIIX, 1996)"
VERSION = "1.0"

_HANDLE_TYPE1 = 0x100
_HANDLE_TYPE3 = 0x300
_HANDLE_TYPE4 = 0x400
_HANDLE_TYPE16 = 0x1000
_HANDLE_TYPE17 = 0x1100
_HANDLE_TYPE19 = 0x1300
_HANDLE_TYPE32 = 0x2000
_HANDLE_TYPE127 = 0x7F00
NO_ERROR_INFO = 0xFFFE
NO_HANDLE = 0xFFFF


def _structure(kind: int, handle: int, body: bytes, strings: tuple[str, ...] = ()) -> bytes:
    """Header, formatted area, then the string set (double NUL when empty)."""
    head = struct.pack("<BBH", kind, 4 + len(body), handle) + body
    if not strings:
        return head + b"\0\0"
    return head + b"".join(s.encode() + b"\0" for s in strings) + b"\0"


def build_smbios(num_cpus: int, ram_ranges: list[tuple[int, int]], mem_size: int) -> tuple[bytes, bytes]:
    """(tables, anchor) for ``num_cpus`` CPUs and RAM at ``ram_ranges`` [(addr, size)]."""
    out = [
        _structure(1, _HANDLE_TYPE1, struct.pack("<BBBB16sBBB", 1, 2, 3, 0, bytes(16), 6, 0, 0),
                   (MANUFACTURER, PRODUCT, VERSION)),
        _structure(3, _HANDLE_TYPE3, struct.pack("<BBBBBBBBBIBBBB", 1, 1, 2, 0, 0, 3, 3, 3, 2, 0, 0, 0, 0, 0),
                   (MANUFACTURER, VERSION)),
    ]
    for cpu in range(num_cpus):
        body = struct.pack("<BBBB8sBBHHHBBHHHBBBBBBHH",
                           1, 3, 0xFE, 2,        # socket string, central processor, family in family2, vendor
                           bytes(8), 3,          # processor id, version string
                           0, 0, 2000, 2000,     # voltage, external clock, max and current MHz
                           0x41, 1,              # populated and enabled, upgrade "other"
                           NO_HANDLE, NO_HANDLE, NO_HANDLE, 0, 0, 0,
                           1, 1, 1, 0x02, 0x01)  # one core, one thread; characteristics; family2 "other"
        out.append(_structure(4, _HANDLE_TYPE4 + cpu, body, (f"CPU {cpu}", MANUFACTURER, VERSION)))
    kib = mem_size >> 10
    out.append(_structure(16, _HANDLE_TYPE16, struct.pack("<BBBIHHQ", 1, 3, 6,
                                                          kib if kib < 0x80000000 else 0x80000000,
                                                          NO_ERROR_INFO, 1, mem_size if kib >= 0x80000000 else 0)))
    mib = mem_size >> 20
    out.append(_structure(17, _HANDLE_TYPE17, struct.pack("<HHHHHBBBBBHHBBBBBIH",
                                                          _HANDLE_TYPE16, NO_ERROR_INFO, 0xFFFF, 0xFFFF,
                                                          mib if mib < 0x7FFF else 0x7FFF, 0x09, 0, 1, 0,
                                                          0x07, 0x0002, 0, 2, 0, 0, 0, 0,
                                                          mib if mib >= 0x7FFF else 0, 0),
                          ("DIMM 0", MANUFACTURER)))
    for i, (addr, size) in enumerate(ram_ranges):
        start, end = addr >> 10, (addr + size - 1) >> 10
        if end < 0xFFFFFFFF:
            body = struct.pack("<IIHBQQ", start, end, _HANDLE_TYPE16, 1, 0, 0)
        else:
            body = struct.pack("<IIHBQQ", 0xFFFFFFFF, 0xFFFFFFFF, _HANDLE_TYPE16, 1, addr, addr + size - 1)
        out.append(_structure(19, _HANDLE_TYPE19 + i, body))
    out.append(_structure(32, _HANDLE_TYPE32, bytes(6) + b"\0"))
    out.append(_structure(127, _HANDLE_TYPE127, b""))
    tables = b"".join(out)
    biggest = max(len(s) for s in out)
    anchor = struct.pack("<4sBBBBHB5s5sBHIHB", b"_SM_", 0, 0x1F, 2, 8, biggest, 0, bytes(5), b"_DMI_", 0,
                         len(tables), 0, len(out), 0x28)
    return tables, anchor


def parse_structures(tables: bytes) -> list[tuple[int, int, bytes, list[bytes]]]:
    """[(type, handle, formatted area, strings)]: a reader's view, for tests."""
    out = []
    pos = 0
    while pos + 4 <= len(tables):
        kind, length, handle = struct.unpack_from("<BBH", tables, pos)
        formatted = tables[pos + 4:pos + length]
        end = tables.index(b"\0\0", pos + length)
        strings = [s for s in tables[pos + length:end].split(b"\0") if s]
        out.append((kind, handle, formatted, strings))
        pos = end + 2
        if kind == 127:
            break
    return out
