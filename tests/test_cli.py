"""CLI behaviour that needs no guest: bad input gives one line and status 2; info kvm."""

from __future__ import annotations

import json

import pytest

from conftest import KVM_SKIP_REASON, ROOT, run_kvmpy


def _one_line(p) -> str:
    err = p.stderr.decode().strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def test_missing_kernel_file():
    p = run_kvmpy(["run", "--enable-kvm", "--kernel", "/nonexistent/bzImage"])
    assert p.returncode == 2
    assert "/nonexistent/bzImage" in _one_line(p)


def test_file_that_is_not_a_kernel(tmp_path):
    bogus = tmp_path / "notakernel"
    bogus.write_bytes(b"just some text\n" * 100)
    p = run_kvmpy(["run", "--kernel", str(bogus), "--accel", "auto"])
    assert p.returncode == 2
    line = _one_line(p)
    assert str(bogus) in line and "bzImage" in line


def test_unknown_toml_key_names_file_and_key(tmp_path):
    cfg = tmp_path / "vm.toml"
    cfg.write_text('kernel = "x"\nmemroy = "1G"\n')
    p = run_kvmpy(["run", str(cfg)])
    assert p.returncode == 2
    line = _one_line(p)
    assert str(cfg) in line and "memroy" in line


def test_bad_memory_value(tmp_path):
    cfg = tmp_path / "vm.toml"
    cfg.write_text('kernel = "x"\nmemory = "lots"\n')
    p = run_kvmpy(["run", str(cfg)])
    assert p.returncode == 2
    assert "'memory'" in _one_line(p)


def test_invalid_toml_syntax(tmp_path):
    cfg = tmp_path / "vm.toml"
    cfg.write_text('kernel = \n')
    p = run_kvmpy(["run", str(cfg)])
    assert p.returncode == 2
    assert str(cfg) in _one_line(p)


def test_no_kernel_at_all():
    p = run_kvmpy(["run"])
    assert p.returncode == 2
    assert "kernel" in _one_line(p)


def test_info_kvm_json_is_consistent():
    p = run_kvmpy(["info", "kvm", "--json"])
    report = json.loads(p.stdout)
    assert p.returncode == (0 if report["usable"] else 1)
    assert report["device"]["present"] == (KVM_SKIP_REASON is None or "missing" not in KVM_SKIP_REASON)
    if KVM_SKIP_REASON is None:
        assert report["usable"] and report["api_version"] == 12
        assert report["capabilities"]["IRQCHIP"]["present"]
        assert report["smoke_test"].startswith("passed")


def test_info_kvm_text_has_verdict():
    p = run_kvmpy(["info", "kvm"])
    out = p.stdout.decode()
    assert "api version:" in out and "backend:" in out and "verdict:" in out


def test_enable_kvm_without_kvm_is_one_line_exit_1(tmp_path):
    """Simulate a host without KVM by pointing the device check at a missing path."""
    p = run_kvmpy(["run", "--enable-kvm", "--kernel", __file__], env={"KVMPY_KVM_DEVICE": str(tmp_path / "nokvm")})
    assert p.returncode == 1
    assert "KVM is not usable" in _one_line(p)


def test_bad_monitor_address_is_one_line_and_exit_2():
    from conftest import guest_path
    p = run_kvmpy(["run", "--accel", "tcg", "--kernel", guest_path("hello"), "--qmp", "carrier-pigeon:coop"])
    assert p.returncode == 2
    assert "carrier-pigeon" in _one_line(p)


def test_a_named_command_imports_only_its_module():
    """`kvmpy run ...` builds the parser from runcmd alone (the other subcommands'
    imports were most of its start-up); `kvmpy --help` and unknown words list all."""
    import subprocess
    import sys
    code = ("import sys; from kvmpy.cli import build_parser; build_parser(sys.argv[1:], all_commands=False); "
            "print(sorted(m for m in sys.modules if m in ('kvmpy.runcmd', 'kvmpy.block.imgcli', 'kvmpy.service', "
            "'kvmpy.guestbuild', 'kvmpy.nested', 'kvmpy.infocmd')))")
    def loaded(*argv):
        p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True, cwd=ROOT)
        return p.stdout.strip()
    assert loaded("-vv", "run", "--kernel", "x") == "['kvmpy.runcmd']"
    assert loaded("img", "info", "x") == "['kvmpy.block.imgcli']"
    everything = str(sorted(['kvmpy.runcmd', 'kvmpy.block.imgcli', 'kvmpy.service', 'kvmpy.guestbuild',
                             'kvmpy.nested', 'kvmpy.infocmd']))
    assert loaded("--help") == everything
    assert loaded("bogus") == everything
    p = run_kvmpy(["bogus"])
    assert p.returncode == 2 and "choose from 'run', 'info', 'img', 'service', 'guest', 'selftest'" in p.stderr.decode()
