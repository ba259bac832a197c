"""Guests run through QEMU's spelling: `kvmpy run -enable-kvm -m 64 -kernel ... -device
isa-debug-exit,...` under KVM and the translator, QEMU's test devices driven by a guest
and compared with qemu-system-x86_64 on the same guest, -S, and the telnet serial console."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from conftest import KVM_SKIP_REASON, ROOT, guest_path, run_kvmpy, tool_required

ACCELS = [pytest.param("-enable-kvm", id="kvm"), pytest.param("tcg", id="tcg")]


def accel_args(accel: str) -> list[str]:
    if accel == "-enable-kvm":
        if KVM_SKIP_REASON:
            pytest.skip(KVM_SKIP_REASON)
        return ["-enable-kvm"]
    return ["-accel", "tcg"]


def guest_report_lines(stdout: bytes) -> list[str]:
    # Under QEMU, SeaBIOS's "Booting from ROM.." precedes the guest's first line on the same line.
    return re.findall(r"(?:pc-testdev|pci-testdev|testdev:|FAIL)[^\r\n]*", stdout.decode(errors="replace"))


QEMU_TEST_DEVICES = ["-device", "isa-debug-exit,iobase=0x501,iosize=2", "-device", "pc-testdev",
                "-device", "pci-testdev"]


@pytest.mark.parametrize("accel", ACCELS)
def test_test_devices_guest_exits_with_qemus_status(accel):
    r = run_kvmpy(["run", *accel_args(accel), "-m", "64", "-kernel", guest_path("qemu_testdev"),
                   "-append", "code=3", *QEMU_TEST_DEVICES], timeout=120)
    lines = guest_report_lines(r.stdout)
    assert r.returncode == (3 << 1) | 1, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "testdev: 0 failures, exit 3 through port 0x501" in lines
    assert "pci-testdev portio-no-eventfd: offset 131 data 0xfa width 1 count 16" in lines
    assert "pci-testdev mmio-datamatch-eventfd: offset 2050 data 0xfa width 1 count 0" in lines


def test_test_devices_same_as_qemu():
    qemu = tool_required("qemu-system-x86_64")
    if KVM_SKIP_REASON:
        pytest.skip(KVM_SKIP_REASON)
    args = ["-enable-kvm", "-m", "64", "-kernel", guest_path("qemu_testdev"), "-append", "code=1", *QEMU_TEST_DEVICES]
    theirs = subprocess.run([qemu, *args, "-nographic", "-nodefaults", "-serial", "stdio"], capture_output=True,
                            timeout=120, stdin=subprocess.DEVNULL)
    ours = run_kvmpy(["run", *args, "-nographic"], timeout=120)
    assert theirs.returncode == ours.returncode == 3, (theirs, ours)
    assert guest_report_lines(ours.stdout) == guest_report_lines(theirs.stdout)
    assert len(guest_report_lines(ours.stdout)) == 9


@pytest.mark.parametrize("accel", ACCELS)
def test_debug_exit_at_kvmpys_port_with_qemus_status(accel):
    """The test guests' own exit port, declared QEMU's way: status (code << 1) | 1."""
    r = run_kvmpy(["run", *accel_args(accel), "-m", "64", "-kernel", guest_path("exit"), "-append", "code=5",
                   "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-display", "none"], timeout=120)
    assert r.returncode == 11, r
    # without the device, kvmpy's own port passes the value through
    r = run_kvmpy(["run", *accel_args(accel), "-m", "64", "-kernel", guest_path("exit"), "-append", "code=5"])
    assert r.returncode == 5, r


@pytest.mark.parametrize("qmp", ["-qmp unix:{sock},server,nowait",
                                 "-chardev socket,id=m,path={sock},server=on,wait=off -mon chardev=m,mode=control"])
def test_start_paused_until_cont(tmp_path, qmp):
    if KVM_SKIP_REASON:
        pytest.skip(KVM_SKIP_REASON)
    sock = str(tmp_path / "qmp.sock")
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "kvmpy", "run", "-enable-kvm", "-S", "-m", "64", "-kernel",
                             guest_path("exit"), "-append", "code=9", *qmp.format(sock=sock).split()],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        client = socket.socket(socket.AF_UNIX)
        client.connect(sock)
        f = client.makefile("rw")

        def cmd(name):
            f.write(json.dumps({"execute": name}) + "\n")
            f.flush()
            while True:
                reply = json.loads(f.readline())
                if "event" not in reply:
                    return reply
        json.loads(f.readline())                       # greeting
        cmd("qmp_capabilities")
        time.sleep(0.5)
        assert proc.poll() is None                     # held: the guest would exit at once
        assert cmd("query-status")["return"]["status"] in ("paused", "prelaunch")
        cmd("cont")
        assert proc.wait(timeout=30) == 9
        client.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_telnet_serial_console_reaches_the_guest():
    if KVM_SKIP_REASON:
        pytest.skip(KVM_SKIP_REASON)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "kvmpy", "run", "-enable-kvm", "-m", "64", "-kernel",
                             guest_path("irq"), "-serial", f"telnet:127.0.0.1:{port},server,nowait,nodelay"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                client = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except ConnectionRefusedError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.05)
        got = b""
        while b"irq: ready" not in got:
            chunk = client.recv(4096)
            assert chunk, got
            got += chunk
        assert got.startswith(bytes([255, 251, 1]))     # the telnet greeting first
        client.sendall(b"x")
        while b"got: x" not in got:
            got += client.recv(4096)
        client.sendall(b"q")
        assert proc.wait(timeout=30) == 0
        client.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------ service mode

ARCHWIKI_LINE = ("-name vm1 -pidfile /var/run/qemu/vm1.pid -daemonize -nographic -enable-kvm -m 64 {disk} "
                 "-kernel {kernel} -net nic,macaddr=DE:AD:BE:EF:E0:00 -net tap,ifname=tap0 "
                 "-serial telnet:localhost:7000,server,nowait,nodelay "
                 "-monitor telnet:localhost:7100,server,nowait,nodelay -vnc :0")


def ide_missing_reason() -> str | None:
    from kvmpy.config import DiskConfig, VmConfig
    from kvmpy.errors import ConfigError
    from kvmpy.pc import pc_devices
    try:
        pc_devices(VmConfig(disks=[DiskConfig(path="x", interface="ide", index=0)]))
    except ConfigError as e:
        return f"no IDE controller in this kvmpy yet: {e}"
    return None


@pytest.mark.parametrize("disk", ["-hda {img}", "-drive file={img},format=raw,if=virtio"], ids=["hda", "virtio"])
def test_archwiki_service_line(tmp_path, netns, disk):
    """The ArchWiki page's qemu.conf line, unchanged but for the disk image path and a
    test kernel (there is no firmware to boot the disk yet), started by `kvmpy service`
    in a network namespace, reached through its telnet serial console, stopped by the
    page's haltcmd through the telnet monitor."""
    if KVM_SKIP_REASON:
        pytest.skip(KVM_SKIP_REASON)
    if disk.startswith("-hda") and ide_missing_reason():
        pytest.skip(ide_missing_reason())
    img = tmp_path / "vm1.img"
    img.write_bytes(b"\0" * (1 << 20))
    conf = tmp_path / "etc"
    conf.mkdir()
    line = ARCHWIKI_LINE.format(disk=disk.format(img=img), kernel=guest_path("acpi_power"))
    (conf / "qemu.conf").write_text(
        "# VMs that should be started on boot\nQEMU_MACHINES=(vm1)\n\nqemu_vm1_type=\"system-x86_64\"\n\n"
        f"qemu_vm1=\"{line}\"\n\n"
        "qemu_vm1_haltcmd=\"echo 'system_powerdown' | nc localhost 7100\" # or netcat/ncat\n")
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=ROOT)
    ns = ["ip", "netns", "exec", netns]
    subprocess.run([*ns, "ip", "link", "set", "lo", "up"], check=True)

    def service(*args):
        return subprocess.run([*ns, sys.executable, "-m", "kvmpy", "service", *args, "--config", str(conf),
                               "--run-dir", str(run)], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
    tool_required("nc")
    r = service("start")
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        assert "left out" not in r.stdout, "kvmpy serves -vnc itself"
        assert "vm1: started" in r.stdout
        assert subprocess.run([*ns, "ip", "link", "show", "tap0"], capture_output=True).returncode == 0
        console = subprocess.run([*ns, sys.executable, "-c", TELNET_READ], capture_output=True, timeout=60)
        assert b"acpi: waiting for power button" in console.stdout, console
        status = service("status")
        assert status.returncode == 0 and "running" in status.stdout, status.stdout
    finally:
        r = service("stop")
    assert r.returncode == 0 and "vm1: stopped (halt_command" in r.stdout, r.stdout + r.stderr
    assert not (run / "vm1.pid").exists()


TELNET_READ = """
import socket, sys, time
s = socket.create_connection(("localhost", 7000), timeout=20)
got = b""
while b"waiting for power button" not in got:
    chunk = s.recv(4096)
    if not chunk:
        break
    got += chunk
sys.stdout.buffer.write(got)
"""


# ------------------------------------------------------------------ multiboot

def multiboot_args(tmp_path, kernel: str) -> list[str]:
    (tmp_path / "mod1").write_bytes(b"module-one\n")
    (tmp_path / "mod2").write_bytes(b"second module")
    return ["-m", "64", "-kernel", guest_path(kernel), "-append", "mb=1 code=3",
            "-initrd", f"{tmp_path}/mod1 arg1 arg2,{tmp_path}/mod2",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=4"]


def multiboot_lines(stdout: bytes) -> list[str]:
    return re.findall(r"multiboot: [^\r\n]*", stdout.decode(errors="replace"))


@pytest.mark.parametrize("kernel", ["multiboot_aout", "multiboot_elf"])
@pytest.mark.parametrize("accel", ACCELS)
def test_multiboot_kernel(tmp_path, accel, kernel):
    r = run_kvmpy(["run", *accel_args(accel), *multiboot_args(tmp_path, kernel)], timeout=120)
    lines = multiboot_lines(r.stdout)
    assert r.returncode == 7, (r.returncode, lines, r.stderr[-2000:])
    assert lines == [
        "multiboot: magic 0x2badb002",
        "multiboot: cr0.pe 1 cr0.pg 0 eflags.if 0 eflags.vm 0",
        "multiboot: info flags have memory, cmdline, mods, mmap: 1",
        "multiboot: mem_lower in 639..640 1 mem_upper 64512",
        f"multiboot: cmdline \"{guest_path(kernel)} mb=1 code=3\"",
        "multiboot: modules 2",
        f"multiboot: module 0 page-aligned 1 after the kernel 1 size 11 cmdline \"{tmp_path}/mod1 arg1 arg2\" "
        "data \"module-one.\"",
        f"multiboot: module 1 page-aligned 1 after the kernel 1 size 13 cmdline \"{tmp_path}/mod2\" "
        "data \"second module\"",
        "multiboot: mmap has RAM under the kernel 1, RAM above 1 MiB (KiB, rounded to MiB) 64512",
        "multiboot: loader kvmpy",
        "multiboot: exit 3"], lines


@pytest.mark.parametrize("kernel", ["multiboot_aout", "multiboot_elf"])
def test_multiboot_kernel_same_as_qemu(tmp_path, kernel):
    """qemu-system-x86_64 -kernel boots the same kernel with the same modules the same way.
    What the firmware decides differs and is masked: SeaBIOS keeps the top of RAM for
    itself (mem_upper, the map's RAM total), and the loader's name."""
    qemu = tool_required("qemu-system-x86_64")
    if KVM_SKIP_REASON:
        pytest.skip(KVM_SKIP_REASON)
    args = ["-enable-kvm", *multiboot_args(tmp_path, kernel)]
    theirs = subprocess.run([qemu, *args, "-nographic", "-nodefaults", "-serial", "stdio"], capture_output=True,
                            timeout=120, stdin=subprocess.DEVNULL)
    ours = run_kvmpy(["run", *args, "-nographic"], timeout=120)
    assert theirs.returncode == ours.returncode == 7, (theirs, ours)

    def masked(lines):
        return [re.sub(r"(mem_upper|rounded to MiB\)) \d+", r"\1 N", ln) for ln in lines
                if not ln.startswith("multiboot: loader")]
    assert masked(multiboot_lines(ours.stdout)) == masked(multiboot_lines(theirs.stdout))
    assert len(multiboot_lines(ours.stdout)) == 11


def test_log_file_takes_the_trace(tmp_path):
    """-d exits -D FILE: the exit trace goes to the file, the guest's console stays on stdout."""
    log = tmp_path / "trace.log"
    r = run_kvmpy(["run", "-accel", "tcg", "-m", "64", "-kernel", guest_path("exit"), "-append", "code=4",
                   "-d", "exits", "-D", str(log)], timeout=120)
    assert r.returncode == 4, r
    assert b"exit code: 4" in r.stdout and b"trace:" not in r.stderr
    text = log.read_text()
    assert "trace: vcpu0 io out port=0x00f4 size=4 value=0x4 " in text, text[-2000:]


@pytest.mark.parametrize("spelling", ["-snapshot -drive file={img},format=raw,if=virtio",
                                      "-drive file={img},format=raw,if=virtio,snapshot=on"])
def test_snapshot_leaves_the_image_alone(tmp_path, spelling):
    """-snapshot: the guest writes and reads back its pattern, the image stays as it was,
    and no overlay is left in $TMPDIR."""
    img = tmp_path / "base.img"
    img.write_bytes(bytes(range(256)) * 8192)        # 2 MiB
    before = img.read_bytes()
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    r = run_kvmpy(["run", "-accel", "tcg", "-m", "64", "-kernel", guest_path("virtio_blk"),
                   "-append", "sector=2048 bytes=32768", *spelling.format(img=img).split()],
                  timeout=120, env={"TMPDIR": str(tmpdir)})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert b"virtio-blk: pattern ok" in r.stdout
    assert img.read_bytes() == before
    assert list(tmpdir.iterdir()) == []
    # without it, the same run changes the image: the test above can fail
    r = run_kvmpy(["run", "-accel", "tcg", "-m", "64", "-kernel", guest_path("virtio_blk"),
                   "-append", "sector=2048 bytes=32768", "-drive", f"file={img},format=raw,if=virtio"], timeout=120)
    assert r.returncode == 0 and img.read_bytes() != before
