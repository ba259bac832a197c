"""What the nested-L1 checks read off a run: bench/boot_phases.py's console timeline
(marks, the kernel's printk times, the exit) and bench/virtio.py's ring error lines,
the latter from the very log line the virtio-net model writes when a driver's avail
idx jumps."""

from __future__ import annotations

import os
import sys

import pytest

from bench import boot_phases
from bench.virtio import RING_ERROR_MARKS, ring_error_lines


def test_timeline_stamps_marks_printk_times_and_exit():
    script = ("import sys, time\n"
              "sys.stderr.write('warning first\\n'); sys.stderr.flush(); time.sleep(0.2)\n"
              "print('[    0.000000] Linux version 6.1', flush=True); time.sleep(0.3)\n"
              "print('[    1.250000] Run /init as init process', flush=True); time.sleep(0.2)\n"
              "print('Run /init again', flush=True)\n")
    t = boot_phases.timeline([sys.executable, "-c", script], (b"Linux version", b"Run /init", b"never"),
                             lines_after=b"Run /init")
    assert t["first"] < t["Linux version"] < t["Run /init"] <= t["exit"]
    # the sleeps between the lines, give or take a loaded host's scheduling
    assert t["Linux version"] - t["first"] >= 0.15
    assert t["Run /init"] - t["Linux version"] >= 0.25
    assert t["printk Linux version"] == 0.0
    assert t["printk Run /init"] == 1.25      # the first line with the mark, not the later one
    assert "never" not in t and "printk never" not in t
    assert [text for _, text in t["lines"]] == ["[    1.250000] Run /init as init process", "Run /init again"]
    assert boot_phases._longest_gaps(t["lines"]).endswith(" s before 'Run /init again'")


def test_longest_gaps_are_the_longest_first():
    lines = [(0.0, "a"), (0.5, "b"), (0.6, "c"), (2.6, "d")]
    assert boot_phases._longest_gaps(lines, 2) == "2.00 s before 'd', 0.50 s before 'b'"


def test_timeline_of_a_process_that_outlives_its_timeout_ends_it():
    t = boot_phases.timeline([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
                             (b"up",), timeout=1.0)
    assert t["up"] < 1.0 <= t["exit"] < 30


def test_ring_error_lines_catch_the_guests_and_linuxs_lines_only():
    guest = "virtio: device needs reset (queue 0: avail idx 56, used idx 1, last used 1)"
    linux = "[   12.3] virtio_net virtio0: output.0:id 7 is not a head!"
    text = "\n".join(["virtio-net: rxflood 20000 frames cycles 123", guest, "  " + linux + "\r", "guest: done"])
    assert ring_error_lines(text) == [guest, linux]
    assert set(RING_ERROR_MARKS) == {"avail idx jumped", "is not a head", "needs reset"}


def test_the_benchs_kvmpy_has_no_nic_where_qemus_has_none(tmp_path):
    """QEMU runs the test guests with -nodefaults; kvmpy without a NIC option adds QEMU's
    default user-mode NIC, whose start-up the boot rows would then count on kvmpy's side
    only. The rows that name a NIC keep theirs alone."""
    from bench import boot, kvm, virtio
    from kvmpy.cli import build_parser
    pytest.importorskip("kvmpy.net.slirp", reason="no libslirp here: kvmpy adds no default NIC to leave out")
    from kvmpy.runcmd import build_config

    def nics(argv: list[str]) -> list:
        assert argv[1:4] == ["-m", "kvmpy", "run"]
        return build_config(build_parser().parse_args(argv[3:])).nets

    hello = os.path.join(virtio.BUILD, "hello.elf")
    image = tmp_path / "d.raw"
    image.write_bytes(bytes(1 << 20))
    assert nics(kvm._kvmpy(hello, "")) == []
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel.write_bytes(b"not read here")
    initrd.write_bytes(b"not read here")
    assert nics(boot.kvmpy_argv(str(kernel), str(initrd))) == []
    assert nics(kvm._kvmpy(hello, "testdev=1", "pci-testdev")) == []
    assert nics(virtio._kvmpy_cmd("virtio_blk", "reads=1", ["--drive", f"file={image},format=raw"])) == []
    net, = nics(virtio._kvmpy_net_cmd("flood", 1, "python", "off"))
    assert (net.type, net.bridge, net.dataplane) == ("tap", "kbr0", "python")
