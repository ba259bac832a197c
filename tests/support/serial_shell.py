"""A Linux guest's shell on kvmpy's stdio console, for the tests that boot the default
guest (user networking, its SMB share, virtio-fs) and drive it line by line."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import threading
import time
from typing import Iterator

# Linux under the translator, on a loaded 2-core CI machine.
BOOT_TIMEOUT = 900
COMMAND_TIMEOUT = 180


class SerialShell:
    """The guest's shell on kvmpy's stdio console: send a command line, wait for its
    end marker, return what it printed."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.out = bytearray()
        self.cond = threading.Condition()
        self.count = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            with self.cond:
                if not chunk:
                    self.cond.notify_all()
                    return
                self.out += chunk
                self.cond.notify_all()

    def wait_for(self, pattern: bytes, timeout: float, start: int = 0) -> re.Match:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                m = regex.search(self.out, start)
                if m:
                    return m
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"no {pattern!r} on the console; last output:\n"
                                         f"{self.out[-3000:].decode(errors='replace')}")
                self.cond.wait(min(left, 1.0))

    def run(self, command: str, timeout: float = COMMAND_TIMEOUT) -> tuple[int, str]:
        """(exit status, output) of one shell command line in the guest."""
        self.count += 1
        tag = f"kvmpy-done-{self.count}"
        with self.cond:
            start = len(self.out)
        # The tag is split in the typed line, so the echo of the line never matches.
        self.proc.stdin.write(f"{command}; echo kvmpy-done-\"{self.count}\"=$?\n".encode())
        self.proc.stdin.flush()
        m = self.wait_for(rf"{tag}=(\d+)".encode(), timeout, start)
        text = self.out[start:m.start()].decode(errors="replace").replace("\r\n", "\n")
        return int(m.group(1)), text


@contextlib.contextmanager
def booted_shell(argv: list[str], cwd: str, env: dict[str, str]) -> Iterator[SerialShell]:
    """``argv`` (a ``kvmpy run`` of the default guest) running, its shell up on the
    console; the VM is killed on the way out if it has not ended."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    shell = SerialShell(proc)
    try:
        shell.wait_for(rb"shell on the console", BOOT_TIMEOUT)
        # The prompt follows the banner line: a command typed before it may be eaten.
        time.sleep(0.5)
        yield shell
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
