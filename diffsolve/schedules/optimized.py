"""The saved result of :func:`diffsolve.optimize_grid`: a grid of times with what it was fitted for.

An :class:`OptimizedGrid` holds the grid (the model's schedule times, and the noise levels
sigma/alpha they stand for), the solver and options it was fitted with, the step count, the model's
identity, and the errors it was fitted to and checked at (on noise disjoint from the fit's). It is a
small JSON file: ``grid.save(path)`` / ``OptimizedGrid.load(path)``. ``ds.sample(grid=...)``,
``DiffsolveScheduler(steps_grid=...)`` and the CLI's ``--grid FILE`` take the object or the file
(:func:`as_optimized_grid`), and warn when it is used with another solver or another model than it
was fitted for.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

FORMAT = "diffsolve-optimized-grid"
VERSION = 1


def _to_json(values) -> list:
    """Floats for JSON, inf as the string "inf" (JSON has no infinity)."""
    return [v if math.isfinite(v) else "inf" for v in values]


def _from_json(values) -> list[float]:
    return [math.inf if v == "inf" else float(v) for v in values]


@dataclass
class OptimizedGrid:
    """A step grid optimised for one model and one solver (see the module docstring).

    ``grid``: the times, descending (``steps + 1`` of them), in the model's schedule; ``sigmas``: the
    noise level sigma/alpha at each (``inf`` where alpha = 0); ``solver`` and ``options``: what it
    was fitted with; ``model``: the model's identity (:func:`model_identity`); ``fit_error`` and
    ``heldout_error``: RMS error of the final samples against the teacher's (less the ``search["trim"]``
    fraction of samples with the largest errors), on the fitting noise and on disjoint held-out noise; ``baseline``: the held-out error of the solver on its default grid
    at the same step count; ``search``: how it was found (tiers, candidates, teacher, costs);
    ``teleport``: where the run starts when the grid hands over from a Gaussian's exact flow
    (``{"from": t, "to": t, "gaussian": fingerprint}``; ``ds.sample`` then needs ``teleport=`` that
    :class:`~diffsolve.models.Gaussian`), None otherwise; ``calls``: the tuned model calls of
    :mod:`diffsolve.models.tuned`, one entry per grid time in each of ``"times"`` (the time the model
    is asked at for a query at that grid time), ``"sigmas"`` (its noise level sigma/alpha) and
    ``"data_weights"`` (the weight of the model's data prediction), None where the calls are not tuned."""

    grid: list[float]
    sigmas: list[float]
    solver: str
    options: dict[str, Any]
    steps: int
    model: dict[str, Any]
    fit_error: float
    heldout_error: float
    baseline: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)
    teleport: dict[str, Any] | None = None
    calls: dict[str, list[float]] | None = None

    def __post_init__(self):
        g = [float(t) for t in self.grid]
        if len(g) != self.steps + 1 or len(self.sigmas) != len(g):
            raise ValueError(f"an optimized grid of {self.steps} steps has {self.steps + 1} times and sigmas")
        if any(not math.isfinite(t) for t in g) or any(a <= b for a, b in zip(g, g[1:])):
            raise ValueError(f"an optimized grid's times must be finite and strictly descending, got {g}")
        self.grid = g
        self.sigmas = [float(s) for s in self.sigmas]
        if self.calls is not None:
            if not isinstance(self.calls, dict) or set(self.calls) != {"times", "sigmas", "data_weights"}:
                raise ValueError("an optimized grid's calls hold 'times', 'sigmas' and 'data_weights'")
            if any(len(v) != len(g) for v in self.calls.values()):
                raise ValueError(f"an optimized grid's calls need {len(g)} entries each, one per time")
            self.calls = {k: _from_json(vals) for k, vals in self.calls.items()}

    # ------------------------------------------------------------------------------------ use
    def times(self) -> torch.Tensor:
        return torch.tensor(self.grid, dtype=torch.float64)

    def check_teleport(self, gaussian) -> None:
        """Refuse a run without the Gaussian this grid hands over from (or with one where it hands
        over from none); warn when it is another Gaussian than the one it was fitted with."""
        if self.teleport is None:
            if gaussian is not None:
                raise ValueError(
                    "teleport: this optimized grid starts at the schedule's t_max (it was fitted without a "
                    "teleport); leave teleport out, or fit a grid with ds.optimize_grid(teleport=...)"
                )
            return
        if gaussian is None:
            raise ValueError(
                f"teleport: this optimized grid hands over at t={self.teleport['to']:.6g} from a Gaussian's exact "
                "flow; pass teleport=the diffsolve.models.Gaussian it was fitted with"
            )
        if gaussian.fingerprint() != self.teleport.get("gaussian"):
            warnings.warn("this grid was optimised with another Gaussian teleport than the one given", stacklevel=3)

    def check_use(self, solver_name: str | None, model=None) -> None:
        """Warn when used with a solver (name) or a model other than the ones it was fitted for: a
        grid fitted to one solver's update is not optimal for another's."""
        if solver_name is not None and solver_name != self.solver:
            warnings.warn(
                f"this grid was optimised for solver {self.solver!r}; it is used with {solver_name!r}, "
                f"for which it is not optimal (run ds.optimize_grid for {solver_name!r})",
                stacklevel=3,
            )
        if model is not None:
            ident = model_identity(model)
            if ident.get("fingerprint") != self.model.get("fingerprint"):
                warnings.warn(
                    f"this grid was optimised for another model ({self.model.get('net')}, "
                    f"{self.model.get('schedule')}); it is used with {ident.get('net')}, {ident.get('schedule')}",
                    stacklevel=3,
                )

    # ------------------------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sigmas"] = _to_json(self.sigmas)
        if self.calls is not None:
            d["calls"]["sigmas"] = _to_json(self.calls["sigmas"])
        return {"format": FORMAT, "version": VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OptimizedGrid:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"not a diffsolve optimized grid (its 'format' is not {FORMAT!r})")
        if d.get("version") != VERSION:
            raise ValueError(f"optimized grid version {d.get('version')!r}; this diffsolve reads version {VERSION}")
        keys = {k: v for k, v in d.items() if k not in ("format", "version")}
        keys["sigmas"] = _from_json(keys.get("sigmas", []))
        try:
            return cls(**keys)
        except TypeError as e:
            raise ValueError(f"a malformed optimized grid: {e}") from None

    def save(self, path: str | os.PathLike, force: bool = False) -> Path:
        """Write the grid as JSON, atomically (a temporary file renamed); an existing file is kept
        unless ``force``."""
        path = Path(path)
        if path.exists() and not force:
            raise FileExistsError(f"{path} exists; pass force=True (--force) to overwrite it")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=1)
                f.write("\n")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> OptimizedGrid:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no optimized grid file {str(path)!r}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not JSON: {e}") from None
        return cls.from_dict(d)

    def __repr__(self) -> str:
        return (
            f"OptimizedGrid({self.solver!r}, steps={self.steps}, heldout_error={self.heldout_error:.3g}, "
            f"default grid {self.baseline.get('heldout_error', float('nan')):.3g})"
        )


def is_grid_file(spec) -> bool:
    """Whether a grid argument names an optimized grid: the object, or a path ending in .json."""
    return isinstance(spec, OptimizedGrid) or (
        isinstance(spec, (str, os.PathLike)) and str(spec).lower().endswith(".json")
    )


def as_optimized_grid(spec) -> OptimizedGrid:
    return spec if isinstance(spec, OptimizedGrid) else OptimizedGrid.load(spec)


# ---------------------------------------------------------------------------------------- identity
def _unwrap(model):
    while hasattr(model, "inner"):
        model = model.inner
    return model


def _digest(obj, h, depth: int) -> None:
    """Feed what ``obj`` computes with into ``h``: a tensor's shape and up to 4096 of its values
    (evenly strided); a module's state dict and public attributes; a function's name, closure and
    owner; an object's class and attributes; containers item by item; anything else its repr."""
    if isinstance(obj, torch.Tensor):
        flat = obj.detach().reshape(-1)
        h.update(f"{tuple(obj.shape)}".encode())
        h.update(flat[:: max(1, flat.numel() // 4096)].to("cpu", torch.float64).numpy().tobytes())
        return
    if depth <= 0 or obj is None or isinstance(obj, (bool, int, float, str)):
        h.update(repr(obj).encode())
        return
    if isinstance(obj, (list, tuple)):
        for item in obj:
            _digest(item, h, depth - 1)
        return
    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            _digest(obj[k], h, depth - 1)
        return
    h.update(type(obj).__qualname__.encode())
    if isinstance(obj, torch.nn.Module):
        for name, tensor in obj.state_dict().items():
            h.update(name.encode())
            _digest(tensor, h, 1)
    if callable(obj) and hasattr(obj, "__code__"):
        h.update(obj.__qualname__.encode())
        _digest([c.cell_contents for c in obj.__closure__ or ()], h, depth - 1)
    if hasattr(obj, "__self__"):
        _digest(obj.__self__, h, depth - 1)
    public = {k: v for k, v in getattr(obj, "__dict__", {}).items() if not k.startswith("_")}
    _digest(public, h, depth - 1)


def model_identity(model) -> dict[str, Any]:
    """What identifies a model for a grid fitted to it: its schedule, parameterisation, network class
    and a fingerprint of what the network computes with (:func:`_digest`: its weights, or an oracle's
    tensors), with the guidance wrappers around it (class and scale)."""
    base = _unwrap(model)
    net = base.net
    h = hashlib.sha256()
    h.update(repr(base.schedule).encode())
    h.update(str(base.prediction).encode())
    _digest(net, h, 3)
    wrappers = []
    m = model
    while hasattr(m, "inner"):
        wrappers.append({"type": type(m).__name__, "scale": getattr(m, "guidance_scale", None)})
        m = m.inner
    h.update(json.dumps(wrappers).encode())
    return {
        "net": getattr(net, "__name__", type(net).__name__),
        "schedule": repr(base.schedule),
        "prediction": str(base.prediction),
        "guidance": wrappers,
        "fingerprint": h.hexdigest()[:16],
    }
