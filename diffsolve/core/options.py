"""Declarative solver options: each option a class attribute with its default, meaning and allowed values.

    class DDIM(Solver):
        eta = Option(0.0, "the noise fraction: 0 is deterministic DDIM, 1 is DDPM", low=0.0, high=1.0)

:class:`~diffsolve.core.protocol.Solver` collects a class's options (its own and its bases'), takes
them as keyword arguments, checks and converts each value here (one place for every solver), and
sets it as an instance attribute; a solver's ``check_options`` adds the checks that involve several
options. The registry reads the defaults from the same declarations, and ``diffsolve solvers
--options NAME`` prints their help.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, Generic, TypeVar, overload

import torch

Tensor = torch.Tensor

T = TypeVar("T")


class Option(Generic[T]):
    """One solver option.

    ``kind``: ``float`` (a real number, not a bool, never NaN; a 0-d real tensor is taken; stored as
    float), ``int`` (an integer, not a bool), ``bool`` (True or False), ``str`` or ``object`` (any
    value, checked by ``choices`` / ``types`` / ``convert``); default: the default value's type.
    ``low`` / ``high``: the allowed range (closed unless ``low_open`` / ``high_open``).
    ``choices``: the allowed values. ``types``: the allowed classes (with ``what`` describing them in
    the error). ``convert``: a function applied to the value after the checks (it may refuse it, with
    an error of its own). ``alias_of``: the option this one is another name for (it then takes no
    default of its own: None means not given).
    """

    def __init__(
        self,
        default: T,
        help: str = "",
        *,
        kind: type | None = None,
        low: float | None = None,
        high: float | None = None,
        low_open: bool = False,
        high_open: bool = False,
        choices: tuple | None = None,
        types: tuple[type, ...] | None = None,
        what: str | None = None,
        convert: Callable[[Any], Any] | None = None,
        alias_of: str | None = None,
    ):
        self.default, self.help = default, help
        self.kind = kind if kind is not None else (object if default is None or types is not None else type(default))
        if self.kind not in (float, int, bool, str, object):
            self.kind = object
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open
        self.choices, self.types, self.what, self.convert = choices, types, what, convert
        self.alias_of = alias_of
        self.name = "option"

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    # A non-data descriptor: an instance reads the value its __init__ set (the instance's own attribute
    # wins); the class reads the Option. Typed so that a solver's ``self.eta`` is the option's value.
    @overload
    def __get__(self, obj: None, owner: type | None = None) -> Option[T]: ...

    @overload
    def __get__(self, obj: object, owner: type | None = None) -> T: ...

    def __get__(self, obj: object | None, owner: type | None = None) -> Any:
        return self if obj is None else self.default

    # --------------------------------------------------------------------------------------- checks
    def range_text(self) -> str:
        """The allowed range as text ("in [0, 1]", ">= 0", "> 0"), empty without bounds."""
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            return f"in {'(' if self.low_open else '['}{lo:g}, {hi:g}{')' if self.high_open else ']'}"
        if lo is not None:
            return f"{'>' if self.low_open else '>='} {lo:g}"
        if hi is not None:
            return f"{'<' if self.high_open else '<='} {hi:g}"
        return ""

    def _in_range(self, v: float) -> bool:
        lo, hi = self.low, self.high
        return (lo is None or (v > lo if self.low_open else v >= lo)) and (
            hi is None or (v < hi if self.high_open else v <= hi)
        )

    def check(self, value: Any, name: str | None = None) -> Any:
        """``value`` checked and converted; a clear error naming the option (or ``name``, the alias
        the caller used) and what it takes."""
        name = self.name if name is None else name
        if self.choices is not None:
            ok = not isinstance(value, (Tensor, list, dict)) and value in self.choices
            if not ok or (isinstance(value, bool) and not any(isinstance(c, bool) for c in self.choices)):
                raise ValueError(f"{name} must be one of {', '.join(map(str, self.choices))}, got {value!r}")
        elif self.kind is float:
            real = isinstance(value, numbers.Real) or (
                isinstance(value, Tensor) and value.ndim == 0 and not value.is_complex()
            )
            if isinstance(value, bool) or not real:
                raise TypeError(f"{name} must be a number{self._range_suffix()}, got {value!r}")
            value = float(value)
            if math.isnan(value) or not self._in_range(value):
                raise ValueError(f"{name} must be {self.range_text() or 'a number'}, got {value!r}")
            if math.isinf(value) and value not in (self.default, self.low, self.high):
                # infinite only where the option says so (a default or bound of that infinity)
                raise ValueError(f"{name} must be a finite number{self._range_suffix()}, got {value!r}")
        elif self.kind is int:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be an integer{self._range_suffix()}, got {value!r}")
            value = int(value)
            if not self._in_range(value):
                raise ValueError(f"{name} must be an integer {self.range_text()}, got {value!r}")
        elif self.kind is bool:
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        elif self.kind is str and not isinstance(value, str):
            raise TypeError(f"{name} must be a string, got {value!r}")
        if (
            self.types is not None
            and not (value is None and self.default is None)
            and not isinstance(value, self.types)
        ):
            what = self.what or " or ".join(t.__name__ for t in self.types)
            raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
        return value if self.convert is None else self.convert(value)

    def _range_suffix(self) -> str:
        r = self.range_text()
        return f" {r}" if r else ""

    # ----------------------------------------------------------------------------------------- help
    def describe(self) -> str:
        """One line of help: name, allowed values, default and meaning."""
        if self.alias_of is not None:
            return f"{self.name}: another name for {self.alias_of}"
        if self.choices is not None:
            allowed = "one of " + ", ".join(map(repr, self.choices))
        elif self.kind in (float, int):
            allowed = ("an integer" if self.kind is int else "a number") + self._range_suffix()
        elif self.kind is bool:
            allowed = "True or False"
        elif self.kind is str:
            allowed = "a string"
        elif self.types is not None:
            allowed = self.what or " or ".join(t.__name__ for t in self.types)
        else:
            allowed = "any value"
        return f"{self.name} ({allowed}; default {self.default!r}): {self.help}".rstrip(": ")


def declared(cls: type) -> dict[str, Option]:
    """The options of a class and its bases, in declaration order (bases first; an option a subclass
    declares again keeps its base's place)."""
    out: dict[str, Option] = {}
    for klass in reversed(cls.__mro__):
        for k, v in vars(klass).items():
            if isinstance(v, Option):
                out[k] = v
    return out


def resolve(cls: type, solver: str, given: dict[str, Any]) -> tuple[dict[str, Any], frozenset[str]]:
    """Every option of ``cls`` from the keyword arguments ``given``: unknown names refused (TypeError
    with the closest names and the list of options), aliases folded into their option (both given:
    an error naming both), each value checked by its :class:`Option`, defaults filled in. Returns the
    values and the names of the options given (aliases under their option's name)."""
    import difflib

    specs = declared(cls)
    for k in given:
        if k not in specs:
            close = difflib.get_close_matches(k, list(specs), n=2)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            opts = ", ".join(f"{o}={s.default!r}" for o, s in specs.items() if s.alias_of is None) or "none"
            raise TypeError(f"solver {solver!r} has no option {k!r}{hint}; its options are: {opts}")
    values = {k: v for k, v in given.items() if specs[k].alias_of is None}
    checked = {k: specs[k].check(v) for k, v in values.items()}
    for k, v in given.items():
        target = specs[k].alias_of
        if target is None or v is None:
            continue
        if target in values:
            raise ValueError(f"give {target} or its alias {k}, not both")
        values[target] = v
        checked[target] = specs[target].check(v, name=k)
    return (
        {
            k: checked[k] if k in checked else spec.check(spec.default)
            for k, spec in specs.items()
            if spec.alias_of is None
        },
        frozenset(values),
    )
