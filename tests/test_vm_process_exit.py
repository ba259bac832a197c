"""The end of a VM process (kvmpy.runcmd.end_vm_process): no interpreter teardown, but
everything an exit owes (atexit handlers, buffered output, the exit status), and
Python's own exit where a non-daemon thread is still running."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRELUDE = """
import atexit, threading, time
import kvmpy.runcmd as runcmd

class Teardown:
    def __del__(self):
        print("interpreter teardown", flush=True)

kept = Teardown()         # a module global: freed by the interpreter's teardown only
atexit.register(lambda: print("atexit handler ran"))
print("buffered line", end="")    # stdout is a pipe: block-buffered until flushed
"""


def _run(body: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", PRELUDE + body], capture_output=True, text=True, timeout=60,
                          env=env, cwd=ROOT)


def test_a_vm_process_skips_the_teardown_and_keeps_what_an_exit_owes():
    r = _run("runcmd.end_vm_process(3)")
    assert r.returncode == 3, r
    assert "buffered line" in r.stdout and "atexit handler ran" in r.stdout, r
    assert "interpreter teardown" not in r.stdout, r


def test_the_same_script_with_pythons_exit_tears_down():
    """The check above can fail: Python's own exit frees the global."""
    r = _run("raise SystemExit(3)")
    assert r.returncode == 3, r
    assert "interpreter teardown" in r.stdout, r


def test_a_running_non_daemon_thread_gets_pythons_exit_which_waits_for_it():
    r = _run("threading.Thread(target=lambda: (time.sleep(0.3), print('thread finished', flush=True))).start()\n"
             "runcmd.end_vm_process(4)")
    assert r.returncode == 4, r
    assert "thread finished" in r.stdout and "atexit handler ran" in r.stdout, r


def test_a_failing_atexit_handler_is_reported_and_the_others_still_run():
    """As in Python's own exit: the handler's traceback on stderr, the status kept."""
    r = _run("def failing():\n    raise RuntimeError('handler failed')\n"
             "atexit.register(failing)\n"
             "runcmd.end_vm_process(5)")
    assert r.returncode == 5, r
    assert "RuntimeError: handler failed" in r.stderr and "atexit handler ran" in r.stdout, r


def test_output_that_cannot_be_flushed_gets_pythons_exit_which_reports_it():
    """A closed stdout is not swallowed by the quick end: Python's exit says so and
    ends with its status for that (120)."""
    r = _run("import sys\n"
             "class Closed:\n"
             "    def write(self, text):\n        return len(text)\n"
             "    def flush(self):\n        raise BrokenPipeError(32, 'Broken pipe')\n"
             "sys.stdout = Closed()\n"
             "runcmd.end_vm_process(0)")
    assert r.returncode == 120 and "BrokenPipeError" in r.stderr, r


def test_kvmpy_run_ends_a_vm_process_that_way():
    """``python3 -m kvmpy run``'s process (a missing kernel is enough), and ``img``'s not."""
    def kvmpy(*argv: str) -> subprocess.CompletedProcess:
        return _run(f"import runpy, sys; sys.argv = ['kvmpy', *{argv!r}]; "
                    "runpy.run_module('kvmpy', run_name='__main__')")
    r = kvmpy("run", "--kernel", "/nonexistent/kernel")
    assert r.returncode == 2 and "/nonexistent/kernel" in r.stderr, r
    assert "atexit handler ran" in r.stdout and "interpreter teardown" not in r.stdout, r
    r = kvmpy("img", "info", "/nonexistent/image")
    assert r.returncode == 2, r
    assert "atexit handler ran" in r.stdout and "interpreter teardown" in r.stdout, r
