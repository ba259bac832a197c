"""Inside the nested-KVM L1: the default Linux guest (built on the host, shared in)
under `kvmpy run --enable-kvm` on real kvm-amd.

One boot serves most checks: 2 vCPUs, a raw disk and a qcow2 overlay written by the
guest and read back after the VM ended, pings both ways across a bridge, and QMP
system_powerdown ending the VM with status 0. A second boot checks that `reboot`
in the guest resets the machine and boots the kernel again."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid

import pytest

from conftest import ROOT, run_kvmpy
from support.nested import l1_only, linux_guest_files

pytestmark = l1_only

BOOT_TIMEOUT = 240
GUEST_IP, L1_IP = "10.77.0.2", "10.77.0.1"


class Console:
    """A kvmpy process whose serial console is its stdin/stdout: read in a thread,
    commands typed into the guest's shell."""

    def __init__(self, argv: list[str], stderr_path: str):
        self.stderr = open(stderr_path, "wb")
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr)
        self.out = b""
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()
        self.commands = 0

    def _pump(self):
        while True:
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                return
            with self.lock:
                self.out += chunk

    def text(self) -> str:
        with self.lock:
            return self.out.decode(errors="replace").replace("\r\n", "\n")

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.text(), re.M)
            if m:
                return m
            if self.proc.poll() is not None and not self.thread.is_alive():
                break
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} on the console within {timeout} s:\n{self.text()[-3000:]}")

    def shell(self, command: str, timeout: float = 60) -> tuple[int, str]:
        """Types ``command`` into the guest's shell; its exit status and output."""
        self.commands += 1
        tag = f"@@done{self.commands}"
        start = len(self.text())
        self.proc.stdin.write(f"{command}; echo {tag} $?\n".encode())
        self.proc.stdin.flush()
        m = self.wait_for(rf"^{tag} (\d+)$", timeout)
        return int(m.group(1)), self.text()[start:m.start()]

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.thread.join(5)
        self.stderr.close()


def debugfs_cat(image: str, path: str) -> str:
    r = subprocess.run(["debugfs", "-R", f"cat {path}", image], capture_output=True, text=True, timeout=60)
    return r.stdout.strip()


@pytest.fixture(scope="module")
def boot(tmp_path_factory):
    """Boots the guest once and exercises it; the tests below check the record."""
    files = linux_guest_files()
    tmp = tmp_path_factory.mktemp("linux")
    raw, base, overlay = str(tmp / "disk.raw"), str(tmp / "base.raw"), str(tmp / "overlay.qcow2")
    shutil.copyfile(files["disk.img"], raw)
    shutil.copyfile(files["disk.img"], base)
    p = run_kvmpy(["img", "create", "-f", "qcow2", "-b", base, "-F", "raw", overlay], timeout=60)
    assert p.returncode == 0, p.stderr.decode()
    qmp_path = str(tmp / "vm.qmp")
    ns = f"kvmpyl1-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    record: dict = {"raw": raw, "base": base, "overlay": overlay, "tmp": str(tmp), "marks": {}}
    console = None
    try:
        for cmd in (["link", "add", "kbr7", "type", "bridge"], ["addr", "add", f"{L1_IP}/24", "dev", "kbr7"],
                    ["link", "set", "kbr7", "up"], ["link", "set", "lo", "up"]):
            subprocess.run(["ip", "-n", ns, *cmd], check=True)
        start = time.monotonic()
        console = Console(["ip", "netns", "exec", ns, sys.executable, "-m", "kvmpy", "run", "--enable-kvm",
                           "--smp", "2", "-m", "512", "--kernel", files["vmlinuz"], "--initrd", files["initrd.img"],
                           "--no-reboot", "--drive", f"file={raw},format=raw",
                           "--drive", f"file={overlay},format=qcow2", "--net", "tap,bridge=kbr7",
                           "--qmp", f"unix:{qmp_path}",
                           "--append", f"console=ttyS0 panic=-1 quiet kvmpy.ip={GUEST_IP}/24"],
                          str(tmp / "kvmpy.stderr"))
        record["console"] = console
        console.wait_for(r"shell on the console", BOOT_TIMEOUT)
        record["marks"]["shell"] = time.monotonic() - start
        record["cpus"] = console.shell("grep -c ^processor /proc/cpuinfo; cat /sys/devices/system/cpu/online")
        record["raw_write"] = console.shell("echo raw-from-kvm > /mnt/f && sync")
        record["qcow2_write"] = console.shell(
            "mkdir -p /m2 && mount -t ext4 /dev/vdb /m2 && echo qcow2-from-kvm > /m2/f && sync && umount /m2")
        record["ping_out"] = console.shell(f"ping -c 3 -W 5 {L1_IP}", timeout=60)
        r = subprocess.run(["ip", "netns", "exec", ns, "busybox", "ping", "-c", "3", "-W", "5", GUEST_IP],
                           capture_output=True, text=True, timeout=60)
        record["ping_in"] = (r.returncode, r.stdout + r.stderr)
        time.sleep(0.5)   # acpid has long been up; this only lets the console settle
        from qemu.qmp.legacy import QEMUMonitorProtocol
        qmp = QEMUMonitorProtocol(qmp_path)
        qmp.connect()
        record["status_before"] = qmp.cmd("query-status")["status"]
        qmp.cmd("system_powerdown")
        try:
            qmp.close()
        except (EOFError, ConnectionError):
            pass
        t = time.monotonic()
        try:
            record["exit"] = console.proc.wait(BOOT_TIMEOUT)
        except subprocess.TimeoutExpired:
            record["exit"] = None
        record["marks"]["powerdown"] = time.monotonic() - t
        console.thread.join(5)
        record["text"] = console.text()
        record["stderr"] = open(tmp / "kvmpy.stderr", errors="replace").read()
        print(f"Linux under kvmpy --enable-kvm in the L1: shell after {record['marks']['shell']:.1f} s, "
              f"powered down {record['marks']['powerdown']:.1f} s after system_powerdown")
        yield record
    finally:
        if console:
            console.close()
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_linux_runs_on_two_vcpus(boot):
    status, out = boot["cpus"]
    assert status == 0, out
    assert re.search(r"^2$", out, re.M) and re.search(r"^0-1$", out, re.M), out


def test_linux_raw_disk_write_reads_back_on_the_host(boot):
    assert boot["raw_write"][0] == 0, boot["raw_write"][1]
    assert boot["exit"] == 0, boot["stderr"][-2000:]
    assert debugfs_cat(boot["raw"], "/f") == "raw-from-kvm"


def test_linux_qcow2_overlay_write_reads_back_on_the_host(boot):
    assert boot["qcow2_write"][0] == 0, boot["qcow2_write"][1]
    assert boot["exit"] == 0, boot["stderr"][-2000:]
    check = subprocess.run(["qemu-img", "check", boot["overlay"]], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    flat = os.path.join(boot["tmp"], "flat.raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", boot["overlay"], flat], check=True, timeout=120)
    assert debugfs_cat(flat, "/f") == "qcow2-from-kvm"
    assert debugfs_cat(boot["base"], "/f") == ""            # the backing file is untouched
    assert "README" in subprocess.run(["debugfs", "-R", "ls /", flat], capture_output=True, text=True).stdout


def test_linux_pings_the_l1_bridge(boot):
    status, out = boot["ping_out"]
    assert status == 0 and "3 packets transmitted, 3 packets received" in out, out


def test_l1_pings_the_linux_guest(boot):
    status, out = boot["ping_in"]
    assert status == 0 and "3 packets transmitted, 3 packets received" in out, out


def test_linux_powers_off_on_qmp_system_powerdown(boot):
    assert boot["status_before"] == "running"
    assert boot["exit"] == 0, boot["stderr"][-2000:]
    assert "reboot: Power down" in boot["text"], boot["text"][-2000:]


def test_linux_reboot_boots_the_kernel_again(tmp_path):
    """`reboot -f` in the guest resets the machine (no --no-reboot): the kernel boots a
    second time, sees the mark the first boot left on the disk and powers off."""
    files = linux_guest_files()
    disk = str(tmp_path / "disk.raw")
    shutil.copyfile(files["disk.img"], disk)
    run = ("if [ -e /mnt/booted ]; then echo boot-two; else echo boot-one; touch /mnt/booted; sync; "
           "umount /mnt; reboot -f; fi")
    p = run_kvmpy(["run", "--enable-kvm", "-m", "512", "--kernel", files["vmlinuz"], "--initrd", files["initrd.img"],
                   "--drive", f"file={disk},format=raw",
                   "--append", f'console=ttyS0 panic=-1 quiet kvmpy.run="{run}"'], timeout=2 * BOOT_TIMEOUT)
    out = p.stdout.decode(errors="replace").replace("\r\n", "\n")
    assert p.returncode == 0, out[-3000:] + p.stderr.decode()[-2000:]
    assert out.count("kvmpy guest: init ") == 2, out[-3000:]
    one, two = re.search(r"^boot-one$", out, re.M), re.search(r"^boot-two$", out, re.M)
    assert one and two and one.start() < two.start(), out[-3000:]
    assert "reboot: Power down" in out
