"""Firmware boot: SeaBIOS from Debian's seabios package in ROM, the i440FX's PAM
shadowing, fw_cfg, and a real boot sector booted from virtio-blk, under KVM, the
translator and (as the reference) QEMU."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_kvmpy, tool_required
from support.bootsector import (EXIT_VALUE, FAIL_TEXT, GREETING, SECOND_SECTOR_TEXT,
                                write_boot_disk)
from support.acpi_loader import run_table_loader

from kvmpy.boot.firmware import (SEABIOS_IMAGES, FirmwareMemory, bootorder, BootDevice,
                                 e820_entries, firmware_ram_layout, virtio_blk_boot_path)
from kvmpy.devices.fw_cfg import (DMA_CTL_ERROR, DMA_CTL_READ, DMA_CTL_SELECT, DMA_CTL_SKIP,
                                  DMA_CTL_WRITE, DMA_SIGNATURE, FW_CFG_FILE_DIR, FW_CFG_ID,
                                  FW_CFG_SIGNATURE, FwCfg, FwCfgState, TableLoader, parse_table_loader)
from kvmpy.devices.pci.host_bridge import PAM0, I440fxHostBridge
from kvmpy.memory import GuestMemory

pytestmark = []

SEABIOS = next((p for p in SEABIOS_IMAGES if os.path.isfile(p)), None)
BANNER = b"SeaBIOS (version"


def seabios_required():
    if SEABIOS is None:
        pytest.skip(f"SeaBIOS is not installed ({', '.join(SEABIOS_IMAGES)}; Debian package seabios)")


@pytest.fixture
def boot_disk(tmp_path):
    tool_required("as")
    tool_required("ld")
    path = str(tmp_path / "mbr.img")
    write_boot_disk(path)
    return path


# --- whole boots ---------------------------------------------------------------------------
@pytest.mark.guest
@pytest.mark.parametrize("accel", ["kvm", "tcg"])
def test_seabios_boots_the_boot_sector_from_virtio_blk(accel, boot_disk, tmp_path, request):
    seabios_required()
    if accel == "kvm":
        request.getfixturevalue("kvm_required")
    log = tmp_path / "serial.log"
    r = run_kvmpy(["run", "--accel", accel, "-m", "128M", "--drive", f"file={boot_disk},format=raw",
                   "--serial", f"file:{log}"], timeout=120)
    out = log.read_bytes()
    assert r.returncode == EXIT_VALUE, (r.returncode, r.stderr[-2000:], out[-2000:])
    assert BANNER in out
    assert b"Booting from Hard Disk" in out
    assert GREETING in out and SECOND_SECTOR_TEXT in out
    assert FAIL_TEXT not in out
    assert b"Press ESC for boot menu" not in out          # no menu unless asked: no pause either


@pytest.mark.guest
def test_boot_menu_key_shows_the_prompt(boot_disk, tmp_path):
    seabios_required()
    log = tmp_path / "serial.log"
    toml = tmp_path / "vm.toml"
    toml.write_text(f'accel = "tcg"\nmemory = "128M"\nboot_menu = true\nserial = "file:{log}"\n'
                    f'[[disk]]\npath = "{boot_disk}"\nformat = "raw"\n')
    r = run_kvmpy(["run", str(toml)], timeout=120)
    out = log.read_bytes()
    assert r.returncode == EXIT_VALUE, (r.stderr[-2000:], out[-2000:])
    assert b"Press ESC for boot menu" in out and SECOND_SECTOR_TEXT in out


@pytest.mark.guest
def test_qemu_boots_the_same_boot_sector(boot_disk):
    """The reference: QEMU's SeaBIOS boots the same image the same way."""
    qemu = tool_required("qemu-system-x86_64")
    r = subprocess.run([qemu, "-accel", "tcg", "-nographic", "-m", "128", "-no-reboot",
                        "-drive", f"file={boot_disk},format=raw,if=virtio",
                        "-device", "isa-debug-exit,iobase=0xf4,iosize=4"],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    assert r.returncode == 2 * EXIT_VALUE + 1, (r.returncode, r.stdout[-2000:])
    assert BANNER in r.stdout and b"Booting from Hard Disk" in r.stdout
    # QEMU's SeaBIOS may send the end of its "Booting from Hard Disk..." line (its text
    # console's copy, flushed on a timer) after the boot sector's first bytes, which go
    # to COM1 directly: once seen as "kvmpy-.\r\nmbr: boot sector running".
    assert _without_dots_and_line_ends(GREETING) in _without_dots_and_line_ends(r.stdout)
    assert _without_dots_and_line_ends(SECOND_SECTOR_TEXT) in _without_dots_and_line_ends(r.stdout)


def _without_dots_and_line_ends(text: bytes) -> bytes:
    return text.replace(b".", b"").replace(b"\r", b"").replace(b"\n", b"")


def _wait_for(path, needle: bytes, count: int, proc, timeout: float = 60) -> bytes:
    import time
    deadline = time.monotonic() + timeout
    out = b""
    while time.monotonic() < deadline and proc.poll() is None:
        out = path.read_bytes() if path.exists() else b""
        if out.count(needle) >= count:
            return out
        time.sleep(0.1)
    return out


@pytest.mark.guest
@pytest.mark.parametrize("accel", ["kvm", "tcg"])
def test_seabios_without_a_disk_and_system_reset(accel, tmp_path, request):
    """No kernel and no disk: SeaBIOS runs (the default firmware) and finds nothing;
    system_reset brings the ROM state back, and SeaBIOS runs its POST again (a BIOS
    area left as the first POST made it would send it down its resume path)."""
    seabios_required()
    if accel == "kvm":
        request.getfixturevalue("kvm_required")
    from qemu.qmp.legacy import QEMUMonitorProtocol
    log, sock = tmp_path / "serial.log", str(tmp_path / "qmp.sock")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmpy", "run", "--accel", accel, "-m", "64M", "--serial", f"file:{log}",
         "--qmp", f"unix:{sock}"], cwd=root,
        env={**os.environ, "PYTHONPATH": root}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    try:
        out = _wait_for(log, b"No bootable device", 1, proc)
        assert BANNER in out and b"No bootable device" in out, out[-2000:]
        qmp = QEMUMonitorProtocol(sock)
        qmp.connect()
        qmp.cmd("system_reset")
        out = _wait_for(log, b"No bootable device", 2, proc)
        assert out.count(BANNER) == 2 and out.count(b"No bootable device") == 2, out[-2000:]
        qmp.cmd("quit")
        try:
            qmp.close()
        except EOFError:
            pass        # the VM closed the socket on quit first: the client's disconnect sees EOF
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_bios_image_is_one_line(tmp_path):
    bad = tmp_path / "bios.bin"
    bad.write_bytes(b"\x90" * 1000)          # not a multiple of 4 KiB
    r = run_kvmpy(["run", "--accel", "tcg", "--bios", str(bad)])
    assert r.returncode == 2
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "bios" in lines[0] and str(bad) in lines[0], lines


def test_bad_firmware_option_is_one_line():
    r = run_kvmpy(["run", "--accel", "tcg", "--firmware", "coreboot"])
    assert r.returncode == 2
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "--firmware coreboot" in lines[0], lines


# --- ROM and PAM ---------------------------------------------------------------------------------
def _firmware_memory(image: bytes):
    mem = GuestMemory.anonymous(firmware_ram_layout(64 << 20))
    return mem, FirmwareMemory(mem, image)


def test_rom_and_shadow_start_as_a_pc_has_them():
    image = bytes(range(256)) * (0x40000 // 256)
    mem, fw = _firmware_memory(image)
    try:
        assert mem.read(0xFFFC0000, 0x40000) == image
        # the isa-bios alias, in the PAM areas' pieces
        alias = b"".join(mem.read(a, 0x4000) for a in range(0xE0000, 0xF0000, 0x4000)) + mem.read(0xF0000, 0x10000)
        assert alias == image[-0x20000:]
        assert mem.read(0xC0000, 0x1000) == bytes(0x1000)
        assert not mem.contains(0xA0000, 1) and not mem.contains(0xBFFFF, 1)   # VGA window
        ro = {r.gpa for r in mem.regions if mem.is_readonly(r)}
        assert 0xFFFC0000 in ro and 0xF0000 in ro and 0xC0000 in ro
        assert 0 not in ro and 0x100000 not in ro
    finally:
        mem.close()


def test_fw_cfg_dma_cannot_write_rom(caplog):
    image = b"\x5A" * 0x40000
    mem, fw = _firmware_memory(image)
    try:
        dev = FwCfg(mem)
        status = _dma(mem, dev, (FW_CFG_SIGNATURE << 16) | DMA_CTL_SELECT | DMA_CTL_READ, 4, 0xFFFC0000)
        assert status == DMA_CTL_ERROR and "is ROM" in caplog.text
        assert mem.read(0xFFFC0000, 4) == b"\x5A" * 4
        status = _dma(mem, dev, (FW_CFG_SIGNATURE << 16) | DMA_CTL_SELECT | DMA_CTL_READ, 4, 0xF0000)
        assert status == DMA_CTL_ERROR              # shadow RAM while PAM protects it
        fw.pam_changed([(0xF0000, 0x10000, 0x3)])
        assert _dma(mem, dev, (FW_CFG_SIGNATURE << 16) | DMA_CTL_SELECT | DMA_CTL_READ, 4, 0xF0000) == 0
        assert mem.read(0xF0000, 4) == b"QEMU"
    finally:
        mem.close()


def test_pam_opens_and_closes_the_shadow_and_reset_restores_it():
    image = b"\xAA" * 0x40000
    mem, fw = _firmware_memory(image)
    try:
        bridge = I440fxHostBridge(on_pam=fw.pam_changed)
        # SeaBIOS's make_bios_writable: every area read/write
        bridge.config_write(PAM0 - 1, 4, 0x30 << 8)                 # 0x59 = 0x30
        bridge.config_write(PAM0 + 3, 4, 0x33333333)               # 0x5C-0x5F
        bridge.config_write(PAM0 + 1, 2, 0x3333)                   # 0x5A-0x5B
        assert not any(mem.is_readonly(r) for r in mem.regions if 0xC0000 <= r.gpa < 0x100000)
        mem.write(0xF0000, b"patched")
        # make_bios_readonly: the F segment protected again
        bridge.config_write(PAM0 - 1, 4, 0x10 << 8)
        f_seg = next(r for r in mem.regions if r.gpa == 0xF0000)
        assert mem.is_readonly(f_seg)
        bridge.reset()
        fw.reset()
        assert mem.read(0xF0000, 7) == b"\xAA" * 7
        assert all(mem.is_readonly(r) for r in mem.regions if 0xC0000 <= r.gpa < 0x100000)
        assert bridge.config_read(0, 4) == 0x12378086
        assert bridge.config_read(0x2C, 4) == 0x11001AF4       # what SeaBIOS's qemu_detect wants
    finally:
        mem.close()


# --- fw_cfg ----------------------------------------------------------------------------------------
RAM_SIZE = 1 << 20


@pytest.fixture
def cfg_device():
    mem = GuestMemory.anonymous([(0, RAM_SIZE)])
    dev = FwCfg(mem)
    dev.add_file("etc/b", b"B" * 300)
    dev.add_file("etc/a", bytes(range(100)))
    yield mem, dev
    mem.close()


def _port_read_item(dev: FwCfg, key: int, length: int) -> bytes:
    dev.write(0, 2, key)
    return bytes(dev.read(1, 1) for _ in range(length))


def test_signature_id_and_directory(cfg_device):
    mem, dev = cfg_device
    assert _port_read_item(dev, FW_CFG_SIGNATURE, 4) == b"QEMU"
    assert struct.unpack("<I", _port_read_item(dev, FW_CFG_ID, 4))[0] == 3      # traditional + DMA
    raw = _port_read_item(dev, FW_CFG_DIR := FW_CFG_FILE_DIR, 4 + 2 * 64)
    count = struct.unpack(">I", raw[:4])[0]
    entries = [struct.unpack(">IHH56s", raw[4 + 64 * i:4 + 64 * (i + 1)]) for i in range(count)]
    names = [e[3].rstrip(b"\0") for e in entries]
    assert names == [b"etc/a", b"etc/b"]
    assert [e[0] for e in entries] == [100, 300]
    assert _port_read_item(dev, entries[0][1], 100) == bytes(range(100))
    assert DMA_SIGNATURE.to_bytes(8, "big") == b"QEMU CFG"
    assert dev.read(4, 4).to_bytes(4, "little") == b"QEMU"


def _dma(mem, dev, control, length, address, at=0x1000):
    mem.write(at, struct.pack(">IIQ", control, length, address))
    dev.write(4, 4, int.from_bytes((at >> 32).to_bytes(4, "big"), "little"))
    dev.write(8, 4, int.from_bytes((at & 0xFFFFFFFF).to_bytes(4, "big"), "little"))
    return struct.unpack(">I", mem.read(at, 4))[0]


def test_dma_reads_a_file_and_skips(cfg_device):
    mem, dev = cfg_device
    key = 0x20   # etc/a: files sorted by name
    assert _dma(mem, dev, (key << 16) | DMA_CTL_SELECT | DMA_CTL_SKIP, 10, 0) == 0
    assert _dma(mem, dev, DMA_CTL_READ, 20, 0x2000) == 0
    assert mem.read(0x2000, 20) == bytes(range(10, 30))
    # past the end: zeros, as QEMU
    assert _dma(mem, dev, DMA_CTL_READ, 100, 0x3000) == 0
    assert mem.read(0x3000, 100) == bytes(range(30, 100)) + bytes(30)


def test_dma_outside_ram_is_refused_and_logged(cfg_device, caplog):
    mem, dev = cfg_device
    assert _dma(mem, dev, (0x20 << 16) | DMA_CTL_SELECT | DMA_CTL_READ, 16, RAM_SIZE - 8) == DMA_CTL_ERROR
    assert "outside RAM" in caplog.text
    assert _dma(mem, dev, DMA_CTL_WRITE, 4, 0x2000) == DMA_CTL_ERROR
    # a descriptor outside RAM: nothing written anywhere, a warning
    dev.write(4, 4, 0)
    dev.write(8, 4, int.from_bytes((RAM_SIZE + 0x1000).to_bytes(4, "big"), "little"))
    assert "DMA descriptor" in caplog.text


port_ops = st.one_of(
    st.tuples(st.just("select"), st.integers(0, 0xFFFF)),
    st.tuples(st.just("read"), st.sampled_from([1, 2, 4])),
    st.tuples(st.just("write"), st.integers(0, 11), st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just("dma"), st.integers(0, 0xFFFFFFFF), st.integers(0, 1 << 21),
              st.integers(0, (1 << 64) - 1)),
)


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(ops=st.lists(port_ops, max_size=30))
def test_hostile_sequences_never_escape_ram_or_raise(cfg_device, ops):
    """Whatever the guest does: no exception, nothing written outside the DMA
    buffers it named inside RAM, reads of a file give the file's bytes in order."""
    mem, dev = cfg_device
    for op in ops:
        if op[0] == "select":
            dev.write(0, 2, op[1])
        elif op[0] == "read":
            dev.read(1, op[1])
        elif op[0] == "write":
            _, offset, size, value = op
            if offset + size <= 12:
                dev.write(offset, size, value & ((1 << (8 * size)) - 1))
        else:
            _, control, length, address = op
            status = _dma(mem, dev, control, length, address)
            inside = address + length <= RAM_SIZE
            if control & DMA_CTL_WRITE and not control & (DMA_CTL_READ | DMA_CTL_SKIP) or \
                    (control & DMA_CTL_READ and not inside and not control & DMA_CTL_WRITE):
                assert status == DMA_CTL_ERROR
    state = dev.state()
    assert isinstance(state, FwCfgState)
    FwCfg.from_state(state, mem)
    # the device still serves a plain read after all that
    assert _port_read_item(dev, 0x21, 300) == b"B" * 300


# --- table loader and boot order ------------------------------------------------------------------
def test_table_loader_blob_parses_back():
    loader = TableLoader()
    loader.allocate("etc/acpi/rsdp", 16, fseg=True)
    loader.allocate("etc/acpi/tables", 64)
    loader.add_pointer("etc/acpi/rsdp", "etc/acpi/tables", 16, 4)
    loader.add_checksum("etc/acpi/rsdp", 8, 0, 20)
    blob = loader.blob()
    assert len(blob) == 4 * 128
    assert parse_table_loader(blob) == [
        ("allocate", "etc/acpi/rsdp", 16, 2),
        ("allocate", "etc/acpi/tables", 64, 1),
        ("add_pointer", "etc/acpi/rsdp", "etc/acpi/tables", 16, 4),
        ("add_checksum", "etc/acpi/rsdp", 8, 0, 20),
    ]


def test_bootorder_follows_the_configured_order():
    devices = [BootDevice("disk", virtio_blk_boot_path(4)), BootDevice("net", "/pci@i0cf8/ethernet@5/ethernet-phy@0"),
               BootDevice("disk", virtio_blk_boot_path(6))]
    assert bootorder(["net", "disk"], devices) == (b"/pci@i0cf8/ethernet@5/ethernet-phy@0\n"
                                                   b"/pci@i0cf8/scsi@4/disk@0,0\n/pci@i0cf8/scsi@6/disk@0,0\n")
    assert bootorder([], devices) == b""


def test_e820_is_qemus():
    assert e820_entries(128 << 20) == [(0, 128 << 20, 1)]
    assert e820_entries(4 << 30) == [(0, 3 << 30, 1), (1 << 32, 1 << 30, 1)]


def test_loader_tables_are_the_direct_boot_tables_once_placed():
    """The firmware's copy, placed by the loader script, is byte for byte what direct
    boot writes at the same addresses, checksums included."""
    from kvmpy.boot.acpi import RSDP_FILE, TABLES_FILE, build_acpi_tables, build_loader_tables
    base = 0xE0010                   # RSDP here puts the tables at 0xE0040, 64-byte aligned
    t = build_loader_tables(num_cpus=2)
    files = {"etc/table-loader": t.loader, TABLES_FILE: t.tables, RSDP_FILE: t.rsdp}
    blobs = run_table_loader(files, {RSDP_FILE: base, TABLES_FILE: base + 0x30}, "seabios")
    mem = GuestMemory.anonymous([(0, 1 << 20)])
    try:
        assert build_acpi_tables(mem, base, num_cpus=2, bios_rsdp_copy=None) == base
        assert bytes(blobs[RSDP_FILE]) == mem.read(base, 36)
        assert bytes(blobs[TABLES_FILE]) == mem.read(base + 0x30, len(t.tables))
    finally:
        mem.close()
    assert sum(blobs[RSDP_FILE][:20]) % 256 == 0 and sum(blobs[RSDP_FILE]) % 256 == 0


@pytest.mark.guest
def test_linux_through_seabios_and_linuxboot_on_the_translator(tmp_path_factory):
    """--firmware bios --kernel: SeaBIOS loads the kernel with QEMU's linuxboot_dma
    option ROM from fw_cfg; Linux finds the ACPI tables the table loader placed,
    reaches its init, runs a command and powers off through ACPI."""
    seabios_required()
    from kvmpy.boot.firmware import LINUXBOOT_ROMS
    if not any(os.path.isfile(p) for p in LINUXBOOT_ROMS):
        pytest.skip(f"linuxboot_dma.bin is missing ({', '.join(LINUXBOOT_ROMS)}; Debian qemu-system-data)")
    if not all(map(shutil.which, ("apt-get", "dpkg-deb"))):
        pytest.skip("not a Debian host: no apt-get/dpkg-deb to build the guest")
    from kvmpy.tools import guestbuild
    guest = guestbuild.build(out_dir=str(tmp_path_factory.mktemp("guest")), with_disk=False)
    r = run_kvmpy(["run", "--accel", "tcg", "--firmware", "bios", "-m", "512", "--kernel", guest.kernel,
                   "--initrd", guest.initrd, "--no-reboot",
                   "--append", 'console=ttyS0 panic=-1 kvmpy.run="uname -r"'], timeout=900)
    out = r.stdout.decode(errors="replace").replace("\r\n", "\n")
    assert r.returncode == 0, out[-3000:] + r.stderr.decode()[-2000:]
    assert "SeaBIOS (version" in out
    assert "ACPI: RSDP" in out and "KVMPY" in out
    assert "DMI: kvmpy Standard PC (i440FX + PIIX, 1996)" in out        # fw_cfg's SMBIOS
    assert f"kvmpy guest: init {guest.release}" in out, out[-3000:]
    assert "kvmpy guest: run exit 0" in out


def test_smbios_structures_parse_back():
    from kvmpy.boot.smbios import build_smbios, parse_structures
    tables, anchor = build_smbios(2, [(0, 3 << 30), (1 << 32, 1 << 30)], 4 << 30)
    parsed = parse_structures(tables)
    assert [p[0] for p in parsed] == [1, 3, 4, 4, 16, 17, 19, 19, 32, 127]
    assert parsed[0][3] == [b"kvmpy", b"Standard PC (i440FX + PIIX, 1996)", b"1.0"]
    assert all(len(p[2]) + 4 == {1: 27, 3: 21, 4: 42, 16: 23, 17: 34, 19: 31, 32: 11, 127: 4}[p[0]] for p in parsed)
    assert len(anchor) == 31 and anchor[:4] == b"_SM_" and anchor[0x10:0x15] == b"_DMI_"
    length, _address, count = struct.unpack_from("<HIH", anchor, 0x16)
    assert length == len(tables) and count == len(parsed)


def test_host_bridge_state_round_trip_reapplies_pam():
    seen = []
    bridge = I440fxHostBridge(on_pam=seen.append)
    bridge.config_write(PAM0 - 1, 4, 0x30 << 8)
    state = bridge.state()
    seen.clear()
    again = I440fxHostBridge.from_state(state, on_pam=seen.append)
    assert again.config_read(PAM0, 1) == 0x30
    assert seen and seen[-1][0] == (0xF0000, 0x10000, 0x3)
    assert again.pam() == bridge.pam()


def test_fw_cfg_state_round_trip(cfg_device):
    mem, dev = cfg_device
    dev.write(0, 2, 0x21)
    dev.read(1, 1)
    again = FwCfg.from_state(dev.state(), mem)
    again.add_file("etc/b", b"B" * 300)
    again.add_file("etc/a", bytes(range(100)))
    assert again.state() == dev.state() and again.read(1, 1) == ord("B")
    from kvmpy.devices.saved_state import StateError
    with pytest.raises(StateError):
        FwCfg.from_state(FwCfgState(selector=0x10000, offset=0, dma_address_high=0), mem)


def test_missing_bios_names_the_key_or_option(tmp_path):
    toml = tmp_path / "vm.toml"
    toml.write_text('firmware = "bios"\nbios = "nope.bin"\n')
    r = run_kvmpy(["run", str(toml)])
    assert r.returncode == 2
    line = r.stderr.decode().strip()
    assert "\n" not in line and str(toml) in line and "key 'bios'" in line, line
    r = run_kvmpy(["run", "--bios", str(tmp_path / "nope.bin")])
    assert r.returncode == 2 and "--bios" in r.stderr.decode()


def test_firmware_boot_of_a_pvh_kernel_is_refused_in_one_line():
    from conftest import guest_path
    r = run_kvmpy(["run", "--accel", "tcg", "--firmware", "bios", "--kernel", guest_path("acpi_power")])
    assert r.returncode == 2
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "bzImage" in lines[0], lines


def test_disks_and_nics_advertise_their_boot_paths():
    """The table's entries say where they boot from; the builder's placement gives
    the PCI slot; vm.toml's boot order picks the order."""
    from kvmpy.boot.firmware import boot_devices_of
    from kvmpy.builder import MachineDevices, PlacedDevice
    from kvmpy.config import DiskConfig, NetConfig
    from kvmpy.pc import disk_entry, nic_entry
    placed = [PlacedDevice(disk_entry(0, DiskConfig("a.img")), object(), pci_slot=3),
              PlacedDevice(nic_entry(0, NetConfig()), object(), pci_slot=4),
              PlacedDevice(disk_entry(1, DiskConfig("b.img")), object(), pci_slot=5)]
    devices = boot_devices_of(MachineDevices(placed))
    assert devices == [BootDevice("disk", "/pci@i0cf8/scsi@3/disk@0,0"),
                       BootDevice("net", "/pci@i0cf8/ethernet@4/ethernet-phy@0"),
                       BootDevice("disk", "/pci@i0cf8/scsi@5/disk@0,0")]
    assert bootorder(["net", "disk"], devices).splitlines()[0] == b"/pci@i0cf8/ethernet@4/ethernet-phy@0"


@settings(max_examples=100, deadline=None)
@given(writes=st.lists(st.tuples(st.integers(0, 0xFF), st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFFFFFF)),
                       max_size=40))
def test_hostile_config_writes_keep_memory_protection_in_step_with_pam(writes):
    """Whatever the guest writes to the bridge's config space, each BIOS-area piece
    is writable exactly when its PAM nibble's write-enable bit is set, the IDs stay,
    and nothing outside 0xC0000-0xFFFFF changes protection."""
    image = b"\x11" * 0x40000
    mem, fw = _firmware_memory(image)
    try:
        bridge = I440fxHostBridge(on_pam=fw.pam_changed)
        for offset, size, value in writes:
            if offset + size <= 0x100:
                bridge.config_write(offset, size, value & ((1 << (8 * size)) - 1))
        for base, _size, bits in bridge.pam():
            region = next(r for r in mem.regions if r.gpa == base)
            assert mem.is_readonly(region) == (not bits & 0x2)
        assert bridge.config_read(0, 4) == 0x12378086 and bridge.config_read(0x2C, 4) == 0x11001AF4
        assert bridge.config_read(PAM0, 1) & 0x0F == 0              # reserved nibble stays clear
        outside = [r for r in mem.regions if not 0xC0000 <= r.gpa < 0x100000]
        assert [mem.is_readonly(r) for r in outside] == [r.gpa == 0xFFFC0000 for r in outside]
    finally:
        mem.close()
