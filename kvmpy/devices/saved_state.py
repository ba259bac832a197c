"""How a device model hands out its state as a plain value and takes it back.

Every stateful platform device has ``state()``, returning a frozen dataclass of
plain values (ints, bools, bytes, tuples of them, nested state dataclasses, and
floats only for wall-clock seconds), and ``restore(state)``, which replaces the
whole state of an instance built with the same constructor arguments (normally a
fresh one, wired into the machine being restored); ``Cls.from_state(state, *args)``
(``Restorable``) is the two in one step. Nothing in a state is live: no
callbacks, locks or timers, so it can be compared, copied and written to a file.

A state may come back from a file, so ``restore`` treats it as hostile as guest
input: it checks every field (type, range, length, what fits this instance)
before touching anything, and raises ``StateError`` naming the field, leaving the
device unchanged. A state it accepts cannot make the device fail later.

Time: what runs on a device's monotonic clock is recorded relative to that clock
at the moment of ``state()`` (how long a counter has been counting, how far away
the next timer expiry is), so ``restore`` re-arms it on the new machine's clock.

Interrupt outputs: after ``restore`` each line is where the state puts it; a line
that differs from what the instance drove before is announced through its usual
callback, as any change is (a fresh instance starts with its lines low).
"""

from __future__ import annotations

import math
from typing import Protocol, TypeVar

StateT = TypeVar("StateT")

# Relative times (ns) of a sane state are seconds, not centuries: this bound only
# keeps absurd values from a file out of the clock arithmetic.
MAX_RELATIVE_NS = 1 << 62


class StateError(ValueError):
    """A saved device state is malformed or does not fit the device it is restored into."""


class Stateful(Protocol[StateT]):
    def state(self) -> StateT:
        """The device's whole state now, as a plain value."""
        ...

    def restore(self, state: StateT) -> None:
        """Replace the device's state with ``state``; StateError (and no change) if it is bad."""
        ...


class Restorable:
    """Gives a device class ``from_state(state, *constructor arguments)``: a new
    instance in ``state``. The arguments are what a state cannot hold (interrupt
    callbacks, output, timers: the new machine's wiring); the rest is ``restore``."""

    @classmethod
    def from_state(cls, state, *args, **kwargs):
        device = cls(*args, **kwargs)
        device.restore(state)
        return device


class SelfChecking(Protocol):
    def validate(self) -> None:
        """Raise StateError unless every field is of its type and in its range."""
        ...


CheckedT = TypeVar("CheckedT", bound=SelfChecking)


def checked(state: object, expected: type[CheckedT]) -> CheckedT:
    """``state`` if it is a valid ``expected``, else StateError."""
    if type(state) is not expected:
        raise StateError(f"expected a {expected.__name__}, got {type(state).__name__}")
    state.validate()
    return state


class StateCheck:
    """Validation of one state value; every method raises StateError naming the field."""

    def __init__(self, state: object) -> None:
        self.owner = type(state).__name__

    def fail(self, field: str, problem: str) -> StateError:
        return StateError(f"{self.owner}.{field}: {problem}")

    def integer(self, field: str, value: object, low: int, high: int) -> int:
        # bool is an int subclass, but a flag where a number belongs means a mixed-up state
        if type(value) is not int:
            raise self.fail(field, f"expected an int, got {type(value).__name__}")
        if not low <= value <= high:
            raise self.fail(field, f"{value:#x} is outside {low:#x}..{high:#x}")
        return value

    def optional_integer(self, field: str, value: object, low: int, high: int) -> int | None:
        return None if value is None else self.integer(field, value, low, high)

    def bits(self, field: str, value: object, allowed: int) -> int:
        """A register value that may only have bits of ``allowed`` set."""
        number = self.integer(field, value, 0, allowed)
        if number & ~allowed:
            raise self.fail(field, f"{number:#x} sets bits outside {allowed:#x}")
        return number

    def relative_ns(self, field: str, value: object) -> int:
        return self.integer(field, value, -MAX_RELATIVE_NS, MAX_RELATIVE_NS)

    def optional_relative_ns(self, field: str, value: object) -> int | None:
        return None if value is None else self.relative_ns(field, value)

    def flag(self, field: str, value: object) -> bool:
        if type(value) is not bool:
            raise self.fail(field, f"expected a bool, got {type(value).__name__}")
        return value

    def data(self, field: str, value: object, length: int | None = None,
             max_length: int | None = None) -> bytes:
        if type(value) is not bytes:
            raise self.fail(field, f"expected bytes, got {type(value).__name__}")
        if length is not None and len(value) != length:
            raise self.fail(field, f"{len(value)} bytes instead of {length}")
        if max_length is not None and len(value) > max_length:
            raise self.fail(field, f"{len(value)} bytes, more than {max_length}")
        return value

    def seconds(self, field: str, value: object, low: float, high: float) -> float:
        if type(value) not in (int, float):
            raise self.fail(field, f"expected a number, got {type(value).__name__}")
        try:
            number = float(value)  # type: ignore[arg-type]
        except OverflowError:
            raise self.fail(field, "is out of any range") from None
        if not math.isfinite(number) or not low <= number <= high:
            raise self.fail(field, f"{value!r} is outside {low}..{high}")
        return number

    def integers(self, field: str, value: object, count: int | None, low: int, high: int) -> tuple[int, ...]:
        """A tuple of ``count`` ints (any number if None) in ``low``..``high``."""
        if type(value) is not tuple:
            raise self.fail(field, f"expected a tuple, got {type(value).__name__}")
        if count is not None and len(value) != count:
            raise self.fail(field, f"{len(value)} values instead of {count}")
        for i, item in enumerate(value):
            self.integer(f"{field}[{i}]", item, low, high)
        return value
