"""The translator's exit path: one port or MMIO access comes back from C decoded
(``Cpu.run_decoded``, the vCPU loop's fast path), doorbell writes signal their eventfd
in C without an exit, interrupts still reach the CPU on time although the loop moves
them in only after exits the fast path does not serve, and every device access
reaches its device in order. Unit tests on TcgVcpu, then the test guests on a whole
translator machine."""

from __future__ import annotations

import os
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import guest_path
from support.exitloop import (attach_echo_registers, echo_writes, expected_console, printed_console, run_to_end,
                              serve_port_exits_to_hlt, tcg_machine)
from support.tcg import TcgVcpu, assemble, identity_map_2m, make_memory, regs, set_long_mode

from kvmpy.hv import exits

CODE = 0x100000
STACK = 0x80000
MMIO = 0x20000000       # identity-mapped, past the 4 MiB of RAM: every access exits


def _vcpu(src: str) -> tuple[TcgVcpu, object]:
    mem = make_memory()
    identity_map_2m(mem)
    code, _syms = assemble(src, CODE)
    mem.write(CODE, code)
    v = TcgVcpu(mem)
    set_long_mode(v)
    v.set_regs(regs(rip=CODE, rsp=STACK, rflags=2))
    return v, mem


@pytest.fixture
def vcpus():
    made = []

    def make(src: str) -> TcgVcpu:
        v, mem = _vcpu(src)
        made.append((v, mem))
        return v
    yield make
    for v, mem in made:
        v.close()
        mem.close()


def test_decoded_exits_carry_each_access_and_take_a_reads_value_back(vcpus):
    v = vcpus(f"""
        mov al, 0x42
        out 0x80, al
        in ax, 0x71
        mov r8, rax
        mov dx, 0x3f8
        lea rsi, [rip + msg]
        mov rcx, 3
        rep outsb
        mov rbx, 0x0102030405060708
        mov eax, [{MMIO}]
        mov r9, rax
        mov [{MMIO + 8}], rbx
        movdqu xmm0, [{MMIO + 16}]
        hlt
    msg: .ascii "abc"
    """)
    run, state, access, exit_kind, _ = v.decoded_exits()
    assert run(state) == exits.DECODED_PIO_WRITE and access[:3] == [0x80, 1, 0x42]
    assert run(state) == exits.DECODED_PIO_READ and access[:2] == [0x71, 2]
    access[3] = 0xBEEF
    # rep outsb is one exit for three bytes: the general way, with the exit attributes
    code = run(state)
    assert code < exits.DECODED_PIO_WRITE and exit_kind(code) == exits.EXIT_IO
    assert (v.io_port, v.io_write, v.io_count, bytes(v.io_data)) == (0x3F8, True, 3, b"abc")
    assert v.get_regs().r8 & 0xFFFF == 0xBEEF
    assert run(state) == exits.DECODED_MMIO_READ and access[:2] == [MMIO, 4]
    access[3] = 0xCAFEBABE
    assert run(state) == exits.DECODED_MMIO_WRITE and access[:3] == [MMIO + 8, 8, 0x0102030405060708]
    assert v.get_regs().r9 == 0xCAFEBABE
    # 16 bytes from a device: two 8-byte reads, each answered in turn
    assert run(state) == exits.DECODED_MMIO_READ and access[:2] == [MMIO + 16, 8]
    access[3] = int.from_bytes(bytes(range(8)), "little")
    assert run(state) == exits.DECODED_MMIO_READ and access[:2] == [MMIO + 24, 8]
    access[3] = int.from_bytes(bytes(range(8, 16)), "little")
    assert exit_kind(run(state)) == exits.EXIT_HLT
    assert v.get_xmm(0) == bytes(range(16))
    assert v.stats()["decoded_exits"] == 6


def test_doorbell_writes_signal_their_eventfd_without_an_exit(vcpus):
    v = vcpus(f"""
        mov ax, 1
        mov [{MMIO}], ax
        mov dx, 0x300
        mov ax, 7
        out dx, ax
        mov ax, 8
        out dx, ax
        mov al, 7
        out dx, al
        mov dword ptr [{MMIO}], 2
        mov dword ptr [{MMIO}], 3
        hlt
    """)
    any_write = os.eventfd(0, os.EFD_NONBLOCK)
    seven = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        v.add_doorbell(any_write, MMIO, 0, None, False)
        v.add_doorbell(seven, 0x300, 2, 7, True)
        run, state, access, exit_kind, _ = v.decoded_exits()
        # the MMIO doorbell and the matching port write never come out
        assert run(state) == exits.DECODED_PIO_WRITE and access[:3] == [0x300, 2, 8]       # no match
        assert run(state) == exits.DECODED_PIO_WRITE and access[:3] == [0x300, 1, 7]       # size differs
        assert os.eventfd_read(any_write) == 1 and os.eventfd_read(seven) == 1
        # the next MMIO writes (4 bytes: size 0 takes any) ring too, through run() alike
        assert v.run() == exits.EXIT_HLT
        assert os.eventfd_read(any_write) == 2
        with pytest.raises(BlockingIOError):
            os.eventfd_read(seven)
        assert v.stats()["doorbells_rung"] == 4
    finally:
        v.remove_doorbell(any_write)
        v.remove_doorbell(seven)
        os.close(any_write)
        os.close(seven)


def test_a_removed_doorbell_exits_again(vcpus):
    v = vcpus(f"""
        mov dword ptr [{MMIO}], 1
        mov dword ptr [{MMIO}], 2
        hlt
    """)
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        v.add_doorbell(fd, MMIO, 4, None, False)
        v.remove_doorbell(fd)
        run, state, access, _, _ = v.decoded_exits()
        assert run(state) == exits.DECODED_MMIO_WRITE and access[:3] == [MMIO, 4, 1]
        with pytest.raises(BlockingIOError):
            os.eventfd_read(fd)
    finally:
        os.close(fd)


def test_a_memory_map_change_is_applied_before_the_next_decoded_entry(vcpus):
    """Device memory mapped between two exits (a framebuffer BAR) is RAM at the next
    entry: run_decoded asks for the resync instead of running on the old map."""
    v = vcpus(f"""
        out 0x80, al
        mov eax, [{MMIO}]
        out 0x81, al
        hlt
    """)
    run, state, access, exit_kind, _ = v.decoded_exits()
    assert run(state) == exits.DECODED_PIO_WRITE and access[0] == 0x80
    frame = memoryview(bytearray(b"\x5a" * 4096))
    v.memory.map_device_region("test-frame", MMIO, frame)
    code = run(state)
    assert exit_kind(code) == exits.EXIT_INTR       # synced, nothing ran
    assert run(state) == exits.DECODED_PIO_WRITE and access[:3] == [0x81, 1, 0x5A]
    v.memory.unmap_device_region("test-frame")
    v.close()                                        # the core's export of `frame` goes first


class _Recorder:
    """The port bus as the queue sees it: every write and burst, in order."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []

    def write(self, port: int, size: int, value: int) -> None:
        self.writes.append((port, bytes([value])))

    def write_burst(self, port: int, data: bytes) -> None:
        self.writes.append((port, bytes(data)))

    def stream(self, port: int) -> bytes:
        return b"".join(d for p, d in self.writes if p == port)


def _queued(v, recorder, events, queue=None):
    from kvmpy.hv.tcg.portqueue import TcgPortWrites
    from kvmpy.hv.tcg.vcpu import new_port_queue
    queue = queue if queue is not None else new_port_queue()
    v.set_port_queue(queue)
    writes = TcgPortWrites(queue, recorder.write, recorder.write_burst, events)
    writes.set_zone(0x3F8, 1, True)
    return writes


def test_queued_byte_writes_wait_and_reach_the_bus_before_the_next_exit_is_served(vcpus):
    """THR writes do not exit; the next exit comes back flagged, and draining hands the
    bytes over, as one burst, before that exit is served. Other sizes and ports exit.
    The queue counts the writes it ever queued (the drain tick's activity count)."""
    from kvmpy.events import EventLoop
    from kvmpy.hv.tcg.vcpu import new_port_queue
    v = vcpus("""
        mov dx, 0x3f8
        mov al, 'a'
        out dx, al
        mov al, 'b'
        out dx, al
        mov al, 'c'
        out dx, al
        add dx, 5
        in al, dx
        sub dx, 5
        mov ax, 0x4444
        out dx, ax
        mov al, 'd'
        out dx, al
        hlt
    """)
    rec = _Recorder()
    queue = new_port_queue()
    writes = _queued(v, rec, EventLoop(name="never-started"), queue)
    assert queue.pushed() == 0
    run, state, access, exit_kind, _ = v.decoded_exits()
    code = run(state)
    assert code == exits.DECODED_PIO_READ + exits.DECODED_AFTER_QUEUED and access[:2] == [0x3FD, 1]
    assert rec.writes == [] and writes.pending() and queue.pushed() == 3
    writes.drain()
    assert rec.writes == [(0x3F8, b"abc")] and not writes.pending() and queue.pushed() == 3
    access[3] = 0x60
    # a two-byte write is no queued one: it exits, unflagged, and is not counted
    assert run(state) == exits.DECODED_PIO_WRITE and access[:3] == [0x3F8, 2, 0x4444]
    assert queue.pushed() == 3
    code = run(state)
    assert exit_kind(code) == exits.EXIT_HLT and writes.pending()   # the loop drains after it
    writes.drain()
    assert rec.stream(0x3F8) == b"abcd" and queue.pushed() == 4


def test_a_published_port_read_is_answered_in_the_core(vcpus):
    """A one-byte IN of a published port takes the published value and does not exit;
    a wider read of it, and any read once the value is withdrawn, exits as before."""
    from kvmpy.hv.tcg.portqueue import TcgPublishedReads
    from kvmpy.hv.tcg.vcpu import new_port_queue
    v = vcpus("""
        mov dx, 0x3fd
        in al, dx
        mov bl, al
        in ax, dx
        in al, dx
        mov cl, al
        out 0x80, al
        in al, dx
        hlt
    """)
    queue = new_port_queue()
    v.set_port_queue(queue)
    reads = TcgPublishedReads(queue)
    publish = reads.publisher(0x3FD)
    assert reads.publisher(0x3FD) is not None          # the same slot again, not a new one
    publish(0x61)
    run, state, access, exit_kind, _ = v.decoded_exits()
    assert run(state) == exits.DECODED_PIO_READ and access[:2] == [0x3FD, 2]   # the first IN stayed in
    access[3] = 0x1234
    publish(0x60)
    # the second byte IN answered in the core: the next exit is the OUT after it
    assert run(state) == exits.DECODED_PIO_WRITE and access[:3] == [0x80, 1, 0x60]
    publish(None)
    assert run(state) == exits.DECODED_PIO_READ and access[:2] == [0x3FD, 1]  # withdrawn: it exits
    access[3] = 0x99
    assert exit_kind(run(state)) == exits.EXIT_HLT
    r = v.get_regs()
    assert (r.rbx & 0xFF, r.rcx & 0xFF, r.rax & 0xFF) == (0x61, 0x60, 0x99)
    assert v.stats()["published_reads"] == 2


def test_published_slots_are_few_and_values_are_bytes():
    from kvmpy.hv.tcg.portqueue import TcgPublishedReads
    from kvmpy.hv.tcg.vcpu import new_port_queue
    queue = new_port_queue()
    reads = TcgPublishedReads(queue)
    setters = [reads.publisher(0x100 + i) for i in range(4)]
    assert all(setters) and reads.publisher(0x200) is None
    with pytest.raises(ValueError):
        queue.publish(0, 0x100)
    with pytest.raises(ValueError):
        queue.publish(7, 0)


def test_a_full_queue_makes_the_next_write_exit_in_order(vcpus):
    from kvmpy.events import EventLoop
    v = vcpus("""
        mov dx, 0x3f8
        xor ecx, ecx
    1:  mov al, cl
        out dx, al
        inc ecx
        cmp ecx, 1500
        jne 1b
        hlt
    """)
    rec = _Recorder()
    writes = _queued(v, rec, EventLoop(name="never-started"))
    served = []

    def exited(port: int, size: int, value: int) -> None:
        rec.write(port, size, value)
        served.append(value)
    serve_port_exits_to_hlt(v, writes, exited)
    assert rec.stream(0x3F8) == bytes(i & 0xFF for i in range(1500))
    assert 0 < len(served) < 10, "only a write finding the queue full exits"


def test_queued_writes_of_a_guest_that_makes_no_exit_reach_the_bus_by_the_tick(vcpus):
    """A guest that writes and then spins with interrupts off never exits: the event
    loop's tick hands its bytes over within about DRAIN_INTERVAL."""
    import threading
    from kvmpy.events import EventLoop
    v = vcpus("""
        mov dx, 0x3f8
        mov al, 'o'
        out dx, al
        mov al, 'k'
        out dx, al
    2:  jmp 2b
    """)
    rec = _Recorder()
    events = EventLoop(name="test-tick")
    events.start()
    writes = _queued(v, rec, events)
    runner = threading.Thread(target=v.run, daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + 5
        while rec.stream(0x3F8) != b"ok" and time.monotonic() < deadline:
            time.sleep(0.005)
        assert rec.stream(0x3F8) == b"ok"
    finally:
        v.kick()
        runner.join(5)
        writes.close()
        events.close()


WRITES = st.lists(st.tuples(st.sampled_from([0x3F8, 0x70, 0x80]), st.integers(0, 255),
                            st.sampled_from(["out", "in", "spin"])), min_size=1, max_size=700)


@settings(max_examples=100 if os.environ.get("KVMPY_FUZZ") else 12, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(WRITES)
def test_queued_and_exiting_writes_reach_the_bus_in_program_order(program):
    """Writes to queued ports (THR, the RTC index), to a port that exits (0x80), reads
    and stretches without exits, in any order and past the queue's size: the bus sees
    every write once, in the order the guest made them, when each exit is served."""
    from kvmpy.events import EventLoop
    lines = []
    for port, value, then in program:
        lines += [f"mov dx, {port}", f"mov al, {value}", "out dx, al"]
        if then == "in":
            lines += ["mov dx, 0x3fd", "in al, dx"]
        elif then == "spin":
            lines += ["mov ecx, 20", "3: loop 3b"]
    v, mem = _vcpu("\n".join(lines + ["hlt"]))
    rec = _Recorder()
    try:
        writes = _queued(v, rec, EventLoop(name="never-started"))
        writes.set_zone(0x70, 1, True)
        serve_port_exits_to_hlt(v, writes, rec.write, read=lambda port, size: 0x60)
        seen = [(port, value) for port, data in rec.writes for value in data]
        assert seen == [(port, value) for port, value, _ in program]
    finally:
        v.close()
        mem.close()


def test_divisor_writes_through_the_queue_reach_the_uart_as_divisor():
    """With DLAB set, offset 0 is the divisor's low byte: a queued write there is handed
    to the UART before the exit that clears DLAB is served, so it lands as the divisor."""
    from kvmpy.devices.bus import Bus
    from kvmpy.devices.serial import Serial16550
    from kvmpy.events import EventLoop
    from kvmpy.hv.tcg.portqueue import TcgPortWrites
    from kvmpy.hv.tcg.vcpu import new_port_queue
    v, mem = _vcpu("""
        mov dx, 0x3fb
        mov al, 0x80
        out dx, al
        mov dx, 0x3f8
        mov al, 0x03
        out dx, al
        mov dx, 0x3fb
        mov al, 0x03
        out dx, al
        mov dx, 0x3f8
        mov al, 'x'
        out dx, al
        hlt
    """)
    out = bytearray()
    bus = Bus("pio")
    uart = Serial16550(irq=lambda level: None, out=out.extend)
    bus.register(0x3F8, 8, uart)
    queue = new_port_queue()
    v.set_port_queue(queue)
    writes = TcgPortWrites(queue, bus.write, bus.write_burst, EventLoop(name="never-started"))
    writes.set_zone(0x3F8, 1, True)
    try:
        serve_port_exits_to_hlt(v, writes, bus.write)
        assert (uart.dll, uart.lcr, bytes(out)) == (3, 3, b"x")
    finally:
        v.close()
        mem.close()


# ---- whole machines -------------------------------------------------------------------------


def _decoded(m) -> int:
    return sum(v.stats()["decoded_exits"] for v in m.vcpus)


@pytest.mark.guest
@pytest.mark.parametrize("fast_path", [True, False], ids=["decoded", "general"])
def test_claimed_accesses_of_every_size_reach_their_device_in_order(fast_path):
    rounds = 300
    m, con = tcg_machine(guest_path("exitstorm"), f"echo={rounds} port=0x300 mmioecho=0xfeb20000")
    port_dev, mmio_dev = attach_echo_registers(m)
    if not fast_path:
        for v in m.vcpus:
            v.decoded_exits = lambda: None          # what the loop sees under --trace
    run_to_end(m)
    out = con.text()
    assert f"echo: {rounds} rounds, 0 wrong answers" in out, out
    port_expected, mmio_expected = echo_writes(rounds)
    assert port_dev.writes == port_expected and mmio_dev.writes == mmio_expected
    assert port_dev.reads == 3 * rounds + 16 and mmio_dev.reads == 4 * rounds
    if fast_path:
        assert _decoded(m) >= 14 * rounds           # the rep string I/O went the general way
    else:
        assert _decoded(m) == 0


@pytest.mark.guest
def test_console_output_polled_byte_by_byte_is_complete_and_in_order():
    n = 3000
    m, con = tcg_machine(guest_path("exitloop"), f"n=0 console={n}")
    run_to_end(m)
    out = con.text()
    assert f"exitloop: console {n} in " in out, out[-300:]
    assert printed_console(out) == expected_console(n)
    # The UART publishes LSR, so the cores answer each poll; the THR writes wait in
    # their queue for the drain tick or a full queue: few exits, not one per byte.
    assert _decoded(m) < n // 4, _decoded(m)
    assert sum(v.stats()["published_reads"] for v in m.vcpus) >= n


@pytest.mark.guest
@pytest.mark.parametrize("txloop", [1, 0])
def test_thre_interrupts_raised_on_the_fast_path_are_delivered(txloop):
    """The THR write that raises THRE's interrupt comes back decoded; the interrupt
    must still reach the CPU (the kick makes the next entry an EXIT_INTR), or the
    interrupt-driven transmit stalls after its first 16 bytes."""
    lines = 40
    m, con = tcg_machine(guest_path("irq"), f"tx={lines} txloop={txloop}")
    t = time.monotonic()
    run_to_end(m, timeout=60)
    out = con.text()
    sent = [line for line in out.splitlines() if line.startswith("tx ")]
    assert sent == [f"tx {i:04d} abcdefghijklmnopqrstuvwxyz" for i in range(lines)], out[-500:]
    assert re.search(rf"irq: tx {lines * 36} bytes in \d+ interrupts", out), out[-300:]
    assert time.monotonic() - t < 30
    if txloop:
        # the handler's 16 THR writes wait in the queue and reach the UART, and the
        # console, as one burst when it reads IIR again
        assert con.writes < lines * 36 // 4, con.writes


@pytest.mark.guest
def test_cmos_index_writes_are_queued_and_reach_the_rtc_in_order():
    rounds = 1000
    m, con = tcg_machine(guest_path("exitstorm"), f"cmos={rounds}")
    run_to_end(m)
    assert f"cmos: above 16M 768 x 64K, 0 of {rounds} NVRAM read-backs wrong" in con.text(), con.text()
    # 3 queued index writes and 4 data accesses a round: 4 exits, not 7
    assert 4 * rounds <= _decoded(m) < 5 * rounds, _decoded(m)


@pytest.mark.guest
def test_timer_interrupts_still_arrive_on_time():
    """PIT ticks at 100 Hz: ten of them in about 0.1 s, whichever path the exits take."""
    m, con = tcg_machine(guest_path("irq"), "pit=1")
    t = time.monotonic()
    run_to_end(m, timeout=30)
    elapsed = time.monotonic() - t
    assert "pit ticks: 10" in con.text(), con.text()
    assert elapsed < 5, elapsed


@pytest.mark.guest
def test_virtio_queue_notifies_ring_in_the_core(tmp_path):
    """virtio-blk's queue notify is a doorbell: the C core signals its eventfd and the
    request completes, with no exit to the loop for it."""
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(4 << 20))
    from kvmpy.config import DiskConfig
    m, con = tcg_machine(guest_path("virtio_blk"), "sector=2048 bytes=32768",
                         disks=[DiskConfig(path=str(img), format="raw")])
    assert run_to_end(m, timeout=120) == 0, con.text()[-1000:]
    assert "virtio-blk: pattern ok" in con.text(), con.text()[-1000:]
    assert sum(v.stats()["doorbells_rung"] for v in m.vcpus) > 0
