"""Framebuffer updates per second to one VNC viewer: kvmpy's VNC server against
QEMU's ``-vnc`` on the same guest (tests/guests/vga.c phase=anim: a 640x480x32 VBE
mode redrawn without pause), both under KVM.

    python3 -m bench.display

The viewer asks for Raw updates (no decoding cost on the viewer's side), one
incremental request after each update, as viewers do, for SECONDS seconds.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST = os.path.join(REPO, "tests", "guests", "build", "vga.elf")
SECONDS = 5.0


def _recv(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(min(1 << 20, n - len(data)))
        if not chunk:
            raise ConnectionError("viewer: connection closed")
        data += chunk
    return bytes(data)


def updates_per_second(path: str, seconds: float = SECONDS) -> tuple[float, float]:
    """(updates/s, MB/s of pixels) a Raw viewer on unix socket ``path`` receives."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(30)
    sock.connect(path)
    _recv(sock, 12)
    sock.sendall(b"RFB 003.008\n")
    count = _recv(sock, 1)[0]
    _recv(sock, count)
    sock.sendall(b"\x01")
    _recv(sock, 4)
    sock.sendall(b"\x01")
    width, height = struct.unpack(">HH", _recv(sock, 4))
    _recv(sock, 16)
    _recv(sock, struct.unpack(">I", _recv(sock, 4))[0])
    sock.sendall(struct.pack(">B3xBBBBHHHBBB3x", 0, 32, 24, 0, 1, 255, 255, 255, 16, 8, 0))
    sock.sendall(struct.pack(">BxHi", 2, 1, 0))
    updates, pixels, incremental = 0, 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        sock.sendall(struct.pack(">BBHHHH", 3, incremental, 0, 0, width, height))
        incremental = 1
        kind = _recv(sock, 1)[0]
        if kind != 0:
            raise ConnectionError(f"viewer: server message {kind}")
        _recv(sock, 1)
        (rects,) = struct.unpack(">H", _recv(sock, 2))
        for _ in range(rects):
            _, _, w, h, encoding = struct.unpack(">HHHHi", _recv(sock, 12))
            if encoding == 0:
                _recv(sock, w * h * 4)
                pixels += w * h * 4
            elif encoding == -223:
                width, height = w, h
        updates += 1
    elapsed = time.perf_counter() - start
    sock.close()
    return updates / elapsed, pixels / elapsed / 1e6


def _measure(argv: list[str], vnc_path: str, env=None) -> tuple[float, float]:
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        out = b""
        deadline = time.monotonic() + 60
        while b"vga: anim running" not in out:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the guest did not start animating: " + out.decode(errors="replace")[-200:])
            out += os.read(proc.stdout.fileno(), 4096)
        return updates_per_second(vnc_path)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def run() -> list[dict]:
    names = (("VNC updates to one viewer (640x480x32 Raw)", "updates/s"), ("VNC pixels to one viewer", "MB/s"))
    r = subprocess.run(["make", "-s", "-C", os.path.join(REPO, "tests", "guests")], capture_output=True, text=True)
    if r.returncode != 0 or not os.path.exists("/dev/kvm"):
        note = "no /dev/kvm" if r.returncode == 0 else "cannot build tests/guests"
        return [{"name": n, "kvmpy": None, "qemu": None, "unit": u, "note": note} for n, u in names]
    with tempfile.TemporaryDirectory(prefix="kvmpy-bench-display-") as tmp:
        ours_path, qemu_path = os.path.join(tmp, "kvmpy.vnc"), os.path.join(tmp, "qemu.vnc")
        env = dict(os.environ, PYTHONPATH=REPO)
        ours = _measure([sys.executable, "-m", "kvmpy", "run", "--enable-kvm", "--kernel", GUEST,
                         "--append", "phase=anim", "--vnc", f"unix:{ours_path}"], ours_path, env)
        qemu = (None, None)
        note = ""
        binary = shutil.which("qemu-system-x86_64")
        if binary is None:
            note = "qemu-system-x86_64 not installed"
        else:
            qemu = _measure([binary, "-accel", "kvm", "-machine", "pc", "-m", "128", "-nodefaults", "-vga", "std",
                             "-display", "none", "-serial", "stdio", "-vnc", f"unix:{qemu_path}",
                             "-kernel", GUEST, "-append", "phase=anim"], qemu_path)
    return [{"name": names[i][0], "kvmpy": round(ours[i], 1), "qemu": None if qemu[i] is None else round(qemu[i], 1),
             "unit": names[i][1], "better": "higher", "note": note} for i in range(2)]


if __name__ == "__main__":
    for row in run():
        print(row)
