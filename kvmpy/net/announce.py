"""Self-announcement (QEMU's announce-self, net/announce.c): after a VM moved to
another host, or another port of a bridge, the switches learn where its MACs live.

Each round every NIC named (all of them without ``interfaces``) sends a RARP
request for its MAC from the host side, as if the guest had sent it, and a NIC
whose driver negotiated VIRTIO_NET_F_GUEST_ANNOUNCE also asks the guest to send
its own gratuitous ARPs (the ANNOUNCE status bit). The first round runs at once,
the next ``initial`` ms later, each following one ``step`` ms later than the one
before, never more than ``max`` ms apart; ``rounds`` in all. The rounds are
timers on the process's event loop (kvmpy.events), no thread sleeps for them.

Announcements with different ``id`` run side by side; a new one with the id of
one still running replaces it (QEMU 4.0's named timers).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable

from ..events import EventLoop, TimerHandle

log = logging.getLogger(__name__)

ETH_P_RARP = 0x8035
ARP_HTYPE_ETHERNET = 1
ARP_PTYPE_IPV4 = 0x0800
RARP_OP_REQUEST_REVERSE = 3
#: the shortest Ethernet frame (without its FCS): the RARP is padded to it
ETH_ZLEN = 60

# QEMU's bounds on the migration parameters announce-initial/-max/-rounds/-step,
# which hmp's announce_self takes its values from. QEMU's announce-self takes any
# int64; kvmpy holds it to the same bounds: a negative round count would never end.
PARAMETER_RANGES = {"initial": (0, 100000), "max": (0, 100000), "rounds": (0, 1000), "step": (0, 10000)}


def rarp_frame(mac: bytes) -> bytes:
    """The RARP request QEMU sends for ``mac``: broadcast, from ``mac``, asking for
    the IPv4 address of ``mac``, zero-padded to the 60-byte minimum frame."""
    if len(mac) != 6:
        raise ValueError("a MAC is 6 bytes")
    header = b"\xff" * 6 + mac + ETH_P_RARP.to_bytes(2, "big")
    body = (ARP_HTYPE_ETHERNET.to_bytes(2, "big") + ARP_PTYPE_IPV4.to_bytes(2, "big") + bytes([6, 4])
            + RARP_OP_REQUEST_REVERSE.to_bytes(2, "big") + mac + bytes(4) + mac + bytes(4))
    return (header + body).ljust(ETH_ZLEN, b"\x00")


@dataclass(frozen=True)
class AnnounceParameters:
    """QEMU's AnnounceParameters (qapi/net.json); the defaults are QEMU's migration
    parameters', which its HMP announce_self uses. Times in milliseconds.
    ``interfaces``: the NICs' names (``info network``: net0, ...), None for all."""

    initial: int = 50
    max: int = 550
    rounds: int = 5
    step: int = 100
    interfaces: tuple[str, ...] | None = None
    id: str = ""

    def __post_init__(self) -> None:
        for name, (low, high) in PARAMETER_RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"Parameter '{name}' expects a value between {low} and {high}")

    def delay_ms(self, rounds_left: int) -> int:
        """The wait before the next round, with ``rounds_left`` rounds still to run
        (QEMU's qemu_announce_timer_step)."""
        delay = self.initial + (self.rounds - rounds_left - 1) * self.step
        return self.max if delay < 0 or delay > self.max else delay


#: a NIC as the announcer sees it: its name and what one round does for it
Nic = tuple[str, Callable[[], None]]


class Announcer:
    """Runs announcements on ``events``; ``nics()`` (called on the loop's thread at
    every round, so hot-plugged or reset NICs are current) lists the NICs."""

    def __init__(self, events: EventLoop, nics: Callable[[], Iterable[Nic]]) -> None:
        self.events = events
        self.nics = nics
        # id -> (its parameters, the timer of its next round); loop thread only
        self._running: dict[str, tuple[AnnounceParameters, TimerHandle | None]] = {}
        self.rounds_done = 0
        self._closed = False

    def start(self, params: AnnounceParameters) -> None:
        """Start ``params``' rounds (any thread); the first runs on the loop at once."""
        self.events.call_soon(lambda: self._start(params))

    def running(self) -> list[str]:
        """The ids of announcements with rounds still to come (loop thread)."""
        return sorted(self._running)

    def close(self) -> None:
        """No more rounds (any thread: a round running now on the loop is the last)."""
        self._closed = True
        for _, timer in list(self._running.values()):
            if timer is not None:
                timer.cancel()

    def _start(self, params: AnnounceParameters) -> None:
        if self._closed:
            return
        old = self._running.pop(params.id, None)
        if old is not None and old[1] is not None:
            old[1].cancel()
        if params.rounds:
            self._round(params, params.rounds)

    def _round(self, params: AnnounceParameters, rounds_left: int) -> None:
        if self._closed:
            return
        current = self._running.get(params.id)
        if rounds_left != params.rounds and (current is None or current[0] is not params):
            return      # replaced by a newer announcement with this id (its timer raced the cancel)
        wanted = None if params.interfaces is None else set(params.interfaces)
        for name, announce in self.nics():
            if wanted is not None and name not in wanted:
                continue
            try:
                announce()
            except Exception:
                log.exception("announce-self: %s failed", name)
        self.rounds_done += 1
        rounds_left -= 1
        if not rounds_left:
            self._running.pop(params.id, None)
            return
        delay = params.delay_ms(rounds_left) / 1000
        timer = self.events.call_later(delay, lambda: self._round(params, rounds_left))
        self._running[params.id] = (params, timer)
