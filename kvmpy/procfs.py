"""What kvmpy reads about a process from Linux's /proc: one parser of /proc/PID/stat.

The second field of stat is the command name in parentheses, which may itself hold
spaces and ")" (a process can name itself anything): the fields after it are found
from the *last* ")", never by splitting the whole line.
"""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class ProcessStat:
    state: str          # R, S, D, Z (zombie), T, ...: field 3
    start_ticks: int    # clock ticks after boot at which the process started: field 22


def process_stat(pid: int | str) -> ProcessStat | None:
    """``/proc/PID/stat`` (pid may be "self"), or None when the process is gone or the
    file is not what Linux writes."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            after_name = f.read().rsplit(b")", 1)[1].split()
        # after_name[0] is field 3 of the whole line.
        return ProcessStat(state=after_name[0].decode("ascii", "replace"), start_ticks=int(after_name[19]))
    except (OSError, IndexError, ValueError):
        return None


def process_age_seconds(pid: int | str) -> float | None:
    """How long ago the process started, from its stat and /proc/uptime; None when unknown."""
    stat = process_stat(pid)
    if stat is None:
        return None
    try:
        with open("/proc/uptime", "rb") as f:
            boot_uptime = float(f.read().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    return max(0.0, boot_uptime - stat.start_ticks / os.sysconf("SC_CLK_TCK"))
