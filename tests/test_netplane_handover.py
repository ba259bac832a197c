"""The native virtio-net plane handing its rx/tx pair to the Python model and taking
it back while frames flow both ways (tests/support/net_handover.py has the driver,
the host and the hand-over thread).

A Linux guest once logged ``output.0:id N is not a head!`` and its network hung
in the nested L1, where at start-up the driver's rx filter changes take the pair
from the C thread to the model and back. Here a driver checks every used entry
while another thread takes the pair back at random moments: through the control
queue, ``state()``, ``hold_native`` and MSI-X masking.
"""

from __future__ import annotations

import os
import struct
import threading

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kvmpy.devices.virtio import netplane
from support.net_handover import (ACTIONS, ETH_TYPE, HDR, MAC, PATIENCE, PEER, RX, RXBUF, SLOT, DriverSide, Failures,
                                  HandoverRig, HostSide, run_handovers, wants_kick)
from support.polling import wait_for

needs_native = pytest.mark.skipif(not netplane.available(),
                                  reason=f"net data plane not built: {netplane.unavailable_reason()}")

FUZZ = int(os.environ.get("KVMPY_FUZZ", "0") or 0)
# KVMPY_HANDOVER_EXAMPLES: many more examples for a hunt (each takes about a second).
EXAMPLES = int(os.environ.get("KVMPY_HANDOVER_EXAMPLES", "0") or 0) or (60 if FUZZ else 6)


def run_traffic(event_idx: bool, mrg_rxbuf: bool, queue_size: int, seconds: float, actions,
                odd_chains: bool = False) -> dict:
    """Frames both ways for ``seconds`` while ``actions`` take the pair back over and
    over; then the traffic drains and every frame is accounted for."""
    rig = HandoverRig(event_idx, mrg_rxbuf, queue_size)
    failures = Failures()
    driver = DriverSide(rig, failures, odd_chains)
    host = HostSide(rig, failures)
    stop_handovers = threading.Event()
    handovers: list[int] = []
    changer = threading.Thread(target=lambda: handovers.append(run_handovers(rig, failures, actions,
                                                                             stop_handovers)),
                               name="handover-changer", daemon=True)
    # Doorbells the event loop was woken for while a thread owned them.
    owned_rings = [0]
    ring = rig.dev._doorbell_rang

    def counting_doorbell(q: int, fd: int) -> None:
        if rig.dev._native[q] is not None and rig.dev._doorbells[q] == fd:
            owned_rings[0] += 1
        ring(q, fd)
    rig.dev._doorbell_rang = counting_doorbell
    try:
        assert wait_for(lambda: rig.native() == (True, True)), "the pair never went native"
        driver.start()
        host.start()
        changer.start()
        failures.stop.wait(seconds)
        stop_handovers.set()
        changer.join(2 * PATIENCE + 5)
        driver.generating = host.generating = False
        # A send in progress (it may wait for room) counts before rx_sent is read.
        host.stopped_sending.wait(5)
        driver.rx_total = host.rx_sent
        driver.finish.set()

        def drained() -> bool:
            return (not driver.tx_out and driver.rx_next >= host.rx_sent
                    and host.tx_received + rig.model.counts()["tx_dropped"] >= driver.tx_posted)
        settled = wait_for(lambda: failures.stop.is_set() or drained(), timeout=2 * PATIENCE + 5)
        failures.stop.set()
        host.finish.set()
        driver.join(PATIENCE + 5)
        host.join(5)
        assert not failures.items, failures.items
        assert settled, (f"traffic did not drain: tx {len(driver.tx_done)}/{driver.tx_posted} completed, "
                         f"{host.tx_received} reached the host; rx {driver.rx_next}/{host.rx_sent} arrived")
        # counts() adds the running thread's counters to the model's: read while a
        # stop moves one into the other, it may briefly miss them.
        wait_for(lambda: rig.model.counts()["rx_frames"] == host.rx_sent, timeout=2)
        counts = rig.model.counts()
        # Every chain completed once; every frame reached the host once, in order,
        # but those a full socket made the device drop (and count).
        assert driver.tx_done == set(range(driver.tx_posted)) and driver.rx_next == host.rx_sent
        assert (host.tx_received == counts["tx_frames"]
                and host.tx_received + counts["tx_dropped"] == driver.tx_posted), (host.tx_received, counts)
        assert counts["rx_frames"] == host.rx_sent, counts
        return {"handovers": handovers[0] if handovers else 0, "wakeups": driver.wakeups,
                "tx": driver.tx_posted, "rx": host.rx_sent, "owned_doorbell_wakeups": owned_rings[0]}
    finally:
        failures.stop.set()
        stop_handovers.set()
        host.finish.set()
        for t in (driver, host, changer):
            if t.is_alive():
                t.join(PATIENCE + 5)
        rig.close()


@needs_native
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event_idx=st.booleans(), mrg_rxbuf=st.booleans(), queue_size=st.sampled_from([16, 64, 256]),
       actions=st.lists(st.tuples(st.sampled_from(ACTIONS), st.integers(0, 8)), min_size=1, max_size=6),
       odd_chains=st.booleans())
# The example that found counts() missing a whole stopped thread's frames (the
# thread's counts left the running set before they reached the model's statistics).
@example(event_idx=False, mrg_rxbuf=True, queue_size=16,
         actions=[("hold", 6), ("promisc_off", 6), ("mask_tx", 1), ("state", 2), ("state", 2)], odd_chains=False)
def test_handover_keeps_every_chain(event_idx, mrg_rxbuf, queue_size, actions, odd_chains):
    run_traffic(event_idx, mrg_rxbuf, queue_size, seconds=0.5, actions=actions, odd_chains=odd_chains)


@needs_native
@pytest.mark.parametrize("event_idx", [False, True])
def test_rx_filter_changes_mid_stream(event_idx):
    """What a Linux driver does at start-up, over and over: promisc off, the
    multicast table, promisc on again, with frames both ways."""
    result = run_traffic(event_idx, True, 256, seconds=1.5,
                         actions=[("promisc_off", 1), ("mac_table", 0), ("promisc_on", 2)])
    assert result["handovers"] > 0


@needs_native
def test_loop_does_not_spin_on_a_threads_doorbell():
    """state() and MSI-X masks from other threads stop the pair and queue the
    doorbells' watch for the loop, which may start the next thread first: the watch
    then lands on a doorbell the thread owns. It is dropped at its first wake-up;
    kept, the kicks the thread has not read yet woke the loop thousands of times a
    second."""
    result = run_traffic(True, True, 64, seconds=1.0, actions=[("state", 1), ("mask_tx", 1), ("mask_rx", 0)])
    # Each action stops the pair at most twice (a mask and its unmask), and each
    # stop leaves at most one stale watch.
    assert result["owned_doorbell_wakeups"] <= 2 * result["handovers"] + 2, result


# -- frames longer than the rx buffers the guest gave ------------------------------------------
# A read from a tap returns what fit, not the frame's length: the thread reads on
# into a bounce buffer, as the model does, to see that a frame did not fit.

def _big(seq: int, length: int) -> bytes:
    return MAC + PEER + struct.pack("!H", ETH_TYPE) + bytes((seq + i) & 0xFF for i in range(length - 14))


@needs_native
@pytest.mark.parametrize("dataplane", ["native", "python"])
def test_big_frame_waits_whole_for_merged_buffers(dataplane):
    """The frame waits in the model (the thread hands it over) and asks the driver
    for more buffers: with EVENT_IDX it rings only when asked (avail_event), so a
    model that did not ask left the frame, and the rx queue, stuck."""
    rig = HandoverRig(event_idx=True, mrg_rxbuf=True, queue_size=16, dataplane=dataplane)
    native = dataplane == "native"
    try:
        assert wait_for(lambda: rig.native() == (native, native))
        dq = rig.queues[RX]
        bufs = {dq.add([], [(RXBUF + SLOT * i, SLOT)]): RXBUF + SLOT * i for i in range(2)}
        rig.kick(RX)
        frame = _big(1, 5000)                  # 5012 bytes with the header: three 2 KiB buffers
        rig.port.host.send(bytes(HDR) + frame)
        assert wait_for(lambda: rig.model._rx_waiting[0] is not None)
        old = dq.avail_idx
        # The frame is waiting a moment before the model, on the event loop, asks for
        # more (avail_event at the avail idx it saw): wait for the ask itself.
        assert wait_for(lambda: dq.avail_event() == old), "the device did not ask for the buffers its waiting frame needs"
        assert dq.collect() == [] and rig.model.counts()["rx_dropped"] == 0
        bufs[dq.add([], [(RXBUF + SLOT * 2, SLOT)])] = RXBUF + SLOT * 2
        assert wants_kick(dq, old)
        rig.kick(RX)
        used: list[tuple[int, int]] = []
        assert wait_for(lambda: used.extend(dq.collect()) or len(used) >= 3)
        data = b"".join(rig.m.memory.read(bufs[h], n) for h, n in used)
        assert [n for _, n in used] == [SLOT, SLOT, HDR + len(frame) - 2 * SLOT]
        assert data[HDR:] == frame and struct.unpack_from("<H", data, 10)[0] == 3
        # delivered, the pair goes back to its thread, which takes the next frame
        bufs.update({dq.add([], [(RXBUF + SLOT * i, SLOT)]): RXBUF + SLOT * i for i in range(3, 6)})
        rig.kick(RX)
        assert wait_for(lambda: rig.native() == (native, native))
        rig.port.host.send(bytes(HDR) + _big(2, 100))
        used.clear()
        assert wait_for(lambda: used.extend(dq.collect()) or len(used) >= 1)
        assert rig.m.memory.read(bufs[used[0][0]], used[0][1])[HDR:] == _big(2, 100)
        assert rig.model.counts()["rx_frames"] == 2
    finally:
        rig.close()


@needs_native
def test_big_frame_without_merged_buffers_returns_the_chain_empty():
    rig = HandoverRig(event_idx=False, mrg_rxbuf=False, queue_size=16)
    try:
        assert wait_for(lambda: rig.native() == (True, True))
        dq = rig.queues[RX]
        bufs = {dq.add([], [(RXBUF + SLOT * i, SLOT)]): RXBUF + SLOT * i for i in range(2)}
        rig.kick(RX)
        rig.port.host.send(bytes(HDR) + _big(1, 3000))
        rig.port.host.send(bytes(HDR) + _big(2, 200))
        used: list[tuple[int, int]] = []
        assert wait_for(lambda: used.extend(dq.collect()) or len(used) >= 2)
        assert used[0][1] == 0 and rig.m.memory.read(bufs[used[1][0]], used[1][1])[HDR:] == _big(2, 200)
        counts = rig.model.counts()
        assert counts["rx_dropped"] == 1 and counts["rx_frames"] == 1 and rig.native() == (True, True)
    finally:
        rig.close()
