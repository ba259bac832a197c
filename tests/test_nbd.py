"""`kvmpy nbd` against the real NBD clients (nbdinfo, nbdcopy, nbdsh from libnbd;
qemu-img and qemu-io from QEMU), and against hostile clients on raw sockets."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_kvmpy, tool_required
from support import nbd as n

FUZZ = bool(os.environ.get("KVMPY_FUZZ"))
MiB = 1 << 20


def sh(*args, check=True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=120, **kw)


@pytest.fixture(scope="module")
def qemu_tools():
    for t in ("qemu-img", "qemu-io"):
        tool_required(t)


def sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def make_chain(d) -> tuple[str, str]:
    """A raw base with data and a hole, and a qcow2 overlay over it: data of its own,
    a zero cluster over base data, and a tail past the base's end."""
    base = str(d / "base.raw")
    top = str(d / "top.qcow2")
    sh("qemu-img", "create", "-q", "-f", "raw", base, "8M")
    sh("qemu-io", "-f", "raw", "-c", "write -P 0x11 1M 1M", "-c", "write -P 0x33 6M 64k", base)
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top, "16M")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x22 1536K 1M", "-c", "write -z 1088K 64K",
       "-c", "write -P 0x44 12M 100k", top)
    return base, top


def serve(args, tmp_path, unix=False, **kw) -> n.NbdServerProcess:
    if unix:
        return n.NbdServerProcess(args, socket_path=str(tmp_path / "nbd.sock"), **kw)
    return n.NbdServerProcess(args, port=n.free_port(), **kw)


def converted(path: str, fmt: str, out: str) -> bytes:
    # -U: some tests read an image a writable export holds (and, with image locking, locks).
    sh("qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", path, out)
    with open(out, "rb") as f:
        return f.read()


# ---------------------------------------------------------------- real clients

def test_nbdinfo_and_list(tmp_path, qemu_tools):
    tool_required("nbdinfo")
    _, top = make_chain(tmp_path)
    with serve(["-t", "-f", "qcow2", "-x", "disk0", "-D", "the test disk", top], tmp_path) as srv:
        info = json.loads(sh("nbdinfo", "--json", srv.uri + "/disk0").stdout)
        exp = info["exports"][0]
        assert exp["export-name"] == "disk0"
        assert exp["export-size"] == 16 * MiB
        assert exp["is_read_only"] is False and exp["can_flush"] and exp["can_fua"] and exp["can_zero"]
        assert "base:allocation" in exp["contexts"]
        assert exp["block_size_maximum"] == 32 * MiB
        assert exp["can_multi_conn"] is False
        listing = json.loads(sh("nbdinfo", "--json", "--list", srv.uri).stdout)
        assert [e["export-name"] for e in listing["exports"]] == ["disk0"]
        assert listing["exports"][0].get("description") == "the test disk"
        # An export that does not exist is an error the client reports, not a hang.
        bad = sh("nbdinfo", srv.uri + "/nosuch", check=False)
        assert bad.returncode != 0 and "nosuch" in bad.stderr
        assert srv.alive()
        status, err = srv.stop()
    assert status == 0, err
    assert "Traceback" not in err


def _runs_from_qemu_map(path: str, fmt: str) -> list[tuple[int, int, bool, bool]]:
    out = json.loads(sh("qemu-img", "map", "--output=json", "-f", fmt, path).stdout)
    return _merge([(e["start"], e["length"], e["data"], e["zero"]) for e in out])


def _runs_from_nbdinfo(uri: str) -> list[tuple[int, int, bool, bool]]:
    out = json.loads(sh("nbdinfo", "--map", "--json", uri).stdout)
    return _merge([(e["offset"], e["length"], not e["type"] & 1, bool(e["type"] & 2)) for e in out])


def _merge(runs):
    merged = []
    for start, length, data, zero in sorted(runs):
        if merged and merged[-1][2:] == (data, zero) and merged[-1][0] + merged[-1][1] == start:
            merged[-1] = (merged[-1][0], merged[-1][1] + length, data, zero)
        else:
            merged.append((start, length, data, zero))
    return merged


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_map_agrees_with_qemu_img_map(tmp_path, qemu_tools, fmt):
    tool_required("nbdinfo")
    base, top = make_chain(tmp_path)
    path = base if fmt == "raw" else top
    want = _runs_from_qemu_map(path, fmt)
    assert any(r[2] for r in want) and any(not r[2] for r in want)
    with serve(["-t", "-r", "-f", fmt, path], tmp_path) as srv:
        assert _runs_from_nbdinfo(srv.uri) == want


def _map_via(uri: str, context: str) -> list:
    out = json.loads(sh("nbdinfo", f"--map={context}", "--json", uri).stdout)
    runs = []
    for e in out:
        if runs and runs[-1][2] == e["type"] and runs[-1][0] + runs[-1][1] == e["offset"]:
            runs[-1] = (runs[-1][0], runs[-1][1] + e["length"], e["type"])
        else:
            runs.append((e["offset"], e["length"], e["type"]))
    return runs


@pytest.mark.parametrize("kind", ["raw", "qcow2", "chain"])
def test_allocation_depth_and_map_agree_with_qemu_nbd(tmp_path, qemu_tools, kind):
    """-A's qemu:allocation-depth and base:allocation, context by context, as qemu-nbd -A serves them."""
    tool_required("nbdinfo")
    tool_required("qemu-nbd")
    base, top = make_chain(tmp_path)
    # A third layer, so that depth 2 and 3 both occur.
    top2 = str(tmp_path / "top2.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", top, "-F", "qcow2", top2, "16M")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x55 3M 64k", top2)
    alone = str(tmp_path / "alone.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", alone, "4M")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x66 1M 128k", "-c", "write -z 2M 64k", alone)
    path = {"raw": base, "qcow2": alone, "chain": top2}[kind]
    fmt = "raw" if kind == "raw" else "qcow2"
    sock = str(tmp_path / "qemu.sock")
    qemu = subprocess.Popen(["qemu-nbd", "-r", "-t", "-A", "-k", sock, "-f", fmt, path])
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.05)
        uri = f"nbd+unix:///?socket={sock}"
        want = {c: _map_via(uri, c) for c in ("base:allocation", "qemu:allocation-depth")}
    finally:
        qemu.terminate()
        qemu.wait(timeout=30)
    depths = {t for _, _, t in want["qemu:allocation-depth"]}
    assert depths == {"raw": {1}, "qcow2": {0, 1}, "chain": {1, 2, 3}}[kind]
    with serve(["-t", "-r", "-A", "-f", fmt, path], tmp_path, unix=True) as srv:
        for context, runs in want.items():
            assert _map_via(srv.uri, context) == runs, context
        contexts = json.loads(sh("nbdinfo", "--json", srv.uri).stdout)["exports"][0]["contexts"]
        assert sorted(contexts) == ["base:allocation", "qemu:allocation-depth"]


def test_nbdcopy_reads_what_qemu_img_convert_reads(tmp_path, qemu_tools):
    tool_required("nbdcopy")
    _, top = make_chain(tmp_path)
    want = converted(top, "qcow2", str(tmp_path / "want.raw"))
    with serve(["-t", "-r", "-e", "4", "--multi-conn", "-f", "qcow2", top], tmp_path) as srv:
        assert json.loads(sh("nbdinfo", "--json", srv.uri).stdout)["exports"][0]["can_multi_conn"]
        out = tmp_path / "got.raw"
        sh("nbdcopy", "--connections=4", srv.uri, str(out))
        assert out.read_bytes() == want
        # qemu-img as an NBD client reads the same bytes.
        out2 = tmp_path / "got2.raw"
        sh("qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri, str(out2))
        assert out2.read_bytes() == want


QEMU_IO_WRITES = ["write -P 0xab 0 1M", "write -z 2M 1M", "write -P 0xcd 1600K 8k", "discard 6M 64k",
                  "write -P 0x5a 15M 1M", "flush"]


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_writes_through_qemu_io(tmp_path, qemu_tools, fmt):
    base, top = make_chain(tmp_path)
    if fmt == "raw":
        path = str(tmp_path / "disk.raw")
        shutil.copy(base, path)
        writes = [c.replace("15M", "7M") for c in QEMU_IO_WRITES]
    else:
        path = top
        writes = QEMU_IO_WRITES
    expected = str(tmp_path / f"expected.{fmt}")
    shutil.copy(path, expected)
    args = [a for c in writes for a in ("-c", c)]
    sh("qemu-io", "-f", fmt, "-d", "unmap", *args, expected)
    with serve(["-t", "--discard=unmap", "-f", fmt, path], tmp_path) as srv:
        r = sh("qemu-io", "-f", "raw", *args, srv.uri)
        assert "error" not in r.stdout.lower() + r.stderr.lower(), r.stdout + r.stderr
        status, err = srv.stop()
    assert status == 0, err
    if fmt == "qcow2":
        sh("qemu-img", "check", "-f", "qcow2", path)
    cmp = sh("qemu-img", "compare", "-f", fmt, "-F", fmt, expected, path, check=False)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


def test_detect_zeroes_unmap_and_concurrent_writers(tmp_path, qemu_tools):
    _, top = make_chain(tmp_path)
    with serve(["-t", "-e", "3", "--discard=unmap", "--detect-zeroes=unmap", "--cache=writethrough",
                "-f", "qcow2", top], tmp_path) as srv:
        writers = [subprocess.Popen(["qemu-io", "-f", "raw", "-c", f"write -P {0x60 + i} {i * 4}M 4M", srv.uri],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(1, 3)]
        zero = sh("qemu-io", "-f", "raw", "-c", "write -P 0 1536K 512k", srv.uri)
        assert "error" not in zero.stdout.lower()
        for w in writers:
            out, _ = w.communicate(timeout=60)
            assert w.returncode == 0 and b"error" not in out.lower(), out
        status, err = srv.stop()
    assert status == 0, err
    sh("qemu-img", "check", "-f", "qcow2", top)
    for i in range(1, 3):
        r = sh("qemu-io", "-f", "qcow2", "-c", f"read -P {0x60 + i} {i * 4}M 4M", top)
        assert "verification failed" not in r.stdout
    # The all-zero write became zero clusters, not data.
    zeroed = [e for e in json.loads(sh("qemu-img", "map", "--output=json", "-f", "qcow2", top).stdout)
              if e["start"] <= 1536 * 1024 < e["start"] + e["length"]]
    assert zeroed[0]["zero"] and not zeroed[0]["data"], zeroed


def test_probed_raw_block0_cannot_become_another_format(tmp_path):
    """Without -f a client gets a guest's rules: no write, zeroing or trim may turn
    block 0 into a header another program would then trust."""
    img = tmp_path / "probed.img"
    img.write_bytes(b"QEDx" + bytes(MiB - 4))
    with serve(["-t", "-e", "2", "--discard=unmap", str(img)], tmp_path) as srv:
        s = srv.connect()
        n.go(s)
        n.request(s, n.CMD_WRITE, 0, 4, data=b"QFI\xfb")
        assert n.reply(s)[0] == n.EIO
        for cmd in (n.CMD_WRITE_ZEROES, n.CMD_TRIM):
            n.request(s, cmd, 3, 600)
            assert n.reply(s)[0] == n.EIO
        n.request(s, n.CMD_WRITE, 4, 4, data=b"abcd")        # an ordinary write there is fine
        assert n.reply(s)[0] == 0
        n.request(s, n.CMD_WRITE_ZEROES, 4, 600)
        assert n.reply(s)[0] == 0
        n.request(s, n.CMD_DISC, 0, 0)
        s.close()
        status, err = srv.stop()
    assert status == 0 and "Traceback" not in err, err
    assert img.read_bytes()[:8] == b"QEDx\0\0\0\0"


def test_snapshot_keeps_the_image_untouched(tmp_path, qemu_tools):
    _, top = make_chain(tmp_path)
    before = sha(top)
    want = bytearray(converted(top, "qcow2", str(tmp_path / "want.raw")))
    with serve(["-t", "-s", "-f", "qcow2", top], tmp_path) as srv:
        sh("qemu-io", "-f", "raw", "-c", "write -P 0xab 1M 1M", srv.uri)
        out = tmp_path / "got.raw"
        sh("qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri, str(out))
        want[MiB:2 * MiB] = b"\xab" * MiB
        assert out.read_bytes() == bytes(want)
        overlays = [p for p in os.listdir(tempfile.gettempdir()) if p.startswith("kvmpy-nbd-snapshot-")]
        status, err = srv.stop()
    assert status == 0, err
    assert sha(top) == before
    assert not set(overlays) & set(os.listdir(tempfile.gettempdir())), "the overlay outlived the server"


def test_read_only_export_refuses_writes_over_unix_socket(tmp_path, qemu_tools):
    _, top = make_chain(tmp_path)
    before = sha(top)
    with serve(["-t", "-r", "-f", "qcow2", top], tmp_path, unix=True) as srv:
        r = sh("qemu-io", "-f", "raw", "-c", "write -P 0xab 0 64k", srv.uri, check=False)
        assert "Operation not permitted" in r.stdout + r.stderr or r.returncode != 0, r.stdout + r.stderr
        # Past the client's own read-only check: the server answers EPERM itself.
        s = srv.connect()
        size, flags = n.go(s)
        assert flags & 2, "READ_ONLY transmission flag"
        for cmd, data in ((n.CMD_WRITE, b"x" * 512), (n.CMD_WRITE_ZEROES, b""), (n.CMD_TRIM, b"")):
            n.request(s, cmd, 0, 512, data=data)
            assert n.reply(s)[0] == n.EPERM
        n.request(s, n.CMD_READ, 0, 4096)
        err, _, chunks = n.reply(s, 4096)
        assert err == 0 and chunks
        n.request(s, n.CMD_DISC, 0, 0)
        s.close()
        assert srv.alive()
        status, err = srv.stop()
    assert status == 0, err
    assert sha(top) == before
    assert not os.path.exists(tmp_path / "nbd.sock")


def tgkill(pid: int, tid: int, sig: int) -> None:
    """A signal to one thread of another process (os has no tgkill)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    SYS_tgkill = 234        # x86-64
    if libc.syscall(SYS_tgkill, pid, tid, sig) != 0:
        raise OSError(ctypes.get_errno(), f"tgkill {pid} {tid}")


def test_sigterm_the_kernel_gives_a_session_thread_stops_the_server(tmp_path, qemu_tools):
    # The kernel may deliver a process's SIGTERM to any thread; Python runs the handler
    # only in the main thread, asleep in select: seen once in CI as a 30 s hang.
    _, top = make_chain(tmp_path)
    with serve(["-t", "-r", "-f", "qcow2", top], tmp_path, unix=True) as srv:
        s = srv.connect()
        n.go(s)
        pid = srv.proc.pid
        sessions = [int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid]
        assert len(sessions) == 1, sessions
        t0 = time.monotonic()
        tgkill(pid, sessions[0], signal.SIGTERM)
        status, err = srv.stop(sig=0, timeout=10)
        s.close()
    assert status == 0, err
    assert time.monotonic() - t0 < 10


def test_nbdsh_block_status_req_one_and_fua(tmp_path, qemu_tools):
    nbdsh = tool_required("nbdsh")
    # nbdsh is Debian's python3-libnbd: it runs under the system python, not a venv's.
    if sh("/usr/bin/python3", "-c", "import nbd", check=False).returncode:
        pytest.skip("python3-libnbd is not installed (nbdsh needs it)")
    _, top = make_chain(tmp_path)
    script = """
import nbd
seen = []
def cb(meta, off, entries, err):
    seen.append((meta, list(entries)))
h.block_status(16 << 20, 0, cb, flags=nbd.CMD_FLAG_REQ_ONE)
assert len(seen) == 1 and seen[0][0] == "base:allocation" and len(seen[0][1]) == 2, seen
assert seen[0][1][0] <= 16 << 20
h.pwrite(b"\\x77" * 4096, 8 << 20, flags=nbd.CMD_FLAG_FUA)
assert h.pread(4096, 8 << 20) == b"\\x77" * 4096
h.cache(4096, 0)
h.set_strict_mode(0)     # let the server, not libnbd, judge the bounds
try:
    h.pread(4096, (16 << 20) - 2048)
    raise SystemExit("read past the end succeeded")
except nbd.Error as e:
    assert e.errnum == 22 and "command failed" in e.string, e
print("ok")
"""
    with serve(["-t", "-f", "qcow2", top], tmp_path) as srv:
        r = sh(nbdsh, "--base-allocation", "-u", srv.uri, "-c", script, check=False,
               env=dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", "")))
        assert r.stdout.strip() == "ok", r.stdout + r.stderr
        srv.stop()
    sh("qemu-img", "check", "-f", "qcow2", top)


def test_not_persistent_exits_after_last_client_and_sigterm_flushes(tmp_path, qemu_tools):
    tool_required("nbdinfo")
    _, top = make_chain(tmp_path)
    srv = serve(["-f", "qcow2", top], tmp_path)
    sh("nbdinfo", srv.uri)
    assert srv.proc.wait(timeout=15) == 0
    srv.stop()                      # collects its output; it has already exited
    srv = serve(["-t", "--pid-file", str(tmp_path / "nbd.pid"), "-f", "qcow2", top], tmp_path)
    # The pid goes in once serving starts, a moment after the socket listens.
    deadline = time.monotonic() + 10
    pidfile = tmp_path / "nbd.pid"
    while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert int((tmp_path / "nbd.pid").read_text()) == srv.proc.pid
    s = srv.connect()
    n.go(s, structured=False)
    n.request(s, n.CMD_WRITE, 4 * MiB, 65536, data=b"\x99" * 65536)
    assert n.reply(s)[0] == 0
    status, err = srv.stop(signal.SIGTERM)
    s.close()
    assert status == 0, err
    assert not os.path.exists(tmp_path / "nbd.pid")
    sh("qemu-img", "check", "-f", "qcow2", top)
    r = sh("qemu-io", "-f", "qcow2", "-c", "read -P 0x99 4M 64k", top)
    assert "Pattern verification failed" not in r.stdout


def test_fork_returns_once_listening(tmp_path, qemu_tools):
    tool_required("nbdinfo")
    _, top = make_chain(tmp_path)
    port = n.free_port()
    pidfile = tmp_path / "nbd.pid"
    r = run_kvmpy(["nbd", "--fork", "--pid-file", str(pidfile), "-t", "-b", "127.0.0.1", "-p", str(port),
                   "-f", "qcow2", top], timeout=30)
    assert r.returncode == 0, r.stderr
    pid = int(pidfile.read_text())
    try:
        assert "export-size: 16777216" in sh("nbdinfo", f"nbd://127.0.0.1:{port}").stdout
    finally:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while os.path.exists(pidfile) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(pidfile)


# ---------------------------------------------------------------- hostile clients

@pytest.fixture
def hostile(tmp_path, qemu_tools):
    """A persistent writable qcow2 export with a short handshake limit; after the test,
    the server must still serve a good client and the image must check clean."""
    _, top = make_chain(tmp_path)
    srv = serve(["-t", "-e", "4", "--handshake-limit", "2", "-f", "qcow2", top], tmp_path)
    srv.image = top
    yield srv
    try:
        assert srv.alive(), "the server died"
        s = n.admitted(srv)
        n.request(s, n.CMD_READ, 1536 * 1024, 4096)
        err, _, chunks = n.reply(s)
        assert err == 0 and chunks[0][1][8:] == b"\x22" * 4096
        n.request(s, n.CMD_DISC, 0, 0)
        s.close()
    finally:
        status, err = srv.stop()
    assert status == 0, err
    assert "Traceback" not in err, err
    sh("qemu-img", "check", "-f", "qcow2", top)


def test_garbage_greeting_and_option_magic(hostile):
    s = hostile.connect()
    n.recv_exact(s, 18)
    s.sendall(struct.pack(">I", 0xFFFF))            # unknown client flags
    assert n.closed_by_server(s)
    s = hostile.connect()
    n.greet(s)
    s.sendall(b"GARBAGE!" * 4)
    assert n.closed_by_server(s)


def test_options_with_huge_lengths(hostile):
    s = hostile.connect()
    n.greet(s)
    s.sendall(struct.pack(">QII", n.IHAVEOPT, 99, 0xFFFFFFFF))
    assert n.closed_by_server(s)
    # An unknown option with a long (but bounded) payload is drained and refused.
    s = hostile.connect()
    n.greet(s)
    n.send_option(s, 99, b"y" * 100_000)
    assert n.option_reply(s)[1] == n.REP_ERR_UNSUP
    # An export name whose stated length runs past the option's data.
    n.send_option(s, n.OPT_GO, struct.pack(">I", 10) + b"abc")
    assert n.option_reply(s)[1] == n.REP_ERR_INVALID
    n.send_option(s, n.OPT_GO, struct.pack(">I", 0xFFFFFFF0) + b"abc")
    assert n.option_reply(s)[1] == n.REP_ERR_TOO_BIG
    n.send_option(s, n.OPT_STARTTLS)
    assert n.option_reply(s)[1] == n.REP_ERR_POLICY
    # Meta contexts before structured replies; then an unknown context is not selected.
    q = b"qemu:dirty-bitmap:x"
    n.send_option(s, n.OPT_SET_META_CONTEXT, struct.pack(">I", 0) + struct.pack(">II", 1, len(q)) + q)
    assert n.option_reply(s)[1] == n.REP_ERR_INVALID
    n.send_option(s, n.OPT_STRUCTURED_REPLY)
    assert n.option_reply(s)[1] == n.REP_ACK
    n.send_option(s, n.OPT_SET_META_CONTEXT, struct.pack(">I", 0) + struct.pack(">II", 1, len(q)) + q)
    assert n.option_reply(s)[1] == n.REP_ACK
    n.send_option(s, n.OPT_ABORT)
    assert n.option_reply(s)[1] == n.REP_ACK
    assert n.closed_by_server(s)


@pytest.mark.parametrize("client_flags", [0, 1, 3])
def test_old_style_export_name(hostile, client_flags):
    """NBD_OPT_EXPORT_NAME, the option clients older than NBD_OPT_GO use, with and
    without fixed newstyle and the 124 zero bytes."""
    s = hostile.connect()
    n.recv_exact(s, 18)
    s.sendall(struct.pack(">I", client_flags))
    n.send_option(s, 1, b"")
    size, flags = struct.unpack(">QH", n.recv_exact(s, 10))
    assert size == 16 * MiB and flags & 1
    if not client_flags & 2:
        assert n.recv_exact(s, 124) == bytes(124)
    n.request(s, n.CMD_READ, 1536 * 1024, 512, cookie=77)
    assert n.reply(s, 512) == (0, b"\x22" * 512, [])
    n.request(s, n.CMD_DISC, 0, 0)
    assert n.closed_by_server(s)
    # A name the server does not export ends the connection (no error reply exists).
    s = hostile.connect()
    n.greet(s)
    n.send_option(s, 1, b"nosuch")
    assert n.closed_by_server(s)


def test_silent_client_is_dropped_after_the_handshake_limit(hostile):
    s = hostile.connect()
    t0 = time.monotonic()
    assert n.closed_by_server(s, timeout=10)
    assert time.monotonic() - t0 < 9       # the limit is 2 s; the rest is a loaded CI machine


def test_bad_requests(hostile):
    s = hostile.connect()
    n.go(s, allocation=False)
    n.request(s, n.CMD_READ, 0, 33 * MiB)
    assert n.reply(s)[0] == n.EINVAL
    n.request(s, n.CMD_READ, 16 * MiB - 512, 1024)
    assert n.reply(s)[0] == n.EINVAL
    n.request(s, n.CMD_READ, (1 << 64) - 512, 1024)
    assert n.reply(s)[0] == n.EINVAL
    n.request(s, n.CMD_WRITE, 16 * MiB, 512, data=b"z" * 512)
    assert n.reply(s)[0] == n.ENOSPC
    n.request(s, n.CMD_WRITE_ZEROES, 15 * MiB, 2 * MiB)
    assert n.reply(s)[0] == n.ENOSPC
    n.request(s, n.CMD_BLOCK_STATUS, 0, 4096)            # no context negotiated
    assert n.reply(s)[0] == n.EINVAL
    n.request(s, 77, 0, 0)
    assert n.reply(s)[0] == n.EINVAL
    n.request(s, n.CMD_READ, 0, 512, flags=0x8000)
    assert n.reply(s)[0] == n.EINVAL
    # The connection still works.
    n.request(s, n.CMD_READ, 1536 * 1024, 512)
    err, _, chunks = n.reply(s)
    assert err == 0 and chunks[0][1][8:] == b"\x22" * 512
    # A write longer than the limit cannot be skipped: an error, then the end.
    n.request(s, n.CMD_WRITE, 0, 64 * MiB)
    assert n.reply(s)[0] == n.EINVAL
    assert n.closed_by_server(s)


def test_large_reads_and_writes(hostile, tmp_path):
    """Requests past the session's own buffer borrow from the shared budget."""
    want = converted(hostile.image, "qcow2", str(tmp_path / "want.raw"))
    s = hostile.connect()
    n.go(s)
    n.request(s, n.CMD_READ, 0, 16 * MiB)
    err, _, chunks = n.reply(s)
    assert err == 0 and n.assemble_read(0, 16 * MiB, chunks) == want
    assert any(kind == 2 for kind, _ in chunks), "holes are sent as holes"
    n.request(s, n.CMD_READ, 0, 3 * MiB, flags=4)           # DF: one data chunk
    err, _, chunks = n.reply(s)
    assert err == 0 and [k for k, _ in chunks] == [1] and chunks[0][1][8:] == want[:3 * MiB]
    blob = os.urandom(5 * MiB)
    n.request(s, n.CMD_WRITE, 8 * MiB, len(blob), data=blob, flags=1)
    assert n.reply(s)[0] == 0
    n.request(s, n.CMD_READ, 8 * MiB, len(blob))
    err, _, chunks = n.reply(s)
    assert err == 0 and n.assemble_read(8 * MiB, len(blob), chunks) == blob
    n.request(s, n.CMD_DISC, 0, 0)
    s.close()


def test_write_whose_data_never_arrives(hostile):
    stalled = hostile.connect()
    n.go(stalled)
    n.request(stalled, n.CMD_WRITE, 1536 * 1024, MiB, data=b"\xee" * 1000)
    # Others are served meanwhile.
    other = hostile.connect()
    n.go(other)
    n.request(other, n.CMD_READ, 1536 * 1024, 4096)
    err, _, chunks = n.reply(other)
    assert err == 0 and chunks[0][1][8:] == b"\x22" * 4096
    other.close()
    stalled.close()          # disconnect mid-write: nothing of it lands


def test_many_connections_with_small_shared(hostile):
    socks = []
    try:
        for _ in range(500):
            try:
                socks.append(hostile.connect(timeout=10))
            except OSError:
                break
        assert len(socks) >= 100
        # None of them says a word: the admitted ones meet the handshake limit, the
        # others are refused; the server closes every one of them soon.
        deadline = time.monotonic() + 15
        for s in socks:
            assert n.closed_by_server(s, timeout=max(0.1, deadline - time.monotonic()))
    finally:
        for s in socks:
            s.close()
    # Four clients in transmission fill --shared 4; the fifth is told why it may not in.
    holders = [n.admitted(hostile) for _ in range(4)]
    extra = hostile.connect()
    n.greet(extra)
    n.send_option(extra, n.OPT_GO, struct.pack(">IH", 0, 0))
    _, rep, msg = n.option_reply(extra)
    assert rep == n.REP_ERR_POLICY and b"--shared" in msg
    extra.close()
    for s in holders:
        s.close()
    time.sleep(0.5)


def test_next_client_waits_for_a_freeing_slot(tmp_path, qemu_tools):
    """With --shared 1, a client that connects while the previous one is leaving is
    served once it has left, as qemu-nbd serves it (its listener pauses)."""
    _, top = make_chain(tmp_path)
    with serve(["-t", "-r", "-f", "qcow2", top], tmp_path) as srv:
        first = srv.connect()
        n.go(first)
        second = srv.connect()
        time.sleep(0.3)
        n.request(first, n.CMD_DISC, 0, 0)
        first.close()
        size, _ = n.go(second)          # would be ERR_POLICY had it been turned away
        assert size == 16 * MiB
        n.request(second, n.CMD_DISC, 0, 0)
        second.close()


PROBE = 1536 * 1024     # where the hostile fixture's good client reads 0x22 afterwards
REQUEST = st.builds(
    lambda cmd, flags, offset, length, payload: (cmd, flags, offset, length, payload),
    st.sampled_from([0, 1, 3, 4, 5, 6, 7, 9, 0xFFFF]),
    st.sampled_from([0, 1, 2, 4, 8, 16, 0x8000]),
    st.one_of(st.integers(0, 16 * MiB), st.integers(0, (1 << 64) - 1)),
    st.one_of(st.integers(0, 70_000), st.integers(0, (1 << 32) - 1)),
    st.binary(max_size=4096),
).filter(lambda r: not (r[2] < PROBE + 4096 and r[2] + r[3] > PROBE))   # the fixture's probe stays intact


@settings(max_examples=200 if FUZZ else 25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(noise=st.one_of(st.binary(min_size=1, max_size=2000), st.lists(REQUEST, min_size=1, max_size=6)))
def test_random_bytes_after_handshake(hostile, noise):
    s = hostile.connect()
    try:
        n.go(s, allocation=True)
        try:
            if isinstance(noise, bytes):
                s.sendall(noise)
            else:
                for cmd, flags, offset, length, payload in noise:
                    s.sendall(struct.pack(">IHHQQI", n.REQUEST_MAGIC, flags, cmd, 1, offset, length) + payload)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass            # the server already dropped us: what the test allows
        # The server answers what it can and then drops us; it never stalls.
        assert n.closed_by_server(s, timeout=20)
    finally:
        s.close()
    assert hostile.alive()


OPTION = st.tuples(st.sampled_from([1, 3, 5, 6, 7, 8, 9, 10, 11, 99, 0xFFFFFFFF]),
                   st.one_of(st.binary(max_size=64),
                             st.builds(lambda name, k: struct.pack(">I", len(name)) + name + struct.pack(">H", k),
                                       st.binary(max_size=8), st.integers(0, 0xFFFF))))


@settings(max_examples=150 if FUZZ else 20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flags=st.sampled_from([0, 1, 3, 4]), options=st.lists(OPTION, min_size=1, max_size=6))
def test_random_options(hostile, flags, options):
    s = hostile.connect()
    try:
        n.recv_exact(s, 18)
        try:
            s.sendall(struct.pack(">I", flags))
            for option, data in options:
                n.send_option(s, option, data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        # Whatever it made of them, the server ends this client once it stops talking.
        assert n.closed_by_server(s, timeout=20)
    finally:
        s.close()
    assert hostile.alive()


# ---------------------------------------------------------------- the command line

@pytest.mark.parametrize("args, says", [
    (["/nonexistent/disk.raw"], "/nonexistent/disk.raw"),
    (["-p", "70000", "IMG"], "port"),
    (["-p", "x", "IMG"], "port"),
    (["--bogus", "IMG"], "--bogus"),
    (["-e", "-3", "IMG"], "shared"),
    (["-f", "vmdk", "IMG"], "vmdk"),
    (["-c", "/nonexistent/nbd0", "IMG"], "/nonexistent/nbd0"),
    (["-k", "SOCK", "-p", "1234", "IMG"], "-k"),
    (["--multi-conn", "IMG"], "--multi-conn"),
])
def test_cli_errors_are_one_line_status_2(tmp_path, args, says):
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(MiB))
    args = [str(img) if a == "IMG" else str(tmp_path / "s") if a == "SOCK" else a for a in args]
    r = run_kvmpy(["nbd", *args], timeout=30)
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert len(err.strip().splitlines()) == 1 and says in err, err


def test_writable_export_beyond_loopback_warns(tmp_path):
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(MiB))
    port = n.free_port()
    loud = n.NbdServerProcess(["-b", "0.0.0.0", "-f", "raw", str(img)], port=port, listen_args=[])
    _, err = loud.stop()
    assert "exported writable to anyone" in err
    quiet = n.NbdServerProcess(["-f", "raw", str(img)], port=n.free_port())     # 127.0.0.1
    _, err = quiet.stop()
    assert "exported writable" not in err


def test_socket_path_in_use_is_refused(tmp_path):
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(MiB))
    taken = tmp_path / "taken.sock"
    taken.write_text("mine")
    r = run_kvmpy(["nbd", "-k", str(taken), str(img)], timeout=30)
    assert r.returncode == 2 and "taken.sock" in r.stderr.decode()
    assert taken.read_text() == "mine"


# ---------------------------------------------------------------- kernel client

def test_kernel_nbd_device(tmp_path, qemu_tools):
    if os.geteuid() != 0:
        pytest.skip("-c /dev/nbdX needs root")
    if not os.path.exists("/dev/nbd0") and shutil.which("modprobe"):
        subprocess.run(["modprobe", "nbd"], capture_output=True)
    if not os.path.exists("/dev/nbd0"):
        pytest.skip("no /dev/nbd0: the nbd kernel module is not available on this host")
    _, top = make_chain(tmp_path)
    want = converted(top, "qcow2", str(tmp_path / "want.raw"))
    n_proc = subprocess.Popen([os.sys.executable, "-m", "kvmpy", "nbd", "-c", "/dev/nbd0", "-r", "-f", "qcow2", top],
                              cwd=n.ROOT, env=dict(os.environ, PYTHONPATH=n.ROOT),
                              stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with open("/sys/block/nbd0/size") as f:
                if int(f.read()) * 512 == len(want):
                    break
            time.sleep(0.1)
        with open("/dev/nbd0", "rb") as f:
            assert f.read(len(want)) == want
    finally:
        r = run_kvmpy(["nbd", "-d", "/dev/nbd0"], timeout=30)
        assert r.returncode == 0, r.stderr
        n_proc.wait(timeout=30)


def test_kernel_client_handshake_and_simple_replies(tmp_path, qemu_tools):
    """What -c does before handing the socket to the kernel, and the simple replies
    the kernel then reads, against the real server (no /dev/nbd needed)."""
    from kvmpy.nbd.kernel import client_handshake
    _, top = make_chain(tmp_path)
    want = converted(top, "qcow2", str(tmp_path / "want.raw"))
    with serve(["-t", "-r", "-x", "k", "-f", "qcow2", top], tmp_path) as srv:
        s = srv.connect()
        size, flags = client_handshake(s, b"k")
        assert size == 16 * MiB and flags & 1 and flags & 2
        n.request(s, n.CMD_READ, 1 * MiB, 2 * MiB, cookie=0x1234)
        magic, err, cookie = struct.unpack(">IIQ", n.recv_exact(s, 16))
        assert (magic, err, cookie) == (n.SIMPLE_REPLY_MAGIC, 0, 0x1234)
        assert n.recv_exact(s, 2 * MiB) == want[MiB:3 * MiB]
        n.request(s, n.CMD_DISC, 0, 0)
        s.close()


def test_kernel_ioctl_numbers_match_linux_nbd_h(tmp_path):
    """-c cannot run on a host without the nbd module; its ioctl numbers are still
    checked against the kernel's header."""
    gcc = tool_required("gcc")
    if not os.path.exists("/usr/include/linux/nbd.h"):
        pytest.skip("linux/nbd.h is not installed (linux-libc-dev)")
    from kvmpy.nbd import kernel
    names = ["NBD_SET_SOCK", "NBD_SET_BLKSIZE", "NBD_DO_IT", "NBD_CLEAR_SOCK", "NBD_CLEAR_QUE",
             "NBD_SET_SIZE_BLOCKS", "NBD_DISCONNECT", "NBD_SET_FLAGS"]
    src = tmp_path / "n.c"
    src.write_text("#include <stdio.h>\n#include <linux/fs.h>\n#include <linux/nbd.h>\nint main(void){\n"
                   + "".join(f'printf("%lu\\n", (unsigned long){x});\n' for x in names + ["BLKROSET"])
                   + "return 0;}\n")
    sh(gcc, "-o", str(tmp_path / "n"), str(src))
    got = [int(x) for x in sh(str(tmp_path / "n")).stdout.split()]
    assert got == [getattr(kernel, x) for x in names + ["BLKROSET"]]
