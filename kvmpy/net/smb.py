"""QEMU's ``-netdev user,smb=DIR``: a Samba server for the guest at 10.0.2.4:445.

QEMU writes a private smb.conf exporting DIR as ``[qemu]`` and has libslirp run
``smbd -l DIR -s CONF`` for each guest connection (slirp_add_exec), smbd serving
the connection on its stdin/stdout (inetd mode). libslirp would fork from the
VMM, which kvmpy's seccomp filter forbids once the VM runs, so the forking is
done by a spawner: a small process started (``python kvmpy/net/smb.py``) while
the NIC is set up (before the filter), listening on a unix socket in the private
directory. libslirp connects there for each guest connection
(``slirp_add_unix``); the spawner accepts, makes a loopback TCP pair (smbd in
inetd mode asks for its peer's address, which an AF_UNIX stdin has not: libslirp's
own fork_exec uses a TCP pair for the same reason), starts a fresh smbd on one
end and relays bytes between the unix connection and the other end.

The spawner ends, killing its smbds and removing the private directory, when the
VMM closes its end of a pipe: at ``close()`` or when the VMM dies however it dies.
"""

from __future__ import annotations

import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

log = logging.getLogger(__name__)

SMB_PORT = 445
SMBD_CANDIDATES = ("/usr/sbin/smbd", "/usr/local/sbin/smbd")
# Each guest connection costs a host process (smbd and its helpers): a guest that
# opens connections without end must not fill the host with them. A mount holds
# one; past this many at once the guest's connection is closed.
MAX_SMBDS = 16


def find_smbd() -> str | None:
    for path in SMBD_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("smbd")


def smb_conf(private_dir: str, share_dir: str, user: str) -> str:
    """QEMU's smb.conf: everything Samba keeps in the private directory, loopback
    only, guests mapped to ``user`` (the VMM's), the one share ``[qemu]``."""
    d = private_dir
    return (f"[global]\n"
            f"private dir={d}\n"
            f"interfaces=127.0.0.1\n"
            f"bind interfaces only=yes\n"
            f"pid directory={d}\n"
            f"lock directory={d}\n"
            f"state directory={d}\n"
            f"cache directory={d}\n"
            f"ncalrpc dir={d}/ncalrpc\n"
            f"log file={d}/log.smbd\n"
            f"smb passwd file={d}/smbpasswd\n"
            f"security = user\n"
            f"map to guest = Bad User\n"
            f"load printers = no\n"
            f"printing = bsd\n"
            f"disable spoolss = yes\n"
            f"usershare max shares = 0\n"
            f"[qemu]\n"
            f"path={share_dir}\n"
            f"read only=no\n"
            f"guest ok=yes\n"
            f"force user={user}\n")


class SmbServer:
    """The private directory, smb.conf and the spawner for one user NIC's ``smb=``.
    ``socket_path`` is what libslirp connects to; ``close()`` ends it all."""

    def __init__(self, share_dir: str, name: str = "net0", runas: str | None = None) -> None:
        """``runas``: the user the VM will run as (``--runas``): the smbds run as
        that user, never as root (the spawner, which only relays bytes, stays)."""
        import pwd
        from ..errors import ConfigError
        smbd = find_smbd()
        if smbd is None:
            raise ConfigError(f"{name}: smb={share_dir}: no smbd on this host (Debian: apt-get install samba)")
        try:
            pw = pwd.getpwnam(runas) if runas and os.geteuid() == 0 else pwd.getpwuid(os.geteuid())
        except KeyError:
            raise ConfigError(f"--runas: no such user '{runas}'") from None
        self.private_dir = tempfile.mkdtemp(prefix="kvmpy-smb.")
        os.mkdir(os.path.join(self.private_dir, "ncalrpc"), 0o700)
        self.conf = os.path.join(self.private_dir, "smb.conf")
        with open(self.conf, "w") as f:
            f.write(smb_conf(self.private_dir, share_dir, pw.pw_name))
        if pw.pw_uid != os.geteuid():
            for d in (self.private_dir, os.path.join(self.private_dir, "ncalrpc"), self.conf):
                os.chown(d, pw.pw_uid, pw.pw_gid)
        self.socket_path = os.path.join(self.private_dir, "smbd.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.socket_path)
        listener.listen(16)
        os.chown(self.socket_path, pw.pw_uid, pw.pw_gid)
        life_r, self._life_w = os.pipe2(os.O_CLOEXEC)
        try:
            self.proc = subprocess.Popen(
                # this file as a script: it needs the standard library only, and kvmpy
                # need not be importable from "/" (a checkout run with python -m kvmpy)
                [sys.executable, os.path.abspath(__file__), smbd, self.conf, self.private_dir,
                 str(pw.pw_uid), str(pw.pw_gid)],
                stdin=life_r, stdout=subprocess.DEVNULL, pass_fds=(listener.fileno(),),
                env=dict(os.environ, KVMPY_SMB_LISTEN_FD=str(listener.fileno())), start_new_session=True, cwd="/")
        except OSError as e:
            os.close(self._life_w)
            shutil.rmtree(self.private_dir, ignore_errors=True)
            raise ConfigError(f"{name}: smb={share_dir}: cannot start the smbd spawner: {e.strerror}") from None
        finally:
            os.close(life_r)
            listener.close()
        log.info("%s: smb=%s through %s", name, share_dir, self.socket_path)

    def close(self) -> None:
        if self._life_w < 0:
            return
        os.close(self._life_w)
        self._life_w = -1
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.private_dir, ignore_errors=True)


# --- the spawner process ------------------------------------------------------------------
def _loopback_pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        near = socket.create_connection(listener.getsockname())
        far, _ = listener.accept()
    return near, far


def _relay(a: socket.socket, b: socket.socket) -> None:
    """Bytes both ways until both directions ended."""
    sel = selectors.DefaultSelector()
    peer = {a: b, b: a}
    for s in (a, b):
        sel.register(s, selectors.EVENT_READ)
    open_dirs = 2
    while open_dirs:
        for key, _ in sel.select():
            src = key.fileobj
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if data:
                try:
                    peer[src].sendall(data)
                    continue
                except OSError:
                    pass
            sel.unregister(src)
            open_dirs -= 1
            try:
                peer[src].shutdown(socket.SHUT_WR)
            except OSError:
                pass
    a.close()
    b.close()


def _serve(conn: socket.socket, smbd: str, conf: str, log_dir: str, ids: tuple[int, int],
           children: list) -> None:
    try:
        near, far = _loopback_pair()
    except OSError:     # out of descriptors: this connection is refused, the others go on
        conn.close()
        return
    try:
        # its own process group: smbd starts helpers (smbd-notifyd, -cleanupd) that must go with it
        child = subprocess.Popen([smbd, "-l", log_dir, "-s", conf], stdin=far.fileno(), stdout=far.fileno(),
                                 stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True,
                                 **_as_user(*ids))
    except OSError:
        conn.close()
        near.close()
        far.close()
        return
    children.append(child)
    far.close()
    _relay(conn, near)
    _end_group(child, grace=30)
    # Forgotten once its group is gone: its number may then be another's process group.
    children.remove(child)


def _end_group(child: subprocess.Popen, grace: float) -> None:
    """Wait up to ``grace`` seconds for smbd, then end its whole process group."""
    try:
        child.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 3)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass
        time.sleep(0.2)


def _as_user(uid: int, gid: int) -> dict:
    if uid == os.geteuid():
        return {}
    return {"user": uid, "group": gid, "extra_groups": []}


def spawner_main(smbd: str, conf: str, private_dir: str, uid: str, gid: str) -> int:
    listener = socket.socket(fileno=int(os.environ["KVMPY_SMB_LISTEN_FD"]))
    children: list[subprocess.Popen] = []
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the VMM's Ctrl-C is not ours: the pipe is

    slots = threading.BoundedSemaphore(MAX_SMBDS)

    def serve(conn: socket.socket) -> None:
        try:
            _serve(conn, smbd, conf, private_dir, (int(uid), int(gid)), children)
        finally:
            slots.release()

    def accept_loop() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            if not slots.acquire(blocking=False):
                conn.close()
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()
    try:
        while os.read(0, 1):      # EOF: the VMM closed its end or is gone
            pass
    finally:
        listener.close()
        for child in list(children):
            _end_group(child, grace=0)
        shutil.rmtree(private_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(spawner_main(*sys.argv[1:6]))
