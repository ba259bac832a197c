"""Firmware boot to a boot sector: SeaBIOS from reset to a 16-bit MBR that reads
its second sector through int 13h and exits through the debug-exit port, kvmpy's
translator vs QEMU's TCG on the same raw image (tests/support/bootsector.py).

    python3 -m bench.firmware

Row: seconds from process start to process end (the boot sector's exit), the best
of three runs each.

Rows "ISO ... to GRUB" and "ISO ... to init": the installer ISO of
tests/test_boot_media.py (grub-mkrescue, Debian's cloud kernel, the default
guest's initramfs) booted with -cdrom through SeaBIOS, El Torito and GRUB: seconds
from process start to GRUB's first line on COM1 and to the guest's init banner,
one run each (a Linux boot on the translator takes a minute).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (REPO, os.path.join(REPO, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)

RUNS = 3
TIMEOUT = 120


def _best(argv: list[str], expected_status: int) -> tuple[float | None, str]:
    env = dict(os.environ, PYTHONPATH=REPO)
    best = None
    for _ in range(RUNS):
        t0 = time.perf_counter()
        try:
            p = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            return best, "timed out"
        seconds = time.perf_counter() - t0
        if p.returncode != expected_status:
            return best, f"exit status {p.returncode}"
        best = seconds if best is None else min(best, seconds)
    return best, ""


def run() -> list[dict]:
    from support.bootsector import EXIT_VALUE, write_boot_disk
    with tempfile.TemporaryDirectory() as tmp:
        disk = os.path.join(tmp, "mbr.img")
        write_boot_disk(disk)
        kvmpy = [sys.executable, "-m", "kvmpy", "run", "--accel", "tcg", "-m", "128M", "--serial", "none",
                 "--drive", f"file={disk},format=raw"]
        qemu = ["qemu-system-x86_64", "-accel", "tcg", "-m", "128", "-nodefaults", "-display", "none",
                "-no-reboot", "-drive", f"file={disk},format=raw,if=virtio",
                "-device", "isa-debug-exit,iobase=0xf4,iosize=4"]
        k, knote = _best(kvmpy, EXIT_VALUE)
        q, qnote = _best(qemu, 2 * EXIT_VALUE + 1) if shutil.which("qemu-system-x86_64") else (None, "no qemu")
    note = "; ".join(n for n in (f"kvmpy {knote}" if knote else "", f"qemu {qnote}" if qnote else "") if n)
    return [{"name": "SeaBIOS to boot sector (translator vs TCG)", "kvmpy": k, "qemu": q, "unit": "s",
             "better": "lower", "note": note}] + iso_rows()


ISO_MARKS = (("ISO through SeaBIOS to GRUB's first output (translator vs TCG)", b"kvmpy grub: root="),
             ("ISO through SeaBIOS and GRUB to the guest's init (translator vs TCG)", b"kvmpy guest: init"))
ISO_TIMEOUT = 600


def _times_to_marks(argv: list[str], log: str) -> tuple[list[float | None], str]:
    """Seconds from start until each of ISO_MARKS appears in ``log``; the process
    is stopped at the last."""
    env = dict(os.environ, PYTHONPATH=REPO)
    seen: list[float | None] = [None] * len(ISO_MARKS)
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None and time.perf_counter() - t0 < ISO_TIMEOUT and seen[-1] is None:
            out = open(log, "rb").read() if os.path.exists(log) else b""
            for i, (_, needle) in enumerate(ISO_MARKS):
                if seen[i] is None and needle in out:
                    seen[i] = time.perf_counter() - t0
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return seen, "" if seen[-1] is not None else "did not reach init"


def iso_rows() -> list[dict]:
    from support.boot_media import make_iso, missing_iso_tool
    reason = missing_iso_tool()
    if reason:
        return [{"name": name, "kvmpy": None, "qemu": None, "unit": "s", "better": "lower", "note": reason}
                for name, _ in ISO_MARKS]
    from kvmpy.tools import guestbuild
    from test_ide_linux import initrd_with_ide_modules
    with tempfile.TemporaryDirectory() as tmp:
        guest = guestbuild.build(out_dir=os.path.join(tmp, "guest"), with_disk=False)
        initrd = os.path.join(tmp, "initrd-ide.img")
        initrd_with_ide_modules(guest, initrd)
        iso = make_iso(guest.kernel, initrd, tmp)
        klog, qlog = os.path.join(tmp, "kvmpy.log"), os.path.join(tmp, "qemu.log")
        k, knote = _times_to_marks([sys.executable, "-m", "kvmpy", "run", "--accel", "tcg", "-m", "512",
                                    "-cdrom", iso, "-boot", "d", "--serial", f"file:{klog}"], klog)
        if shutil.which("qemu-system-x86_64"):
            q, qnote = _times_to_marks(["qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-nodefaults",
                                        "-display", "none", "-cdrom", iso, "-boot", "d",
                                        "-serial", f"file:{qlog}"], qlog)
        else:
            q, qnote = [None] * len(ISO_MARKS), "no qemu"
    note = "; ".join(n for n in (f"kvmpy {knote}" if knote else "", f"qemu {qnote}" if qnote else "") if n)
    return [{"name": name, "kvmpy": k[i], "qemu": q[i], "unit": "s", "better": "lower", "note": note}
            for i, (name, _) in enumerate(ISO_MARKS)]


if __name__ == "__main__":
    for row in run():
        print(row)
