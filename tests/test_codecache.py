"""The build's record of what @dataclass compiles (kvmpy/_codecache.py): with it, the
modules `kvmpy run` imports compile nothing at import, and their classes behave as
compiled ones; a cache that is missing, foreign or corrupt changes nothing but time."""

from __future__ import annotations

import os
import subprocess
import sys

import kvmpy
from kvmpy import _codecache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(kvmpy.__file__)))
PACKAGE = os.path.dirname(os.path.abspath(kvmpy.__file__))
RUN_PATH = "import kvmpy.machine, kvmpy.runcmd, kvmpy.console, kvmpy.hv.kvm.accel, kvmpy.devices.ide"
# What the run path's dataclasses make, printed the same way in every process.
BEHAVIOUR = """
import dataclasses
from kvmpy.config import VmConfig, DiskConfig
from kvmpy.devices.virtio.queue import QueueState
cfg = VmConfig()
print(repr(DiskConfig(path="d.img")))
print(DiskConfig(path="a") == DiskConfig(path="a"), DiskConfig(path="a") == DiskConfig(path="b"))
print(cfg.memory, cfg.cpus, cfg == VmConfig())
fields = [f.name for f in dataclasses.fields(QueueState)]
state = QueueState(**{name: 0 for name in fields})
print(repr(state), hash(state) == hash(QueueState(**{name: 0 for name in fields})))
try:
    state.size = 5
except dataclasses.FrozenInstanceError as e:
    print("frozen:", e)
"""


def _python(code: str) -> str:
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def test_the_run_path_compiles_nothing_with_a_recorded_cache(tmp_path):
    cache = str(tmp_path / "dataclass-code.marshal")
    recorded = int(_python(f"import kvmpy._codecache as c; print(c.build({PACKAGE!r}, {cache!r}))"))
    assert recorded > 200
    out = _python(f"import kvmpy._codecache as c; c.install({cache!r}); {RUN_PATH}; print(c.compiled)")
    assert int(out) == 0
    # Without it, the same imports compile every method themselves.
    out = _python(f"import kvmpy._codecache as c; c.install({str(tmp_path / 'none')!r}); {RUN_PATH}; "
                  "print(c.compiled)")
    assert int(out) > 200


def test_classes_from_the_cache_behave_as_compiled_ones(tmp_path):
    cache = str(tmp_path / "dataclass-code.marshal")
    _python(f"import kvmpy._codecache as c; c.build({PACKAGE!r}, {cache!r})")
    cached = _python(f"import kvmpy._codecache as c; c.install({cache!r})\n{BEHAVIOUR}\nprint(c.compiled)")
    compiled = _python(f"import kvmpy._codecache as c; c.install({str(tmp_path / 'none')!r})\n{BEHAVIOUR}")
    *lines, count = cached.splitlines()
    assert int(count) == 0, "the classes came from the cache"
    assert lines == compiled.splitlines()
    assert "frozen: cannot assign to field 'size'" in compiled


def test_a_corrupt_or_foreign_cache_is_ignored(tmp_path):
    for content in (b"", b"\x00garbage", b"\xe3" * 64):
        bad = tmp_path / "bad.marshal"
        bad.write_bytes(content)
        out = _python(f"import kvmpy._codecache as c; c.install({str(bad)!r})\n{BEHAVIOUR}\nprint(c.compiled)")
        assert int(out.splitlines()[-1]) > 0 and "frozen:" in out


def test_a_damaged_entry_is_compiled_instead(tmp_path):
    import marshal
    cache = str(tmp_path / "dataclass-code.marshal")
    _python(f"import kvmpy._codecache as c; c.build({PACKAGE!r}, {cache!r})")
    with open(cache, "rb") as f:
        entries = marshal.load(f)
    damaged = {text: (b"\xff" + blob[1:] if i % 2 else marshal.dumps(("not", "code"))) for i, (text, blob)
               in enumerate(entries.items())}
    with open(cache, "wb") as f:
        marshal.dump(damaged, f)
    out = _python(f"import kvmpy._codecache as c; c.install({cache!r})\n{BEHAVIOUR}\nprint(c.compiled)")
    compiled = _python(f"import kvmpy._codecache as c; c.install({str(tmp_path / 'none')!r})\n{BEHAVIOUR}")
    assert out.splitlines()[:-1] == compiled.splitlines() and int(out.splitlines()[-1]) > 0


def test_a_class_the_cache_does_not_know_is_compiled_as_before():
    import dataclasses
    before = _codecache.compiled

    @dataclasses.dataclass(frozen=True)
    class NotInAnyBuild:
        kvmpy_test_field_that_no_module_has: int = 7

    assert NotInAnyBuild() == NotInAnyBuild(7) and repr(NotInAnyBuild()).endswith("has=7)")
    assert _codecache.compiled > before


def test_the_in_place_build_wrote_the_cache():
    # setup.py's build_ext --inplace (make's build) records it beside the bytecode.
    assert os.path.exists(_codecache.CACHE_FILE), f"{_codecache.CACHE_FILE}: run `make` (or setup.py build_ext --inplace)"
    assert any(name.startswith("machine.") and name.endswith(".pyc")
               for name in os.listdir(os.path.join(PACKAGE, "__pycache__"))), "the build compiled no bytecode"
