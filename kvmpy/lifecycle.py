"""Process lifecycle of a VM process: pidfile, daemonizing, dropping root, signals.

The order the run command follows (each step needs the one before):

    daemonize(start)                  # fork; parent waits for "running" or the error
      start():  pidfile.acquire()     # in the child, so it holds the child's pid
                open /dev/kvm, taps, images, monitor sockets (as root)
                drop_privileges(user)  # before any guest code runs
                start the vCPUs
                SignalActions(control, events=loop).install()
      return  -> parent exits 0; child continues with the VM

Nothing here starts a thread that outlives its owner: SignalActions works on the
process's event loop (or closes the one it made), Pidfile.release() is idempotent
and also runs at exit. Which process runs what: the daemonize parent only waits on
a pipe, the VM process runs the one event loop, the --runas cleanup helper only
waits on a pipe; ``kvmpy service`` is a separate short-lived command.
"""

from __future__ import annotations

import atexit
import fcntl
import logging
import os
import pwd
import signal
import sys
import threading
import time
from typing import Callable, TypeVar

from .errors import UserError
from .events import EVENT_READ, EventLoop, TimerHandle
from .monitor.control import VmControl
from .procfs import process_stat

log = logging.getLogger(__name__)

T = TypeVar("T")


class PidfileError(UserError):
    """The pidfile is held by a live process or cannot be written."""


class PrivilegeError(Exception):
    """Dropping privileges did not stick: continuing would run guests as root."""


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True         # exists, owned by someone else
    # A zombie is dead for our purposes: it will never remove its pidfile.
    stat = process_stat(pid)
    return stat is None or stat.state != "Z"


def read_pidfile(path: str) -> int | None:
    """The pid in ``path``, or None if it is missing or not a pid."""
    try:
        with open(path, "rb") as f:
            text = f.read(64)
    except (FileNotFoundError, IsADirectoryError):
        return None
    except PermissionError as e:
        raise PidfileError(f"{path}: {e.strerror}") from None
    try:
        pid = int(text.strip() or b"-1")
    except ValueError:
        return None
    return pid if pid > 0 else None


class Pidfile:
    """An exclusively created pidfile, removed on exit.

    Created with O_EXCL. If the file exists, it is stale (and replaced) when its
    pid is dead and no process holds its lock; otherwise PidfileError. The open
    file keeps an flock for the process's life, so two kvmpy processes racing to
    replace the same stale file cannot both win.
    """

    def __init__(self, path: str, *, create: bool = True):
        """Creates the pidfile now (PidfileError if a live process holds it)
        unless create=False, in which case acquire() or ``with`` does."""
        self.path = os.path.abspath(path)
        self.pid: int | None = None
        self._fd = -1
        self._atexit = False
        if create:
            self.acquire()

    def acquire(self) -> "Pidfile":
        if self._fd >= 0 and self.pid == os.getpid():
            return self
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                if self._replace_stale():
                    return self
                continue            # it vanished between the two opens: try again
            except OSError as e:
                raise PidfileError(f"{self.path}: cannot create pidfile: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                # Another process locked our freshly created file: it replaced it
                # as stale between our create and lock. It wins.
                os.close(fd)
                raise PidfileError(f"{self.path}: another kvmpy is starting with this pidfile") from None
            self._own(fd)
            return self
        raise PidfileError(f"{self.path}: pidfile keeps changing under us")

    def _replace_stale(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise PidfileError(f"{self.path}: cannot open pidfile: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            pid = read_pidfile(self.path)
            raise PidfileError(f"{self.path}: already in use by running process "
                               f"{pid if pid else '(unknown pid)'}") from None
        try:
            text = os.pread(fd, 64, 0)
            try:
                pid = int(text.strip() or b"-1")
            except ValueError:
                pid = -1
            if pid != os.getpid() and pid_alive(pid):
                raise PidfileError(f"{self.path}: already in use by running process {pid}")
            st = os.fstat(fd)
            try:
                cur = os.stat(self.path)
            except FileNotFoundError:
                os.close(fd)
                return False
            if (cur.st_dev, cur.st_ino) != (st.st_dev, st.st_ino):
                os.close(fd)
                return False
            log.info("%s: replacing stale pidfile of dead process %s", self.path, pid)
        except BaseException:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
            raise
        self._own(fd)
        return True

    def _own(self, fd: int) -> None:
        self._fd = fd
        self.write_pid()
        if not self._atexit:
            atexit.register(self.release)
            self._atexit = True

    def write_pid(self) -> None:
        """(Re)write our pid: after a fork the child calls this on an inherited pidfile."""
        self.pid = os.getpid()
        data = f"{self.pid}\n".encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def release(self) -> None:
        """Remove the pidfile if it is still ours. Idempotent; a forked child
        that did not rewrite it leaves it alone."""
        if self._fd < 0:
            return
        try:
            if self.pid == os.getpid() and read_pidfile(self.path) == self.pid:
                os.unlink(self.path)
        except OSError as e:
            # After drop_privileges the run directory may not be ours to write:
            # the pid inside is dead from now on, so the next start replaces it.
            log.debug("%s: cannot remove pidfile: %s", self.path, e)
        except UserError:
            pass
        finally:
            if self.pid == os.getpid():
                os.close(self._fd)
                self._fd = -1

    remove = release

    def __enter__(self) -> "Pidfile":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------- daemonize

_RUNNING = b"RUNNING\n"


def daemonize(start: Callable[..., T], *, log_path: str | None = None,
              chdir: bool = True) -> T:
    """Fork; run ``start`` in the child; return its result in the child only.

    ``start`` comes in two shapes:
      * ``start()``: sets the VM up and returns once it runs; the child reports
        "running" when it returns, and daemonize returns its result;
      * ``start(notify_running)``: runs the whole VM and calls
        ``notify_running()`` once the vCPUs are started; daemonize returns what
        start returns (the exit status) when the VM has ended.

    The parent waits on a pipe: it exits 0 once the child reports "running", or
    prints the child's one-line startup error and exits with the child's status
    (2 for a UserError, 1 otherwise). The child becomes a session leader, and
    once running points stdin/stdout/stderr at /dev/null (or appends stderr to
    ``log_path``) so that whoever started it (a shell pipeline, systemd,
    ``kvmpy service``) is not held open.

    Call it before any thread exists: fork copies only the calling thread.
    """
    if threading.active_count() > 1:
        names = ", ".join(t.name for t in threading.enumerate() if t is not threading.main_thread())
        raise RuntimeError(f"daemonize() called with threads running: {names}")
    wants_notify = _takes_an_argument(start)
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid > 0:
        os.close(w)
        _parent_wait(r, pid)        # never returns
    os.close(r)
    pipe = [w]
    detach: list[tuple[int, int, int]] = []

    def notify_running() -> None:
        if pipe[0] < 0:
            return
        fd, pipe[0] = pipe[0], -1
        try:
            os.write(fd, _RUNNING)
        except OSError:
            pass    # the parent died: keep the VM running all the same
        os.close(fd)
        null, err, root = detach.pop()
        _detach_stdio(null, err)
        if chdir:
            os.fchdir(root)
        os.close(root)

    try:
        os.setsid()
        # Opened now, not when running: by then the VM process may be sandboxed
        # (kvmpy.sandbox), and a sandboxed process opens nothing.
        detach.append(_open_detach_files(log_path))
        result = start(notify_running) if wants_notify else start()
    except BaseException as e:      # SystemExit too: the parent must hear about it
        if pipe[0] < 0:
            raise                   # already running: an ordinary failure of the VM
        status = _status_for(e)
        if isinstance(e, UserError):
            line = f"kvmpy: {e}"
        elif isinstance(e, SystemExit):
            line = "" if status == 0 else f"kvmpy: startup exited with status {status}"
        else:
            log.exception("startup failed")
            line = f"kvmpy: startup failed: {type(e).__name__}: {e}"
        _report_failure(pipe[0], status, line)
        sys.stderr.flush()
        os._exit(status)
    if pipe[0] >= 0 and wants_notify:
        # The VM ended before it ever ran (or start forgot to notify).
        status = result if isinstance(result, int) and result else 1
        _report_failure(pipe[0], status, f"kvmpy: VM stopped during startup (status {status})")
        os._exit(status)
    notify_running()
    return result


def _takes_an_argument(fn: Callable) -> bool:
    import inspect
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
               for p in params)


def _report_failure(fd: int, status: int, line: str) -> None:
    try:
        os.write(fd, f"ERROR {status} {line}\n".encode(errors="replace"))
    except OSError:
        pass


def _status_for(e: BaseException) -> int:
    if isinstance(e, UserError):
        return e.exit_status
    if isinstance(e, SystemExit):
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    if isinstance(e, KeyboardInterrupt):
        return 130
    return 1


def _parent_wait(r: int, child: int) -> None:
    data = b""
    while True:
        try:
            chunk = os.read(r, 4096)
        except InterruptedError:
            continue
        if not chunk:
            break
        data += chunk
        if data.startswith(_RUNNING):
            os._exit(0)
    os.close(r)
    try:
        _, wstatus = os.waitpid(child, 0)
        status = os.waitstatus_to_exitcode(wstatus)
    except ChildProcessError:
        status = 1
    if data.startswith(b"ERROR "):
        _, code, line = data.decode(errors="replace").rstrip("\n").split(" ", 2)
        if line:
            print(line, file=sys.stderr)
        if status == 0:
            status = int(code) if code.isdigit() else 1
    else:
        status = status if status > 0 else 1
        print(f"kvmpy: VM process exited during startup (status {status})", file=sys.stderr)
    sys.stderr.flush()
    os._exit(status)


def _open_detach_files(log_path: str | None) -> tuple[int, int, int]:
    """(/dev/null, where stderr goes, the root directory) for _detach_stdio and
    the chdir: the daemon's stdio must not hold its starter's terminal or pipe open,
    nor its working directory a mount busy."""
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    err = null
    if log_path:
        try:
            err = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as e:
            log.warning("cannot open log %s: %s; logging to /dev/null", log_path, e)
    root = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return null, err, root


def _detach_stdio(null: int, err: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(err, 2)
    for fd in {null, err}:
        if fd > 2:
            os.close(fd)


# ---------------------------------------------------------- drop privileges

def drop_privileges(user: str) -> None:
    """Become ``user`` for good: supplementary groups, gid, uid, in that order.

    Then make sure root cannot be regained: if setuid(0) succeeds, raise
    PrivilegeError (the caller must not run a guest). Without root, asking for
    a different user is a UserError; asking for oneself is a no-op.
    """
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise UserError(f"--runas: no such user '{user}'") from None
    if os.geteuid() != 0:
        if pw.pw_uid == os.getuid():
            return
        raise UserError(f"--runas {user}: only root can change user")
    if pw.pw_uid == 0:
        raise UserError(f"--runas {user}: that user is root; name an unprivileged user")
    os.initgroups(pw.pw_name, pw.pw_gid)
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise PrivilegeError(f"--runas {user}: could regain root after dropping privileges; refusing to continue")
    if os.getresuid() != (pw.pw_uid,) * 3 or os.getresgid() != (pw.pw_gid,) * 3:
        raise PrivilegeError(f"--runas {user}: uid/gid did not change everywhere; refusing to continue")
    if 0 in os.getgroups() and pw.pw_gid != 0:
        raise PrivilegeError(f"--runas {user}: still in group root; refusing to continue")
    os.environ["HOME"] = pw.pw_dir
    os.environ["USER"] = os.environ["LOGNAME"] = pw.pw_name


# ----------------------------------------------- cleanup after dropping root

def start_cleanup_helper(pidfile: "Pidfile | None", sockets: list[tuple[str, tuple[int, int]]],
                         after: list[Callable[[], None]] = ()) -> Callable[[], None]:
    """Keep a root process that removes the pidfile and monitor sockets once this
    process is gone, then calls each of ``after`` (a bridge kvmpy created, taken
    down); returns ``finish()``, which the VM process calls on its way out.

    After drop_privileges the VM process usually cannot unlink them: they were
    created as root in root's directories (/run, a sticky /tmp). Removing them
    before the drop would leave no pidfile and no socket to connect to; a kept
    directory fd does not help (unlinkat checks the caller's rights at the time).
    So a helper forked while still root waits on a pipe whose only writer is the
    VM process: EOF comes when the VM process exits by any path, SIGKILL included,
    and the helper removes what is still ours, then exits. It holds nothing else
    (every other fd closed), runs no guest code and ignores the terminal's signals.
    A sandboxed VM process (kvmpy.sandbox) has the same need: it may neither
    unlink nor open a netlink socket, so the helper does that for it too.
    """
    vm_pid = os.getpid()
    r, w = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:      # the helper: only os calls from here, then _exit
        status = 0
        try:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
                signal.signal(sig, signal.SIG_IGN)
            # Not the pidfile's lock, stdio or the daemonize pipe: holding them would
            # keep the pidfile locked and the caller waiting for our output.
            os.closerange(0, r)
            os.closerange(r + 1, os.sysconf("SC_OPEN_MAX"))
            while True:
                try:
                    if not os.read(r, 64):
                        break
                except InterruptedError:
                    continue
            for path, identity in sockets:
                _unlink_if_same(path, identity)
            if pidfile is not None:
                _unlink_pidfile_of(pidfile.path, vm_pid)
            for fn in after:
                try:
                    fn()
                except Exception:       # noqa: BLE001 - the others still get their turn
                    status = 1
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(r)

    def finish(timeout: float = 5.0) -> None:
        nonlocal w
        if w < 0:
            return
        os.close(w)
        w = -1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(child, os.WNOHANG)
            except ChildProcessError:
                return
            if done:
                return
            time.sleep(0.01)
    return finish


def _unlink_if_same(path: str, identity: tuple[int, int]) -> None:
    """Only the file we created: a successor may already have bound the path."""
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == identity:
            os.unlink(path)
    except OSError:
        pass


PIDFILE_LOCK_WAIT = 3.0


def _unlink_pidfile_of(path: str, pid: int) -> None:
    """Remove ``path`` if it still names ``pid`` and nobody holds its lock: a
    successor that replaced it as stale holds the lock (Pidfile._replace_stale),
    and our unlink under our own lock makes its identity check fail and retry."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        # The pipe's EOF can come before the dying VM process has closed the
        # pidfile (the kernel closes a process's fds one by one), so its lock may
        # still be held for a moment: wait for it, briefly (a successor that took
        # the file over keeps it, and then the file is not ours to remove).
        deadline = time.monotonic() + PIDFILE_LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return
                time.sleep(0.02)
        text = os.pread(fd, 64, 0)
        st, cur = os.fstat(fd), os.lstat(path)
        if text.strip() == str(pid).encode() and (st.st_dev, st.st_ino) == (cur.st_dev, cur.st_ino):
            os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------ signals

ACTED_ON_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _wakeup_fd_does_the_work(signum, frame) -> None:
    pass


class SignalActions:
    """SIGTERM: ACPI powerdown, then quit if the VM is still there after
    ``powerdown_timeout`` seconds (a second SIGTERM quits at once).
    SIGINT: quit.

    The signal's number reaches a pipe through Python's wakeup fd, written by
    the C-level handler in whichever thread the kernel picked; the event loop
    (``events``, the process's loop; without one, a loop of its own) reads it and
    talks to the machine. The Python-level handler does nothing: it would run
    only in the main thread, which may be blocked in a wait that a signal
    delivered to a vCPU thread never interrupts, and between bytecodes, possibly
    while that thread holds a lock the machine needs. install() must be called
    from the main thread; close() restores the old handlers and wakeup fd, and
    once it returns nothing more is done.
    """

    def __init__(self, control: VmControl, powerdown_timeout: float = 30.0,
                 events: EventLoop | None = None):
        self.control = control
        self.powerdown_timeout = powerdown_timeout
        self._events = events
        self._own_events = False
        self._old: dict[int, object] = {}
        self._pipe_r = self._pipe_w = -1
        self._old_wakeup_fd = -1
        self._powerdown_timer: TimerHandle | None = None
        self._done = False          # quit was asked, or closed: later signals do nothing
        self.quit_reason: str | None = None

    def install(self) -> "SignalActions":
        if self._events is None:
            self._events = EventLoop(name="kvmpy-signals")
            self._own_events = True
            self._events.start()
        self._pipe_r, self._pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._events.subscribe(self._pipe_r, EVENT_READ, self._signals_arrived)
        # A full pipe already holds enough signals to act on.
        self._old_wakeup_fd = signal.set_wakeup_fd(self._pipe_w, warn_on_full_buffer=False)
        for sig in ACTED_ON_SIGNALS:
            self._old[sig] = signal.signal(sig, _wakeup_fd_does_the_work)
        return self

    def _signals_arrived(self, ready: int) -> None:
        try:
            numbers = os.read(self._pipe_r, 64)
        except (BlockingIOError, OSError):
            return
        for sig in numbers:
            # The wakeup fd carries every signal with a Python handler (SIGHUP's too).
            if sig in ACTED_ON_SIGNALS:
                self._on_signal(sig)

    def _on_signal(self, sig: int) -> None:
        if self._done:
            return
        if sig == signal.SIGTERM and self._powerdown_timer is None:
            log.info("SIGTERM: pressing the ACPI power button")
            try:
                self.control.powerdown()
            except Exception as e:
                log.warning("powerdown failed (%s); quitting", e)
                self._quit("powerdown-failed")
                return
            self._powerdown_timer = self._events.call_later(self.powerdown_timeout, self._powerdown_expired)
        else:
            self._quit("sigterm-again" if sig == signal.SIGTERM else "sigint")

    def _powerdown_expired(self) -> None:
        if self._done:
            return
        log.warning("guest ignored the power button for %.0f s; quitting", self.powerdown_timeout)
        self._quit("powerdown-timeout")

    def _quit(self, reason: str) -> None:
        self._done = True
        self.quit_reason = reason
        try:
            self.control.quit()
        except Exception:
            log.exception("quit failed")

    def close(self) -> None:
        for sig, old in self._old.items():
            try:
                signal.signal(sig, old)
            except (ValueError, TypeError):
                pass        # not the main thread, or a handler Python cannot reinstall
        self._old.clear()
        events = self._events
        if events is None or self._pipe_r < 0:
            return
        pipe_r, pipe_w = self._pipe_r, self._pipe_w
        keep_pipe = False
        try:
            signal.set_wakeup_fd(self._old_wakeup_fd)
        except ValueError:
            # Not the main thread: signals keep writing to pipe_w, so the pipe stays
            # open and fills up unread (closed, its numbers could go to an image file).
            keep_pipe = True

        def stop() -> None:
            self._done = True
            if self._powerdown_timer is not None:
                self._powerdown_timer.cancel()
            events.unsubscribe(pipe_r)
        # On the loop's thread, so no action is half done when close returns.
        events.call_and_wait(stop)
        self._pipe_r = self._pipe_w = -1
        if not keep_pipe:
            os.close(pipe_r)
            os.close(pipe_w)
        if self._own_events:
            events.close()
            self._events = None
            self._own_events = False

    def __enter__(self) -> "SignalActions":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.close()
