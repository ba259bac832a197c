"""QEMU's default NIC: with no NIC named, a VM gets a user-mode NIC (libslirp), as
``qemu`` without ``-nic`` does; ``--net none``, ``[[net]] type = "none"``,
``-nic none``, ``-net none``, ``-nodefaults`` and any NIC option turn it off. Where
libslirp cannot be loaded the VM starts without a NIC and one warning line says why.

The guest side is the tiny PVH virtio-net driver (tests/guests/virtio_net.c) on the
translator: it finds the NIC by its PCI id (or says there is none) and, with
``flood=N``, sends N frames as fast as it can, which libslirp drops (an unknown
EtherType) while the VMM stays bounded and answers.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT, guest_path, run_kvmpy
from kvmpy.cli import build_parser
from kvmpy.config import add_default_nic, config_from_dict, load_config
from kvmpy.errors import ConfigError
from kvmpy.qemu_cli import config_from_qemu_args
from kvmpy.runcmd import build_config

NOT_FOUND = b"virtio-net: no modern virtio-net device found"

try:
    import kvmpy.net.slirp  # noqa: F401
    SLIRP_SKIP = None
except ImportError as e:
    SLIRP_SKIP = f"kvmpy.net._slirp_cffi cannot be loaded ({e}): apt-get install libslirp-dev, rebuild"


def _run_options(*argv: str):
    return build_config(build_parser().parse_args(["run", "--kernel", guest_path("hello"), *argv]))


def _kinds(cfg) -> list[str]:
    return [net.type for net in cfg.nets]


@pytest.fixture
def slirp_built():
    if SLIRP_SKIP:
        pytest.skip(SLIRP_SKIP)


def test_kvmpy_run_without_a_nic_gets_a_user_nic(slirp_built):
    cfg = _run_options()
    assert _kinds(cfg) == ["user"]
    u = cfg.nets[0].user
    assert (str(u.net), str(u.host), str(u.dns), u.hostfwd, u.restrict) == \
        ("10.0.2.0/24", "10.0.2.2", "10.0.2.3", (), False)
    assert _kinds(_run_options("--net", "none")) == []
    assert _kinds(_run_options("--net", "user,restrict=on")) == ["user"]
    assert _run_options("--net", "user,restrict=on").nets[0].user.restrict
    assert _kinds(_run_options("--net", "tap,ifname=kvmpytest0")) == ["tap"]


def test_vm_toml_none_and_named_nics(slirp_built, tmp_path):
    def load(text: str):
        path = tmp_path / "vm.toml"
        path.write_text(f'kernel = "{guest_path("hello")}"\n' + text)
        cfg = load_config(str(path))
        add_default_nic(cfg)
        return cfg
    assert _kinds(load("")) == ["user"]
    assert _kinds(load('[[net]]\ntype = "none"\n')) == []
    assert _kinds(load('[[net]]\ntype = "user"\nrestrict = true\n')) == ["user"]
    with pytest.raises(ConfigError, match=r"\[\[net\]\] #1 key 'type': \"none\" \(no NIC\) cannot stand beside") as e:
        load('[[net]]\ntype = "none"\n[[net]]\ntype = "user"\n')
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"\[\[net\]\] #1: unknown key 'ifname'"):
        load('[[net]]\ntype = "none"\nifname = "tap0"\n')
    with pytest.raises(ConfigError, match=r"must be \"tap\", \"user\" or \"none\", got 'vde'"):
        load('[[net]]\ntype = "vde"\n')
    # The vm.toml's "none" stands against the command line's NICs too: --net adds them.
    path = tmp_path / "vm.toml"
    path.write_text(f'kernel = "{guest_path("hello")}"\n[[net]]\ntype = "none"\n')
    assert _kinds(build_config(build_parser().parse_args(["run", str(path)]))) == []
    assert _kinds(build_config(build_parser().parse_args(["run", str(path), "--net", "user"]))) == ["user"]


def test_programmatic_configs_stay_as_written():
    """Only the front ends add the default: a VmConfig built in code (tests, tools) has
    exactly the NICs it names."""
    assert config_from_dict({}, "<command line>").nets == []


@pytest.mark.parametrize("argv, kinds", [
    ([], ["user"]),
    (["-nic", "none"], []),
    (["-net", "none"], []),
    (["-nodefaults"], []),
    (["-nic", "user,hostfwd=tcp::5555-:22"], ["user"]),
    (["-net", "nic", "-net", "user"], ["user"]),
    (["-netdev", "tap,id=n0,ifname=kvmpytest0", "-device", "virtio-net-pci,netdev=n0"], ["tap"]),
    (["-nic", "none", "-nic", "user"], ["user"]),           # QEMU: none only drops the default
])
def test_qemu_command_line_default_nic(slirp_built, argv, kinds):
    cfg, _ = config_from_qemu_args(["-kernel", guest_path("hello"), *argv])
    assert _kinds(cfg) == kinds


def _run_guest(*argv: str, prefix: list[str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    if prefix is None:
        return run_kvmpy(["run", "--accel", "tcg", "--kernel", guest_path("virtio_net"), *argv], timeout=timeout)
    return subprocess.run([sys.executable, "-c", *prefix, "run", "--accel", "tcg", "--kernel",
                           guest_path("virtio_net"), *argv], cwd=ROOT, capture_output=True, timeout=timeout,
                          env={"PYTHONPATH": ROOT, "PATH": "/usr/bin:/bin"})


@pytest.mark.guest
def test_the_guest_finds_the_default_nic_and_floods_it(slirp_built):
    """20000 frames as fast as the guest sends them: libslirp drops them (0x88B5 is no
    protocol it knows), the VMM keeps up and the guest ends normally."""
    r = _run_guest("--append", "count=0 flood=20000", timeout=300)
    out = r.stdout
    assert r.returncode == 0, (out, r.stderr)
    assert b"virtio-net: found at 00:" in out and b"link up" in out, out
    assert b"virtio-net: flood 20000 frames" in out, out


@pytest.mark.guest
@pytest.mark.parametrize("argv", [["--net", "none"], ["-nic", "none"], ["-nodefaults", "-serial", "stdio"]])
def test_no_nic_when_refused(argv):
    r = _run_guest(*argv, "--append", "count=0")
    assert NOT_FOUND in r.stdout, (r.stdout, r.stderr)
    assert r.returncode == 1


@pytest.mark.guest
def test_vm_toml_none_has_no_nic(tmp_path):
    path = tmp_path / "vm.toml"
    path.write_text(f'kernel = "{guest_path("virtio_net")}"\naccel = "tcg"\ncmdline = "count=0"\n'
                    '[[net]]\ntype = "none"\n')
    r = run_kvmpy(["run", str(path)], timeout=120)
    assert NOT_FOUND in r.stdout and r.returncode == 1, (r.stdout, r.stderr)


# Python's own way to make an import fail: a None entry in sys.modules. The native
# module stands for what a host without libslirp lacks.
WITHOUT_SLIRP = ["import sys; sys.modules['kvmpy.net._slirp_cffi'] = None; from kvmpy.cli import main; "
                 "sys.exit(main())"]


@pytest.mark.guest
def test_without_libslirp_a_warning_and_no_nic():
    r = _run_guest("--append", "count=0", prefix=WITHOUT_SLIRP)
    assert NOT_FOUND in r.stdout and r.returncode == 1, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.decode().splitlines() if line.strip()]
    assert len(lines) == 1 and "no default NIC: user-mode networking is not available" in lines[0], r.stderr
    # A NIC the user names still needs libslirp: that is an error, not a warning.
    r = _run_guest("--net", "user", "--append", "count=0", prefix=WITHOUT_SLIRP)
    assert r.returncode == 2 and b"net0 (user): user-mode networking is not available here" in r.stderr, r.stderr
    assert len(r.stderr.decode().strip().splitlines()) == 1, r.stderr


def test_default_nic_under_uefi_too(slirp_built, caplog):
    """The PCI windows follow where OVMF puts virtio BARs (2 GiB and 32 GiB here), so
    UEFI gets QEMU's default NIC as SeaBIOS does (tests/test_uefi_virtio.py boots it)."""
    import os
    from kvmpy.boot.firmware import OVMF_IMAGES
    assert _kinds(_run_options("--firmware", "uefi")) == ["user"]
    assert "no default NIC" not in caplog.text
    assert _kinds(_run_options("--firmware", "uefi", "--net", "none")) == []
    assert _kinds(_run_options("--firmware", "bios")) == ["user"]
    ovmf = next((p for p in OVMF_IMAGES if os.path.isfile(p)), None)
    if ovmf is None:
        pytest.skip(f"OVMF is not installed ({', '.join(OVMF_IMAGES)}): -bios OVMF.fd not checked")
    cfg, _ = config_from_qemu_args(["-bios", ovmf])
    assert cfg.firmware == "uefi" and _kinds(cfg) == ["user"]
