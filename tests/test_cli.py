"""CLI behaviour that needs no guest: bad input gives one line and status 2; info kvm."""

from __future__ import annotations

import json
import os

import pytest

from conftest import KVM_SKIP_REASON, ROOT, guest_path, run_kvmpy


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
    """Without a kernel kvmpy boots SeaBIOS, as QEMU; without firmware either there
    is nothing to run."""
    p = run_kvmpy(["run", "--firmware", "none"])
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


# --- files that are not what the option expects (issue 15 item 4) -------------------------

def test_non_utf8_vm_toml_is_one_line(tmp_path):
    cfg = tmp_path / "vm.toml"
    cfg.write_bytes(b'name = "caf\xe9"\nkernel = "k"\n')
    p = run_kvmpy(["run", str(cfg)])
    assert p.returncode == 2
    line = _one_line(p)
    assert str(cfg) in line and "UTF-8" in line and "0xe9" in line


def test_char_device_as_vm_toml_is_refused():
    p = run_kvmpy(["run", "/dev/zero"], timeout=20)
    assert p.returncode == 2
    assert "/dev/zero: is a character device" in _one_line(p)


def test_kernel_that_is_a_directory_says_so(tmp_path):
    p = run_kvmpy(["run", "--kernel", str(tmp_path)])
    assert p.returncode == 2
    line = _one_line(p)
    assert f"kernel {tmp_path}: is a directory" in line and "no such file" not in line


def test_initrd_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "initrd"
    os.mkfifo(fifo)
    p = run_kvmpy(["run", "--kernel", guest_path("hello"), "--initrd", str(fifo)], timeout=20)
    assert p.returncode == 2
    assert f"initrd {fifo}: is a FIFO" in _one_line(p)


def test_img_info_on_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "disk.img"
    os.mkfifo(fifo)
    p = run_kvmpy(["img", "info", str(fifo)], timeout=20)
    assert p.returncode == 2
    assert f"{fifo}: is a FIFO" in _one_line(p)


@pytest.mark.parametrize("target", ["fifo", "/dev/null", "dir", "socket"])
@pytest.mark.parametrize("fmt", ["", ",format=raw", ",format=qcow2"])
def test_drive_that_is_not_a_file_or_block_device_is_refused(tmp_path, target, fmt):
    import socket
    if target == "fifo":
        path = str(tmp_path / "d")
        os.mkfifo(path)
    elif target == "dir":
        path = str(tmp_path)
    elif target == "socket":
        path = str(tmp_path / "s")
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(path)
    else:
        path = target
    p = run_kvmpy(["run", "--kernel", guest_path("hello"), "--drive", f"file={path}{fmt}"], timeout=30)
    assert p.returncode == 2
    line = _one_line(p)
    assert f"{path}: is a" in line and "expected a regular file or a block device" in line


def test_block_device_is_still_a_valid_image():
    """Raw disks on block devices are legitimate: the kind check lets them through."""
    import glob
    import stat
    devs = [d for d in sorted(glob.glob("/dev/loop*")) if stat.S_ISBLK(os.stat(d).st_mode)]
    if not devs or os.geteuid() != 0:
        pytest.skip("needs root and a /dev/loop* block device")
    from kvmpy.block import _refuse_non_image
    assert _refuse_non_image(devs[0]) is None


def test_bad_name_is_refused_on_the_command_line_as_in_vm_toml(tmp_path):
    p = run_kvmpy(["run", "--kernel", guest_path("hello"), "--name", "bad name"])
    assert p.returncode == 2
    assert "--name: use 1-64 letters" in _one_line(p)
    cfg = tmp_path / "vm.toml"
    cfg.write_text(f'name = "bad name"\nkernel = "{guest_path("hello")}"\n')
    p = run_kvmpy(["run", str(cfg)])
    assert p.returncode == 2
    assert "key 'name': use 1-64 letters" in _one_line(p)


# --- guest RAM larger than the host (issue 15 item 4) --------------------------------------

def test_guest_ram_is_mapped_noreserve():
    """The mapping carries MAP_NORESERVE (smaps VmFlags 'nr'): the kernel's overcommit
    heuristic does not weigh a guest's whole -m against RAM+swap at start."""
    import ctypes
    from kvmpy.memory import GuestMemory
    mem = GuestMemory.anonymous([(0, 64 << 20)])
    try:
        # The temporary c_char dies at once, releasing its export before close().
        start = ctypes.addressof(ctypes.c_char.from_buffer(mem.regions[0].mm))
        with open("/proc/self/smaps") as f:
            smaps = f.read()
    finally:
        mem.close()
    block = smaps[smaps.index(f"\n{start:x}-") + 1:]
    flags = next(line for line in block.splitlines() if line.startswith("VmFlags:"))
    assert " nr" in flags, flags


def test_guest_ram_the_host_will_not_map_is_one_line_exit_1():
    """When the mapping fails all the same (here an address-space limit, as strict
    overcommit would): one line naming -m, status 1."""
    import resource
    import subprocess
    import sys
    from conftest import ROOT

    def limit_address_space():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
    p = subprocess.run([sys.executable, "-m", "kvmpy", "run", "--accel", "tcg", "-m", "8G",
                        "--kernel", guest_path("hello")], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=60, preexec_fn=limit_address_space)
    assert p.returncode == 1
    line = _one_line(p)
    assert "memory 8192M (-m or key 'memory')" in line and "cannot map" in line


@pytest.mark.guest
def test_huge_memory_runs_without_touching_it(tmp_path):
    """-m 900G on a 24 GiB host: with MAP_NORESERVE the heuristic overcommit policy maps it
    and the test guest runs; under vm.overcommit_memory=2 (strict) the kernel ignores the
    flag and the mapping fails: then one line naming -m, exit 1 (a host limit, not a typo).
    Either way the VM process stays small: nothing touches the RAM it was given. The
    translator runs it: KVM would allocate its per-page metadata (a GiB for 900G on a
    shadow-paging host) in the kernel, which is not what this checks."""
    import subprocess
    import sys
    from conftest import ROOT
    out, err = tmp_path / "out", tmp_path / "err"
    env = dict(os.environ, PYTHONPATH=ROOT)
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen([sys.executable, "-m", "kvmpy", "run", "--accel", "tcg", "-m", "900G",
                                 "--kernel", guest_path("hello")], cwd=ROOT, env=env,
                                stdin=subprocess.DEVNULL, stdout=o, stderr=e)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            proc.returncode = 0     # reaped by wait4: keep Popen from waiting again
    rc = os.waitstatus_to_exitcode(status)
    stderr = err.read_text()
    assert "Traceback" not in stderr
    if rc == 0:
        assert "Hello from kvmpy test guest" in out.read_text()
    else:
        assert rc == 1 and len(stderr.strip().splitlines()) == 1, stderr
        assert "memory 921600M (-m or key 'memory')" in stderr and "cannot map" in stderr
    assert usage.ru_maxrss < 512 * 1024, f"VM process peaked at {usage.ru_maxrss} KiB"


def test_a_named_command_imports_only_its_module():
    """`kvmpy run ...` builds the parser from runcmd alone (the other subcommands'
    imports were most of its start-up); `kvmpy --help` and unknown words list all."""
    import subprocess
    import sys
    code = ("import sys; from kvmpy.cli import build_parser; build_parser(sys.argv[1:], all_commands=False); "
            "print(sorted(m for m in sys.modules if m in ('kvmpy.runcmd', 'kvmpy.block.imgcli', 'kvmpy.service', "
            "'kvmpy.tools.guestbuild', 'kvmpy.tools.nested', 'kvmpy.infocmd')))")
    def loaded(*argv):
        p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True, cwd=ROOT)
        return p.stdout.strip()
    assert loaded("-vv", "run", "--kernel", "x") == "['kvmpy.runcmd']"
    assert loaded("img", "info", "x") == "['kvmpy.block.imgcli']"
    everything = str(sorted(['kvmpy.runcmd', 'kvmpy.block.imgcli', 'kvmpy.service', 'kvmpy.tools.guestbuild',
                             'kvmpy.tools.nested', 'kvmpy.infocmd']))
    assert loaded("--help") == everything
    assert loaded("bogus") == everything
    p = run_kvmpy(["bogus"])
    from kvmpy.cli import COMMAND_MODULES
    choices = ", ".join(repr(c) for c in COMMAND_MODULES)
    assert p.returncode == 2 and f"choose from {choices}" in p.stderr.decode()


def test_only_the_cli_reaches_the_tools():
    """kvmpy.tools (the guest builder, the nested harness) are not the VMM: no module
    of it imports them; cli.py names them in COMMAND_MODULES and imports them by name."""
    import ast
    from kvmpy.cli import COMMAND_MODULES
    package = os.path.join(ROOT, "kvmpy")
    offenders = []
    for dirpath, _, files in os.walk(package):
        rel_dir = os.path.relpath(dirpath, ROOT)
        if rel_dir.split(os.sep)[:2] == ["kvmpy", "tools"]:
            continue
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
            is_package = name == "__init__.py"
            for node in ast.walk(ast.parse(open(path).read(), path)):
                if isinstance(node, ast.Import):
                    targets = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[:len(base) - node.level + 1] if node.level else []
                    source = ".".join(base + ([node.module] if node.module else []))
                    targets = [source] + [f"{source}.{alias.name}" for alias in node.names]
                else:
                    continue
                offenders += [f"{module}: {t}" for t in targets if t == "kvmpy.tools" or t.startswith("kvmpy.tools.")]
    assert offenders == []
    assert {"kvmpy.tools.guestbuild", "kvmpy.tools.nested"} <= set(COMMAND_MODULES.values())


def test_no_command_is_the_help_and_status_2(capsys):
    """The parser declares func=None for no subcommand (no probe of the namespace)."""
    from kvmpy.cli import build_parser, main
    assert build_parser().parse_args([]).func is None
    assert main([]) == 2
    assert "usage: kvmpy" in capsys.readouterr().err
