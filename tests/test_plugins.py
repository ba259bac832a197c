"""Plug-in devices: a class outside kvmpy, named in vm.toml or by --device, placed
in the machine's table and served on guest exits like kvmpy's own devices."""

import os
import sys
import textwrap

import pytest

from conftest import KVM_SKIP_REASON, ROOT, guest_path, run_kvmpy

DEBUGCON = os.path.join(ROOT, "examples", "plugins", "debugcon.py")
ACCELS = ["tcg", pytest.param("kvm", marks=pytest.mark.skipif(bool(KVM_SKIP_REASON),
                                                               reason=KVM_SKIP_REASON or ""))]


def _accel_args(accel):
    return ["--enable-kvm"] if accel == "kvm" else ["--accel", "tcg"]


@pytest.mark.parametrize("accel", ACCELS)
def test_port_device_from_the_command_line(tmp_path, accel):
    out = tmp_path / "debugcon.txt"
    p = run_kvmpy(["run", *_accel_args(accel), "--kernel", guest_path("debugcon"), "-m", "64M",
                   "--device", f"{DEBUGCON}:DebugCon,path={out}"])
    assert p.returncode == 0, p.stderr.decode()
    assert b"debugcon probe at 0xe9: 0xe9" in p.stdout
    assert out.read_bytes() == b"hello through a plug-in port device\n"


def test_port_device_from_vm_toml_moved_and_bounded(tmp_path):
    # A relative file.py path resolves against the vm.toml's directory, options pass through.
    plug = tmp_path / "plug"
    plug.mkdir()
    (plug / "dc.py").write_text(open(DEBUGCON).read())
    (tmp_path / "vm.toml").write_text(textwrap.dedent(f"""
        kernel = "{guest_path('debugcon')}"
        memory = "64M"
        cmdline = "iobase=1026"
        [[device]]
        type = "plug/dc.py:DebugCon"
        id = "dbg"
        iobase = 0x402
        path = "{tmp_path / 'out.txt'}"
        max_bytes = 5
        """))
    p = run_kvmpy(["run", "--accel", "tcg", str(tmp_path / "vm.toml")])
    assert p.returncode == 0, p.stderr.decode()
    assert b"debugcon probe at 0x402: 0xe9" in p.stdout
    assert (tmp_path / "out.txt").read_bytes() == b"hello"      # max_bytes: the guest cannot fill the disk


def test_a_device_without_the_plugin_at_its_port(tmp_path):
    p = run_kvmpy(["run", "--accel", "tcg", "--kernel", guest_path("debugcon"), "-m", "64M"])
    assert p.returncode == 3                     # the guest probes 0xff: no device
    assert b"debugcon probe at 0xe9: 0xff" in p.stdout


def test_entry_point(tmp_path):
    """A package that installs a device declares an entry point in group kvmpy.devices."""
    site = tmp_path / "site"
    pkg = site / "kvmpy_debugcon"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(open(DEBUGCON).read())
    dist = site / "kvmpy_debugcon-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kvmpy-debugcon\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[kvmpy.devices]\ndebugcon = kvmpy_debugcon:DebugCon\n")
    out = tmp_path / "o.txt"
    p = run_kvmpy(["run", "--accel", "tcg", "--kernel", guest_path("debugcon"), "-m", "64M",
                   "--device", f"debugcon,path={out}"], env={"PYTHONPATH": f"{ROOT}{os.pathsep}{site}"})
    assert p.returncode == 0, p.stderr.decode()
    assert out.read_bytes() == b"hello through a plug-in port device\n"


BAD_CLASSES = {
    "no_bus": ("class D:\n    def __init__(self, ctx): pass\n", "declares no 'bus'"),
    "wrong_slot": ("from kvmpy.devices.bus import MmioSlot\n"
                   "class D:\n    bus = 'pio'\n"
                   "    @classmethod\n    def place(cls, o): return (MmioSlot(0xd0000000, 16),)\n"
                   "    def __init__(self, ctx): pass\n", "must give PortSlots"),
    "overlap": ("from kvmpy.devices.bus import PortSlot\n"
                "class D:\n    bus = 'pio'\n"
                "    @classmethod\n    def place(cls, o): return (PortSlot(0x3fc, 2),)\n"
                "    def __init__(self, ctx): pass\n", "overlaps 'serial0'"),
    "bad_option": ("from kvmpy.devices.bus import PortSlot\n"
                   "class D:\n    bus = 'pio'\n"
                   "    @classmethod\n    def place(cls, o): return (PortSlot(int(o['iobase']), 1),)\n"
                   "    def __init__(self, ctx): pass\n", "missing option 'iobase'"),
    "raises_in_import": ("raise RuntimeError('boom')\n", "RuntimeError: boom"),
    "port_past_64k": ("from kvmpy.devices.bus import PortSlot\n"
                      "class D:\n    bus = 'pio'\n"
                      "    @classmethod\n    def place(cls, o): return (PortSlot(0xfffe, 4),)\n"
                      "    def __init__(self, ctx): pass\n", "is not a range of the pio space"),
    "negative_port": ("from kvmpy.devices.bus import PortSlot\n"
                      "class D:\n    bus = 'pio'\n"
                      "    @classmethod\n    def place(cls, o): return (PortSlot(-1, 1),)\n"
                      "    def __init__(self, ctx): pass\n", "is not a range of the pio space"),
    "bad_irq": ("from kvmpy.devices.bus import PortSlot\n"
                "class D:\n    bus = 'pio'\n"
                "    @classmethod\n    def place(cls, o): return (PortSlot(0x510, 1, irq=99),)\n"
                "    def __init__(self, ctx): pass\n", "IRQ 99 is not a GSI"),
}


@pytest.mark.parametrize("case", sorted(BAD_CLASSES))
def test_bad_plugins_are_one_line_and_status_2(tmp_path, case):
    source, message = BAD_CLASSES[case]
    (tmp_path / "bad.py").write_text(source)
    p = run_kvmpy(["run", "--accel", "tcg", "--kernel", guest_path("hello"), "-m", "64M",
                   "--device", f"{tmp_path / 'bad.py'}:D"])
    err = p.stderr.decode()
    assert p.returncode == 2, err
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("spec, message", [
    ("nosuch.module:X", "cannot import 'nosuch.module'"),
    ("os:NoSuchClass", "has no class 'NoSuchClass'"),
    ("no-entry-point", "no device 'no-entry-point'"),
    ("/nonexistent/x.py:X", "no such file"),
    (",path=x", "missing the device type"),
])
def test_bad_device_types(spec, message):
    p = run_kvmpy(["run", "--accel", "tcg", "--kernel", guest_path("hello"), "-m", "64M", "--device", spec])
    assert p.returncode == 2
    assert message in p.stderr.decode()


def test_vm_toml_device_without_type(tmp_path):
    (tmp_path / "vm.toml").write_text(f'kernel = "{guest_path("hello")}"\n[[device]]\npath = "x"\n')
    p = run_kvmpy(["run", "--accel", "tcg", str(tmp_path / "vm.toml")])
    assert p.returncode == 2
    assert "[[device]] #1: missing key 'type'" in p.stderr.decode()
