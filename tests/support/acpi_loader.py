"""The firmware's side of QEMU's ACPI table-loader script (etc/table-loader), as an
oracle: the blobs as a firmware leaves them once placed at given addresses."""

from __future__ import annotations

from kvmpy.devices.fw_cfg import parse_table_loader


def run_table_loader(files: dict[str, bytes], addresses: dict[str, int], firmware: str) -> dict[str, bytearray]:
    """Each file of ``files`` placed at ``addresses[name]``, pointers relocated, and
    checksums set the way ``firmware`` sets them: "seabios" (romfile_loader) subtracts
    the range's sum from the field, which forgives a nonzero field; "ovmf"
    (OvmfPkg/AcpiPlatformDxe's first pass) sets the field to CalculateCheckSum8 of
    the range as it stands, the field included, so only a zero field comes out right."""
    assert firmware in ("seabios", "ovmf"), firmware
    blobs: dict[str, bytearray] = {}
    for command in parse_table_loader(files["etc/table-loader"]):
        if command[0] == "allocate":
            _, name, align, _zone = command
            assert addresses[name] % align == 0
            blobs[name] = bytearray(files[name])
        elif command[0] == "add_pointer":
            _, dest, src, offset, size = command
            value = int.from_bytes(blobs[dest][offset:offset + size], "little") + addresses[src]
            blobs[dest][offset:offset + size] = value.to_bytes(size, "little")
        elif command[0] == "add_checksum":
            _, name, offset, start, length = command
            blob = blobs[name]
            base = blob[offset] if firmware == "seabios" else 0
            blob[offset] = (base - sum(blob[start:start + length])) & 0xFF
        else:
            raise AssertionError(command)
    return blobs
