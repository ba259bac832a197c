"""NBD export throughput: `kvmpy nbd` vs `qemu-nbd`, measured with nbdcopy.

    python3 -m bench nbd

Rows: sequential read (nbdcopy export -> null:) and sequential write (nbdcopy
file -> export, with --flush so the data is durable) of a 1 GiB image, raw and
qcow2, in MB/s (higher is better). Both servers get the same flags (-t -e 4, -r
for the reads) over a unix socket and the image is in the page cache for both.
Each advertises multi-conn as it does by default: qemu-nbd does, so nbdcopy opens
4 connections to it; kvmpy nbd only with --multi-conn (under the GIL one
connection is faster), so nbdcopy uses one.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1 << 30
MiB = 1 << 20


def _server(kind: str, args: list[str], sock: str) -> subprocess.Popen:
    if kind == "kvmpy":
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        argv = [sys.executable, "-m", "kvmpy", "nbd"]
    else:
        env = None
        argv = ["qemu-nbd"]
    proc = subprocess.Popen(argv + ["-k", sock, "-t", "-e", "4"] + args, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{kind} nbd did not start: {proc.stderr.read().decode(errors='replace')}")
        time.sleep(0.05)
    return proc


def _stop(proc: subprocess.Popen, sock: str) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if os.path.exists(sock):
        os.unlink(sock)


def _copy_rate(kind: str, server_args: list[str], src: str | None, dst: str | None, sock: str) -> float:
    proc = _server(kind, server_args, sock)
    uri = f"nbd+unix:///?socket={sock}"
    try:
        t = time.perf_counter()
        subprocess.run(["nbdcopy", "--flush", src or uri, dst or uri], check=True)
        return GiB / MiB / (time.perf_counter() - t)
    finally:
        _stop(proc, sock)


def _fresh(path: str, fmt: str) -> None:
    if os.path.exists(path):
        os.unlink(path)
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, path, "1G"], check=True)


def run() -> list[dict]:
    for tool in ("qemu-nbd", "nbdcopy", "qemu-img"):
        if not shutil.which(tool):
            raise RuntimeError(f"{tool} not installed (apt-get install qemu-utils libnbd-bin)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvmpy-bench-nbd-") as d:
        raw = os.path.join(d, "src.raw")
        chunk = os.urandom(MiB)
        with open(raw, "wb") as f:
            for _ in range(GiB // MiB):
                f.write(chunk)
        qcow2 = os.path.join(d, "src.qcow2")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow2], check=True)
        sock = os.path.join(d, "nbd.sock")
        for fmt, image in (("raw", raw), ("qcow2", qcow2)):
            read = {k: _copy_rate(k, ["-r", "-f", fmt, image], None, "null:", sock) for k in ("kvmpy", "qemu")}
            rows.append({"name": f"nbd read 1 GiB {fmt} (nbdcopy)", "kvmpy": read["kvmpy"],
                         "qemu": read["qemu"], "unit": "MB/s"})
            target = os.path.join(d, f"dst.{fmt}")
            write = {}
            for k in ("kvmpy", "qemu"):
                _fresh(target, fmt)
                write[k] = _copy_rate(k, ["-f", fmt, target], raw, None, sock)
            rows.append({"name": f"nbd write 1 GiB {fmt} (nbdcopy --flush)", "kvmpy": write["kvmpy"],
                         "qemu": write["qemu"], "unit": "MB/s"})
    return rows


if __name__ == "__main__":
    for r in run():
        print(r)
