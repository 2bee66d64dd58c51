"""Step-size control for the adaptive solvers, separate from the solvers (as in diffrax).

A solver computes a local error estimate E for each sample; the controller, which owns the
tolerances, turns it into a scaled error norm, an accept/reject decision and the next step size. All
of it works per sample ([B] tensors), so a batch can carry one step size per row. The loop that
applies it is :func:`diffsolve.core.adaptive.adaptive_loop`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


LIMITERS = ("clip", "atan")


@dataclass(frozen=True)
class StepSizeController:
    """I / PI / PID step-size control on a mixed-tolerance scaled RMS error norm.

    error norm   err = sqrt( mean_over_dims( (E / delta)^2 ) ),
                 delta = max(atol, rtol * max(|x_prev|, |x_new|))     (element-wise)
    accept       err <= accept
    next step    f = safety * err^(-exponent) * err_prev^(exponent_prev) * err_prev2^(-exponent_prev2)
                 h_next = h * clamp(limiter(f), factor_min, factor_max)

    ``rtol`` and ``atol`` are the tolerances (None: unset, the solver's defaults; a solver given a
    controller fills in what it leaves unset, and its explicit ``rtol`` / ``atol`` options replace the
    controller's: :class:`diffsolve.core.adaptive.AdaptiveSolver`).
    err_prev, err_prev2 are the norms of the last two accepted steps (1 before there are any).
    ``exponent_prev = exponent_prev2 = 0`` is I-control; ``exponent_prev > 0`` PI (Gustafsson 1991);
    ``exponent_prev2 > 0`` PID (Soderlind 2003; :meth:`pid` takes k-diffusion's p / i / d
    coefficients). ``limiter``: ``"clip"`` (f itself) or ``"atan"`` (the smooth limiter
    1 + atan(f - 1), Soderlind & Wang 2006, as k-diffusion's). ``accept`` > 1 accepts steps a little
    over the tolerance (k-diffusion's accept_safety 0.81 on the factor is accept = 0.81^(-order)).
    The defaults are Gotta Go Fast's (Jolicoeur-Martineau et al. 2021): safety 0.9, exponent 0.9, no
    PI term, no limits on the factor (its code caps h only by the time left), accept at err <= 1.
    With ``err = 0`` the factor is ``factor_max``. A rejected step always shrinks: its factor is at
    most safety * (accept / err)^exponent < 1 (as diffrax caps it on rejections).

    Three switches reproduce other codes' controllers (k-diffusion's PIDStepSizeController, which
    ``dpm-adaptive`` uses, takes all three):

    ``accept_factor``  None: accept when err <= ``accept`` (above). A number in (0, 1]: accept when the
                       (limited) factor f >= accept_factor, so the history takes part in the decision,
                       and every try, accepted or not, multiplies h by f (a rejected one's f is below
                       accept_factor <= 1, so it shrinks); k-diffusion's accept_safety.
    ``start``          the (err_prev, err_prev2) before any accepted step: ``"one"`` (1, diffrax) or
                       ``"first"`` (the first try's error norm, k-diffusion's).
    ``offset``         added to every error norm before the factor is taken (k-diffusion's eps, 1e-8:
                       it bounds the growth where the norms are tiny); default 0.
    ``batch_norm``     how the loop's ``mode="batch"`` pools the rows' norms into one: ``"max"`` (every
                       row within tolerance) or ``"rms"`` (the RMS over the rows, i.e. the RMS norm of
                       the whole batch as one vector, as k-diffusion's).
    """

    safety: float = 0.9
    exponent: float = 0.9
    exponent_prev: float = 0.0
    exponent_prev2: float = 0.0
    factor_min: float = 0.0
    factor_max: float = math.inf
    limiter: str = "clip"
    accept: float = 1.0
    rtol: float | None = None
    atol: float | None = None
    accept_factor: float | None = None
    start: str = "one"
    offset: float = 0.0
    batch_norm: str = "max"

    def __post_init__(self):
        if not 0 < self.safety <= 1:
            raise ValueError(f"safety must be in (0, 1], got {self.safety}")
        if not self.exponent > 0:
            raise ValueError(f"exponent must be > 0, got {self.exponent}")
        if self.exponent_prev < 0 or self.exponent_prev2 < 0:
            raise ValueError(
                f"exponent_prev and exponent_prev2 must be >= 0, got {self.exponent_prev}, {self.exponent_prev2}"
            )
        if not 0 <= self.factor_min < 1 < self.factor_max:
            raise ValueError(f"need 0 <= factor_min < 1 < factor_max, got {self.factor_min}, {self.factor_max}")
        if self.limiter not in LIMITERS:
            raise ValueError(f"limiter must be one of {', '.join(LIMITERS)}, got {self.limiter!r}")
        if not self.accept > 0:
            raise ValueError(f"accept must be > 0, got {self.accept}")
        af = self.accept_factor
        if af is not None and (isinstance(af, bool) or not isinstance(af, (int, float)) or not 0 < af <= 1):
            raise ValueError(f"accept_factor must be None or in (0, 1], got {af!r}")
        if not self.offset >= 0:
            raise ValueError(f"offset must be >= 0, got {self.offset}")
        if self.start not in STARTS:
            raise ValueError(f"start must be one of {', '.join(STARTS)}, got {self.start!r}")
        if self.batch_norm not in BATCH_NORMS:
            raise ValueError(f"batch_norm must be one of {', '.join(BATCH_NORMS)}, got {self.batch_norm!r}")
        for name in ("rtol", "atol"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
                raise ValueError(f"{name} must be None or a number > 0, got {v!r}")

    @classmethod
    def pid(cls, order: float, pcoeff: float = 0.0, icoeff: float = 1.0, dcoeff: float = 0.0, **options):
        """k-diffusion's parameterisation: f = err^-b1 err_prev^-b2 err_prev2^-b3 with
        b1 = (p + i + d) / order, b2 = -(p + 2 d) / order, b3 = d / order."""
        return cls(
            exponent=(pcoeff + icoeff + dcoeff) / order,
            exponent_prev=(pcoeff + 2 * dcoeff) / order,
            exponent_prev2=dcoeff / order,
            **options,
        )

    def error_norm(
        self, err: Tensor, x_prev: Tensor, x_new: Tensor, atol: float | None = None, rtol: float | None = None
    ) -> Tensor:
        """The scaled RMS norm of ``err`` per sample ([B], float64), with the controller's tolerances
        unless ``atol`` / ``rtol`` are given."""
        atol = self.atol if atol is None else atol
        rtol = self.rtol if rtol is None else rtol
        if atol is None or rtol is None:
            raise ValueError("the error norm needs rtol and atol: set them on the controller or pass them")
        delta = torch.maximum(x_prev.abs(), x_new.abs()).mul(rtol).clamp_min(atol)
        return (err / delta).double().flatten(1).pow(2).mean(dim=1).sqrt()

    def accepts(self, err: Tensor) -> Tensor:
        """Which rows' steps the error rule accepts, err <= ``accept`` ([B] bool); with
        ``accept_factor`` the decision is :meth:`decide`'s."""
        return err <= self.accept

    def pool(self, err: Tensor) -> Tensor:
        """The rows' norms pooled into one for ``mode="batch"`` (``batch_norm``), expanded to [B]."""
        one = err.max() if self.batch_norm == "max" else err.double().pow(2).mean().sqrt().to(err.dtype)
        return one.expand_as(err)

    @staticmethod
    def history(n: int, device=None) -> Tensor:
        """A fresh [n, 2] record of (err_prev, err_prev2), all 1."""
        return torch.ones(n, 2, dtype=torch.float64, device=device)

    def fresh_history(self, n: int, device=None) -> Tensor:
        """The [n, 2] record a run starts with: :meth:`history`, or NaN (unset) with ``start="first"``,
        which the first try's norm fills (:meth:`push`, and :meth:`decide` for that try itself)."""
        if self.start == "one":
            return self.history(n, device)
        return torch.full((n, 2), math.nan, dtype=torch.float64, device=device)

    @staticmethod
    def push(history: Tensor, err: Tensor, ok: Tensor) -> Tensor:
        """``history`` after the tries with norms ``err``: unset entries take ``err``, and accepted rows
        shift ``err`` in."""
        e = err.double().clamp_min(1e-10)
        history = torch.where(history.isnan(), e[:, None], history)
        new = torch.stack([e, history[:, 0]], 1)
        return torch.where(ok[:, None], new, history)

    def decide(self, err: Tensor, history: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(accepted [B] bool, the factor h_next / h [B]) for error norms ``err`` ([B]); ``history``:
        the rows' [B, 2] (err_prev, err_prev2), or their [B] err_prev, or None (I-control)."""
        with torch.no_grad():
            e = err.double()
            # err^-a as exp(-a log err): Tensor.pow's vectorised and scalar paths differ in the last
            # bit, which would make a row's step sizes depend on its batch
            f = self.safety * torch.exp(-self.exponent * (e + self.offset).log())
            if history is not None:
                hist = history.double().reshape(len(err), -1)
                hist = torch.where(hist.isnan(), e.clamp_min(1e-10)[:, None], hist) + self.offset  # NaN: start="first"
                if self.exponent_prev:
                    f = f * torch.exp(self.exponent_prev * hist[:, 0].log())
                if self.exponent_prev2 and hist.shape[1] > 1:
                    f = f * torch.exp(-self.exponent_prev2 * hist[:, 1].log())
            if self.limiter == "atan":
                f = 1.0 + torch.atan(f - 1.0)
            if self.accept_factor is None:
                ok = self.accepts(err)
                # a rejected try must shrink (the PI / PID terms, or accept < 1, could say otherwise
                # and retry the same step for ever): at most the I-part's factor towards err = accept
                shrink = self.safety * torch.exp(-self.exponent * (e / self.accept).log())
                f = torch.where(ok, f, torch.minimum(f, shrink))
            else:  # accepted on the factor itself; a rejected try's f < accept_factor <= 1 shrinks
                ok = f.nan_to_num(nan=0.0) >= self.accept_factor
            return ok, f.nan_to_num(nan=self.factor_max, posinf=self.factor_max).clamp(self.factor_min, self.factor_max)

    def factor(self, err: Tensor, history: Tensor | None = None) -> Tensor:
        """The factor h_next / h for error norms ``err`` ([B]): :meth:`decide`'s."""
        return self.decide(err, history)[1]


MODES = ("per_sample", "batch")
STARTS = ("one", "first")
BATCH_NORMS = ("max", "rms")
