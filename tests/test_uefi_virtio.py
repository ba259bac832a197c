"""virtio under UEFI: OVMF places the BARs of virtio devices where its own rule says
(Debian 12's OVMF: the 32-bit ones from max(2 GiB, end of low RAM), the 64-bit ones in
a window at 32 GiB), so kvmpy's PCI windows under firmware are QEMU's i440FX holes
(kvmpy.boot.layout.firmware_pci_windows), decoded by the bus and announced in _CRS.

End to end: an EFI system partition made here (tests/support/uefi_esp.py: GRUB's EFI
image, mtools) on a virtio-blk disk; OVMF boots it, GRUB reads a token back from the
same disk through OVMF's virtio-blk driver and gets an address by DHCP through OVMF's
virtio-net driver on the default user NIC (libslirp), then leaves through the
debug-exit port. QEMU boots the same image as the reference. OVMF runs on the
translator only: under this host's software-nested KVM its SEC phase stops with an
emulation failure (an x87 fninit), in kvmpy as in `qemu-system-x86_64 -enable-kvm`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import run_kvmpy, tool_required
from support.uefi_esp import BEGIN, DONE, EXIT_PORT, EXIT_VALUE, make_esp, missing_esp_tool
from support.acpi_loader import run_table_loader

BOOT_TIMEOUT = 600
TOKEN = "virtio-blk-read-back-5f3a"
TCG_PHYS_BITS = 40          # what the translator's CPUID announces (OVMF runs on the translator only)
GIB = 1 << 30


@pytest.fixture(scope="module")
def ovmf():
    from kvmpy.boot.firmware import OVMF_IMAGES
    path = next((p for p in OVMF_IMAGES if os.path.isfile(p)), None)
    if path is None:
        pytest.skip(f"OVMF is not installed ({', '.join(OVMF_IMAGES)}; Debian package ovmf)")
    return path


@pytest.fixture(scope="module")
def esp(tmp_path_factory):
    reason = missing_esp_tool()
    if reason:
        pytest.skip(reason)
    return make_esp(str(tmp_path_factory.mktemp("esp")), TOKEN)


def _grub_lines(out: bytes) -> list[str]:
    """GRUB's lines between BEGIN and DONE, without terminal escapes, MACs masked
    (QEMU's NIC and kvmpy's have different addresses)."""
    text = re.sub(r"\x1b\[[0-9;=?]*[A-Za-z]", "", out.decode(errors="replace")).replace("\r", "")
    assert BEGIN in text and DONE in text, text[-3000:]
    body = text[text.rindex(BEGIN) + len(BEGIN):text.rindex(DONE)]
    body = re.sub(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", "MAC", body)
    return [line.strip() for line in body.splitlines() if line.strip()]


@pytest.mark.guest
def test_ovmf_boots_from_virtio_blk_and_gets_dhcp_over_virtio_net(ovmf, esp, tmp_path):
    disk = tmp_path / "esp.img"
    shutil.copyfile(esp, disk)
    # No --net: the default user NIC, which UEFI gets again now that OVMF's BARs decode.
    r = run_kvmpy(["run", "--accel", "tcg", "--firmware", "uefi", "--bios", ovmf, "-m", "512",
                   "--drive", f"file={disk},format=raw"], timeout=BOOT_TIMEOUT)
    out = r.stdout.decode(errors="replace")
    err = r.stderr.decode(errors="replace")
    assert "outside the PCI windows" not in err, err
    assert r.returncode == EXIT_VALUE, (r.returncode, out[-3000:], err[-3000:])
    assert "BdsDxe: starting Boot" in out, out[-3000:]
    lines = _grub_lines(r.stdout)
    assert TOKEN in lines, lines
    assert any(re.fullmatch(r"efinet\d+:dhcp MAC 10\.0\.2\.15", line) for line in lines), lines

    qemu = tool_required("qemu-system-x86_64")
    qdisk = tmp_path / "esp-qemu.img"
    shutil.copyfile(esp, qdisk)
    q = subprocess.run([qemu, "-M", "pc", "-accel", "tcg", "-m", "512", "-bios", ovmf, "-nographic",
                        "-nodefaults", "-serial", "stdio", "-monitor", "none",
                        "-drive", f"file={qdisk},format=raw,if=none,id=d0", "-device", "virtio-blk-pci,drive=d0",
                        "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0",
                        "-device", f"isa-debug-exit,iobase={EXIT_PORT:#x},iosize=4"],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=BOOT_TIMEOUT)
    assert q.returncode == (EXIT_VALUE << 1) | 1, (q.returncode, q.stdout[-3000:], q.stderr[-3000:])
    assert _grub_lines(q.stdout) == lines


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    from kvmpy.tools import guestbuild
    if not all(map(shutil.which, ("apt-get", "dpkg-deb"))):
        pytest.skip("not a Debian host: no apt-get/dpkg-deb to build the guest")
    return guestbuild.build(out_dir=str(tmp_path_factory.mktemp("guest")), with_disk=False)


@pytest.mark.guest
def test_linux_after_ovmf_sees_the_virtio_disk_and_nic_and_powers_off(ovmf, guest, tmp_path):
    """OVMF starts the kernel from fw_cfg (its QEMU kernel loader, the EFI stub), hands
    it kvmpy's ACPI tables, and Linux drives the virtio-blk and virtio-net devices at the
    BARs OVMF chose: it reads the disk's first bytes, gets its address by DHCP on the
    default NIC and powers off through ACPI."""
    from kvmpy.boot import layout
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as f:
        f.write(TOKEN.encode().ljust(1 << 20, b"\0"))
    run = "head -c %d /dev/vda; echo; ip -4 addr show eth0; dmesg | grep root.bus.resource" % len(TOKEN)
    r = run_kvmpy(["run", "--accel", "tcg", "--firmware", "uefi", "--bios", ovmf, "-m", "512",
                   "--kernel", guest.kernel, "--initrd", guest.initrd,
                   "--append", f'console=ttyS0 panic=-1 kvmpy.ip=dhcp kvmpy.run="{run}"',
                   "--drive", f"file={disk},format=raw"], timeout=BOOT_TIMEOUT)
    out = r.stdout.decode(errors="replace")
    err = r.stderr.decode(errors="replace")
    assert "outside the PCI windows" not in err, err
    assert "kvmpy guest: run exit 0" in out, out[-4000:]
    assert TOKEN in out and "inet 10.0.2.15/24" in out, out[-4000:]
    (base32, end32), (base64, end64) = layout.firmware_pci_windows(512 << 20, TCG_PHYS_BITS)
    assert f"root bus resource [mem {base32:#010x}-{end32:#010x} window]" in out, out[-4000:]
    assert f"root bus resource [mem {base64:#x}-{end64:#x} window]" in out, out[-4000:]
    assert "reboot: Power down" in out and r.returncode == 0, (r.returncode, out[-2000:], err[-2000:])


# --- the windows on their own ---------------------------------------------------------------------
def _ovmf_windows(mem_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where Debian 12's OVMF (edk2 2022.11, OvmfPkg PlatformInitLib) places BARs on an
    i440FX with kvmpy's RAM layout: 32-bit from max(2 GiB, end of low RAM) to
    0xFC000000, 64-bit in 32 GiB aligned to its size above the end of RAM."""
    from kvmpy.boot import layout
    low_end = min(mem_size, layout.PCI_HOLE_START)
    ram_end = layout.FOUR_GIB + max(0, mem_size - layout.PCI_HOLE_START)
    size64 = 32 * GIB
    base64 = -(-ram_end // size64) * size64
    return (max(2 * GIB, low_end), 0xFC000000 - 1), (base64, base64 + size64 - 1)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=2 << 20, max_value=1 << 40).map(lambda m: m & ~0xFFFFF))
def test_firmware_windows_hold_ovmfs_placement_and_no_ram(mem_size):
    from kvmpy.boot import layout
    from kvmpy.boot.firmware import firmware_ram_layout
    (base32, end32), mmio64 = layout.firmware_pci_windows(mem_size, TCG_PHYS_BITS)
    assert end32 == layout.IOAPIC_ADDR - 1 and base32 <= end32
    ram_regions = firmware_ram_layout(mem_size)
    for ram, size in ram_regions:
        assert ram + size <= base32 or ram >= end32 + 1
    (o32, e32), (o64, e64) = _ovmf_windows(mem_size)
    assert base32 <= o32 and e32 <= end32
    ram_end = max(ram + size for ram, size in ram_regions)
    if mmio64 is None:
        assert ram_end > layout.FIRMWARE_PCI_MMIO64_END - GIB
        return
    base64, end64 = mmio64
    assert layout.FOUR_GIB <= base64 <= end64 and base64 % GIB == 0 and ram_end <= base64
    if e64 <= layout.FIRMWARE_PCI_MMIO64_END:
        assert base64 <= o64 and e64 <= end64


_mem_sizes = st.one_of(st.integers(min_value=2, max_value=1 << 19).map(lambda n: n << 21),  # 2 MiB steps to 1T
                       st.integers(min_value=1, max_value=1 << 10).map(lambda n: n << 30))


@settings(max_examples=300, deadline=None)
@given(_mem_sizes, st.integers(min_value=32, max_value=52))
def test_the_64_bit_window_ends_within_the_announced_address_width(mem_size, phys_bits):
    """As QEMU's pc_pci_hole64 within phys-bits: the window ends at 2^40 or at the
    width CPUID 0x80000008 announces, whichever is lower, and a RAM size that leaves
    no room for it is refused, one line naming the key, the width and the limit."""
    from kvmpy.boot import layout
    from kvmpy.config import VmConfig
    from kvmpy.errors import ConfigError
    from kvmpy.machine import firmware_pci_windows_or_refuse
    cfg = VmConfig(memory=mem_size, source="vm.toml")
    most = layout.firmware_max_memory(phys_bits)
    assert most % (2 << 20) == 0
    _mmio32, mmio64 = layout.firmware_pci_windows(mem_size, phys_bits)
    width_end = min(1 << 40, 1 << phys_bits) - 1
    if mem_size <= most:
        assert mmio64 is not None and firmware_pci_windows_or_refuse(cfg, phys_bits)[1] == mmio64
        base64, end64 = mmio64
        ram_end = layout.FOUR_GIB + max(0, mem_size - layout.PCI_HOLE_START)
        assert end64 == width_end and ram_end <= base64 < end64 and base64 % GIB == 0
        assert end64 - base64 + 1 >= GIB
        return
    assert mmio64 is None
    with pytest.raises(ConfigError) as refused:
        firmware_pci_windows_or_refuse(cfg, phys_bits)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("vm.toml: key 'memory': ")
    assert f"at most {most >> 20}M" in message
    assert f"{phys_bits}-bit" in message if phys_bits <= 40 else "1T" in message
    if most:
        assert layout.firmware_pci_windows(most, phys_bits)[1] is not None, "the limit is the largest that fits"


@pytest.mark.guest
def test_a_ram_size_without_room_for_the_window_is_refused_by_kvmpy_run():
    """1T of RAM under SeaBIOS on the translator (40-bit addresses): one line, exit 2,
    before any firmware runs."""
    pytest.importorskip("kvmpy._tcg", reason="the translator (kvmpy._tcg) is not built")
    from kvmpy.boot.firmware import SEABIOS_IMAGES
    if not any(os.path.isfile(p) for p in SEABIOS_IMAGES):
        pytest.skip(f"SeaBIOS is not installed ({', '.join(SEABIOS_IMAGES)}; Debian package seabios)")
    r = run_kvmpy(["run", "--accel", "tcg", "--firmware", "bios", "-m", "1T"], timeout=120)
    lines = r.stderr.decode().strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "key 'memory'" in lines[0] and "40-bit physical addresses" in lines[0] and "at most 1046528M" in lines[0]


def test_bus_decodes_bars_where_ovmf_put_them_and_acpi_says_so():
    """The addresses this OVMF gave a virtio-net with -m 512 (BAR2 at 2 GiB, BAR0 at
    32 GiB) decode, and the root bridge's _CRS announces the same two windows."""
    from kvmpy.boot import layout
    from kvmpy.devices.bus import Bus
    from kvmpy.devices.pci.bus import PciBus
    from kvmpy.devices.pci.device import CMD_MEMORY, PciDevice
    from kvmpy.pc import pci_root_of

    class Platform:
        def set_irq_level(self, gsi, level):
            pass

    mmio32, mmio64 = layout.firmware_pci_windows(512 << 20, TCG_PHYS_BITS)
    mmio = Bus("mmio")
    pci = PciBus(mmio, Bus("pio"), Platform(), mmio_window=mmio32, mmio64_window=mmio64)
    dev = PciDevice(0x1AF4, 0x1041, 0x020000, name="nic")
    dev.add_bar(0, 0x4000, kind="mem64")
    dev.add_bar(2, 0x1000)
    pci.add(dev)
    # As the firmware writes them: BAR0's two halves, BAR2, then memory decoding on.
    for offset, value in ((0x10, 0x0), (0x14, 0x8), (0x18, 0x80000000)):
        dev.config_write(offset, 4, value)
    dev.config_write(0x04, 2, CMD_MEMORY)
    assert pci.mapping(dev, 0) == 0x800000000 and pci.mapping(dev, 2) == 0x80000000
    root = pci_root_of(pci)
    assert tuple(root.mem32) == (mmio32,) and tuple(root.mem64) == (mmio64,)
    # Low RAM and the IOAPIC stay out: a BAR there is refused.
    dev.config_write(0x18, 4, 0x10000000)
    assert pci.mapping(dev, 2) is None


# --- the ACPI tables through OVMF's loader ----------------------------------------------------------

@pytest.mark.parametrize("mem_size", [512 << 20, 5 << 30])
def test_every_table_ovmf_installs_has_a_valid_checksum(mem_size):
    """OVMF installs a table only where the checksum holds; before the loader left the
    fields zero for it, it found none of kvmpy's (no FADT: Linux ran without ACPI)."""
    from kvmpy.boot import layout
    from kvmpy.boot.acpi import RSDP_FILE, TABLES_FILE, PciRoot, build_loader_tables
    from kvmpy.devices.fw_cfg import parse_table_loader
    mmio32, mmio64 = layout.firmware_pci_windows(mem_size, TCG_PHYS_BITS)
    t = build_loader_tables(num_cpus=2, pci_root=PciRoot(mem32=(mmio32,), mem64=(mmio64,)))
    files = {"etc/table-loader": t.loader, TABLES_FILE: t.tables, RSDP_FILE: t.rsdp}
    addresses = {RSDP_FILE: 0x1F77C000, TABLES_FILE: 0x1F77D000}
    blobs = run_table_loader(files, addresses, "ovmf")
    pointees = {(c[2], int.from_bytes(blobs[c[1]][c[3]:c[3] + c[4]], "little") - addresses[c[2]])
                for c in parse_table_loader(t.loader) if c[0] == "add_pointer"}
    signatures = set()
    for name, at in pointees:
        blob = blobs[name]
        signature, length = blob[at:at + 4], int.from_bytes(blob[at + 4:at + 8], "little")
        signatures.add(bytes(signature))
        if signature != b"FACS":
            assert sum(blob[at:at + length]) % 256 == 0, signature
    assert {b"FACP", b"FACS", b"DSDT", b"APIC", b"RSDT", b"XSDT"} <= signatures
    rsdp = blobs[RSDP_FILE]
    assert sum(rsdp[:20]) % 256 == 0 and sum(rsdp[:36]) % 256 == 0
