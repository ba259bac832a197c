"""A listening unix socket whose file appears only once it accepts.

Scripts wait for a VM's socket file and then connect, as they do with QEMU's
``qmp.sock``. A socket bound under its public name refuses connections until
``listen`` runs, and on a loaded host that gap is long enough for a waiting client
to connect into it. So the socket is bound under a staging name in the same
directory, given its mode, set listening, and only then linked under the public name.
Before ``listen`` nobody can connect, so a chmod there leaves no window either. A
link, unlike a rename, refuses a file already at the public name, as bind does.
"""

from __future__ import annotations

import errno
import os
import socket

SUN_PATH_MAX = 107          # sockaddr_un.sun_path holds 108 bytes with the NUL


def listen_unix(path: str, backlog: int, mode: int | None = None) -> socket.socket:
    """Bind and listen on ``path``, with ``mode`` (e.g. 0o600) set before anyone can
    connect. A file already at ``path`` is refused with EADDRINUSE, as bind refuses
    it; removing a stale socket first is the caller's choice."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        staged = _bind_staged(sock, path)
        try:
            if mode is not None:
                os.chmod(staged, mode)
            sock.listen(backlog)
            if staged != path:
                _publish(staged, path)
        finally:
            if staged != path:
                _unlink_quietly(staged)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_staged(sock: socket.socket, path: str) -> str:
    """Bind to a fresh name beside ``path`` and return it; ``path`` itself when a
    staging name would not fit in sun_path (then the listen gap is back, but the
    path the user asked for still works)."""
    directory = os.path.dirname(path)
    for _ in range(8):
        staged = os.path.join(directory, f".kvmpy-{os.urandom(4).hex()}.sock")
        if len(os.fsencode(staged)) > SUN_PATH_MAX:
            break
        try:
            sock.bind(staged)
            return staged
        except OSError as e:
            if e.errno == errno.EADDRINUSE:     # a file by that name: draw again
                continue
            raise
    sock.bind(path)
    return path


def _publish(staged: str, path: str) -> None:
    try:
        os.link(staged, path)
    except FileExistsError:
        raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE), path) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        # A file system without hard links: a rename replaces, so look first (the
        # gap is a race with the user's own files, not with a client).
        if os.path.lexists(path):
            raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE), path) from None
        os.rename(staged, path)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
