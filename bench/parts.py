"""Benchmark parts with deadlines: each part (a row or a family of rows) runs in a
child process of its own session, so one that hangs (a guest that never powers off,
a VMM waiting on something, a stuck TCP transfer) is killed with everything it
started, says so in one line and as a row, and the run goes on.

    python3 -m bench.parts MODULE FUNCTION ARGS_JSON ROWS_FILE    # what the parent runs

A part's function returns the rows (``{"name", "kvmpy", "qemu", "unit", ...}``); its
arguments are JSON. Progress goes to stderr as it happens: a line when a part starts,
when it ends (with its time) and every HEARTBEAT seconds while it runs, because a
silent console is what the nested harness takes for a stuck L1.

On the deadline the child's session gets SIGTERM first, which the child turns into an
exception so its ``finally`` blocks run (network namespaces deleted, guests killed),
then SIGKILL after GRACE seconds for whatever is left.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

GRACE = 20.0
HEARTBEAT = 30.0


@dataclasses.dataclass(frozen=True)
class Part:
    label: str          # what progress lines and a timed-out row call it
    module: str         # e.g. "bench.kvm"
    function: str       # a module-level function returning the rows
    args: tuple = ()    # JSON values
    timeout: float = 600.0


class PartTimedOut(Exception):
    """Raised in the child by the parent's SIGTERM, so cleanups in ``finally`` run."""


def _log(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def _session_processes(sid: int) -> list[str]:
    """The processes still in session ``sid``: what the part was waiting on when its
    time ran out (pid, state, kernel wait channel, command line)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            if int(fields[3]) != sid:       # field 6 of proc(5): the session id
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(f"/proc/{entry}/wchan") as f:
                wchan = f.read().strip() or "-"
        except (OSError, IndexError, ValueError):
            continue
        found.append(f"{entry} {fields[0].decode()} {wchan} {cmdline[:200]}")
    return found


def _signal_session(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def run_part(part: Part) -> list[dict]:
    """The part's rows; on its deadline or failure one row saying what happened."""
    _log(f"{part.label} ... (limit {part.timeout:.0f} s)")
    start = time.monotonic()
    with tempfile.NamedTemporaryFile(prefix="kvmpy-bench-rows-", suffix=".json", delete=False) as f:
        rows_file = f.name
    try:
        proc = subprocess.Popen([sys.executable, "-m", "bench.parts", part.module, part.function,
                                 json.dumps(list(part.args)), rows_file],
                                cwd=REPO, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                                    filter(None, (REPO, os.environ.get("PYTHONPATH"))))), stdin=subprocess.DEVNULL,
                                start_new_session=True)
        done = threading.Event()

        def heartbeat() -> None:
            while not done.wait(HEARTBEAT):
                _log(f"{part.label} running for {time.monotonic() - start:.0f} s")

        threading.Thread(target=heartbeat, daemon=True).start()
        try:
            proc.wait(timeout=part.timeout)
        except subprocess.TimeoutExpired:
            stuck = [line for line in _session_processes(proc.pid) if not line.startswith(f"{proc.pid} ")]
            _log(f"{part.label} TIMED OUT after {part.timeout:.0f} s; still running: "
                 + (" | ".join(stuck) or "only the part itself"))
            _signal_session(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=GRACE)
            except subprocess.TimeoutExpired:
                pass
            _signal_session(proc.pid, signal.SIGKILL)
            proc.wait()
            done.set()
            return [{"name": f"{part.label} (timed out)", "kvmpy": None, "qemu": None, "unit": "",
                     "note": f"killed after {part.timeout:.0f} s; was running: "
                             + (" | ".join(line.split(" ", 3)[3][:120] for line in stuck[:3]) or "the part itself")}]
        finally:
            done.set()
            # anything the part left behind in its session (a VMM it did not reap)
            _signal_session(proc.pid, signal.SIGKILL)
        seconds = time.monotonic() - start
        try:
            with open(rows_file) as f:
                rows = json.load(f)
        except (OSError, ValueError):
            rows = None
        if proc.returncode != 0 or not isinstance(rows, list):
            _log(f"{part.label} failed (exit {proc.returncode}) after {seconds:.0f} s")
            return [{"name": f"{part.label} (failed)", "kvmpy": None, "qemu": None, "unit": "",
                     "note": f"exit {proc.returncode}; the traceback is on stderr"}]
        _log(f"{part.label} done in {seconds:.0f} s ({len(rows)} rows)")
        return rows
    finally:
        os.unlink(rows_file)


def run_parts(parts: list[Part], on_row=None) -> list[dict]:
    rows = []
    for part in parts:
        for row in run_part(part):
            rows.append(row)
            if on_row:
                on_row(row)
    return rows


def _child(module: str, function: str, args_json: str, rows_file: str) -> int:
    def on_term(signum, frame):
        raise PartTimedOut(f"{module}.{function}: out of time")

    signal.signal(signal.SIGTERM, on_term)
    rows = getattr(importlib.import_module(module), function)(*json.loads(args_json))
    with open(rows_file, "w") as f:
        json.dump(list(rows), f)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit("usage: python3 -m bench.parts MODULE FUNCTION ARGS_JSON ROWS_FILE")
    sys.exit(_child(*sys.argv[1:]))
