"""The PIIX IDE controller under `kvmpy run`: the ide test guest (tests/guests/ide.c)
finds 00:01.1 by a multi-function PCI scan, reads a raw disk by PIO, READ MULTIPLE
and bus-master DMA, writes by PIO and DMA and flushes, then reads a real ISO 9660
image (made here with xorriso) from the ATAPI CD-ROM by PIO and DMA; under KVM and
under the translator, and under QEMU, whose PIIX3 IDE it must match line for line."""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import KVM_SKIP_REASON, guest_path, run_kvmpy, tool_required

SECTORS = 2048          # a 1 MiB disk
READ_LBA, WRITE_LBA = 8, 100
VOLUME = "KVMPY_IDE_TEST"


def disk_byte(lba: int, j: int) -> int:
    return (lba * 31 + j * 7 + (j >> 8)) & 0xFF


def make_disk(path) -> None:
    with open(path, "wb") as f:
        for lba in range(SECTORS):
            f.write(bytes(disk_byte(lba, j) for j in range(512)))


def make_iso(tmp_path) -> str:
    xorriso = tool_required("xorriso")
    tree = tmp_path / "iso-root"
    tree.mkdir()
    (tree / "hello.txt").write_text("kvmpy ide cdrom\n" * 300)
    iso = tmp_path / "cd.iso"
    subprocess.run([xorriso, "-as", "mkisofs", "-quiet", "-V", VOLUME, "-o", str(iso), str(tree)],
                   check=True, capture_output=True)
    return str(iso)


def written_sectors() -> bytes:
    return bytes((0x5A ^ j ^ (j >> 8)) & 0xFF for j in range(1024))


def check(out: str, disk) -> None:
    lines = out.splitlines()
    assert not any("FAIL" in line for line in lines), out
    assert any(line.startswith("ide: found at 00:01.1 bmdma 0x") for line in lines), out
    assert f'ide: disk "KVMPY HARDDISK" sectors {SECTORS} lba48 1' in lines
    for expected in (f"ide: pio read lba {READ_LBA} ok", f"ide: multiple read lba {READ_LBA} ok",
                     f"ide: dma read lba {READ_LBA + 3} ok",
                     f"ide: wrote lba {WRITE_LBA} (pio) and {WRITE_LBA + 1} (dma), flushed",
                     "ide: cdrom signature ok", f'ide: cdrom volume descriptor CD001 "{VOLUME}"',
                     "ide: cdrom dma read ok", "guest: done"):
        assert expected in lines, f"{expected!r} missing from:\n{out}"
    capacity = next(line for line in lines if line.startswith("ide: cdrom capacity"))
    assert capacity.endswith("sectors of 2048")
    with open(disk, "rb") as f:
        f.seek(WRITE_LBA * 512)
        assert f.read(1024) == written_sectors(), "the flushed writes are in the image"


@pytest.mark.parametrize("accel", ["kvm", "tcg"])
def test_ide_guest(tmp_path, accel):
    if accel == "kvm" and KVM_SKIP_REASON:
        pytest.skip(KVM_SKIP_REASON)
    disk = tmp_path / "disk.raw"
    make_disk(disk)
    iso = make_iso(tmp_path)
    p = run_kvmpy(["run", "--accel", accel, "--kernel", guest_path("ide"),
                   "--append", f"lba={READ_LBA} wlba={WRITE_LBA}",
                   "--drive", f"file={disk},format=raw,if=ide,index=0",
                   "--drive", f"file={iso},format=raw,media=cdrom,index=2"], timeout=300)
    out = p.stdout.decode()
    assert p.returncode == 0, out + p.stderr.decode()
    check(out, disk)
    cd_size = os.path.getsize(iso) // 2048
    assert f"ide: cdrom capacity {cd_size} sectors of 2048" in out.splitlines()


def guest_lines(out: str) -> list[str]:
    """The guest's own lines (QEMU's SeaBIOS prints its banner on the same serial line)."""
    return [line[line.index("ide: "):] if "ide: " in line else line for line in out.splitlines()
            if "ide: " in line or line.startswith("guest: ")]


def test_ide_guest_same_as_qemu(tmp_path):
    """The same guest against QEMU's PIIX3 IDE, the oracle: line for line the same
    output but for the disk's model name."""
    qemu = tool_required("qemu-system-x86_64")
    outputs = []
    for vmm in ("qemu", "kvmpy"):
        run_dir = tmp_path / vmm
        run_dir.mkdir()
        disk = run_dir / "disk.raw"
        make_disk(disk)
        iso = make_iso(run_dir)
        drives = [f"file={disk},format=raw,if=ide,index=0", f"file={iso},format=raw,media=cdrom,index=2"]
        append = f"lba={READ_LBA} wlba={WRITE_LBA}"
        if vmm == "qemu":
            p = subprocess.run([qemu, "-M", "pc", "-m", "128", "-nographic", "-no-reboot", "-nodefaults",
                                "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
                                "-kernel", guest_path("ide"), "-append", append,
                                *(arg for d in drives for arg in ("-drive", d))], capture_output=True, timeout=300)
            assert p.returncode == 1, p.stdout.decode(errors="replace")   # guest exit 0 through isa-debug-exit
        else:
            p = run_kvmpy(["run", "--accel", "tcg", "--kernel", guest_path("ide"), "--append", append,
                           *(arg for d in drives for arg in ("--drive", d))], timeout=300)
            assert p.returncode == 0, p.stdout.decode() + p.stderr.decode()
        out = p.stdout.decode(errors="replace")
        with open(disk, "rb") as f:
            f.seek(WRITE_LBA * 512)
            assert f.read(1024) == written_sectors(), vmm
        outputs.append([line.replace("QEMU HARDDISK", "KVMPY HARDDISK") for line in guest_lines(out)])
    assert outputs[0] == outputs[1]
    assert outputs[1][-1] == "guest: done"


# The disk image on a small tmpfs filled up by a filler file, in a mount namespace of
# the VM's own; the filler is deleted through /proc/PID/root to free the space, and
# the image is copied out for checking once the VM has exited.
FULL_DISK = r"""
set -e
mnt=$1 image=$2 out=$3
shift 3
mount -t tmpfs -o size=4M kvmpy-ide-ioerr "$mnt"
cp "$image" "$mnt/d.qcow2"
dd if=/dev/zero of="$mnt/filler" bs=4k 2>/dev/null || true
st=0
"$@" || st=$?
cp "$mnt/d.qcow2" "$out"
exit $st
"""


def test_werror_stop_pauses_and_cont_completes_the_ide_write(tmp_path):
    """A write that finds the host disk full (ENOSPC) with werror=stop: BLOCK_IO_ERROR
    names ide0-hd0, the VM pauses in io-error with the drive busy, and `cont` after
    space was freed completes the write, which lands in the image."""
    import signal
    import sys
    import time
    from qemu.qmp.legacy import QEMUMonitorProtocol
    from conftest import ROOT
    if KVM_SKIP_REASON:
        pytest.skip(KVM_SKIP_REASON)
    if os.geteuid() != 0:
        pytest.skip("needs root: the full disk is a tmpfs mounted in a private mount namespace")
    qemu_img = tool_required("qemu-img")
    tool_required("unshare")
    pattern = tmp_path / "pattern.raw"
    make_disk(pattern)
    image = tmp_path / "src.qcow2"
    subprocess.run([qemu_img, "convert", "-q", "-O", "qcow2", str(pattern), str(image)], check=True)
    subprocess.run([qemu_img, "resize", "-q", str(image), "16M"], check=True)
    iso = make_iso(tmp_path)
    wlba = 8192         # past the pattern: the write needs a new cluster, and the disk is full
    mnt, out, qmp_path = tmp_path / "mnt", tmp_path / "after.qcow2", tmp_path / "vm.qmp"
    mnt.mkdir()
    cmd = [sys.executable, "-m", "kvmpy", "run", "--enable-kvm", "--kernel", guest_path("ide"),
           "--append", f"lba={READ_LBA} wlba={wlba} waitkey=1", "--qmp", f"unix:{qmp_path}",
           "--drive", f"file={mnt}/d.qcow2,format=qcow2,if=ide,index=0,werror=stop",
           "--drive", f"file={iso},format=raw,media=cdrom,index=2"]
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", FULL_DISK, "sh", str(mnt),
                             str(image), str(out), *cmd], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    output = b""

    def read_until(needle: bytes, timeout: float = 60) -> None:
        nonlocal output
        deadline = time.monotonic() + timeout
        while needle not in output and time.monotonic() < deadline:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            output += chunk
        assert needle in output, output.decode(errors="replace") + proc.stderr.read().decode()

    qmp = None
    try:
        read_until(b"ide: waiting for a key")
        qmp = QEMUMonitorProtocol(str(qmp_path))
        qmp.connect()

        def event(name: str, timeout: float = 30) -> dict:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                for e in qmp.get_events(wait=max(0.1, deadline - time.monotonic())):
                    if e["event"] == name:
                        return e
            raise AssertionError(f"no {name} event within {timeout} s")
        proc.stdin.write(b"g")
        proc.stdin.flush()
        e = event("BLOCK_IO_ERROR")
        assert e["data"] == {"device": "ide0-hd0", "node-name": "#ide0", "operation": "write", "action": "stop",
                             "nospace": True, "reason": "No space left on device"}
        event("STOP")
        assert qmp.cmd("query-status")["status"] == "io-error"
        disk = next(b for b in qmp.cmd("query-block") if b["device"] == "ide0-hd0")
        assert disk["io-status"] == "nospace"
        assert b"ide: wrote" not in output
        os.unlink(f"/proc/{proc.pid}/root{mnt}/filler")
        qmp.cmd("cont")
        event("RESUME")
        read_until(b"guest: ")
        assert proc.wait(60) == 0, output.decode(errors="replace") + proc.stderr.read().decode()
        output += proc.stdout.read()
        assert f"ide: wrote lba {wlba} (pio) and {wlba + 1} (dma), flushed".encode() in output
        assert b"guest: done" in output
    finally:
        if qmp is not None:
            try:
                qmp.close()
            except Exception:     # after the VM's exit the socket is gone
                pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    raw = tmp_path / "after.raw"
    subprocess.run([qemu_img, "convert", "-O", "raw", str(out), str(raw)], check=True)
    with open(raw, "rb") as f:
        f.seek(wlba * 512)
        assert f.read(1024) == written_sectors()
