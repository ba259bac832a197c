"""The ``kvmpy`` command: argparse front end.

Each subsystem contributes its subcommand through ``register(subparsers)``; the
handler it sets with ``set_defaults(func=...)`` takes the parsed args and
returns the exit status. UserError anywhere becomes one line and status 2.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import TYPE_CHECKING, NoReturn

from . import __version__
from .errors import UserError

if TYPE_CHECKING:
    import argparse

# Modules that add subcommands, by the command each adds. A module missing from a
# partial checkout is skipped. The tools (kvmpy.tools) are named here only: nothing
# else in the VMM imports them.
COMMAND_MODULES = {
    "run": "kvmpy.runcmd",
    "info": "kvmpy.infocmd",
    "img": "kvmpy.block.imgcli",
    "nbd": "kvmpy.nbd.command",
    "service": "kvmpy.service",
    "guest": "kvmpy.tools.guestbuild",
    "selftest": "kvmpy.tools.nested",       # selftest nested
}
SUBCOMMAND_MODULES = tuple(COMMAND_MODULES.values())


def _named_command(argv: list[str] | None) -> str | None:
    """The subcommand argv names, when it is a known one (after -v/-vv/--verbose)."""
    args = sys.argv[1:] if argv is None else argv
    for a in args:
        if a in ("--verbose",) or (a.startswith("-") and not a.startswith("--") and set(a[1:]) == {"v"}):
            continue
        return a if a in COMMAND_MODULES else None
    return None


def build_parser(argv: list[str] | None = None, *, all_commands: bool = True) -> argparse.ArgumentParser:
    """The parser; with ``all_commands=False`` and a known command in argv, only that
    command's module is imported (the others cost more than half of `kvmpy run`'s
    start-up, which matters where Python runs slowly, as in a nested L1). argparse
    itself is imported here: a run in QEMU's spelling never needs it."""
    import argparse

    class Parser(argparse.ArgumentParser):
        # argparse makes a help formatter at every add_argument (to check the metavar),
        # and a formatter without a width imports shutil (with zlib, bz2 and lzma) for
        # the terminal's: 4 ms of `kvmpy run`'s 100 ms of imports (host) for a width it never prints.
        # The same width, found without it. Subcommands' parsers are this class too.
        def _get_formatter(self):
            return self.formatter_class(prog=self.prog, width=_help_width())

    parser = Parser(prog="kvmpy", description="A virtual machine monitor in Python.")
    parser.add_argument("--version", action="version", version=f"kvmpy {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    # Every subcommand sets its handler (set_defaults(func=...)); none given leaves None.
    parser.set_defaults(func=None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    command = None if all_commands else _named_command(argv)
    for name in ((COMMAND_MODULES[command],) if command else SUBCOMMAND_MODULES):
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        mod.register(sub)
    return parser


def _help_width() -> int:
    """argparse's own help width: shutil.get_terminal_size's columns (COLUMNS, else
    the terminal on standard output, else 80), less 2."""
    import os
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return (columns or 80) - 2


def _qemu_run_args(argv: list[str] | None) -> list[str] | None:
    """The arguments after `run` when they are in QEMU's spelling (kvmpy.qemu_cli): `-hda`
    would otherwise be argparse's `-h da`."""
    args = sys.argv[1:] if argv is None else argv
    if _named_command(args) != "run":
        return None
    rest = args[args.index("run") + 1:]
    from .qemu_spelling import wants_qemu_parser
    return rest if wants_qemu_parser(rest) else None


def main(argv: list[str] | None = None) -> int:
    qemu_args = _qemu_run_args(argv)
    if qemu_args is not None:
        return _main_qemu(argv, qemu_args)
    parser = build_parser(argv, all_commands=False)
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="kvmpy: %(levelname)s %(name)s: %(message)s")
    if args.func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"kvmpy: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        return 130


def main_process() -> NoReturn:
    """The process's entry (``python3 -m kvmpy``, the kvmpy script): main(), then the
    exit; a VM process's (``run``) skips the interpreter's teardown (runcmd.end_vm_process)."""
    status = main()
    if _named_command(None) == "run":
        # Imported by main already: a sandboxed VM process may open no module now.
        importlib.import_module("kvmpy.runcmd").end_vm_process(status)
    sys.exit(status)


def _main_qemu(argv: list[str] | None, qemu_args: list[str]) -> int:
    args = sys.argv[1:] if argv is None else argv
    verbose = sum(a.count("v") for a in args[:args.index("run")] if a != "--verbose") + args.count("--verbose")
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="kvmpy: %(levelname)s %(name)s: %(message)s")
    from .qemu_cli import run_qemu
    try:
        return run_qemu(qemu_args, allow_config=True)
    except UserError as e:
        print(f"kvmpy: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    main_process()
