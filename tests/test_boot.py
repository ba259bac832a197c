"""Direct kernel boot: PVH ELF and bzImage loading into guest RAM, and their errors."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st

from conftest import guest_path
from kvmpy.boot import layout
from kvmpy.boot.loader import HVM_START_MAGIC, load_kernel
from kvmpy.errors import BootError
from kvmpy.memory import GuestMemory


@pytest.fixture
def memory():
    mem = GuestMemory.anonymous(layout.ram_layout(64 << 20))
    yield mem
    mem.close()


def fake_bzimage(version=0x20F, xloadflags=1, setup_sects=4, payload=b"\x90" * 4096,
                 initrd_max=0x37FFFFFF, cmdline_size=2047, init_size=0x100000) -> bytes:
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x1FE:0x200] = b"\x55\xaa"
    setup[0x200] = 0xEB
    setup[0x201] = 0x6A          # header length: 0x202 + 0x6a = 0x26c
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = 0x01          # LOADED_HIGH
    struct.pack_into("<I", setup, 0x22C, initrd_max)
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + payload


def test_pvh_guest_loads_with_start_info(memory):
    state = load_kernel(memory, guest_path("hello"), "a=b", rsdp_addr=0xE0000)
    assert state.regs.rbx == layout.PVH_START_INFO_ADDR
    magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, nmemmap, _ = struct.unpack(
        "<IIIIQQQQII", memory.read(layout.PVH_START_INFO_ADDR, 56))
    assert (magic, version, nr_modules, rsdp) == (HVM_START_MAGIC, 1, 0, 0xE0000)
    assert memory.read(cmdline, 4) == b"a=b\0"
    assert nmemmap == len(layout.e820_map(64 << 20))
    assert state.sregs.cr0 & 1 and not state.sregs.cr0 & (1 << 31)   # protected mode, paging off
    assert state.sregs.cs.db == 1 and state.sregs.cs.l == 0


def test_pvh_initrd_is_a_module_below_4g(memory, tmp_path):
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"INITRD" * 1000)
    load_kernel(memory, guest_path("hello"), "", str(initrd))
    nr_modules, modlist = struct.unpack_from("<IQ", memory.read(layout.PVH_START_INFO_ADDR + 12, 12))
    assert nr_modules == 1
    paddr, size = struct.unpack("<QQ", memory.read(modlist, 16))
    assert size == 6000 and memory.read(paddr, 6) == b"INITRD"
    assert paddr % 4096 == 0 and paddr + size <= 64 << 20


def test_bzimage_zero_page_and_long_mode_entry(memory, tmp_path):
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(fake_bzimage())
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"\x1f\x8b" + bytes(10000))
    state = load_kernel(memory, str(kernel), "console=ttyS0", str(initrd), rsdp_addr=0xE0000)
    zp = memory.read(layout.ZERO_PAGE_ADDR, 4096)
    assert zp[0x202:0x206] == b"HdrS"
    assert zp[0x210] == 0xFF                                   # type_of_loader
    cmd_ptr, = struct.unpack_from("<I", zp, 0x228)
    assert memory.read(cmd_ptr, 14) == b"console=ttyS0\0"
    rd_addr, rd_size = struct.unpack_from("<II", zp, 0x218)
    assert rd_size == 10002 and memory.read(rd_addr, 2) == b"\x1f\x8b"
    assert rd_addr >= 0x100000 + 0x100000                      # above kernel + init_size
    assert zp[0x1E8] == len(layout.e820_map(64 << 20))
    assert struct.unpack_from("<Q", zp, 0x70)[0] == 0xE0000     # acpi_rsdp_addr
    assert state.regs.rip == 0x100200 and state.regs.rsi == layout.ZERO_PAGE_ADDR
    assert state.sregs.efer & (1 << 10) and state.sregs.cr0 & (1 << 31)
    assert memory.read(0x100000, 4) == b"\x90" * 4
    # identity map: PML4[0] -> PDPT, PD entry 1 maps 2 MiB..4 MiB
    assert memory.read_u64(layout.PML4_ADDR) & ~0xFFF == layout.PDPT_ADDR
    assert memory.read_u64(layout.PD_ADDR + 8) == (1 << 21) | 0x83


@pytest.mark.parametrize("kwargs,needle", [
    ({"version": 0x20A}, "too old"),
    ({"xloadflags": 0}, "64-bit entry"),
    ({"setup_sects": 60, "payload": b""}, "setup_sects"),
])
def test_bad_bzimages_name_the_problem(memory, tmp_path, kwargs, needle):
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(fake_bzimage(**kwargs))
    with pytest.raises(BootError) as info:
        load_kernel(memory, str(kernel))
    assert str(kernel) in str(info.value) and needle in str(info.value)


def test_cmdline_too_long_for_kernel(memory, tmp_path):
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(fake_bzimage(cmdline_size=16))
    with pytest.raises(BootError, match="command line"):
        load_kernel(memory, str(kernel), "x" * 100)


def test_initrd_too_big(memory, tmp_path):
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(fake_bzimage())
    initrd = tmp_path / "big"
    with open(initrd, "wb") as f:
        f.truncate(70 << 20)
    with pytest.raises(BootError, match="initrd"):
        load_kernel(memory, str(kernel), "", str(initrd))


def test_elf_without_pvh_note(memory, tmp_path):
    import sys
    with pytest.raises(BootError, match="PVH"):
        load_kernel(memory, sys.executable)


def test_missing_kernel(memory):
    with pytest.raises(BootError, match="/no/such/kernel"):
        load_kernel(memory, "/no/such/kernel")


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=2048), st.integers(0, 2047))
def test_garbage_headers_never_crash(tmp_path_factory, blob, where):
    """Any file gives a kernel or a BootError, never another exception."""
    d = tmp_path_factory.mktemp("k")
    data = bytearray(blob)
    if where % 3 == 0 and len(data) >= 4:
        data[:4] = b"\x7fELF"
    elif where % 3 == 1:
        data = bytearray(fake_bzimage(payload=b""))[:max(len(blob), 0x210)] + data
    path = d / "k"
    path.write_bytes(bytes(data))
    mem = GuestMemory.anonymous([(0, 8 << 20)])
    try:
        load_kernel(mem, str(path), "", mem_size=8 << 20)
    except BootError:
        pass
    finally:
        mem.close()


def _load_both_ways(tmp_path, image: bytes, initrd: bytes | None = None):
    """What load_kernel makes of ``image`` by path and through BootFiles (a running
    machine's way, which reads a bzImage's kernel and an initrd straight into guest
    RAM): for each, (BootState or the BootError's text, the zero page, the start-info
    page, guest RAM from 1 MiB to 16 MiB (the kernel) and its top 16 MiB (the initrd))."""
    from kvmpy.boot.loader import BootFiles
    kernel = tmp_path / "kernel"
    kernel.write_bytes(image)
    initrd_path = None
    if initrd is not None:
        (tmp_path / "initrd").write_bytes(initrd)
        initrd_path = str(tmp_path / "initrd")
    results = []
    for through_files in (False, True):
        mem = GuestMemory.anonymous(layout.ram_layout(64 << 20))
        files = BootFiles(str(kernel), initrd_path) if through_files else None
        try:
            state = load_kernel(mem, str(kernel), "console=ttyS0", initrd_path, files=files)
            outcome = (state.regs, state.kernel_end, state.notes)
        except BootError as e:
            outcome = str(e)
        finally:
            if files is not None:
                files.close()
        results.append((outcome, mem.read(layout.ZERO_PAGE_ADDR, 4096), mem.read(layout.PVH_START_INFO_ADDR, 4096),
                        mem.read(0x100000, 15 << 20), mem.read(48 << 20, 16 << 20)))
        mem.close()
    return results


@pytest.mark.parametrize("guest", ["hello", "multiboot_elf", "multiboot_aout"])
def test_an_elf_or_multiboot_kernel_and_its_initrd_load_the_same_through_the_machines_open_files(tmp_path,
                                                                                                  guest):
    with open(guest_path(guest), "rb") as f:
        image = f.read()
    by_path, by_files = _load_both_ways(tmp_path, image, bytes(range(256)) * 4000 + b"end")
    assert not isinstance(by_path[0], str), by_path[0]
    assert by_files == by_path


@settings(max_examples=40, deadline=None)
@given(setup_sects=st.integers(1, 255), payload_size=st.integers(0, 300_000), seed=st.integers(0, 255),
       with_initrd=st.booleans())
def test_a_bzimage_loads_the_same_through_the_machines_open_files(tmp_path_factory, setup_sects, payload_size,
                                                                  seed, with_initrd):
    """BootFiles reads only a bzImage's setup part into Python and the kernel after it
    straight into guest RAM; guest RAM, the zero page and the boot state (or the error)
    are what reading the whole file gives, for every setup size and kernel size."""
    payload = bytes((seed + i) & 0xFF for i in range(251)) * (payload_size // 251 + 1)
    image = fake_bzimage(setup_sects=setup_sects, payload=payload[:payload_size])
    by_path, by_files = _load_both_ways(tmp_path_factory.mktemp("k"), image,
                                        b"\x1f\x8b" + bytes(5000) if with_initrd else None)
    assert by_files == by_path


def test_a_kernel_shorter_than_its_size_said_is_one_error(tmp_path):
    from kvmpy.boot.loader import BootFiles
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(fake_bzimage(payload=b"\x90" * 4096))
    files = BootFiles(str(kernel))
    try:
        with pytest.raises(BootError, match=f"kernel {kernel}: shorter than"):
            files.read_into("kernel", 5 * 512, memoryview(bytearray(8192)))
    finally:
        files.close()
