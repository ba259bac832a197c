"""query-iothreads and info iothreads list every iothread the user configured
(QEMU's -object iothread, vm.toml's [[iothread]]), also those no disk names: as
in QEMU, an iothread object is a thread that runs, and its thread-id is one of the
VM process's threads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvmpy.config import config_from_dict
from kvmpy.devices.virtio import dataplane
from kvmpy.errors import ConfigError
from kvmpy.qemu_cli import config_from_qemu_args

from conftest import ROOT, guest_path
from support.qmp_client import connect_when_up


def test_toml_iothread_tables():
    cfg = config_from_dict({"iothread": [{"id": "io0"}, {"id": "idle.1"}]}, "vm.toml")
    assert cfg.iothreads == ["io0", "idle.1"]
    assert config_from_dict({}, "vm.toml").iothreads == []
    for data, message in [
        ({"iothread": {"id": "io0"}}, r"^vm.toml: key 'iothread': expected an array of tables \(\[\[iothread\]\]\)"),
        ({"iothread": [{}]}, r"^vm.toml: \[\[iothread\]\] #1: missing key 'id'$"),
        ({"iothread": [{"id": "0io"}]}, r"^vm.toml: \[\[iothread\]\] #1 key 'id': expected an iothread name"),
        ({"iothread": [{"id": "io0", "poll": 1}]}, r"^vm.toml: \[\[iothread\]\] #1: unknown key 'poll'"),
        ({"iothread": [{"id": "a"}, {"id": "a"}]}, r"^vm.toml: \[\[iothread\]\] #2: iothread a is already defined$"),
    ]:
        with pytest.raises(ConfigError, match=message):
            config_from_dict(data, "vm.toml")


def test_qemu_object_iothreads_are_configured_used_or_not():
    cfg = config_from_qemu_args(["-object", "iothread,id=io0", "-object", "iothread,id=unused,poll-max-ns=0"])[0]
    assert cfg.iothreads == ["io0", "unused"]


def _start(tmp_path, args: list[str]):
    qmp_path = tmp_path / "qmp.sock"
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "kvmpy", "run", *args, "-qmp", f"unix:{qmp_path},server,nowait"],
                            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        return proc, connect_when_up(proc, qmp_path)
    except BaseException:
        proc.kill()
        raise


def _stop(proc, client) -> None:
    try:
        client.cmd("quit")
        client.close()
    except (EOFError, ConnectionError):
        pass
    finally:
        if proc.poll() is None:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _thread_name(pid: int, tid: int) -> str:
    with open(f"/proc/{pid}/task/{tid}/comm") as f:
        return f.read().strip()


@pytest.mark.guest
def test_every_configured_iothread_runs_and_is_listed(tmp_path, kvm_required):
    if not dataplane.available():
        pytest.skip("the native data plane (which runs iothreads) is not built")
    image = tmp_path / "d.raw"
    image.write_bytes(bytes(1 << 20))
    proc, client = _start(tmp_path, [
        "-enable-kvm", "-kernel", guest_path("irq"), "-nographic", "-m", "64",
        "-object", "iothread,id=idle0", "-object", "iothread,id=used1",
        "-drive", f"if=none,id=d0,file={image},format=raw",
        "-device", "virtio-blk-pci,drive=d0,iothread=used1"])
    try:
        listed = client.cmd("query-iothreads")
        assert [t["id"] for t in listed] == ["idle0", "used1"]
        tids = [t["thread-id"] for t in listed]
        assert len(set(tids)) == 2 and proc.pid not in tids
        for tid in tids:
            assert _thread_name(proc.pid, tid) == "kvmpy-iothread", "a thread of the VM's process"
        assert set(listed[0]) == {"id", "thread-id", "poll-max-ns", "poll-grow", "poll-shrink", "aio-max-batch"}
        text = client.cmd("human-monitor-command", **{"command-line": "info iothreads"})
        assert f"idle0:\r\n  thread_id={tids[0]}\r\n" in text and f"used1:\r\n  thread_id={tids[1]}\r\n" in text
    finally:
        _stop(proc, client)


@pytest.mark.guest
def test_a_toml_iothread_no_disk_names_runs(tmp_path, kvm_required):
    if not dataplane.available():
        pytest.skip("the native data plane (which runs iothreads) is not built")
    toml = tmp_path / "vm.toml"
    toml.write_text(f'kernel = "{guest_path("irq")}"\naccel = "kvm"\nmemory = "64M"\n'
                    f'[[iothread]]\nid = "lonely"\n[[net]]\ntype = "none"\n')
    qmp_path = tmp_path / "qmp.sock"
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "kvmpy", "run", str(toml), "--qmp", f"unix:{qmp_path}"],
                            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    client = None
    try:
        client = connect_when_up(proc, qmp_path)
        listed = client.cmd("query-iothreads")
        assert [t["id"] for t in listed] == ["lonely"]
        assert _thread_name(proc.pid, listed[0]["thread-id"]) == "kvmpy-iothread"
    finally:
        if client is not None:
            _stop(proc, client)
        elif proc.poll() is None:
            proc.kill()
            proc.wait()
