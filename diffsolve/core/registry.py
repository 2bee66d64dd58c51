"""The solver registry: name -> solver class, with metadata (as torchdiffeq's SOLVERS dict).

    @register("euler", family="ode", order=1, calls_per_step=1, deterministic=True, ...)
    class Euler(Solver): ...

An alias registers the same class again under another name with some options fixed
(``register("ddpm", ..., fixed={"eta": 1.0})(DDIM)``): one implementation, several names.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .options import declared
from .protocol import Solver

S = TypeVar("S", bound=Solver)

FAMILIES = ("ode", "sde", "pc", "adaptive", "mcmc", "reversible")

_REGISTRY: dict[str, SolverInfo] = {}
_ALIASES: dict[str, str] = {}  # another name people know -> the registry name


def normalize(name: str) -> str:
    """A solver name as the registry keys it: lower case, hyphens for underscores and spaces (so
    ComfyUI's and k-diffusion's ``dpmpp_2m_sde`` and ``euler_ancestral`` find their entries)."""
    return "-".join(name.strip().lower().replace("_", " ").split())


@dataclass(frozen=True)
class SolverInfo:
    """What the registry knows of a solver."""

    name: str
    cls: type[Solver]
    family: str
    order: float
    calls_per_step: int
    deterministic: bool
    invertible: bool
    fixed_grid: bool
    description: str
    reference: str
    fixed: dict = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    cfg_pp_aliases: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """Every name this entry answers to: its own, the underscore spelling of ComfyUI and
        k-diffusion (where it differs), and its aliases."""
        snake = self.name.replace("-", "_")
        return (self.name, *((snake,) if snake != self.name else ()), *self.aliases)

    @property
    def options(self) -> dict[str, Any]:
        """The options the solver takes, with their defaults (fixed options excluded)."""
        return {k: s.default for k, s in declared(self.cls).items() if s.alias_of is None and k not in self.fixed}

    def option_help(self) -> list[str]:
        """One line per option: allowed values, default and meaning (``diffsolve solvers --options``)."""
        return [s.describe() for k, s in declared(self.cls).items() if k not in self.fixed]


def register(
    name: str,
    *,
    family: str,
    order: float,
    calls_per_step: int,
    deterministic: bool,
    description: str,
    reference: str,
    invertible: bool = False,
    fixed_grid: bool = True,
    fixed: dict | None = None,
    aliases: tuple[str, ...] = (),
    cfg_pp_aliases: tuple[str, ...] = (),
) -> Callable[[type[S]], type[S]]:
    """Class decorator adding a solver to the registry under ``name`` (lower-case, hyphens), also
    found under ``aliases`` (other names people know it by, e.g. a peer's spelling); its CFG++ name
    ``<name>-cfg-pp`` also under ``cfg_pp_aliases`` (a peer's name for the solver under CFG++)."""
    if name != normalize(name):
        raise ValueError(f"solver names are lower-case with hyphens, got {name!r}")
    for a in (*aliases, *cfg_pp_aliases):
        if normalize(a) in _REGISTRY or normalize(a) in _ALIASES or normalize(a) == name:
            raise ValueError(f"{name}: the alias {a!r} already names a solver")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")

    def deco(cls: type[S]) -> type[S]:
        if name in _REGISTRY:
            raise ValueError(f"a solver named {name!r} is already registered ({_REGISTRY[name].cls.__name__})")
        info = SolverInfo(
            name,
            cls,
            family,
            order,
            calls_per_step,
            deterministic,
            invertible,
            fixed_grid,
            description,
            reference,
            dict(fixed or {}),
            tuple(aliases),
            tuple(cfg_pp_aliases),
        )
        if "__init__" in vars(cls):
            raise TypeError(
                f"{name}: a registered solver declares its options as Option class attributes "
                f"(diffsolve.core.options) instead of an __init__ of its own ({cls.__name__})"
            )
        unknown = set(info.fixed) - set(declared(cls))
        if unknown:
            raise ValueError(f"{name}: fixed options {sorted(unknown)} are not options of {cls.__name__}")
        if name in _ALIASES:
            raise ValueError(f"{name!r} is already an alias of {_ALIASES[name]!r}")
        _REGISTRY[name] = info
        _ALIASES.update({normalize(a): name for a in aliases})
        _ALIASES.update({normalize(a): name + CFG_PP for a in cfg_pp_aliases})
        if not info.fixed:
            cls.name = name  # the canonical name (aliases fix options and keep it)
        return cls

    return deco


#: the ending of a CFG++ name: ``<solver>-cfg-pp`` (ComfyUI's ``euler_cfg_pp``) is ``<solver>`` run under
#: :class:`~diffsolve.guidance.CFGPlusPlus`, for the solvers that step with the (x0, eps) pair
CFG_PP = "-cfg-pp"


def cfg_pp_base(name: str) -> str | None:
    """The registry name ``name`` is the CFG++ name of (``euler_cfg_pp`` -> ``euler``), else None."""
    key = normalize(name)
    key = _ALIASES.get(key, key)
    if key in _REGISTRY or not key.endswith(CFG_PP):
        return None
    base = key[: -len(CFG_PP)]
    return _ALIASES.get(base, base)


def solver_info(name: str) -> SolverInfo:
    """The registry entry for ``name``; an unknown name gets the closest names in the error. A CFG++
    name (``<solver>-cfg-pp``) finds its solver's entry."""
    if not isinstance(name, str):
        raise TypeError(f"solver must be a name (str) or a Solver, got {type(name).__name__}")
    key = normalize(name)
    key = _ALIASES.get(key, key)
    if key in _REGISTRY:
        return _REGISTRY[key]
    base = cfg_pp_base(name)
    if base is not None and base in _REGISTRY:
        return _REGISTRY[base]
    close = difflib.get_close_matches(key, [*_REGISTRY, *_ALIASES], n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown solver {name!r}{hint} Known solvers: {', '.join(sorted(_REGISTRY))}")


def get_solver(name: str, **options: Any) -> Solver:
    """Instantiate the solver ``name`` with ``options``; bad option names get a clear error.

    A CFG++ name, ``<solver>-cfg-pp`` (ComfyUI's ``euler_cfg_pp``, ``dpmpp_2m_cfg_pp``, ...), gives
    ``<solver>`` flagged ``cfg_pp`` (named ``<solver>-cfg-pp``): :func:`diffsolve.sample` then runs it
    under :class:`~diffsolve.guidance.CFGPlusPlus` (see :meth:`DiffusionModel.for_solver`). Only
    solvers that step with the (x0, eps) pair (``steps_with_pair``) have one."""
    base = cfg_pp_base(name)
    if base is not None and base in _REGISTRY:
        solver = get_solver(base, **options)
        if not solver.steps_with_pair:
            raise ValueError(
                f"no CFG++ solver {name!r}: {base!r}{_given(solver)} does not step with x0 and eps as "
                f"separate terms; CFG++ names: {', '.join(n + CFG_PP for n in pair_solvers())}"
            )
        solver.cfg_pp, solver.name = True, base + CFG_PP
        return solver
    info = solver_info(name)
    allowed = info.options
    aliases = {k for k, s in declared(info.cls).items() if s.alias_of is not None}
    for k, v in options.items():
        if k in info.fixed:
            if v != info.fixed[k]:
                raise ValueError(
                    f"solver {info.name!r} fixes {k}={info.fixed[k]!r}; got {k}={v!r} (use {info.cls.name!r} to set it)"
                )
        elif k not in allowed and k not in aliases:
            close = difflib.get_close_matches(k, list(allowed), n=2)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            opts = ", ".join(f"{o}={d!r}" for o, d in allowed.items()) or "none"
            raise TypeError(f"solver {info.name!r} has no option {k!r}{hint}; its options are: {opts}")
    solver = info.cls(**{**options, **info.fixed})
    solver.name = info.name
    return solver


def registered() -> list[SolverInfo]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def pair_solvers() -> list[str]:
    """The entries that step with the (x0, eps) pair at their default options (``steps_with_pair``,
    which may depend on the options): those CFG++ works with."""
    return [i.name for i in registered() if get_solver(i.name).steps_with_pair]


def _given(solver: Solver) -> str:
    opts = {k: getattr(solver, k) for k in sorted(getattr(solver, "given", ()))}
    return f" ({', '.join(f'{k}={v!r}' for k, v in opts.items())})" if opts else ""


class SolverTable(list):
    """A list of :class:`SolverInfo` that prints as a table."""

    COLUMNS = (
        "name",
        "family",
        "order",
        "calls/step",
        "stochastic",
        "invertible",
        "grid",
        "also",
        "description",
        "paper",
    )

    def rows(self) -> list[tuple[str, ...]]:
        return [
            (
                i.name,
                i.family,
                f"{i.order:g}",
                str(i.calls_per_step),
                "no" if i.deterministic else "yes",
                "exact" if i.invertible else "-",
                "fixed" if i.fixed_grid else "adaptive",
                ", ".join([*i.names[1:], *(f"{a} (CFG++)" for a in i.cfg_pp_aliases)]) or "-",
                i.description,
                i.reference,
            )
            for i in self
        ]

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.COLUMNS) + " |", "|" + "---|" * len(self.COLUMNS)]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows()]
        return "\n".join(lines)

    def __str__(self) -> str:
        rows = [self.COLUMNS, *self.rows()]
        widths = [max(len(r[c]) for r in rows) for c in range(len(self.COLUMNS))]
        fmt = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()
        return "\n".join([fmt(rows[0]), fmt(tuple("-" * w for w in widths)), *map(fmt, rows[1:])])

    __repr__ = __str__


def list_solvers(family: str | None = None) -> SolverTable:
    """The registry as a table (print it, or iterate over its :class:`SolverInfo` rows)."""
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return SolverTable(i for i in registered() if family is None or i.family == family)
