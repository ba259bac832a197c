"""Whether `kvmpy run`'s arguments are in QEMU's spelling (kvmpy.qemu_cli parses them
then). Apart from the parser so that `kvmpy run` in its own spelling, the usual case,
does not import QEMU's whole command line to find out."""

from __future__ import annotations

import re

# An argument of `kvmpy run` that only QEMU's grammar explains: a single dash and a
# word (`-hda`, `-enable-kvm`, `-m` excepted: kvmpy's own short option).
_QEMU_LONG = re.compile(r"-[A-Za-z][A-Za-z0-9_-]+(=.*)?")
_KVMPY_RUN_VALUE_OPTIONS = {"--accel", "--kernel", "--initrd", "--append", "-m", "--memory", "--smp", "--serial",
                            "--drive", "--net", "--device", "--name", "--qmp", "--monitor", "--pidfile",
                            "--runas", "--sandbox", "--trace"}


def wants_qemu_parser(args: list[str]) -> bool:
    """Whether `kvmpy run ARGS` is in QEMU's spelling: some argument is a single-dash
    long option (or a single-dash flag QEMU has, such as -S), not the value of a kvmpy option."""
    skip = False
    for a in args:
        if skip:
            skip = False
            continue
        if a in _KVMPY_RUN_VALUE_OPTIONS:
            skip = True
            continue
        if a == "--":
            return False
        if _QEMU_LONG.fullmatch(a) or a in ("-S", "-M", "-L", "-D", "-d", "-k"):
            return True
    return False
