"""kvmpy/procfs.py: /proc/PID/stat read the way Linux writes it, whatever the process calls itself."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from kvmpy.procfs import process_age_seconds, process_stat


def test_this_process_is_running_and_started_after_boot():
    stat = process_stat("self")
    assert stat is not None and stat.state == "R"
    assert stat.start_ticks > 0
    assert process_stat(os.getpid()).start_ticks == stat.start_ticks


def test_a_name_with_parentheses_and_spaces_does_not_shift_the_fields():
    # A process may name itself so that naive splitting reads a false state or start time.
    code = "open('/proc/self/comm', 'w').write('a) Z 1 2 (b'); print(flush=True); import time; time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        child.stdout.readline()
        stat = process_stat(child.pid)
        assert stat is not None and stat.state in ("S", "R")
        assert stat.start_ticks >= process_stat("self").start_ticks
        age = process_age_seconds(child.pid)
        assert age is not None and 0 <= age < 60
    finally:
        child.kill()
        child.wait()


def test_an_unreaped_child_is_a_zombie_and_a_reaped_one_is_gone():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while process_stat(child.pid).state != "Z" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process_stat(child.pid).state == "Z"
    child.wait()
    assert process_stat(child.pid) is None
    assert process_age_seconds(child.pid) is None
