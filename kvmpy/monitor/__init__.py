"""Monitors: QMP (qmp.py), the human monitor (hmp.py), over sockets (server.py).

The machine implements control.VmControl; ``start_servers`` is what the run
command calls.
"""

from __future__ import annotations

import atexit
import logging

from ..events import EventLoop
from .control import ControlError, VmControl

log = logging.getLogger(__name__)

__all__ = ["ControlError", "VmControl", "start_servers"]


def start_servers(control: VmControl, qmp_specs=(), hmp_specs=(), events: EventLoop | None = None) -> list:
    """Start a QMP server per ``qmp_specs`` entry and a human monitor per
    ``hmp_specs`` entry (``unix:/path``, ``tcp:HOST:PORT``, ``telnet:HOST:PORT``).

    Returns the servers. Each is closed (socket file removed, threads joined)
    by ``control.on_close`` when the control offers it, and at interpreter exit
    in any case. Also gives the control an ``hmp`` attribute (an Hmp for the
    console's Ctrl-A c) if it has none. A bad or busy address raises ConfigError
    after closing the servers already started.
    """
    from .hmp import Hmp, start_hmp_server
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
        on_close = getattr(control, "on_close", None)
        if callable(on_close):
            on_close(srv.close)
        atexit.register(srv.close)
    if getattr(control, "hmp", None) is None:
        try:
            control.hmp = Hmp(control)
        except AttributeError:
            pass
    return servers
