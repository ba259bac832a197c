"""The machine's one event loop: file descriptors, calls from other threads, timers.

Devices and services do not start threads of their own to wait on descriptors:
they subscribe ``fd -> on_ready(events)`` here, as Firecracker's event manager
does, and one thread (``kvmpy-events``) serves them all. The vCPU threads are the
only other threads of a running machine.

Rules for subscribers:
  * ``on_ready`` runs on the loop's thread; it must not block for long (a pread
    of one request is fine, waiting on another device is not).
  * an exception in a callback is logged and the loop goes on: one broken device
    must not stop the others.
  * ``subscribe``/``modify``/``unsubscribe`` may be called from any thread; from
    another thread they take effect before the loop's next wait.
"""

from __future__ import annotations

import logging
import os
import selectors
import threading
from typing import Callable

log = logging.getLogger(__name__)

EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE

OnReady = Callable[[int], None]


class EventLoop:
    def __init__(self, name: str = "kvmpy-events") -> None:
        self.name = name
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._pending: list[Callable[[], None]] = []
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._selector.register(self._wake_fd, EVENT_READ, None)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._timeout: Callable[[], float | None] = lambda: None
        self._on_wake: Callable[[], None] = lambda: None
        # A selector cannot hold an fd that waits for nothing: such subscribers wait here.
        self._parked: dict[int, OnReady] = {}

    # --- subscribers ------------------------------------------------------------------
    def subscribe(self, fd: int, events: int, on_ready: OnReady) -> None:
        """Call ``on_ready(ready_events)`` whenever ``fd`` is ready for ``events``
        (EVENT_READ, EVENT_WRITE or both; 0 keeps the subscription but waits for nothing)."""
        self._in_loop(lambda: self._apply(fd, events, on_ready))

    def modify(self, fd: int, events: int) -> None:
        """Change what a subscribed ``fd`` waits for (0: nothing for now)."""
        self._in_loop(lambda: self._apply(fd, events, None))

    def unsubscribe(self, fd: int) -> None:
        """Forget ``fd``; after this returns on the loop thread, or before the loop's
        next wait from any other thread, ``on_ready`` is not called for it again."""
        def drop() -> None:
            try:
                self._selector.unregister(fd)
            except (KeyError, ValueError):
                pass
            self._parked.pop(fd, None)
        self._in_loop(drop)

    def _apply(self, fd: int, events: int, on_ready: OnReady | None) -> None:
        try:
            key = self._selector.get_key(fd)
            callback = on_ready or key.data
            if events:
                self._selector.modify(fd, events, callback)
            else:
                self._selector.unregister(fd)
                self._parked[fd] = callback
        except KeyError:
            callback = on_ready or self._parked.pop(fd, None)
            if callback is None:
                log.debug("%s: modify of unsubscribed fd %d ignored", self.name, fd)
                return
            if events:
                self._selector.register(fd, events, callback)
            else:
                self._parked[fd] = callback

    # --- calls from other threads -------------------------------------------------------
    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on the loop's thread, in order with other call_soon calls."""
        with self._lock:
            self._pending.append(fn)
        self.wake()

    def wake(self) -> None:
        try:
            os.eventfd_write(self._wake_fd, 1)
        except OSError:
            pass            # closed: nothing will wait any more

    def on_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def _in_loop(self, fn: Callable[[], None]) -> None:
        if self._thread is None or self.on_loop_thread():
            fn()
        else:
            self.call_soon(fn)

    # --- the loop --------------------------------------------------------------------------
    def set_timer_source(self, timeout: Callable[[], float | None], on_wake: Callable[[], None]) -> None:
        """Let a timer queue share this thread: before each wait the loop asks
        ``timeout()`` (seconds until the next deadline, or None), and after each wait
        it calls ``on_wake()`` to fire what is due."""
        self._timeout = timeout
        self._on_wake = on_wake

    def start(self) -> None:
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            try:
                ready = self._selector.select(self._timeout())
            except (OSError, ValueError) as e:   # an fd closed under us: drop it, go on
                log.debug("%s: select failed: %s", self.name, e)
                self._drop_bad_fds()
                continue
            # The wake-up is consumed before the calls are taken, so a call queued
            # after this point wakes the next wait rather than being lost.
            try:
                os.eventfd_read(self._wake_fd)
            except (BlockingIOError, OSError):
                pass
            # Calls from other threads first: a modify or unsubscribe made before an
            # fd became ready must hold for this round's dispatch too.
            with self._lock:
                pending, self._pending = self._pending, []
            for fn in pending:
                self._guarded(fn)
            for key, events in ready:
                if key.fd == self._wake_fd:
                    continue
                try:
                    now = self._selector.get_key(key.fd)
                except (KeyError, ValueError):
                    continue
                if events & now.events:
                    self._guarded(now.data, events & now.events)
            self._guarded(self._on_wake)

    def _drop_bad_fds(self) -> None:
        for key in list(self._selector.get_map().values()):
            try:
                os.fstat(key.fd)
            except OSError:
                self._selector.unregister(key.fd)

    def _guarded(self, fn: Callable, *args) -> None:
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - one subscriber must not stop the others
            log.exception("%s: callback %r failed", self.name, fn)

    def close(self) -> None:
        """Stop the loop's thread (joined unless called on it); subscribers are dropped,
        their fds are theirs to close."""
        if self._closed:
            return
        self._closed = True
        self.wake()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5)
        self._selector.close()
        os.close(self._wake_fd)
        self._wake_fd = -1
