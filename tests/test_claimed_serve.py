"""kvmpy.vcpu._claimed.serve, the vCPU loop's claimed accesses served in C
(c_ext/exitpath/claimed.c), driven by a scripted backend: a ctypes callback stands
in for the backend's C entry and hands it one access after another, as KVM's
kvmpy_run_decoded does. The whole loop on real KVM is in test_exitloop_kvm.py."""

from __future__ import annotations

import ctypes

import pytest

from kvmpy.hv.exits import (DECODED_AFTER_QUEUED, DECODED_MMIO_READ, DECODED_MMIO_WRITE, DECODED_PIO_READ,
                            DECODED_PIO_WRITE, DECODED_SERVED)
from kvmpy.vcpu import _claimed

RUN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
EXIT_HLT_REASON = 5           # any code that is no access: serve hands it back


class ScriptedBackend:
    """The backend's entry: each call takes the answer to the previous read from
    access[3] and puts the next step's access in access[0..2]."""

    def __init__(self, steps: list[tuple[int, int, int, int]]) -> None:
        self.steps = list(steps)
        self.access = (ctypes.c_uint64 * 4)()
        self.answers: list[int] = []
        self.calls = 0
        self._entry = RUN(self._run)

    def _run(self, _state) -> int:
        self.calls += 1
        self.answers.append(self.access[3])
        self.access[3] = 0xDEAD     # must be overwritten by a served read
        if not self.steps:
            return EXIT_HLT_REASON
        code, addr, size, value = self.steps.pop(0)
        self.access[0], self.access[1], self.access[2] = addr, size, value
        return code

    def native(self) -> tuple[int, int, int]:
        return ctypes.cast(self._entry, ctypes.c_void_p).value, 0, ctypes.addressof(self.access)


class Bus:
    def __init__(self) -> None:
        self.accessors: dict = {}


class Host:
    control_pending = False


class Register:
    """A device register: records its calls, answers ``value`` to reads."""

    def __init__(self, value: int = 0, host: Host | None = None) -> None:
        self.value, self.host = value, host
        self.calls: list[tuple] = []

    def read(self, offset: int, size: int) -> int:
        self.calls.append(("r", offset, size))
        return self.value

    def write(self, offset: int, size: int, value: int) -> None:
        self.calls.append(("w", offset, size, value))
        if self.host is not None and value == 0xFF:
            self.host.control_pending = True

    def accessor(self, offset: int) -> tuple:
        return (self.read, self.write, offset)


def serve(backend: ScriptedBackend, pio: Bus, mmio: Bus, host: Host | None = None, drain=None,
          errors: list | None = None) -> int:
    def device_error(code: int, addr: int, e: Exception) -> None:
        if errors is None:
            raise AssertionError(f"unexpected device error {e!r}")
        errors.append((code, addr, e))
    return _claimed.serve(*backend.native(), pio, mmio, host or Host(), drain, device_error)


def test_claimed_accesses_reach_their_register_and_reads_are_answered_masked():
    pio, mmio = Bus(), Bus()
    port, reg = Register(0x1_2345_6789), Register(-1)
    pio.accessors[0x3FF] = port.accessor(7)
    mmio.accessors[0xFEB00004] = reg.accessor(4)
    b = ScriptedBackend([(DECODED_PIO_WRITE, 0x3FF, 1, 0x5A), (DECODED_PIO_READ, 0x3FF, 2, 0),
                         (DECODED_MMIO_READ, 0xFEB00004, 4, 0), (DECODED_MMIO_WRITE, 0xFEB00004, 8, 2**64 - 1),
                         (DECODED_MMIO_READ, 0xFEB00004, 8, 0)])
    assert serve(b, pio, mmio) == EXIT_HLT_REASON
    assert port.calls == [("w", 7, 1, 0x5A), ("r", 7, 2)]
    assert reg.calls == [("r", 4, 4), ("w", 4, 8, 2**64 - 1), ("r", 4, 8)]
    # The answer each entry found: the read before it, cut to its size (-1 is all ones).
    assert b.answers[2:4] == [0x6789, 0xFFFF_FFFF] and b.answers[5] == 2**64 - 1
    assert b.calls == 6


def test_an_address_without_a_known_accessor_goes_back_to_python():
    pio, mmio = Bus(), Bus()
    b = ScriptedBackend([(DECODED_MMIO_WRITE, 0xFEB00000, 4, 1), (DECODED_PIO_READ, 0x300, 1, 0)])
    assert serve(b, pio, mmio) == DECODED_MMIO_WRITE
    assert (b.access[0], b.access[1], b.access[2]) == (0xFEB00000, 4, 1)
    assert serve(b, pio, mmio) == DECODED_PIO_READ


def test_the_accessors_are_looked_up_afresh_at_every_exit():
    """The bus replaces its dict when its map changes: the next access must see the new one."""
    pio, mmio = Bus(), Bus()
    old, new = Register(1), Register(2)
    pio.accessors = {0x300: old.accessor(0)}

    class Swapping(Register):
        def write(self, offset, size, value):
            super().write(offset, size, value)
            pio.accessors = {0x300: new.accessor(0)}

    swap = Swapping()
    pio.accessors[0x301] = swap.accessor(0)
    b = ScriptedBackend([(DECODED_PIO_READ, 0x300, 1, 0), (DECODED_PIO_WRITE, 0x301, 1, 0),
                         (DECODED_PIO_READ, 0x300, 1, 0)])
    assert serve(b, pio, mmio) == EXIT_HLT_REASON
    assert len(old.calls) == 1 and len(new.calls) == 1 and b.answers[1:4] == [1, 0xDEAD, 2]


def test_other_exits_and_errors_from_the_backend_come_back_as_they_are():
    for code in (EXIT_HLT_REASON, 0, -4, DECODED_PIO_WRITE - 1, DECODED_MMIO_READ + 1,
                 DECODED_MMIO_READ + DECODED_AFTER_QUEUED + 1):
        b = ScriptedBackend([(code, 0x300, 1, 0)])
        assert serve(b, Bus(), Bus()) == code


@pytest.mark.parametrize("size", [0, 9, 2**40])
def test_a_size_outside_one_to_eight_goes_back_to_python(size):
    pio = Bus()
    reg = Register()
    pio.accessors[0x300] = reg.accessor(0)
    b = ScriptedBackend([(DECODED_PIO_WRITE, 0x300, size, 0)])
    assert serve(b, pio, Bus()) == DECODED_PIO_WRITE and reg.calls == []


def test_queued_writes_are_drained_before_the_access_or_left_to_python_without_a_drain():
    pio = Bus()
    order: list = []

    class Ordered(Register):
        def write(self, offset, size, value):
            order.append(("write", value))

    pio.accessors[0x3F8] = Ordered().accessor(0)
    step = (DECODED_PIO_WRITE + DECODED_AFTER_QUEUED, 0x3F8, 1, 0x41)
    b = ScriptedBackend([step, (DECODED_PIO_WRITE, 0x3F8, 1, 0x42)])
    assert serve(b, pio, Bus(), drain=lambda: order.append("drain")) == EXIT_HLT_REASON
    assert order == ["drain", ("write", 0x41), ("write", 0x42)]
    b = ScriptedBackend([step])
    assert serve(b, pio, Bus()) == step[0]          # the caller drains and serves it


def test_a_drain_that_raises_raises_out_of_serve():
    def drain():
        raise RuntimeError("drain broke")
    b = ScriptedBackend([(DECODED_PIO_READ + DECODED_AFTER_QUEUED, 0x3F8, 1, 0)])
    with pytest.raises(RuntimeError, match="drain broke"):
        serve(b, Bus(), Bus(), drain=drain)


def test_a_device_exception_is_reported_the_read_floats_and_the_loop_runs_on():
    class Broken:
        def read(self, offset, size):
            raise ValueError("broken read")

        def write(self, offset, size, value):
            raise ValueError("broken write")

    class NotANumber(Register):
        def read(self, offset, size):
            return "0"

    pio, mmio = Bus(), Bus()
    pio.accessors[0x300] = (Broken().read, Broken().write, 0)
    mmio.accessors[0xFEB00000] = NotANumber().accessor(0)
    errors: list = []
    b = ScriptedBackend([(DECODED_PIO_READ, 0x300, 2, 0), (DECODED_PIO_WRITE, 0x300, 1, 9),
                         (DECODED_MMIO_READ, 0xFEB00000, 4, 0)])
    assert serve(b, pio, mmio, errors=errors) == EXIT_HLT_REASON
    assert [(c, a, type(e)) for c, a, e in errors] == [
        (DECODED_PIO_READ, 0x300, ValueError), (DECODED_PIO_WRITE, 0x300, ValueError),
        (DECODED_MMIO_READ, 0xFEB00000, TypeError)]
    assert str(errors[0][2]) == "broken read" and errors[0][2].__traceback__ is not None
    assert b.answers[1:4] == [0xFFFF, 0xDEAD, 0xFFFF_FFFF]


def test_a_base_exception_from_a_device_is_not_swallowed():
    class Interrupted(Register):
        def write(self, offset, size, value):
            raise KeyboardInterrupt

    pio = Bus()
    pio.accessors[0x300] = Interrupted().accessor(0)
    b = ScriptedBackend([(DECODED_PIO_WRITE, 0x300, 1, 0)])
    with pytest.raises(KeyboardInterrupt):
        serve(b, pio, Bus(), errors=[])


def test_a_device_error_handler_that_raises_raises_out_of_serve():
    class Broken(Register):
        def read(self, offset, size):
            raise ValueError("broken")

    pio = Bus()
    pio.accessors[0x300] = Broken().accessor(0)
    b = ScriptedBackend([(DECODED_PIO_READ, 0x300, 1, 0)])

    def device_error(code, addr, e):
        raise RuntimeError("handler broke")
    with pytest.raises(RuntimeError, match="handler broke"):
        _claimed.serve(*b.native(), pio, Bus(), Host(), None, device_error)


def test_a_control_request_made_by_a_device_stops_the_loop_before_the_next_entry():
    """A device asking for a reset or power-off sets control_pending: no vCPU may run on."""
    host = Host()
    pio = Bus()
    reg = Register(host=host)
    pio.accessors[0x604] = reg.accessor(0)
    b = ScriptedBackend([(DECODED_PIO_WRITE, 0x604, 1, 1), (DECODED_PIO_WRITE, 0x604, 1, 0xFF),
                         (DECODED_PIO_WRITE, 0x604, 1, 2)])
    assert serve(b, pio, Bus(), host=host) == DECODED_SERVED
    assert b.calls == 2 and reg.calls == [("w", 0, 1, 1), ("w", 0, 1, 0xFF)]


def test_bad_arguments_are_refused():
    b = ScriptedBackend([])
    entry, state, access = b.native()
    with pytest.raises(TypeError):
        _claimed.serve(entry, state, access)
    with pytest.raises(ValueError):
        _claimed.serve(0, state, access, Bus(), Bus(), Host(), None, print)
    with pytest.raises(ValueError):
        _claimed.serve(entry, state, 0, Bus(), Bus(), Host(), None, print)


def test_the_c_codes_are_the_protocols():
    assert (_claimed.DECODED_PIO_WRITE, _claimed.DECODED_PIO_READ, _claimed.DECODED_MMIO_WRITE,
            _claimed.DECODED_MMIO_READ, _claimed.DECODED_AFTER_QUEUED, _claimed.DECODED_SERVED) == (
        DECODED_PIO_WRITE, DECODED_PIO_READ, DECODED_MMIO_WRITE, DECODED_MMIO_READ, DECODED_AFTER_QUEUED,
        DECODED_SERVED)
