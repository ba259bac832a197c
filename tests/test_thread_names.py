"""Every thread of a VM process has a name of its own (kvmpy.threadname), as QEMU's
with -name debug-threads=on: ps -L, top -H and a per-thread CPU count
(bench.tcp's) tell the vCPU from the event loop and the data planes."""

from __future__ import annotations

import os
import threading

import pytest

from kvmpy.threadname import NAME_BYTES, NamedThread, name_this_thread


def comm(pid: int | str, tid: int | str) -> str:
    with open(f"/proc/{pid}/task/{tid}/comm", encoding="utf-8", errors="replace") as f:
        return f.read().rstrip("\n")


def named_in_a_thread(name: str) -> str:
    seen = []

    def body():
        name_this_thread(name)
        seen.append(comm("self", threading.get_native_id()))
    t = threading.Thread(target=body)
    t.start()
    t.join()
    return seen[0]


def test_a_thread_takes_the_name_it_gives_itself_and_leaves_the_main_threads_alone():
    main_before = comm("self", threading.get_native_id())
    assert named_in_a_thread("CPU 3/KVM") == "CPU 3/KVM"
    assert comm("self", threading.get_native_id()) == main_before


def test_a_long_name_is_cut_to_the_kernels_fifteen_bytes():
    long = "a-vm-with-a-long-name-events"
    assert named_in_a_thread(long) == long[:NAME_BYTES]


def test_a_named_thread_shows_its_python_name_to_the_kernel():
    """kvmpy's own threads (nbd sessions, the profile sampler, service workers): ps
    shows what threading names them, cut to the kernel's limit."""
    seen = []

    def body():
        seen.append(comm("self", threading.get_native_id()))
    for name in ("nbd-127.0.0.1:5", "service-a-vm-with-a-long-name"):
        t = NamedThread(target=body, name=name)
        t.start()
        t.join()
    assert seen == ["nbd-127.0.0.1:5", "service-a-vm-with-a-long-name"[:NAME_BYTES]]


def test_the_translators_alarm_thread_names_itself():
    """Else it keeps its creator's name: a second "CPU 0/TCG" beside the vCPU's."""
    import time
    from kvmpy import _tcg
    from support.polling import wait_for
    def tasks():
        names = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                names[tid] = comm("self", tid)
            except FileNotFoundError:
                pass                        # a thread that ended meanwhile
        return names
    # Earlier tests in this worker process may have left a translator vCPU and its
    # alarm running: only the threads this test starts are judged.
    before = set(tasks())
    cpu = _tcg.Cpu(0)
    armed = threading.Event()

    def vcpu():                             # the alarm starts on the vCPU's thread
        name_this_thread("CPU 0/TCG")
        cpu.kick_at(time.monotonic_ns() + 10 ** 9)
        armed.set()
    t = threading.Thread(target=vcpu)
    t.start()
    t.join()
    assert armed.is_set()
    try:
        def started():
            return [name for tid, name in tasks().items() if tid not in before]
        # the alarm may run under its creator's name for a moment before it renames itself
        assert wait_for(lambda: started() == ["kvmpy-tcg-alarm"]), started()
    finally:
        cpu.kick_at(None)


@pytest.mark.guest
def test_a_running_vms_threads_are_all_named(tmp_path, kvm_required):
    """The vCPU thread is QEMU's "CPU 0/KVM", at the thread id query-cpus-fast gives;
    no thread but the main one keeps the process's name."""
    from test_block_errors import Vm
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(8 << 20))
    vm = Vm(tmp_path, f"file={img},format=raw", "sector=8 bytes=4096 waitkey=1")
    try:
        vm.read_until(b"virtio-blk: waiting for a key")
        [cpu] = vm.qmp.cmd("query-cpus-fast")
        assert comm(vm.proc.pid, cpu["thread-id"]) == "CPU 0/KVM"
        main = comm(vm.proc.pid, vm.proc.pid)
        names = {tid: comm(vm.proc.pid, tid) for tid in os.listdir(f"/proc/{vm.proc.pid}/task")
                 if int(tid) != vm.proc.pid}
        assert "kvmpy-events" in names.values(), names
        assert [tid for tid, name in names.items() if name == main] == [], (main, names)
        vm.key()
        assert vm.finish() == 0
    finally:
        vm.close()
