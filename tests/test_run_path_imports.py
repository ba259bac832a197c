"""A VM imports the virtio modules only where it has a virtio device: a sandboxed VM
can import nothing once it runs, so whatever it asks of its virtio transports later
(pause and cont holding their native data planes, announce-self, query-iothreads)
must be found while it is built. Fresh interpreters, the translator (no KVM needed)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, guest_path

pytest.importorskip("kvmpy._tcg", reason="the translator is not built (make build)")

PROBE = """
import json, sys
from kvmpy.config import DiskConfig, VmConfig
from kvmpy.machine import Machine, virtio_transports
disks = [DiskConfig(path=p) for p in sys.argv[2:]]
m = Machine(VmConfig(accel="tcg", memory=64 << 20, kernel=sys.argv[1], disks=disks, default_nic=False))
try:
    print(json.dumps({"virtio_loaded": "kvmpy.devices.virtio.pci" in sys.modules,
                      "transports": [p.entry.name for p in virtio_transports(m.devices.placed)],
                      "iothreads": m.iothreads()}))
finally:
    m.close()
"""


def _probe(*disks: str) -> dict:
    p = subprocess.run([sys.executable, "-c", PROBE, guest_path("hello"), *disks], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_a_vm_without_virtio_devices_loads_no_virtio_module():
    assert _probe() == {"virtio_loaded": False, "transports": [], "iothreads": []}


def test_a_vm_with_a_virtio_disk_finds_its_transport_while_it_is_built(tmp_path):
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(1 << 20))
    found = _probe(str(disk))
    assert found["virtio_loaded"] and len(found["transports"]) == 1, found


PARSE_PROBE = """
import json, sys
from kvmpy.cli import build_parser
args = build_parser(sys.argv[1:], all_commands=False).parse_args(sys.argv[1:])
print(json.dumps({"command": args.command, "shutil_loaded": "shutil" in sys.modules}))
"""


def test_parsing_a_run_command_line_imports_no_shutil():
    """argparse's help formatter imports shutil (and zlib, bz2, lzma) for the terminal's
    width at every add_argument unless it is given one: kvmpy's parser gives it."""
    p = subprocess.run([sys.executable, "-c", PARSE_PROBE, "run", "--enable-kvm", "--kernel", "k", "-m", "64"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == {"command": "run", "shutil_loaded": False}


@pytest.mark.parametrize("columns", [None, "100", "0", "-3", "wide"])
def test_the_help_width_is_argparses_own(monkeypatch, columns):
    import shutil

    from kvmpy.cli import _help_width
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    assert _help_width() == shutil.get_terminal_size().columns - 2
