"""How the command line reports problems.

A user's mistake is a :class:`CLIError`, which :func:`diffsolve.cli.main` prints as
``diffsolve: error: <message>`` with exit code 2. The library raises ValueError and TypeError both
for bad input and for its own bugs, so they become CLIErrors only where the command line hands the
library what the user gave: :func:`user_input` around the calls that validate it (resolving the
solver and its options, the grid, loading files), and :func:`refusals_of` around a run, for the
settings the library can only check once the run meets them. Nothing wraps a whole command: any
other error is a bug and keeps its traceback.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

PROG = "diffsolve"
TIME_RANGE = ("t_max", "t_min")
TIME_RANGE_HINT = " (on the command line: --t-max / --t-min)"


class CLIError(Exception):
    """A user error: printed as ``diffsolve: error: <message>``, exit code 2."""


def warn(message: str) -> None:
    """Print ``diffsolve: warning: <message>`` to stderr."""
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _names(message: str, names: Iterable[str]) -> bool:
    """Whether ``message`` names one of ``names`` as a word of its own (``eta`` is not in ``beta_max``)."""
    return any(re.search(rf"(?<!\w){re.escape(n)}(?!\w)", message) for n in names)


def usage_message(e: BaseException) -> str:
    """``e``'s message, with where to set the time range on the command line when it names t_max or t_min."""
    return f"{e}{TIME_RANGE_HINT if _names(str(e), TIME_RANGE) else ''}"


@contextmanager
def user_input(*errors: type[Exception], prefix: str = "") -> Iterator[None]:
    """Around a call that checks what the user gave: its ValueError and TypeError (or the ``errors``
    given instead) become a :class:`CLIError`, its message preceded by ``prefix``."""
    caught = errors or (ValueError, TypeError)
    try:
        yield
    except caught as e:
        raise CLIError(prefix + usage_message(e)) from e


@contextmanager
def refusals_of(names: Iterable[str]) -> Iterator[None]:
    """Around a run: the library checks some settings only when the run meets them (the reverse SDE's
    infinite drift at a flow's t = 1, a log-SNR solver's infinite end, a guidance method's option).
    A ValueError or TypeError whose message names one of ``names`` (settings the user can change:
    t_max, t_min, the option keys given) is such a refusal and becomes a :class:`CLIError`; any other
    error raised by the run is a bug and propagates with its traceback."""
    names = tuple(names)
    try:
        yield
    except (ValueError, TypeError) as e:
        if not _names(str(e), names):
            raise
        raise CLIError(usage_message(e)) from e
