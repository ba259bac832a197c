"""The machine's event loop: subscribe/modify/unsubscribe from any thread, call_soon, failures contained."""

import os
import threading
import time

import pytest

from kvmpy.events import EVENT_READ, EventLoop


@pytest.fixture
def loop():
    lp = EventLoop(name="test-events")
    lp.start()
    yield lp
    lp.close()


def _settle(loop):
    done = threading.Event()
    loop.call_soon(done.set)
    assert done.wait(2)


def _wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def test_subscribe_modify_unsubscribe(loop):
    r, w = os.pipe()
    got = []
    loop.subscribe(r, EVENT_READ, lambda ev: got.append(os.read(r, 100)))
    os.write(w, b"a")
    _wait_for(lambda: got == [b"a"])
    loop.modify(r, 0)               # parked: readable data waits
    os.write(w, b"b")
    _settle(loop)
    _settle(loop)
    assert got == [b"a"]
    loop.modify(r, EVENT_READ)      # the parked callback comes back
    _wait_for(lambda: got == [b"a", b"b"])
    loop.unsubscribe(r)
    os.write(w, b"c")
    _settle(loop)
    _settle(loop)
    assert got == [b"a", b"b"]
    os.close(r)
    os.close(w)


def test_failing_callback_does_not_stop_the_loop(loop, caplog):
    r, w = os.pipe()
    calls = []

    def bad(ev):
        os.read(r, 100)
        calls.append(ev)
        raise RuntimeError("device bug")

    loop.subscribe(r, EVENT_READ, bad)
    os.write(w, b"x")
    _wait_for(lambda: len(calls) == 1)
    os.write(w, b"y")
    _wait_for(lambda: len(calls) == 2)
    assert "device bug" in caplog.text
    loop.unsubscribe(r)
    os.close(r)
    os.close(w)


def test_call_soon_runs_in_order_on_the_loop_thread(loop):
    seen = []
    for i in range(50):
        loop.call_soon(lambda i=i: seen.append((i, loop.on_loop_thread())))
    _settle(loop)
    assert seen == [(i, True) for i in range(50)]


def test_close_joins_the_thread():
    lp = EventLoop(name="test-close")
    lp.start()
    t = lp._thread
    lp.close()
    assert not t.is_alive()
    lp.close()                       # twice is harmless
