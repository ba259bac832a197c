"""Crash consistency of qcow2 overlays under a writing guest: SIGKILL and power loss.

The guest (tests/guests/blk_crash.c) writes numbered, self-describing records (and
now and then a WRITE_ZEROES, half of them unmapping) over a qcow2 overlay of a raw
base, and prints "flushed S" after every completed FLUSH: writes below S are then
durable. The test reads the console, SIGKILLs `kvmpy run` at a random moment (right
after a "flushed" line, after a random delay, or while a thread of the VMM is inside
fdatasync, i.e. mid-flush, or inside pwrite), and then asks the real tools:

- `qemu-img check` must find no corruption. Its exit status tells the two apart:
  0 clean, 3 only leaked clusters (expected: a crash between allocating clusters
  and pointing a table at them leaks them, as in QEMU), 2 corruption, 1 the check
  itself failed. The JSON's "corruptions" and "check-errors" must be absent too.
- `qemu-img convert` to raw (QEMU's reader, not ours) must show every sector of
  every acknowledged write holding what that write left or what a later write
  did; sectors of the backing file nobody durably wrote must hold the backing
  file's data (copy-on-write kept it) or a later record; nothing else may appear.

Each cycle boots again from the crashed overlay with start=S (the last acknowledged
flush), so the guest re-issues byte for byte what the crash may have cut off and
first reads back, through kvmpy's own virtio-blk and qcow2 code, the last durable
writes (verify=); the last boot reads back every durable write and exits cleanly.
Three images: 4 KiB clusters, 64 KiB clusters on a 4 GiB disk (several L2
tables), and 512-byte clusters with 64-bit refcounts (refcount blocks of 64
clusters, so the refcount table itself moves to a new place as the file grows).
The same with a driver that does not negotiate FLUSH: its disk is write-through.

A SIGKILL keeps whatever the VMM had written; a power loss does not, so the second
half of the module logs kvmpy's writes and syncs on the image and rebuilds images
as a power loss would leave them (see "power loss" below). The writer and its
model are checked under QEMU too, so a failure elsewhere is kvmpy's.

Seeded: KVMPY_CRASH_SEED=N repeats a run (the seed is in every failure message);
under CI the seed is fixed, otherwise fresh. KVMPY_FUZZ=1 runs more cycles and
power-loss states.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import struct
import subprocess
import sys
import time

import pytest

from conftest import KVM_SKIP_REASON, ROOT, guest_path, tool_required

FUZZ = bool(os.environ.get("KVMPY_FUZZ"))
if os.environ.get("KVMPY_CRASH_SEED"):
    MASTER_SEED = int(os.environ["KVMPY_CRASH_SEED"])
elif os.environ.get("CI") and not FUZZ:
    MASTER_SEED = 20240601
else:
    MASTER_SEED = random.randrange(1 << 32)

M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
REC_MAGIC = 0x43455259504D564B          # "KVMPYREC" as a little-endian u64
FNV_OFFSET, FNV_PRIME = 0xCBF29CE484222325, 0x100000001B3
SECTOR = 512
BASE_SECTORS = 16384                     # the raw base: 8 MiB, the guest's hot= region
_FILL_KEYS = [(i * GOLDEN) & M64 for i in range(4, 63)]
_RECORD = struct.Struct("<64Q")

# x86-64 syscall numbers, for "what was the VMM doing when it was killed"
SYSCALLS = {74: "fsync", 75: "fdatasync", 18: "pwrite64", 20: "writev", 296: "pwritev", 17: "pread64",
            295: "preadv"}


def mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


class Workload:
    """The guest's writes, computed exactly as blk_crash.c does."""

    def __init__(self, seed: int, capacity: int, hot: int = BASE_SECTORS, maxlen: int = 24, zero_mod: int = 16):
        self.seed, self.capacity, self.maxlen = seed, capacity, maxlen
        self.zero_mod = zero_mod        # 1 in zero_mod writes is a WRITE_ZEROES (the guest: 16)
        hot = min(hot, capacity)
        self.hot = hot if hot >= maxlen else 0
        self._writes: dict[int, tuple[int, int, bool]] = {}
        self._records: dict[tuple[int, int], bytes] = {}

    def write(self, s: int) -> tuple[int, int, bool]:
        """(first sector, number of sectors, is a WRITE_ZEROES) of write number s."""
        w = self._writes.get(s)
        if w is None:
            h = mix((self.seed + (s + 1) * GOLDEN) & M64)
            h2 = mix(h)
            nsect = 1 + h % self.maxlen
            limit = self.hot if (h >> 20) & 1 and self.hot else self.capacity
            w = self._writes[s] = (h2 % (limit - nsect + 1), nsect, (h >> 40) % self.zero_mod == 0)
        return w

    def record(self, s: int, sector: int) -> bytes:
        r = self._records.get((s, sector))
        if r is None:
            first, nsect, _ = self.write(s)
            base = (((s << 32) ^ sector) * 0xBF58476D1CE4E5B9) & M64
            w = [REC_MAGIC, s, sector, first | nsect << 48]
            w.extend(base ^ k for k in _FILL_KEYS)
            c = FNV_OFFSET
            for x in w:
                c = ((c ^ x) * FNV_PRIME) & M64
            w.append(c)
            r = self._records[(s, sector)] = _RECORD.pack(*w)
        return r

    def valid_record(self, data: bytes, sector: int) -> int | None:
        """The number of the data write covering ``sector`` that ``data`` is the exact
        record of, else None."""
        if data[:8] != b"KVMPYREC":
            return None
        s = int.from_bytes(data[8:16], "little")
        first, nsect, zero = self.write(s)
        if zero or not first <= sector < first + nsect or data != self.record(s, sector):
            return None
        return s

    def unmap(self, s: int) -> bool:
        """Whether WRITE_ZEROES number s carries the UNMAP flag."""
        return bool(mix((self.seed + (s + 1) * GOLDEN) & M64) >> 44 & 1)

    def zeroed_by(self, sector: int, after: int, until: int) -> bool:
        """Whether a WRITE_ZEROES numbered in (after, until) covers ``sector``."""
        for s in range(after + 1, until):
            first, nsect, zero = self.write(s)
            if zero and first <= sector < first + nsect:
                return True
        return False


_BASE_FILL = bytes(range(256)) * 3
_ZERO_SECTOR = bytes(SECTOR)


def base_sector(sector: int) -> bytes:
    k = sector % 256
    return b"KVMPYBAS" + sector.to_bytes(8, "little") + _BASE_FILL[k:k + SECTOR - 16]


def make_base(path) -> None:
    with open(path, "wb") as f:
        f.write(b"".join(base_sector(i) for i in range(BASE_SECTORS)))


class Durable:
    """Per sector, the last write the guest saw acknowledged durable."""

    def __init__(self, workload: Workload):
        self.wl = workload
        self.last: dict[int, int] = {}
        self.upto = 0              # writes below this are durable

    def advance(self, upto: int) -> None:
        for s in range(self.upto, upto):
            first, nsect, _ = self.wl.write(s)
            for sector in range(first, first + nsect):
                self.last[sector] = s
        self.upto = max(self.upto, upto)


def qemu_img_check(qemu_img: str, image, what: str) -> dict:
    # A killed VMM's io_uring is torn down by the kernel after the process is gone,
    # and its requests hold the image (and so its lock) until then: wait a little.
    deadline = time.monotonic() + 10
    while True:
        r = subprocess.run([qemu_img, "check", "-f", "qcow2", "--output=json", str(image)],
                           capture_output=True, text=True)
        if r.returncode != 1 or "lock" not in r.stderr or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    # 0: clean, 3: leaked clusters only (a crash after allocating, before the table
    # update pointing at them), 2: corruption, 1: the check could not run.
    assert r.returncode in (0, 3), f"{what}: qemu-img check exit {r.returncode}\n{r.stdout}{r.stderr}"
    info = json.loads(r.stdout)
    assert not info.get("corruptions") and not info.get("check-errors"), f"{what}: {info}"
    return info


def check_contents(qemu_img: str, image, flat, durable: Durable, maybe_until: int, what: str,
                   snapshot: str | None = None) -> None:
    """Reads the overlay (or its internal ``snapshot``) through qemu-img (convert to
    raw) and checks every sector the guest durably wrote, the whole backing region,
    and the sectors of writes below ``maybe_until`` that may have landed after the
    last acknowledgement."""
    snap = ["-l", f"snapshot.name={snapshot}"] if snapshot else []
    subprocess.run([qemu_img, "convert", "-f", "qcow2", *snap, "-O", "raw", str(image), str(flat)], check=True)
    wl = durable.wl
    upto = durable.upto
    fd = os.open(flat, os.O_RDONLY)
    try:
        def sector_data(sector):
            return os.pread(fd, SECTOR, sector * SECTOR).ljust(SECTOR, b"\0")

        problems = []
        for sector, s in durable.last.items():
            data = sector_data(sector)
            got = wl.valid_record(data, sector)
            if wl.write(s)[2]:
                ok = data == _ZERO_SECTOR or (got is not None and got > s)
            else:
                ok = (got is not None and got >= s) or (data == _ZERO_SECTOR and wl.zeroed_by(sector, s, maybe_until))
            if not ok:
                problems.append(f"sector {sector}: durable write {s} ({'zeroes' if wl.write(s)[2] else 'data'}) "
                                f"lost, found {'write %d' % got if got is not None else describe(data)}")
        base_region = os.pread(fd, BASE_SECTORS * SECTOR, 0)
        for sector in range(BASE_SECTORS):
            if sector in durable.last:
                continue
            data = base_region[sector * SECTOR:(sector + 1) * SECTOR]
            if data != base_sector(sector) and wl.valid_record(data, sector) is None and not (
                    data == _ZERO_SECTOR and wl.zeroed_by(sector, upto - 1, maybe_until)):
                problems.append(f"sector {sector}: backing data lost, found {describe(data)}")
        for s in range(upto, maybe_until):
            first, nsect, _ = wl.write(s)
            for sector in range(first, first + nsect):
                if sector in durable.last or sector < BASE_SECTORS:
                    continue
                data = sector_data(sector)
                if data != _ZERO_SECTOR and wl.valid_record(data, sector) is None:
                    problems.append(f"sector {sector}: neither zeroes nor a record: {describe(data)}")
    finally:
        os.close(fd)
    assert not problems, f"{what}: {len(problems)} bad sectors, first: " + "; ".join(problems[:8])


def describe(data: bytes) -> str:
    if not any(data):
        return "zeroes"
    if data[:8] == b"KVMPYBAS" and data == base_sector(int.from_bytes(data[8:16], "little")):
        return "the backing file's data"
    if data[:8] in (b"KVMPYREC", b"KVMPYBAS"):
        return f"{data[:8].decode()} no. {int.from_bytes(data[8:16], 'little')} (bad content)"
    return f"bytes {data[:16].hex()}"


def thread_syscalls(pid: int) -> list[str]:
    """What each thread of ``pid`` is in the middle of (/proc/PID/task/*/syscall)."""
    out = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                word = f.read().split(" ", 1)[0]
        except OSError:
            continue
        if word.lstrip("-").isdigit():
            out.append(SYSCALLS.get(int(word), f"syscall {word}"))
    return out


class Vmm:
    """`kvmpy run` of the writer guest, its console read line by line."""

    def __init__(self, accel: str, image, cmdline: str, log):
        args = [sys.executable, "-m", "kvmpy", "run", "--kernel", guest_path("blk_crash"), "--append", cmdline,
                "--drive", f"file={image},format=qcow2", "-m", "64"]
        if accel == "kvm":
            args.insert(4, "--enable-kvm")
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.stderr = open(log, "wb")
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self.stderr)
        self.buf = b""
        self.lines: list[str] = []

    def readline(self, deadline: float) -> str | None:
        """The next console line, or None at EOF or the deadline."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        text = line.decode(errors="replace").rstrip("\r")
        self.lines.append(text)
        return text

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def close(self) -> str:
        if self.proc.poll() is None:
            self.kill()
        self.proc.stdout.close()
        self.stderr.close()
        with open(self.stderr.name, "rb") as f:
            return f.read().decode(errors="replace")

    def transcript(self) -> str:
        return "\n".join(self.lines[-12:]) + "\n--- stderr:\n" + self.close()[-3000:]


# (cluster size, virtual size, extra qemu-img -o options)
IMAGES = {
    "4k": (4096, 1 << 30, []),
    "64k": (65536, 4 << 30, []),
    "512-rc64": (512, 256 << 20, ["refcount_bits=64"]),
}
CYCLES = {"4k": 7, "64k": 7, "512-rc64": 6}      # 20 kill cycles per accelerator
if FUZZ:
    CYCLES = {k: 25 for k in CYCLES}
WRITES_PER_CYCLE = 320    # at most, before the kill; at least 8
VERIFY_WRITES = 64        # durable writes the guest reads back on each boot after a crash
# Writes past the last acknowledgement that may have landed before the kill: at
# most an ack interval plus the ~20 ms of console output a SIGKILL can lose.
MAYBE_LANDED = 400
WRITETHROUGH_CYCLES = 3 if not FUZZ else 10
POWER_LOSS_WRITES = 400
POWER_LOSS_STATES = 100 if not FUZZ else 1000     # at random moments
POWER_LOSS_LONE = 40 if not FUZZ else None         # right after a table entry update (None: all)


def accel_params():
    return [pytest.param("kvm", marks=pytest.mark.skipif(KVM_SKIP_REASON is not None,
                                                         reason=KVM_SKIP_REASON or "")), "tcg"]


def run_cycles(accel: str, image_kind: str, cycles: int, tmp_path, writethrough: bool = False) -> str:
    """``cycles`` boots of the writer on one overlay, each SIGKILLed and checked,
    then a last boot that reads everything back and exits; returns a summary line."""
    qemu_img = tool_required("qemu-img")
    mode_tag = "-wt" if writethrough else ""
    rng = random.Random(MASTER_SEED ^ (sum(map(ord, accel + image_kind + mode_tag)) << 16))
    cluster, vsize, opts = IMAGES[image_kind]
    base, overlay, flat = tmp_path / "base.raw", tmp_path / "overlay.qcow2", tmp_path / "flat.raw"
    make_base(base)
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-o", ",".join([f"cluster_size={cluster}", *opts]),
                    "-b", str(base), "-F", "raw", str(overlay), str(vsize)], check=True)
    guest_seed = rng.randrange(1 << 32)
    durable = Durable(Workload(guest_seed, vsize // SECTOR))
    tag = f"KVMPY_CRASH_SEED={MASTER_SEED} {accel}/{image_kind}{mode_tag}"
    ack = "written " if writethrough else "flushed "
    wt = " wt=1" if writethrough else ""
    kills: list[str] = []
    for cycle in range(cycles):
        start = durable.upto
        flush_every = rng.choice([1, 3, 8, 16])
        target = max(1, rng.randint(8, WRITES_PER_CYCLE) // flush_every)
        mode = rng.choice(["line", "delay", "sync", "write"])
        what = f"{tag} cycle {cycle} (start {start}, ack every {flush_every}, kill {mode} after {target} acks)"
        cmdline = f"seed={guest_seed} start={start} flush={flush_every}{wt}"
        if start:
            cmdline += f" verify={VERIFY_WRITES}"
        vmm = Vmm(accel, overlay, cmdline, tmp_path / f"stderr.{cycle}")
        seen = start
        acks = 0
        deadline = time.monotonic() + 60
        try:
            while acks < target:
                line = vmm.readline(deadline)
                if line is None:
                    pytest.fail(f"{what}: the guest stopped before {target} acknowledgements\n{vmm.transcript()}")
                if line.startswith(ack):
                    seen = int(line.split()[1])
                    acks += 1
                elif line.startswith(("verify: sector", "crash: ", "virtio:")) and "capacity" not in line:
                    pytest.fail(f"{what}: {line}\n{vmm.transcript()}")
            if start:
                assert f"verify: {min(start, VERIFY_WRITES)} writes ok" in vmm.lines, f"{what}\n{vmm.transcript()}"
            if mode == "delay":
                time.sleep(rng.uniform(0, 0.03))
            else:
                # Kill while some thread is inside a sync (mid-flush) or a write of
                # the image, or after half a second of waiting for one anyway.
                wanted = {"sync": {"fdatasync", "fsync"}, "write": {"pwrite64", "pwritev"}}.get(mode, set())
                until = time.monotonic() + 0.5
                while wanted and time.monotonic() < until and not set(thread_syscalls(vmm.proc.pid)) & wanted:
                    pass
            doing = thread_syscalls(vmm.proc.pid)
            vmm.kill()
            kills.append(next((d for d in doing if d in ("fdatasync", "fsync", "pwrite64", "pwritev")), "other"))
            # What the console had already delivered counts too.
            while (line := vmm.readline(time.monotonic() + 0.2)) is not None:
                if line.startswith(ack):
                    seen = int(line.split()[1])
        finally:
            err = vmm.close()
        assert "Traceback" not in err and "preventing invalid write" not in err, f"{what}\n{err[-3000:]}"
        durable.advance(seen)
        qemu_img_check(qemu_img, overlay, what)
        check_contents(qemu_img, overlay, flat, durable, durable.upto + MAYBE_LANDED, what)

    # The last boot reads every durable write back through kvmpy and stops cleanly.
    start = durable.upto
    cmdline = f"seed={guest_seed} start={start} flush=4 count=16 verify={start}{wt}"
    vmm = Vmm(accel, overlay, cmdline, tmp_path / "stderr.final")
    deadline = time.monotonic() + 120
    while vmm.readline(deadline) not in (None, "guest: done"):
        pass
    lines = list(vmm.lines)
    vmm.proc.wait(timeout=30)
    err = vmm.close()
    assert vmm.proc.returncode == 0 and f"verify: {start} writes ok" in lines, \
        f"{tag} final boot: status {vmm.proc.returncode}\n" + "\n".join(lines[-12:]) + err[-3000:]
    durable.advance(start + 16)
    info = qemu_img_check(qemu_img, overlay, f"{tag} after the final boot")
    # Writes the last crashed boot made past its last acknowledgement may still be there.
    check_contents(qemu_img, overlay, flat, durable, start + MAYBE_LANDED, f"{tag} after the final boot")
    return (f"{tag}: {len(kills)} kills ({', '.join(f'{k} {kills.count(k)}' for k in sorted(set(kills)))}), "
            f"{durable.upto} durable writes, {info.get('leaks', 0)} leaked clusters")


@pytest.mark.parametrize("image_kind", list(IMAGES))
@pytest.mark.parametrize("accel", accel_params())
def test_sigkill_cycles(accel, image_kind, tmp_path):
    print(run_cycles(accel, image_kind, CYCLES[image_kind], tmp_path))


@pytest.mark.parametrize("accel", accel_params())
def test_sigkill_cycles_writethrough(accel, tmp_path):
    """A driver that does not negotiate VIRTIO_BLK_F_FLUSH has a write-through disk
    (virtio 1.1, 5.2.6.2): each completed write is stable. kvmpy used to keep the
    qcow2 metadata of such writes cached until some later flush that never came, so
    a SIGKILL lost completed writes to newly allocated clusters."""
    print(run_cycles(accel, "4k", WRITETHROUGH_CYCLES, tmp_path, writethrough=True))


# ---------------------------------------------------------------- power loss
#
# A SIGKILL keeps everything the VMM wrote (the page cache survives); a power
# loss keeps what was synced and any subset of the sectors written since the
# last sync, in any order (what a disk with a volatile cache may do). So the
# writes and syncs kvmpy makes on the image are logged, in order, while the
# writer's requests go through a real virtio-blk device (the virtio_driver
# scaffolding of test_virtio_blk), and images are rebuilt as a power loss at
# random moments would leave them. qemu-img must find each consistent and every
# acknowledged write in it; a misordered table update (an L2 entry synced before
# the refcount or data it points at, a cluster freed before the table dropping
# it is durable) shows up as corruption or lost data in some of them.


class WriteLog:
    """Every write and sync made on one file descriptor, in order, with the bytes
    written (dm-log-writes' record, one layer up). The calls themselves go through
    to the file unchanged."""

    def __init__(self, fd: int):
        self.fd = fd
        self.entries: list[tuple] = []    # ("w", offset, bytes) | ("sync",) | ("ack", durable_upto)

    def install(self, monkeypatch) -> None:
        real = {name: getattr(os, name) for name in ("pwrite", "pwritev", "fdatasync", "fsync", "ftruncate")}
        log, fd0 = self.entries, self.fd

        def pwrite(fd, data, offset):
            n = real["pwrite"](fd, data, offset)
            if fd == fd0:
                log.append(("w", offset, bytes(memoryview(data).cast("B")[:n])))
            return n

        def pwritev(fd, buffers, offset):
            n = real["pwritev"](fd, buffers, offset)
            if fd == fd0:
                log.append(("w", offset, b"".join(bytes(memoryview(b).cast("B")) for b in buffers)[:n]))
            return n

        def sync(name):
            def call(fd):
                real[name](fd)
                if fd == fd0:
                    log.append(("sync",))
            return call

        def ftruncate(fd, length):
            if fd == fd0:
                raise AssertionError("the log does not model truncation; the writer never shrinks the image")
            return real["ftruncate"](fd, length)

        for name, fn in (("pwrite", pwrite), ("pwritev", pwritev), ("fdatasync", sync("fdatasync")),
                         ("fsync", sync("fsync")), ("ftruncate", ftruncate)):
            monkeypatch.setattr(os, name, fn)


def apply_write(img: bytearray, offset: int, data: bytes) -> None:
    end = offset + len(data)
    if end > len(img):
        img.extend(bytes(end - len(img)))
    img[offset:end] = data


def sector_pieces(writes: list) -> dict[int, list[tuple[int, int, bytes]]]:
    """Per 512-byte sector of the file, the pieces of ``writes`` that land in it, in
    program order: (index of the write, offset in the sector, bytes)."""
    pieces: dict[int, list] = {}
    for i, (_, offset, data) in enumerate(writes):
        pos = 0
        while pos < len(data):
            sector, at = divmod(offset + pos, SECTOR)
            n = min(SECTOR - at, len(data) - pos)
            pieces.setdefault(sector, []).append((i, at, data[pos:pos + n]))
            pos += n
    return pieces


def apply_prefix(img: bytearray, sector: int, pieces: list, n: int) -> None:
    for _, at, data in pieces[:n]:
        apply_write(img, sector * SECTOR + at, data)


def power_loss_states(initial: bytes, entries: list, count: int, rng: random.Random):
    """(image bytes, writes acknowledged durable, sync number) for ``count`` power
    losses at random moments: what was written before some sync is on disk; of the
    writes between it and the next sync, each 512-byte sector holds the result of
    some prefix of the writes to it (the page cache writes back a page as it is at
    that moment, and a disk keeps or loses each sector of it)."""
    syncs = [i for i, e in enumerate(entries) if e[0] == "sync"]
    ends = syncs[1:] + [len(entries)]
    # After a sync followed by fewer than two writes, every state is one the
    # writer's ordering makes safe by construction; the others are worth a look.
    candidates = [k for k in range(len(syncs))
                  if sum(1 for e in entries[syncs[k]:ends[k]] if e[0] == "w") >= 2]
    points = sorted(rng.sample(candidates, min(count, len(candidates))))
    img = bytearray(initial)
    done = 0
    for k in points:
        for e in entries[done:syncs[k]]:
            if e[0] == "w":
                apply_write(img, e[1], e[2])
        done = syncs[k]
        # A flush acknowledged before the next sync had its last sync at or before
        # this one: its writes are in the synced part.
        acked = max([0] + [e[1] for e in entries[:ends[k]] if e[0] == "ack"])
        writes = [e for e in entries[syncs[k]:ends[k]] if e[0] == "w"]
        pieces = sector_pieces(writes)
        state = bytearray(img)
        if rng.random() < 0.5:
            # Sectors last written late in the interval landed, the others did
            # not: the state that exposes a write that should have waited for a sync.
            split = rng.randrange(1, len(writes))
            for sector, p in pieces.items():
                if p[-1][0] >= split:
                    apply_prefix(state, sector, p, len(p))
        else:
            keep = rng.random()
            for sector, p in pieces.items():
                apply_prefix(state, sector, p, len(p) if rng.random() < keep else rng.randrange(len(p)))
        yield bytes(state), acked, k


def lone_write_states(initial: bytes, entries: list, max_length: int = 16, count: int | None = None,
                      rng: random.Random | None = None, where: range | None = None):
    """For every write of at most ``max_length`` bytes (a table entry, a header
    field: what makes new metadata reachable), the image as a power loss right
    after it could leave it: what was synced before it, plus its own sector as this
    write (and the earlier ones to that sector since the sync) left it, and nothing
    else. Whatever such a write points at must already have been durable.
    ``where``: only writes at those offsets; ``count``: only that many of them,
    picked with ``rng``."""
    small = [i for i, e in enumerate(entries)
             if e[0] == "w" and len(e[2]) <= max_length and (where is None or e[1] in where)]
    if count is not None and count < len(small):
        small = rng.sample(small, count)
    chosen = set(small)
    img = bytearray(initial)
    interval: list = []
    for i, e in enumerate(entries):
        if e[0] == "sync":
            for w in interval:
                apply_write(img, w[1], w[2])
            interval = []
        elif e[0] == "w":
            interval.append(e)
            if i in chosen:
                state = bytearray(img)
                for sector, p in sector_pieces(interval).items():
                    if p[-1][0] == len(interval) - 1:
                        apply_prefix(state, sector, p, len(p))
                yield bytes(state), e[1]


POWER_LOSS_CASES = {
    "4k-flush": ("4k", True, None),
    "512-rc64-flush": ("512-rc64", True, None),
    "4k-writethrough": ("4k", False, None),
    # An internal snapshot shares every table and cluster: writes copy them first.
    "4k-snapshot": ("4k", True, "snapshot"),
    # The base's data compressed into the image itself (no backing file): several
    # guest clusters share a host cluster, and overwriting one frees a reference.
    "4k-compressed": ("4k", True, "compressed"),
}
SNAPSHOT_AT = 100        # writes made before `qemu-img snapshot -c`


def blk_writes(rig, wl: Workload, writes: range, flush: bool, log: WriteLog | None, tag: str) -> None:
    """The writer's requests through a virtio-blk device, FLUSH every 4 (or none:
    write-through); with ``log``, each acknowledgement is noted in it."""
    from kvmpy.devices.virtio.blk import (VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_OUT,
                                          VIRTIO_BLK_T_WRITE_ZEROES)
    for s in writes:
        first, nsect, zero = wl.write(s)
        if zero:
            seg = struct.pack("<QII", first, nsect, 1 if wl.unmap(s) else 0)
            st = rig.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, out=seg)[0]
        else:
            data = b"".join(wl.record(s, x) for x in range(first, first + nsect))
            st = rig.request(VIRTIO_BLK_T_OUT, first, out=data)[0]
        assert st == VIRTIO_BLK_S_OK, f"{tag}: write {s} failed"
        if flush and (s + 1) % 4 == 0:
            assert rig.request(VIRTIO_BLK_T_FLUSH, 0)[0] == VIRTIO_BLK_S_OK, f"{tag}: flush failed"
        if log is not None and (not flush or (s + 1) % 4 == 0):
            log.entries.append(("ack", s + 1))


@pytest.mark.parametrize("case", list(POWER_LOSS_CASES))
def test_power_loss_states(case, tmp_path, monkeypatch):
    from test_virtio_blk import Rig

    qemu_img = tool_required("qemu-img")
    image_kind, flush, prep = POWER_LOSS_CASES[case]
    snapshot = prep == "snapshot"
    rng = random.Random(MASTER_SEED ^ (sum(map(ord, f"power{case}")) << 16))
    cluster, vsize, opts = IMAGES[image_kind]
    base, overlay, flat = tmp_path / "base.raw", tmp_path / "overlay.qcow2", tmp_path / "flat.raw"
    make_base(base)
    options = ",".join([f"cluster_size={cluster}", *opts])
    if prep == "compressed":
        subprocess.run([qemu_img, "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", options, str(base),
                        str(overlay)], check=True)
        subprocess.run([qemu_img, "resize", "-q", str(overlay), str(vsize)], check=True)
    else:
        subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-o", options, "-b", str(base), "-F", "raw",
                        str(overlay), str(vsize)], check=True)
    # More WRITE_ZEROES (with UNMAP half the time) on a smaller hot region than the
    # guest's: clusters are freed and reused, the ordering most easily got wrong.
    wl = Workload(rng.randrange(1 << 32), vsize // SECTOR, hot=4096, zero_mod=4)
    tag = f"KVMPY_CRASH_SEED={MASTER_SEED} power loss {case}"
    first_write = 0
    if snapshot:
        rig = Rig(overlay, msix=False)
        try:
            blk_writes(rig, wl, range(SNAPSHOT_AT), True, None, tag)
        finally:
            rig.close()
        subprocess.run([qemu_img, "snapshot", "-c", "before", str(overlay)], check=True)
        first_write = SNAPSHOT_AT
    # The write log below sees the Python driver's pwrite/fsync calls; the native data
    # plane's writes (io_uring, its own threads) pass beside it, so the power cut is
    # modelled on the Python path. The native plane's writes reach the same file
    # through the same fd, and its FLUSH is the model's fsync.
    rig = Rig(overlay, flush=flush, msix=False, dataplane="python")
    try:
        initial = overlay.read_bytes()
        log = WriteLog(rig.driver.fd)
        log.install(monkeypatch)
        log.entries.append(("ack", first_write))
        blk_writes(rig, wl, range(first_write, POWER_LOSS_WRITES), flush, log, tag)
        monkeypatch.undo()
    finally:
        rig.close()
    entries = log.entries
    nsyncs = sum(1 for e in entries if e[0] == "sync")
    # FLUSH reaches fdatasync: every acknowledgement comes after a sync with no
    # write to the image in between.
    for i, e in enumerate(entries):
        if e[0] == "ack" and e[1] > first_write:
            last = next(x for x in reversed(entries[:i]) if x[0] != "ack")
            assert last[0] == "sync", f"{tag}: write {e[1] - 1} acknowledged with an unsynced write before it"
    crashed = tmp_path / "crashed.qcow2"
    leaks = states = 0
    for state, acked, k in power_loss_states(initial, entries, POWER_LOSS_STATES, rng):
        states += 1
        crashed.write_bytes(state)
        what = f"{tag}: power loss after sync {k} of {nsyncs} ({acked} writes acknowledged)"
        info = qemu_img_check(qemu_img, crashed, what)
        leaks += info.get("leaks", 0)
        if k % 4 == 0:     # the contents check costs more than qemu-img check: a sample
            durable = Durable(wl)
            durable.advance(acked)
            check_contents(qemu_img, crashed, flat, durable, POWER_LOSS_WRITES, what)
            if snapshot:
                before = Durable(wl)
                before.advance(SNAPSHOT_AT)
                check_contents(qemu_img, crashed, flat, before, SNAPSHOT_AT, f"{what}, snapshot", "before")
    lone = 0
    for state, offset in lone_write_states(initial, entries, count=POWER_LOSS_LONE, rng=rng):
        crashed.write_bytes(state)
        qemu_img_check(qemu_img, crashed, f"{tag}: power loss right after the table update at offset {offset}")
        lone += 1
    print(f"{tag}: {POWER_LOSS_WRITES - first_write} writes, {nsyncs} syncs, {states} random states "
          f"and {lone} after table updates checked, {leaks} leaked clusters in the random ones")


def test_power_loss_new_refcount_block_counted_by_a_new_block(tmp_path, monkeypatch):
    """Regression: a refcount block kvmpy creates inside the range of another block
    it has just created holds its refcount in that one. Both table entries were
    written after one sync; where they fall in different sectors a power loss could
    keep the second without the first, leaving the table pointing at a cluster with
    refcount 0 (`qemu-img check`: ERROR cluster N refcount=0 reference=1). With 1 KiB
    clusters and 64-bit refcounts a block covers 128 clusters and the table's two
    sectors meet between entries 63 and 64, crossed at 8 MiB of file."""
    from kvmpy.block import open_image

    qemu_img = tool_required("qemu-img")
    image = tmp_path / "disk.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-o", "cluster_size=1024,refcount_bits=64",
                    str(image), "64M"], check=True)
    drv = open_image(str(image), format="qcow2")
    try:
        initial = image.read_bytes()
        log = WriteLog(drv.fd)
        log.install(monkeypatch)
        chunk = random.Random(MASTER_SEED).randbytes(16384)
        # Flushing rarely puts several new blocks, each in its predecessor's range,
        # into one writeback.
        for i in range(560):
            drv.pwrite(chunk, i * len(chunk))
            if i % 48 == 47:
                drv.flush()
        drv.flush()
        monkeypatch.undo()
    finally:
        drv.close()
    table_writes = [e for e in log.entries if e[0] == "w" and 1024 <= e[1] < 2048]
    assert {(e[1] - 1024) // 8 for e in table_writes} >= {63, 64}, "the writes did not reach the second sector"
    crashed = tmp_path / "crashed.qcow2"
    for state, offset in lone_write_states(initial, log.entries, where=range(1024 + 60 * 8, 1024 + 68 * 8)):
        crashed.write_bytes(state)
        qemu_img_check(qemu_img, crashed, f"power loss right after the table update at offset {offset}")


def test_writer_and_model_under_qemu(tmp_path):
    """The writer guest and this module's model of it, checked against QEMU's own
    virtio-blk and qcow2: what the guest writes there is what the model expects, and
    a second boot reads it back. A failure here is in the guest or the model, not in
    kvmpy."""
    from test_virtio_guest_qemu import QEMU, qemu_cmd

    if QEMU is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    qemu_img = tool_required("qemu-img")
    base, overlay, flat = tmp_path / "base.raw", tmp_path / "overlay.qcow2", tmp_path / "flat.raw"
    make_base(base)
    vsize = 1 << 30
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", str(base), "-F", "raw",
                    str(overlay), str(vsize)], check=True)
    seed = random.Random(MASTER_SEED).randrange(1 << 32)
    drive = ["-device", "virtio-blk-pci,drive=d0,disable-legacy=on",
             "-drive", f"if=none,id=d0,file={overlay},format=qcow2"]
    for append, done in ((f"seed={seed} count=200 flush=8", 200), (f"seed={seed} start=200 count=40 verify=200", 240)):
        r = subprocess.run(qemu_cmd("blk_crash", drive, append), capture_output=True, text=True, timeout=120)
        lines = r.stdout.replace("\r\n", "\n").splitlines()
        assert r.returncode == 1 and f"crash: done {done}" in lines, f"status {r.returncode}\n{r.stdout}{r.stderr}"
    assert "verify: 200 writes ok" in lines
    durable = Durable(Workload(seed, vsize // SECTOR))
    durable.advance(240)
    qemu_img_check(qemu_img, overlay, "under QEMU")
    check_contents(qemu_img, overlay, flat, durable, 240, f"KVMPY_CRASH_SEED={MASTER_SEED} under QEMU")
