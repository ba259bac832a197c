"""The translator's clocks: the TSC frequency it announces (CPUID 0x15/0x16)."""

from __future__ import annotations

import subprocess
import sys

from support.tcg import TcgVcpu  # noqa: F401 - skips the module where kvmpy._tcg is not built

MEASURE = "from kvmpy import _tcg; print(_tcg.Cpu(0).host_tsc_hz())"


def test_every_process_measures_the_same_tsc_frequency():
    """Each VM process measures the host TSC once and announces it to its guest: a
    measurement a preemption can skew gave each VM another clock rate (they spread by
    ~150 ppm on a loaded host); bracketed reads keep them within a few ppm."""
    values = sorted(int(subprocess.run([sys.executable, "-c", MEASURE], capture_output=True, text=True,
                                       check=True, timeout=60).stdout) for _ in range(5))
    assert values[0] > 100_000_000, values
    assert values[-1] - values[0] <= values[0] // 200_000, f"spread {values}"   # 5 ppm
