"""What a sampling run returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

Tensor = torch.Tensor


@dataclass
class SampleResult:
    """The samples of one run and what it cost.

    ``nfe`` counts network calls (a call on any number of rows counts once); ``nfe_per_sample``
    counts, for each sample, the calls that evaluated its row. ``accepted``/``rejected`` are
    per-sample step counts for adaptive solvers (None otherwise); ``stats`` holds whatever else a
    solver reports (e.g. dmcmc's per-sample start times). ``trajectory`` (on request) lists
    the (t, x) of every model query.
    """

    samples: Tensor
    nfe: int
    nfe_per_sample: Tensor
    grid: Tensor | None
    wall_time: float
    solver: str
    options: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] | None = None
    accepted: Tensor | None = None
    rejected: Tensor | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    trajectory: list[tuple[Any, Tensor]] | None = None

    def __repr__(self) -> str:
        return (f"SampleResult(samples={tuple(self.samples.shape)} {self.samples.dtype}, nfe={self.nfe}, "
                f"solver={self.solver!r}, wall_time={self.wall_time:.3f}s)")


@dataclass
class Latent:
    """What :func:`~diffsolve.invert` returns: the state at t_max that samples back to the data.

    ``x`` is the noise-side state; ``aux`` the second state of a reversible scheme (None for plain
    inversion, e.g. DDIM inversion); ``grid`` the descending time grid to sample on; ``solver`` and
    ``options`` what made it; ``nfe`` what the inversion cost. ``ds.sample(model, solver, latent=lat)``
    reproduces the data: to round-off for reversible solvers, approximately otherwise. A reversible
    latent keeps its states in float64 (as the solver carries them); ``dtype`` is the data's dtype,
    the one the model is run in when sampling it back.
    """

    x: Tensor
    aux: Tensor | None
    grid: Tensor
    solver: str
    options: dict[str, Any] = field(default_factory=dict)
    nfe: int = 0
    dtype: torch.dtype | None = None

    def __repr__(self) -> str:
        pair = ", with its second state" if self.aux is not None else ""
        return f"Latent({tuple(self.x.shape)} {self.x.dtype}{pair}, solver={self.solver!r}, steps={len(self.grid) - 1})"
