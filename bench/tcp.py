"""Linux TCP throughput over virtio-net: the default guest (Debian's cloud kernel,
busybox initramfs) under kvmpy and under QEMU, both on real KVM.

    python3 -m bench.tcp            # where KVM can run Linux; elsewhere: python3 -m bench.nested tcp

Rows (MB/s, higher is better), each kvmpy beside QEMU with the same vhost setting:
  Linux TCP tx vhost=on    the guest sends SIZE_MIB MiB (busybox nc from a tmpfs file)
  Linux TCP rx vhost=on    the guest receives SIZE_MIB MiB (busybox nc into /dev/null)
  Linux TCP tx vhost=off   the same with the VMM's own data plane: kvmpy's native
  Linux TCP rx vhost=off   plane against QEMU's userspace virtio-net

The peer is a Python socket in a network namespace on the bridge the guests' taps
join; it times each transfer from accept to the end of the connection, so a row is
the receiver's view in both directions: for rx it sends, half-closes and waits for
the guest's nc to close once it has read everything. The guest always connects out,
so no listen race. For each vhost setting one kvmpy guest and one QEMU guest run at
once (same kernel, initramfs, memory, one vCPU) and their transfers alternate,
so load that drifts during the run (the nested L1, a shared host) hits both alike;
a row is the best of REPEATS after a warm-up transfer each way.

A host whose KVM cannot run Linux (no /dev/kvm, or the software-nested kvm_pvm)
reports the rows as None with the reason; bench/nested.py runs them in the L1.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

QEMU = shutil.which("qemu-system-x86_64")
SIZE_MIB = 16
WARMUP_MIB = 1
REPEATS = 2
BOOT_TIMEOUT = 300
# A transfer at the L1's worst seen rate (about 1 MB/s) must still finish.
TRANSFER_TIMEOUT = 300
BRIDGE = "ktcpbr0"
NET_PREFIX = "10.78.0"
PEER_IP = f"{NET_PREFIX}.1"
TX_PORT, RX_PORT = 5201, 5202
GUEST_MEMORY = "512"
APPEND = "console=ttyS0 panic=-1 quiet"
BLOB = "/root/tcp-blob"
VHOST_MODES = ("on", "off")


def row_names(modes: tuple[str, ...] = VHOST_MODES) -> list[str]:
    return [f"Linux TCP {d} vhost={v}" for v in modes for d in ("tx", "rx")]


def linux_kvm_unavailable() -> str | None:
    """Why KVM here cannot run the Linux guest, or None."""
    from kvmpy.hv import select
    ok, why = select.kvm_usable()
    if not ok:
        return f"no usable KVM ({why})"
    if select.software_nested_kvm():
        return ("this host's KVM is the software-nested kvm_pvm, which cannot run Linux; "
                "the rows come from the nested L1: python3 -m bench.nested tcp")
    return None


class GuestConsole:
    """A VMM whose serial console is its stdin/stdout: read by a thread, commands
    typed into the guest's busybox shell."""

    def __init__(self, name: str, argv: list[str], stderr_path: str):
        self.name = name
        self.stderr_path = stderr_path
        self._stderr = open(stderr_path, "wb")
        self.proc = subprocess.Popen(argv, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr)
        self._out = bytearray()
        self._lock = threading.Lock()
        self._commands = 0
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        while chunk := os.read(self.proc.stdout.fileno(), 65536):
            with self._lock:
                self._out += chunk

    def text(self) -> str:
        with self._lock:
            return self._out.decode(errors="replace").replace("\r\n", "\n")

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.compile(pattern, re.M).search(self.text(), start)
            if m:
                return m
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.1)
        with open(self.stderr_path, errors="replace") as f:
            err = f.read()[-300:]
        # The guest kernel's complaints say most (a ring error, a lockup); else the console's tail.
        text = self.text()
        kernel = [line for line in text.splitlines() if re.match(r"\[\s*\d+\.\d+\] ", line)]
        kernel = [line for line in kernel if "virtio" in line][:2] + kernel[-2:]
        raise RuntimeError(f"{self.name}: no {pattern!r} on the console within {timeout:.0f} s "
                           f"(exit {self.proc.poll()}): {' | '.join(kernel) or text[-400:]!r}; stderr ...{err!r}")

    def boot(self, timeout: float = BOOT_TIMEOUT) -> None:
        self.wait_for(r"shell on the console", timeout)

    def type(self, command: str) -> str:
        """Types ``command``; returns the tag whose line `finish` waits for."""
        self._commands += 1
        tag = f"@@done{self._commands}"
        self._mark = len(self.text())
        self.proc.stdin.write(f"{command}; echo {tag} $?\n".encode())
        self.proc.stdin.flush()
        return tag

    def finish(self, tag: str, timeout: float) -> tuple[int, str]:
        """The typed command's exit status and output."""
        m = self.wait_for(rf"^{tag} (\d+)$", timeout, self._mark)
        return int(m.group(1)), self.text()[self._mark:m.start()]

    def shell(self, command: str, timeout: float = 120) -> tuple[int, str]:
        return self.finish(self.type(command), timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(5)
        self._stderr.close()


class TcpPeer:
    """The guests' far end: listening sockets made in the namespace (a socket keeps
    the namespace it was made in). Each call serves one connection and returns
    (bytes, seconds from accept to the end of the connection, sha256 or None)."""

    CHUNK = 1 << 20

    def __init__(self, netns: str | None, ip: str = PEER_IP):
        from kvmpy.tap import run_in_netns
        self.listeners = {port: run_in_netns(netns, self._listen, ip, port) for port in (TX_PORT, RX_PORT)}

    @staticmethod
    def _listen(ip: str, port: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((ip, port))
        s.listen(4)
        return s

    def _accept(self, port: int, timeout: float) -> socket.socket:
        listener = self.listeners[port]
        listener.settimeout(timeout)
        conn, _ = listener.accept()
        conn.settimeout(timeout)
        return conn

    def receive(self, timeout: float = TRANSFER_TIMEOUT, digest: bool = False) -> tuple[int, float, str | None]:
        """What the guest sends (tx), read to its end."""
        conn = self._accept(TX_PORT, timeout)
        with conn:
            start = time.perf_counter()
            h = hashlib.sha256() if digest else None
            buf = bytearray(self.CHUNK)
            view = memoryview(buf)
            total = 0
            while n := conn.recv_into(buf):
                total += n
                if h is not None:
                    h.update(view[:n])
            seconds = time.perf_counter() - start
        return total, seconds, h.hexdigest() if h else None

    def send(self, data: bytes | int, timeout: float = TRANSFER_TIMEOUT) -> tuple[int, float, str | None]:
        """Sends ``data`` (or that many zero bytes) to the guest (rx), half-closes, and
        waits for the guest to close: its nc exits only after reading to the end."""
        payload = memoryview(data if isinstance(data, bytes) else bytes(self.CHUNK))
        total = len(payload) if isinstance(data, bytes) else data
        conn = self._accept(RX_PORT, timeout)
        with conn:
            start = time.perf_counter()
            left = total
            while left:
                n = min(left, len(payload))
                off = total - left if isinstance(data, bytes) else 0
                conn.sendall(payload[off:off + n])
                left -= n
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):
                pass
            seconds = time.perf_counter() - start
        return total, seconds, hashlib.sha256(data).hexdigest() if isinstance(data, bytes) else None

    def close(self) -> None:
        for s in self.listeners.values():
            s.close()


def transfer(peer: TcpPeer, guest: GuestConsole, direction: str, size: int | bytes, guest_cmd: str | None = None,
             digest: bool = False, timeout: float = TRANSFER_TIMEOUT) -> tuple[int, float, str | None, str]:
    """One transfer: the peer's side in a thread, the guest's typed into its shell.
    (bytes, seconds, the peer's sha256, the guest command's output)."""
    result: dict = {}

    def serve():
        try:
            result["value"] = peer.receive(timeout, digest) if direction == "tx" else peer.send(size, timeout)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            result["error"] = e

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    if guest_cmd is None:
        guest_cmd = (f"nc {PEER_IP} {TX_PORT} < {BLOB}" if direction == "tx"
                     else f"nc {PEER_IP} {RX_PORT} > /dev/null")
    status, out = guest.finish(guest.type(guest_cmd), timeout)
    server.join(timeout)
    if "error" in result:
        raise RuntimeError(f"TCP {direction}: the peer failed: {result['error']}; guest said {out[-300:]!r}")
    if "value" not in result:
        raise RuntimeError(f"TCP {direction}: no connection within {timeout:.0f} s; guest said {out[-300:]!r}")
    if status != 0:
        raise RuntimeError(f"TCP {direction}: the guest's command exited {status}: {out[-300:]!r}")
    total, seconds, sha = result["value"]
    return total, seconds, sha, out


def kvmpy_argv(netns: str, kernel: str, initrd: str, ip: str, mac: str, tap: str, vhost: str) -> list[str]:
    return ["ip", "netns", "exec", netns, sys.executable, "-m", "kvmpy", "-v", "run", "--enable-kvm",
            "-m", GUEST_MEMORY, "--kernel", kernel, "--initrd", initrd, "--no-reboot", "--serial", "stdio",
            "--net", f"tap,ifname={tap},bridge={BRIDGE},mac={mac},vhost={vhost},dataplane=native",
            "--append", f"{APPEND} kvmpy.ip={ip}/24"]


def qemu_argv(netns: str, kernel: str, initrd: str, ip: str, mac: str, tap: str, vhost: str) -> list[str]:
    return ["ip", "netns", "exec", netns, QEMU, "-accel", "kvm", "-cpu", "host", "-m", GUEST_MEMORY,
            "-nodefaults", "-display", "none", "-serial", "stdio", "-no-reboot",
            "-kernel", kernel, "-initrd", initrd, "-append", f"{APPEND} kvmpy.ip={ip}/24",
            "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no,vhost={vhost}",
            "-device", f"virtio-net-pci,netdev=n0,mac={mac}"]


def make_netns() -> str:
    """A namespace with the bridge and the peer's address on it."""
    ns = f"kvmpytcp-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    add_bridge(ns)
    return ns


def add_bridge(ns: str) -> None:
    """The guests' bridge in ``ns``, with the peer's address on it."""
    for cmd in (["link", "set", "lo", "up"], ["link", "add", BRIDGE, "type", "bridge"],
                ["addr", "add", f"{PEER_IP}/24", "dev", BRIDGE], ["link", "set", BRIDGE, "up"]):
        subprocess.run(["ip", "-n", ns, *cmd], check=True)


def add_qemu_tap(ns: str, tap: str) -> None:
    for cmd in (["tuntap", "add", tap, "mode", "tap", "vnet_hdr"], ["link", "set", tap, "master", BRIDGE],
                ["link", "set", tap, "up"]):
        subprocess.run(["ip", "-n", ns, *cmd], check=True)


def _prepare(guest: GuestConsole) -> None:
    status, out = guest.shell(f"ping -c 2 -W 10 {PEER_IP} >/dev/null && "
                              f"dd if=/dev/zero of={BLOB} bs=1M count={SIZE_MIB} 2>/dev/null", timeout=120)
    if status != 0:
        raise RuntimeError(f"the guest cannot reach {PEER_IP} or write {BLOB}: {out[-300:]!r}")


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process, all its threads (fields 14 and 15 of
    /proc/PID/stat, counted after the last ")" since the name may hold one)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) per thread name of a process: which of a VMM's
    threads (vCPU, event loop, data plane) spent what."""
    found: dict[str, float] = {}
    ticks = os.sysconf("SC_CLK_TCK")
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                    raw = f.read()
                name = raw[raw.index(b"(") + 1:raw.rindex(b")")].decode(errors="replace")
                fields = raw.rsplit(b")", 1)[1].split()
                found[name] = found.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return found


def _thread_cpu_note(before: dict[str, float], after: dict[str, float]) -> str:
    spent = sorted(((after[n] - before.get(n, 0.0), n) for n in after), reverse=True)
    return ", ".join(f"{name} {seconds:.1f}" for seconds, name in spent[:4] if seconds >= 0.05)


KVM_DEBUGFS = "/sys/kernel/debug/kvm"
# The per-VM counters (KVM's debugfs, summed over the VM's vCPUs) that say where a
# guest's vCPU time went besides its own code: each exit under nested KVM is a round
# trip through the L1's KVM.
KVM_EXIT_COUNTERS = ("exits", "io_exits", "mmio_exits", "halt_exits", "irq_exits", "irq_window_exits",
                     "insn_emulation", "signal_exits", "irq_injections", "halt_wakeup")


def _kvm_exit_counts(pid: int) -> dict[str, int]:
    """KVM's exit counters of the VM(s) process ``pid`` made ({} where debugfs cannot
    be read: not root, not mounted and not mountable)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        if not os.path.isdir(KVM_DEBUGFS):
            subprocess.run(["mount", "-t", "debugfs", "debugfs", "/sys/kernel/debug"], capture_output=True,
                           timeout=10)
    counts: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for vm in os.listdir(KVM_DEBUGFS):
            if not vm.startswith(f"{pid}-"):
                continue
            for name in KVM_EXIT_COUNTERS:
                with contextlib.suppress(OSError, ValueError):
                    with open(os.path.join(KVM_DEBUGFS, vm, name)) as f:
                        counts[name] = counts.get(name, 0) + int(f.read())
    return counts


def _kvm_exit_note(before: dict[str, int], after: dict[str, int]) -> str:
    return " ".join(f"{name}={after[name] - before.get(name, 0)}" for name in KVM_EXIT_COUNTERS if name in after)


def _vhost_cpu(pid: int) -> float | None:
    """CPU seconds of the vhost worker threads serving process ``pid`` (the kernel
    names them vhost-PID; they are not among the process's own threads)."""
    total, found = 0.0, False
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{entry}/stat", "rb") as f:
                    raw = f.read()
                if raw[raw.index(b"(") + 1:raw.rindex(b")")] != f"vhost-{pid}".encode():
                    continue
                fields = raw.rsplit(b")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
                found = True
    return total if found else None


def _guest_interrupts(console: GuestConsole) -> str:
    """The guest's interrupt counts per virtio queue (/proc/interrupts), e.g.
    "input.0=1234 output.0=56": how often each VMM made the driver run."""
    try:
        _, out = console.shell("grep virtio /proc/interrupts", timeout=60)
    except RuntimeError:
        return ""
    counts = []
    for line in out.splitlines():
        m = re.match(r"\s*\d+:\s+(\d+)\s.*virtio\d+-(\S+)\s*$", line)
        if m:
            counts.append(f"{m.group(2)}={m.group(1)}")
    return " ".join(counts)


def report_stuck_transfer(what: str, console: GuestConsole) -> None:
    """On stderr (the L1's console, so its log keeps it): what the guest's kernel said
    about its rings, its virtio interrupt counts, and what the VMM logged about who
    served the queues (kvmpy's data plane hand-overs), for a transfer that failed or
    hung, e.g. with virtio_net's "output.0:id N is not a head!"."""
    lines = [f"bench.tcp: {what} failed; diagnostics follow"]
    kernel = [line for line in console.text().splitlines() if re.match(r"\[\s*\d+\.\d+\] ", line)]
    lines += [f"  guest console: {line}" for line in kernel[-20:]]
    # a hung nc holds the shell: interrupt it, then ask the guest itself
    with contextlib.suppress(OSError):
        console.proc.stdin.write(b"\x03\n")
        console.proc.stdin.flush()
    with contextlib.suppress(RuntimeError, OSError):
        _, out = console.shell("dmesg | grep -i -E 'virtio|net|head' | tail -n 20; grep virtio /proc/interrupts",
                               timeout=60)
        lines += [f"  guest: {line}" for line in out.splitlines()[-30:]]
    with contextlib.suppress(OSError):
        with open(console.stderr_path, errors="replace") as f:
            err = f.read().splitlines()
        lines += [f"  vmm: {line}" for line in err if re.search(r"net|queue|plane|ring|reset|hand", line, re.I)][-30:]
    print("\n".join(lines), file=sys.stderr, flush=True)


def _vhost_pair(ns: str, peer: TcpPeer, kernel: str, initrd: str, vhost: str, tmp: str, index: int) -> dict:
    """Both VMMs' guests up at once for one vhost setting; their transfers alternate.
    {(side, direction): [MB/s, ...]} and notes."""
    sides = {}
    notes = []
    consoles = []
    try:
        mac = f"52:54:00:78:{index:02x}:"
        if QEMU is not None:
            qtap = f"qtcp{index}"
            add_qemu_tap(ns, qtap)
            consoles.append(("qemu", GuestConsole(
                "qemu", qemu_argv(ns, kernel, initrd, f"{NET_PREFIX}.{10 + index}", mac + "02", qtap, vhost),
                os.path.join(tmp, f"qemu-{vhost}.stderr"))))
        else:
            notes.append("qemu: not installed")
        consoles.append(("kvmpy", GuestConsole(
            "kvmpy", kvmpy_argv(ns, kernel, initrd, f"{NET_PREFIX}.{20 + index}", mac + "01", f"ktcp{index}", vhost),
            os.path.join(tmp, f"kvmpy-{vhost}.stderr"))))
        ready = []
        for side, console in consoles:
            try:
                console.boot()
                _prepare(console)
                ready.append((side, console))
                print(f"bench.tcp: vhost={vhost} {side} guest up", file=sys.stderr, flush=True)
            except Exception as e:  # noqa: BLE001 - one side that cannot run says why
                notes.append(f"{side}: {e}")
        warm = WARMUP_MIB << 20
        for side, console in ready:
            try:
                transfer(peer, console, "tx", warm, f"dd if={BLOB} bs=64k count={warm >> 16} 2>/dev/null | "
                                                    f"nc {PEER_IP} {TX_PORT}")
                transfer(peer, console, "rx", warm)
            except Exception as e:  # noqa: BLE001
                notes.append(f"{side} warm-up: {e}")
                ready.remove((side, console))
                report_stuck_transfer(f"vhost={vhost} {side} warm-up", console)
        cpu_before = {side: _cpu_seconds(console.proc.pid) for side, console in ready}
        threads_before = {side: _thread_cpu(console.proc.pid) for side, console in ready}
        exits_before = {side: _kvm_exit_counts(console.proc.pid) for side, console in ready}
        vhost_before = {side: _vhost_cpu(console.proc.pid) for side, console in ready}
        size = SIZE_MIB << 20
        for repeat in range(REPEATS):
            for direction in ("tx", "rx"):
                # who goes first alternates: a drift in load must not favour one side
                for side, console in (list(ready) if repeat % 2 == 0 else list(reversed(ready))):
                    try:
                        total, seconds, _, _ = transfer(peer, console, direction, size)
                    except Exception as e:  # noqa: BLE001
                        notes.append(f"{side} {direction}: {e}")
                        ready.remove((side, console))
                        report_stuck_transfer(f"vhost={vhost} {side} {direction}", console)
                        continue
                    if total != size:
                        notes.append(f"{side} {direction}: {total} bytes arrived of {size}")
                        continue
                    sides.setdefault((side, direction), []).append(total / seconds / 1e6)
                    # progress on the console: bench.nested's watchdog takes silence for a stuck L1
                    print(f"bench.tcp: vhost={vhost} {side} {direction} {total / seconds / 1e6:.2f} MB/s",
                          file=sys.stderr, flush=True)
        for side, console in ready:
            pid = console.proc.pid
            for what, before, after in ((f"{side} process CPU", cpu_before.get(side), _cpu_seconds(pid)),
                                        (f"{side}'s vhost workers' CPU", vhost_before.get(side), _vhost_cpu(pid))):
                if before is not None and after is not None:
                    notes.append(f"{what} {after - before:.1f} s over the measured transfers")
            threads = _thread_cpu_note(threads_before.get(side, {}), _thread_cpu(pid))
            if threads:
                notes.append(f"{side} threads' CPU s: {threads}")
            exits = _kvm_exit_note(exits_before.get(side, {}), _kvm_exit_counts(pid))
            if exits:
                notes.append(f"{side} guest's KVM exits over the measured transfers: {exits}")
            irqs = _guest_interrupts(console)
            if irqs:
                notes.append(f"{side} guest's virtio interrupts {irqs}")
        for side, console in consoles:
            if side == "kvmpy":
                with open(console.stderr_path, errors="replace") as f:
                    served = f.read().count("served by the kernel")
                if vhost == "on" and not served:
                    notes.append("kvmpy: vhost=on but no ring served by the kernel")
    finally:
        for _, console in consoles:
            console.close()
    return {"rates": sides, "notes": notes}


def run(guest_dir: str | None = None, modes: tuple[str, ...] | list[str] = VHOST_MODES) -> list[dict]:
    """The rows of the vhost ``modes``; ``guest_dir`` holds vmlinuz and initrd.img of the
    default guest (default: `kvmpy guest build`'s cache, built if missing)."""
    modes = tuple(modes)
    rows = [{"name": name, "kvmpy": None, "qemu": None, "unit": "MB/s"} for name in row_names(modes)]

    def all_rows(note: str) -> list[dict]:
        for row in rows:
            row["note"] = note
        return rows

    why = linux_kvm_unavailable()
    if why:
        return all_rows(why)
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        return all_rows("needs root and /dev/net/tun (namespace, bridge, taps)")
    if guest_dir is None:
        from kvmpy.tools import guestbuild
        try:
            guest_dir = guestbuild.build(with_disk=False).out_dir
        except guestbuild.GuestBuildError as e:
            return all_rows(f"the default guest cannot be built here: {e}")
    kernel, initrd = os.path.join(guest_dir, "vmlinuz"), os.path.join(guest_dir, "initrd.img")
    ns = make_netns()
    peer = TcpPeer(ns)
    try:
        with tempfile.TemporaryDirectory(prefix="kvmpy-bench-tcp-") as tmp:
            for vhost in modes:
                # taps, MACs and addresses per mode: a mode run alone names them as in a full run
                index = VHOST_MODES.index(vhost)
                mine = [r for r in rows if r["name"].endswith(f"vhost={vhost}")]
                if vhost == "on" and not os.path.exists("/dev/vhost-net"):
                    for row in mine:
                        row["note"] = "no /dev/vhost-net on this host (modprobe vhost_net; the nested L1 has it)"
                    continue
                print(f"bench.tcp: vhost={vhost} ...", file=sys.stderr, flush=True)
                result = _vhost_pair(ns, peer, kernel, initrd, vhost, tmp, index)
                for row in mine:
                    direction = row["name"].split()[2]
                    notes = list(result["notes"])
                    for side in ("kvmpy", "qemu"):
                        rates = result["rates"].get((side, direction))
                        if rates:
                            row[side] = round(max(rates), 2)
                            notes.append(f"{side} runs " + "/".join(f"{r:.1f}" for r in rates))
                    row["note"] = f"{SIZE_MIB} MiB, best of {REPEATS}; " + "; ".join(notes)
    finally:
        peer.close()
        subprocess.run(["ip", "netns", "del", ns], check=False)
    return rows


def parts(guest_dir: str | None = None, limit: float = 900.0) -> list:
    """The rows as bench.parts runs them: each vhost mode (two Linux guests booted,
    a warm-up and the measured transfers) with its own deadline."""
    from bench.parts import Part
    return [Part(f"tcp vhost={vhost}", "bench.tcp", "run", (guest_dir, [vhost]), limit) for vhost in VHOST_MODES]


if __name__ == "__main__":
    for row in run(*sys.argv[1:2]):
        print(row)
