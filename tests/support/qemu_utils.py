"""The real qemu-img and qemu-io (Debian's qemu-utils) that the image tests check
kvmpy's drivers against, and `kvmpy img` run as a command beside them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
# Why a module that needs both skips; None where both are installed.
MISSING_REASON = None if QEMU_IMG and QEMU_IO else "qemu-img/qemu-io not installed (apt-get install qemu-utils)"

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MiB = 1 << 20


def kimg(*args, rc=0):
    """`python3 -m kvmpy img ARGS` from this checkout; its exit status must be ``rc``."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "kvmpy", "img", *map(str, args)], capture_output=True,
                       text=True, env=env)
    assert r.returncode == rc, f"kvmpy img {args}: rc={r.returncode}\n{r.stdout}{r.stderr}"
    return r


def run_qemu_io(path, *cmds, fmt="qcow2") -> subprocess.CompletedProcess:
    """qemu-io on ``path`` running each of ``cmds`` (its -c commands) in turn."""
    argv = [QEMU_IO, "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    return subprocess.run(argv + [str(path)], capture_output=True, text=True)


def qio(path, *cmds, fmt="qcow2"):
    """qemu-io's commands, every one of which must succeed."""
    r = run_qemu_io(path, *cmds, fmt=fmt)
    assert r.returncode == 0 and "fail" not in r.stdout.lower(), r.stdout + r.stderr
