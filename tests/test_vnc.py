"""The VNC server: handshakes (None and VNC auth, RFB 3.3/3.7/3.8), pictures in the
pixel formats viewers ask for (Raw and ZRLE), DesktopSize on a mode change, keys
through QEMU's keymaps to the real i8042 model, the pointer to its PS/2 mouse,
hostile viewers (random messages, a viewer that never reads) that must not stop
the server or the VM; then a whole VM: keys typed with ``-k de`` reach the test
guest as the scancodes a German keyboard sends."""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import KVM_SKIP_REASON, ROOT, guest_path
from support.rfb import RfbClient, RfbError, WebSocketStream
from kvmpy.devices.i8042 import CTR_XLATE, I8042, key_bytes
from kvmpy.devices.vga import VBE_BPP, VBE_ENABLE, VBE_XRES, VBE_YRES, Vga, VgaPorts, VgaWindow
from kvmpy.display.des import des_encrypt_block, vnc_auth_response
from kvmpy.display.display import Display
from kvmpy.display.keymap import KEYMAP_DIRS, Keymap, parse_key_combo
from kvmpy.display.vnc import BACKLOG_DROP, PixelFormat, VncServer, parse_vnc_spec
from kvmpy.errors import ConfigError
from kvmpy.events import EventLoop

FUZZ = int(os.environ.get("KVMPY_FUZZ", "0") or 0)

XK_z, XK_y, XK_adiaeresis, XK_Shift_L, XK_ssharp = 0x7A, 0x79, 0xE4, 0xFFE1, 0xDF

keymaps_required = pytest.mark.skipif(not any(os.path.isdir(d) for d in KEYMAP_DIRS),
                                      reason="QEMU's keymaps are not installed (Debian: qemu-system-data)")


def test_des_matches_the_fips_example_and_vnc_auth_reverses_key_bits():
    assert des_encrypt_block(bytes.fromhex("133457799BBCDFF1"), bytes.fromhex("0123456789ABCDEF")) \
        == bytes.fromhex("85E813540F0AB405")
    # VNC's key is the password with each byte's bits reversed: "\x80" is key byte 0x01
    challenge = bytes(range(16))
    assert vnc_auth_response("\x80", challenge)[:8] == des_encrypt_block(bytes([1, 0, 0, 0, 0, 0, 0, 0]),
                                                                         challenge[:8])


def test_vnc_spec_parsing():
    a = parse_vnc_spec(":1", "--vnc")
    assert (a.kind, a.host, a.port, a.password) == ("tcp", "", 5901, False)
    a = parse_vnc_spec("127.0.0.1:0,password=on", "--vnc")
    assert (a.host, a.port, a.password) == ("127.0.0.1", 5900, True)
    assert parse_vnc_spec("unix:/tmp/x.sock", "--vnc").path == "/tmp/x.sock"
    assert parse_vnc_spec("none", "--vnc") is None
    assert parse_vnc_spec(":1,websocket=5701", "--vnc").websocket == 5701
    for bad in ("1", ":x", "unix:", ":1,foo=bar", ":70000", ":1,websocket=x"):
        with pytest.raises(ConfigError, match="--vnc"):
            parse_vnc_spec(bad, "--vnc")


@keymaps_required
def test_keymaps_put_keys_where_the_layout_has_them():
    de, us = Keymap("de"), Keymap("en-us")
    assert de.key_for(XK_z) == 0x15 and de.key_for(XK_y) == 0x2C     # German QWERTZ
    assert us.key_for(XK_z) == 0x2C and us.key_for(XK_y) == 0x15
    assert de.key_for(XK_adiaeresis) == 0x28 and de.key_for(XK_ssharp) == 0x0C
    assert de.key_for(ord("Z"), shift=True) == 0x15
    assert de.key_for(ord("@"), altgr=True) == 0x10                    # AltGr-q
    assert de.key_for(0xFF52) == 0xC8                                  # Up: an 0xE0 key
    fr = Keymap("fr")
    assert fr.key_for(ord("a")) == 0x10                                # AZERTY
    assert parse_key_combo("ctrl-alt-delete") == [0x1D, 0x38, 0xD3]
    with pytest.raises(ValueError, match="nosuchkey"):
        parse_key_combo("ctrl-nosuchkey")


def test_key_bytes_follow_the_controllers_translation():
    assert key_bytes(0x15, True, 2, translated=True) == b"\x15"
    assert key_bytes(0x15, False, 2, translated=True) == b"\x95"
    assert key_bytes(0xC8, True, 2, translated=True) == b"\xe0\x48"
    assert key_bytes(0x15, True, 2, translated=False) == b"\x35"       # set 2 'y' key
    assert key_bytes(0x15, False, 2, translated=False) == b"\xf0\x35"
    assert key_bytes(0xC8, False, 2, translated=False) == b"\xe0\xf0\x75"


# --- a server over the real VGA and i8042 models ----------------------------------------------
class Rig:
    def __init__(self, tmp_path, spec: str = "", keymap: str | None = "de"):
        self.events = EventLoop(name="vnc-test")
        self.events.start()
        self.vga = Vga()
        self.irqs: list[tuple[str, bool]] = []
        self.kbc = I8042(lambda: None, lambda level: self.irqs.append(("kbd", level)), aux=True,
                         irq_aux=lambda level: self.irqs.append(("aux", level)))
        self.display = Display(self.vga, self.kbc, self.events)
        self.path = str(tmp_path / "vnc.sock")
        address = parse_vnc_spec(f"unix:{self.path}{spec}", "test")
        km = Keymap(keymap) if keymap and any(os.path.isdir(d) for d in KEYMAP_DIRS) else None
        box: list = []
        self.events.call_and_wait(lambda: box.append(VncServer(address, self.display, self.events, km,
                                                               name="rig")))
        self.server = box[0]

    def text(self, s: str, attr: int = 0x1F) -> None:
        window = VgaWindow(self.vga)
        for i, ch in enumerate(s):
            window.write(0x18000 + 2 * i, 2, ord(ch) | attr << 8)

    def client(self, **kw) -> RfbClient:
        return RfbClient(self.path, **kw)

    def guest_reads(self) -> bytes:
        out = bytearray()
        while self.kbc.command.read(0, 1) & 1:
            out.append(self.kbc.data.read(0, 1))
        return bytes(out)

    def close(self) -> None:
        self.events.call_and_wait(self.server.close)
        self.events.close()
        self.vga.close()


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


def assert_same_picture(client: RfbClient, display: Display) -> None:
    surface = display.surface()
    assert (client.width, client.height) == (surface.width, surface.height)
    assert client.pixels == surface.data, "the viewer's picture differs from the screen"


def test_viewer_sees_the_text_screen_in_zrle_and_raw(rig):
    rig.text("kvmpy VNC")
    zrle = rig.client()
    assert zrle.name == "rig" and (zrle.width, zrle.height) == (720, 400)
    zrle.update()
    assert_same_picture(zrle, rig.display)
    raw = rig.client(encodings=(0,))
    raw.update()
    assert_same_picture(raw, rig.display)
    # an incremental update carries only what changed
    rig.text("KVMPY")
    assert zrle.update(incremental=True) == 1
    assert_same_picture(zrle, rig.display)
    zrle.close()
    raw.close()


@pytest.mark.parametrize("fmt", [
    dict(bpp=16, depth=16, maxes=(31, 63, 31), shifts=(11, 5, 0)),
    dict(bpp=32, depth=24, big_endian=True, maxes=(255, 255, 255), shifts=(0, 8, 16)),
    dict(bpp=8, depth=8, maxes=(7, 7, 3), shifts=(0, 3, 6)),
    dict(bpp=32, depth=24, maxes=(255, 255, 255), shifts=(24, 16, 8)),
])
@pytest.mark.parametrize("encoding", [0, 16])
def test_pixel_formats_a_viewer_asks_for(rig, fmt, encoding):
    rig.text("\xdb\xdb colours", attr=0x4E)
    client = rig.client(encodings=(encoding,))
    client.set_pixel_format(**fmt)
    client.update()
    want = rig.display.surface()
    maxes = fmt["maxes"]
    for x, y in ((0, 0), (3, 5), (20, 10), (100, 300)):
        o = (y * want.width + x) * 4
        r, g, b = want.data[o + 2], want.data[o + 1], want.data[o]
        expected = tuple(((c * m + 127) // 255) * 255 // m for c, m in zip((r, g, b), maxes))
        assert client.rgb_at(x, y) == expected, (x, y)
    client.close()


def test_mode_change_sends_desktop_size(rig):
    client = rig.client()
    client.update()
    dispi = VgaPorts(rig.vga)
    for index, value in ((VBE_XRES, 320), (VBE_YRES, 200), (VBE_BPP, 32), (VBE_ENABLE, 0x41)):
        dispi.write(0, 2, index)
        dispi.write(1, 2, value)
    for i in range(320 * 200):
        rig.vga.vram[i * 4:i * 4 + 4] = ((i * 99991) & 0xFFFFFF).to_bytes(4, "little")
    client.update(incremental=True)
    assert client.resized == 1 and (client.width, client.height) == (320, 200)
    want = rig.display.surface()
    assert client.pixels == want.data
    client.close()


@pytest.mark.parametrize("version", [b"RFB 003.003\n", b"RFB 003.007\n", b"RFB 003.008\n"])
def test_protocol_versions(rig, version):
    client = rig.client(version=version)
    client.update()
    assert_same_picture(client, rig.display)
    client.close()


def test_vnc_password(tmp_path):
    rig = Rig(tmp_path, ",password=on")
    try:
        with pytest.raises(RfbError):
            rig.client(password="anything")      # no password set yet: nobody gets in
        rig.server.password = "s3cret"
        with pytest.raises(RfbError, match="authentication failed"):
            rig.client(password="wrong")
        client = rig.client(password="s3cret")
        client.update()
        assert_same_picture(client, rig.display)
        client.close()
    finally:
        rig.close()


@keymaps_required
def test_keys_with_a_german_layout_reach_the_keyboard(rig):
    client = rig.client()
    client.tap(XK_z)
    client.tap(XK_adiaeresis)
    client.key(XK_Shift_L, True)
    client.tap(ord("Z"))
    client.key(XK_Shift_L, False)
    client.update()                     # a round trip: the keys were handled before the update
    assert rig.guest_reads() == bytes([0x15, 0x95, 0x28, 0xA8, 0x2A, 0x15, 0x95, 0xAA])
    # translation off (a guest reading set 2): the same keys in set 2
    rig.kbc.ctr &= ~CTR_XLATE
    client.tap(XK_z)
    client.update(incremental=False)
    assert rig.guest_reads() == b"\x35\xf0\x35"
    client.close()


@keymaps_required
def test_a_viewer_leaving_releases_its_keys(rig):
    client = rig.client()
    client.key(XK_z, True)
    client.update()
    client.close()
    deadline = time.monotonic() + 5
    got = b""
    while time.monotonic() < deadline and len(got) < 2:
        got += rig.guest_reads()
        time.sleep(0.02)
    assert got == b"\x15\x95"


def test_pointer_moves_the_ps2_mouse(rig):
    kbc = rig.kbc
    kbc.command.write(0, 1, 0x60)
    kbc.data.write(0, 1, 0x47)                # interrupts for both ports, AUX enabled, translation
    kbc.command.write(0, 1, 0xD4)
    kbc.data.write(0, 1, 0xF4)                # streaming on
    assert kbc.data.read(0, 1) == 0xFA
    client = rig.client()
    client.pointer(100, 100)
    client.pointer(110, 95, buttons=1)
    client.update()
    packets = rig.guest_reads()
    # first position: no motion; then +10 right, +5 up (PS/2 counts y upwards), left button
    assert packets == bytes([0x08, 0, 0, 0x09, 10, 5])
    assert ("aux", True) in rig.irqs
    client.close()


def test_a_stalled_viewer_does_not_stop_the_others(rig):
    """A viewer that asks for frames and never reads: the server keeps serving the
    others, and the (guest side) model keeps working; the stalled one is dropped
    once its backlog passes the limit, or just skips frames."""
    stalled = socket.socket(socket.AF_UNIX)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(rig.path)
    stalled.recv(12)
    stalled.sendall(b"RFB 003.008\n")
    stalled.recv(2)
    stalled.sendall(b"\x01")
    stalled.recv(4)
    stalled.sendall(b"\x01")
    stalled.sendall(struct.pack(">BxHi", 2, 1, 0))     # Raw only: the most bytes
    live = rig.client()
    for frame in range(30):
        rig.text(f"frame {frame:3d}", attr=0x10 + frame % 7)
        stalled.sendall(struct.pack(">BBHHHH", 3, 0, 0, 0, 720, 400))
        started = time.monotonic()
        live.update(incremental=True)
        assert time.monotonic() - started < 5, "the live viewer waited for the stalled one"
        assert_same_picture(live, rig.display)
    backlog = [len(c.outbuf) for c in rig.server.clients]
    assert max(backlog) <= BACKLOG_DROP
    live.close()
    stalled.close()


@settings(max_examples=40 * (10 if FUZZ else 1), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(handshake=st.booleans(), junk=st.lists(st.one_of(
    st.binary(max_size=64),
    st.tuples(st.sampled_from([0, 2, 3, 4, 5, 6]), st.binary(max_size=24)).map(lambda t: bytes([t[0]]) + t[1]),
), max_size=12))
def test_random_client_messages_never_break_the_server(rig, handshake, junk):
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(5)
    sock.connect(rig.path)
    try:
        sock.recv(12)
        if handshake:
            sock.sendall(b"RFB 003.008\n\x01\x01")
        for chunk in junk:
            sock.sendall(chunk)
    except OSError:
        pass            # the server may close a viewer that sent garbage: that is the point
    finally:
        sock.close()
    viewer = rig.client()
    viewer.update()
    assert_same_picture(viewer, rig.display)
    viewer.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_get(port: int, path: str) -> tuple[str, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.decode().split("\r\n")[0], body


def test_websocket_accept_matches_the_rfc_example():
    from kvmpy.display.vnc import websocket_accept
    assert websocket_accept("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_websocket_viewer_and_the_browser_page(tmp_path):
    """QEMU's websocket=PORT: RFB in WebSocket frames (what noVNC speaks), and the
    page that loads noVNC from the same port."""
    port = free_port()
    rig = Rig(tmp_path, f",websocket={port}")
    try:
        rig.text("in a browser")
        stream = WebSocketStream("127.0.0.1", port)
        assert stream.protocol == "binary"
        viewer = RfbClient(stream)
        viewer.update()
        assert_same_picture(viewer, rig.display)
        if os.path.isdir(KEYMAP_DIRS[0]):
            viewer.tap(XK_z)
            viewer.update(incremental=False)
            assert rig.guest_reads() == b"\x15\x95"
        viewer.close()
        status, body = http_get(port, "/../../etc/passwd")
        assert status.split()[1] == "404"
        if not rig.server.web_files:
            status, body = http_get(port, "/")
            assert status.split()[1] == "404" and b"make novnc" in body
            pytest.skip("noVNC is not vendored (make novnc) nor installed: the page is not served")
        status, body = http_get(port, "/")
        assert status.split()[1] == "200" and b"import RFB from './core/rfb.js'" in body
        status, body = http_get(port, "/core/rfb.js")
        assert status.split()[1] == "200" and b"export default class RFB" in body
    finally:
        rig.close()



def test_a_browser_that_does_not_read_its_page_cannot_grow_the_servers_input(tmp_path):
    """While a page goes out, what the browser sends is not kept: a client that reads
    nothing and sends on must not grow the server's memory."""
    port = free_port()
    rig = Rig(tmp_path, f",websocket={port}")
    try:
        rig.server.web_files = {"/": b"x" * (8 << 20)}
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(10)
        s.connect(("127.0.0.1", port))
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        for _ in range(64):
            s.sendall(bytes(64 << 10))      # 4 MiB the server has no use for
        time.sleep(0.5)
        held = []
        rig.events.call_and_wait(lambda: held.extend(len(c.raw) + len(c.inbuf) for c in rig.server.clients))
        assert all(n <= 1 << 20 for n in held), held
        s.close()
    finally:
        rig.close()

@keymaps_required
def test_display_table_in_vm_toml():
    from kvmpy.config import config_from_dict
    cfg = config_from_dict({"display": {"vnc": "unix:/tmp/x.sock,password=on", "keymap": "fr"}}, "vm.toml")
    assert (cfg.display.vga, cfg.display.vnc_password, cfg.display.keymap) == ("std", True, "fr")
    assert config_from_dict({}, "vm.toml").display.vga == "none"
    for bad, where in (({"vga": "cirrus"}, "[display] key 'vga'"), ({"vnc": 5}, "[display] key 'vnc'"),
                       ({"keymap": "xx"}, "[display] key 'keymap'"), ({"screen": 1}, "[display]")):
        with pytest.raises(ConfigError, match=re.escape(where)):
            config_from_dict({"display": bad}, "vm.toml")


def test_pixel_format_problems_are_refused():
    assert PixelFormat(bits_per_pixel=24).problem()
    assert PixelFormat(true_colour=False).problem()
    assert PixelFormat(red_max=300).problem()
    assert PixelFormat().problem() is None


# --- a whole VM ---------------------------------------------------------------------------
@keymaps_required
@pytest.mark.parametrize("accel", [
    pytest.param("kvm", marks=pytest.mark.skipif(KVM_SKIP_REASON is not None, reason=str(KVM_SKIP_REASON))),
    "tcg"])
def test_typing_over_vnc_with_a_german_layout_reaches_the_guest(tmp_path, accel):
    sock = str(tmp_path / "vnc.sock")
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "kvmpy", "run", "--accel", accel, "--kernel", guest_path("vga"),
                             "--append", "phase=kbd count=6", "--vnc", f"unix:{sock}", "-k", "de"],
                            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        out = b""
        deadline = time.monotonic() + 60
        while b"kbd: listening" not in out and time.monotonic() < deadline:
            out += os.read(proc.stdout.fileno(), 4096)
        assert b"kbd: listening" in out, out + proc.stderr.read() if proc.poll() is not None else out
        client = RfbClient(sock)
        client.update()
        assert (client.width, client.height) == (720, 400)
        client.tap(XK_z)
        client.tap(XK_y)
        client.tap(XK_adiaeresis)
        deadline = time.monotonic() + 60
        while b"guest: done" not in out and time.monotonic() < deadline:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            out += chunk
        lines = [line for line in out.decode().splitlines() if line.startswith("kbd: ") and "listening" not in line]
        assert lines == ["kbd: 15", "kbd: 95", "kbd: 2c", "kbd: ac", "kbd: 28", "kbd: a8"], out
        assert proc.wait(timeout=30) == 0
        client.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.parametrize("accel", [
    pytest.param("kvm", marks=pytest.mark.skipif(KVM_SKIP_REASON is not None, reason=str(KVM_SKIP_REASON))),
    "tcg"])
def test_a_viewer_sees_the_guests_vbe_mode(tmp_path, accel):
    """The framebuffer the guest drew through its BAR (a KVM memory slot with a dirty
    log, or the translator's RAM), as a viewer on TCP gets it."""
    from test_vga import expected_vbe
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "kvmpy", "run", "--accel", accel, "--kernel", guest_path("vga"),
                             "--append", "phase=vbe", "--vnc", f"127.0.0.1:{port - 5900}"],
                            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        out = b""
        deadline = time.monotonic() + 60
        while b"vga: vbe ready" not in out and time.monotonic() < deadline and proc.poll() is None:
            out += os.read(proc.stdout.fileno(), 4096)
        assert b"vga: vbe ready" in out, out
        client = RfbClient(("127.0.0.1", port))
        client.update()
        assert client.pixels == expected_vbe().data
        assert client.update(incremental=False) == 1      # a full update again on request
        client.close()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_bad_vnc_options_are_one_line(tmp_path):
    from conftest import run_kvmpy
    for args, needle in (([":x"], b"--vnc :x"), (["-k", "xx-nowhere"], b"-k xx-nowhere")):
        opt = ["--vnc", *args] if args[0].startswith(":") else args
        res = run_kvmpy(["run", "--kernel", guest_path("vga"), *opt])
        assert res.returncode == 2, res.stderr
        assert needle in res.stderr and len(res.stderr.decode().strip().splitlines()) == 1, res.stderr


def test_monitor_commands_for_the_display(tmp_path):
    """query-vnc / info vnc, change-vnc-password, HMP sendkey and QMP send-key on a
    running VM (the guest reports the bytes its keyboard controller gives it)."""
    from test_vga import GuestVm
    sock = str(tmp_path / "vnc.sock")
    vm = GuestVm(tmp_path, "tcg", "kbd count=6", "--vnc", f"unix:{sock},password=on")
    try:
        vm.wait_for(b"kbd: listening")
        (info,) = vm.qmp({"execute": "query-vnc"})
        assert info["return"]["enabled"] and info["return"]["auth"] == "vnc"
        assert info["return"]["family"] == "unix" and info["return"]["service"] == sock
        with pytest.raises(RfbError):
            RfbClient(sock, password="pw")            # no password set: nobody gets in
        assert vm.qmp({"execute": "change-vnc-password", "arguments": {"password": "pw"}}) == [{"return": {}}]
        viewer = RfbClient(sock, password="pw")
        viewer.update()
        (info,) = vm.qmp({"execute": "query-vnc"})
        assert info["return"]["clients"] == [{"host": sock, "service": "", "family": "unix", "websocket": False}]
        replies = vm.qmp({"execute": "human-monitor-command", "arguments": {"command-line": "info vnc"}},
                         {"execute": "human-monitor-command", "arguments": {"command-line": "sendkey shift-a 10"}},
                         {"execute": "human-monitor-command", "arguments": {"command-line": "sendkey nokey"}},
                         {"execute": "send-key", "arguments": {"keys": [{"type": "qcode", "data": "esc"}],
                                                               "hold-time": 10}},
                         {"execute": "send-key", "arguments": {"keys": [{"type": "qcode", "data": "nokey"}]}})
        assert f"Server: {sock}" in replies[0]["return"] and f"Client: {sock} (unix)" in replies[0]["return"]
        assert replies[1] == {"return": ""}
        assert "unknown key: 'nokey'" in replies[2]["return"]
        assert replies[3] == {"return": {}} and "error" in replies[4]
        out = vm.wait_for(b"guest: done", timeout=60).decode()
        lines = [line for line in out.splitlines() if line.startswith("kbd: ") and "listening" not in line]
        assert lines == ["kbd: 2a", "kbd: 1e", "kbd: 9e", "kbd: aa", "kbd: 01", "kbd: 81"]
        viewer.close()
    finally:
        vm.close()
