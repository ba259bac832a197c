"""The ``kvmpy`` command: argparse front end.

Each subsystem contributes its subcommand through ``register(subparsers)``; the
handler it sets with ``set_defaults(func=...)`` takes the parsed args and
returns the exit status. UserError anywhere becomes one line and status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .errors import UserError

# Modules that add subcommands. A module missing from a partial checkout is skipped.
SUBCOMMAND_MODULES = (
    "kvmpy.runcmd",          # run
    "kvmpy.infocmd",         # info
    "kvmpy.block.imgcli",    # img
    "kvmpy.service",         # service
    "kvmpy.guestbuild",      # guest
    "kvmpy.nested",          # selftest nested
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvmpy", description="A virtual machine monitor in Python.")
    parser.add_argument("--version", action="version", version=f"kvmpy {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="kvmpy: %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"kvmpy: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
