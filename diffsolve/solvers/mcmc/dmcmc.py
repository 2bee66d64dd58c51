"""Denoising MCMC pre-sampling: Denoising Langevin Gibbs (Kim & Ye, ICML 2023).

A Markov chain runs on (x, k), data and noise level, with target p(x, k) = p_{t_k}(x) pi(k), pi uniform
over a ladder of K levels t_0 > ... > t_{K-1} (class 0 the noisiest; uniform in log-SNR, i.e.
log-uniform in sigma for VE as in the paper). One Gibbs iteration (paper Eqs. 15-16):

    x <- x + (eta / 2) score(x, t_k) + sqrt(eta) z         (one model call; eta fixed, in x's units)
    k <- argmax_k q(k | x)                                  (a noise-level estimator, no model call)

Every round, the lowest-noise state of a window of ``n_skip`` iterations (the window includes its
start state; strictly lower wins) is handed to any registered solver, started at that sample's own
time t_k and run to t_min in ``integrator_steps`` steps; then a Tweedie step x <- E[x0 | x] at t_min.
The chain goes on from its current state, not from the one handed over. NFE per output sample, as
the paper counts it: n_skip + the integrator's calls + 1 (Tweedie); the burn-in is paid once per
chain and amortised over its ``rounds`` outputs.

We state the chain in x_t itself (for VE this is the paper's chain; for other schedules it is the same
Gibbs sampler of p_{t_k}(x) pi(k), with x_t's scaling). Estimators of k (``estimator``):
  :class:`ExactNoiseLevel`       the exact posterior of an oracle (GaussianMixture): argmax_k log p_{t_k}(x)
  :class:`ClassifierNoiseLevel`  a trained classifier q_phi(k | x), e.g. the shipped digits-sigma
  :class:`DenoiserNoiseLevel`    training-free, **our variant** (not in the paper): from the model
                                 call of the Langevin step, sigma_hat^2 = |x - alpha_k x0_hat - (1 -
                                 alpha_k) mu|^2 / D, and k = the level whose sigma is nearest in log.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ...models.model import Prediction

from ...core.options import Option
from ...core.protocol import Outcome, Pump, Query, Solver, as_outcome, per_row, take_rows
from ...core.registry import get_solver, register
from ...schedules.grids import make_grid

Tensor = torch.Tensor

SHIPPED_CLASSIFIERS = ("digits-sigma",)


# ---------------------------------------------------------------------------------------------- estimators
class NoiseLevelEstimator:
    """Picks each sample's noise level: ``levels(x, pred, times, schedule, mu) -> LongTensor [B]``.

    ``x`` is the state after the Langevin step, ``pred`` the model's prediction at the state before
    it (at the current level), ``times`` the ladder [K]. ``times`` (an attribute) may fix the ladder.
    """

    times: Tensor | None = None

    def levels(self, x: Tensor, pred: Prediction, times: Tensor, schedule, mu) -> Tensor:
        raise NotImplementedError


class ExactNoiseLevel(NoiseLevelEstimator):
    """argmax_k log p_{t_k}(x) (uniform prior), exact for an oracle with ``log_prob(x, t, schedule, mu)``."""

    def __init__(self, oracle: Any):
        if not callable(getattr(oracle, "log_prob", None)):
            raise TypeError(
                f"ExactNoiseLevel needs an oracle with log_prob(x, t, schedule), got {type(oracle).__name__}"
            )
        self.oracle = oracle

    def levels(self, x, pred, times, schedule, mu):
        b, k = x.shape[0], times.shape[0]
        xs = x.repeat_interleave(k, dim=0)
        ts = times.to(x.device).repeat(b)
        lp = self.oracle.log_prob(xs, ts, schedule, None if mu is None else mu.repeat_interleave(k, dim=0))
        return lp.reshape(b, k).argmax(dim=1)


class ClassifierNoiseLevel(NoiseLevelEstimator):
    """argmax_k of a classifier's logits over the ladder ``times`` (the paper's q_phi(k | x))."""

    def __init__(self, classifier: Callable[[Tensor], Tensor], times):
        self.classifier = classifier
        self.times = torch.as_tensor(times, dtype=torch.float64)
        if self.times.ndim != 1 or len(self.times) < 2 or not bool((self.times[1:] < self.times[:-1]).all()):
            raise ValueError("times must be a descending 1-D ladder of at least 2 levels (class 0 the noisiest)")

    @classmethod
    def shipped(cls, name: str = "digits-sigma") -> ClassifierNoiseLevel:
        """The shipped noise-level classifier of digits-vp."""
        from ...pretrained import load_noise_classifier

        return cls(*load_noise_classifier(name))

    def levels(self, x, pred, times, schedule, mu):
        p = next(iter(getattr(self.classifier, "parameters", lambda: iter(()))()), None)
        with torch.no_grad():
            logits = self.classifier(x if p is None else x.to(p.dtype))
        if logits.shape != (x.shape[0], len(times)):
            raise ValueError(
                f"the classifier gave logits of shape {tuple(logits.shape)}, expected {(x.shape[0], len(times))}"
            )
        return logits.argmax(dim=1).to(x.device)


class DenoiserNoiseLevel(NoiseLevelEstimator):
    """Training-free (our variant): sigma_hat from the residual of the model's own denoiser."""

    def levels(self, x, pred, times, schedule, mu):
        resid = pred.x - pred.state_at(pred.coefs.alpha, 0.0)  # x - alpha x0_hat - (1 - alpha) mu
        sig_hat = resid.flatten(1).double().pow(2).mean(dim=1).sqrt().clamp_min(1e-12)
        sig = schedule.sigma(times.to(x.device)).clamp_min(1e-12)
        return (sig_hat.log()[:, None] - sig.log()[None, :]).abs().argmin(dim=1)


# ---------------------------------------------------------------------------------------------- solver
def _estimator(v) -> NoiseLevelEstimator:
    """The ``estimator`` option: None (the denoiser's), a NoiseLevelEstimator, or one by name."""
    if v is None:
        return DenoiserNoiseLevel()
    if isinstance(v, str):  # by name, for the command line
        if v not in ("denoiser", *SHIPPED_CLASSIFIERS):
            raise ValueError(
                f"estimator {v!r} is unknown; allowed names: 'denoiser', "
                f"{', '.join(repr(c) for c in SHIPPED_CLASSIFIERS)} (or a NoiseLevelEstimator)"
            )
        return DenoiserNoiseLevel() if v == "denoiser" else ClassifierNoiseLevel.shipped(v)
    return v


@register(
    "dmcmc",
    family="mcmc",
    order=1,
    calls_per_step=1,
    deterministic=False,
    fixed_grid=False,
    description="Denoising MCMC: Langevin-Gibbs chain over (x, noise level), then any solver per sample",
    reference="Kim & Ye 2023, Denoising MCMC for Accelerating Diffusion-Based Generative Models (ICML)",
    aliases=("denoising-mcmc",),
)
class DenoisingMCMC(Solver):
    """Denoising Langevin Gibbs pre-sampling; the algorithm is in the module docstring.

    Options: ``integrator`` (a registered solver name, default ``"heun"``), ``integrator_steps`` (3),
    ``integrator_options`` (a dict), ``estimator`` (a :class:`NoiseLevelEstimator`, or by name
    ``"denoiser"`` or a shipped classifier such as ``"digits-sigma"``; default the training-free
    :class:`DenoiserNoiseLevel`), ``levels`` (K = 1000 when the estimator fixes none),
    ``langevin_step`` (the Langevin step eta, in x's units: 0.01; ``eta`` is another name for it), ``n_skip`` (3), ``rounds`` (outputs per chain: 1),
    ``burn_in_steps`` (integrator steps of the initial sample: 10), ``renoise_sigma`` (the chain
    starts from that sample noised to the level with sigma/alpha nearest this: 0.5, the paper's
    x + 0.5 z), ``burn_in`` (Gibbs iterations before the first round: 20), ``denoise`` (the Tweedie
    step: True).

    With ``rounds = R`` the batch is B/R chains: sample i is round i % R of chain i // R, and its
    randomness comes from the seeds of rows R (i // R) ... i; so a sample is independent of the batch
    size only for the same R. ``stats``: ``start_time`` (each sample's integrator start time),
    ``nfe_per_output`` (the paper's count per sample: n_skip + integrator calls + Tweedie; a model call
    on several start-time groups counts once), ``burn_in_nfe`` (per chain, in the first output's
    ``nfe_per_sample`` too) and ``chains``.
    """

    integrator = Option("heun", "the registered solver that integrates from each chain's level to t_min", kind=str)
    integrator_steps = Option(3, "the integrator's steps", low=1)
    integrator_options: Option[Any] = Option(
        None, "the integrator's options (a dict)", types=(dict,), what="a dict", convert=lambda v: dict(v or {})
    )
    estimator: Option[Any] = Option(
        None,
        "the noise-level estimator: a NoiseLevelEstimator, or by name 'denoiser' or a "
        "shipped classifier such as 'digits-sigma' (default: the training-free denoiser's)",
        types=(str, NoiseLevelEstimator),
        what="a NoiseLevelEstimator, 'denoiser' or a shipped classifier's name",
        convert=lambda v: _estimator(v),
    )
    levels = Option(1000, "the number of noise levels K (when the estimator fixes none)", low=2)
    langevin_step = Option(0.01, "the Langevin step eta, in x's units", low=0.0, low_open=True)
    eta: Option[Any] = Option(None, alias_of="langevin_step")
    n_skip = Option(3, "Gibbs steps between outputs", low=0)
    rounds = Option(1, "outputs per chain", low=1)
    burn_in_steps = Option(10, "integrator steps of the initial sample", low=1)
    renoise_sigma = Option(
        0.5,
        "the chain starts from the initial sample noised to the level with sigma/alpha "
        "nearest this (the paper's x + 0.5 z)",
        low=0.0,
        low_open=True,
    )
    burn_in = Option(20, "Gibbs iterations before the first round", low=0)
    denoise = Option(True, "the final Tweedie step")

    def check_options(self):
        self._integrator = get_solver(self.integrator, **self.integrator_options)  # checks the name and options

    def run(self, x, grid, noise, *, schedule, mu=None):
        b, r_per = x.shape[0], self.rounds
        if b % r_per:
            raise ValueError(f"dmcmc: the batch size ({b}) must be a multiple of rounds ({r_per})")
        t_max, t_min = float(grid[0]), float(grid[-1])
        times = (
            self.estimator.times
            if self.estimator.times is not None
            else make_grid(schedule, self.levels - 1, "log-snr", t_max=t_max, t_min=t_min)
        )
        times = times.to(torch.float64)
        chains = torch.arange(0, b, r_per, device=x.device)  # the row of each chain's first output
        stats = {
            "start_time": torch.empty(b, dtype=torch.float64),
            "chains": len(chains),
            "nfe_per_output": torch.empty(b, dtype=torch.long),
        }

        # burn-in: a sample from the integrator, noised back to sigma/alpha ~ renoise_sigma, Gibbs steps
        xc, calls = yield from self._integrate(
            x[chains],
            torch.full((len(chains),), t_max, dtype=torch.float64),
            t_min,
            self.burn_in_steps,
            chains,
            noise,
            schedule,
            mu,
        )
        stats["burn_in_nfe"] = int(calls.max()) + self.burn_in
        log_s = (schedule.sigma(times) / schedule.alpha(times)).log()
        k = torch.full((len(chains),), int((log_s - math.log(self.renoise_sigma)).abs().argmin()), dtype=torch.long)
        a, s = (per_row(v, xc) for v in (schedule.alpha(times[k]), schedule.sigma(times[k])))
        m = take_rows(mu, chains)
        xc = a * xc + (0.0 if m is None else (1 - a) * m) + s * noise.randn(chains)
        for _ in range(self.burn_in):
            xc, k = yield from self._gibbs(xc, k, times, chains, noise, schedule, mu)

        out = torch.empty_like(x)
        for rnd in range(r_per):
            rows = chains + rnd
            x_min, k_min = xc, k
            for _ in range(self.n_skip):
                xc, k = yield from self._gibbs(xc, k, times, rows, noise, schedule, mu)
                lower = k > k_min
                x_min = torch.where(per_row(lower, xc).bool(), xc, x_min)
                k_min = torch.where(lower, k, k_min)
            t0 = times[k_min]
            stats["start_time"][rows.cpu()] = t0.cpu()
            y, calls = yield from self._integrate(x_min, t0, t_min, self.integrator_steps, rows, noise, schedule, mu)
            stats["nfe_per_output"][rows.cpu()] = self.n_skip + calls + int(self.denoise)
            if self.denoise:
                pred = yield Query(y, t_min, rows=rows)
                y = pred.x0
            out[rows] = y
        return Outcome(out, stats=stats)

    def _gibbs(self, x, k, times, rows, noise, schedule, mu):
        """One Langevin step at each chain's level, then the level update."""
        t = times[k].to(x.device)
        pred = yield Query(x, t, rows=rows)
        x_new = pred.x + (0.5 * self.langevin_step) * pred.score + math.sqrt(self.langevin_step) * noise.randn(rows)
        return x_new, self.estimator.levels(x_new, pred, times, schedule, take_rows(mu, rows)).to(k.device)

    def _integrate(self, x, t0, t_min, steps, rows, noise, schedule, mu):
        """Run the integrator on each group of rows that share a start time, merging the groups' queries
        into one model call per round; returns the states and each row's number of model calls."""
        runs, slots = [], []
        out = x.clone()
        for t_start in torch.unique(t0):
            sel = (t0 == t_start).nonzero().squeeze(1)
            if float(t_start) <= t_min * (1 + 1e-12) + 1e-300:
                continue  # already at t_min
            g = make_grid(schedule, steps, t_max=float(t_start), t_min=t_min)
            run = self._integrator.run(
                x[sel], g, noise.subset(rows[sel]), schedule=schedule, mu=take_rows(mu, rows[sel])
            )
            runs.append(run)
            slots.append(sel)
        calls = torch.zeros(len(x), dtype=torch.long)  # model calls per row
        pumps = [Pump(run) for run in runs]
        try:
            while True:
                live = [i for i, p in enumerate(pumps) if p.query is not None]
                if not live:
                    break
                qs = [pumps[i].query for i in live]
                local = [slots[i] if q.rows is None else slots[i][q.rows] for i, q in zip(live, qs)]
                tt = torch.cat([torch.as_tensor(q.t, dtype=torch.float64).expand(len(l)) for q, l in zip(qs, local)])
                idx = torch.cat(local)
                pred = yield Query(torch.cat([q.x for q in qs]), tt, rows=rows[idx])
                calls[idx.cpu()] += 1
                start = 0
                for i, l in zip(live, local):
                    pumps[i].answer(pred.rows(slice(start, start + len(l))))
                    start += len(l)
        finally:
            for p in pumps:
                p.close()
        for p, sel in zip(pumps, slots):
            out[sel] = as_outcome(p.value, self.integrator).x
        return out, calls
