"""Firmware boot to a boot sector: SeaBIOS from reset to a 16-bit MBR that reads
its second sector through int 13h and exits through the debug-exit port, kvmpy's
translator vs QEMU's TCG on the same raw image (tests/support/bootsector.py).

    python3 -m bench.firmware

Row: seconds from process start to process end (the boot sector's exit), the best
of three runs each.
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
             "better": "lower", "note": note}]


if __name__ == "__main__":
    for row in run():
        print(row)
