"""Where a boot row's time goes, kvmpy beside QEMU on the same guest: each console line
stamped with the seconds since the process started, the kernel's own printk times
beside them, and the process's exit.

    python3 -m bench.nested phases     # in the nested L1, where the boot rows are slow

Rows (seconds, lower is better), the differences of those stamps:
  python3 -c pass                          the interpreter alone (kvmpy pays it, QEMU does not)
  hello.elf: start to its first line       kvmpy's start-up to the guest's first instruction
                                           (QEMU: its start-up and its firmware)
  hello.elf: its first line to exit        the guest's run and the VMM's teardown
  Linux: start to the kernel's first line  start-up, firmware, decompression, early boot to
                                           the console (printk.time=1, no quiet)
  Linux: kernel's first line to /init      the kernel's boot ("Run /init"); the note gives
                                           the kernel's own printk time of it: the rest is
                                           its console output's cost
  Linux: /init to power-off line           the initramfs, the command, the power-off
  Linux: power-off line to exit            the VMM's teardown
The hello.elf rows are the best of three runs by their total, the Linux rows one run.
The import row's note names the slowest imports of kvmpy run (python3 -X importtime).
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import subprocess
import sys
import time

from bench.kvm import NO_DEFAULT_NIC, linux_argvs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

TIMEOUT = 300
VERBOSE_APPEND = 'console=ttyS0 panic=-1 printk.time=1 kvmpy.run="uname -r"'
FIRST_KERNEL_LINE = b"Linux version"
RUN_INIT = b"Run /init"
INIT_BANNER = b"kvmpy guest: init"
POWER_DOWN = b"reboot: Power down"
HELLO = b"Hello from kvmpy test guest"
_PRINTK_TIME = re.compile(rb"^\[\s*(\d+\.\d+)\]")


def timeline(argv: list[str], marks: tuple[bytes, ...], timeout: float = TIMEOUT, lines_after: bytes | None = None) -> dict:
    """Seconds from the start to the first output byte ("first", stderr's too), to the first line
    holding each mark (the mark's text), to the process's exit ("exit"); the printk
    time of each marked line where it has one ("printk " + mark). ``lines_after``: every
    line from the first holding it on, as (seconds, text), under "lines"."""
    env = dict(os.environ, PYTHONPATH=REPO)
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    found: dict = {}
    kept: list[tuple[float, str]] | None = None
    pending = b""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        while time.perf_counter() - t0 < timeout:
            if not sel.select(timeout=1):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            now = time.perf_counter() - t0
            if not chunk:
                break
            found.setdefault("first", now)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if kept is None and lines_after is not None and lines_after in line:
                    kept = found["lines"] = []
                if kept is not None:
                    kept.append((now, line.strip().decode(errors="replace")[:100]))
                for mark in marks:
                    key = mark.decode()
                    if mark in line and key not in found:
                        found[key] = now
                        m = _PRINTK_TIME.match(line.strip(b"\r"))
                        if m:
                            found[f"printk {key}"] = float(m.group(1))
        else:
            proc.kill()
        proc.wait(timeout=60)
        found["exit"] = time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return found


def _span(t: dict, start: str, end: str) -> float | None:
    return round(t[end] - t[start], 3) if start in t and end in t else None


def python_rows() -> list[dict]:
    def best(argv):
        runs = []
        for _ in range(3):
            t = time.perf_counter()
            subprocess.run(argv, check=True, capture_output=True)
            runs.append(time.perf_counter() - t)
        return round(min(runs), 3)
    hello = os.path.join(REPO, "tests", "guests", "build", "hello.elf")
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "kvmpy", "run", "--enable-kvm", "-m", "128",
                        *NO_DEFAULT_NIC, "--kernel", hello], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO),
                       timeout=TIMEOUT, cwd=REPO)
    imports = []
    for line in r.stderr.splitlines():
        fields = line.split("|")
        if len(fields) == 3 and fields[1].strip().isdigit():
            name = fields[2].rstrip()
            # top-level only: their cumulative time holds their children's
            if not name.startswith("  ", 1):
                imports.append((int(fields[1]), name.strip()))
    imports.sort(reverse=True)
    total = sum(us for us, _ in imports)
    note = (f"kvmpy run's imports {total / 1e6:.2f} s under -X importtime; slowest: "
            + ", ".join(f"{name} {us / 1e6:.2f}" for us, name in imports[:8]))
    return [{"name": "phase: python3 -c pass", "kvmpy": best([sys.executable, "-c", "pass"]), "qemu": None,
             "unit": "s", "better": "lower", "note": note},
            {"name": "phase: python3 -S -c pass (no site)", "kvmpy": best([sys.executable, "-S", "-c", "pass"]),
             "qemu": None, "unit": "s", "better": "lower"}]


def hello_rows() -> list[dict]:
    from bench.kvm import _kvmpy, _qemu
    hello = os.path.join(REPO, "tests", "guests", "build", "hello.elf")
    sides = {"kvmpy": _kvmpy(hello, "")}
    if shutil.which("qemu-system-x86_64"):
        sides["qemu"] = _qemu(hello, "")
    best = {side: min((timeline(argv, (HELLO,)) for _ in range(3)), key=lambda t: t.get("exit", 1e9))
            for side, argv in sides.items()}
    hello_line = HELLO.decode()

    def row(name, start, end):
        return {"name": f"phase: hello.elf {name}", "unit": "s", "better": "lower",
                **{side: _span({"start": 0.0, **best[side]}, start, end) if side in best else None
                   for side in ("kvmpy", "qemu")}}
    return [row("start to its first line", "start", hello_line), row("its first line to exit", hello_line, "exit"),
            row("start to exit", "start", "exit")]


def _longest_gaps(lines: list[tuple[float, str]], count: int = 4) -> str:
    """The ``count`` longest pauses of the console, each as the seconds before a line and the line."""
    gaps = sorted(((b[0] - a[0], b[1]) for a, b in zip(lines, lines[1:])), reverse=True)[:count]
    return ", ".join(f"{gap:.2f} s before {text!r}" for gap, text in gaps)


def linux_rows(share: str) -> list[dict]:
    kvmpy, qemu = linux_argvs(share, VERBOSE_APPEND)
    marks = (FIRST_KERNEL_LINE, RUN_INIT, INIT_BANNER, POWER_DOWN)
    found = {"kvmpy": timeline(kvmpy, marks, lines_after=RUN_INIT)}
    if shutil.which("qemu-system-x86_64"):
        found["qemu"] = timeline(qemu, marks, lines_after=RUN_INIT)
    first, run_init, banner, off = (m.decode() for m in marks)
    spans = (("start to the kernel's first line", "start", first), ("kernel's first line to /init", first, run_init),
             ("/init to power-off line", run_init, off), ("power-off line to exit", off, "exit"),
             ("start to init banner", "start", banner), ("start to exit", "start", "exit"))
    rows = []
    for name, start, end in spans:
        row = {"name": f"phase: Linux {name}", "unit": "s", "better": "lower",
               **{side: _span({"start": 0.0, **found.get(side, {})}, start, end) for side in ("kvmpy", "qemu")}}
        if end == run_init:
            row["note"] = "printk time of 'Run /init': " + ", ".join(
                f"{side} {t.get('printk ' + run_init)}" for side, t in found.items())
        if end == off:
            row["note"] = "; ".join(f"{side}'s longest waits for a line: {_longest_gaps(t.get('lines', []))}"
                                    for side, t in found.items())
        rows.append(row)
    return rows


def run() -> list[dict]:
    """On this host: the rows without Linux (bench.nested's area "phases" has them all)."""
    return rows()


def rows(share: str | None = None) -> list[dict]:
    """Every phase row; the Linux ones where ``share`` holds the default guest (bench.nested)."""
    found = python_rows() + hello_rows()
    if share:
        found += linux_rows(share)
    return found


if __name__ == "__main__":
    for found_row in run():
        print(found_row)
