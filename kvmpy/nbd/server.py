"""The NBD server: one export, several clients, each on its own thread.

A client thread reads a request, does it against the block driver and answers
before reading the next, so a slow or hostile client stalls only itself, and its
memory is one buffer of SESSION_BUFFER bytes plus, for a larger request (up to
MAX_REQUEST), a loan from a budget all clients share. The drivers
are safe to share between the threads: RawDriver is positional I/O on one
descriptor, Qcow2Driver takes its own lock around every request.

What a client can hold is bounded: ``shared`` sessions at once (more are told
so and dropped), the handshake must end within ``handshake_limit`` seconds, a
request moves at most MAX_REQUEST bytes, and a client that stops reading our
replies is dropped after SEND_TIMEOUT.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass

from ..errors import ImageError
from ..threadname import NamedThread
from . import protocol as p

log = logging.getLogger(__name__)

# A client that reads none of our reply bytes for this long is gone or hostile.
SEND_TIMEOUT = 60.0
# Option payloads we drain to answer "unsupported"; a longer one ends the connection.
MAX_OPTION_DATA = 1 << 20
# Clients past --shared get an answer, not silence, but each costs a thread for a
# moment: past this many at once they are simply closed.
MAX_REFUSING = 16
REFUSAL_LIMIT = 2.0
# A client arriving just as another leaves (the usual "one client after another"
# with --shared 1) waits this long for the slot rather than being turned away.
SLOT_WAIT = 2.0
# BLOCK_STATUS answers at most this many extents per request (the client asks again).
MAX_EXTENTS = 1 << 16
# --shared 0 means "no limit" in qemu-nbd; here a bound all the same.
UNLIMITED_SHARED = 1024
# Each session keeps a buffer this big for its requests; a larger request borrows
# from a budget all sessions share, so N clients sending 32 MiB requests hold at
# most LARGE_BUFFER_BUDGET between them, not N * 32 MiB.
SESSION_BUFFER = 1 << 20
LARGE_BUFFER_BUDGET = 256 << 20


class BufferBudget:
    """Bytes of large request buffers the sessions may hold at once."""

    def __init__(self, total: int):
        self.free = total
        self._cond = threading.Condition()

    def take(self, n: int, stopping) -> None:
        with self._cond:
            while self.free < n:
                if stopping():
                    raise ClientGone("server shutting down")
                self._cond.wait(0.5)
            self.free -= n

    def give(self, n: int) -> None:
        if n:
            with self._cond:
                self.free += n
                self._cond.notify_all()


class ClientGone(Exception):
    """The client closed the connection or timed out; nothing more to send."""


@dataclass(frozen=True)
class ExportOptions:
    name: bytes = b""
    description: bytes = b""
    read_only: bool = False
    discard_unmap: bool = False          # --discard=unmap: TRIM and WRITE_ZEROES may free space
    detect_zeroes: str = "off"           # off | on | unmap
    writethrough: bool = False           # --cache=writethrough|directsync: every write durable
    multi_conn: bool = False
    allocation_depth: bool = False       # -A: offer qemu:allocation-depth


class Export:
    """The image as clients see it: size, flags, and allocation across the backing chain."""

    def __init__(self, driver, options: ExportOptions):
        self.driver = driver
        self.options = options
        self.size = driver.size
        # A probed raw image checks that block 0 will not probe as another format
        # by reading it before each write: two clients writing halves of a magic
        # at once would both pass, so changes to block 0 go one at a time.
        self.block0_lock = threading.Lock()

    def transmission_flags(self, structured: bool) -> int:
        flags = p.TFLAG_HAS_FLAGS | p.TFLAG_SEND_FLUSH | p.TFLAG_SEND_FUA | p.TFLAG_SEND_CACHE
        if self.options.read_only:
            flags |= p.TFLAG_READ_ONLY
        else:
            flags |= p.TFLAG_SEND_TRIM | p.TFLAG_SEND_WRITE_ZEROES
        if structured:
            flags |= p.TFLAG_SEND_DF       # DF only means something with structured replies
        if self.options.multi_conn:
            flags |= p.TFLAG_CAN_MULTI_CONN
        return flags

    def allocation(self, offset: int, length: int) -> tuple[int, int]:
        """(base:allocation flags, run) at offset, run <= length, for the whole chain."""
        return _chain_allocation(self.driver, offset, length)

    def depth(self, offset: int, length: int) -> tuple[int, int]:
        """(qemu:allocation-depth value, run): 0 unallocated in the whole chain, 1 this
        image, 2 its backing file, and so on."""
        return _allocation_depth(self.driver, offset, length)

    def contexts(self) -> dict[bytes, int]:
        """The meta contexts this export offers, by name, with the id SET_META_CONTEXT gives them."""
        offered = {p.META_BASE_ALLOCATION.encode(): 1}
        if self.options.allocation_depth:
            offered[p.META_ALLOCATION_DEPTH.encode()] = 2
        return offered

    def context_status(self, context_id: int):
        return self.allocation if context_id == 1 else self.depth


def _chain_allocation(drv, offset: int, length: int) -> tuple[int, int]:
    data, zero, run = drv.block_status(offset, length)
    run = max(1, min(run, length))
    if data:
        # A qcow2 zero cluster is "allocated" but holds no data: a hole that reads zero.
        return (p.STATE_HOLE | p.STATE_ZERO if zero else 0), run
    if zero:
        return p.STATE_HOLE | p.STATE_ZERO, run
    backing = drv.backing
    if backing is None or offset >= backing.size:
        return p.STATE_HOLE | p.STATE_ZERO, run
    return _chain_allocation(backing, offset, min(run, backing.size - offset))


def _allocation_depth(drv, offset: int, length: int) -> tuple[int, int]:
    data, zero, run = drv.block_status(offset, length)
    run = max(1, min(run, length))
    if drv.format == "raw" or data:
        return 1, run           # a raw file holds every byte of itself, holes too
    backing = drv.backing
    if backing is None:
        return 0, run
    if offset >= backing.size:
        return 2, run           # QEMU counts what lies past a backing file's end as that file's
    below, run = _allocation_depth(backing, offset, min(run, backing.size - offset))
    return (below + 1 if below else 0), run


class _Refused(Exception):
    pass


class Session:
    """One client connection, from the greeting to the last reply."""

    def __init__(self, server: "NbdServer", sock: socket.socket, peer: str, *, refuse: str | None = None):
        self.server = server
        self.export = server.export
        self.sock = sock
        self.peer = peer
        self.refuse = refuse           # why this client may not use the export, if it may not
        self.structured = False
        self.no_zeroes = False
        self.context_export: bytes | None = None   # export name the selected contexts are for
        self.context_ids: tuple[int, ...] = ()
        self._buffer = bytearray(0)

    # ------------------------------------------------------------ I/O helpers

    def _recv_exact(self, n: int, deadline: float | None = None, into=None) -> bytes | memoryview:
        view = into if into is not None else memoryview(bytearray(n))
        got = 0
        while got < n:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ClientGone("handshake took too long")
                self.sock.settimeout(left)
            try:
                # Past the handshake nothing times out, so one call may wait for the whole payload.
                k = self.sock.recv_into(view[got:n], n - got, 0 if deadline is not None else socket.MSG_WAITALL)
            except socket.timeout:
                raise ClientGone("handshake took too long") from None
            except OSError as e:
                raise ClientGone(e.strerror or str(e)) from None
            if k == 0:
                raise ClientGone("closed" if got == 0 else "closed in the middle of a message")
            got += k
        return view if into is not None else bytes(view)

    def _send(self, *parts) -> None:
        try:
            if len(parts) == 1:
                self.sock.sendall(parts[0])
                return
            views = [memoryview(x).cast("B") for x in parts if len(x)]
            while views:
                n = self.sock.sendmsg(views)
                while views and n >= len(views[0]):
                    n -= len(views[0])
                    views.pop(0)
                if n:
                    views[0] = views[0][n:]
        except OSError as e:
            raise ClientGone(e.strerror or str(e)) from None

    def _borrow(self, n: int) -> tuple[memoryview, int]:
        """A buffer of n bytes and how much of the shared budget it took (give it back)."""
        if n <= SESSION_BUFFER:
            if len(self._buffer) < n:
                self._buffer = bytearray(SESSION_BUFFER if n > SESSION_BUFFER // 4 else max(n, 65536))
            return memoryview(self._buffer)[:n], 0
        self.server.budget.take(n, lambda: self.server.stopping)
        try:
            return memoryview(bytearray(n)), n
        except MemoryError:
            self.server.budget.give(n)
            raise

    # ------------------------------------------------------------ the session

    def run(self) -> None:
        try:
            if self._handshake():
                self.sock.settimeout(None)
                self._transmission()
        except ClientGone as e:
            log.info("nbd client %s: %s", self.peer, e)
        except p.ProtocolError as e:
            log.warning("nbd client %s dropped: %s", self.peer, e)
        except _Refused:
            pass
        except Exception as e:      # never let one client take the server down
            log.error("nbd client %s dropped after an internal error: %s: %s",
                      self.peer, type(e).__name__, e)
            log.debug("internal error", exc_info=True)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # ------------------------------------------------------------ handshake

    def _handshake(self) -> bool:
        limit = REFUSAL_LIMIT if self.refuse else self.server.handshake_limit
        deadline = time.monotonic() + limit
        self._send(p.server_hello())
        (client_flags,) = struct.unpack(">I", self._recv_exact(4, deadline))
        if client_flags & ~p.KNOWN_CLIENT_FLAGS:
            raise p.ProtocolError(f"unknown client flags {client_flags:#x}")
        fixed = bool(client_flags & p.CLIENT_FLAG_FIXED_NEWSTYLE)
        self.no_zeroes = bool(client_flags & p.CLIENT_FLAG_NO_ZEROES)
        while True:
            magic, option, length = p.option_header(self._recv_exact(p.OPTION_HEADER_SIZE, deadline))
            if magic != p.IHAVEOPT:
                raise p.ProtocolError(f"bad option magic {magic:#x}")
            if option == p.OPT_EXPORT_NAME:
                if length > p.MAX_STRING:
                    raise p.ProtocolError(f"export name of {length} bytes")
                name = self._recv_exact(length, deadline)
                if self.refuse:
                    raise _Refused()
                if name != self.export.options.name:
                    raise p.ProtocolError(f"no export named {name!r}")
                self._send(p.export_old_style(self.export.size, self.export.transmission_flags(self.structured),
                                              self.no_zeroes))
                return True
            if not fixed:
                # Without fixed newstyle the client cannot read an error reply.
                raise p.ProtocolError(f"option {option} from a client without fixed newstyle")
            if length > MAX_OPTION_DATA:
                raise p.ProtocolError(f"option {option} with {length} bytes of data")
            data = self._recv_exact(length, deadline)
            if option == p.OPT_ABORT:
                try:
                    self._send(p.option_reply(option, p.REP_ACK))
                except ClientGone:
                    pass
                return False
            try:
                if self._option(option, data):
                    return True
            except p.OptionError as e:
                text = str(e).encode()[:p.MAX_STRING]
                self._send(p.option_reply(option, e.reply, text))

    def _option(self, option: int, data: bytes) -> bool:
        """Answers one option; True when it starts the transmission phase."""
        if option == p.OPT_LIST:
            if data:
                raise p.OptionError(p.REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
            opts = self.export.options
            self._send(p.option_reply(option, p.REP_SERVER, p.server_entry(opts.name, opts.description)),
                       p.option_reply(option, p.REP_ACK))
            return False
        if option == p.OPT_STARTTLS:
            raise p.OptionError(p.REP_ERR_POLICY, "TLS not configured")
        if option == p.OPT_STRUCTURED_REPLY:
            if data:
                raise p.OptionError(p.REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            if self.structured:
                raise p.OptionError(p.REP_ERR_INVALID, "structured replies already negotiated")
            self.structured = True
            self._send(p.option_reply(option, p.REP_ACK))
            return False
        if option in (p.OPT_INFO, p.OPT_GO):
            return self._info(option, p.parse_info_request(data))
        if option in (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT):
            self._meta_context(option, p.parse_meta_context_request(data))
            return False
        raise p.OptionError(p.REP_ERR_UNSUP, f"option {option} not supported")

    def _info(self, option: int, req: p.InfoRequest) -> bool:
        opts = self.export.options
        if req.name != opts.name:
            raise p.OptionError(p.REP_ERR_UNKNOWN, f"no export named {req.name.decode('utf-8', 'replace')!r}")
        if self.refuse:
            raise p.OptionError(p.REP_ERR_POLICY, self.refuse)
        replies = [p.option_reply(option, p.REP_INFO,
                                  p.info_export(self.export.size, self.export.transmission_flags(self.structured)))]
        if p.INFO_NAME in req.kinds:
            replies.append(p.option_reply(option, p.REP_INFO, p.info_string(p.INFO_NAME, opts.name)))
        if p.INFO_DESCRIPTION in req.kinds and opts.description:
            replies.append(p.option_reply(option, p.REP_INFO, p.info_string(p.INFO_DESCRIPTION, opts.description)))
        replies.append(p.option_reply(option, p.REP_INFO,
                                      p.info_block_size(p.MIN_BLOCK, p.PREFERRED_BLOCK, p.MAX_REQUEST)))
        replies.append(p.option_reply(option, p.REP_ACK))
        self._send(*replies)
        if option == p.OPT_GO:
            if self.context_export != opts.name:
                self.context_ids = ()
            return True
        return False

    def _meta_context(self, option: int, req: p.MetaContextRequest) -> None:
        if not self.structured:
            raise p.OptionError(p.REP_ERR_INVALID, "meta contexts need structured replies first")
        if req.name != self.export.options.name:
            raise p.OptionError(p.REP_ERR_UNKNOWN, f"no export named {req.name.decode('utf-8', 'replace')!r}")
        offered = self.export.contexts()
        if option == p.OPT_LIST_META_CONTEXT:
            # A query names a context or, ending in ':', a whole namespace.
            listed = [name for name in offered
                      if not req.queries or any(q == name or (q.endswith(b":") and name.startswith(q))
                                                for q in req.queries)]
            replies = [p.option_reply(option, p.REP_META_CONTEXT, p.meta_context_entry(0, name))
                       for name in listed]
        else:
            self.context_export = req.name
            chosen = [name for name in offered if name in req.queries]
            self.context_ids = tuple(offered[name] for name in chosen)
            replies = [p.option_reply(option, p.REP_META_CONTEXT, p.meta_context_entry(offered[name], name))
                       for name in chosen]
        self._send(*replies, p.option_reply(option, p.REP_ACK))

    # ------------------------------------------------------------ transmission

    _VALID_FLAGS = {
        p.CMD_READ: p.CMD_FLAG_FUA | p.CMD_FLAG_DF,
        p.CMD_WRITE: p.CMD_FLAG_FUA,
        p.CMD_DISC: p.CMD_FLAG_FUA,
        p.CMD_FLUSH: p.CMD_FLAG_FUA,
        p.CMD_TRIM: p.CMD_FLAG_FUA,
        p.CMD_CACHE: p.CMD_FLAG_FUA,
        p.CMD_WRITE_ZEROES: p.CMD_FLAG_FUA | p.CMD_FLAG_NO_HOLE,
        p.CMD_BLOCK_STATUS: p.CMD_FLAG_FUA | p.CMD_FLAG_REQ_ONE,
    }

    def _transmission(self) -> None:
        # Replies the client never reads must not hold this thread forever.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                             struct.pack("ll", int(SEND_TIMEOUT), 0))
        header = memoryview(bytearray(p.REQUEST_SIZE))
        while True:
            try:
                self._recv_exact(p.REQUEST_SIZE, into=header)
            except ClientGone as e:
                raise ClientGone("disconnected without NBD_CMD_DISC" if str(e) == "closed" else str(e)) from None
            req = p.parse_request(bytes(header))
            if req.command == p.CMD_DISC:
                log.info("nbd client %s: disconnected", self.peer)
                return
            self._request(req)

    def _reply_error(self, req: p.Request, error: int, message: str, host_fault: bool = False) -> None:
        # A client's bad request is its business (info); the image failing is the user's (warning).
        log.log(logging.WARNING if host_fault else logging.INFO, "nbd client %s: %s at %d+%d: %s", self.peer,
                p.CMD_NAMES.get(req.command, req.command), req.offset, req.length, message)
        if self.structured and req.command in (p.CMD_READ, p.CMD_BLOCK_STATUS):
            self._send(p.error_chunk(req.cookie, error, message))
        else:
            self._send(p.simple_reply(error, req.cookie))

    def _request(self, req: p.Request) -> None:
        if req.command == p.CMD_WRITE and req.length > p.MAX_REQUEST:
            # Its payload cannot be skipped cheaply: answer and end the connection.
            self._reply_error(req, p.EINVAL, f"request of {req.length} bytes (limit {p.MAX_REQUEST})")
            raise p.ProtocolError(f"write of {req.length} bytes")
        moves_data = req.command in (p.CMD_READ, p.CMD_WRITE) and req.length <= p.MAX_REQUEST
        buf, borrowed = self._borrow(req.length if moves_data else 0)
        try:
            self._serve_request(req, buf)
        finally:
            self.server.budget.give(borrowed)

    def _serve_request(self, req: p.Request, data: memoryview) -> None:
        cmd = req.command
        size = self.export.size
        if cmd == p.CMD_WRITE:
            self._recv_exact(req.length, into=data)
        if cmd not in self._VALID_FLAGS:
            return self._reply_error(req, p.EINVAL, f"unknown command {cmd}")
        if req.flags & ~self._VALID_FLAGS[cmd]:
            return self._reply_error(req, p.EINVAL, f"unsupported flags {req.flags:#x}")
        if req.flags & p.CMD_FLAG_DF and not self.structured:
            return self._reply_error(req, p.EINVAL, "DF flag without structured replies")
        writes = cmd in (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES)
        if writes and self.export.options.read_only:
            return self._reply_error(req, p.EPERM, "export is read-only")
        if cmd == p.CMD_READ and req.length > p.MAX_REQUEST:
            return self._reply_error(req, p.EINVAL, f"request of {req.length} bytes (limit {p.MAX_REQUEST})")
        if cmd != p.CMD_FLUSH and (req.offset > size or req.length > size - req.offset):
            error = p.ENOSPC if cmd in (p.CMD_WRITE, p.CMD_WRITE_ZEROES) else p.EINVAL
            return self._reply_error(req, error, f"past the end of the export ({size} bytes)")
        try:
            if cmd == p.CMD_READ:
                return self._read(req, data)
            if cmd == p.CMD_BLOCK_STATUS:
                return self._block_status(req)
            self._modify(req, data if cmd == p.CMD_WRITE else None)
        except (ImageError, OSError) as e:
            error = p.host_error_to_nbd(e) if isinstance(e, OSError) else p.EIO
            return self._reply_error(req, error, str(e), host_fault=True)
        self._send(p.simple_reply(0, req.cookie))

    def _modify(self, req: p.Request, data: memoryview | None) -> None:
        if req.offset < BLOCK0 and req.command != p.CMD_FLUSH:
            with self.export.block0_lock:
                return self._modify_unlocked(req, data)
        return self._modify_unlocked(req, data)

    def _modify_unlocked(self, req: p.Request, data: memoryview | None) -> None:
        drv = self.export.driver
        opts = self.export.options
        cmd = req.command
        if (req.offset < BLOCK0 and cmd in (p.CMD_WRITE, p.CMD_WRITE_ZEROES, p.CMD_TRIM)
                and drv.restrict_block0):
            # Zeroing can complete a magic too ("QED\0"): zeroes in block 0 of a
            # probed raw image go through the driver's checked write path.
            head = min(req.length, BLOCK0 - req.offset)
            if cmd == p.CMD_WRITE:
                drv.pwritev([data], req.offset)
            elif cmd == p.CMD_WRITE_ZEROES or opts.discard_unmap:
                drv.pwritev([memoryview(_ZERO_CHUNK)[:head]], req.offset)
                rest = req.length - head
                if rest:
                    self._modify_unlocked(p.Request(req.flags & ~p.CMD_FLAG_FUA, cmd, req.cookie,
                                                  req.offset + head, rest), None)
            if req.flags & p.CMD_FLAG_FUA or opts.writethrough:
                drv.flush()
            return
        if cmd == p.CMD_WRITE and req.length:
            if opts.detect_zeroes != "off" and _all_zero(data):
                drv.write_zeroes(req.offset, req.length,
                                 may_unmap=opts.detect_zeroes == "unmap" and opts.discard_unmap)
            else:
                drv.pwritev([data], req.offset)
        elif cmd == p.CMD_WRITE_ZEROES and req.length:
            drv.write_zeroes(req.offset, req.length,
                             may_unmap=opts.discard_unmap and not req.flags & p.CMD_FLAG_NO_HOLE)
        elif cmd == p.CMD_TRIM and req.length and opts.discard_unmap:
            drv.discard(req.offset, req.length)
        elif cmd == p.CMD_CACHE:
            return              # advisory; the page cache serves the next read anyway
        if cmd == p.CMD_FLUSH or req.flags & p.CMD_FLAG_FUA or (opts.writethrough and cmd != p.CMD_CACHE):
            drv.flush()

    def _read(self, req: p.Request, buf: memoryview) -> None:
        drv = self.export.driver
        if not self.structured:
            try:
                drv.preadv([buf], req.offset)
            except (ImageError, OSError) as e:
                return self._reply_error(req, p.host_error_to_nbd(e) if isinstance(e, OSError) else p.EIO, str(e),
                                         host_fault=True)
            return self._send(p.simple_reply(0, req.cookie), buf)
        if req.length == 0:
            return self._send(p.done_chunk(req.cookie))
        pieces = [(req.offset, req.length, False)] if req.flags & p.CMD_FLAG_DF else self._read_pieces(req)
        last = len(pieces) - 1
        for i, (off, n, hole) in enumerate(pieces):
            flags = p.REPLY_FLAG_DONE if i == last else 0
            if hole:
                self._send(p.offset_hole(flags, req.cookie, off, n))
                continue
            view = buf[off - req.offset:off - req.offset + n]
            try:
                drv.preadv([view], off)
            except (ImageError, OSError) as e:
                error = p.host_error_to_nbd(e) if isinstance(e, OSError) else p.EIO
                log.warning("nbd client %s: read at %d+%d: %s", self.peer, off, n, e)
                return self._send(p.error_chunk(req.cookie, error, str(e), offset=off))
            self._send(p.offset_data_header(flags, req.cookie, off, n), view)

    def _read_pieces(self, req: p.Request) -> list[tuple[int, int, bool]]:
        """The read split into data and runs that read as zeroes (sent as holes)."""
        pieces: list[tuple[int, int, bool]] = []
        pos, end = req.offset, req.offset + req.length
        while pos < end:
            flags, run = self.export.allocation(pos, end - pos)
            hole = bool(flags & p.STATE_ZERO)
            if pieces and pieces[-1][2] == hole:
                o, n, _ = pieces[-1]
                pieces[-1] = (o, n + run, hole)
            else:
                pieces.append((pos, run, hole))
            pos += run
        return pieces

    def _block_status(self, req: p.Request) -> None:
        if not self.context_ids:
            return self._reply_error(req, p.EINVAL, "no meta context negotiated")
        if req.length == 0:
            return self._reply_error(req, p.EINVAL, "block status of 0 bytes")
        chunks = [p.block_status_chunk(p.REPLY_FLAG_DONE if i == len(self.context_ids) - 1 else 0, req.cookie,
                                       context_id, self._extents(req, self.export.context_status(context_id)))
                  for i, context_id in enumerate(self.context_ids)]
        self._send(*chunks)

    def _extents(self, req: p.Request, status) -> list[tuple[int, int]]:
        one = bool(req.flags & p.CMD_FLAG_REQ_ONE)
        extents: list[list[int]] = []
        pos, end = req.offset, req.offset + req.length
        while pos < end:
            flags, run = status(pos, end - pos)
            if extents and extents[-1][1] == flags and extents[-1][0] + run <= 0xFFFFFFFF:
                extents[-1][0] += run
            elif len(extents) >= (1 if one else MAX_EXTENTS):
                break
            else:
                extents.append([min(run, 0xFFFFFFFF), flags])
                run = extents[-1][0]
            pos += run
        return [(n, f) for n, f in extents]


_ZERO_CHUNK = bytes(1 << 20)
BLOCK0 = 512


def _all_zero(data: memoryview) -> bool:
    # bytes.startswith is a memcmp; memoryview == compares element by element, 10x slower.
    step = len(_ZERO_CHUNK)
    return all(_ZERO_CHUNK.startswith(data[i:i + step]) for i in range(0, len(data), step))


class NbdServer:
    """Accepts clients on the given listening sockets and serves them the export."""

    def __init__(self, export: Export, listeners: list[socket.socket], *, shared: int = 1,
                 persistent: bool = False, handshake_limit: float = 10.0):
        self.export = export
        self.listeners = listeners
        self.shared = shared if shared > 0 else UNLIMITED_SHARED
        self.persistent = persistent
        self.handshake_limit = handshake_limit
        self._lock = threading.Lock()
        self._sessions: dict[Session, threading.Thread] = {}
        self._refusing = 0
        self._slot_freed = threading.Condition(self._lock)
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.stopping = False
        self.budget = BufferBudget(LARGE_BUFFER_BUDGET)

    @property
    def wakeup_fd(self) -> int:
        """Writing a byte here wakes the accept loop to look at ``stopping``."""
        return self._stop_w

    def stop(self) -> None:
        """From any thread or a signal handler: end the accept loop."""
        self.stopping = True
        try:
            os.write(self._stop_w, b"x")
        except OSError:
            pass

    def add_client(self, sock: socket.socket, peer: str) -> None:
        """Serve a connection that did not come through a listener (the kernel's, for -c)."""
        with self._lock:
            self._start_session(sock, peer, None)

    def serve(self, before_ending_sessions=None) -> None:
        """Accept and serve until stop(), or until the last client leaves when not persistent.
        ``before_ending_sessions`` runs while the clients are still served (the kernel's
        client, told to disconnect, sends its NBD_CMD_DISC through one of them)."""
        sel = selectors.DefaultSelector()
        for ls in self.listeners:
            ls.setblocking(False)
            sel.register(ls, selectors.EVENT_READ)
        sel.register(self._stop_r, selectors.EVENT_READ)
        try:
            while not self.stopping:
                for key, _ in sel.select():
                    if key.fileobj == self._stop_r:
                        continue
                    self._accept(key.fileobj)
        finally:
            sel.close()
            for ls in self.listeners:
                ls.close()
            try:
                if before_ending_sessions is not None:
                    before_ending_sessions()
            finally:
                self._end_sessions()

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, addr = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as e:
            # EMFILE and friends: keep serving those we have; the client will retry.
            log.warning("nbd: cannot accept a connection: %s", e.strerror)
            time.sleep(0.05)
            return
        sock.setblocking(True)
        peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else (addr or "unix")
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            if len(self._sessions) < self.shared:
                return self._start_session(sock, peer, None)
            if self._refusing >= MAX_REFUSING:
                log.info("nbd client %s refused: %d clients already connected (--shared %d)",
                            peer, len(self._sessions), self.shared)
                sock.close()
                return
            self._refusing += 1
        session = Session(self, sock, peer,
                          refuse=f"server is serving its limit of {self.shared} clients (--shared)")
        NamedThread(target=self._run_waiting, args=(session,), name="nbd-waiting", daemon=True).start()

    def _start_session(self, sock: socket.socket, peer: str, refuse) -> None:
        session = Session(self, sock, peer, refuse=refuse)
        thread = NamedThread(target=self._run_session, args=(session,), name=f"nbd-{peer}", daemon=True)
        self._sessions[session] = thread
        log.info("nbd client %s connected", peer)
        thread.start()

    def _run_waiting(self, session: Session) -> None:
        """A client past --shared: admitted if a slot frees within SLOT_WAIT, else refused."""
        with self._lock:
            admitted = self._slot_freed.wait_for(
                lambda: self.stopping or len(self._sessions) < self.shared, SLOT_WAIT) and not self.stopping
            if admitted:
                self._refusing -= 1
                session.refuse = None
                self._sessions[session] = threading.current_thread()
        if admitted:
            log.info("nbd client %s connected", session.peer)
            return self._run_session(session)
        log.info("nbd client %s refused: %d clients already connected (--shared %d)",
                 session.peer, self.shared, self.shared)
        try:
            session.run()
        finally:
            with self._lock:
                self._refusing -= 1
            session.close()

    def _run_session(self, session: Session) -> None:
        try:
            session.run()
        finally:
            # The slot is free before the client sees the end: it may reconnect at once.
            with self._lock:
                self._sessions.pop(session, None)
                last = not self._sessions
                self._slot_freed.notify()
            session.close()
            if last and not self.persistent:
                self.stop()

    def _end_sessions(self, timeout: float = 10.0) -> None:
        with self._lock:
            sessions = list(self._sessions.items())
        for session, _ in sessions:
            try:
                session.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for _, thread in sessions:
            thread.join(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        for fd in (self._stop_r, self._stop_w):
            try:
                os.close(fd)
            except OSError:
                pass
