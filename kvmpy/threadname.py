"""Naming the calling thread as the kernel sees it, so that ps -L, top -H and
/proc/PID/task/TID/comm tell a VM process's threads apart ("CPU 0/KVM", the event
loop, the console), as QEMU's -name debug-threads=on does. Python 3.11 names no
thread it starts: each shows as the process's name, and a per-thread profile of a
slow transfer cannot say whose CPU it was. The native helpers (the data planes'
threads, the coalesced ring's watcher, the translator's alarm) name themselves in C
as they start: a thread starts with its creator's name, often a vCPU's.
"""

from __future__ import annotations

import ctypes
import threading

# <linux/prctl.h>; the sandbox (kvmpy.sandbox) allows prctl for this option alone.
PR_SET_NAME = 15
# The kernel's limit, 16 bytes with the terminating NUL: a longer name is cut.
NAME_BYTES = 15

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.restype = ctypes.c_int


def name_this_thread(name: str) -> None:
    """Best effort: a name is for people reading ps, never a reason to stop a thread."""
    raw = name.encode("utf-8", "replace")[:NAME_BYTES]
    _libc.prctl(ctypes.c_int(PR_SET_NAME), ctypes.c_char_p(raw), ctypes.c_ulong(0), ctypes.c_ulong(0),
                ctypes.c_ulong(0))


class NamedThread(threading.Thread):
    """A thread that gives the kernel its Python name as it starts, for the threads
    kvmpy starts itself (the event loops and the vCPUs name themselves as they go)."""

    def run(self) -> None:
        name_this_thread(self.name)
        super().run()
