"""User-mode networking: TCP throughput guest -> host through libslirp, kvmpy's
``--net user`` against QEMU's ``-nic user,model=virtio-net-pci``, the same default
Linux guest on the translator (TCG) in both. The guest pipes zeros into busybox
nc to 10.0.2.2:PORT, which is a sink on the host's 127.0.0.1; the sink times from
its accept to the guest's EOF."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time

MIB = 16
TIMEOUT = 900


class _Sink(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self.received = 0
        self.seconds = None

    def run(self) -> None:
        conn, _ = self.listener.accept()
        start = time.monotonic()
        with conn:
            while chunk := conn.recv(1 << 16):
                self.received += len(chunk)
        self.seconds = time.monotonic() - start


def _append(port: int) -> str:
    run = f"dd if=/dev/zero bs=64k count={MIB * 16} 2>/dev/null | nc 10.0.2.2 {port}"
    return f'console=ttyS0 panic=-1 quiet kvmpy.ip=dhcp kvmpy.run="{run}"'


def _measure(argv_for_port) -> float | None:
    sink = _Sink()
    sink.start()
    try:
        subprocess.run(argv_for_port(sink.port), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return None
    finally:
        sink.listener.close()
    sink.join(5)
    if sink.seconds is None or sink.received != MIB << 20:
        return None
    return (MIB << 20) / sink.seconds / 1e6


def run() -> list[dict]:
    from kvmpy.tools import guestbuild
    guest = guestbuild.build(with_disk=False)
    row = {"name": f"usernet TCP guest->host ({MIB} MiB, TCG)", "kvmpy": None, "qemu": None, "unit": "MB/s"}
    row["kvmpy"] = _measure(lambda port: [sys.executable, "-m", "kvmpy", "run", "--accel", "tcg", "-m", "256",
                                          "--kernel", guest.kernel, "--initrd", guest.initrd, "--no-reboot",
                                          "--net", "user", "--append", _append(port)])
    qemu = shutil.which("qemu-system-x86_64")
    if qemu:
        row["qemu"] = _measure(lambda port: [qemu, "-accel", "tcg", "-m", "256", "-kernel", guest.kernel,
                                             "-initrd", guest.initrd, "-no-reboot", "-nographic",
                                             "-nic", "user,model=virtio-net-pci", "-append", _append(port)])
    else:
        row["note"] = "qemu-system-x86_64 is not installed"
    return [row]


if __name__ == "__main__":
    print(run())
