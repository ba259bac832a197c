"""Linux boot on the translator vs QEMU's TCG: the default guest (Debian cloud kernel,
busybox initramfs), same kernel, initramfs, memory and command line.

    python3 -m bench.boot

Rows: seconds from process start to the init banner ("kvmpy guest: init"), and to
the end of the process after `kvmpy.run` powered the guest off.
"""

from __future__ import annotations

import os
import selectors
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

BANNER = b"kvmpy guest: init"
RUN_DONE = b"kvmpy guest: run exit 0"
POWER_DOWN = b"reboot: Power down"
TIMEOUT = 900
APPEND = 'console=ttyS0 panic=-1 quiet kvmpy.run="uname -r"'


def _timed_boot(argv: list[str]) -> tuple[float | None, float | None, str]:
    """(seconds to the init banner, seconds to power-off, note). Power-off is the
    kernel's "reboot: Power down" line or the process's exit, whichever comes first:
    QEMU started with -nodefaults may stay up after the kernel powered down."""
    env = dict(os.environ, PYTHONPATH=REPO)
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    seen, t_banner, t_off = b"", None, None
    deadline = t0 + TIMEOUT
    while time.perf_counter() < deadline and t_off is None:
        if not sel.select(timeout=1):
            continue
        chunk = os.read(proc.stdout.fileno(), 65536)
        now = time.perf_counter() - t0
        if not chunk:
            t_off = now
            break
        seen += chunk
        if t_banner is None and BANNER in seen:
            t_banner = now
        if POWER_DOWN in seen:
            t_off = now
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    if t_off is None:
        return t_banner, None, "timed out"
    if RUN_DONE not in seen:
        return t_banner, None, "did not finish its kvmpy.run commands"
    return t_banner, t_off, ""


def kvmpy_argv(kernel: str, initrd: str) -> list[str]:
    """kvmpy's side: --net none, as QEMU's side runs with -nodefaults (no NIC on either)"""
    return [sys.executable, "-m", "kvmpy", "run", "--accel", "tcg", "--no-reboot", "--serial", "stdio",
            "--net", "none", "-m", "512", "--kernel", kernel, "--initrd", initrd, "--append", APPEND]


def run() -> list[dict]:
    from kvmpy.tools import guestbuild
    g = guestbuild.build(with_disk=False)
    kvmpy = kvmpy_argv(g.kernel, g.initrd)
    qemu = ["qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-nodefaults", "-display", "none",
            "-serial", "stdio", "-no-reboot", "-kernel", g.kernel, "-initrd", g.initrd, "-append", APPEND]
    kb, kd, knote = _timed_boot(kvmpy)
    qb, qd, qnote = _timed_boot(qemu) if shutil.which("qemu-system-x86_64") else (None, None, "no qemu")
    note = "; ".join(n for n in (f"kvmpy {knote}" if knote else "", f"qemu {qnote}" if qnote else "") if n)
    return [
        {"name": "Linux boot to init (translator vs TCG)", "kvmpy": kb, "qemu": qb, "unit": "s",
         "better": "lower", "note": note},
        {"name": "Linux boot to poweroff (translator vs TCG)", "kvmpy": kd, "qemu": qd, "unit": "s",
         "better": "lower", "note": note},
    ]


if __name__ == "__main__":
    for row in run():
        print(row)
