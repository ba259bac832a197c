"""`--trace profile`: the breakdown of a run printed at exit (kvmpy.vcpu.profile)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, strategies as st

from conftest import KVM_SKIP_REASON, guest_path, run_kvmpy
from kvmpy.devices.bus import Bus
from kvmpy.vcpu.profile import BootProfile
from kvmpy.vcpu.trace import parse_trace


def test_hello_under_the_translator_prints_the_breakdown():
    p = run_kvmpy(["run", "--accel", "tcg", "-m", "128", "--trace", "profile", "--kernel", guest_path("hello")])
    err = p.stderr.decode()
    assert p.returncode == 0, err[-2000:]
    assert b"Hello from kvmpy test guest" in p.stdout
    m = re.search(r"kvmpy profile: ([\d.]+) s wall, 1 vCPU", err)
    assert m, err
    wall = float(m.group(1))
    first = re.search(r"first serial byte\s+([\d.]+) s", err)
    assert first and 0 < float(first.group(1)) <= wall, err
    insns = re.search(r"guest instructions (\d+)", err)
    assert insns and int(insns.group(1)) > 1000, err
    assert re.search(r"translation\s+\d+ blocks", err), err
    assert re.search(r"slow memory paths\s+\d+", err), err
    assert re.search(r"HLT idle\s+[\d.]+ s", err), err
    # every byte the guest printed went out through COM1: one exit each at least
    com1 = re.search(r"^\s+[\d.]+ s\s+(\d+)\s+[\d.]+ us each  pio 0x3f8 Serial16550$", err, re.M)
    assert com1, err
    assert int(com1.group(1)) >= len(p.stdout.strip())
    # and they took the loop's decoded fast path, which the profile times too
    decoded = re.search(r"exits returned decoded \(the loop's fast path\) (\d+)", err)
    assert decoded and int(decoded.group(1)) >= len(p.stdout.strip()), err


def test_hello_under_kvm_has_the_breakdown_without_translator_counters():
    """KVM's declared profiling members are the translator's absent ones: no counters
    (stats() None), no RIP samples (can_sample_rip False), set_profiling a no-op; the
    breakdown of run time and exits is the same."""
    if KVM_SKIP_REASON:
        pytest.skip(KVM_SKIP_REASON)
    p = run_kvmpy(["run", "--accel", "kvm", "-m", "128", "--trace", "profile", "--kernel", guest_path("hello")])
    err = p.stderr.decode()
    assert p.returncode == 0, err[-2000:]
    assert re.search(r"kvmpy profile: [\d.]+ s wall, 1 vCPU", err), err
    assert re.search(r"in the CPU \(run\)\s+[\d.]+ s over [1-9]\d* entries", err), err
    assert re.search(r"^\s+[\d.]+ s\s+\d+\s+[\d.]+ us each  pio 0x3f8 Serial16550$", err, re.M), err
    assert "guest instructions" not in err and "guest RIP samples" not in err, err
    assert "Traceback" not in err


def test_profile_is_a_trace_item():
    assert parse_trace("exits,profile", "--trace") == ["exits", "profile"]


@given(st.integers(0, 40), st.sampled_from([b"Run /init as init process\r\n", b"kvmpy guest: init 6.1\n"]),
       st.binary(max_size=30).filter(lambda b: b"init" not in b))
def test_init_is_found_across_split_writes(split, marker, before):
    """The console arrives one byte (or a few) per exit: a marker split anywhere is seen once."""
    prof = BootProfile(Bus("pio"), Bus("mmio"))
    text = before + marker
    split = min(split, len(text))
    prof.serial_bytes(text[:split])
    if split < len(before) + len(b"Run /init" if marker.startswith(b"Run") else b"kvmpy guest: init"):
        assert prof.init_seen is None
    prof.serial_bytes(text[split:])
    assert prof.init_seen is not None
    assert prof.first_serial is not None and prof.first_serial <= prof.init_seen
