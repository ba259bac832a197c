"""virtio benchmarks: the same guest drivers under kvmpy and under QEMU.

    python3 -m bench.virtio
    python3 -m bench.virtio --ring-check "virtio-net rx from bridge" --dataplane python --repeats 5

    python3 -c 'import bench.virtio as v, tempfile; [print(r) for r in v._blk_rows(tempfile.mkdtemp())]'

Rows (higher is better), each for a raw image and a fully allocated qcow2 one
(qemu-img convert of the raw, 256 MiB of random data):
  virtio-blk FMT seq read 64k        MB/s  tests/guests/virtio_blk.elf reads=N (64 KiB each)
  virtio-blk FMT seq write 64k       MB/s  writes=N (64 KiB each)
  virtio-blk FMT rand read 4k QD1    IOPS  qd=1 rand=N
  virtio-blk FMT rand read 4k QD32   IOPS  qd=32 rand=N (32 requests in flight)
  virtio-blk FMT rand write 4k QD1   IOPS  qd=1 randw=N
  virtio-blk FMT rand write 4k QD32  IOPS  qd=32 randw=N
  kvmpy's figure is its native data plane; the note gives dataplane=python's. Both
  run with cache=none (O_DIRECT: every read goes to the device, none is a page
  cache hit) where the image's file system takes O_DIRECT, QEMU with aio=io_uring
  (else aio=native), else both with cache=writeback; the note says which.
  virtio-blk FMT CPU per GiB seq read 64k   CPU s/GiB  the VMM process's CPU time (user +
  virtio-blk FMT CPU per GiB seq write 64k  CPU s/GiB  system, less guest time) for the reads=
                                      or writes= run less that of the same boot without the
                                      work, per GiB moved; lower is better. Firecracker's aim,
                                      1 GiB/s on at most 70% of a core, is 0.7 CPU s/GiB.
  virtio-net tx to bridge   frames/s  tests/guests/virtio_net.elf flood=N, counted on the bridge
  virtio-net rx from bridge frames/s  tests/guests/virtio_net.elf rxflood=N: a packet socket on the
                                      bridge streams frames until the guest counted N
  virtio-net tx vhost       frames/s  the tx row with vhost=on on both sides (the kernel's data
                                      plane); where /dev/vhost-net exists, e.g. in the nested L1
  (kvmpy's net figures are its native data plane; the note gives dataplane=python's.
  The net guest runs with msix=1: MSI-X on and no vector, as a polling driver on a
  modern system, so neither VMM raises an interrupt nobody reads)

The virtio-blk figures under KVM are work / the guest's own count of TSC cycles
around it (the TSC rate from KVM_GET_TSC_KHZ), the best of two runs; elsewhere,
and for the net row, work / (wall time of a run with the work - wall time of
the same boot without it), so boot and guest setup cancel out. Both sides use KVM when
/dev/kvm is usable (QEMU -accel kvm, kvmpy run --enable-kvm), else QEMU TCG and
the kvmpy translator. The net row needs root (namespace, bridge, tap). A side
that cannot run reports None and says why in "note". A net row's note also counts the
lines of a kvmpy run that say a ring went wrong (RING_ERROR_MARKS), even in runs that
finished; --ring-check runs one row's kvmpy side alone, again and again, for them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

GUESTS = os.path.join(REPO, "tests", "guests")
BUILD = os.path.join(GUESTS, "build")
QEMU = shutil.which("qemu-system-x86_64")
DISK_SIZE = 256 << 20
SEQ_READS = 2000        # x 64 KiB = 125 MiB
SEQ_WRITES = 1000       # x 64 KiB = 62.5 MiB
RAND_READS = 5000
RAND_WRITES = 5000
FLOOD = 20000
RX_FLOOD = 20000
ETH_TYPE = 0x88B5
TIMEOUT = 600


def _kvm_ok() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def _qemu_cmd(guest: str, append: str, devices: list[str]) -> list[str]:
    accel = "kvm" if _kvm_ok() else "tcg"
    return [QEMU, "-accel", accel, "-machine", "q35", "-m", "256", "-nodefaults", "-display", "none",
            "-serial", "stdio", "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
            "-kernel", os.path.join(BUILD, f"{guest}.elf"), "-append", append, *devices]


def _kvmpy_cmd(guest: str, append: str, extra: list[str]) -> list[str]:
    accel = ["--enable-kvm"] if _kvm_ok() else []
    # QEMU's side has -nodefaults: no default NIC on kvmpy's either, unless the row names one
    no_default_nic = [] if "--net" in extra else ["--net", "none"]
    return [sys.executable, "-m", "kvmpy", "run", *accel, "--kernel", os.path.join(BUILD, f"{guest}.elf"),
            "--append", append, "-m", "256M", "--serial", "stdio", "--no-reboot", *no_default_nic, *extra]


def _timed(argv: list[str], ok_status: int, prefix: list[str] | None = None) -> float:
    t = time.perf_counter()
    r = subprocess.run((prefix or []) + argv, capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO)
    elapsed = time.perf_counter() - t
    out = r.stdout.replace("\r\n", "\n")
    if "No module named 'kvmpy.devices.attach'" in r.stderr:
        raise RuntimeError("kvmpy run cannot attach virtio devices yet (kvmpy.devices.attach is not wired)")
    if r.returncode != ok_status or "guest: done" not in out:
        tail = (out + r.stderr).strip().splitlines()[-3:]
        raise RuntimeError(f"status {r.returncode}: {' | '.join(tail)}")
    return elapsed


def _rate(cmd_for, work: float, ok_status: int, prefix=None) -> float:
    base = min(_timed(cmd_for(False), ok_status, prefix) for _ in range(2))
    loaded = _timed(cmd_for(True), ok_status, prefix)
    return work / max(loaded - base, 1e-3)


#: (row name, unit, guest arguments with {n}, count, unit per request, what the guest's timing line calls it)
BLK_WORKLOADS = (
    ("seq read 64k", "MB/s", "reads={n}", SEQ_READS, 65536 / 1e6, "seq64k"),
    ("seq write 64k", "MB/s", "writes={n}", SEQ_WRITES, 65536 / 1e6, "write64k"),
    ("rand read 4k QD1", "IOPS", "qd=1 rand={n}", RAND_READS, 1.0, "rand4k"),
    ("rand read 4k QD32", "IOPS", "qd=32 rand={n}", RAND_READS, 1.0, "rand4k"),
    ("rand write 4k QD1", "IOPS", "qd=1 randw={n}", RAND_WRITES, 1.0, "randw4k"),
    ("rand write 4k QD32", "IOPS", "qd=32 randw={n}", RAND_WRITES, 1.0, "randw4k"),
)
GUEST_TIMED_RUNS = 2    # the best of these: the guest's own clock, no boot in it
BLK_FORMATS = ("raw", "qcow2")


#: (row name, guest arguments with {n}, count, bytes per request): the CPU cost rows
BLK_CPU_WORKLOADS = (
    ("CPU per GiB seq read 64k", "reads={n}", 2 * SEQ_READS, 65536),
    ("CPU per GiB seq write 64k", "writes={n}", 2 * SEQ_WRITES, 65536),
)
CPU_UNIT = "CPU s/GiB"


def blk_row_names() -> list[tuple[str, str]]:
    return ([(f"virtio-blk {fmt} {name}", unit) for fmt in BLK_FORMATS for name, unit, *_ in BLK_WORKLOADS]
            + [(f"virtio-blk {fmt} {name}", CPU_UNIT) for fmt in BLK_FORMATS for name, *_ in BLK_CPU_WORKLOADS])


def _process_cpu_seconds(argv: list[str], ok_status: int, guest_seen: list | None = None) -> float:
    """The CPU time the process spent itself: user + system less guest time, read from
    /proc/PID/stat once it exited but before it is reaped (the times then include
    every thread it ever had). ``guest_seen`` gets whether the kernel counted any
    guest time at all."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen(argv, stdout=out, stderr=err, cwd=REPO)
        killer = threading.Timer(TIMEOUT, p.kill)
        killer.start()
        try:
            # Waits for the exit without reaping: the zombie's stat still has the times.
            os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)
            with open(f"/proc/{p.pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        finally:
            killer.cancel()
            p.wait()
        out.seek(0)
        err.seek(0)
        text = out.read().decode(errors="replace").replace("\r\n", "\n")
        if p.returncode != ok_status or "guest: done" not in text:
            tail = (text + err.read().decode(errors="replace")).strip().splitlines()[-3:]
            raise RuntimeError(f"status {p.returncode}: {' | '.join(tail)}")
    ticks = os.sysconf("SC_CLK_TCK")
    # fields from the state on (proc(5) numbers them from 1 with pid and comm first):
    # utime is field 14, stime 15, guest_time 43
    utime, stime, guest = int(fields[11]), int(fields[12]), int(fields[40])
    if guest_seen is not None:
        guest_seen.append(guest > 0)
    return (utime + stime - guest) / ticks


#: What the CPU rows' note says where the kernel counts no guest time (kvm_pvm runs
#: the guest as the vCPU thread's own system time): the test guest polls its used
#: ring, so its busy wait, about the run's wall time, counts as either VMM's CPU.
NO_GUEST_TIME_NOTE = "no guest time reported by this KVM: the guest's polling counts as VMM CPU on both sides"


def _blk_side_cpu(build, ok_status: int, guest_seen: list | None = None) -> dict[str, float]:
    """Each CPU workload's CPU seconds per GiB on one side."""
    base = min(_process_cpu_seconds(build(""), ok_status) for _ in range(2))
    costs = {}
    for name, args, count, nbytes in BLK_CPU_WORKLOADS:
        loaded = _process_cpu_seconds(build(args.format(n=count)), ok_status, guest_seen)
        costs[name] = max(loaded - base, 0.0) / (count * nbytes / (1 << 30))
    return costs


def _o_direct_ok(path: str) -> bool:
    """Whether the file system under path takes O_DIRECT (tmpfs, for one, does not)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


def _qemu_cache_modes(img: str) -> list[tuple[str, str]]:
    """QEMU's fastest settings first, as (drive options, what the note says):
    O_DIRECT with io_uring or Linux AIO where the file system has O_DIRECT, else
    the page cache with its thread pool."""
    modes = []
    if _o_direct_ok(img):
        modes += [("cache=none,aio=io_uring", "cache=none,aio=io_uring"),
                  ("cache=none,aio=native", "cache=none,aio=native")]
    modes.append(("cache=writeback,aio=threads", "cache=writeback (no O_DIRECT here)" if not modes
                  else "cache=writeback (io_uring and native AIO refused)"))
    return modes


def _blk_images(tmp: str, formats: tuple[str, ...] = BLK_FORMATS) -> dict[str, str]:
    img = os.path.join(tmp, "disk.raw")
    # Real data, not holes: a sparse file would measure the page cache's zero page.
    chunk = os.urandom(1 << 20)
    with open(img, "wb") as f:
        for _ in range(DISK_SIZE >> 20):
            f.write(chunk)
    images = {"raw": img}
    if "qcow2" not in formats:
        return images
    qcow2 = os.path.join(tmp, "disk.qcow2")
    # Every cluster allocated: the rows measure reads and overwrites of data in the
    # image, the steady state of a used disk (allocation is the model's business).
    r = subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", img, qcow2], capture_output=True,
                       text=True)
    if r.returncode == 0:
        images["qcow2"] = qcow2
    return images


def _tsc_hz() -> int | None:
    """The guests' TSC rate under KVM (KVM_GET_TSC_KHZ of a scratch vCPU): QEMU and
    kvmpy leave it at the host's, so the cycles the test guest counts around its
    work are seconds with no boot, no process start and no exit in them."""
    fds = []
    try:
        fds.append(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
        fds.append(fcntl.ioctl(fds[0], 0xAE01, 0))         # KVM_CREATE_VM
        fds.append(fcntl.ioctl(fds[1], 0xAE41, 0))         # KVM_CREATE_VCPU 0
        khz = fcntl.ioctl(fds[2], 0xAEA3, 0)               # KVM_GET_TSC_KHZ
        return khz * 1000 if khz > 0 else None
    except OSError:
        return None
    finally:
        for fd in reversed(fds):
            os.close(fd)


#: What says a ring went wrong in a run: kvmpy's NEEDS_RESET line with its avail-jump
#: report (kvmpy/devices/virtio/queue.py), Linux's "id N is not a head!", the test
#: guest's own NEEDS_RESET line with its cursors. A run can still finish its work after
#: one (a net guest whose device broke in its last frames), so they are looked for in
#: every run, not only in failed ones.
RING_ERROR_MARKS = ("avail idx jumped", "is not a head", "needs reset")


def ring_error_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if any(mark in line for mark in RING_ERROR_MARKS)]


def _guest_match(argv: list[str], ok_status: int, pattern: str, ring_errors: list[str] | None = None) -> re.Match:
    """The guest's own timing line of one run; ``ring_errors`` gets the run's
    RING_ERROR_MARKS lines (console and log), whether it passed or not."""
    r = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO)
    out = r.stdout.replace("\r\n", "\n")
    if ring_errors is not None:
        ring_errors.extend(ring_error_lines(out + "\n" + r.stderr))
    m = re.search(pattern, out)
    if r.returncode != ok_status or m is None:
        tail = (out + r.stderr).strip().splitlines()[-3:]
        raise RuntimeError(f"status {r.returncode}: {' | '.join(tail)}")
    return m


def _guest_cycles(argv: list[str], ok_status: int, key: str) -> int:
    return int(_guest_match(argv, ok_status, rf"\b{key}=\d+ cycles=(\d+)").group(1))


def _blk_side_rates(build, ok_status: int, tsc_hz: int | None, workloads=BLK_WORKLOADS) -> dict[str, float]:
    """Each workload's rate on one side (one image, one configuration). Under KVM
    from the guest's own count of TSC cycles around the work (best of
    GUEST_TIMED_RUNS); else from wall times, the boot without work measured once."""
    rates = {}
    if tsc_hz:
        for name, _unit, args, count, scale, key in workloads:
            cycles = min(_guest_cycles(build(args.format(n=count)), ok_status, key)
                         for _ in range(GUEST_TIMED_RUNS))
            rates[name] = count * scale / max(cycles / tsc_hz, 1e-6)
        return rates
    base = min(_timed(build(""), ok_status) for _ in range(2))
    for name, _unit, args, count, scale, _key in workloads:
        loaded = _timed(build(args.format(n=count)), ok_status)
        rates[name] = count * scale / max(loaded - base, 1e-3)
    return rates


def blk_format_rows(fmt: str, python_side: bool = True, only: str = "") -> list[dict]:
    """The virtio-blk rows of one image format alone, on a fresh image; ``only``: just
    the throughput rows whose name has it (e.g. "QD32"), no CPU rows."""
    with tempfile.TemporaryDirectory(prefix="kvmpy-bench-virtio-") as tmp:
        return _blk_rows(tmp, (fmt,), python_side, only)


def _blk_rows(tmp: str, formats: tuple[str, ...] = BLK_FORMATS, python_side: bool = True,
              only: str = "") -> list[dict]:
    """``python_side``: also time dataplane=python for the notes (a third of the runs).
    ``only``: see blk_format_rows."""
    workloads = tuple(w for w in BLK_WORKLOADS if only in w[0])
    images = _blk_images(tmp, formats)
    tsc_hz = _tsc_hz() if _kvm_ok() else None
    timing = (f"guest TSC cycles at {tsc_hz / 1e9:.3f} GHz, best of {GUEST_TIMED_RUNS}" if tsc_hz
              else "wall time less an idle boot")
    rows = []
    for fmt in formats:
        results: dict[str, dict[str, float]] = {}
        cpu: dict[str, dict[str, float]] = {}
        notes, cpu_notes = [], []
        img = images.get(fmt)
        if img is None:
            notes.append(f"qemu-img cannot make a {fmt} image")
        else:
            # Like for like: kvmpy bypasses the page cache where QEMU does.
            kvmpy_cache = "none" if _o_direct_ok(img) else "writeback"
            notes.append(f"kvmpy cache={kvmpy_cache}")

            def k(dataplane):
                return lambda append: _kvmpy_cmd("virtio_blk", append, [
                    "--drive", f"file={img},format={fmt},dataplane={dataplane},cache={kvmpy_cache}"])

            sides = []
            if QEMU is None:
                notes.append("qemu: not installed")
            else:
                # QEMU's fastest mode that boots and also gets through the work: in the
                # nested L1, QEMU's cache=none,aio=io_uring boots, then a request never
                # completes (the test guest's 19 s timeout); the next mode is tried then.
                for drive_opts, label in _qemu_cache_modes(img):
                    def q(append, drive_opts=drive_opts):
                        return _qemu_cmd("virtio_blk", append, [
                            "-device", "virtio-blk-pci,drive=d0,disable-legacy=on",
                            "-drive", f"if=none,id=d0,file={img},format={fmt},{drive_opts}"])
                    try:
                        _timed(q(""), 1)
                        results["qemu"] = _blk_side_rates(q, 1, tsc_hz, workloads)
                    except Exception as e:
                        notes.append(f"qemu {label}: {e}")
                        continue
                    sides.append(("qemu", q, 1))
                    notes.append(f"qemu {label}")
                    break
            # kvmpy-python: the same disk with every request in the Python model, for the note
            mine = [("kvmpy", k("native"), 0)]
            if python_side:
                mine.append(("kvmpy-python", k("python"), 0))
            for side, build, status in mine:
                try:
                    results[side] = _blk_side_rates(build, status, tsc_hz, workloads)
                except Exception as e:  # a side that cannot run says why; the other still reports
                    notes.append(f"{side}: {e}")
            sides += mine
            for side, build, status in sides if not only else ():
                if side == "kvmpy-python" or side not in results:
                    continue
                guest_seen: list[bool] = []
                try:
                    cpu[side] = _blk_side_cpu(build, status, guest_seen)
                except Exception as e:
                    cpu_notes.append(f"{side}: {e}")
                if _kvm_ok() and guest_seen and not any(guest_seen) and NO_GUEST_TIME_NOTE not in cpu_notes:
                    cpu_notes.append(NO_GUEST_TIME_NOTE)
        for name, unit, *_ in workloads:
            row = {"name": f"virtio-blk {fmt} {name}", "unit": unit,
                   "kvmpy": round(results["kvmpy"][name], 1) if "kvmpy" in results else None,
                   "qemu": round(results["qemu"][name], 1) if "qemu" in results else None}
            row_notes = [timing] + notes
            if "kvmpy-python" in results:
                row_notes.append(f"python data plane: {results['kvmpy-python'][name]:.1f}")
            if row_notes:
                row["note"] = "; ".join(row_notes)
            rows.append(row)
        for name, *_ in BLK_CPU_WORKLOADS if not only else ():
            rows.append({"name": f"virtio-blk {fmt} {name}", "unit": CPU_UNIT,
                         "kvmpy": round(cpu["kvmpy"][name], 2) if "kvmpy" in cpu else None,
                         "qemu": round(cpu["qemu"][name], 2) if "qemu" in cpu else None,
                         "note": "; ".join(["lower is better; Firecracker's aim is 0.7 (1 GiB/s on 70% of a core)"]
                                          + [n for n in notes if n.startswith(("qemu", "kvmpy cache"))]
                                          + cpu_notes)})
    return rows


class _Counter:
    def __init__(self, netns: str, bridge: str) -> None:
        from kvmpy.tap import run_in_netns
        self.sock = run_in_netns(netns, self._open, bridge)
        self.count = 0
        self.stop = False
        self.streaming = threading.Event()
        self.streamer: threading.Thread | None = None
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    @staticmethod
    def _open(bridge):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_TYPE))
        s.bind((bridge, 0))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        s.settimeout(0.2)
        return s

    def _loop(self):
        while not self.stop:
            try:
                frame = self.sock.recv(2048)
            except socket.timeout:
                continue
            except OSError:
                return
            if frame[12:14] != struct.pack("!H", ETH_TYPE):
                continue
            self.count += 1
            if b"kvmpy-net-ping" in frame[14:40]:
                # answer pings so the guest's echo phase passes
                self.sock.send((frame[6:12] + b"\x02\0\0\0\0\x01" + frame[12:14] + b"echo:" + frame[14:]).ljust(60, b"\0"))
            elif frame[14:31] == b"kvmpy-net-rxflood":
                self._stop_stream()
                self.streaming.set()
                self.streamer = threading.Thread(target=self._stream, args=(frame[6:12],), daemon=True)
                self.streamer.start()
            elif frame[14:30] == b"kvmpy-net-rxdone":
                self._stop_stream()

    def _stream(self, mac: bytes) -> None:
        """Frames for the guest as fast as this socket sends them (the tap drops what
        the VMM does not take in time), until the guest has counted enough."""
        frame = (mac + b"\x02\0\0\0\0\x01" + struct.pack("!H", ETH_TYPE) + b"kvmpy-net-fill\0").ljust(60, b"\0")
        send = self.sock.send
        while self.streaming.is_set():
            for _ in range(64):
                try:
                    send(frame)
                except OSError:       # ENOBUFS: the bridge's queue is full
                    time.sleep(0)

    def _stop_stream(self) -> None:
        self.streaming.clear()
        if self.streamer is not None:
            self.streamer.join()
            self.streamer = None

    def close(self):
        self.stop = True
        self.thread.join()
        self._stop_stream()
        self.sock.close()


NET_ROWS = (("virtio-net tx to bridge", "flood", FLOOD), ("virtio-net rx from bridge", "rxflood", RX_FLOOD),
            ("virtio-net tx vhost", "flood", FLOOD))
VHOST_ROW = "virtio-net tx vhost"


def _net_rate(cmd_for, work: int, ok_status: int, prefix: list[str], key: str, tsc_hz: int | None,
              ring_errors: list[str] | None = None) -> float:
    """Frames per second on one side: under KVM from the guest's own TSC cycles around
    its flood (best of GUEST_TIMED_RUNS; no boot, no process start in them, which under
    the nested L1 vary by more than the flood takes), else from wall times."""
    if not tsc_hz:
        return _rate(cmd_for, work, ok_status, prefix)
    cycles = min(_net_cycles(prefix + cmd_for(True), ok_status, key, work, ring_errors)
                 for _ in range(GUEST_TIMED_RUNS))
    return work / max(cycles / tsc_hz, 1e-6)


def _net_cycles(argv: list[str], ok_status: int, key: str, work: int, ring_errors: list[str] | None = None) -> int:
    return int(_guest_match(argv, ok_status, rf"virtio-net: {key} {work} frames cycles (\d+)", ring_errors).group(1))


def _ring_error_note(side: str, lines: list[str]) -> str:
    return f"{side}: {len(lines)} ring error lines, the first: {lines[0][:300]}"


@contextlib.contextmanager
def _net_bridge(qemu_tap: bool):
    """A network namespace with the bridge kbr0, the frame counter on it (it answers
    pings and streams the rx floods) and, for QEMU, the tap qtap0 on the bridge;
    yields the command prefix that runs a VMM in the namespace."""
    ns = f"kvmpybench-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "add", "kbr0", "type", "bridge"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "kbr0", "up"], check=True)
        counter = _Counter(ns, "kbr0")
        try:
            if qemu_tap:
                for cmd in (["ip", "-n", ns, "tuntap", "add", "qtap0", "mode", "tap", "vnet_hdr"],
                            ["ip", "-n", ns, "link", "set", "qtap0", "master", "kbr0"],
                            ["ip", "-n", ns, "link", "set", "qtap0", "up"]):
                    subprocess.run(cmd, check=True)
            yield ["ip", "netns", "exec", ns]
        finally:
            counter.close()
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def _kvmpy_net_cmd(key: str, work: int, dataplane: str, vhost: str) -> list[str]:
    return _kvmpy_cmd("virtio_net", f"count=1 msix=1 {key}={work}",
                      ["--net", f"tap,ifname=ktap0,bridge=kbr0,dataplane={dataplane},vhost={vhost}"])


def net_rows(names: list[str] | None = None) -> list[dict]:
    """The virtio-net rows, or only those named."""
    wanted = [spec for spec in NET_ROWS if names is None or spec[0] in names]
    tsc_hz = _tsc_hz() if _kvm_ok() else None
    rows = [{"name": name, "unit": "frames/s", "kvmpy": None, "qemu": None} for name, _, _ in wanted]
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        for row in rows:
            row["note"] = "needs root and /dev/net/tun"
        return rows
    notes: list[list[str]] = [[] for _ in rows]
    with _net_bridge(QEMU is not None) as prefix:
        for row, note, (name, key, work) in zip(rows, notes, wanted):
            vhost = "on" if name == VHOST_ROW else "off"
            if vhost == "on" and not os.path.exists("/dev/vhost-net"):
                note.append("no /dev/vhost-net on this host (modprobe vhost_net; the nested L1 has it)")
                continue
            if QEMU is not None:
                def q(loaded, key=key, work=work, vhost=vhost):
                    return _qemu_cmd("virtio_net", f"count=1 msix=1 {key}={work if loaded else 0}", [
                        "-netdev", f"tap,id=n0,ifname=qtap0,script=no,downscript=no,vhost={vhost}",
                        "-device", "virtio-net-pci,netdev=n0,disable-legacy=on"])
                try:
                    row["qemu"] = round(_net_rate(q, work, 1, prefix, key, tsc_hz))
                except Exception as e:
                    note.append(f"qemu: {e}")
            else:
                note.append("qemu: not installed")
            # with vhost the kernel carries the frames: kvmpy's data plane choice does not apply
            for dataplane in (("native", "python") if vhost == "off" else ("native",)):
                def k(loaded, key=key, work=work, dataplane=dataplane, vhost=vhost):
                    return _kvmpy_net_cmd(key, work if loaded else 0, dataplane, vhost)
                ring_errors: list[str] = []
                try:
                    rate = round(_net_rate(k, work, 0, prefix, key, tsc_hz, ring_errors))
                except Exception as e:
                    note.append(f"kvmpy {dataplane}: {e}")
                    rate = None
                if ring_errors:
                    note.append(_ring_error_note(f"kvmpy {dataplane}", ring_errors))
                if rate is None:
                    continue
                if dataplane == "native":
                    row["kvmpy"] = rate
                else:
                    note.append(f"kvmpy dataplane=python: {rate}")
    timing = (f"guest TSC cycles at {tsc_hz / 1e9:.3f} GHz, best of {GUEST_TIMED_RUNS}" if tsc_hz
              else "wall time less an idle boot")
    for row, note in zip(rows, notes):
        row["note"] = "; ".join([timing] + note)
    return rows


def net_ring_check(names: list[str], dataplane: str = "python", repeats: int = 5) -> list[dict]:
    """Each named kvmpy net row run ``repeats`` times alone (no QEMU, one run per
    repetition) on ``dataplane``, for the ring errors a rare race leaves: a dict per row
    with the frames/s of each run (None for a failed one), how many runs failed, the
    count of lines per RING_ERROR_MARKS and the first lines in full."""
    results = []
    tsc_hz = _tsc_hz() if _kvm_ok() else None
    with _net_bridge(False) as prefix:
        for name, key, work in (spec for spec in NET_ROWS if spec[0] in names):
            vhost = "on" if name == VHOST_ROW else "off"
            rates: list[float | None] = []
            lines: list[str] = []
            failures: list[str] = []
            for _ in range(repeats):
                argv = prefix + _kvmpy_net_cmd(key, work, dataplane, vhost)
                try:
                    if tsc_hz:
                        rates.append(round(work / max(_net_cycles(argv, 0, key, work, lines) / tsc_hz, 1e-6)))
                    else:
                        rates.append(round(work / max(_timed(argv, 0), 1e-3)))
                except Exception as e:
                    rates.append(None)
                    failures.append(str(e)[:300])
                # progress as it comes: a silent console is what the nested harness takes for a stuck L1
                print(f"bench.virtio: {name} ({dataplane}) run {len(rates)}/{repeats}: {rates[-1]} frames/s, "
                      f"{len(lines)} ring error lines so far", file=sys.stderr, flush=True)
            results.append({"name": name, "dataplane": dataplane, "vhost": vhost, "runs": repeats,
                            "frames_per_s": rates, "failed_runs": len(failures), "failures": failures[:3],
                            "ring_errors": {mark: sum(mark in line for line in lines) for mark in RING_ERROR_MARKS},
                            "first_lines": lines[:6]})
    return results


def run() -> list[dict]:
    r = subprocess.run(["make", "-s", "-C", GUESTS], capture_output=True, text=True)
    if r.returncode != 0:
        note = "cannot build tests/guests: " + (r.stdout + r.stderr).strip()[-200:]
        return [{"name": n, "kvmpy": None, "qemu": None, "unit": u, "note": note}
                for n, u in blk_row_names() + [(name, "frames/s") for name, _, _ in NET_ROWS]]
    with tempfile.TemporaryDirectory(prefix="kvmpy-bench-virtio-") as tmp:
        rows = _blk_rows(tmp)
    rows += net_rows()
    return rows


def parts(blk_limit: float = 1500.0, net_limit: float = 600.0, python_side: bool = True,
          blk_only: str = "") -> list:
    """The rows as bench.parts runs them: each image format's blk rows and each net
    row with its own deadline. ``python_side``: the blk notes' dataplane=python figures;
    ``blk_only``: only the blk rows whose name has it (blk_format_rows' ``only``)."""
    from bench.parts import Part
    suffix = f" {blk_only}" if blk_only else ""
    return ([Part(f"virtio-blk {fmt}{suffix}", "bench.virtio", "blk_format_rows", (fmt, python_side, blk_only),
                  blk_limit)
             for fmt in BLK_FORMATS]
            + [Part(name, "bench.virtio", "net_rows", ([name],), net_limit) for name, _, _ in NET_ROWS])


def main(argv: list[str]) -> int:
    import argparse
    import json
    p = argparse.ArgumentParser(prog="python3 -m bench.virtio", description="every row, or a check of the net rows")
    p.add_argument("--ring-check", action="append", metavar="ROW", choices=[name for name, _, _ in NET_ROWS],
                   help="run this net row's kvmpy side --repeats times and count its ring errors (JSON lines)")
    p.add_argument("--dataplane", choices=("python", "native"), default="python")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats: {args.repeats} must be at least 1")
    if args.ring_check:
        for result in net_ring_check(args.ring_check, args.dataplane, args.repeats):
            print(json.dumps(result), flush=True)
        return 0
    for row in run():
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
