"""The native data plane's ring walker against queue.py's, on random descriptor tables.

Both walk the same bytes in the same GuestMemory: SplitQueue._read_chain (what the
Python model trusts) and dp_walk_chain in c_ext/dataplane/vring.c (the function
the data plane threads call, through its test entry point), as built into the
blk plane's module and into the net plane's. They must accept the same chains with
the same buffers, and refuse the same ones.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kvmpy.devices.virtio import dataplane, netplane
from kvmpy.devices.virtio.queue import QueueError, SplitQueue
from kvmpy.memory import GuestMemory

pytestmark = pytest.mark.skipif(not dataplane.available(),
                                reason=f"native data plane not built: {dataplane.unavailable_reason()}")

# Two RAM regions with a hole between them, so "inside one region" has both edges.
LOW, LOW_SIZE = 0x0, 0x20000
HIGH, HIGH_SIZE = 0x40000, 0x10000
DESC = 0x1000           # the queue's descriptor table
AVAIL, USED = 0x8000, 0x9000
TABLES = 0x10000        # indirect tables
BUFFERS = 0x18000

FUZZ = int(os.environ.get("KVMPY_FUZZ", "0") or 0)

# Addresses around every edge: inside, straddling a region's end, in the hole, beyond.
ADDRS = st.one_of(
    st.sampled_from([BUFFERS, BUFFERS + 0x100, LOW_SIZE - 0x10, LOW_SIZE - 1, LOW_SIZE, 0x30000,
                     HIGH, HIGH + HIGH_SIZE - 8, HIGH + HIGH_SIZE, 2**64 - 16, 2**63]),
    st.integers(0, HIGH + HIGH_SIZE + 0x1000), st.integers(0, 2**64 - 1))
LENS = st.one_of(st.sampled_from([0, 1, 8, 16, 512, 0x800, 0x10000, 0xFFFFFFFF]), st.integers(0, 0x2000))


def descriptor(table_len: int, indirect_tables: list[tuple[int, int]]):
    flags = st.integers(0, 7) | st.integers(0, 0xFFFF)
    nxt = st.integers(0, table_len + 2) | st.integers(0, 0xFFFF)
    plain = st.tuples(ADDRS, LENS, flags, nxt)
    if not indirect_tables:
        return plain
    # point at one of the indirect tables written below, with its length or a bad one
    to_table = st.builds(lambda t, dl, f, n: (t[0], t[1] * 16 + dl, 4 | f, n),
                         st.sampled_from(indirect_tables), st.sampled_from([0, 0, 0, 1, 8, -16]),
                         st.sampled_from([0, 1, 2, 3]), nxt)
    return st.one_of(plain, to_table)


def python_walk(memory: GuestMemory, size: int, indirect: bool, head: int):
    q = SplitQueue(memory, max_size=32)
    q.size, q.desc_addr, q.avail_addr, q.used_addr = size, DESC, AVAIL, USED
    q.activate(indirect=indirect)
    try:
        chain = q._read_chain(head)
    except QueueError:
        return None
    out = []
    for views, writable in ((chain.readable, False), (chain.writable, True)):
        for v in views:
            out.append((gpa_of(memory, v), len(v), writable))
    return out


def gpa_of(memory: GuestMemory, view: memoryview) -> int:
    ffi = dataplane.ffi
    buf = ffi.from_buffer(view)
    addr = int(ffi.cast("uintptr_t", buf))
    ffi.release(buf)
    for r in memory.regions:
        rbuf = ffi.from_buffer(r.view)
        start = int(ffi.cast("uintptr_t", rbuf))
        ffi.release(rbuf)
        if start <= addr < start + r.size:
            return r.gpa + addr - start
    raise AssertionError("a view outside guest RAM")


@pytest.fixture(scope="module")
def memory():
    m = GuestMemory.anonymous([(LOW, LOW_SIZE), (HIGH, HIGH_SIZE)])
    yield m


@settings(max_examples=300 * (10 if FUZZ else 1), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data(), size=st.sampled_from([1, 2, 4, 8, 16, 32]), indirect=st.booleans(),
       table_lens=st.lists(st.integers(1, 12), max_size=2))
@example(data=None, size=4, indirect=True, table_lens=[3])   # see the explicit chain below
def test_native_walker_agrees_with_split_queue(memory, data, size, indirect, table_lens):
    tables = [(TABLES + 0x400 * i, n) for i, n in enumerate(table_lens)]
    if data is None:
        # readable header, indirect table of three (readable, writable, writable): the common case
        descs = [(TABLES, 3 * 16, 4, 0)] + [(0, 0, 0, 0)] * (size - 1)
        indirect_descs = [[(BUFFERS, 16, 1, 1), (BUFFERS + 0x100, 512, 3, 2), (BUFFERS + 0x400, 1, 2, 0)]]
        head = 0
    else:
        descs = [data.draw(descriptor(size, tables)) for _ in range(size)]
        indirect_descs = [[data.draw(descriptor(n, [])) for _ in range(n)] for _, n in tables]
        head = data.draw(st.integers(0, size - 1) | st.integers(0, 0xFFFF))
    region = memory.view(0, LOW_SIZE)
    region[:] = bytes(LOW_SIZE)
    for i, d in enumerate(descs):
        memory.write(DESC + 16 * i, struct.pack("<QIHH", d[0], d[1] & 0xFFFFFFFF, d[2] & 0xFFFF, d[3] & 0xFFFF))
    for (addr, _), entries in zip(tables, indirect_descs):
        for i, d in enumerate(entries):
            memory.write(addr + 16 * i, struct.pack("<QIHH", d[0], d[1] & 0xFFFFFFFF, d[2] & 0xFFFF, d[3] & 0xFFFF))
    expected = python_walk(memory, size, indirect, head)
    got = dataplane.walk_chain(memory, DESC, size, indirect, head)
    assert got == expected
    if netplane.available():
        assert netplane.walk_chain(memory, DESC, size, indirect, head) == expected
    if data is None:
        assert got == [(BUFFERS, 16, False), (BUFFERS + 0x100, 512, True), (BUFFERS + 0x400, 1, True)]


def test_walker_refuses_a_loop_and_a_nested_table(memory):
    """Two refusals spelled out, so a walker that accepts everything fails here too."""
    memory.view(0, LOW_SIZE)[:] = bytes(LOW_SIZE)
    memory.write(DESC, struct.pack("<QIHH", BUFFERS, 16, 1, 1))
    memory.write(DESC + 16, struct.pack("<QIHH", BUFFERS, 16, 1, 0))
    assert dataplane.walk_chain(memory, DESC, 2, False, 0) is None
    memory.write(DESC, struct.pack("<QIHH", TABLES, 16, 4, 0))
    memory.write(TABLES, struct.pack("<QIHH", TABLES, 16, 4, 0))
    assert dataplane.walk_chain(memory, DESC, 2, True, 0) is None
    memory.write(TABLES, struct.pack("<QIHH", BUFFERS, 16, 0, 0))
    assert dataplane.walk_chain(memory, DESC, 2, True, 0) == [(BUFFERS, 16, False)]
    assert dataplane.walk_chain(memory, DESC, 2, False, 0) is None


def test_walker_refuses_a_readable_descriptor_after_an_empty_writable_one(memory):
    """queue.py's regression example (a user's make test): the order rule counts an
    empty writable descriptor too, in the native walker as in the Python one."""
    memory.view(0, LOW_SIZE)[:] = bytes(LOW_SIZE)
    memory.write(DESC, struct.pack("<QIHH", BUFFERS, 16, 1, 1))         # readable
    memory.write(DESC + 16, struct.pack("<QIHH", BUFFERS, 0, 3, 2))     # writable, empty
    memory.write(DESC + 32, struct.pack("<QIHH", BUFFERS, 0, 0, 0))     # readable, empty
    assert dataplane.walk_chain(memory, DESC, 4, False, 0) is None
    assert python_walk(memory, 4, False, 0) is None
    memory.write(DESC + 32, struct.pack("<QIHH", BUFFERS, 0, 2, 0))     # writable, empty: in order
    assert dataplane.walk_chain(memory, DESC, 4, False, 0) == [(BUFFERS, 16, False)]
    assert python_walk(memory, 4, False, 0) == [(BUFFERS, 16, False)]


@pytest.mark.skipif(not netplane.available(), reason=f"net data plane not built: {netplane.unavailable_reason()}")
def test_net_planes_walker_refuses_a_loop_and_takes_a_table(memory):
    memory.view(0, LOW_SIZE)[:] = bytes(LOW_SIZE)
    memory.write(DESC, struct.pack("<QIHH", BUFFERS, 16, 1, 1))
    memory.write(DESC + 16, struct.pack("<QIHH", BUFFERS, 16, 1, 0))
    assert netplane.walk_chain(memory, DESC, 2, False, 0) is None
    memory.write(DESC, struct.pack("<QIHH", TABLES, 32, 4, 0))
    memory.write(TABLES, struct.pack("<QIHH", BUFFERS, 12, 1, 1))
    memory.write(TABLES + 16, struct.pack("<QIHH", BUFFERS + 0x100, 1514, 0, 0))
    assert netplane.walk_chain(memory, DESC, 2, True, 0) == [(BUFFERS, 12, False), (BUFFERS + 0x100, 1514, False)]
    assert netplane.walk_chain(memory, DESC, 2, False, 0) is None
