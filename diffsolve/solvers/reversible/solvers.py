"""Algebraically reversible solvers of the probability-flow ODE: exact inversion.

Each scheme carries a second state, so that each step can be undone in closed form with forward
model calls only. They step in one of two forms of the ODE (:class:`_Form`), in both of which an
Euler step is exactly DDIM:

    data form   u = (x - mu) / sigma,  s = alpha / sigma,  du/ds = x0_hat - mu
    noise form  u = (x - mu) / alpha,  s = sigma / alpha,  du/ds = eps_hat

The choice decides stability. Leapfrog-like schemes (reversible Heun, BDIA with gamma = 1, O-BELM with
equal steps) are neutral only where the field's Jacobian is imaginary; where the flow contracts, their
parasitic mode grows. Across the data manifold eps_hat has Jacobian about 1 / s in u, contracting in
sampling and stiff near the data, so in the noise form rev-heun, bdia and edict turn a trained digit
model's samples into noise (values to +-7 at 50 steps); x0_hat has about none there, so the data form
integrates that part exactly, as Rex's exponential-integrator construction does, and the parasitic
mode stays small. O-BELM is the exception: its variable-step coefficients damp the parasitic mode by
(b/a)^2 per step, below 1 when steps shrink towards the data, which holds for s = sigma / alpha and
fails for alpha / sigma, so its default is the noise form of its paper. Every sampling run watches its
parasitic mode (:class:`_Watch`) and raises :class:`UnstableError`, naming the remedy, instead of
returning noise.

States are carried in float64 whatever the model's dtype (its queries are cast back). Every scheme is
written as one interface (:class:`Reversible`): a state (a tuple of tensors), ``start``, ``step``, its
exact inverse ``unstep``, and the conversions at either end. From it come sampling (``run``), exact
inversion (``run_inverse``: :func:`diffsolve.invert` returns both states as a
:class:`~diffsolve.Latent`, which samples back to the data to round-off) and the reversible adjoint
(:mod:`.adjoint`: gradients through sampling in constant memory).
"""

from __future__ import annotations

import math

import torch

from ...core.options import Option, declared
from ...core.protocol import ExactInverse, Outcome, Query, UnstableError
from ...core.registry import register
from ..exponential.maths import model_output

Tensor = torch.Tensor
State = tuple  # a scheme's state: a tuple of tensors


def _as(x: Tensor, dtype) -> Tensor:
    return x if dtype is None else x.to(dtype)


def _form_option(default: str) -> Option:
    return Option(
        default,
        "the variables stepped in: 'data' (u = (x - mu)/sigma against alpha/sigma, field "
        "x0_hat - mu) or 'noise' (u = (x - mu)/alpha against sigma/alpha, field eps_hat)",
        choices=FORMS,
    )


def _work_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Reversible states are carried in float64 (the model still sees the run's dtype): the linear
    algebra of a step then loses nothing, and a round trip is limited by the model alone."""
    low = dtype in (torch.float16, torch.bfloat16, torch.float32)
    return torch.float64 if low and device.type != "mps" else dtype


FORMS = ("data", "noise")


class _Form:
    """The variables a scheme steps in: u at grid point i, its time s, and the field du/ds.

    ``"data"``  u = (x - mu) / sigma,  s = alpha / sigma,  du/ds = x0_hat - mu   (sigma > 0 needed)
    ``"noise"`` u = (x - mu) / alpha,  s = sigma / alpha,  du/ds = eps_hat       (alpha > 0 needed)

    In both, an Euler step is exactly DDIM. They differ where the chains of a reversible scheme part:
    across the data manifold eps_hat has Jacobian about 1 / s in u (stiff near the data, contracting
    in sampling), while x0_hat - mu has about none, so the data form integrates that linear part
    exactly (the exponential-integrator, or Lawson, form Rex uses).
    """

    dtype = None  # the dtype of model queries (None: the state's)
    watch: _Watch  # a _Watch when sampling: each step reports its parasitic mode to it (class default: _Idle)

    def __init__(self, grid: Tensor, schedule, mu, form: str = "data"):
        g = grid.to(torch.float64)
        alpha, sigma = schedule.alpha(g), schedule.sigma(g)
        self.t, self.mu, self.data = g, mu, form == "data"
        self.scale = sigma if self.data else alpha
        if not bool((self.scale > 0).all()):
            need = (
                "sigma > 0 (raise t_min)"
                if self.data
                else "alpha > 0 (lower t_max, e.g. t_max=0.999 for rectified flow)"
            )
            raise ValueError(
                f"form={form!r} works in x / {'sigma' if self.data else 'alpha'}: every grid time needs {need}"
            )
        self.s = (alpha if self.data else sigma) / self.scale

    def y(self, x: Tensor, i: int) -> Tensor:
        return (x if self.mu is None else x - self.mu) / float(self.scale[i])

    def x(self, y: Tensor, i: int) -> Tensor:
        x = float(self.scale[i]) * y
        return x if self.mu is None else x + self.mu

    def field(self, y: Tensor, i: int, step: int):
        """Yields a query at grid point i; returns du/ds there (a generator helper)."""
        pred = yield Query(_as(self.x(y, i), self.dtype), float(self.t[i]), step=step)
        return model_output(pred, self.mu, "data" if self.data else "noise")

    def ds(self, i: int, j: int) -> float:
        return float(self.s[j] - self.s[i])


class _Watch:
    """Detects a run gone unstable from the scheme's parasitic mode (one host read, at the end).

    Each step reports its parasitic component (the gap between the two chains, or for two-level
    schemes the new state's departure from a DDIM step) and the state. On a stable run the gap stays
    a small fraction of the state (at most 0.11 on the shipped digit models at 10 to 100 steps, in
    the forms that are stable there); where the parasitic mode grows, it comes to dominate the state
    (1.7 to 56 on the same models in the unstable forms) and the samples are noise. A run is stopped
    where the gap passes ``limit``.
    """

    limit = 1.0

    def __init__(self, limit: float = limit):
        self.limit = limit
        self.ratios: list[Tensor] = []
        self.steps: list[int] = []

    def gap(self, gap: Tensor, u: Tensor, step: int) -> None:
        def rms(v):
            return v.detach().flatten(1).to(torch.float32).pow(2).mean(1).sqrt()

        self.ratios.append((rms(gap) / rms(u).clamp_min(torch.finfo(torch.float32).tiny)).max())
        self.steps.append(step)

    def check(self, solver, n_steps: int) -> None:
        if not self.ratios:
            return
        r = torch.stack(self.ratios)
        bad = (r > self.limit) | ~torch.isfinite(r)
        i = int(torch.where(bad.any(), bad.to(torch.int8).argmax(), -1))  # the run's one host read
        if i >= 0:
            opts = ", ".join(f"{k}={v!r}" for k, v in solver.options().items())
            what = (
                f"its parasitic mode reached {float(r[i]):.3g} times the state (above {self.limit}), so the "
                "samples would be noise"
                if bool(torch.isfinite(r[i]))
                else "its state is no longer finite"
            )
            raise UnstableError(
                f"solver {solver.name!r} ({opts}) went unstable at step {self.steps[i]} of "
                f"{n_steps}: {what}. {solver.remedy}"
            )


class _Idle(_Watch):
    """The watch of a run nobody watches (inversion, the adjoint's steps)."""

    def gap(self, gap, u, step):
        pass


_Form.watch = _Idle()


class Reversible(ExactInverse):
    """A reversible scheme (the :class:`~diffsolve.core.protocol.ExactInverse` protocol: ``start``,
    ``step``, ``unstep``, ``sample_of``), plus the inversion's side: ``end`` builds S_m from data and
    ``latent_of`` reads x_T and the second state back from S_0.
    """

    form: str = "data"

    @property
    def remedy(self) -> str:
        """What to do when :class:`_Watch` finds a run unstable (the error's last sentence)."""
        option = declared(type(self)).get("form")
        default = None if option is None else option.default
        if default is not None and default != self.form:
            return (
                f"Its default, form={default!r}, is stable on this kind of model; or use more steps, or another solver"
            )
        return "Use more steps, or another solver (rex is stable in sampling)"

    #: where a singular end is replaced: sigma / alpha = 0.002 (EDM's sigma_min) and its inverse
    END_RATIO = 0.002

    def replace_ends(self, schedule, t_max: float, t_min: float) -> dict[str, float]:
        """The data form divides by sigma: where sigma(t_min) = 0 (rectified flow) the run ends where
        sigma / alpha = 0.002; the noise form divides by alpha: where alpha(t_max) = 0 it starts where
        alpha / sigma = 0.002."""
        lam = -math.log(self.END_RATIO)  # log(alpha / sigma) where the ratio is reached
        if self.form == "data" and float(schedule.sigma(torch.tensor(t_min, dtype=torch.float64))) == 0:
            return {"t_min": float(schedule.t_of_log_snr(torch.tensor(lam, dtype=torch.float64)))}
        if self.form == "noise" and float(schedule.alpha(torch.tensor(t_max, dtype=torch.float64))) == 0:
            return {"t_max": float(schedule.t_of_log_snr(torch.tensor(-lam, dtype=torch.float64)))}
        return {}

    def frame(self, grid: Tensor, schedule, mu):
        """Per-run constants: the grid in the scheme's variables (:class:`_Form`)."""
        return _Form(grid, schedule, mu, self.form)

    def n_steps(self, fr) -> int:
        return len(fr.t) - 1

    def end(self, fr, x: Tensor):
        raise NotImplementedError

    def latent_of(self, fr, st: State) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def run(self, x, grid, noise, *, schedule, mu=None, aux=None):
        """Sample from x (and the latent's second state aux) at grid[0]; the model runs in the noise
        source's dtype, the states in float64 (x and aux may already be, as a latent keeps them)."""
        fr = self.frame(grid, schedule, mu)
        fr.dtype = noise.dtype if noise is not None else x.dtype
        # from an inverted state (aux) the run retraces the inversion exactly, whatever its parasitic
        # mode (the inverse lets it grow, as the sampling direction damps it): only overflow counts
        fr.watch = _Watch(math.inf) if aux is not None else _Watch()
        work = _work_dtype(fr.dtype, x.device)
        st = yield from self.start(fr, x.to(work), None if aux is None else aux.to(work))
        for k in range(self.n_steps(fr)):
            st = yield from self.step(fr, st, k)
        fr.watch.check(self, len(grid) - 1)
        return self.sample_of(fr, st).to(fr.dtype)

    def run_inverse(self, x, grid, noise, *, schedule, mu=None):
        """From data at grid[-1] back to the full state at grid[0]: Outcome(x_T, stats={"aux": ...}),
        both states in the working precision (float64 for float32 data)."""
        fr = self.frame(grid, schedule, mu)
        fr.dtype = x.dtype
        st = yield from self.end(fr, x.to(_work_dtype(x.dtype, x.device)))
        for k in reversed(range(self.n_steps(fr))):
            st = yield from self.unstep(fr, st, k)
        x_T, aux = self.latent_of(fr, st)
        return Outcome(x_T, stats={"aux": aux})


@register(
    "rev-heun",
    family="reversible",
    order=2,
    calls_per_step=1,
    deterministic=True,
    invertible=True,
    description="reversible Heun (Kidger et al.): second-order, exactly invertible, 1 call per step",
    reference="Kidger, Foster, Li, Lyons 2021, Efficient and Accurate Gradients for Neural SDEs (NeurIPS)",
    aliases=("reversible-heun",),
)
class ReversibleHeun(Reversible):
    """Reversible Heun on the ODE dy/ds = f(y, s) in ``form`` (default ``"data"``: f = x0_hat - mu,
    s = alpha / sigma; ``"noise"``: f = eps_hat, s = sigma / alpha, unstable on trained models). State
    (y, z, f_n), z_0 = y_0 unless a latent gives it; with h = s_{n+1} - s_n and f_n = f(z_n, s_n):

        z_{n+1} = 2 y_n - z_n + h f_n
        y_{n+1} = y_n + (h / 2) (f_n + f(z_{n+1}, s_{n+1}))

    Inverse step (one call): z_n = 2 y_{n+1} - z_{n+1} - h f_{n+1};  y_n = y_{n+1} - (h / 2)(f_n + f_{n+1}).
    Second order; N + 1 model calls for N steps. Its linear stability is leapfrog's (neutral only on the
    imaginary axis): the difference y - z is a parasitic mode that grows where the flow contracts,
    which the data form avoids (see the module docstring).
    """

    form = _form_option("data")

    def start(self, fr, x, aux):
        y = fr.y(x, 0)
        z = y if aux is None else fr.y(aux, 0)
        return y, z, (yield from fr.field(z, 0, 1))

    def step(self, fr, st, k):
        y, z, f = st
        h = fr.ds(k, k + 1)
        z = 2 * y - z + h * f
        f_next = yield from fr.field(z, k + 1, k + 1)
        y = y + 0.5 * h * (f + f_next)
        fr.watch.gap(y - z, y, k + 1)
        return y, z, f_next

    def unstep(self, fr, st, k):
        y, z, f = st
        h = fr.ds(k, k + 1)
        z = 2 * y - z - h * f
        f_prev = yield from fr.field(z, k, k + 1)
        return y - 0.5 * h * (f_prev + f), z, f_prev

    def sample_of(self, fr, st):
        return fr.x(st[0], self.n_steps(fr))

    def end(self, fr, x):
        n = self.n_steps(fr)
        y = fr.y(x, n)
        return y, y, (yield from fr.field(y, n, n))

    def latent_of(self, fr, st):
        return fr.x(st[0], 0), fr.x(st[1], 0)


class _TwoLevel(Reversible):
    """Two-time-level reversible schemes, one model call per step. With u_k the state at grid point k
    (k = 0 the noise end) in the scheme's form and e_k = du/ds there (eps_hat or x0_hat - mu):

        u_1     = u_0 + (s_1 - s_0) e_0                              (a DDIM step)
        u_{k+1} = P_k u_{k-1} + Q_k u_k + R_k e_k,                   k >= 1
        inverse u_{k-1} = (u_{k+1} - Q_k u_k - R_k e_k) / P_k

    The state is the pair (u_k, u_{k+1}). Inversion starts from the data u_n and one DDIM-inversion
    step u_{n-1} = u_n + (s_{n-1} - s_n) e_n, and returns the pair (u_0, u_1) (``Latent.x``,
    ``Latent.aux``; aux at grid[1]).
    """

    def coefs(self, s_prev: float, s: float, s_next: float) -> tuple[float, float, float]:
        raise NotImplementedError

    def n_steps(self, fr):
        return len(fr.t) - 2

    def _pqr(self, fr, k):
        return self.coefs(float(fr.s[k]), float(fr.s[k + 1]), float(fr.s[k + 2]))

    def start(self, fr, x, aux):
        u0 = fr.y(x, 0)
        if aux is not None:
            return u0, fr.y(aux, 1)
        return u0, u0 + fr.ds(0, 1) * (yield from fr.field(u0, 0, 1))

    def step(self, fr, st, k):
        u_prev, u = st
        e = yield from fr.field(u, k + 1, k + 2)
        p, q, r = self._pqr(fr, k)
        u_next = p * u_prev + q * u + r * e
        fr.watch.gap(u_next - u - fr.ds(k + 1, k + 2) * e, u_next, k + 2)
        return u, u_next

    def unstep(self, fr, st, k):
        u, u_next = st
        e = yield from fr.field(u, k + 1, k + 2)
        p, q, r = self._pqr(fr, k)
        return (u_next - q * u - r * e) / p, u

    def sample_of(self, fr, st):
        return fr.x(st[1], len(fr.t) - 1)

    def end(self, fr, x):
        n = len(fr.t) - 1
        u = fr.y(x, n)
        return u + fr.ds(n, n - 1) * (yield from fr.field(u, n, n)), u

    def latent_of(self, fr, st):
        return fr.x(st[0], 0), fr.x(st[1], 1)


@register(
    "bdia",
    family="reversible",
    order=2,
    calls_per_step=1,
    deterministic=True,
    invertible=True,
    description="BDIA: bidirectional integration approximation over DDIM (gamma = 1: symmetric)",
    reference="Zhang, Lewis, Kleijn 2024, Exact Diffusion Inversion via Bidirectional Integration Approximation (ECCV)",
)
class BDIA(_TwoLevel):
    """BDIA-DDIM in ``form`` (default ``"data"``; ``"noise"`` is unstable on trained models). With
    Delta_{k->j} = (s_j - s_k) e_k (the DDIM increment from u_k):

        u_{k+1} = u_k + Delta_{k->k+1} + gamma (u_{k-1} - u_k - Delta_{k->k-1})

    ``gamma`` multiplies the correction by the step just taken (the BDIA README's current convention):
    gamma = 0 is DDIM (not invertible), gamma = 1 (default) the symmetric, leapfrog-like scheme.
    The inverse divides by gamma: for gamma < 1 it amplifies round-off by 1/gamma per step (gamma 0.5
    at 50 steps: 2^50), so use gamma < 1 only for sampling. (The paper writes it in x, with DDIM's
    increments; in u the correction term then carries the scale ratio sigma_{k-1} / sigma_{k+1} (data
    form) or alpha_{k-1} / alpha_{k+1} (noise form), which grows the parasitic mode further where the
    noise level falls fast. Here the correction is taken in u, with gamma as given.)
    """

    gamma = Option(
        1.0, "the weight of the backward DDIM step (1: the exactly invertible BDIA)", low=0.0, high=1.0, low_open=True
    )
    form = _form_option("data")

    def coefs(self, s_prev, s, s_next):
        g = self.gamma
        return g, 1.0 - g, (s_next - s) - g * (s_prev - s)


@register(
    "o-belm",
    family="reversible",
    order=2,
    calls_per_step=1,
    deterministic=True,
    invertible=True,
    description="O-BELM: the optimal 2-step bidirectional explicit linear multistep method (second order)",
    reference="Wang et al. 2024, BELM: Bidirectional Explicit Linear Multi-step Sampler for Exact Inversion (NeurIPS)",
)
class OBELM(_TwoLevel):
    """O-BELM in ``form`` (default ``"noise"``, the paper's x-bar = x / alpha; ``"data"`` is unstable on
    trained models), with a = s_{k-1} - s_k and b = s_k - s_{k+1}:

        u_{k+1} = (b/a)^2 u_{k-1} + (1 - (b/a)^2) u_k - (b (a + b) / a) e_k

    (in the noise form, the paper's x_{i-1} formula divided by alpha_{i-1}); local error O(h^3), second
    order. With equal steps it is leapfrog, u_{k+1} = u_{k-1} - 2 h e_k; the parasitic root -(b/a)^2
    damps in sampling where steps shrink towards the data (s = sigma / alpha does; alpha / sigma grows
    there) and amplifies by the same factor in inversion.
    """

    form = _form_option("noise")

    def coefs(self, s_prev, s, s_next):
        a, b = s_prev - s, s - s_next
        return (b / a) ** 2, 1.0 - (b / a) ** 2, -b * (a + b) / a


@register(
    "edict",
    family="reversible",
    order=1,
    calls_per_step=2,
    deterministic=True,
    invertible=True,
    description="EDICT: two coupled DDIM chains with mixing p (default 0.93)",
    reference="Wallace, Gokul, Naik 2023, EDICT: Exact Diffusion Inversion via Coupled Transformations (CVPR)",
)
class EDICT(Reversible):
    """EDICT in ``form`` (where a DDIM step is u + h f): states (x, y), x_0 = y_0; per step, with
    h = s_{k+1} - s_k,

        x' = x + h f(y);   y' = y + h f(x');   x'' = p x' + (1 - p) y';   y'' = p y' + (1 - p) x''

    Inverse: y' = (y'' - (1 - p) x'') / p;  x' = (x'' - (1 - p) y') / p;  y = y' - h f(x');
    x = x' - h f(y). Two model calls per step, first order. ``form="noise"`` (f = eps_hat) is the
    paper's EDICT exactly (the mixing commutes with the alpha scaling); there each chain's step takes
    the other chain's eps_hat, whose 1 / s Jacobian parts the chains faster than the mixing pulls them
    together, below about 50 steps on a trained model. The default ``"data"`` (f = x0_hat - mu) takes the
    other chain's x0_hat instead, the same step where the chains agree, and stays stable. The mixing contracts x - y by p^2
    per sampling step and expands it by 1/p^2 per inversion step (p = 0.93: 1.156^N), which is why
    the reference code runs in float64.
    """

    p = Option(0.93, "the mixing weight of the two chains", low=0.0, high=1.0, low_open=True, high_open=True)
    form = _form_option("data")

    def start(self, fr, x, aux):
        a = fr.y(x, 0)
        return a, (a if aux is None else fr.y(aux, 0))
        yield  # a generator without model calls

    def step(self, fr, st, k):
        a, b = st
        p, h = self.p, fr.ds(k, k + 1)
        a = a + h * (yield from fr.field(b, k, k + 1))
        b = b + h * (yield from fr.field(a, k + 1, k + 1))
        a = p * a + (1 - p) * b
        b = p * b + (1 - p) * a
        fr.watch.gap(a - b, a, k + 1)
        return a, b

    def unstep(self, fr, st, k):
        a, b = st
        p, h = self.p, fr.ds(k, k + 1)
        b = (b - (1 - p) * a) / p
        a = (a - (1 - p) * b) / p
        b = b - h * (yield from fr.field(a, k + 1, k + 1))
        return a - h * (yield from fr.field(b, k, k + 1)), b

    def sample_of(self, fr, st):
        return fr.x(st[0], self.n_steps(fr))

    def end(self, fr, x):
        a = fr.y(x, self.n_steps(fr))
        return a, a
        yield

    def latent_of(self, fr, st):
        return fr.x(st[0], 0), fr.x(st[1], 0)


class _DataForm:
    """Rex's variables: v = (x - mu) / sigma at time g = alpha / sigma, where dv/dg = x0_hat - mu."""

    dtype = None  # the dtype of model queries (None: the state's)

    def __init__(self, grid: Tensor, schedule, mu):
        t = grid.to(torch.float64)
        alpha, self.sigma = schedule.alpha(t), schedule.sigma(t)
        if not bool((self.sigma > 0).all()):
            raise ValueError("rex works in x / sigma: every grid time needs sigma > 0 (raise t_min)")
        self.t, self.g, self.schedule, self.mu = t, alpha / self.sigma, schedule, mu

    def v(self, x: Tensor, i: int) -> Tensor:
        return (x if self.mu is None else x - self.mu) / float(self.sigma[i])

    def x(self, v: Tensor, sigma: float) -> Tensor:
        return sigma * v if self.mu is None else sigma * v + self.mu

    def d(self, v: Tensor, g: float, t: float | None, step: int):
        """D(v, g) = x0_hat - mu at log-SNR log g (t: its time when known; a generator, one call)."""
        s = self.schedule
        t = float(s.t_of_log_snr(torch.tensor(g, dtype=torch.float64).log())) if t is None else t
        pred = yield Query(
            _as(self.x(v, float(s.sigma(torch.tensor(t, dtype=torch.float64)))), self.dtype), t, step=step
        )
        return model_output(pred, self.mu, "data")


@register(
    "rex",
    family="reversible",
    order=2,
    calls_per_step=4,
    deterministic=True,
    invertible=True,
    description="Rex: McCallum-Foster coupling over an exponential-integrator base (euler = DDIM, midpoint)",
    reference="Blasingame & Liu 2025, Rex: Reversible Solvers for Diffusion Models; McCallum & Foster 2024",
)
class Rex(Reversible):
    """Rex in the data form: v = (x - mu) / sigma, time g = alpha / sigma, dv/dg = x0_hat - mu =: D(v, g),
    where an Euler step is exactly DDIM (DPM-Solver++(1)). The base increment Phi_h(g, v) is

        euler     h D(v, g)                                       (1 call, first order)
        midpoint  h D(v + (h/2) D(v, g), g + h/2)                 (2 calls, second order)

    and McCallum & Foster's coupling (``coupling`` zeta, default 0.999) makes it reversible. State
    (v, w), w_0 = v_0; with h = g_{k+1} - g_k:

        v_{k+1} = zeta v_k + (1 - zeta) w_k + Phi_h(g_k, w_k)
        w_{k+1} = w_k - Phi_{-h}(g_{k+1}, v_{k+1})
        inverse: w_k = w_{k+1} + Phi_{-h}(g_{k+1}, v_{k+1});
                 v_k = (v_{k+1} - (1 - zeta) w_k - Phi_h(g_k, w_k)) / zeta

    Order: the base's. Calls per step: twice the base's. The two chains may drift apart in inversion
    (the latent pair's gap), while the round trip stays exact; the inverse multiplies round-off by
    1/zeta per step.
    """

    BASES = ("euler", "midpoint")

    base = Option("midpoint", "the base Runge-Kutta scheme", choices=BASES)
    coupling = Option(0.999, "the coupling weight of the two states", low=0.0, high=1.0, low_open=True)

    def frame(self, grid, schedule, mu):
        return _DataForm(grid, schedule, mu)

    def _phi(self, fr, v, i, h, step):
        """The base increment Phi_h(g_i, v)."""
        g = float(fr.g[i])
        d = yield from fr.d(v, g, float(fr.t[i]), step)
        if self.base == "euler":
            return h * d
        return h * (yield from fr.d(v + 0.5 * h * d, g + 0.5 * h, None, step))

    def start(self, fr, x, aux):
        v = fr.v(x, 0)
        return v, (v if aux is None else fr.v(aux, 0))
        yield

    def step(self, fr, st, k):
        v, w = st
        z, h = self.coupling, float(fr.g[k + 1] - fr.g[k])
        v = z * v + (1 - z) * w + (yield from self._phi(fr, w, k, h, k + 1))
        return v, w - (yield from self._phi(fr, v, k + 1, -h, k + 1))

    def unstep(self, fr, st, k):
        v, w = st
        z, h = self.coupling, float(fr.g[k + 1] - fr.g[k])
        w = w + (yield from self._phi(fr, v, k + 1, -h, k + 1))
        return (v - (1 - z) * w - (yield from self._phi(fr, w, k, h, k + 1))) / z, w

    def sample_of(self, fr, st):
        return fr.x(st[0], float(fr.sigma[-1]))

    def end(self, fr, x):
        v = fr.v(x, self.n_steps(fr))
        return v, v
        yield

    def latent_of(self, fr, st):
        s0 = float(fr.sigma[0])
        return fr.x(st[0], s0), fr.x(st[1], s0)
