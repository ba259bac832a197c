"""Monitors: QMP (qmp.py), the human monitor (hmp.py), over sockets (server.py).

A VM offers control.VmControl and nothing else to its monitors. The run command
calls ``start_servers`` for the sockets and ``console_monitor`` for the console's
Ctrl-A c.
"""

from __future__ import annotations

import atexit
import logging

from ..events import EventLoop
from .control import ControlError, VmControl
from .hmp import Hmp

log = logging.getLogger(__name__)

__all__ = ["ControlError", "VmControl", "console_monitor", "start_servers"]


def start_servers(control: VmControl, qmp_specs=(), hmp_specs=(), events: EventLoop | None = None) -> list:
    """Start a QMP server per ``qmp_specs`` entry and a human monitor per
    ``hmp_specs`` entry (``unix:/path``, ``tcp:HOST:PORT``, ``telnet:HOST:PORT``).

    Returns the servers. Each is closed (socket file removed, threads joined)
    when the control closes (``control.on_close``), and at interpreter exit in
    any case. A bad or busy address raises ConfigError after closing the servers
    already started.
    """
    from .hmp import start_hmp_server
    if qmp_specs:       # QMP's module (and json) only in a VM that serves it
        from .qmp import start_qmp_server

    servers: list = []
    try:
        for spec in qmp_specs:
            servers.append(start_qmp_server(spec, control, events))
        for spec in hmp_specs:
            servers.append(start_hmp_server(spec, control, events))
    except BaseException:
        for srv in servers:
            srv.close()
        raise
    for srv in servers:
        control.on_close(srv.close)
        atexit.register(srv.close)
    return servers


def console_monitor(control: VmControl) -> Hmp:
    """The human monitor for the console's Ctrl-A c. Its ``quit`` is deferred
    (``quit_requested``): the console shows the output before the VM goes."""
    return Hmp(control, defer_quit=True)
