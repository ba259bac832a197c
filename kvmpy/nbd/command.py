"""``kvmpy nbd``: qemu-nbd's command line over kvmpy's block drivers.

    kvmpy nbd -f qcow2 -t -p 10809 disk.qcow2           # nbd://HOST:10809
    kvmpy nbd -r -k /run/disk.sock disk.raw            # nbd+unix:///?socket=/run/disk.sock
    kvmpy nbd -c /dev/nbd0 -f qcow2 disk.qcow2         # the kernel's /dev/nbd0 shows the image
    kvmpy nbd -d /dev/nbd0
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile

from ..block import open_image, probe_format
from ..block.imgcli import _one_line_errors, create_image
from ..errors import UserError
from ..lifecycle import Pidfile, daemonize
from ..pathcheck import refuse_special_file
from ..unixsock import listen_unix
from . import protocol as p
from .server import Export, ExportOptions, NbdServer

log = logging.getLogger(__name__)

DEFAULT_PORT = 10809
DEFAULT_BIND = "0.0.0.0"
CACHE_MODES = ("none", "writeback", "writethrough", "directsync", "unsafe")


class NbdUsageError(UserError):
    """A bad kvmpy nbd command line or an address it cannot listen on."""


def _port(text: str) -> int:
    try:
        port = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {text} out of range 0-65535")
    return port


def _shared(text: str) -> int:
    try:
        n = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid shared device number {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"invalid shared device number {text!r}")
    return n


def _seconds(text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if not 0 < s <= 3600:
        raise argparse.ArgumentTypeError(f"{text}: must be more than 0 and at most 3600 seconds")
    return s


def register(subparsers) -> None:
    cmd = _one_line_errors(subparsers.add_parser(
        "nbd", help="export a disk image over NBD (qemu-nbd)",
        description="Serve IMAGE over the Network Block Device protocol, as qemu-nbd does."))
    cmd.set_defaults(func=run)
    cmd.add_argument("-r", "--read-only", action="store_true", help="export read-only")
    cmd.add_argument("-f", "--format", choices=("raw", "qcow2"), help="image format (default: probed)")
    cmd.add_argument("-x", "--export-name", default="", help="export name (default: empty)")
    cmd.add_argument("-D", "--description", default="", help="a human-readable description of the export")
    cmd.add_argument("-p", "--port", type=_port, help=f"TCP port to listen on (default {DEFAULT_PORT})")
    cmd.add_argument("-b", "--bind", help=f"address to listen on (default {DEFAULT_BIND})")
    cmd.add_argument("-k", "--socket", metavar="PATH", help="listen on a unix socket instead of TCP")
    cmd.add_argument("-e", "--shared", type=_shared, default=1, metavar="NUM",
                     help="serve up to NUM clients at once (default 1; 0: no limit but the server's own)")
    cmd.add_argument("--multi-conn", action="store_true",
                     help="tell clients they may open several connections (needs -e 2 or more); "
                          "off by default: one connection is faster with a Python server")
    cmd.add_argument("-t", "--persistent", action="store_true", help="keep serving after the last client leaves")
    cmd.add_argument("--fork", action="store_true", help="go to the background once listening")
    cmd.add_argument("--pid-file", metavar="PATH", help="write the server's pid here")
    cmd.add_argument("-A", "--allocation-depth", action="store_true",
                     help="offer the qemu:allocation-depth meta context (which layer of the chain holds data)")
    cmd.add_argument("-s", "--snapshot", action="store_true",
                     help="serve a temporary overlay over IMAGE: clients' writes never reach IMAGE")
    cmd.add_argument("-c", "--connect", metavar="DEV", help="connect IMAGE to the kernel's nbd device DEV")
    cmd.add_argument("-d", "--disconnect", action="store_true", help="disconnect the nbd device IMAGE names")
    cmd.add_argument("-n", "--nocache", dest="cache", action="store_const", const="none",
                     help="same as --cache=none")
    cmd.add_argument("--cache", choices=CACHE_MODES, default="writeback")
    cmd.add_argument("--discard", choices=("ignore", "unmap"), default="ignore",
                     help="whether TRIM and zero writes may free space (default ignore)")
    cmd.add_argument("--detect-zeroes", choices=("off", "on", "unmap"), default="off", help="write all-zero data as zeroes (unmap: and free it with --discard=unmap)")
    cmd.add_argument("--handshake-limit", type=_seconds, default=10.0, metavar="SECONDS",
                     help="drop a client that has not finished the handshake by then (default 10)")
    cmd.add_argument("-v", "--verbose", action="store_true", help="log each client and each refused request")
    cmd.add_argument("image", metavar="IMAGE")


def run(args) -> int:
    if args.verbose:
        logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
    if args.disconnect:
        from .kernel import disconnect_device
        disconnect_device(args.image)
        print(f"{args.image} disconnected")
        return 0
    if args.connect and (args.socket or args.port is not None or args.bind):
        raise NbdUsageError("-c/--connect: cannot be combined with -k, -p or -b")
    if args.socket and (args.port is not None or args.bind):
        raise NbdUsageError("-k/--socket: cannot be combined with -p or -b")
    if args.multi_conn and args.shared == 1:
        raise NbdUsageError("--multi-conn: needs -e/--shared 2 or more (or 0) for the extra connections")
    if args.cache in ("none", "unsafe", "directsync"):
        # Flushes are always honoured: no mode here loses data a client was told is durable.
        log.info("--cache=%s: served as %s through the page cache", args.cache,
                 "writethrough" if args.cache == "directsync" else "writeback")
    name = _wire_string(args.export_name, "-x/--export-name")
    description = _wire_string(args.description, "-D/--description")
    if args.connect:
        from .kernel import check_device
        check_device(args.connect)
    # Open everything a user can get wrong before going to the background, so the
    # error is one line on the terminal that started us.
    # Clients are as untrusted as guests: a probed image gets the guest's rules
    # (no block 0 write that changes the probe, backing formats named).
    snapshot_dir = None
    if args.snapshot:
        snapshot_dir, driver = _open_snapshot(args)
    else:
        driver = open_image(args.image, args.format, read_only=args.read_only, guard_probe=args.format is None)
    status = 1
    listeners: list[socket.socket] = []
    try:
        options = ExportOptions(name=name, description=description, read_only=args.read_only,
                                discard_unmap=args.discard == "unmap", detect_zeroes=args.detect_zeroes,
                                writethrough=args.cache in ("writethrough", "directsync"),
                                multi_conn=args.multi_conn, allocation_depth=args.allocation_depth)
        export = Export(driver, options)
        pidfile = Pidfile(args.pid_file, create=False).acquire() if args.pid_file else None
        listeners = [] if args.connect else _listen(args)
        if args.format is None:
            # Only now: a command line with an error says that one line and nothing else.
            log.warning("image format was not specified for %s and probing guessed %s; give -f %s. "
                        "A probed raw image refuses writes that would make it probe as another format",
                        args.image, driver.format, driver.format)

        def serve(notify_running=None) -> int:
            if pidfile is not None:
                pidfile.write_pid()
            try:
                return _serve(args, export, listeners, notify_running)
            except BaseException:
                # A --fork child that fails to start ends in os._exit: clean up here.
                if args.socket and listeners:
                    _unlink_socket(args.socket)
                raise
            finally:
                if pidfile is not None:
                    pidfile.release()

        status = daemonize(serve, chdir=False) if args.fork else serve()
    finally:
        if args.socket and listeners:
            _unlink_socket(args.socket)
        status = _flush_and_close(driver, args.image, status)
        if snapshot_dir is not None:
            shutil.rmtree(snapshot_dir, ignore_errors=True)
    return status


def _open_snapshot(args):
    """-s: a qcow2 overlay in a private temporary directory, IMAGE its read-only backing file."""
    base_format = args.format or probe_format(args.image)
    with open_image(args.image, base_format, read_only=True):
        pass        # a bad IMAGE is its own one-line error, not the overlay's
    directory = tempfile.mkdtemp(prefix="kvmpy-nbd-snapshot-")
    try:
        overlay = os.path.join(directory, "overlay.qcow2")
        create_image(overlay, "qcow2", None, backing=os.path.abspath(args.image), backing_fmt=base_format)
        return directory, open_image(overlay, "qcow2", read_only=args.read_only)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


def _flush_and_close(driver, image: str, status: int) -> int:
    """What clients wrote is durable before we exit, whatever the way out."""
    try:
        driver.flush()
    except (OSError, UserError) as e:
        print(f"kvmpy: {image}: flush failed: {e}", file=sys.stderr)
        status = 1
    finally:
        driver.close()
    return status


def _wire_string(text: str, option: str) -> bytes:
    data = text.encode("utf-8", "surrogateescape")
    if len(data) > p.MAX_STRING:
        raise NbdUsageError(f"{option}: longer than {p.MAX_STRING} bytes")
    return data


def _listen(args) -> list[socket.socket]:
    if args.socket:
        path = os.path.abspath(args.socket)
        if os.path.lexists(path):
            refuse_special_file(path, "-k/--socket", NbdUsageError)
            raise NbdUsageError(f"-k/--socket {args.socket}: already exists (remove it if no server uses it)")
        try:
            return [listen_unix(path, 128)]
        except OSError as e:
            raise NbdUsageError(f"-k/--socket {args.socket}: cannot listen: {e.strerror}") from None
    host = args.bind or DEFAULT_BIND
    port = DEFAULT_PORT if args.port is None else args.port
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise NbdUsageError(f"-b/--bind {host}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(addr)
    except OSError as e:
        s.close()
        raise NbdUsageError(f"-p/--port {port}: cannot listen on {host}: {e.strerror}") from None
    s.listen(128)
    if not args.read_only and not ipaddress.ip_address(addr[0].partition("%")[0]).is_loopback:
        # NBD has no authentication without TLS, which kvmpy nbd does not offer.
        log.warning("%s is exported writable to anyone who can reach %s port %d; "
                    "-b 127.0.0.1, -k PATH or -r keep it safe", args.image, host, port)
    return [s]


def _unlink_socket(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _serve(args, export: Export, listeners, notify_running) -> int:
    server = NbdServer(export, listeners, shared=args.shared, persistent=args.persistent or bool(args.connect),
                       handshake_limit=args.handshake_limit)
    previous = {sig: signal.signal(sig, lambda *_: server.stop()) for sig in (signal.SIGTERM, signal.SIGINT)}
    # The kernel may hand the signal to a session thread; the handler runs only in the main
    # thread, asleep in the accept loop's select: the wakeup fd is what wakes it.
    previous_wakeup_fd = signal.set_wakeup_fd(server.wakeup_fd, warn_on_full_buffer=False)
    kernel = None
    try:
        if args.connect:
            from .kernel import KernelClient
            kernel = KernelClient(args.connect, export, server)
            kernel.start()
        if notify_running is not None:
            notify_running()
        server.serve(before_ending_sessions=kernel.stop if kernel is not None else None)
    finally:
        if kernel is not None:
            kernel.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(previous_wakeup_fd)
        server.close()
    if kernel is not None and kernel.error:
        print(f"kvmpy: {args.connect}: {kernel.error}", file=sys.stderr)
        return 1
    return 0
