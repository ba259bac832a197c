"""The browser console: headless Chromium (Debian's chromium) opens the page kvmpy
serves on the VNC WebSocket port, noVNC shows the guest's text screen (compared
pixel for pixel with the picture tests/test_vga.py computes), and a key typed in
the page reaches the guest through ``-k de``. Chromium is driven over its DevTools
protocol (a WebSocket of its own)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import zlib

import pytest

from conftest import ROOT, guest_path
from support.rfb import WebSocketStream
from test_vga import expected_text, first_difference, guest_text_cells
from kvmpy.display.keymap import KEYMAP_DIRS
from kvmpy.display.render import Surface
from kvmpy.display.vnc import load_web_files


def decode_any_png(data: bytes) -> Surface:
    """An 8-bit RGB or RGBA PNG with any row filters (what browsers write)."""
    pos, idat = 8, b""
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = int.from_bytes(body[:4], "big"), int.from_bytes(body[4:8], "big"), body[8], body[9]
            assert depth == 8 and colour in (2, 6) and body[12] == 0, "interlaced or unusual PNG"
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + b) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(line)
        prev = line
    out = bytearray(width * height * 4)
    for y, line in enumerate(rows):
        o = y * width * 4
        out[o:o + width * 4:4] = line[2::bpp]
        out[o + 1:o + width * 4:4] = line[1::bpp]
        out[o + 2:o + width * 4:4] = line[0::bpp]
    return Surface(width, height, out)


def crop(surface: Surface, x: int, y: int, width: int, height: int) -> Surface:
    out = bytearray()
    for row in range(y, y + height):
        o = (row * surface.width + x) * 4
        out += surface.data[o:o + width * 4]
    return Surface(width, height, out)


class DevTools:
    """Just enough of Chrome's DevTools protocol: one page, commands and their answers."""

    def __init__(self, port: int) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5))
                page = next(p for p in pages if p["type"] == "page")
                break
            except (OSError, StopIteration):
                assert time.monotonic() < deadline, "Chromium shows no page"
                time.sleep(0.2)
        path = re.sub(r"^ws://[^/]+", "", page["webSocketDebuggerUrl"])
        self.ws = WebSocketStream("127.0.0.1", port, path=path)
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.sendall(json.dumps({"id": self.next_id, "method": method, "params": params}).encode(), opcode=1)
        buffer = b""
        while True:
            buffer += self.ws.recv(1 << 20)
            try:
                message = json.loads(buffer)
            except ValueError:
                continue
            buffer = b""
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def close(self) -> None:
        self.ws.close()


@pytest.mark.skipif(not any(os.path.isdir(d) for d in KEYMAP_DIRS), reason="QEMU's keymaps are not installed")
def test_browser_console_shows_the_screen_and_types(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    if not load_web_files():
        pytest.skip("noVNC is not vendored (make novnc) nor installed (Debian's novnc)")
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        ws_port = probe.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=ROOT)
    vm = subprocess.Popen([sys.executable, "-m", "kvmpy", "run", "--accel", "tcg", "--kernel", guest_path("vga"),
                           "--append", "phase=kbd count=2", "--vnc", f"unix:{tmp_path / 'vnc.sock'},websocket={ws_port}",
                           "-k", "de"], cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    browser = None
    tools = None
    try:
        out = b""
        while b"kbd: listening" not in out:
            chunk = os.read(vm.stdout.fileno(), 4096)
            assert chunk, vm.stderr.read()
            out += chunk
        browser = subprocess.Popen([chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
                                    "--remote-debugging-port=0", f"--user-data-dir={tmp_path / 'profile'}",
                                    "--window-size=800,600", "--force-device-scale-factor=1",
                                    f"http://127.0.0.1:{ws_port}/?scale=0"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        line = b""
        deadline = time.monotonic() + 60
        while b"DevTools listening on" not in line:
            assert time.monotonic() < deadline, "Chromium did not start"
            line = browser.stderr.readline()
            assert line or browser.poll() is None, "Chromium exited"
        port = int(re.search(rb"ws://127\.0\.0\.1:(\d+)/", line).group(1))
        tools = DevTools(port)
        deadline = time.monotonic() + 60
        while not str(tools.evaluate("document.getElementById('status').textContent")).startswith("connected"):
            assert time.monotonic() < deadline, tools.evaluate("document.getElementById('status').textContent")
            time.sleep(0.2)
        time.sleep(1)      # the first full update drawn
        rect = tools.evaluate("JSON.stringify(document.querySelector('#screen canvas').getBoundingClientRect())")
        rect = json.loads(rect)
        shot = decode_any_png(base64.b64decode(tools.call("Page.captureScreenshot", format="png")["data"]))
        (tmp_path / "browser.png").write_bytes(base64.b64decode(tools.call("Page.captureScreenshot", format="png")["data"]))
        want = expected_text(guest_text_cells(), cursor=5 * 80 + 10)
        # The canvas' CSS box may sit at a fractional position: look within a pixel of it.
        differences = [first_difference(crop(shot, round(rect["x"]) + dx, round(rect["y"]) + dy, 720, 400), want)
                       for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        assert "" in differences, (rect, differences[4])
        for kind in ("keyDown", "keyUp"):
            tools.call("Input.dispatchKeyEvent", type=kind, key="z", code="KeyZ", text="z" if kind == "keyDown" else "",
                       windowsVirtualKeyCode=90, nativeVirtualKeyCode=90)
        deadline = time.monotonic() + 30
        while b"guest: done" not in out and time.monotonic() < deadline:
            chunk = os.read(vm.stdout.fileno(), 4096)
            if not chunk:
                break
            out += chunk
        lines = [x for x in out.decode().splitlines() if x.startswith("kbd: ") and "listening" not in x]
        assert lines == ["kbd: 15", "kbd: 95"], out       # the German keyboard's z key
    finally:
        if tools is not None:
            tools.close()
        if browser is not None:
            browser.kill()
            browser.wait()
            browser.stderr.close()
        vm.kill()
        vm.wait()
        vm.stdout.close()
        vm.stderr.close()
