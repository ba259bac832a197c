"""ACPI tables parsed back from guest RAM, checked with iasl; the PM hardware."""

import os
import shutil
import struct
import subprocess

import pytest
from hypothesis import given, settings, strategies as st

from kvmpy.boot import acpi
from kvmpy.devices import acpi_pm
from kvmpy.devices.acpi_pm import AcpiPm
from kvmpy.errors import ConfigError
from kvmpy.memory import GuestMemory


def ram(size=2 << 20):
    return GuestMemory.anonymous([(0, size)])


def table_at(mem, addr):
    length = mem.read_u32(addr + 4)
    data = mem.read(addr, length)
    assert sum(data) & 0xFF == 0, f"{data[:4]} checksum"
    return data


def walk(mem, rsdp):
    r = mem.read(rsdp, 36)
    assert r[:8] == b"RSD PTR " and r[15] == 2
    assert sum(r[:20]) & 0xFF == 0 and sum(r) & 0xFF == 0
    rsdt_addr, length, xsdt_addr = struct.unpack_from("<IIQ", r, 16)
    assert length == 36
    xsdt = table_at(mem, xsdt_addr)
    rsdt = table_at(mem, rsdt_addr)
    xptrs = struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36)
    rptrs = struct.unpack_from(f"<{(len(rsdt) - 36) // 4}I", rsdt, 36)
    assert list(xptrs) == list(rptrs)
    tables = {}
    for p in xptrs:
        t = table_at(mem, p)
        tables[t[:4]] = (p, t)
    fadt = tables[b"FACP"][1]
    facs, dsdt = struct.unpack_from("<II", fadt, 36)
    assert struct.unpack_from("<QQ", fadt, 132) == (facs, dsdt)
    tables[b"DSDT"] = (dsdt, table_at(mem, dsdt))
    assert facs % 64 == 0 and mem.read(facs, 4) == b"FACS" and mem.read_u32(facs + 4) == 64
    return tables


def madt_entries(madt):
    out, off = [], 44
    while off < len(madt):
        typ, ln = madt[off], madt[off + 1]
        assert ln >= 2 and off + ln <= len(madt)
        out.append((typ, madt[off:off + ln]))
        off += ln
    assert off == len(madt)
    return out


@pytest.mark.parametrize("cpus", [1, 2, 7, 255])
def test_tables_parse_back(cpus):
    mem = ram()
    rsdp = acpi.build_acpi_tables(mem, 0xE0000, cpus)
    assert rsdp == 0xE0000
    t = walk(mem, rsdp)
    assert set(t) == {b"FACP", b"APIC", b"DSDT"}
    entries = madt_entries(t[b"APIC"][1])
    lapics = [e for typ, e in entries if typ == 0]
    assert [e[3] for e in lapics] == list(range(cpus))  # APIC ids
    assert all(struct.unpack_from("<I", e, 4)[0] == 1 for e in lapics)
    ioapics = [e for typ, e in entries if typ == 1]
    assert len(ioapics) == 1 and struct.unpack_from("<II", ioapics[0], 4) == (0xFEC00000, 0)
    overrides = {e[3]: struct.unpack_from("<IH", e, 4) for typ, e in entries if typ == 2}
    assert overrides == {0: (2, 0), 9: (9, 0x0D)}
    assert [e[2] for typ, e in entries if typ == 4] == [0xFF]
    fadt = t[b"FACP"][1]
    assert len(fadt) == 276
    sci, = struct.unpack_from("<H", fadt, 46)
    evt, _, cnt, _, _, tmr = struct.unpack_from("<6I", fadt, 56)
    assert (sci, evt, cnt, tmr) == (9, 0x600, 0x604, 0x608)
    flags, = struct.unpack_from("<I", fadt, 112)
    assert not flags & (1 << 20) and not flags & (1 << 4) and flags & (1 << 8)
    assert fadt[108] == 0x32
    assert fadt[116:120] == bytes((1, 8, 0, 1)) and struct.unpack_from("<QB", fadt, 120) == (0xCF9, 6)


def test_rsdp_copy_in_bios_area_and_mcfg():
    mem = ram(16 << 20)
    rsdp = acpi.build_acpi_tables(mem, 0x100000, 2, pci_mcfg=(0xB0000000, 0, 255))
    assert rsdp == 0x100000
    assert mem.read(0xE0000, 36) == mem.read(rsdp, 36)
    t = walk(mem, rsdp)
    mcfg = t[b"MCFG"][1]
    assert len(mcfg) == 60
    assert struct.unpack_from("<QHBB", mcfg, 44) == (0xB0000000, 0, 0, 255)
    dsdt = t[b"DSDT"][1]
    assert struct.pack("<I", acpi.eisa_id("PNP0A08")) in dsdt
    assert struct.pack("<I", acpi.eisa_id("PNP0C02")) in dsdt


def test_eisa_id_and_pkglength():
    assert acpi.eisa_id("PNP0A03") == 0x030AD041
    assert acpi.eisa_id("PNP0C0C") == 0x0C0CD041
    assert acpi._pkglength(0x3E) == b"\x3f"
    enc = acpi._pkglength(0x3F)
    assert enc[0] >> 6 == 1 and ((enc[0] & 0xF) | enc[1] << 4) == 0x3F + 2
    enc = acpi._pkglength(5000)
    assert enc[0] >> 6 == 2 and ((enc[0] & 0xF) | enc[1] << 4 | enc[2] << 12) == 5003


def test_bad_inputs():
    with pytest.raises(ConfigError, match="cpus"):
        acpi.build_acpi_tables(ram(), 0xE0000, 0)
    with pytest.raises(ConfigError, match="cpus"):
        acpi.build_acpi_tables(ram(), 0xE0000, 256)
    with pytest.raises(ConfigError, match="guest RAM"):
        acpi.build_acpi_tables(ram(1 << 20), 0xFFF00, 4)


IASL = shutil.which("iasl")


@pytest.mark.skipif(IASL is None, reason="iasl not installed (Debian package acpica-tools)")
def test_iasl_accepts_every_table(tmp_path):
    mem = ram(16 << 20)
    root = acpi.PciRoot(mem64=[(0x8000000000, 0x8FFFFFFFFF)], prt=[(1, 0, 16), (2, 3, 19)])
    rsdp = acpi.build_acpi_tables(mem, 0xE0000, 64, pci_mcfg=acpi.Mcfg(0xB0000000),
                                  pci_root=root)
    t = walk(mem, rsdp)
    names = []
    for sig, (_, data) in t.items():
        name = tmp_path / f"{sig.decode().lower()}.dat"
        name.write_bytes(data)
        names.append(name)
    for name in names:
        res = subprocess.run([IASL, "-d", str(name)], cwd=tmp_path, capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "Error" not in res.stdout + res.stderr
    dsl = (tmp_path / "dsdt.dsl").read_text()
    for needle in ("_S5_", "PNP0A08", "PNP0303", "PNP0501", "_PRT", "0x0000008FFFFFFFFF"):
        assert needle in dsl
    # the disassembly compiles back with no errors and no warnings
    res = subprocess.run([IASL, "-vi", "-oa", "dsdt.dsl"], cwd=tmp_path, capture_output=True, text=True)
    out = res.stdout + res.stderr
    assert res.returncode == 0 and " 0 Errors, 0 Warnings" in out, out
    assert (tmp_path / "dsdt.aml").read_bytes()[36:] == t[b"DSDT"][1][36:]


# ------------------------------------------------------------- PM hardware
class Pm:
    def __init__(self, **kw):
        self.sleeps, self.levels = [], []
        self.now = [0]
        self.dev = AcpiPm(self.sleeps.append, self.sci, clock_ns=lambda: self.now[0], **kw)

    def sci(self, level):
        assert not self.levels or self.levels[-1] != level
        self.levels.append(level)


def test_s5_from_the_dsdt_value_powers_off():
    pm = Pm()
    # what Linux does: SLP_TYP from \_S5, then SLP_EN, as one 16-bit write
    pm.dev.write(acpi_pm.PM1_CNT_OFFSET, 2, (acpi_pm.SLP_TYP_S5 << 10) | acpi_pm.SCI_EN)
    assert pm.sleeps == []
    pm.dev.write(acpi_pm.PM1_CNT_OFFSET, 2, (acpi_pm.SLP_TYP_S5 << 10) | (1 << 13) | 1)
    assert pm.sleeps == [acpi_pm.SLP_TYP_S5]
    assert not pm.dev.read(acpi_pm.PM1_CNT_OFFSET, 2) & (1 << 13)
    dsdt = acpi.build_dsdt(1, None, None)
    assert acpi.aml_def_name("\\_S5", acpi.aml_package(
        [acpi.aml_int(acpi_pm.SLP_TYP_S5)] * 2 + [acpi.aml_int(0)] * 2)) in dsdt


def test_power_button_raises_sci_when_enabled():
    pm = Pm()
    pm.dev.press_power_button()
    assert pm.levels == []  # PWRBTN_EN clear
    assert pm.dev.read(0, 2) & acpi_pm.PWRBTN_STS
    pm.dev.write(2, 2, acpi_pm.PWRBTN_STS)  # enable
    assert pm.levels == [True]
    pm.dev.write(0, 2, acpi_pm.PWRBTN_STS)  # write-1-to-clear
    assert pm.levels == [True, False]
    assert not pm.dev.read(0, 2) & acpi_pm.PWRBTN_STS
    pm.dev.press_power_button()
    assert pm.levels[-1] is True
    pm.dev.write(acpi_pm.PM1_CNT_OFFSET, 2, 0)  # SCI_EN off masks it
    assert pm.levels[-1] is False


def test_pm_timer_rate_and_width():
    pm = Pm()
    pm.now[0] = 1_000_000_000
    assert pm.dev.read(acpi_pm.PM_TMR_OFFSET, 4) == acpi_pm.PM_TIMER_HZ
    pm24 = Pm(timer_32bit=False)
    pm24.now[0] = 10 * 1_000_000_000
    assert pm24.dev.read(acpi_pm.PM_TMR_OFFSET, 4) == (10 * acpi_pm.PM_TIMER_HZ) & 0xFFFFFF
    assert pm24.dev.read(0, 2) & acpi_pm.TMR_STS  # the top bit toggled meanwhile
    # real monotonic clock: it moves forward
    real = AcpiPm(lambda t: None)
    a = real.read(acpi_pm.PM_TMR_OFFSET, 4)
    b = real.read(acpi_pm.PM_TMR_OFFSET, 4)
    assert b >= a


@settings(max_examples=200, deadline=None)
@given(start=st.integers(0, 1 << 40), step=st.integers(1, 2000), reads=st.integers(2, 40),
       bits=st.sampled_from([24, 32]))
def test_pm_timer_reads_are_one_instant_and_monotonic(start, step, reads, bits):
    """Every 4-byte PM_TMR read is the counter at one instant, so a clock that moves
    between the bytes (it moves at every look here) never makes the counter jump ahead
    and back: what Linux's acpi_pm checks before using the timer."""
    clock = [start]

    def moving_clock():
        clock[0] += step
        return clock[0]

    dev = AcpiPm(lambda t: None, clock_ns=moving_clock, timer_32bit=bits == 32)
    mask = (1 << bits) - 1
    last = None
    for _ in range(reads):
        value = dev.read(acpi_pm.PM_TMR_OFFSET, 4)
        expected = (clock[0] - (start + step)) * acpi_pm.PM_TIMER_HZ // 1_000_000_000 & mask
        assert value == expected
        if last is not None:
            assert (value - last) & mask < 1 << (bits - 1), f"{last:#x} then {value:#x}"
        last = value


def test_pm_timer_clock_is_published_for_monotonic_time_only():
    import time
    real = AcpiPm(lambda t: None)
    clock = real.timer_clock
    assert clock is not None and clock.bits == 32
    now = time.monotonic_ns()
    value = real.read(acpi_pm.PM_TMR_OFFSET, 4)
    after = time.monotonic_ns()
    ticks = lambda t: (t - clock.origin_ns) * acpi_pm.PM_TIMER_HZ // 1_000_000_000 & 0xFFFFFFFF
    assert ticks(now) <= value <= ticks(after)
    assert Pm().dev.timer_clock is None      # a fake clock is not the accelerator's
    # a restore moves the origin: whoever serves the timer hears of it
    heard = []
    real.timer_clock_changed.append(heard.append)
    state = real.state()
    real.restore(type(state)(**{**state.__dict__, "timer_running_for_ns": 5_000_000_000}))
    assert len(heard) == 1 and heard[0].origin_ns < clock.origin_ns
    assert heard[0] == real.timer_clock


def test_gpe_block():
    pm = Pm()
    pm.dev.raise_gpe(3)
    pm.dev.write(acpi_pm.GPE0_OFFSET + 4, 1, 0x08)
    assert pm.levels == [True]
    assert pm.dev.read(acpi_pm.GPE0_OFFSET, 1) == 0x08
    pm.dev.write(acpi_pm.GPE0_OFFSET, 1, 0x08)
    assert pm.levels == [True, False]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(-4, 0x44), st.sampled_from([1, 2, 3, 4, 8]),
                          st.integers(0, 2**64 - 1)), max_size=40))
def test_pm_hostile_traffic(ops):
    pm = Pm()
    for is_write, off, size, value in ops:
        if is_write:
            pm.dev.write(off, size, value)
        else:
            assert 0 <= pm.dev.read(off, size) < 1 << 32
        d = pm.dev
        expected = bool(d.pm1_cnt & 1) and bool((d.pm1_sts & d.pm1_en) or (d.gpe_sts & d.gpe_en))
        assert bool(pm.levels and pm.levels[-1]) == expected
