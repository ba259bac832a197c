"""Benchmark parts for tests/test_bench_parts.py: run by bench.parts in a child
process, as bench/kvm.py's and bench/virtio.py's parts are."""

from __future__ import annotations

import os
import subprocess
import time


def rows(count: int) -> list[dict]:
    return [{"name": f"row {i}", "kvmpy": float(i), "qemu": 1.0, "unit": "x"} for i in range(count)]


def hangs(marker: str) -> list[dict]:
    """Waits on a child that never ends, as a part waits on a guest that never powers
    off; writes ``marker`` when its cleanup runs (the deadline's SIGTERM)."""
    child = subprocess.Popen(["sleep", "1000"])
    with open(marker + ".pid", "w") as f:
        f.write(str(child.pid))
    try:
        child.wait()
    finally:
        with open(marker, "w") as f:
            f.write("cleaned up")
    return rows(1)


def ignores_sigterm(pid_file: str) -> list[dict]:
    """Leaves a child that ignores SIGTERM: only the SIGKILL after the grace ends it."""
    child = subprocess.Popen(["sh", "-c", "trap '' TERM; while :; do sleep 1; done"])
    with open(pid_file, "w") as f:
        f.write(str(child.pid))
    while True:
        time.sleep(1)


def fails() -> list[dict]:
    raise RuntimeError("this part is broken")


def exits_quietly() -> list[dict]:
    os._exit(0)
