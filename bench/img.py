"""Disk image benchmarks: kvmpy img / qcow2 driver vs qemu-img.

    python3 -m bench.img

Rows: convert raw->qcow2 and qcow2->raw of a 1 GiB image with mixed data and zero
areas (seconds, lower is better), and 4 KiB read/write IOPS through the qcow2
driver at queue depth 1 vs `qemu-img bench` (higher is better). qemu-img bench
has no random mode, so both sides use the same large stride (1 MiB + 4 KiB)
through a fully allocated 256 MiB region, which defeats readahead and L2 locality.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

GiB = 1 << 30
MiB = 1 << 20
STRIDE = MiB + 4096
IO_REGION = 256 * MiB
IO_COUNT = 20000


def _timed(argv, env=None) -> float:
    t = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t


def _make_source(path: str) -> None:
    """1 GiB raw: 1 MiB data extents every 3 MiB, some all-zero data, rest holes."""
    rng = random.Random(1)
    chunk = bytearray(rng.randbytes(MiB))
    with open(path, "wb") as f:
        f.truncate(GiB)
        for k in range(0, GiB // MiB, 3):
            f.seek(k * MiB)
            f.write(chunk if k % 9 else bytes(MiB))  # written zeroes must stay sparse too


def _kvmpy_iops(path: str, write: bool) -> float:
    from kvmpy.block import open_image
    buf = bytearray(os.urandom(4096))
    views = [memoryview(buf)]
    with open_image(path) as d:
        off = 0
        t = time.perf_counter()
        op = d.pwritev if write else d.preadv
        for _ in range(IO_COUNT):
            op(views, off)
            off += STRIDE
            if off + 4096 > IO_REGION:
                off = (off + 4096) % IO_REGION // 4096 * 4096
        if write:
            d.flush()
        return IO_COUNT / (time.perf_counter() - t)


def _qemu_iops(path: str, write: bool) -> float:
    argv = ["qemu-img", "bench", "-f", "qcow2", "-t", "writeback", "-d", "1", "-c", str(IO_COUNT),
            "-s", "4096", "-S", str(STRIDE)]
    if write:
        argv.append("-w")
    t = time.perf_counter()
    subprocess.run(argv + [path], check=True, stdout=subprocess.DEVNULL)
    return IO_COUNT / (time.perf_counter() - t)


def run() -> list[dict]:
    if not shutil.which("qemu-img"):
        raise RuntimeError("qemu-img not installed (apt-get install qemu-utils)")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    kimg = [sys.executable, "-m", "kvmpy", "img"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvmpy-bench-img-") as d:
        src = os.path.join(d, "src.raw")
        _make_source(src)
        kq, qq = os.path.join(d, "k.qcow2"), os.path.join(d, "q.qcow2")
        rows.append({"name": "convert raw->qcow2 1GiB mixed",
                     "kvmpy": _timed(kimg + ["convert", "-f", "raw", "-O", "qcow2", src, kq], env),
                     "qemu": _timed(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", src, qq]),
                     "unit": "s"})
        kr, qr = os.path.join(d, "k.raw"), os.path.join(d, "q.raw")
        rows.append({"name": "convert qcow2->raw 1GiB mixed",
                     "kvmpy": _timed(kimg + ["convert", "-f", "qcow2", "-O", "raw", qq, kr], env),
                     "qemu": _timed(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", qq, qr]),
                     "unit": "s"})
        for p in (kr, qr, kq):
            os.unlink(p)
        io_img = os.path.join(d, "io.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", io_img, "1G"], check=True)
        subprocess.run(["qemu-io", "-c", f"write -P 0x5a 0 {IO_REGION}", io_img], check=True,
                       stdout=subprocess.DEVNULL)
        for write in (False, True):
            rows.append({"name": f"qcow2 4k {'write' if write else 'read'} IOPS qd1 (strided)",
                         "kvmpy": _kvmpy_iops(io_img, write), "qemu": _qemu_iops(io_img, write),
                         "unit": "IOPS"})
    return rows


def main() -> int:
    rows = run()
    for r in rows:
        better = "lower" if r["unit"] == "s" else "higher"
        print(f"{r['name']:<42} kvmpy {r['kvmpy']:>10.2f}  qemu {r['qemu']:>10.2f}  {r['unit']} "
              f"({better} is better)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
