"""`kvmpy run --enable-kvm` end to end: real /dev/kvm, the test guests, the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, guest_path, run_kvmpy

pytestmark = pytest.mark.usefixtures("kvm_required")


def test_hello_guest_prints_and_exits_zero():
    p = run_kvmpy(["run", "--enable-kvm", "-m", "128", "--kernel", guest_path("hello"),
                   "--append", "console=ttyS0 marker=abc123"])
    out = p.stdout.decode()
    assert p.returncode == 0, p.stderr.decode()
    assert "Hello from kvmpy test guest" in out
    assert "cmdline: console=ttyS0 marker=abc123" in out
    assert "total ram: " in out and "(127 MiB)" in out
    assert out.rstrip().endswith("guest: done")


def test_exit_status_comes_from_the_guest():
    p = run_kvmpy(["run", "--enable-kvm", "--kernel", guest_path("exit"), "--append", "code=7"])
    assert p.returncode == 7
    assert "guest: exit 7" in p.stdout.decode()


@pytest.mark.parametrize("cpus", [2, 4])
def test_smp_guest_sees_every_vcpu(cpus):
    p = run_kvmpy(["run", "--enable-kvm", "--smp", str(cpus), "--kernel", guest_path("smp")], timeout=120)
    out = p.stdout.decode()
    assert p.returncode == 0, out + p.stderr.decode()
    assert f"madt: {cpus} cpus" in out
    for i in range(cpus):
        assert f"cpu {i} online" in out
    assert f"cpus online: {cpus}" in out


def test_vm_toml_with_relative_paths(tmp_path):
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(open(guest_path("hello"), "rb").read())
    cfg = tmp_path / "vm.toml"
    cfg.write_text('name = "t1"\naccel = "kvm"\nmemory = "64M"\ncpus = 1\nkernel = "k.elf"\n'
                   'cmdline = "from-toml"\nserial = "stdio"\n')
    p = run_kvmpy(["run", str(cfg)])
    assert p.returncode == 0, p.stderr.decode()
    assert "cmdline: from-toml" in p.stdout.decode()
    assert "(63 MiB)" in p.stdout.decode()


def test_i8042_reset_reboots_the_guest():
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "kvmpy", "run", "--enable-kvm", "--kernel", guest_path("reboot")],
                            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    seen = b""
    deadline = time.monotonic() + 60
    try:
        while seen.count(b"rebooting") < 3 and time.monotonic() < deadline:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            seen += chunk
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(20)
    assert seen.count(b"rebooting") >= 3, seen
    assert b"reboot failed" not in seen
    assert proc.returncode == 0


def test_no_reboot_exits_on_reset():
    p = run_kvmpy(["run", "--enable-kvm", "--no-reboot", "--kernel", guest_path("reboot")])
    assert p.returncode == 0
    assert p.stdout.decode().count("rebooting") == 1


def test_serial_to_file(tmp_path):
    log = tmp_path / "serial.log"
    p = run_kvmpy(["run", "--enable-kvm", "--serial", f"file:{log}", "--kernel", guest_path("hello")])
    assert p.returncode == 0
    assert p.stdout == b""
    assert "guest: done" in log.read_text()


def test_emulation_failure_is_one_clear_line_or_passes():
    """int3 under a software-nested KVM fails to emulate; on real VT-x/SVM the guest passes.
    Either way: no traceback, and a failure names the instruction bytes."""
    p = run_kvmpy(["run", "--enable-kvm", "--kernel", guest_path("fault")])
    err = p.stderr.decode()
    assert "Traceback" not in err
    if p.returncode != 0:
        assert "emulation failure" in err and "instruction bytes cc" in err
    else:
        assert "guest: done" in p.stdout.decode()


def test_uart_rx_interrupts_through_the_in_kernel_ioapic():
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "kvmpy", "run", "--enable-kvm", "--kernel", guest_path("irq")],
                            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = b""
    deadline = time.monotonic() + 30
    while b"irq: ready" not in out and time.monotonic() < deadline:
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            break
        out += chunk
    proc.stdin.write(b"xy")
    proc.stdin.flush()
    time.sleep(0.3)
    proc.stdin.write(b"q")
    proc.stdin.flush()
    proc.wait(30)
    out += proc.stdout.read()
    err = proc.stderr.read()
    proc.stdin.close()
    assert proc.returncode == 0, err
    text = out.decode()
    assert "got: x" in text and "got: y" in text and "got: q" in text
    assert "uart interrupts" in text


def test_pit_ticks_reach_the_guest_through_gsi_2():
    p = run_kvmpy(["run", "--enable-kvm", "--kernel", guest_path("irq"), "--append", "pit=1"])
    assert p.returncode == 0, p.stderr.decode()
    assert "pit ticks: 10" in p.stdout.decode()


def _exit_bzimage(status: int) -> bytes:
    """The smallest bzImage the loader takes (protocol 2.15, 64-bit entry) whose 64-bit
    entry (payload + 0x200) writes ``status`` to the exit port: a Linux-kind kernel that
    ends at once, so the check is exercised without a real kernel's minutes on kvm_pvm."""
    import struct
    setup_sects = 4
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x1FE:0x200] = b"\x55\xaa"
    setup[0x200:0x202] = b"\xeb\x6a"
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x20F)
    setup[0x211] = 0x01                              # LOADED_HIGH
    struct.pack_into("<H", setup, 0x236, 0x1)        # XLF_KERNEL_64
    struct.pack_into("<I", setup, 0x238, 2047)
    struct.pack_into("<I", setup, 0x260, 0x10000)
    payload = bytearray(0x1000)
    payload[0x200:0x208] = bytes([0xB0, status, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD, 0x90])  # mov al; out 0xf4; hlt; jmp
    return bytes(setup) + bytes(payload)


SOFTWARE_NESTED = os.path.isdir("/sys/module/kvm_pvm")


@pytest.mark.guest
def test_linux_kernel_on_software_nested_kvm_is_refused_unless_forced(tmp_path):
    """A bzImage under --enable-kvm on kvm_pvm: one line and status 2 at once (not minutes
    of silent 100% CPU); with kvm,force=on the warning stays and the kernel runs."""
    if not SOFTWARE_NESTED:
        pytest.skip("host KVM is not software-nested (no kvm_pvm): nothing to refuse here")
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(_exit_bzimage(5))
    start = time.monotonic()
    p = run_kvmpy(["run", "--enable-kvm", "-m", "64", "--kernel", str(kernel)])
    err = p.stderr.decode().strip()
    assert p.returncode == 2, err
    assert time.monotonic() - start < 30
    assert err.splitlines() == [err] and "Traceback" not in err
    assert err.startswith("kvmpy: KVM here is software-nested (kvm_pvm): Linux will run slowly or fail; "
                          "use the translator (--accel tcg) or --accel auto")
    assert "--accel kvm,force=on" in err
    assert p.stdout == b""

    # the same refusal from vm.toml's accel
    cfg = tmp_path / "vm.toml"
    cfg.write_text('accel = "kvm"\nmemory = "64M"\nkernel = "bzImage"\n')
    p = run_kvmpy(["run", str(cfg)])
    assert p.returncode == 2 and b"software-nested" in p.stderr

    for args in (["run", "--accel", "kvm,force=on", "-m", "64", "--kernel", str(kernel)],
                 ["run", "--enable-kvm", "--accel", "kvm,force=on", "-m", "64", "--kernel", str(kernel)]):
        p = run_kvmpy(args)
        err = p.stderr.decode()
        assert p.returncode == 5, err        # the kernel really ran under KVM and wrote the port
        assert "software-nested (kvm_pvm)" in err and "force=on" in err
    cfg.write_text('accel = "kvm,force=on"\nmemory = "64M"\nkernel = "bzImage"\n')
    p = run_kvmpy(["run", str(cfg)])
    assert p.returncode == 5, p.stderr.decode()


@pytest.mark.guest
def test_linux_kernel_is_not_refused_where_kvm_is_hardware(tmp_path):
    if SOFTWARE_NESTED:
        pytest.skip("host KVM is software-nested (kvm_pvm): the refusal test covers it")
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(_exit_bzimage(5))
    p = run_kvmpy(["run", "--enable-kvm", "-m", "64", "--kernel", str(kernel)])
    assert p.returncode == 5, p.stderr.decode()
    assert b"software-nested" not in p.stderr


@pytest.mark.guest
def test_pvh_guest_on_software_nested_kvm_is_not_refused():
    p = run_kvmpy(["run", "--enable-kvm", "--kernel", guest_path("exit"), "--append", "code=3"])
    assert p.returncode == 3, p.stderr.decode()
    assert b"software-nested" not in p.stderr


def test_bad_accel_options_are_one_line_and_exit_2():
    for spec, needle in (("kvm,force=maybe", "force=maybe"), ("tcg,force=on", "kvm only"),
                         ("xen", "'xen'"), ("kvm,turbo=on", "turbo=on")):
        p = run_kvmpy(["run", "--accel", spec, "--kernel", guest_path("hello")])
        err = p.stderr.decode().strip()
        assert p.returncode == 2, err
        assert len(err.splitlines()) == 1 and needle in err, err
