"""What the Python sides of the native data planes share: virtio-blk's (dataplane.py)
and virtio-net's (netplane.py), and the rings vhost-net serves (vhost.py).

Each plane is a cffi module built from the same ring walker (c_ext/dataplane/vring.c)
whose threads are handed a SplitQueue's ring (layout and indices) at start, signal
eventfds while they run (an interrupt to raise, a request or frame handed back to
the model), and give the indices back when they stop. The C structures differ per
plane but name those fields alike, so one function fills or reads either.
"""

from __future__ import annotations

import importlib
import os

from .queue import SplitQueue


def load_cffi(module: str) -> tuple[object, object, str]:
    """``(ffi, lib, "")`` of this package's cffi module ``module``, or ``(None, None,
    why)`` in an in-place checkout without ``setup.py build_ext``: the plane is then
    unavailable and every request stays with the Python model."""
    try:
        built = importlib.import_module(f"{__package__}.{module}")
    except ImportError as e:
        return None, None, str(e)
    return built.ffi, built.lib, ""


def new_eventfd() -> int:
    """A non-blocking eventfd a plane's thread (or the kernel) writes and the event loop reads."""
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def take_event(fd: int) -> bool:
    """Whether ``fd``, a non-blocking eventfd, was written since it was last read
    (reading it clears it)."""
    try:
        os.eventfd_read(fd)
        return True
    except BlockingIOError:
        return False


def close_fds(fds) -> None:
    """Close each of ``fds``; one already closed (the event loop may have closed it
    when it unsubscribed) is no error."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def ring_to_c(ring, queue: SplitQueue) -> None:
    """Where a thread starts on ``queue``: its layout and indices into ``ring``, a
    plane's C ring configuration (``struct dp_config``, ``struct np_ring_config``)."""
    ring.size = queue.size
    ring.desc_addr, ring.avail_addr, ring.used_addr = queue.desc_addr, queue.avail_addr, queue.used_addr
    ring.next_avail, ring.next_used = queue.next_avail, queue.next_used
    ring.signalled_valid = int(queue.signalled_used is not None)
    ring.signalled_used = queue.signalled_used or 0


def ring_from_c(queue: SplitQueue, ring) -> None:
    """Where a stopped thread left ``queue``: the indices in ``ring`` (``struct
    dp_indices``, ``struct np_ring_state``) go back into the SplitQueue, which
    carries on from there."""
    queue.next_avail = ring.next_avail
    queue.next_used = ring.next_used
    queue.signalled_used = ring.signalled_used if ring.signalled_valid else None


def walk_chain(ffi, lib, regions, max_segs: int, desc_addr: int, size: int,
               indirect: bool, head: int) -> list[tuple[int, int, bool]] | None:
    """The C walker (``dp_walk_chain`` in the plane ``lib``) on one chain: its buffers
    as (gpa, len, writable), or None where it refuses the chain; OverflowError past
    ``max_segs`` buffers. ``regions`` is guest RAM as dataplane.RegionPointers."""
    arr = ffi.new("struct dp_region[]", lib.DP_MAX_REGIONS)
    n = regions.fill(arr)
    segs = ffi.new("struct dp_seg[]", max_segs)
    nsegs = ffi.new("int *")
    rc = lib.dp_walk_chain(arr, n, desc_addr, size, int(indirect), head, segs, max_segs, nsegs)
    if rc == lib.DP_WALK_TOO_LONG:
        raise OverflowError(f"chain has more than {max_segs} buffers")
    if rc != lib.DP_WALK_OK:
        return None
    return [(segs[i].gpa, segs[i].len, bool(segs[i].writable)) for i in range(nsegs[0])]
