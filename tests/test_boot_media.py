"""Real boot media end to end (issue 16): a GRUB rescue ISO made here with
grub-mkrescue, holding Debian's cloud kernel and the default guest's initramfs,
booted with -cdrom through SeaBIOS (El Torito from the ATAPI CD-ROM) and GRUB; the
same ISO as an installer that copies itself onto a blank qcow2 disk (made with
`kvmpy img create`); then that disk booted alone. QEMU boots the same ISO and the
disk kvmpy installed, as the reference.

Linux runs only on the translator here (software-nested KVM cannot run it); under
KVM the boots go as far as GRUB's output and are stopped there. The boots are slow
(a minute each on the translator), so there are few: one ISO boot per accelerator,
one installer run, one disk boot, and QEMU's."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, run_kvmpy, tool_required
from support.boot_media import (GRUB_MENU_TITLE, GRUB_ROOT_LINE, INSTALL_DONE, INSTALLED_MARKER, make_iso,
                                missing_iso_tool)

BOOT_TIMEOUT = 900
# A healthy OVMF install takes about a minute here; its known stall should not cost 15.
OVMF_TIMEOUT = 300
SEABIOS_BANNER = b"SeaBIOS (version"
GRUB_BOOTING = f"Booting `{GRUB_MENU_TITLE}'".encode()


def _seabios_required():
    from kvmpy.boot.firmware import SEABIOS_IMAGES
    if not any(os.path.isfile(p) for p in SEABIOS_IMAGES):
        pytest.skip(f"SeaBIOS is not installed ({', '.join(SEABIOS_IMAGES)}; Debian package seabios)")


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    from kvmpy.tools import guestbuild
    if not all(map(shutil.which, ("apt-get", "dpkg-deb"))):
        pytest.skip("not a Debian host: no apt-get/dpkg-deb to build the guest")
    return guestbuild.build(out_dir=str(tmp_path_factory.mktemp("guest")), with_disk=False)


@pytest.fixture(scope="module")
def iso(guest, tmp_path_factory):
    """The installer ISO, made once for the module."""
    reason = missing_iso_tool()
    if reason:
        pytest.skip(reason)
    _seabios_required()
    from test_ide_linux import initrd_with_ide_modules
    work = tmp_path_factory.mktemp("iso")
    initrd = work / "initrd-ide.img"
    initrd_with_ide_modules(guest, initrd)
    return make_iso(guest.kernel, str(initrd), str(work))


def _qcow2(path) -> str:
    r = run_kvmpy(["img", "create", "-f", "qcow2", str(path), "2G"])
    assert r.returncode == 0, r.stderr.decode()
    return str(path)


@pytest.fixture(scope="module")
def installed_disk(iso, tmp_path_factory):
    """The installer run on the translator: -cdrom ISO -hda blank.qcow2 -boot d, the
    way the ArchWiki's QEMU page installs a system. Returns (disk, serial output)."""
    work = tmp_path_factory.mktemp("install")
    disk = _qcow2(work / "disk.qcow2")
    r = run_kvmpy(["run", "--accel", "tcg", "-m", "512", "-cdrom", iso, "-hda", disk, "-boot", "d",
                   "-no-reboot"], timeout=BOOT_TIMEOUT)
    out = r.stdout.replace(b"\r\n", b"\n")
    assert r.returncode == 0, out[-4000:] + r.stderr[-2000:]
    return disk, out


@pytest.mark.guest
def test_the_installer_iso_boots_from_the_cdrom_and_installs_on_the_translator(installed_disk, iso):
    disk, out = installed_disk
    text = out.decode(errors="replace")
    assert SEABIOS_BANNER in out and b"Booting from DVD/CD" in out, text[-4000:]
    # GRUB's own output on COM1, from the El Torito drive (not hd0)
    assert GRUB_ROOT_LINE.encode() in out and f"{GRUB_ROOT_LINE}hd0".encode() not in out, text[-4000:]
    assert GRUB_BOOTING in out, text[-4000:]
    assert "kvmpy.run=/bin/kvmpy-install" in text and "kvmpy guest: init" in text, text[-4000:]
    assert INSTALL_DONE in text and "kvmpy guest: run exit 0" in text, text[-4000:]
    # the disk holds the CD's bytes: read back through kvmpy's own qcow2 driver
    r = run_kvmpy(["img", "compare", "-f", "raw", "-F", "qcow2", iso, disk])
    assert r.returncode == 0, (r.stdout + r.stderr).decode()[-2000:]


@pytest.mark.guest
def test_the_installed_disk_boots_alone_on_the_translator(installed_disk):
    disk, _ = installed_disk
    r = run_kvmpy(["run", "--accel", "tcg", "-m", "512", "-hda", disk, "-no-reboot"], timeout=BOOT_TIMEOUT)
    out = r.stdout.replace(b"\r\n", b"\n")
    text = out.decode(errors="replace")
    assert r.returncode == 0, text[-4000:] + r.stderr.decode(errors="replace")[-2000:]
    assert b"Booting from Hard Disk" in out and f"{GRUB_ROOT_LINE}hd0".encode() in out, text[-4000:]
    assert "kvmpy.run=/bin/kvmpy-installed" in text, text[-4000:]
    assert INSTALLED_MARKER in text and "kvmpy guest: run exit 0" in text, text[-4000:]


def _boot_until(argv: list[str], log, needle: bytes, timeout: float = 240) -> bytes:
    """Run kvmpy with its serial port in ``log`` until ``needle`` appears there (or
    it exits, or ``timeout``); then stop it. Returns the serial output."""
    proc = subprocess.Popen([sys.executable, "-m", "kvmpy", *argv, "--serial", f"file:{log}"], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT}, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    out = b""
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            out = log.read_bytes() if log.exists() else b""
            if needle in out:
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return log.read_bytes() if log.exists() else out


@pytest.mark.guest
@pytest.mark.parametrize("media", ["cdrom", "hda"])
def test_grub_runs_from_the_iso_under_kvm(media, iso, tmp_path, kvm_required):
    """Under KVM, SeaBIOS boots the ISO as a CD-ROM (El Torito) and as a hard disk
    (the hybrid MBR) into GRUB, whose menu entry starts; Linux itself does not run
    under this host's software-nested KVM, so the boot stops there."""
    log = tmp_path / "serial.log"
    drive = ["-cdrom", iso, "-boot", "d"] if media == "cdrom" else \
        ["--drive", f"file={iso},format=raw,if=ide,index=0,readonly=on"]
    out = _boot_until(["run", "--accel", "kvm", "-m", "512", *drive], log, GRUB_BOOTING)
    assert SEABIOS_BANNER in out, out[-2000:]
    assert (b"Booting from DVD/CD" if media == "cdrom" else b"Booting from Hard Disk") in out, out[-2000:]
    root = b"hd0" if media == "hda" else b"hd96"        # SeaBIOS's El Torito drive 0xE0
    assert GRUB_ROOT_LINE.encode() + root in out and GRUB_BOOTING in out, out[-2000:]


# --- QEMU, the reference ----------------------------------------------------------------------------
def _qemu(args: list[str]) -> subprocess.CompletedProcess:
    qemu = tool_required("qemu-system-x86_64")
    return subprocess.run([qemu, "-accel", "tcg", "-nographic", "-m", "512", "-no-reboot", *args],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=BOOT_TIMEOUT)


@pytest.mark.guest
def test_qemu_installs_from_the_same_iso_and_boots_the_disk_kvmpy_installed(iso, installed_disk, tmp_path):
    disk = _qcow2(tmp_path / "qemu-disk.qcow2")
    r = _qemu(["-cdrom", iso, "-hda", disk, "-boot", "d"])
    out = r.stdout.decode(errors="replace")
    assert r.returncode == 0 and "Booting from DVD/CD" in out, out[-4000:]
    assert GRUB_BOOTING.decode() in out and INSTALL_DONE in out, out[-4000:]
    kvmpy_disk, _ = installed_disk
    # -snapshot: QEMU's IDE disk cannot be read-only, and kvmpy's copy must stay as kvmpy left it
    r = _qemu(["-drive", f"file={kvmpy_disk},format=qcow2,if=ide,index=0", "-snapshot"])
    out = r.stdout.decode(errors="replace")
    assert r.returncode == 0 and "Booting from Hard Disk" in out, out[-4000:]
    assert INSTALLED_MARKER in out and "kvmpy guest: run exit 0" in out, out[-4000:]


# --- UEFI: OVMF through the PIIX4 power-management function ------------------------------------------
@pytest.mark.guest
@pytest.mark.xfail(strict=False, reason="Linux under OVMF has once stopped in ata_piix's probe on a "
                   "loaded host (no output for 15 minutes); not yet explained")
def test_ovmf_boots_the_iso_and_installs_on_the_translator(iso, tmp_path):
    """OVMF finds its ACPI timer through 00:01.3, reaches its boot manager, starts
    the ISO's EFI GRUB from the ATAPI CD-ROM (UEFI names it cd0), and the kernel
    runs the installer onto the blank disk. The boot is stopped there, once the
    installer says it is done."""
    from kvmpy.boot.firmware import OVMF_IMAGES
    ovmf = next((p for p in OVMF_IMAGES if os.path.isfile(p)), None)
    if ovmf is None:
        pytest.skip(f"OVMF is not installed ({', '.join(OVMF_IMAGES)}; Debian package ovmf)")
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
    log = tmp_path / "serial.log"
    out = _boot_until(["run", "--accel", "tcg", "-bios", ovmf, "-m", "512", "-cdrom", iso,
                       "--drive", f"file={disk},format=raw,if=ide,index=0"], log, INSTALL_DONE.encode(),
                      timeout=OVMF_TIMEOUT)
    text = out.decode(errors="replace")
    assert "BdsDxe: starting Boot" in text and "DVD-ROM" in text, text[-4000:]
    assert f"{GRUB_ROOT_LINE}cd0" in text and GRUB_BOOTING.decode() in text, text[-4000:]
    assert "efi: EFI v" in text and "kvmpy guest: init" in text, text[-4000:]
    assert INSTALL_DONE in text, text[-4000:]
    with open(iso, "rb") as a, open(disk, "rb") as b:
        size = os.path.getsize(iso)
        assert a.read() == b.read(size), "the disk does not hold the ISO's bytes"


# --- the power-management function on its own -------------------------------------------------------
@pytest.fixture
def pm_bus():
    from kvmpy.devices.bus import Bus
    from kvmpy.devices.ide import IdeController
    from kvmpy.devices.pci.bus import PciBus
    from kvmpy.devices.pci.piix import Piix3
    from kvmpy.memory import GuestMemory
    from test_ide import IsaPlatform
    mem = GuestMemory.anonymous([(0, 1 << 20)])
    platform = IsaPlatform()
    pci = PciBus(Bus("mmio"), Bus("pio"), platform)
    dev = Piix3(IdeController(mem, (lambda level: None, lambda level: None), {}),
                set_isa_irq=platform.set_irq_level)
    assert pci.add(dev) == 1
    yield pci, dev
    mem.close()


def test_pm_function_points_firmware_at_the_pm_block(pm_bus):
    from kvmpy.devices.acpi_pm import PM_BLOCK
    pci, dev = pm_bus
    assert pci.config_read(0, 1, 3, 0, 4) == 0x71138086
    assert pci.config_read(0, 1, 3, 0x08, 4) == 0x06800003          # class 06.80.00, revision 3
    assert pci.config_read(0, 1, 0, 0x0E, 1) & 0x80, "00:01 is multi-function"
    assert pci.config_read(0, 1, 3, 0x40, 4) == PM_BLOCK.base | 1
    assert pci.config_read(0, 1, 3, 0x80, 1) & 1
    assert pci.config_read(0, 1, 3, 0x5B, 1) & 0x02                 # SMM "already set up": no SMI
    # SeaBIOS's programming and OVMF's (0xB000, when it found PMREGMISC off)
    for base in (0x601, 0xB001, 0):
        pci.config_write(0, 1, 3, 0x40, 4, base)
        pci.config_write(0, 1, 3, 0x80, 1, 0)
        assert pci.config_read(0, 1, 3, 0x40, 4) == PM_BLOCK.base | 1
        assert pci.config_read(0, 1, 3, 0x80, 1) & 1
    pci.config_write(0, 1, 3, 0x90, 4, 0x701)                        # SMBus base: storage
    assert pci.config_read(0, 1, 3, 0x90, 4) == 0x701
    dev.reset()
    assert pci.config_read(0, 1, 3, 0x90, 4) == 0


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(writes=st.lists(st.tuples(st.integers(0, 0xFF), st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFFFFFF)),
                       max_size=40))
def test_hostile_pm_config_writes_never_move_the_block_and_round_trip(pm_bus, writes):
    from kvmpy.devices.acpi_pm import PM_BLOCK
    from kvmpy.devices.saved_state import StateError
    pci, dev = pm_bus
    for offset, size, value in writes:
        offset &= ~(size - 1)
        pci.config_write(0, 1, 3, offset, size, value & ((1 << (8 * size)) - 1))
    assert pci.config_read(0, 1, 3, 0, 4) == 0x71138086
    assert pci.config_read(0, 1, 3, 0x40, 4) == PM_BLOCK.base | 1 and pci.config_read(0, 1, 3, 0x80, 1) & 1
    saved = dev.state()
    assert saved.pm is not None
    dev.reset()
    dev.restore(saved)
    assert dev.state() == saved
    with pytest.raises(StateError):
        dev.restore(dataclasses.replace(saved, pm=saved.ide))         # the IDE's config as the PM's
    assert dev.state() == saved
