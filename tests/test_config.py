"""vm.toml parsing and validation."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from kvmpy.config import config_from_dict, parse_drive, parse_netdev, parse_size
from kvmpy.errors import ConfigError


@given(st.integers(0, 1 << 20), st.sampled_from(["", "K", "M", "G", "k", "m", "g", "MiB", "GiB"]))
def test_parse_size_units(n, unit):
    mult = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit[:1].upper()]
    assert parse_size(f"{n}{unit}", "x", "M") == n * mult


@given(st.text(max_size=20))
def test_parse_size_rejects_or_parses(text):
    try:
        assert parse_size(text, "where", "M") >= 0
    except ConfigError as e:
        assert "where" in str(e)


def test_full_config(tmp_path):
    src = str(tmp_path / "vm.toml")
    cfg = config_from_dict({
        "name": "web1", "accel": "kvm", "memory": "1G", "cpus": 2, "kernel": "k", "initrd": "/abs/i",
        "cmdline": "console=ttyS0",
        "disk": [{"path": "d.qcow2", "format": "qcow2", "readonly": True, "serial": "abc"}],
        "net": [{"type": "tap", "ifname": "tap0", "bridge": "br0", "mac": "52:54:00:12:34:56"}],
        "monitor": {"qmp": "unix:/tmp/q.sock"},
    }, src)
    assert cfg.memory == 1 << 30 and cfg.cpus == 2
    assert cfg.kernel == str(tmp_path / "k") and cfg.initrd == "/abs/i"
    assert cfg.disks[0].path == str(tmp_path / "d.qcow2") and cfg.disks[0].readonly
    assert cfg.nets[0].bridge == "br0" and cfg.qmp == ["unix:/tmp/q.sock"]


@pytest.mark.parametrize("data,needle", [
    ({"cpus": 0}, "'cpus'"),
    ({"cpus": "two"}, "'cpus'"),
    ({"memory": "3M"}, "'memory'"),
    ({"accel": "xen"}, "'accel'"),
    ({"disk": [{"format": "raw"}]}, "missing key 'path'"),
    ({"disk": [{"path": "x", "format": "vmdk"}]}, "'format'"),
    ({"disk": [{"path": "x", "serial": "y" * 21}]}, "'serial'"),
    ({"net": [{"type": "vde"}]}, "'type'"),
    ({"net": [{"mac": "01:00:00:00:00:00"}]}, "multicast"),
    ({"monitor": {"qmpp": "x"}}, "qmpp"),
    ({"name": "bad name!"}, "'name'"),
])
def test_errors_name_file_and_key(data, needle):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, "/etc/kvmpy/vm.toml")
    assert "/etc/kvmpy/vm.toml" in str(info.value) and needle in str(info.value)


def test_drive_and_net_options():
    d = parse_drive("file=/x.img,format=raw,readonly=on,serial=S1")
    assert (d.path, d.format, d.readonly, d.serial) == ("/x.img", "raw", True, "S1")
    assert parse_drive("/y.qcow2").path == "/y.qcow2"
    with pytest.raises(ConfigError, match="bogus"):
        parse_drive("file=/x,bogus=1")
    n = parse_netdev("tap,ifname=t0,bridge=br9")
    assert (n.ifname, n.bridge) == ("t0", "br9")
    with pytest.raises(ConfigError):
        parse_netdev("vde,sock=/tmp/vde")   # user is kvmpy.net (test_usernet_unit.py)


def test_cli_and_toml_share_drive_and_net_checks():
    """--drive serial and --net mac get the vm.toml rules (one function each)."""
    with pytest.raises(ConfigError, match="at most 20 bytes"):
        parse_drive("file=d.img,serial=" + "x" * 21)
    with pytest.raises(ConfigError, match="multicast"):
        parse_netdev("tap,mac=01:00:00:00:00:01")
    with pytest.raises(ConfigError, match="xx:xx"):
        parse_netdev("tap,mac=zz")
    with pytest.raises(ConfigError, match="empty file="):
        parse_drive("file=")


@pytest.mark.parametrize("text", ["9" * 5000, "\u0661\u0662M", "1" * 31])
def test_parse_size_refuses_odd_digits_in_one_line(text):
    with pytest.raises(ConfigError, match="expected a size"):
        parse_size(text, "-m", "M")
