"""A DNS responder for the user-network tests: bound by the test (127.0.0.1:53),
so a guest's queries relayed by kvmpy stay on loopback."""

from __future__ import annotations

import socket
import struct
import subprocess
import threading


def port_53_busy(e: OSError) -> str:
    """Why the responder cannot bind 127.0.0.1:53, with whoever holds the port (ss),
    for the skip message: the port is one per host, and tests have found it taken."""
    try:
        held = subprocess.run(["ss", "-Hlunp", "sport = :53"], capture_output=True, text=True,
                              timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError):
        held = []
    return (f"cannot answer DNS on 127.0.0.1:53 here ({e.strerror}"
            + (f"; held: {' '.join(held)}" if held else "") + ")")


class LoopbackDns(threading.Thread):
    """A DNS responder on 127.0.0.1:53 that answers every A query with 192.0.2.53."""

    ADDRESS = "192.0.2.53"

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.queries = 0

    def stop(self) -> None:
        # A close alone would not wake the thread's recvfrom, which keeps the port bound.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.join(5)
        self.sock.close()

    def run(self) -> None:
        while True:
            try:
                query, peer = self.sock.recvfrom(512)
            except OSError:
                return
            if not query:
                return
            if len(query) < 12:
                continue
            self.queries += 1
            end = query.index(b"\0", 12) + 5          # the question: name, type, class
            answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(self.ADDRESS)
            qtype = struct.unpack("!H", query[end - 4:end - 2])[0]
            header = query[:2] + b"\x81\x80" + query[4:6] + struct.pack("!HHH", int(qtype == 1), 0, 0)
            self.sock.sendto(header + query[12:end] + (answer if qtype == 1 else b""), peer)
