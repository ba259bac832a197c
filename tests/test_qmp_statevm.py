"""A machine without hardware: a real VmControl implementation for protocol tests.

Its vCPUs are plain threads that count "instructions" while running and park on
a condition while paused, so pause/resume are observable (the counter stops),
thread ids are real, and events come from those threads as they would from
KVM exits. The "guest" honours the ACPI power button unless told not to, and
then shuts down from a vCPU thread a little later.
"""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvmpy.monitor.control import ControlError, VmControl


class StateVm:
    def __init__(self, name: str = "toy", ncpus: int = 2, *, handles_acpi: bool = True,
                 start_paused: bool = False, kvm: bool = True):
        self.name = name
        self.handles_acpi = handles_acpi
        self.kvm = kvm
        self._lock = threading.Condition()
        self._state = "prelaunch" if start_paused else "running"
        self._listeners = []
        self._parked = 0
        self._powerdown_requested = False
        self.quit_called = threading.Event()
        self.counters = [0] * ncpus
        self.calls: list[str] = []
        self.announcements: list = []      # announce-self parameters, as the monitors built them
        self._closers = []
        self._threads = [threading.Thread(target=self._vcpu, args=(i,), daemon=True,
                                          name=f"toy-vcpu{i}") for i in range(ncpus)]
        self._tids = [0] * ncpus
        for t in self._threads:
            t.start()
        with self._lock:
            self._lock.wait_for(lambda: all(self._tids))

    # -- the vCPU loop --
    def _vcpu(self, index: int) -> None:
        self._tids[index] = threading.get_native_id()
        with self._lock:
            self._lock.notify_all()
        while True:
            with self._lock:
                if self._state != "running":
                    self._parked += 1
                    self._lock.notify_all()
                    self._lock.wait_for(lambda: self._state in ("running", "gone"))
                    self._parked -= 1
                if self._state == "gone":
                    return
                self.counters[index] += 1
                guest_sees_button = self._powerdown_requested and index == 0
                if guest_sees_button:
                    self._powerdown_requested = False
            if guest_sees_button and self.handles_acpi:
                time.sleep(0.05)        # the guest's shutdown path takes a moment
                with self._lock:
                    if self._state == "running":
                        self._state = "shutdown"
                        self._lock.notify_all()
                self._emit("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})
            time.sleep(0.001)

    def _emit(self, event: str, data: dict) -> None:
        for cb in list(self._listeners):
            cb(event, data)

    # -- VmControl --
    def status(self) -> str:
        with self._lock:
            return "shutdown" if self._state == "gone" else self._state

    def pause(self) -> None:
        self.calls.append("pause")
        with self._lock:
            if self._state != "running":
                return
            self._state = "paused"
            self._lock.notify_all()
            self._lock.wait_for(lambda: self._parked == len(self._threads))
        self._emit("STOP", {})

    def resume(self) -> None:
        self.calls.append("resume")
        with self._lock:
            if self._state in ("shutdown", "internal-error", "guest-panicked", "gone"):
                raise ControlError("Resetting the Virtual Machine is required")
            if self._state == "running":
                return
            self._state = "running"
            self._lock.notify_all()
        self._emit("RESUME", {})

    def reset(self) -> None:
        self.calls.append("reset")
        with self._lock:
            if self._state == "shutdown":
                self._state = "running"
                self._lock.notify_all()
            self.counters = [0] * len(self.counters)
        self._emit("RESET", {"guest": False, "reason": "host-qmp-system-reset"})

    def powerdown(self) -> None:
        self.calls.append("powerdown")
        with self._lock:
            self._powerdown_requested = True
        self._emit("POWERDOWN", {})

    def quit(self) -> None:
        self.calls.append("quit")
        with self._lock:
            if self._state == "gone":
                return
            self._state = "gone"
            self._lock.notify_all()
        self._emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        self.quit_called.set()

    def kvm_info(self) -> dict:
        return {"enabled": self.kvm, "present": True}

    def cpus(self) -> list[dict]:
        return [{"cpu-index": i, "thread-id": tid, "qom-path": f"/machine/unattached/device[{i}]",
                 "target": "x86_64", "props": {"core-id": i, "thread-id": 0, "socket-id": 0}}
                for i, tid in enumerate(self._tids)]

    def block_devices(self) -> list[dict]:
        return [{"device": "virtio0", "qdev": "/machine/peripheral-anon/device[0]/virtio-backend",
                 "locked": False, "removable": False, "type": "unknown",
                 "inserted": {"file": "/var/lib/kvmpy/disk.img", "drv": "raw", "ro": False,
                              "backing_file_depth": 0, "encrypted": False,
                              "cache": {"writeback": True, "direct": False, "no-flush": False}}}]

    def eject(self, device: str, force: bool = False) -> None:
        raise ControlError(f"Device '{device}' is not removable")

    def change_medium(self, device: str, filename: str, format: str | None = None) -> None:
        raise ControlError(f"Device '{device}' is not removable")

    def network_devices(self) -> list[dict]:
        return [{"name": "net0", "type": "tap", "ifname": "tap-toy0", "mac": "52:54:00:12:34:56",
                 "bridge": "br0"}]

    def iothreads(self) -> list[dict]:
        return []

    def announce_self(self, params) -> None:
        self.announcements.append(params)

    def vcpu_registers(self) -> list:
        raise ControlError("info registers is not available for this VM")

    def add_event_listener(self, callback) -> None:
        self._listeners.append(callback)

    def remove_event_listener(self, callback) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def on_close(self, fn) -> None:
        self._closers.append(fn)

    def close(self) -> None:
        with self._lock:
            self._state = "gone"
            self._lock.notify_all()
        for t in self._threads:
            t.join(2)
        for fn in reversed(self._closers):
            fn()
        self._closers.clear()

    def progress(self, wait: float = 0.05) -> bool:
        """Did any vCPU run during the next `wait` seconds?"""
        before = list(self.counters)
        time.sleep(wait)
        return self.counters != before


@pytest.fixture
def vm():
    machine = StateVm()
    yield machine
    machine.close()


def test_statevm_is_a_vmcontrol(vm):
    assert isinstance(vm, VmControl)


def test_statevm_pause_really_stops_vcpus(vm):
    assert vm.progress()
    vm.pause()
    assert not vm.progress()
    vm.resume()
    assert vm.progress()


class StateVmMachine(RuleBasedStateMachine):
    """The toy's run-state transitions stay QEMU-shaped under any command order."""

    def __init__(self):
        super().__init__()
        self.vm = StateVm(ncpus=1, handles_acpi=False)
        self.events = []
        self.vm.add_event_listener(lambda e, d: self.events.append(e))

    @rule()
    def pause(self):
        was = self.vm.status()
        self.vm.pause()
        assert self.vm.status() == ("paused" if was == "running" else was)

    @rule()
    def resume(self):
        was = self.vm.status()
        try:
            self.vm.resume()
        except ControlError:
            assert was == "shutdown"
        else:
            assert self.vm.status() == "running"

    @rule()
    def reset(self):
        self.vm.reset()
        assert self.events[-1] == "RESET"

    @invariant()
    def known_state(self):
        assert self.vm.status() in ("running", "paused", "shutdown")

    def teardown(self):
        self.vm.close()


TestStateVmMachine = StateVmMachine.TestCase
TestStateVmMachine.settings = settings(max_examples=15, stateful_step_count=10, deadline=None)
