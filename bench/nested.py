"""kvmpy --enable-kvm beside QEMU -enable-kvm on real KVM, on any host: inside one
nested-KVM L1 (kvmpy/tools/nested.py: Debian's kernel under QEMU's TCG with emulated AMD
SVM, kvm-amd loaded).

    python3 -m bench.nested              # every area below
    python3 -m bench.nested tcp virtio   # only these areas (boot, kvm, virtio, tcp; virtio-blk, virtio-net,
                                         # phases: where the boot rows' time goes, bench/boot_phases.py;
                                         # virtio-blk-qd32: the blk queue-depth-32 rows alone)

Rows (all measured inside the L1, so both VMMs pay the same emulation tax):
  Linux boot to init / to power-off: the default guest (Debian cloud kernel, busybox
    initramfs, built on the host), same kernel, initramfs, memory and command line;
    and to power-off again without ``quiet``, the kernel's whole log (about 23 KB) on
    the serial console, which a console polling LSR writes byte by byte
  start to first serial byte: process start to hello.elf's first console byte (QEMU
    runs its firmware first, kvmpy enters the kernel directly)
  the KVM rows of bench.kvm (exits per second) and bench.virtio (virtio-blk reads
    from images on the L1's ext4 scratch disk, so QEMU's cache=none gets O_DIRECT;
    virtio-net tx)
  Linux TCP tx/rx, vhost=on and off (bench.tcp): the default guest's busybox nc to a
    socket in a namespace on the guests' bridge, kvmpy and QEMU guests side by side
The L1's own boot time is in the note of the first row.

Each area's parts (bench/parts.py) run with their own deadlines, print a line at start,
at the end and every bench.parts.HEARTBEAT seconds, and go into a journal in the share
as they finish. QEMU's TCG loses the L1's timer interrupt now and then during the exit
rows (kvmpy/tools/nested.py KICK_AFTER): a silent console gets a byte on the L1's
serial port, which wakes it; an L1 silent for IDLE_TIMEOUT all the same is killed and a
new one goes on with the parts not yet done, up to L1_ATTEMPTS L1s.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# Every area on a loaded 2-core host: the TCP rows alone boot four Linux guests.
TIMEOUT = 3600
# No console output this long: the L1 is stuck (kvmpy/tools/nested.py NestedStalled), try a
# new one. Every part prints a line at least each bench.parts.HEARTBEAT seconds.
IDLE_TIMEOUT = 150
# L1s booted in all: each goes on from the parts its predecessors finished.
L1_ATTEMPTS = 4
ROWS_FILE = "bench-rows.jsonl"


def _first_byte_seconds(argv: list[str], timeout: float = 120) -> float | None:
    env = dict(os.environ, PYTHONPATH=REPO)
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        if sel.select(timeout=timeout) and os.read(proc.stdout.fileno(), 1):
            return time.perf_counter() - t0
        return None
    finally:
        proc.kill()
        proc.wait()


def linux_rows(share: str) -> list[dict]:
    from bench.boot import APPEND, _timed_boot
    from bench.kvm import NO_DEFAULT_NIC, linux_argvs
    kvmpy, qemu = linux_argvs(share, APPEND)
    kb, kd, knote = _timed_boot(kvmpy)
    qb, qd, qnote = _timed_boot(qemu)
    note = "; ".join(n for n in (f"kvmpy {knote}" if knote else "", f"qemu {qnote}" if qnote else "") if n)
    # The same without ``quiet``: the kernel's whole log goes to ttyS0.
    kvmpy, qemu = linux_argvs(share, APPEND.replace(" quiet", ""))
    _, kv, kvnote = _timed_boot(kvmpy)
    _, qv, qvnote = _timed_boot(qemu)
    verbose_note = "; ".join(n for n in (f"kvmpy {kvnote}" if kvnote else "", f"qemu {qvnote}" if qvnote else "")
                             if n)
    hello = os.path.join(REPO, "tests", "guests", "build", "hello.elf")
    kf = min(filter(None, (_first_byte_seconds([sys.executable, "-m", "kvmpy", "run", "--enable-kvm", "-m", "128",
                                                *NO_DEFAULT_NIC, "--kernel", hello]) for _ in range(3))),
             default=None)
    qf = min(filter(None, (_first_byte_seconds(["qemu-system-x86_64", "-accel", "kvm", "-m", "128", "-nodefaults",
                                                "-display", "none", "-serial", "stdio", "-no-reboot",
                                                "-kernel", hello]) for _ in range(3))), default=None)
    return [
        {"name": "Linux boot to init (KVM)", "kvmpy": kb, "qemu": qb, "unit": "s", "better": "lower", "note": note},
        {"name": "Linux boot to poweroff (KVM)", "kvmpy": kd, "qemu": qd, "unit": "s", "better": "lower",
         "note": note},
        {"name": "Linux boot to poweroff, whole kernel log on the serial console (KVM)", "kvmpy": kv, "qemu": qv,
         "unit": "s", "better": "lower", "note": verbose_note},
        {"name": "start to first serial byte (hello.elf, KVM)", "kvmpy": kf, "qemu": qf, "unit": "s",
         "better": "lower"},
    ]


AREAS = ("boot", "kvm", "virtio", "tcp")
# Parts of an area, run only when named: a re-run of one row family after a fix.
EXTRA_AREAS = ("virtio-blk", "virtio-blk-qd32", "virtio-net", "phases")
# The Linux boot rows: four Linux boots and six hello.elf starts in the L1.
BOOT_LIMIT = 900.0


def _area_parts(share: str, area: str) -> list:
    """An area's parts, each with its own deadline (bench/parts.py): a row that hangs
    is killed after its limit and reported, and the run goes on."""
    import bench.kvm
    import bench.tcp
    import bench.virtio
    from bench.parts import Part
    if area == "boot":
        return [Part("boot (Linux, first serial byte)", "bench.nested", "linux_rows", (share,), BOOT_LIMIT)]
    if area == "kvm":
        return bench.kvm.parts()
    if area == "phases":
        # where the boot rows' time goes (bench/boot_phases.py): named only, not in a full run
        return [Part("boot phases", "bench.boot_phases", "rows", (share,), BOOT_LIMIT)]
    if area == "tcp":
        return bench.tcp.parts(os.path.join(share, "guest"))
    if area == "virtio-blk-qd32":
        # the queue-depth-32 rows alone (issue 17): both formats, no CPU rows
        return [p for p in bench.virtio.parts(python_side=False, blk_only="QD32") if p.function == "blk_format_rows"]
    # dataplane=python's blk figures (a third of the L1's blk time) stay a host-side note
    virtio = bench.virtio.parts(python_side=False)
    if area == "virtio-blk":
        return [p for p in virtio if p.function == "blk_format_rows"]
    if area == "virtio-net":
        return [p for p in virtio if p.function == "net_rows"]
    return virtio


def _journal(share: str, kind: str = "rows") -> list[dict]:
    """The parts done so far, in order: [{"part": label, "rows": [...]}] (kind "rows"),
    or the parts started ({"part": label, "started": true}). An L1 that stalled leaves
    them here, and the next L1 goes on from where it stopped."""
    entries = []
    with contextlib.suppress(FileNotFoundError):
        with open(os.path.join(share, ROWS_FILE)) as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if isinstance(entry, dict) and kind in entry:
                        entries.append(entry)
    return entries


def _inside(share: str, wanted: list[str] | None = None) -> None:
    """Runs in the L1: every KVM row (or the wanted areas'), part by part, one failing or
    hanging part not hiding the others; parts an earlier L1 finished are not run again."""
    from bench.parts import run_part
    done = {entry["part"] for entry in _journal(share)}
    started = [entry["part"] for entry in _journal(share, "started")]
    for area in wanted or AREAS:
        print(f"bench.nested: {area} ...", file=sys.stderr, flush=True)
        try:
            parts = _area_parts(share, area)
        except Exception as e:  # noqa: BLE001 - report it as a row, keep going
            traceback.print_exc()
            parts, rows = [], [{"name": f"{area} (failed)", "kvmpy": None, "qemu": None, "unit": "",
                                "note": f"{type(e).__name__}: {e}"}]
            _record(share, area, rows)
        for part in parts:
            if part.label in done:
                print(f"bench.nested: {part.label}: done by an earlier L1", file=sys.stderr, flush=True)
                continue
            if started.count(part.label) >= 2:
                # the L1 stalled twice in this part: a third L1 would stall there too
                _record(share, part.label, [{"name": f"{part.label} (stalled the L1 twice)", "kvmpy": None,
                                             "qemu": None, "unit": "", "note": "not run a third time"}])
                continue
            _append(share, {"part": part.label, "started": True})
            _record(share, part.label, run_part(part))


def _record(share: str, label: str, rows: list[dict]) -> None:
    rows = [{**row, "name": f"L1 {row['name']}"} for row in rows]
    for row in rows:
        # on the console as it comes: an L1 killed later still leaves the figures in its log
        print(f"bench.nested row: {json.dumps(row)}", file=sys.stderr, flush=True)
    _append(share, {"part": label, "rows": rows})


def _append(share: str, entry: dict) -> None:
    with open(os.path.join(share, ROWS_FILE), "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run(areas: list[str] | None = None) -> list[dict]:
    from kvmpy.tools import guestbuild, nested
    reason = nested.missing_tools()
    if reason:
        return [{"name": "L1 (nested KVM)", "kvmpy": None, "qemu": None, "unit": "", "note": reason}]
    subprocess.run(["make", "-s", "-C", os.path.join(REPO, "tests", "guests")], check=True)
    subprocess.run([sys.executable, "-m", "compileall", "-q", "kvmpy", "bench"], cwd=REPO, capture_output=True)
    notes = []
    with tempfile.TemporaryDirectory(prefix="kvmpy-bench-nested-") as share:
        guestbuild.build(out_dir=os.path.join(share, "guest"), with_disk=False)
        for attempt in range(1, L1_ATTEMPTS + 1):
            try:
                result = nested.run_nested([sys.executable, "-m", "bench.nested", "--inside", *(areas or ())],
                                           cwd=REPO, share_dir=share, timeout=TIMEOUT, idle_timeout=IDLE_TIMEOUT,
                                           echo=lambda text: sys.stderr.write(text))
            except nested.NestedStalled as e:
                notes.append(f"L1 {attempt} stalled")
                print(f"bench nested: the L1 stalled ({e}); {len(_journal(share))} parts done"
                      + ("; booting a new one" if attempt < L1_ATTEMPTS else ""), file=sys.stderr)
                continue
            except nested.NestedError as e:
                notes.append(str(e))
                break
            notes.append(f"L1 {attempt} booted in {result.ready_seconds:.1f} s (QEMU TCG, -cpu max), "
                         f"{result.kicks} kicks of its silent console")
            if result.status != 0:
                notes.append(f"the bench in the L1 exited {result.status}: {result.output.strip()[-300:]}")
            break
        rows = [row for entry in _journal(share) for row in entry["rows"]]
    if not rows:
        return [{"name": "L1 (nested KVM)", "kvmpy": None, "qemu": None, "unit": "", "note": "; ".join(notes)}]
    rows[0]["note"] = "; ".join(filter(None, (rows[0].get("note"), *notes)))
    return rows


if __name__ == "__main__":
    args = sys.argv[1:]
    inside = args[:1] == ["--inside"]
    areas = args[1:] if inside else args
    unknown = [a for a in areas if a not in AREAS + EXTRA_AREAS]
    if unknown:
        print(f"bench.nested: unknown area {unknown[0]!r} (one of {', '.join(AREAS + EXTRA_AREAS)})",
              file=sys.stderr)
        sys.exit(2)
    if inside:
        share = os.environ.get("KVMPY_NESTED_SHARE")
        if os.environ.get("KVMPY_NESTED_L1") != "1" or not share:
            sys.exit("bench.nested --inside runs only in the L1 that `python3 -m bench.nested` boots")
        _inside(share, areas)
    else:
        for row in run(areas):
            print(row)
