"""kvmpy --enable-kvm beside QEMU -enable-kvm on real KVM, on any host: inside one
nested-KVM L1 (kvmpy/tools/nested.py: Debian's kernel under QEMU's TCG with emulated AMD
SVM, kvm-amd loaded).

    python3 -m bench.nested              # every area below
    python3 -m bench.nested tcp virtio   # only these areas (boot, kvm, virtio, tcp; virtio-blk, virtio-net)

Rows (all measured inside the L1, so both VMMs pay the same emulation tax):
  Linux boot to init / to power-off: the default guest (Debian cloud kernel, busybox
    initramfs, built on the host), same kernel, initramfs, memory and command line
  start to first serial byte: process start to hello.elf's first console byte (QEMU
    runs its firmware first, kvmpy enters the kernel directly)
  the KVM rows of bench.kvm (exits per second) and bench.virtio (virtio-blk reads
    from images on the L1's ext4 scratch disk, so QEMU's cache=none gets O_DIRECT;
    virtio-net tx)
  Linux TCP tx/rx, vhost=on and off (bench.tcp): the default guest's busybox nc to a
    socket in a namespace on the guests' bridge, kvmpy and QEMU guests side by side
The L1's own boot time is in the note of the first row.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import tempfile
import threading
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# Every area on a loaded 2-core host: the TCP rows alone boot four Linux guests.
TIMEOUT = 3600
# No console output this long: the L1 is stuck (kvmpy/tools/nested.py NestedStalled), try a new one.
IDLE_TIMEOUT = 600
ROWS_FILE = "bench-rows.json"


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


def _linux_rows(share: str) -> list[dict]:
    from bench.boot import APPEND, _timed_boot
    guest = os.path.join(share, "guest")
    kernel, initrd = os.path.join(guest, "vmlinuz"), os.path.join(guest, "initrd.img")
    kvmpy = [sys.executable, "-m", "kvmpy", "run", "--enable-kvm", "--no-reboot", "--serial", "stdio",
             "-m", "512", "--kernel", kernel, "--initrd", initrd, "--append", APPEND]
    qemu = ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-m", "512", "-nodefaults", "-display", "none",
            "-serial", "stdio", "-no-reboot", "-kernel", kernel, "-initrd", initrd, "-append", APPEND]
    kb, kd, knote = _timed_boot(kvmpy)
    qb, qd, qnote = _timed_boot(qemu)
    note = "; ".join(n for n in (f"kvmpy {knote}" if knote else "", f"qemu {qnote}" if qnote else "") if n)
    hello = os.path.join(REPO, "tests", "guests", "build", "hello.elf")
    kf = min(filter(None, (_first_byte_seconds([sys.executable, "-m", "kvmpy", "run", "--enable-kvm", "-m", "128",
                                                "--kernel", hello]) for _ in range(3))), default=None)
    qf = min(filter(None, (_first_byte_seconds(["qemu-system-x86_64", "-accel", "kvm", "-m", "128", "-nodefaults",
                                                "-display", "none", "-serial", "stdio", "-no-reboot",
                                                "-kernel", hello]) for _ in range(3))), default=None)
    return [
        {"name": "Linux boot to init (KVM)", "kvmpy": kb, "qemu": qb, "unit": "s", "better": "lower", "note": note},
        {"name": "Linux boot to poweroff (KVM)", "kvmpy": kd, "qemu": qd, "unit": "s", "better": "lower",
         "note": note},
        {"name": "start to first serial byte (hello.elf, KVM)", "kvmpy": kf, "qemu": qf, "unit": "s",
         "better": "lower"},
    ]


AREAS = ("boot", "kvm", "virtio", "tcp")
# Parts of an area, run only when named: a re-run of one row family after a fix.
EXTRA_AREAS = ("virtio-blk", "virtio-net")


def _areas(share: str) -> dict:
    import bench.kvm
    import bench.tcp
    import bench.virtio
    return {"boot": lambda: _linux_rows(share), "kvm": bench.kvm.run, "virtio": bench.virtio.run,
            "tcp": lambda: bench.tcp.run(os.path.join(share, "guest")), "virtio-net": bench.virtio._net_rows,
            "virtio-blk": lambda: _blk_rows()}


def _blk_rows() -> list[dict]:
    import bench.virtio
    with tempfile.TemporaryDirectory(prefix="kvmpy-bench-blk-") as tmp:
        return bench.virtio._blk_rows(tmp)


def _inside(share: str, wanted: list[str] | None = None) -> list[dict]:
    """Runs in the L1: every KVM row (or the wanted areas'), one failing area not hiding the others."""
    rows = []
    areas = _areas(share)
    current = {"area": None, "since": time.monotonic()}

    def heartbeat() -> None:
        # An area may print nothing for longer than IDLE_TIMEOUT (the virtio-blk rows:
        # ~80 guest runs); the host would take the silence for a stuck L1 and kill it.
        # A truly stuck L1 runs no thread at all, so it still goes silent.
        while True:
            time.sleep(120)
            print(f"bench.nested: {current['area']} running for {time.monotonic() - current['since']:.0f} s",
                  file=sys.stderr, flush=True)

    threading.Thread(target=heartbeat, daemon=True).start()
    for area in wanted or AREAS:
        fn = areas[area]
        current.update(area=area, since=time.monotonic())
        print(f"bench.nested: {area} ...", file=sys.stderr, flush=True)
        try:
            for row in fn():
                rows.append({**row, "name": f"L1 {row['name']}"})
                # on the console as it comes: an L1 killed later still leaves the figures in its log
                print(f"bench.nested row: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
        except Exception as e:  # noqa: BLE001 - report it as a row, keep going
            traceback.print_exc()
            rows.append({"name": f"L1 {area} (failed)", "kvmpy": None, "qemu": None, "unit": "",
                         "note": f"{type(e).__name__}: {e}"})
    return rows


def run(areas: list[str] | None = None) -> list[dict]:
    from kvmpy.tools import guestbuild, nested
    reason = nested.missing_tools()
    if reason:
        return [{"name": "L1 (nested KVM)", "kvmpy": None, "qemu": None, "unit": "", "note": reason}]
    subprocess.run(["make", "-s", "-C", os.path.join(REPO, "tests", "guests")], check=True)
    subprocess.run([sys.executable, "-m", "compileall", "-q", "kvmpy", "bench"], cwd=REPO, capture_output=True)
    with tempfile.TemporaryDirectory(prefix="kvmpy-bench-nested-") as share:
        guestbuild.build(out_dir=os.path.join(share, "guest"), with_disk=False)
        for attempt in (1, 2):
            try:
                result = nested.run_nested([sys.executable, "-m", "bench.nested", "--inside", *(areas or ())],
                                           cwd=REPO, share_dir=share, timeout=TIMEOUT, idle_timeout=IDLE_TIMEOUT,
                                           echo=lambda text: sys.stderr.write(text))
                break
            except nested.NestedStalled as e:
                if attempt == 2:
                    raise
                print(f"bench nested: the L1 stalled ({e}); booting a new one", file=sys.stderr)
        path = os.path.join(share, ROWS_FILE)
        if result.status != 0 or not os.path.exists(path):
            raise RuntimeError(f"the bench in the L1 exited {result.status}: {result.output.strip()[-500:]}")
        with open(path) as f:
            rows = json.load(f)
    if rows:
        rows[0]["note"] = "; ".join(filter(None, (rows[0].get("note"), f"L1 booted in {result.ready_seconds:.1f} s "
                                                  "(QEMU TCG, -cpu max)")))
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
        rows = _inside(share, areas)
        with open(os.path.join(share, ROWS_FILE), "w") as f:
            json.dump(rows, f)
        for row in rows:
            print(row)
    else:
        for row in run(areas):
            print(row)
