"""What the monitors say they are: QEMU's version whose QMP shapes kvmpy follows
(clients such as libvirt and qemu.qmp branch on it), and kvmpy's own."""

from __future__ import annotations

from .. import __version__

QMP_QEMU_VERSION = {"major": 8, "minor": 2, "micro": 0}
PACKAGE = f"kvmpy {__version__}"


def version_info() -> dict:
    """query-version's answer."""
    return {"qemu": dict(QMP_QEMU_VERSION), "package": PACKAGE}


def version_line() -> str:
    """`info version`'s answer, as QEMU prints it."""
    v = QMP_QEMU_VERSION
    return f"{v['major']}.{v['minor']}.{v['micro']} ({PACKAGE})\n"
