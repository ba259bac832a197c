"""A real Debian cloud kernel boots on kvmpy's translator (with 2 vCPUs, and with 1)
to the busybox init, runs commands, writes a file to its virtio disk and powers off;
the host reads the file."""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from conftest import KVM_SKIP_REASON, run_kvmpy, tool_required

BOOT_TIMEOUT = 900


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    from kvmpy.tools import guestbuild
    if not all(map(__import__("shutil").which, ("apt-get", "dpkg-deb"))):
        pytest.skip("not a Debian host: no apt-get/dpkg-deb to build the guest")
    out = tmp_path_factory.mktemp("guest")
    return guestbuild.build(out_dir=str(out), disk_size="64M")


def boot(guest, accel: list[str], commands: str) -> tuple[subprocess.CompletedProcess, float]:
    t = time.monotonic()
    p = run_kvmpy(["run", *accel, "-m", "512", "--kernel", guest.kernel, "--initrd", guest.initrd,
                   "--no-reboot", "--drive", f"file={guest.disk},format=raw",
                   "--append", f'console=ttyS0 panic=-1 kvmpy.run="{commands}"'], timeout=BOOT_TIMEOUT)
    return p, time.monotonic() - t


def check_run(guest, p, marker: str) -> str:
    out = p.stdout.decode(errors="replace").replace("\r\n", "\n")
    assert p.returncode == 0, out[-3000:] + p.stderr.decode()[-2000:]
    assert f"kvmpy guest: init {guest.release}" in out, out[-3000:]
    assert re.search(rf"^{re.escape(guest.release)}$", out, re.M), "uname -r did not print the release"
    assert "kvmpy guest: run exit 0" in out, out[-3000:]
    debugfs = tool_required("debugfs")
    r = subprocess.run([debugfs, "-R", "cat /f", guest.disk], capture_output=True, text=True)
    assert r.stdout.strip() == marker, r.stderr
    return out


def test_linux_boots_on_the_translator(guest):
    """Two vCPUs: the kernel brings the AP up through INIT-SIPI-SIPI and runs SMP (the
    other Linux tests here boot the default single vCPU)."""
    marker = f"written-by-tcg-{os.getpid()}"
    p, seconds = boot(guest, ["--accel", "tcg", "--smp", "2"],
                      f"uname -r; grep -c ^processor /proc/cpuinfo; echo {marker} > /mnt/f; sync; "
                      "echo +1 > /sys/class/rtc/rtc0/wakealarm; sleep 3; grep rtc0 /proc/interrupts; "
                      "sleep 5; grep rtc0 /proc/interrupts; grep -m1 ^flags /proc/cpuinfo")
    out = check_run(guest, p, marker)
    assert re.search(r"^2$", out, re.M), out[-3000:]     # two processors in /proc/cpuinfo
    # the extensions after SSE4.2 (c_ext/insn_bmi.h) as Linux reports them; no AVX
    flags = re.findall(r"^flags\s*:(.*)$", out, re.M)
    assert flags, out[-3000:]
    have = set(flags[-1].split())
    assert {"movbe", "popcnt", "rdrand", "bmi1", "bmi2", "adx", "rdseed", "abm"} <= have, flags[-1]
    assert not {"avx", "avx2", "xsave"} & have, flags[-1]
    assert "RDRAND gives funky smelling output" not in out
    assert "smp: Brought up 1 node, 2 CPUs" in out
    # the RTC alarm (rtc-cmos through the IOAPIC) interrupted once. The last count
    # decides: on a loaded host the alarm has come after more than 3 guest seconds
    # (seen once since the CPUID 0x15 timebase; a gap to explain), never twice.
    rtc = re.findall(r"^\s*8:((?:\s+\d+)+)\s+IO-APIC\s+8-edge\s+rtc0", out, re.M)
    assert rtc and sum(map(int, rtc[-1].split())) == 1, out[-3000:]
    print(f"translator, 2 vCPUs: boot to poweroff in {seconds:.1f} s")


def test_linux_boots_under_kvm(guest):
    if KVM_SKIP_REASON:
        pytest.skip(KVM_SKIP_REASON)
    from kvmpy.hv.select import probe_kvm
    if "kvm_pvm" in probe_kvm()["backend"]:
        pytest.skip("software-nested KVM (kvm_pvm) cannot run an unmodified Linux kernel "
                    "(emulation failures on int3/xrstor/cmpxchg16b); the translator test covers Linux here")
    marker = f"written-by-kvm-{os.getpid()}"
    p, seconds = boot(guest, ["--enable-kvm"], f"uname -r; echo {marker} > /mnt/f; sync")
    check_run(guest, p, marker)


def test_linux_powers_off_on_system_powerdown(guest, tmp_path):
    """QMP system_powerdown presses the ACPI power button; the guest's acpid powers off."""
    import sys
    from qemu.qmp.legacy import QEMUMonitorProtocol
    from conftest import ROOT
    qmp_path = tmp_path / "linux.qmp"
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "kvmpy", "run", "--accel", "tcg", "-m", "512",
                             "--kernel", guest.kernel, "--initrd", guest.initrd, "--no-reboot",
                             "--append", "console=ttyS0 panic=-1 quiet", "--qmp", f"unix:{qmp_path}"],
                            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        out = b""
        deadline = time.monotonic() + BOOT_TIMEOUT
        while b"shell on the console" not in out and time.monotonic() < deadline:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            out += chunk
        assert b"shell on the console" in out, out[-2000:]
        time.sleep(1)   # let acpid open the button's input device
        qmp = QEMUMonitorProtocol(str(qmp_path))
        qmp.connect()
        assert qmp.cmd("query-status")["status"] == "running"
        qmp.cmd("system_powerdown")
        try:
            qmp.close()
        except (EOFError, ConnectionError):
            pass
        rest = proc.stdout.read()
        assert proc.wait(120) == 0
        assert b"reboot: Power down" in rest, rest[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_linux_pings_across_a_bridge(guest, netns):
    """virtio-net on the translator: the guest pings the bridge's address in a
    network namespace this test makes (no traffic leaves it)."""
    import sys
    from conftest import ROOT
    ns = netns
    for cmd in (["link", "add", "kbr7", "type", "bridge"], ["addr", "add", "10.77.0.1/24", "dev", "kbr7"],
                ["link", "set", "kbr7", "up"], ["link", "set", "lo", "up"]):
        subprocess.run(["ip", "-n", ns, *cmd], check=True)
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "kvmpy", "run", "--accel", "tcg",
                        "-m", "512", "--kernel", guest.kernel, "--initrd", guest.initrd, "--no-reboot",
                        "--net", "tap,bridge=kbr7",
                        "--append", 'console=ttyS0 panic=-1 quiet kvmpy.ip=10.77.0.2/24 '
                                    'kvmpy.run="ping -c 3 -W 5 10.77.0.1"'],
                       cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=BOOT_TIMEOUT)
    out = p.stdout.decode(errors="replace")
    assert p.returncode == 0, out[-3000:] + p.stderr.decode()[-2000:]
    assert "kvmpy guest: eth0 up" in out
    assert "3 packets transmitted, 3 packets received" in out, out[-3000:]
    assert "kvmpy guest: run exit 0" in out


def test_linux_reads_entropy_from_the_virtio_rng_plugin(guest):
    """The virtio-rng plug-in (examples/plugins/virtio_rng.py, outside the package) is a
    hwrng Linux's own virtio-rng driver binds to and reads, in requests of at most
    ``max_bytes_per_request`` bytes."""
    p = run_kvmpy(["run", "--accel", "tcg", "-m", "512", "--kernel", guest.kernel, "--initrd", guest.initrd,
                   "--no-reboot", "--device", "examples.plugins.virtio_rng:VirtioRng,id=rng0,max_bytes_per_request=16",
                   "--append", 'console=ttyS0 panic=-1 quiet kvmpy.run="cat /sys/class/misc/hw_random/rng_current; '
                               'dd if=/dev/hwrng bs=256 count=1 2>/dev/null | od -An -v -tx1 | tr -s \' \\n\' \'\\n\' '
                               '| grep -c ."'], timeout=BOOT_TIMEOUT)
    out = p.stdout.decode(errors="replace").replace("\r\n", "\n")
    assert p.returncode == 0, out[-3000:] + p.stderr.decode()[-2000:]
    assert re.search(r"^virtio_rng\.\d+$", out, re.M), out[-3000:]
    assert re.search(r"^256$", out, re.M), out[-3000:]       # 256 bytes read through 16-byte requests
    assert "kvmpy guest: run exit 0" in out, out[-3000:]


def test_linux_uses_two_queue_pairs_and_the_control_queue(guest, netns):
    """virtio-net with queues=2 on the translator: Linux's driver negotiates MQ,
    merged RX buffers and the control queue, sets two queue pairs (one per vCPU)
    and its receive filter through it, and pings across the bridge."""
    import sys
    from conftest import ROOT
    ns = netns
    for cmd in (["link", "add", "kbr8", "type", "bridge"], ["addr", "add", "10.78.0.1/24", "dev", "kbr8"],
                ["link", "set", "kbr8", "up"], ["link", "set", "lo", "up"]):
        subprocess.run(["ip", "-n", ns, *cmd], check=True)
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "kvmpy", "-v", "run", "--accel", "tcg",
                        "-m", "512", "--smp", "2", "--kernel", guest.kernel, "--initrd", guest.initrd,
                        "--no-reboot", "--net", "tap,bridge=kbr8,queues=2",
                        "--append", 'console=ttyS0 panic=-1 quiet kvmpy.ip=10.78.0.2/24 '
                                    'kvmpy.run="ls /sys/class/net/eth0/queues; ping -c 3 -W 5 10.78.0.1"'],
                       cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=BOOT_TIMEOUT)
    out = p.stdout.decode(errors="replace")
    err = p.stderr.decode(errors="replace")
    assert p.returncode == 0, out[-3000:] + err[-2000:]
    assert "3 packets transmitted, 3 packets received" in out, out[-3000:]
    assert re.search(r"\brx-1\b", out) and re.search(r"\btx-1\b", out), out[-3000:]
    assert "2 queue pairs in use" in err, err[-3000:]
    assert "control queue" not in err, err[-3000:]        # no command of Linux's was refused
    assert "kvmpy guest: run exit 0" in out
