"""virtio benchmarks: the same guest drivers under kvmpy and under QEMU.

    python3 -m bench.virtio

Rows (higher is better):
  virtio-blk seq read 64k   MB/s   tests/guests/virtio_blk.elf reads=N (64 KiB each)
  virtio-blk rand read 4k   IOPS   tests/guests/virtio_blk.elf rand=N
  virtio-blk seq write 64k  MB/s   tests/guests/virtio_blk.elf writes=N (64 KiB each)
  virtio-blk rand read 4k QD32  IOPS  tests/guests/virtio_blk.elf rand=N depth=32
  (kvmpy's figure is its native data plane; the note gives dataplane=python's)
  virtio-net tx to bridge   frames/s  tests/guests/virtio_net.elf flood=N, counted on the bridge
  virtio-net tx vhost       frames/s  the same with vhost=on on both sides (the kernel's data
                                      plane); where /dev/vhost-net exists, e.g. in the nested L1

Each figure is work / (wall time of a run with the work - wall time of the same
boot without it), so boot and guest setup cancel out. Both sides use KVM when
/dev/kvm is usable (QEMU -accel kvm, kvmpy run --enable-kvm), else QEMU TCG and
the kvmpy translator. The net row needs root (namespace, bridge, tap). A side
that cannot run reports None and says why in "note".
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

GUESTS = os.path.join(REPO, "tests", "guests")
BUILD = os.path.join(GUESTS, "build")
QEMU = shutil.which("qemu-system-x86_64")
DISK_SIZE = 256 << 20
SEQ_READS = 2000        # x 64 KiB = 125 MiB
SEQ_WRITES = 1000       # x 64 KiB = 62.5 MiB
RAND_READS = 5000
FLOOD = 20000
ETH_TYPE = 0x88B5
TIMEOUT = 600


def _kvm_ok() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def _qemu_cmd(guest: str, append: str, devices: list[str]) -> list[str]:
    accel = "kvm" if _kvm_ok() else "tcg"
    return [QEMU, "-accel", accel, "-machine", "q35", "-m", "256", "-nodefaults", "-display", "none",
            "-serial", "stdio", "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
            "-kernel", os.path.join(BUILD, f"{guest}.elf"), "-append", append, *devices]


def _kvmpy_cmd(guest: str, append: str, extra: list[str]) -> list[str]:
    accel = ["--enable-kvm"] if _kvm_ok() else []
    return [sys.executable, "-m", "kvmpy", "run", *accel, "--kernel", os.path.join(BUILD, f"{guest}.elf"),
            "--append", append, "-m", "256M", "--serial", "stdio", "--no-reboot", *extra]


def _timed(argv: list[str], ok_status: int, prefix: list[str] | None = None) -> float:
    t = time.perf_counter()
    r = subprocess.run((prefix or []) + argv, capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO)
    elapsed = time.perf_counter() - t
    out = r.stdout.replace("\r\n", "\n")
    if "No module named 'kvmpy.devices.attach'" in r.stderr:
        raise RuntimeError("kvmpy run cannot attach virtio devices yet (kvmpy.devices.attach is not wired)")
    if r.returncode != ok_status or "guest: done" not in out:
        tail = (out + r.stderr).strip().splitlines()[-3:]
        raise RuntimeError(f"status {r.returncode}: {' | '.join(tail)}")
    return elapsed


def _rate(cmd_for, work: float, ok_status: int, prefix=None) -> float:
    base = min(_timed(cmd_for(False), ok_status, prefix) for _ in range(2))
    loaded = _timed(cmd_for(True), ok_status, prefix)
    return work / max(loaded - base, 1e-3)


def _blk_rows(tmp: str) -> list[dict]:
    img = os.path.join(tmp, "disk.raw")
    with open(img, "wb") as f:
        f.truncate(DISK_SIZE)
    # Real data, not holes: a sparse file would measure the page cache's zero page.
    chunk = os.urandom(1 << 20)
    with open(img, "r+b") as f:
        for off in range(0, DISK_SIZE, 1 << 20):
            f.write(chunk)

    def q(append):
        return _qemu_cmd("virtio_blk", append, ["-device", "virtio-blk-pci,drive=d0,disable-legacy=on",
                                                "-drive", f"if=none,id=d0,file={img},format=raw,cache=none"])

    def k(append, dataplane="native"):
        return _kvmpy_cmd("virtio_blk", append, ["--drive", f"file={img},format=raw,dataplane={dataplane}"])

    def k_python(append):
        return k(append, "python")

    rows = []
    for name, unit, arg, count, scale in (
            ("virtio-blk seq read 64k", "MB/s", "reads", SEQ_READS, 65536 / 1e6),
            ("virtio-blk rand read 4k", "IOPS", "rand", RAND_READS, 1.0),
            ("virtio-blk seq write 64k", "MB/s", "writes", SEQ_WRITES, 65536 / 1e6),
            ("virtio-blk rand read 4k QD32", "IOPS", "depth=32 rand", RAND_READS, 1.0)):
        row = {"name": name, "unit": unit, "kvmpy": None, "qemu": None}
        notes = []
        # kvmpy-python: the same disk with every request in the Python model, for the note
        for side, build, status in (("qemu", q, 1), ("kvmpy", k, 0), ("kvmpy-python", k_python, 0)):
            if side == "qemu" and QEMU is None:
                notes.append("qemu: not installed")
                continue
            try:
                if side == "kvmpy-python":
                    rate = _rate(lambda loaded: build(f"{arg}={count if loaded else 0}"), count * scale, status)
                    notes.append(f"python data plane: {rate:.1f}")
                    continue
                row[side] = round(_rate(lambda loaded: build(f"{arg}={count if loaded else 0}"), count * scale,
                                        status), 1)
            except Exception as e:  # a side that cannot run says why; the other still reports
                notes.append(f"{side}: {e}")
        if notes:
            row["note"] = "; ".join(notes)
        rows.append(row)
    return rows


class _Counter:
    def __init__(self, netns: str, bridge: str) -> None:
        from kvmpy.tap import run_in_netns
        self.sock = run_in_netns(netns, self._open, bridge)
        self.count = 0
        self.stop = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    @staticmethod
    def _open(bridge):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_TYPE))
        s.bind((bridge, 0))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        s.settimeout(0.2)
        return s

    def _loop(self):
        while not self.stop:
            try:
                frame = self.sock.recv(2048)
            except socket.timeout:
                continue
            except OSError:
                return
            if frame[12:14] != struct.pack("!H", ETH_TYPE):
                continue
            self.count += 1
            if b"kvmpy-net-ping" in frame[14:40]:
                # answer pings so the guest's echo phase passes
                self.sock.send((frame[6:12] + b"\x02\0\0\0\0\x01" + frame[12:14] + b"echo:" + frame[14:]).ljust(60, b"\0"))

    def close(self):
        self.stop = True
        self.thread.join()
        self.sock.close()


def _net_row(vhost: bool = False) -> dict:
    row = {"name": "virtio-net tx vhost" if vhost else "virtio-net tx to bridge", "unit": "frames/s",
           "kvmpy": None, "qemu": None}
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        row["note"] = "needs root and /dev/net/tun"
        return row
    if vhost and not os.path.exists("/dev/vhost-net"):
        row["note"] = "no /dev/vhost-net on this host (modprobe vhost_net; the nested L1 has it)"
        return row
    vhost_opt = "on" if vhost else "off"
    ns = f"kvmpybench-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    notes = []
    try:
        subprocess.run(["ip", "-n", ns, "link", "add", "kbr0", "type", "bridge"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "kbr0", "up"], check=True)
        counter = _Counter(ns, "kbr0")
        prefix = ["ip", "netns", "exec", ns]
        try:
            if QEMU is not None:
                for cmd in (["ip", "-n", ns, "tuntap", "add", "qtap0", "mode", "tap", "vnet_hdr"],
                            ["ip", "-n", ns, "link", "set", "qtap0", "master", "kbr0"],
                            ["ip", "-n", ns, "link", "set", "qtap0", "up"]):
                    subprocess.run(cmd, check=True)

                def q(loaded):
                    return _qemu_cmd("virtio_net", f"count=1 flood={FLOOD if loaded else 0}", [
                        "-netdev", f"tap,id=n0,ifname=qtap0,script=no,downscript=no,vhost={vhost_opt}",
                        "-device", "virtio-net-pci,netdev=n0,disable-legacy=on"])
                try:
                    row["qemu"] = round(_rate(q, FLOOD, 1, prefix))
                except Exception as e:
                    notes.append(f"qemu: {e}")
            else:
                notes.append("qemu: not installed")

            def k(loaded):
                return _kvmpy_cmd("virtio_net", f"count=1 flood={FLOOD if loaded else 0}",
                                  ["--net", f"tap,ifname=ktap0,bridge=kbr0,vhost={vhost_opt}"])
            try:
                row["kvmpy"] = round(_rate(k, FLOOD, 0, prefix))
            except Exception as e:
                notes.append(f"kvmpy: {e}")
        finally:
            counter.close()
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    if notes:
        row["note"] = "; ".join(notes)
    return row


def run() -> list[dict]:
    r = subprocess.run(["make", "-s", "-C", GUESTS], capture_output=True, text=True)
    if r.returncode != 0:
        note = "cannot build tests/guests: " + (r.stdout + r.stderr).strip()[-200:]
        return [{"name": n, "kvmpy": None, "qemu": None, "unit": u, "note": note}
                for n, u in (("virtio-blk seq read 64k", "MB/s"), ("virtio-blk rand read 4k", "IOPS"),
                             ("virtio-blk seq write 64k", "MB/s"), ("virtio-blk rand read 4k QD32", "IOPS"),
                             ("virtio-net tx to bridge", "frames/s"), ("virtio-net tx vhost", "frames/s"))]
    with tempfile.TemporaryDirectory(prefix="kvmpy-bench-virtio-") as tmp:
        rows = _blk_rows(tmp)
    rows.append(_net_row())
    rows.append(_net_row(vhost=True))
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
