"""Linux on the VGA: Debian's kernel (the default guest's) drives the screen with
vgacon, a VNC viewer reads the screen and types a command with ``-k de``, and the
command's output appears on the screen (read back off the picture with the font).
Under the translator, as Linux runs here; about half a minute."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from support.rfb import RfbClient
from support.screen_text import screen_lines
from kvmpy.display.keymap import KEYMAP_DIRS

BOOT_TIMEOUT = 240
XK_Return = 0xFF0D


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    from kvmpy.tools import guestbuild
    if not all(map(shutil.which, ("apt-get", "dpkg-deb"))):
        pytest.skip("not a Debian host: no apt-get/dpkg-deb to build the guest")
    return guestbuild.build(out_dir=str(tmp_path_factory.mktemp("guest")), disk_size="64M")


def screen(viewer: RfbClient) -> list[str]:
    viewer.update()
    return screen_lines(bytes(viewer.pixels), viewer.width, viewer.height)


def wait_screen(viewer: RfbClient, predicate, timeout: float, proc) -> list[str]:
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while time.monotonic() < deadline and proc.poll() is None:
        lines = screen(viewer)
        if predicate(lines):
            return lines
        time.sleep(1)
    raise AssertionError("the screen never showed it:\n" + "\n".join(lines))


@pytest.mark.skipif(not any(os.path.isdir(d) for d in KEYMAP_DIRS), reason="QEMU's keymaps are not installed")
def test_linux_console_on_the_vga_typed_into_over_vnc(guest, tmp_path):
    sock = str(tmp_path / "vnc.sock")
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "kvmpy", "run", "--accel", "tcg", "-m", "512",
                             "--kernel", guest.kernel, "--initrd", guest.initrd, "--no-reboot",
                             "--append", "console=ttyS0 console=tty0 panic=-1", "--vnc", f"unix:{sock}",
                             "-k", "de"], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
            time.sleep(0.1)
        viewer = RfbClient(sock)
        lines = wait_screen(viewer, lambda ls: any(line.startswith("kvmpy:/#") for line in ls), BOOT_TIMEOUT, proc)
        assert any("kvmpy guest: init" in line for line in lines), lines
        for ch in "echo vga 42 hello":
            viewer.tap(ord(ch))
        viewer.tap(XK_Return)
        lines = wait_screen(viewer, lambda ls: "vga 42 hello" in ls, 60, proc)
        # The shell echoed what was typed; a kernel message printed after the prompt
        # (the NIC's link coming up) may stand between the prompt and the echo.
        assert any(line in ("kvmpy:/# echo vga 42 hello", "echo vga 42 hello") for line in lines), "\n".join(lines)
        # The picture itself, for a human to look at when this fails.
        (tmp_path / "screen.txt").write_text("\n".join(lines))
        viewer.close()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
