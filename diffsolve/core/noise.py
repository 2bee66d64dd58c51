"""Noise sources for one run: per-sample seeds, optionally a Brownian tree.

Every sample owns a ``torch.Generator`` seeded with its own seed (as EDM's generate.py does), so
sample i draws the same numbers whatever the batch it sits in: same seed, same device, same dtype
gives bitwise the same samples for any batch size. With ``kind="brownian"`` the per-step noise of
SDE solvers comes from a virtual Brownian tree per sample (:mod:`.brownian`, keyed by the same seed):
the noise of a step [t_next, t] is (W(t) - W(t_next)) / sqrt(t - t_next), so the Brownian path is one
fixed function of time, the same at 20 and at 40 steps and consistent for rejected-and-retried steps.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from .brownian import BrownianTree

Tensor = torch.Tensor

NOISE_KINDS = ("gaussian", "brownian")


def resolve_seeds(batch_size: int, seed: int | Sequence[int] | None = None) -> list[int]:
    """Per-sample seeds: an int s gives s, s+1, ..., s+B-1; a sequence is used as is; None draws one
    base seed from torch's global generator (so ``torch.manual_seed`` makes it reproducible)."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    what = "seed must be an int >= 0 or a sequence of them (one per sample)"
    if isinstance(seed, (bool, str, bytes)):
        raise TypeError(f"{what}, got {seed!r}")
    try:
        seeds = [operator.index(seed) + i for i in range(batch_size)]  # type: ignore[arg-type]  # an int, or not
        base = True
    except TypeError:
        base = False
    if not base:
        try:
            many: Sequence[int] = seed  # type: ignore[assignment]  # not an int: a sequence, or refused below
            if any(isinstance(s, bool) for s in many):
                raise TypeError
            seeds = [operator.index(s) for s in many]
        except TypeError:
            raise TypeError(
                f"{what} (Python or numpy integers; floats such as 3.0 are refused), got {seed!r}"
            ) from None
        if len(seeds) != batch_size:
            raise ValueError(f"seed: got {len(seeds)} seeds for a batch of {batch_size} samples")
    if any(s < 0 for s in seeds):
        raise ValueError(f"{what}, got {seed!r}")
    return seeds


class NoiseSource:
    """Standard normal draws for a batch, one generator per sample.

    ``randn(index)`` gives fresh N(0, I) rows (all rows, or the rows in ``index``);
    ``step(t, t_next, index)`` gives the standard normal of the step from t to t_next (fresh draws
    for ``kind="gaussian"``, Brownian increments for ``kind="brownian"``).
    """

    def __init__(
        self,
        shape: Sequence[int],
        *,
        seeds: int | Sequence[int] | None = None,
        generators: Sequence[torch.Generator] | None = None,
        device=None,
        dtype: torch.dtype = torch.float32,
        kind: str = "gaussian",
        t_range: tuple[float, float] | None = None,
    ):
        if kind not in NOISE_KINDS:
            raise ValueError(f"noise must be one of {', '.join(NOISE_KINDS)}, got {kind!r}")
        self.shape = tuple(int(s) for s in shape)
        self.batch_size = self.shape[0]
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.kind = kind
        if generators is not None:
            if len(generators) != self.batch_size:
                raise ValueError(f"generator: got {len(generators)} generators for a batch of {self.batch_size}")
            self.generators = list(generators)
            self.seeds = [int(g.initial_seed()) for g in self.generators]
        else:
            self.seeds = resolve_seeds(self.batch_size, seeds)
            self.generators = [torch.Generator(self.device).manual_seed(s) for s in self.seeds]
        self.t_range = t_range
        self._brownian: BrownianTree | None = None

    @property
    def event_shape(self) -> tuple[int, ...]:
        return self.shape[1:]

    def _rows(self, index: Tensor | None) -> list[int]:
        return list(range(self.batch_size)) if index is None else [int(i) for i in index.tolist()]

    def randn(self, index: Tensor | None = None) -> Tensor:
        """N(0, I) draws of shape [len(rows), *event_shape], each row from its own generator."""
        rows = self._rows(index)
        return torch.stack(
            [
                torch.randn(self.event_shape, generator=self.generators[i], device=self.device, dtype=self.dtype)
                for i in rows
            ]
        )

    def derived(self) -> NoiseSource:
        """An independent Gaussian source for the same samples (seeds mixed with a constant): for
        step hooks, so their draws leave this source's stream untouched."""
        seeds = [(s * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % (2**63) for s in self.seeds]
        return NoiseSource(self.shape, seeds=seeds, device=self.device, dtype=self.dtype)

    def subset(self, rows: Tensor) -> NoiseSource:
        """The noise of rows ``rows`` only, as a source of its own: it draws from the same generators
        (advancing them) and has the same Brownian paths (a pure function of the seeds)."""
        picked = [int(i) for i in torch.as_tensor(rows).tolist()]
        return NoiseSource(
            (len(picked), *self.event_shape),
            generators=[self.generators[i] for i in picked],
            device=self.device,
            dtype=self.dtype,
            kind=self.kind,
            t_range=self.t_range,
        )

    def step(self, t, t_next, index: Tensor | None = None) -> Tensor:
        """The standard normal of the step t -> t_next (either direction)."""
        if self.kind == "gaussian":
            return self.randn(index)
        return self.brownian().normal(t, t_next, index)

    # ------------------------------------------------------------------ Brownian
    def time_changed(self, t0: float, t1: float, variance) -> BrownianTree:
        """Brownian paths B(v(s) - v(t0)) on [t0, t1] for an increasing clock v, one per sample and
        keyed by its seed (float64): for solvers whose exact noise integrals are Brownian increments
        on another clock (e.g. e^{2 lambda} in log-SNR)."""
        return BrownianTree(
            self.seeds, self.event_shape, t0, t1, device=self.device, dtype=torch.float64, variance=variance
        )

    def brownian(self) -> BrownianTree:
        """The per-sample Brownian paths of this run (built on first use, over ``t_range``)."""
        if self._brownian is None:
            if self.t_range is None:
                raise ValueError("noise='brownian' needs the time range of the run (t_range)")
            t0, t1 = float(min(self.t_range)), float(max(self.t_range))
            self._brownian = BrownianTree(self.seeds, self.event_shape, t0, t1, device=self.device, dtype=self.dtype)
        return self._brownian


def prior_sample(schedule, shape: Sequence[int], seeds, *, device=None, dtype=None, mu=None, t=None) -> torch.Tensor:
    """x_T of ``schedule``'s prior at time ``t`` (default its t_max), from the per-sample seeds
    ``seeds`` as :func:`diffsolve.sample` draws it (:class:`NoiseSource`)."""
    src = NoiseSource(tuple(shape), seeds=seeds, device=device, dtype=dtype)
    return schedule.prior(tuple(shape), mu, noise=src.randn(), t=t)
