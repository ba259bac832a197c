"""One event loop per process: file descriptors, calls from other threads, timers.

Devices and services do not start threads of their own to wait on descriptors:
they subscribe ``fd -> on_ready(events)`` here, as Firecracker's event manager
does, and one thread (``kvmpy-events``) serves them all. ``kvmpy run`` makes the
loop and hands it to the console, the monitors, the signal handling and the
machine. Besides it, a running machine has its vCPU threads and ``Worker``
threads for what may block (a monitor command that waits for the vCPUs).

Rules for subscribers:
  * ``on_ready`` runs on the loop's thread; it must not block for long (a pread
    of one request is fine, waiting on another device or on a vCPU is not).
  * an exception in a callback is logged and the loop goes on: one broken device
    must not stop the others.
  * ``subscribe``/``modify``/``unsubscribe``, ``call_soon`` and ``call_later`` may
    be called from any thread; from another thread they take effect before the
    loop's next wait.
  * unsubscribe a descriptor before closing it, or hand it over with
    ``unsubscribe(fd, close=True)``, which closes it on the loop's thread once it
    is forgotten: a number closed under the loop can be reused by a new file the
    loop would then mistake for the old one.
  * a file epoll cannot watch (a regular file or /dev/null as stdin) is always
    ready, as select() reports it: its callback runs every round until it
    unsubscribes or waits for nothing (``modify(fd, 0)``).

Timers: ``call_later`` is for coarse delays (a console flush, a powerdown
timeout): it rides on the wait's timeout, which epoll rounds up to whole
milliseconds (measured: 0.3 ms asked, 1.1 ms slept). Guest timers need better (a
LAPIC period can be 100 us), so a TimerWheel subscribes a ``TimerFd``: deadlines
in nanoseconds, and arming one from a vCPU thread is one syscall that does not
wake the loop before it is due.
"""

from __future__ import annotations

import ctypes
import heapq
import itertools
import logging
import os
import queue
import selectors
import threading
import time
from typing import Callable

from .threadname import name_this_thread

log = logging.getLogger(__name__)

EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE

OnReady = Callable[[int], None]


class TimerHandle:
    """What ``call_later`` returns; ``cancel()`` from any thread."""

    __slots__ = ("when", "fn", "cancelled")

    def __init__(self, when: float, fn: Callable[[], None]) -> None:
        self.when = when
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    def __init__(self, name: str = "kvmpy-events") -> None:
        self.name = name
        self._selector = selectors.DefaultSelector()
        # Guards _pending, _timers, _woken, _wake_fd, _thread and _closed.
        self._lock = threading.Lock()
        self._pending: list[Callable[[], None]] = []
        self._timers: list[tuple[float, int, TimerHandle]] = []
        self._timer_order = itertools.count()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._woken = False     # a wake-up is written and not yet consumed: no second write
        self._selector.register(self._wake_fd, EVENT_READ, None)
        self._thread: threading.Thread | None = None
        self._closed = False
        # A selector cannot hold an fd that waits for nothing: such subscribers wait here.
        self._parked: dict[int, OnReady] = {}
        # Files epoll refuses (EPERM: regular files, /dev/null): fd -> (events, callback).
        self._always_ready: dict[int, tuple[int, OnReady]] = {}

    # --- subscribers ------------------------------------------------------------------
    def subscribe(self, fd: int, events: int, on_ready: OnReady) -> None:
        """Call ``on_ready(ready_events)`` whenever ``fd`` is ready for ``events``
        (EVENT_READ, EVENT_WRITE or both; 0 keeps the subscription but waits for
        nothing). Subscribing an fd again replaces its callback."""
        self._in_loop(lambda: self._replace(fd, events, on_ready))

    def modify(self, fd: int, events: int) -> None:
        """Change what a subscribed ``fd`` waits for (0: nothing for now)."""
        self._in_loop(lambda: self._modify(fd, events))

    def unsubscribe(self, fd: int, *, close: bool = False) -> None:
        """Forget ``fd``; once this returns on the loop thread, or before the loop's
        next wait from any other thread, ``on_ready`` is not called for it again.
        ``close``: then close ``fd`` too (also when the loop is already closed)."""
        def drop() -> None:
            self._forget(fd)
            if close:
                _close_quietly(fd)
        self._in_loop(drop, if_closed=(lambda: _close_quietly(fd)) if close else None)

    def _replace(self, fd: int, events: int, on_ready: OnReady) -> None:
        # A fresh registration even for a known number: the old file may be closed
        # and the number reused, and epoll would not be told about the new file.
        self._forget(fd)
        if events:
            self._register(fd, events, on_ready)
        else:
            self._parked[fd] = on_ready

    def _modify(self, fd: int, events: int) -> None:
        if fd in self._always_ready:
            callback = self._always_ready[fd][1]
            if events:
                self._always_ready[fd] = (events, callback)
            else:
                del self._always_ready[fd]
                self._parked[fd] = callback
            return
        try:
            key = self._selector.get_key(fd)
        except KeyError:
            callback = self._parked.get(fd)
            if callback is None:
                log.debug("%s: modify of unsubscribed fd %d ignored", self.name, fd)
            elif events:
                self._register(fd, events, callback)
            return
        if not events:
            self._selector.unregister(fd)
            self._parked[fd] = key.data
            return
        try:
            self._selector.modify(fd, events, key.data)
        except OSError:     # the file under this number changed: register the new one
            self._register(fd, events, key.data)

    def _register(self, fd: int, events: int, callback: OnReady) -> None:
        try:
            self._selector.register(fd, events, callback)
        except PermissionError:
            self._always_ready[fd] = (events, callback)
        except (OSError, ValueError) as e:
            log.warning("%s: cannot wait on fd %d: %s", self.name, fd, e)
            return
        self._parked.pop(fd, None)

    def _forget(self, fd: int) -> None:
        try:
            self._selector.unregister(fd)
        except (KeyError, ValueError):
            pass
        self._parked.pop(fd, None)
        self._always_ready.pop(fd, None)

    def _in_loop(self, fn: Callable[[], None], if_closed: Callable[[], None] | None = None) -> None:
        if self.on_loop_thread():
            fn()
            return
        with self._lock:
            if not self._closed:
                if self._thread is None:
                    fn()    # not started: nobody else uses the selector (start() waits for the lock)
                else:
                    self._pending.append(fn)
                    self._wake_locked()
                return
        if if_closed is not None:
            if_closed()
        else:
            log.debug("%s: closed; a subscription change is ignored", self.name)

    # --- calls from other threads -------------------------------------------------------
    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on the loop's thread, in order with other call_soon calls
        (calls made before ``start`` run once it starts; after ``close``, never)."""
        with self._lock:
            if self._closed:
                log.debug("%s: closed; call %r dropped", self.name, fn)
                return
            self._pending.append(fn)
            self._wake_locked()

    def call_later(self, delay: float, fn: Callable[[], None]) -> TimerHandle:
        """Run ``fn()`` on the loop's thread ``delay`` seconds from now, give or
        take a millisecond (see the module's note on timers)."""
        handle = TimerHandle(time.monotonic() + max(0.0, delay), fn)
        with self._lock:
            if self._closed:
                return handle
            heapq.heappush(self._timers, (handle.when, next(self._timer_order), handle))
            if self._timers[0][2] is handle and not self.on_loop_thread():
                self._wake_locked()     # the loop may be asleep for longer than that
        return handle

    def call_and_wait(self, fn: Callable[[], None], timeout: float = 5.0) -> bool:
        """Run ``fn()`` on the loop's thread and wait for it; False if it did not
        finish within ``timeout``. On the loop's thread, before ``start`` or after
        ``close``, it runs at once on the caller's thread. Exceptions are logged.
        The caller must hold nothing a loop callback may wait for."""
        if self.on_loop_thread():
            self._guarded(fn)
            return True
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()
        with self._lock:
            queued = not self._closed and self._thread is not None
            if queued:
                self._pending.append(run)
                self._wake_locked()
            thread = self._thread
        if queued:
            return done.wait(timeout)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)        # closed: let its last round finish first
        self._guarded(fn)
        return True

    def wake(self) -> None:
        with self._lock:
            self._wake_locked()

    def _wake_locked(self) -> None:
        if self._woken or self._wake_fd < 0:
            return
        try:
            os.eventfd_write(self._wake_fd, 1)
            self._woken = True
        except OSError:
            pass

    def on_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    @property
    def running(self) -> bool:
        """Started and not closed."""
        return self._thread is not None and not self._closed

    @property
    def closed(self) -> bool:
        return self._closed

    # --- the loop --------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()

    def _run(self) -> None:
        name_this_thread(self.name)
        try:
            while not self._closed:
                ready = self._wait()
                # The hot path (one device fd ready, nothing queued, no timer) takes no
                # lock: `_woken` is read unlocked, and a wake-up written meanwhile keeps
                # the eventfd readable, so the next wait returns at once for it.
                if self._woken:
                    # The wake-up is consumed with the calls taken, under one lock, so a
                    # call queued after this point wakes the next wait rather than being lost.
                    with self._lock:
                        self._woken = False
                        try:
                            os.eventfd_read(self._wake_fd)
                        except OSError:
                            pass
                        pending, self._pending = self._pending, []
                    # Calls from other threads first: a modify or unsubscribe made before
                    # an fd became ready must hold for this round's dispatch too.
                    for fn in pending:
                        self._guarded(fn)
                for key, events in ready:
                    self._dispatch(key, events)
                if self._always_ready:
                    for fd, (events, callback) in list(self._always_ready.items()):
                        if self._always_ready.get(fd, (0, None))[1] is callback:
                            self._guarded(callback, events)
                if self._timers:
                    self._run_due_timers()
        finally:
            self._finish()

    def _wait(self) -> list:
        if self._always_ready:
            timeout = 0
        elif self._timers:
            with self._lock:
                timeout = self._timer_timeout_locked()
        else:
            timeout = None      # a timer armed from another thread wakes the loop
        try:
            return self._selector.select(timeout)
        except (OSError, ValueError) as e:
            if not self._closed:
                log.debug("%s: select failed: %s", self.name, e)
                self._drop_bad_fds()
            return []

    def _dispatch(self, key: selectors.SelectorKey, events: int) -> None:
        if key.fd == self._wake_fd:
            return
        try:
            now = self._selector.get_key(key.fd)
        except (KeyError, ValueError):
            return
        # A callback replaced this round may belong to a new file under the same
        # number: skip it (epoll is level-triggered; a ready fd is reported again).
        if now.data is key.data and events & now.events:
            self._guarded(now.data, events & now.events)

    def _timer_timeout_locked(self) -> float | None:
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        if not self._timers:
            return None
        return max(0.0, self._timers[0][0] - time.monotonic())

    def _run_due_timers(self) -> None:
        now = time.monotonic()
        due = []
        with self._lock:
            while self._timers and self._timers[0][0] <= now:
                due.append(heapq.heappop(self._timers)[2])
        for handle in due:
            if not handle.cancelled:
                self._guarded(handle.fn)

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
        """Stop the loop's thread (joined unless called on it). Calls queued before
        still run, on the closing thread, so a descriptor handed over for closing is
        closed; subscribers are dropped, their fds are theirs to close."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._wake_locked()
            thread = self._thread
        if thread is None:
            self._finish()
        elif thread is not threading.current_thread():
            thread.join(timeout=5)
            if thread.is_alive():
                log.warning("%s: a callback is still running after 5 s; the loop is left behind",
                            self.name)

    def _finish(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
            self._timers.clear()
        for fn in pending:
            self._guarded(fn)
        with self._lock:
            fd, self._wake_fd = self._wake_fd, -1
        self._selector.close()
        self._parked.clear()
        self._always_ready.clear()
        _close_quietly(fd)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class Worker:
    """One thread for work that may block and so must stay off the loop (a monitor
    command parks the vCPUs, which can take seconds): jobs run in submission order.
    Started by the first job; ``close()`` stops it after the running job and drops
    the jobs still queued."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: "queue.SimpleQueue[Callable[[], None] | None]" = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, job: Callable[[], None]) -> bool:
        """Queue ``job``; False (and dropped) once closed."""
        with self._lock:
            if self._closed:
                return False
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
        self._jobs.put(job)
        return True

    def on_worker_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def _run(self) -> None:
        name_this_thread(self.name)
        while True:
            job = self._jobs.get()
            if job is None or self._closed:
                return
            try:
                job()
            except Exception:  # noqa: BLE001 - the next job still runs
                log.exception("%s: job failed", self.name)

    def close(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._closed = True
            thread = self._thread
        self._jobs.put(None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)


# --- timerfd (os.timerfd_* arrive with Python 3.13) ------------------------------------------

class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_TFD_TIMER_ABSTIME = 1
# Far enough (146 years) never to be reached, small enough for any time_t.
_LATEST_DEADLINE_NS = 1 << 62
_libc_functions: tuple | None = None


def _timerfd_functions() -> tuple:
    global _libc_functions
    if _libc_functions is None:
        libc = ctypes.CDLL(None, use_errno=True)
        create, settime = libc.timerfd_create, libc.timerfd_settime
        create.argtypes, create.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        settime.restype = ctypes.c_int
        _libc_functions = (create, settime)
    return _libc_functions


class TimerFd:
    """A CLOCK_MONOTONIC timerfd: readable once the deadline given to ``set`` has
    passed. Its owner serializes ``set``/``clear``/``close`` (one buffer is reused)."""

    def __init__(self) -> None:
        create, self._settime = _timerfd_functions()
        fd = create(time.CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_create: {os.strerror(err)}")
        self.fd = fd
        self._spec = _Itimerspec()
        self._spec_address = ctypes.addressof(self._spec)

    def set(self, deadline_ns: int) -> None:
        """Fire at ``deadline_ns`` on time.monotonic_ns()'s clock (at once if past)."""
        # An all-zero it_value would disarm instead: 1 ns is as good as "now".
        ns = min(max(int(deadline_ns), 1), _LATEST_DEADLINE_NS)
        value = self._spec.it_value
        value.tv_sec, value.tv_nsec = divmod(ns, 1_000_000_000)
        if self._settime(self.fd, _TFD_TIMER_ABSTIME, self._spec_address, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_settime: {os.strerror(err)}")

    def clear(self) -> None:
        """Consume the expiry (it stays readable until then)."""
        try:
            os.read(self.fd, 8)
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        if self.fd >= 0:
            _close_quietly(self.fd)
            self.fd = -1
