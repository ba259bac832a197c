"""A VM's unix socket file appears only once it accepts connections.

CI once saw a test wait for qmp.sock, connect, and get ECONNREFUSED: the monitor had
bound the socket but not yet called listen."""

import errno
import os
import socket
import stat

import pytest

from kvmpy import unixsock
from kvmpy.unixsock import listen_unix


def test_public_name_appears_already_listening_and_private(tmp_path, monkeypatch):
    path = str(tmp_path / "qmp.sock")
    seen = {}
    real_link = os.link

    def checking_link(src, dst):
        # The moment the public name is made: it must not exist yet, and what is
        # about to take it must already accept and already be 0600.
        seen["public_existed"] = os.path.lexists(dst)
        seen["mode"] = stat.S_IMODE(os.lstat(src).st_mode)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(src)
            seen["accepted"] = True
        except OSError as e:
            seen["accepted"] = e
        finally:
            probe.close()
        real_link(src, dst)

    monkeypatch.setattr(unixsock.os, "link", checking_link)
    sock = listen_unix(path, 4, mode=0o600)
    try:
        assert seen == {"public_existed": False, "mode": 0o600, "accepted": True}
        assert sorted(os.listdir(tmp_path)) == ["qmp.sock"]       # no staging file left
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)
        client.close()
    finally:
        sock.close()


def test_a_path_too_long_for_a_staging_name_still_listens(tmp_path):
    # sun_path holds 107 bytes: pad the directory so the path fits but a staging
    # name beside it would not.
    base = str(tmp_path)
    room = unixsock.SUN_PATH_MAX - len(base) - len("/x.s") - 1
    if room < 1:
        pytest.skip(f"tmp_path {base} is too long to build a path near sun_path's limit")
    d = os.path.join(base, "d" * room)
    os.mkdir(d)
    path = os.path.join(d, "x.s")
    assert len(os.fsencode(path)) <= unixsock.SUN_PATH_MAX
    sock = listen_unix(path, 1, mode=0o600)
    try:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        c = socket.socket(socket.AF_UNIX)
        c.connect(path)
        c.close()
    finally:
        sock.close()


def test_a_failure_leaves_no_staging_file_and_no_open_socket(tmp_path, monkeypatch):
    path = str(tmp_path / "m.sock")

    def failing_link(src, dst):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(unixsock.os, "link", failing_link)
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError):
        listen_unix(path, 1, mode=0o600)
    assert os.listdir(tmp_path) == []
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_file_at_the_path_is_refused_as_bind_refuses_it(tmp_path):
    path = tmp_path / "taken"
    path.write_text("mine")
    with pytest.raises(OSError) as e:
        listen_unix(str(path), 1)
    assert e.value.errno == errno.EADDRINUSE
    assert path.read_text() == "mine" and os.listdir(tmp_path) == ["taken"]


def test_without_hard_links_the_socket_is_renamed_into_place(tmp_path, monkeypatch):
    path = str(tmp_path / "r.sock")

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(unixsock.os, "link", no_links)
    sock = listen_unix(path, 1)
    try:
        assert os.listdir(tmp_path) == ["r.sock"]
        c = socket.socket(socket.AF_UNIX)
        c.connect(path)
        c.close()
    finally:
        sock.close()
