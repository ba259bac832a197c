"""Connect the official QMP client to a VM started as a subprocess.

kvmpy's unix sockets appear only once they listen (kvmpy/unixsock.py), so this waits
for the file and then connects once: a refused connection is a failure, not a retry."""

from __future__ import annotations

import os
import subprocess
import time


def connect_when_up(proc: subprocess.Popen, path: str | os.PathLike, timeout: float = 60):
    """The connected ``QEMUMonitorProtocol`` for the VM ``proc`` serving QMP at ``path``;
    AssertionError with the VM's stderr if it exits or the file does not appear in time."""
    from qemu.qmp.legacy import QEMUMonitorProtocol
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
            stderr = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
            raise AssertionError(f"VM did not start: {stderr}")
        time.sleep(0.05)
    client = QEMUMonitorProtocol(str(path))
    client.connect()
    return client
