"""``diffsolve``'s entry point: parse the command line (with a --config file's settings first), run
the subcommand, and turn its outcome into an exit code.

Exit codes: 0 done; 2 a usage error (argparse's own, or a :class:`~diffsolve.cli.errors.CLIError`:
printed as ``diffsolve: error: <message>``); 1 a run that went non-finite; 130 interrupted. Any
other exception is a bug and propagates with its traceback (for ValueError and TypeError, which
look like usage errors, after a line saying so): the commands turn the library's errors into
CLIErrors only where they hand it what the user gave (:mod:`diffsolve.cli.errors`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import diffsolve as ds

from .commands import COMMANDS
from .config import load_config
from .errors import PROG, CLIError
from .parser import build_parser, subcommands

BUG_NOTE = (
    f"{PROG}: internal error (a bug in diffsolve or a library it calls; please report it with the traceback below)"
)


def explicit(parser: argparse.ArgumentParser, argv: Sequence[str], command: str) -> tuple[set[str], dict]:
    """(the options given in ``argv``, the command's defaults): ``argv`` parsed again with no defaults."""
    defaults = {a.dest: a.default for a in subcommands(parser)[command]._actions}
    bare = build_parser()
    for action in subcommands(bare)[command]._actions:
        action.default = argparse.SUPPRESS
    return set(vars(bare.parse_args(argv))) - {"command"}, defaults


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The arguments, with a --config file's settings placed before the command line's own (so that
    flags given on the command line override them); returns them with the argv they came from."""
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        argv = [argv[0], *load_config(args.config), *argv[1:]]
        args = parser.parse_args(argv)
    if args.command is not None:
        args.given, args.defaults = explicit(parser, argv, args.command)
    return args, argv


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``diffsolve`` with ``argv`` (default: sys.argv[1:]); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args, argv = parse(parser, argv)
    except SystemExit as e:  # argparse: --help, --version, usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except CLIError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return COMMANDS[args.command](args, argv)
    except CLIError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except ds.models.NonFiniteError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(f"{PROG}: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError):
        print(BUG_NOTE, file=sys.stderr)  # not a usage error: keep the traceback
        raise
