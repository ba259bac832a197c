"""UEFI's variable store (kvmpy.devices.pflash): the flash on its own against OVMF's
driver's sequences and against a plain model of the part under hostile command
streams, its state round trip, the configuration's one-line errors, and end to end:
OVMF_CODE.fd with a copy of OVMF_VARS.fd keeps its monotonic counter across two kvmpy
boots, and QEMU boots from the store kvmpy wrote."""

from __future__ import annotations

import dataclasses
import os
import shutil
import struct
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import run_kvmpy, tool_required
from kvmpy.devices import pflash as pf
from kvmpy.devices.saved_state import StateError

SIZE = 4 * pf.BLOCK_SIZE
OVMF_CODE = "/usr/share/OVMF/OVMF_CODE.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS.fd"


@pytest.fixture
def flash(tmp_path):
    path = tmp_path / "vars.fd"
    path.write_bytes(bytes(range(256)) * (SIZE // 256))
    fd = os.open(path, os.O_RDWR)
    dev = pf.Pflash(fd, SIZE)
    yield dev, path
    dev.close()
    os.close(fd)


def test_ovmf_probe_finds_flash_and_program_erase_reach_the_file(flash):
    """OvmfPkg/QemuFlashFvbServicesRuntimeDxe's QemuFlashDetected, then a write and
    an erase as its QemuFlashWrite/QemuFlashEraseBlock issue them."""
    dev, path = flash
    probe = 1                                       # the first byte that is not 0x00
    original = dev.read(probe, 1)
    dev.write(probe, 1, pf.CMD_CLEAR_STATUS)
    assert dev.read(probe, 1) == original, "RAM would read the command back"
    dev.write(probe, 1, pf.CMD_READ_STATUS)
    assert dev.read(probe, 1) == 0x00, "flash reads the cleared status"
    dev.write(probe, 1, pf.CMD_READ_ARRAY)
    for i, byte in enumerate(b"kvmpy"):
        dev.write(0x100 + i, 1, pf.CMD_PROGRAM)
        dev.write(0x100 + i, 1, byte)
    assert dev.read(0x100, 1) & pf.STATUS_READY, "status until the array is asked for"
    dev.write(0x100, 1, pf.CMD_READ_ARRAY)
    assert dev.read(0x100, 4) == int.from_bytes(b"kvmp", "little")
    assert path.read_bytes()[0x100:0x105] == b"kvmpy"
    dev.write(pf.BLOCK_SIZE + 7, 1, pf.CMD_ERASE)
    dev.write(pf.BLOCK_SIZE + 7, 1, pf.CMD_ERASE_CONFIRM)
    dev.write(pf.BLOCK_SIZE, 1, pf.CMD_READ_ARRAY)
    data = path.read_bytes()
    assert data[pf.BLOCK_SIZE:2 * pf.BLOCK_SIZE] == b"\xff" * pf.BLOCK_SIZE
    assert data[2 * pf.BLOCK_SIZE] == 0 and len(data) == SIZE


def test_the_return_to_the_array_makes_writes_durable(flash, monkeypatch):
    dev, _path = flash
    synced = []
    monkeypatch.setattr(pf.os, "fdatasync", lambda fd: synced.append(fd))
    dev.write(0, 1, pf.CMD_READ_ARRAY)
    assert synced == [], "nothing written, nothing to sync"
    dev.write(5, 1, pf.CMD_PROGRAM)
    dev.write(5, 1, 0x42)
    assert synced == []
    dev.write(5, 1, pf.CMD_READ_ARRAY)
    assert synced == [dev.fd]


def test_a_host_write_error_is_a_status_bit_not_an_exception(flash, caplog):
    dev, _path = flash
    os.close(dev.fd)
    dev.fd = os.open(os.devnull, os.O_RDONLY)        # EBADF for writes
    dev.write(9, 1, pf.CMD_PROGRAM)
    dev.write(9, 1, 0x11)
    assert dev.read(9, 1) & pf.STATUS_PROGRAM_ERROR
    assert "pflash: writing 1 bytes at 0x9" in caplog.text


class _Model:
    """The part as a plain model: the array, where reads go, what the next write is."""

    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)
        self.status_mode = False
        self.pending: tuple[str, int] | None = None

    def write(self, offset: int, size: int, value: int) -> None:
        if self.pending and self.pending[0] == "program":
            self.pending = None
            self.data[offset:offset + size] = value.to_bytes(size, "little")
            return
        command = value & 0xFF
        if self.pending and self.pending[0] == "erase":
            block = self.pending[1]
            self.pending = None
            if command == pf.CMD_ERASE_CONFIRM:
                self.data[block * pf.BLOCK_SIZE:(block + 1) * pf.BLOCK_SIZE] = b"\xff" * pf.BLOCK_SIZE
            self.status_mode = True
            return
        if command in (pf.CMD_PROGRAM, pf.CMD_PROGRAM_ALT):
            self.pending = ("program", 0)
        elif command == pf.CMD_ERASE:
            self.pending = ("erase", offset // pf.BLOCK_SIZE)
        self.status_mode = command in (pf.CMD_PROGRAM, pf.CMD_PROGRAM_ALT, pf.CMD_ERASE, pf.CMD_READ_STATUS)


_commands = st.sampled_from([pf.CMD_READ_ARRAY, pf.CMD_READ_ARRAY_ALT, pf.CMD_PROGRAM, pf.CMD_PROGRAM_ALT,
                             pf.CMD_ERASE, pf.CMD_ERASE_CONFIRM, pf.CMD_CLEAR_STATUS, pf.CMD_READ_STATUS,
                             pf.CMD_READ_ID, pf.CMD_CFI_QUERY])
_writes = st.lists(st.tuples(st.integers(-8, SIZE + 8), st.sampled_from([1, 2, 4, 8]),
                             st.one_of(_commands, st.integers(0, (1 << 64) - 1))), max_size=60)


@settings(max_examples=150, deadline=None)
@given(_writes)
def test_hostile_writes_keep_file_memory_and_model_in_step(tmp_path_factory, writes):
    path = tmp_path_factory.mktemp("flash") / "vars.fd"
    initial = os.urandom(SIZE)
    path.write_bytes(initial)
    fd = os.open(path, os.O_RDWR)
    try:
        dev = pf.Pflash(fd, SIZE)
        model = _Model(initial)
        for offset, size, value in writes:
            value &= (1 << (8 * size)) - 1
            dev.write(offset, size, value)
            if 0 <= offset and offset + size <= SIZE:
                model.write(offset, size, value)
            got = dev.read(offset, size)
            if not (0 <= offset and offset + size <= SIZE):
                assert got == (1 << (8 * size)) - 1
        # Twice: the first may be a pending program's data or an erase's (non-)confirmation.
        for _ in range(2):
            dev.write(0, 1, pf.CMD_READ_ARRAY)
            model.write(0, 1, pf.CMD_READ_ARRAY)
        assert bytes(dev.data) == bytes(model.data)
        assert path.read_bytes() == bytes(dev.data) and os.path.getsize(path) == SIZE
        assert dev.read(0, 8) == int.from_bytes(dev.data[:8], "little")
    finally:
        os.close(fd)


def test_state_round_trip_and_malformed_states(flash):
    dev, _path = flash
    dev.write(pf.BLOCK_SIZE * 2, 1, pf.CMD_ERASE)
    state = dev.state()
    other = pf.Pflash.from_state(state, dev.fd, SIZE)
    assert other.state() == state
    other.write(0, 1, pf.CMD_ERASE_CONFIRM)
    assert other.data[2 * pf.BLOCK_SIZE:3 * pf.BLOCK_SIZE] == b"\xff" * pf.BLOCK_SIZE
    for bad in (dataclasses.replace(state, mode=7), dataclasses.replace(state, status=0x01),
                dataclasses.replace(state, erase_block=SIZE // pf.BLOCK_SIZE),
                dataclasses.replace(state, next_write=True),
                dataclasses.replace(state, contents=state.contents[:-1]),
                dataclasses.replace(state, contents=bytearray(state.contents))):
        with pytest.raises(StateError):
            dev.restore(bad)
    assert dev.state() == state


def _program(dev, offset: int, data: bytes) -> None:
    for i, byte in enumerate(data):
        dev.write(offset + i, 1, pf.CMD_PROGRAM)
        dev.write(offset + i, 1, byte)
    dev.write(offset, 1, pf.CMD_READ_ARRAY)


def _erase(dev, block: int) -> None:
    dev.write(block * pf.BLOCK_SIZE, 1, pf.CMD_ERASE)
    dev.write(block * pf.BLOCK_SIZE, 1, pf.CMD_ERASE_CONFIRM)
    dev.write(0, 1, pf.CMD_READ_ARRAY)


def test_loadvm_brings_back_the_variables_of_savevm(flash, monkeypatch):
    """savevm takes the state; the guest then rewrites and erases variables; loadvm
    restores the state into the machine's fresh flash over the same file: the guest
    reads, the file and the next boot's flash all have the variables of savevm."""
    dev, path = flash
    _program(dev, 0x40, b"BootOrder=0001")
    saved = dev.state()
    at_savevm = path.read_bytes()
    assert saved.contents == at_savevm
    _program(dev, 0x40, b"\x00" * 8)
    _erase(dev, 0)
    _erase(dev, 3)
    assert path.read_bytes() != at_savevm
    synced = []
    real_fdatasync = os.fdatasync
    monkeypatch.setattr(pf.os, "fdatasync", lambda fd: (synced.append(fd), real_fdatasync(fd)))
    restored = pf.Pflash.from_state(saved, dev.fd, SIZE)
    assert synced == [dev.fd], "loadvm's variables are durable before the guest runs"
    assert restored.read(0x40, 8) == int.from_bytes(b"BootOrde", "little")
    assert bytes(restored.data) == at_savevm == path.read_bytes()
    assert restored.state() == saved
    next_boot = pf.Pflash(dev.fd, SIZE)
    assert bytes(next_boot.data) == at_savevm


@settings(max_examples=60, deadline=None)
@given(_writes, _writes)
def test_any_run_after_savevm_is_undone_by_loadvm(tmp_path_factory, before, after):
    """Whatever the guest does before savevm and after it, restoring the state gives
    the array, the file and the registers of savevm."""
    path = tmp_path_factory.mktemp("flash") / "vars.fd"
    path.write_bytes(os.urandom(SIZE))
    fd = os.open(path, os.O_RDWR)
    try:
        dev = pf.Pflash(fd, SIZE)
        for offset, size, value in before:
            dev.write(offset, size, value & ((1 << (8 * size)) - 1))
        saved = dev.state()
        for offset, size, value in after:
            dev.write(offset, size, value & ((1 << (8 * size)) - 1))
        restored = pf.Pflash.from_state(saved, fd, SIZE)
        assert restored.state() == saved
        assert path.read_bytes() == saved.contents == bytes(restored.data)
    finally:
        os.close(fd)


def test_a_refused_state_leaves_the_file_alone(flash):
    dev, path = flash
    saved = dev.state()
    _program(dev, 0x10, b"later")
    before = path.read_bytes()
    with pytest.raises(StateError):
        dev.restore(dataclasses.replace(saved, contents=saved.contents + b"\xff"))
    with pytest.raises(StateError):
        dev.restore(dataclasses.replace(saved, erase_block=1 << 20))
    assert path.read_bytes() == before == bytes(dev.data)


# --- configuration ------------------------------------------------------------------------------
def _ovmf_split_required():
    if not (os.path.isfile(OVMF_CODE) and os.path.isfile(OVMF_VARS)):
        pytest.skip(f"OVMF's split images are not installed ({OVMF_CODE}, {OVMF_VARS}; Debian package ovmf)")


def test_bad_variable_stores_are_one_line(tmp_path):
    _ovmf_split_required()
    odd = tmp_path / "odd.fd"
    odd.write_bytes(b"\0" * 1000)
    readonly = tmp_path / "ro.fd"
    shutil.copyfile(OVMF_VARS, readonly)
    readonly.chmod(0o444)
    cases = [(["--firmware", "bios", "--firmware-vars", OVMF_VARS], "a variable store is for UEFI firmware"),
             (["--firmware", "uefi", "--bios", OVMF_CODE, "--firmware-vars", str(odd)], "multiple of 4 KiB"),
             (["--firmware", "uefi", "--bios", OVMF_CODE, "--firmware-vars", str(tmp_path / "none.fd")],
              "none.fd")]
    if os.geteuid() != 0:           # root writes through the mode bits
        cases.append((["--firmware", "uefi", "--bios", OVMF_CODE, "--firmware-vars", str(readonly)],
                      "must be writable"))
    for args, words in cases:
        r = run_kvmpy(["run", "--accel", "tcg", *args], timeout=60)
        lines = r.stderr.decode().strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and words in lines[0], (args, r.stderr)


def test_a_store_in_use_is_refused(tmp_path):
    _ovmf_split_required()
    import fcntl
    store = tmp_path / "vars.fd"
    shutil.copyfile(OVMF_VARS, store)
    with open(store, "r+b") as held:
        fcntl.lockf(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = run_kvmpy(["run", "--accel", "tcg", "--firmware", "uefi", "--bios", OVMF_CODE,
                       "--firmware-vars", str(store)], timeout=60)
    lines = r.stderr.decode().strip().splitlines()
    assert r.returncode == 2 and "in use by another process" in lines[-1], r.stderr


def test_qemus_two_pflash_drives():
    from kvmpy.qemu_cli import QemuOptionError, config_from_qemu_args
    _ovmf_split_required()
    cfg, _ = config_from_qemu_args(["-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
                                    "-drive", f"if=pflash,format=raw,file={OVMF_VARS}"])
    assert cfg.bios == OVMF_CODE and cfg.firmware_vars == OVMF_VARS and cfg.firmware == "uefi"
    with pytest.raises(QemuOptionError, match="drop readonly=on"):
        config_from_qemu_args(["-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
                               "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_VARS}"])


# --- end to end ---------------------------------------------------------------------------------
VARIABLE_HEADER = struct.Struct("<HBBIQ16sIII16s")     # OVMF's authenticated variable header
VAR_ADDED = 0x3F


def _variable(store: bytes, name: str) -> bytes | None:
    """The data of the live variable ``name`` in an OVMF variable store."""
    found, at = None, 0
    wanted = (name + "\0").encode("utf-16-le")
    while True:
        at = store.find(b"\xaa\x55", at)
        if at < 0 or at + VARIABLE_HEADER.size > len(store):
            return found
        _start, state, _r, _attrs, _count, _time, _key, name_size, data_size, _guid = \
            VARIABLE_HEADER.unpack_from(store, at)
        body = at + VARIABLE_HEADER.size
        if state == VAR_ADDED and store[body:body + name_size] == wanted:
            found = store[body + name_size:body + name_size + data_size]
        at += 2


@pytest.mark.guest
def test_ovmf_keeps_its_variables_across_boots_and_qemu_reads_them(tmp_path):
    """OVMF counts its boots in the variable MTC: a higher count after each boot means
    the store was found as flash, written, and read back by the next boot."""
    _ovmf_split_required()
    from support.uefi_esp import EXIT_PORT, EXIT_VALUE, make_esp, missing_esp_tool
    reason = missing_esp_tool()
    if reason:
        pytest.skip(reason)
    esp = make_esp(str(tmp_path), "pflash")
    store = tmp_path / "vars.fd"
    shutil.copyfile(OVMF_VARS, store)
    assert _variable(store.read_bytes(), "MTC") is None
    counts = []
    for _boot in range(2):
        r = run_kvmpy(["run", "--accel", "tcg", "--firmware", "uefi", "--bios", OVMF_CODE,
                       "--firmware-vars", str(store), "-m", "256", "--net", "none",
                       "--drive", f"file={esp},format=raw"], timeout=600)
        assert r.returncode == EXIT_VALUE, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
        mtc = _variable(store.read_bytes(), "MTC")
        assert mtc is not None and len(mtc) == 4, "OVMF kept no MTC variable in the store"
        counts.append(struct.unpack("<I", mtc)[0])
        assert _variable(store.read_bytes(), "BootOrder")
    assert counts[1] > counts[0], counts
    qemu = tool_required("qemu-system-x86_64")
    q = subprocess.run([qemu, "-M", "pc", "-accel", "tcg", "-m", "256", "-nographic", "-nodefaults",
                        "-serial", "stdio", "-monitor", "none",
                        "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
                        "-drive", f"if=pflash,format=raw,file={store}",
                        "-drive", f"file={esp},format=raw,if=none,id=d0", "-device", "virtio-blk-pci,drive=d0",
                        "-device", f"isa-debug-exit,iobase={EXIT_PORT:#x},iosize=4"],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=600)
    assert q.returncode == (EXIT_VALUE << 1) | 1, (q.returncode, q.stdout[-2000:])
    assert struct.unpack("<I", _variable(store.read_bytes(), "MTC"))[0] > counts[1]
