"""The KVM vCPU loop in C (kvmpy_run_loop): accesses no device claims are answered
there, the rest reach their device in order, and the map it answers from follows the
buses as the guest and the machine change them. Real /dev/kvm, the test guests."""

from __future__ import annotations

import logging
import re
import threading
import time

import pytest

from conftest import guest_path, run_kvmpy
from support.exitloop import (EchoRegister, RecordingPorts, attach_echo_registers, echo_writes, expected_console,
                              kvm_machine, loop_totals, printed_console, run_to_end, wait_until)

pytestmark = [pytest.mark.usefixtures("kvm_required"), pytest.mark.guest]

STORM = "n=1000000000000 port=0x300"      # exitloop.elf writing port 0x300 for good


def _unclaimed_records(caplog, what: str, addr: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == "kvmpy.devices.bus" and r.getMessage().endswith(f"unclaimed {what} at {addr:#x}")]


def test_unclaimed_accesses_are_answered_in_the_loop(caplog):
    caplog.set_level(logging.DEBUG, logger="kvmpy.devices.bus")
    m, con = kvm_machine(guest_path("exitloop"), "n=5000 mmio=5000 port=0x300")
    assert m.pio_bus.find(0x300) is None and m.mmio_bus.find(0xFEBFF000) is None
    run_to_end(m)
    out = con.text()
    assert "guest: done" in out, out
    # Every read was all ones, as the bus answers: 5000 x 0xffffffff, modulo 2**32.
    assert f"(sink {(-5000) % 2**32})" in out
    st = loop_totals(m)
    # The first access to each address went to the bus, which logged it; the rest never left C.
    assert st["pio_served"] >= 4999 and st["mmio_served"] >= 4999, st
    assert st["returned"] < 1000, st
    assert len(_unclaimed_records(caplog, "write", 0x300)) == 1
    assert len(_unclaimed_records(caplog, "read", 0xFEBFF000)) == 1


def test_a_claimed_port_sees_every_access_in_order():
    m, con = kvm_machine(guest_path("exitloop"), "n=3000 port=0x300")
    recorder = RecordingPorts()
    # Placed after the accelerator exists: only the bus's listener can tell the C map.
    m.pio_bus.register(0x300, 1, recorder)
    run_to_end(m)
    assert "guest: done" in con.text()
    assert recorder.writes == [(0, 1, i & 0xFF) for i in range(3000)]
    assert loop_totals(m)["pio_served"] < 100       # the guest's few other unclaimed ports


def test_claimed_accesses_are_served_without_returning_to_the_python_loop(monkeypatch):
    """A storm of claimed port writes and MMIO reads is served by the C loop
    (kvmpy.vcpu._claimed): Python's loop sees a handful of its returns, the devices
    every access."""
    from kvmpy.vcpu import _claimed, runner
    returns: list[int] = []

    class Counting:
        def __getattr__(self, name):
            return getattr(_claimed, name)

        @staticmethod
        def serve(*args):
            code = _claimed.serve(*args)
            returns.append(code)
            return code

    monkeypatch.setattr(runner, "_claimed", Counting())
    m, con = kvm_machine(guest_path("exitloop"), "n=3000 port=0x300 mmio=2000 testdev=1", pci_testdev=True)
    recorder = RecordingPorts()
    m.pio_bus.register(0x300, 1, recorder)
    run_to_end(m)
    assert "exitloop: pio 3000" in con.text() and "mmio 2000" in con.text(), con.text()
    assert recorder.writes == [(0, 1, i & 0xFF) for i in range(3000)]
    assert loop_totals(m)["decoded"] >= 5000
    # The first access to each address (its accessor not yet known), the console's
    # queued writes, the PCI probe, the guest's end: nowhere near the 5000 accesses.
    assert 0 < len(returns) < 300, len(returns)


@pytest.mark.parametrize("fast_path", [True, False], ids=["decoded", "general"])
def test_claimed_port_and_mmio_accesses_of_every_size_reach_their_device(fast_path):
    """Every write in order with its size and value, every read answered with the
    device's value, through the decoded fast path and through the general one (what
    the tracer and the profiler use), with rep string I/O among them."""
    rounds = 500
    m, con = kvm_machine(guest_path("exitstorm"), f"echo={rounds} port=0x300 mmioecho=0xfeb20000")
    port_dev, mmio_dev = attach_echo_registers(m)
    if not fast_path:
        for v in m.vcpus:
            v.report_every_exit = True
    run_to_end(m)
    out = con.text()
    assert f"echo: {rounds} rounds, 0 wrong answers" in out, out
    port_expected, mmio_expected = echo_writes(rounds)
    assert port_dev.writes == port_expected and mmio_dev.writes == mmio_expected
    assert port_dev.reads == 3 * rounds + 16 and mmio_dev.reads == 4 * rounds
    decoded = loop_totals(m)["decoded"]
    if fast_path:
        assert decoded >= 14 * rounds, decoded      # the rep string I/O went the general way
    else:
        assert decoded == 0


@pytest.mark.parametrize("claimed", [True, False], ids=["claimed", "unclaimed"])
def test_a_published_answer_serves_one_byte_reads_of_a_claimed_port_only(claimed):
    """The C loop answers a port's published value to single one-byte reads of it while
    a device claims the port; wider and string reads still reach the device, and a
    cell left behind at a port no device claims answers nothing."""
    rounds = 300
    m, con = kvm_machine(guest_path("exitstorm"), f"echo={rounds} port=0x300 mmioecho=0xfeb20000")
    port_dev, _ = attach_echo_registers(m)
    if not claimed:
        m.pio_bus.unregister(0x300)
    publish = m.accel.published_port_reads.publisher(0x300)
    assert publish is not None
    publish(0x5A)
    run_to_end(m)
    assert f"echo: {rounds} rounds" in con.text(), con.text()[-300:]
    st = loop_totals(m)
    # The UART's LSR is published too: the guest polls it once before each byte it prints.
    lsr_polls = con.byte_count()
    if claimed:
        assert st["published_served"] == rounds + lsr_polls, st
        assert port_dev.reads == 2 * rounds + 16          # inw, inl, and the rep insb's 16
    else:
        assert st["published_served"] == lsr_polls, st
        assert port_dev.reads == 0


def test_a_device_error_on_the_fast_path_is_logged_and_the_read_floats(caplog):
    """A device that raises: one logged error per access (up to the cap), reads
    answered all ones, and the guest runs on."""

    class Broken:
        def read(self, offset: int, size: int) -> int:
            raise ValueError("broken read")

        def write(self, offset: int, size: int, value: int) -> None:
            raise ValueError("broken write")

    m, con = kvm_machine(guest_path("exitstorm"), "echo=5 port=0x300 mmioecho=0xfeb20000")
    m.pio_bus.register(0x300, 1, Broken())
    m.mmio_bus.register(0xFEB20000, 8, Broken())
    caplog.set_level(logging.ERROR, logger="kvmpy.vcpu.runner")
    run_to_end(m)
    # Every read of the 5 rounds floated (all ones), and so did the 16 of rep insb.
    assert "echo: 5 rounds, 51 wrong answers" in con.text(), con.text()
    errors = [r.getMessage() for r in caplog.records if r.name == "kvmpy.vcpu.runner"]
    assert len(errors) == 20 and all("ValueError: broken" in e for e in errors), errors[:3]
    assert any("port 0x300" in e for e in errors) and any("MMIO 0xfeb20000" in e for e in errors)


def test_a_bar_the_guest_moves_is_seen_by_the_loop_at_once():
    m, con = kvm_machine(guest_path("exitstorm"), "barmove=1 reads=1000 newio=0xff00 newmem=0xfeb00000",
                         pci_testdev=True)
    assert m.pio_bus.find(0xFF01) is None and m.mmio_bus.find(0xFEB00001) is None
    run_to_end(m)
    out = con.text()
    assert "guest: done" in out, out
    lines = [line for line in out.splitlines() if line.startswith("barmove:")]
    assert len(lines) == 4, out
    # Header byte 1 is test 0's width (1, 2 or 4) where the device answers, 0xff where nothing does.
    before, moved, storm, back = lines
    width = "0[124]"
    assert re.fullmatch(rf"barmove: io \S+ mem \S+ before: io {width} mem {width}", before), before
    assert re.fullmatch(rf"barmove: moved: old io ff mem ff, new io {width} mem {width}", moved), moved
    assert storm == "barmove: 2000 of 2000 reads at the old places were all ones"
    assert re.fullmatch(rf"barmove: back: io {width} mem {width}, new places io ff mem ff", back), back
    st = loop_totals(m)
    # The storm at the old places after the move was answered in C, from the new map.
    assert st["pio_served"] >= 999 and st["mmio_served"] >= 999, st


def test_registering_and_unregistering_during_a_storm():
    m, con = kvm_machine(guest_path("exitloop"), STORM)
    done = threading.Thread(target=m.wait, daemon=True)
    try:
        m.start()
        done.start()
        wait_until(lambda: loop_totals(m)["pio_served"] > 2000, what="the storm in C")
        recorder = RecordingPorts()
        m.pio_bus.register(0x300, 1, recorder)
        wait_until(lambda: len(recorder.writes) > 500, what="the device to see the storm")
        m.pio_bus.unregister(0x300)
        seen = list(recorder.writes)
        values = [v for _, _, v in seen]
        # In order, none lost while the device held the port.
        assert all((b - a) & 0xFF == 1 for a, b in zip(values, values[1:])), values[:20]
        served = loop_totals(m)["pio_served"]
        wait_until(lambda: loop_totals(m)["pio_served"] > served + 2000, what="the storm back in C")
        assert len(recorder.writes) <= len(seen) + 1      # at most the write that raced the unregister
    finally:
        m.quit()
        done.join(15)
    assert not done.is_alive()


def test_pause_cont_reset_and_quit_during_a_storm():
    m, con = kvm_machine(guest_path("exitloop"), STORM)
    events: list[str] = []
    m.add_event_listener(lambda name, data: events.append(name))
    done = threading.Thread(target=m.wait, daemon=True)
    try:
        m.start()
        done.start()
        wait_until(lambda: loop_totals(m)["pio_served"] > 2000, what="the storm in C")
        t = time.monotonic()
        m.pause()
        assert time.monotonic() - t < 5 and m.status() == "paused"
        held = loop_totals(m)["pio_served"]
        time.sleep(0.3)
        assert loop_totals(m)["pio_served"] == held            # nobody is in the guest
        m.resume()
        wait_until(lambda: loop_totals(m)["pio_served"] > held + 2000, what="the storm after cont")
        m.reset()
        wait_until(lambda: "RESET" in events, what="the reset")
        after_reset = loop_totals(m)["pio_served"]
        wait_until(lambda: loop_totals(m)["pio_served"] > after_reset + 2000, what="the storm after reset")
    finally:
        t = time.monotonic()
        m.quit()
        done.join(15)
    assert not done.is_alive() and time.monotonic() - t < 10


def test_pause_cont_reset_and_quit_during_a_claimed_storm():
    """Decoded reads and writes to claimed registers while the machine pauses, resumes
    and resets: none lost, none repeated, every read answered (the guest checks them)."""
    rounds = 8000       # long enough that the reset comes mid-run even where exits are cheap
    m, con = kvm_machine(guest_path("exitstorm"), f"echo={rounds} port=0x300 mmioecho=0xfeb20000")
    port_dev, mmio_dev = attach_echo_registers(m)
    events: list[str] = []
    m.add_event_listener(lambda name, data: events.append(name))
    done = threading.Thread(target=m.wait, daemon=True)
    port_expected, mmio_expected = echo_writes(rounds)
    try:
        m.start()
        done.start()
        wait_until(lambda: len(port_dev.writes) > 600, what="the claimed storm")
        m.pause()
        assert m.status() == "paused"
        held = len(port_dev.writes), len(mmio_dev.writes)
        time.sleep(0.3)
        assert (len(port_dev.writes), len(mmio_dev.writes)) == held
        m.resume()
        wait_until(lambda: len(port_dev.writes) > held[0] + 600, what="the storm after cont")
        m.reset()
        wait_until(lambda: "RESET" in events, what="the reset")
        wait_until(lambda: "wrong answers" in con.text(), timeout=120, what="the guest's second run")
    finally:
        m.quit()
        done.join(15)
    assert not done.is_alive()
    assert f"echo: {rounds} rounds, 0 wrong answers" in con.text(), con.text()[-300:]
    # The run the reset cut short, then the whole run after it; the device's own
    # writes are all in sequence, none lost or repeated across the pause.
    for writes, expected in ((port_dev.writes, port_expected), (mmio_dev.writes, mmio_expected)):
        assert writes[-len(expected):] == expected
        cut_short = writes[:-len(expected)]
        assert 0 < len(cut_short) < len(expected), "the guest finished before the reset"
        assert cut_short == expected[:len(cut_short)]


def test_quit_during_a_claimed_storm():
    m, con = kvm_machine(guest_path("exitstorm"), "echo=1000000000 port=0x300 mmioecho=0xfeb20000")
    port_dev = EchoRegister()
    m.pio_bus.register(0x300, 1, port_dev)
    m.mmio_bus.register(0xFEB20000, 8, EchoRegister())
    done = threading.Thread(target=m.wait, daemon=True)
    m.start()
    done.start()
    wait_until(lambda: len(port_dev.writes) > 300, what="the claimed storm")
    t = time.monotonic()
    m.quit()
    done.join(15)
    assert not done.is_alive() and time.monotonic() - t < 10
    seen = len(port_dev.writes)
    time.sleep(0.2)
    assert len(port_dev.writes) == seen


def test_a_guest_probing_every_address_floods_no_log(caplog):
    caplog.set_level(logging.DEBUG, logger="kvmpy.devices.bus")
    m, con = kvm_machine(guest_path("exitstorm"), "sweep=3000")
    assert all(m.pio_bus.find(0x2000 + i) is None for i in range(3000))
    assert all(m.mmio_bus.find(0xFEB10000 + 4 * i) is None for i in range(3000))
    t = time.monotonic()
    run_to_end(m)
    assert "sweep: 6000 of 6000 reads were all ones" in con.text(), con.text()
    records = [r for r in caplog.records if r.name == "kvmpy.devices.bus"]
    assert len(records) <= 2 * 256                     # each bus logs 256 addresses at most
    st = loop_totals(m)
    # Past the first 256 new addresses per bus, even new ones stay in C.
    assert st["pio_served"] >= 2 * 3000 - 256 and st["mmio_served"] >= 3000 - 256, st
    assert time.monotonic() - t < 60


def test_cmos_index_writes_are_queued_and_reach_the_rtc_in_order():
    rounds = 1000
    m, con = kvm_machine(guest_path("exitstorm"), f"cmos={rounds}")
    run_to_end(m)
    # 64 MiB: 48 MiB above 16 MiB in 64 KiB units, as QEMU's CMOS says it.
    assert f"cmos: above 16M 768 x 64K, 0 of {rounds} NVRAM read-backs wrong" in con.text(), con.text()
    # Each round makes 3 index writes (queued: no exit) and 4 data accesses (exits);
    # unqueued it would be 7 exits a round.
    returned = loop_totals(m)["returned"]
    assert 4 * rounds <= returned < 5 * rounds, returned


@pytest.mark.parametrize("txloop", [1, 0])
def test_interrupt_driven_transmit_keeps_every_byte_in_order(txloop):
    """THR writes are queued under IER.THRI too. A handler that reads IIR again (Linux's)
    hands them over at once; one that leaves and halts gets its next THRE interrupt
    from the ring's drain timer: slower, never stuck."""
    lines = 40
    m, con = kvm_machine(guest_path("irq"), f"tx={lines} txloop={txloop}")
    t = time.monotonic()
    run_to_end(m)
    out = con.text()
    sent = [line for line in out.splitlines() if line.startswith("tx ")]
    assert sent == [f"tx {i:04d} abcdefghijklmnopqrstuvwxyz" for i in range(lines)], out[-500:]
    assert re.search(rf"irq: tx {lines * 36} bytes in \d+ interrupts", out), out[-300:]
    if txloop:
        # Sixteen bytes per IIR read: far fewer exits than bytes, and the drain hands
        # each interrupt's bytes to the console as one burst.
        assert loop_totals(m)["returned"] < lines * 36 // 2
        assert con.writes < lines * 36 // 4, con.writes
    else:
        assert time.monotonic() - t < 30


def test_the_exits_trace_still_shows_every_unclaimed_access():
    p = run_kvmpy(["run", "--enable-kvm", "-m", "64", "--trace", "exits", "--kernel", guest_path("exitloop"),
                   "--append", "n=50 mmio=30 port=0x300"])
    assert p.returncode == 0, p.stderr.decode()[-500:]
    err = p.stderr.decode()
    assert err.count("io out port=0x0300 size=1") == 50
    assert err.count("mmio read addr=0xfebff000 size=4 value=0xffffffff") == 30


def test_console_polling_between_queued_writes_stays_in_c():
    """Linux's console: LSR polled before each THR write, the THR write queued in KVM's
    coalesced ring. The UART publishes LSR, so the C loop answers each poll; Python
    sees only the write that finds the ring full (and drains it), and the output is
    every byte in order."""
    n = 3000
    m, con = kvm_machine(guest_path("exitloop"), f"n=0 console={n}")
    run_to_end(m)
    out = con.text()
    assert f"exitloop: console {n} in " in out, out[-300:]
    assert printed_console(out) == expected_console(n)
    st = loop_totals(m)
    assert st["published_served"] >= n, st
    # The ring holds well over 100 writes: a return per ring-full, not per byte.
    assert st["returned"] < n // 20, st


def test_console_polling_reaches_python_where_every_exit_is_reported():
    """The exits trace must see each LSR poll: published answers are the C loop's,
    and it answers nothing while every exit is reported."""
    n = 200
    m, con = kvm_machine(guest_path("exitloop"), f"n=0 console={n}")
    for v in m.vcpus:
        v.report_every_exit = True
    run_to_end(m)
    assert printed_console(con.text()) == expected_console(n)
    st = loop_totals(m)
    assert st["published_served"] == 0 and st["returned"] >= n, st


def test_a_queued_write_after_which_the_guest_makes_no_exit_reaches_the_console():
    """The guest's last byte (the line's newline) is a queued THR write, and then it
    spins with no exit: only the ring's watcher thread can get that byte out, and it
    wakes the event loop for it, not on every look at the ring."""
    m, con = kvm_machine(guest_path("exitloop"), "n=0 spin=1")
    try:
        m.start()
        wait_until(lambda: re.search(r"\(sink 0\)\r?\n", con.text()), timeout=30,
                   what="the newline queued before the spin")
        looks, wakes = m.accel.port_write_queue.watch_counts()
        # At least the newline's; a look may also have caught an earlier byte between
        # its THR write and the next LSR poll's exit.
        assert 1 <= wakes <= looks, (looks, wakes)
        # The ring is empty from now on: the watcher keeps looking and wakes no one.
        wait_until(lambda: m.accel.port_write_queue.watch_counts()[0] >= looks + 5, timeout=30,
                   what="the watcher's next looks")
        assert m.accel.port_write_queue.watch_counts()[1] == wakes
    finally:
        m.quit()
        m.wait()


def test_the_c_loop_and_python_agree_on_the_decoded_codes():
    from kvmpy.hv import exits
    from kvmpy.hv.kvm._kvm_cffi import lib
    assert (lib.KVMPY_DECODED_PIO_WRITE, lib.KVMPY_DECODED_PIO_READ, lib.KVMPY_DECODED_MMIO_WRITE,
            lib.KVMPY_DECODED_MMIO_READ, lib.KVMPY_DECODED_AFTER_QUEUED) == (
            exits.DECODED_PIO_WRITE, exits.DECODED_PIO_READ, exits.DECODED_MMIO_WRITE,
            exits.DECODED_MMIO_READ, exits.DECODED_AFTER_QUEUED)
    # The flagged codes sit above every plain one, and below nothing a KVM exit reason is.
    assert exits.DECODED_AFTER_QUEUED > exits.DECODED_MMIO_READ
