"""What `kvmpy run` does before the guest's first instruction: the modules it imports
and the translator's TSC calibration, which runs while the machine is built."""

import re
import subprocess
import sys

import pytest

from conftest import guest_path, run_kvmpy
from support.tcg import TcgVcpu  # noqa: F401 - skips the module where kvmpy._tcg is not built

# Modules a plain `kvmpy run` (no vm.toml, no tap, no monitor socket, kvmpy's own
# spelling) has no use for: each is start-up time, and some (pyroute2, asyncio) far
# more than their share. Test-only packages must never reach the product at all.
NOT_FOR_A_PLAIN_RUN = ("asyncio", "pyroute2", "pytun", "hypothesis", "pytest", "unittest",
                       "kvmpy.qemu_cli", "kvmpy.tools", "kvmpy.block.imgcli", "kvmpy.nbd", "kvmpy.service",
                       "kvmpy.infocmd", "kvmpy.monitor.qmp", "json", "capstone", "tomllib")


def _imported(stderr: bytes) -> set[str]:
    """The modules `python3 -X importtime` (PYTHONPROFILEIMPORTTIME) reported loading
    after the interpreter's site set-up (what a host's .pth files import is not kvmpy's)."""
    site = re.search(rb"^import time:.*\|\s*site$", stderr, re.M)
    after_site = stderr[site.end():] if site else stderr
    return {m.group(1).decode()
            for m in re.finditer(rb"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", after_site, re.M)}


def _unwanted(imported: set[str]) -> list[str]:
    return sorted(m for m in imported if any(m == n or m.startswith(n + ".") for n in NOT_FOR_A_PLAIN_RUN))


@pytest.mark.guest
def test_a_plain_run_imports_nothing_its_machine_does_not_use():
    p = run_kvmpy(["run", "--accel", "tcg", "--kernel", guest_path("hello")], timeout=60,
                  env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert p.returncode == 0, p.stderr.decode(errors="replace")[-2000:]
    assert b"guest: done" in p.stdout
    imported = _imported(p.stderr)
    assert "kvmpy.machine" in imported and "kvmpy._tcg" in imported, "no import report: the check saw nothing"
    assert _unwanted(imported) == []


def test_run_help_imports_no_machine():
    p = run_kvmpy(["run", "--help"], timeout=60, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert p.returncode == 0 and b"--kernel" in p.stdout
    imported = _imported(p.stderr)
    assert "kvmpy.cli" in imported, "no import report: the check saw nothing"
    assert _unwanted(imported) == []
    assert not {"kvmpy.machine", "kvmpy.pc", "kvmpy._tcg", "kvmpy.console"} & imported


def _calibrate(sleep_before: float, start_early: bool) -> tuple[int, float]:
    """(the measured TSC Hz, seconds host_tsc_hz() itself took), in a fresh process:
    the frequency is measured once per process."""
    code = ("import time\n"
            "from kvmpy import _tcg\n"
            "from kvmpy.hv.tcg.vcpu import start_tsc_calibration\n"
            f"if {start_early}:\n"
            "    start_tsc_calibration()\n"
            f"time.sleep({sleep_before})\n"
            "cpu = _tcg.Cpu(0)\n"
            "t = time.monotonic()\n"
            "hz = cpu.host_tsc_hz()\n"
            "print(hz, time.monotonic() - t)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=60).stdout.split()
    return int(out[0]), float(out[1])


def test_an_early_calibration_start_spares_the_wait_and_measures_the_same():
    """Started 30 ms before it is asked for, the measurement is done at once (the whole
    20 ms interval has passed) and agrees with one measured on the spot, within the few
    ppm by which any two processes' measurements differ (tests/test_tcg_time.py)."""
    early = [_calibrate(0.03, True) for _ in range(2)]
    on_the_spot = [_calibrate(0.0, False) for _ in range(2)]
    assert all(took < 0.019 for _, took in early), early       # never the 20 ms sleep again
    # 20 ms of CLOCK_MONOTONIC_RAW, timed here on CLOCK_MONOTONIC, which NTP may slew by 500 ppm
    assert all(took >= 0.0195 for _, took in on_the_spot), on_the_spot
    values = sorted(hz for hz, _ in early + on_the_spot)
    assert values[0] > 100_000_000, values
    assert values[-1] - values[0] <= values[0] // 200_000, f"spread {values}"   # 5 ppm


def test_a_stale_calibration_start_is_taken_again():
    """A start more than a second old (the process may have slept through a suspend,
    when TSC and clock need not advance together) is not used: the full interval is
    measured from the call."""
    hz, took = _calibrate(1.2, True)
    assert took >= 0.0195, took
    assert hz > 100_000_000
