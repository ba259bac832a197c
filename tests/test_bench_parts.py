"""bench/parts.py: every benchmark part runs in a session of its own with a deadline,
so a part that hangs is killed with everything it started and reported as a row,
and the run goes on; bench.nested keeps a journal of finished parts so an L1 that
stalls is followed by one that starts where it stopped. And `selftest nested -q`
writes the command's output as it comes."""

from __future__ import annotations

import json
import os
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bench.nested
import bench.parts
from bench.parts import Part, run_part
from conftest import TESTS_DIR
from kvmpy.tools import nested

SUPPORT = "support.bench_parts"


@pytest.fixture(autouse=True)
def support_importable(monkeypatch):
    """The parts' child processes import the test parts from tests/support."""
    monkeypatch.setenv("PYTHONPATH", TESTS_DIR)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_part_returns_its_rows_and_says_so(capfd):
    rows = run_part(Part("three rows", SUPPORT, "rows", (3,), 60))
    assert [r["name"] for r in rows] == ["row 0", "row 1", "row 2"]
    err = capfd.readouterr().err
    assert "bench: three rows ... (limit 60 s)" in err
    assert "bench: three rows done in" in err and "(3 rows)" in err


def test_a_hanging_part_is_killed_at_its_deadline_with_its_children(tmp_path, capfd):
    marker = str(tmp_path / "cleaned")
    start = time.monotonic()
    rows = run_part(Part("hangs", SUPPORT, "hangs", (marker,), 3))
    assert time.monotonic() - start < 3 + bench.parts.GRACE
    assert len(rows) == 1 and rows[0]["name"] == "hangs (timed out)", rows
    assert rows[0]["kvmpy"] is None and "killed after 3 s" in rows[0]["note"]
    # what it was waiting on, named in the row and in the progress line
    assert "sleep 1000" in rows[0]["note"]
    assert "hangs TIMED OUT after 3 s; still running:" in capfd.readouterr().err
    # SIGTERM first: the part's finally ran (a bench cleans up namespaces and guests there)
    with open(marker) as f:
        assert f.read() == "cleaned up"
    with open(marker + ".pid") as f:
        assert not _alive(int(f.read()))


def test_a_child_that_ignores_sigterm_gets_sigkill(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.parts, "GRACE", 2.0)
    pid_file = str(tmp_path / "pid")
    rows = run_part(Part("stubborn", SUPPORT, "ignores_sigterm", (pid_file,), 2))
    assert rows[0]["name"] == "stubborn (timed out)"
    with open(pid_file) as f:
        pid = int(f.read())
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


@pytest.mark.parametrize("function", ["fails", "exits_quietly"])
def test_a_broken_part_is_one_failed_row(function, capfd):
    rows = run_part(Part("broken", SUPPORT, function, (), 60))
    assert [r["name"] for r in rows] == ["broken (failed)"]
    assert "bench: broken failed" in capfd.readouterr().err


def test_the_nested_journal_resumes_after_a_stalled_l1(tmp_path, monkeypatch):
    """A part an earlier L1 finished is not run again; one that was running when an
    L1 stalled runs once more; one that two L1s stalled in is reported, not run."""
    share = str(tmp_path)
    parts = [Part("done before", SUPPORT, "rows", (1,), 60), Part("stalled once", SUPPORT, "rows", (2,), 60),
             Part("stalled twice", SUPPORT, "rows", (3,), 60)]
    monkeypatch.setattr(bench.nested, "_area_parts", lambda share, area: parts)
    earlier = [{"part": "done before", "started": True},
               {"part": "done before", "rows": [{"name": "L1 kept", "kvmpy": 1, "qemu": 1, "unit": "x"}]},
               {"part": "stalled once", "started": True},
               {"part": "stalled twice", "started": True}, {"part": "stalled twice", "started": True}]
    with open(os.path.join(share, bench.nested.ROWS_FILE), "w") as f:
        f.write("".join(json.dumps(e) + "\n" for e in earlier) + '{"part": "torn wri')
    bench.nested._inside(share, ["kvm"])
    names = [row["name"] for entry in bench.nested._journal(share) for row in entry["rows"]]
    assert names == ["L1 kept", "L1 row 0", "L1 row 1", "L1 stalled twice (stalled the L1 twice)"]


CONSOLE_LINES = st.lists(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r"),
                                  max_size=20), max_size=6)


@settings(max_examples=int(os.environ.get("KVMPY_FUZZ") and 500 or 60), deadline=None)
@given(before=CONSOLE_LINES, output=CONSOLE_LINES, cuts=st.lists(st.integers(0, 400), max_size=8),
       tail=st.booleans())
def test_quiet_output_streams_the_command_output_however_the_console_is_cut(before, output, cuts, tail):
    """-q shows the command's lines between the begin mark and the exit line, as the
    chunks arrive, whatever the chunk boundaries."""
    output = [line for line in output if not line.startswith(nested.MARK)]
    console = "".join(line + "\n" for line in before) + nested.BEGIN_MARK + "\n" + \
        "".join(line + "\n" for line in output) + (f"{nested.MARK} run exit 0\n" if tail else "")

    class Sink:
        text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

    sink = Sink()
    shown = nested.CommandOutput(sink)
    edges = sorted({min(c, len(console)) for c in cuts} | {0, len(console)})
    for a, b in zip(edges, edges[1:]):
        shown.feed(console[a:b])
    shown.close()
    assert sink.text == "".join(line + "\n" for line in output)


def test_quiet_output_before_the_begin_mark_is_not_shown():
    class Sink:
        text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

    sink = Sink()
    shown = nested.CommandOutput(sink)
    shown.feed("L1 booting\nkvmpy-nested: ready\n")
    shown.close()
    assert sink.text == "" and not shown.begun


def test_the_l1_cpu_state_comes_from_a_real_qemu_monitor(tmp_path):
    """What a stalled L1's report carries: QEMU's own view of the vCPU and its LAPIC."""
    import shutil
    import subprocess
    if not shutil.which(nested.QEMU):
        pytest.skip(f"{nested.QEMU} is not installed")
    sock = str(tmp_path / "monitor.sock")
    qemu = subprocess.Popen([nested.QEMU, "-accel", "tcg", "-nodefaults", "-display", "none", "-S",
                             "-monitor", f"unix:{sock},server=on,wait=off"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.05)
        state = nested.l1_cpu_state(sock)
    finally:
        qemu.kill()
        qemu.wait()
    # a CPU held at reset (-S): real mode at the reset vector, not halted
    assert "EIP=0000fff0" in state and "HLT=0" in state, state
    assert "LVT0" in state and "pic0:" in state, state
    assert "\x1b" not in state and "(qemu)" not in state
    assert nested.l1_cpu_state(str(tmp_path / "no-such.sock")) == ""


def test_every_bench_part_names_a_function_its_child_can_import(tmp_path):
    """A part's module is named as the child imports it: "bench.nested", never
    ``__name__``, which is "__main__" in a module run with -m (the L1 runs
    `python3 -m bench.nested --inside`). Each module is loaded here under another
    name to show its parts do not depend on it."""
    import importlib
    import importlib.util

    def renamed(module: str):
        spec = importlib.util.spec_from_file_location(f"renamed_{module.replace('.', '_')}",
                                                      importlib.util.find_spec(module).origin)
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
        return loaded

    nested_bench = renamed("bench.nested")
    found = [p for area in nested_bench.AREAS + nested_bench.EXTRA_AREAS
             for p in nested_bench._area_parts(str(tmp_path), area)]
    found += renamed("bench.kvm").parts() + renamed("bench.virtio").parts() + renamed("bench.tcp").parts()
    assert {p.module for p in found} == {"bench.kvm", "bench.virtio", "bench.tcp", "bench.nested", "bench.boot_phases"}
    for part in found:
        assert callable(getattr(importlib.import_module(part.module), part.function)), part
        json.dumps(list(part.args))      # the child gets them as JSON
