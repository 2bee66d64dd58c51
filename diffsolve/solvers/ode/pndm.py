"""PNDM and PLMS: pseudo numerical methods (Liu, Ren, Lin, Zhao 2022, Pseudo Numerical Methods for
Diffusion Models on Manifolds, ICLR), as diffusers' ``PNDMScheduler``.

PNDM splits a step into a gradient part (the noise estimate eps) and a transfer part: the transfer
phi(y, eps, s -> t) is DDIM's step with that eps (the paper's eq. (9); the noise-form first-order
step of :func:`~diffsolve.solvers.exponential.maths.ode_weights`, here on y = x - mu):

    phi(y, eps, s -> t) = (alpha_t / alpha_s) y - (alpha_t sigma_s / alpha_s - sigma_t) eps.

A classical method's combination of slopes becomes a combination of eps fed to phi:

- pseudo linear multistep (PLMS), on the fixed 4th-order Adams-Bashforth weights of equal steps,
  whatever the grid (newest first): eps' = (55 e_i - 59 e_{i-1} + 37 e_{i-2} - 9 e_{i-3}) / 24,
  y_{i+1} = phi(y_i, eps', t_i -> t_{i+1}), with e_j the model's eps at (y_j, t_j);
- pseudo Runge-Kutta (PRK, the warm-up of the first three steps, ``skip_prk_steps=False``), with
  t_m = (t_i + t_{i+1}) / 2:
      e1 = eps(y_i, t_i),  e2 = eps(phi(y_i, e1, t_i -> t_m), t_m),  e3 = eps(phi(y_i, e2, t_i -> t_m), t_m),
      e4 = eps(phi(y_i, e3, t_i -> t_{i+1}), t_{i+1}),  y_{i+1} = phi(y_i, (e1 + 2 e2 + 2 e3 + e4) / 6, t_i -> t_{i+1}),
  four model calls a step; e1 joins the history, so the fourth step is PLMS-4 at once;
- ``skip_prk_steps=True`` (PLMS alone, as CompVis latent-diffusion's PLMS sampler and Stable
  Diffusion's configs): the first step is pseudo improved Euler (two calls: e_0 at y_0, e' at
  phi(y_0, e_0, t_0 -> t_1), y_1 = phi(y_0, (e_0 + e') / 2, t_0 -> t_1); e' is not kept), then PLMS
  warms up on the history there is: (3 e_i - e_{i-1}) / 2, then (23 e_i - 16 e_{i-1} + 5 e_{i-2}) / 12,
  then the 4th-order weights.

Model calls: N steps take N + 9 calls with the PRK warm-up (N >= 3; 4 calls for each of the first
min(3, N) steps) and N + 1 with ``skip_prk_steps``, as diffusers' PNDMScheduler lists them (its
``timesteps`` hold N + 9, resp. N + 1 entries for ``num_inference_steps=N``). diffusers takes the PRK
half step at the integer timestep t - (T // N) // 2, the midpoint here when T // N is even.

The transfer with a combined eps is an Euler step of x/alpha against rho = sigma/alpha with that
eps, so after its warm-up PLMS is ``ipndm`` (the same fixed weights on eps). Order: the fixed
weights are Adams-Bashforth's for steps equal in rho; on other grids they leave a local error
O(h^3), and the closed-form Gaussian measures order 2 (the registered one) on log-SNR grids (pndm
2.01, plms 1.98 over 80 -> 160 steps) and on SD's discrete schedule with steps uniform in t, as
diffusers places them (2.00, 1.97).
"""

from __future__ import annotations

from ...core.options import Option
from ...core.protocol import Query, Solver
from ...core.registry import register
from ..exponential.maths import alpha_sigma, half_log_snr, model_output, ode_weights
from .multistep import AB_FIXED


def _transfer(y, eps, s: float, t: float, schedule):
    """phi(y, eps, s -> t): DDIM's step with the given eps (module docstring)."""
    a_s, s_s = alpha_sigma(schedule, s)
    a_t, s_t = alpha_sigma(schedule, t)
    w = ode_weights("noise", a_t, max(s_t, 0.0), a_s, s_s, half_log_snr(a_t, max(s_t, 0.0)) - half_log_snr(a_s, s_s))
    return y * w.decay + eps * w.w0


@register(
    "pndm",
    family="ode",
    order=2,
    calls_per_step=1,
    deterministic=True,
    description="PNDM: pseudo Runge-Kutta warm-up (3 steps, 4 calls each), then pseudo linear multistep (PLMS-4)",
    reference="Liu, Ren, Lin, Zhao 2022, Pseudo Numerical Methods for Diffusion Models on Manifolds (ICLR)",
)
@register(
    "plms",
    family="ode",
    order=2,
    calls_per_step=1,
    deterministic=True,
    fixed={"skip_prk_steps": True},
    description="PLMS: PNDM without the Runge-Kutta warm-up (pndm, skip_prk_steps=True; N + 1 calls for N steps)",
    reference="Liu, Ren, Lin, Zhao 2022, Pseudo Numerical Methods for Diffusion Models on Manifolds (ICLR)",
)
class PNDM(Solver):
    """PNDM / PLMS (see the module docstring for the update rules and the model calls).

    Options: ``skip_prk_steps`` (False: the pseudo Runge-Kutta warm-up, diffusers' default; True:
    PLMS with a pseudo improved-Euler first step, Stable Diffusion's configs). Works on eps (any
    model output is converted); needs alpha > 0 on the grid."""

    skip_prk_steps = Option(False, "PLMS alone (first step pseudo improved Euler) instead of the PRK warm-up")

    def run(self, x, grid, noise, *, schedule, mu=None):
        ts = [float(t) for t in grid]
        if alpha_sigma(schedule, ts[0])[0] <= 0:
            raise ValueError(
                f"{self.name} steps with eps (DDIM's transfer), which cannot start where alpha = 0; "
                "use a grid with t_max < 1"
            )
        if alpha_sigma(schedule, ts[0])[1] <= 0:
            raise ValueError(f"{self.name} cannot step away from sigma = 0: to invert, start from t_min > 0")
        hist: list = []  # the eps at the grid points, newest first
        for i in range(len(ts) - 1):
            t, t1 = ts[i], ts[i + 1]
            pred = yield Query(x, t, step=i + 1)
            y = pred.x if mu is None else pred.x - mu
            e = model_output(pred, mu, "noise")
            if not self.skip_prk_steps and i < 3:  # pseudo Runge-Kutta
                tm = 0.5 * (t + t1)
                es = [e]
                for t_k in (tm, tm, t1):
                    y_k = _transfer(y, es[-1], t, t_k, schedule)
                    p = yield Query(y_k if mu is None else y_k + mu, t_k, step=i + 1)
                    es.append(model_output(p, mu, "noise"))
                e_step = (es[0] + 2.0 * es[1] + 2.0 * es[2] + es[3]) / 6.0
                hist = [e, *hist][:4]
            elif self.skip_prk_steps and i == 0:  # pseudo improved Euler
                y_p = _transfer(y, e, t, t1, schedule)
                p = yield Query(y_p if mu is None else y_p + mu, t1, step=i + 1)
                e_step = 0.5 * (e + model_output(p, mu, "noise"))
                hist = [e]
            else:  # pseudo linear multistep, fixed weights
                hist = [e, *hist][:4]
                w = AB_FIXED[len(hist)]
                e_step = w[0] * hist[0]
                for wj, ej in zip(w[1:], hist[1:]):
                    e_step = e_step + wj * ej
            y = _transfer(y, e_step, t, t1, schedule)
            x = y if mu is None else y + mu
        return x
