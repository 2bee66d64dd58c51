"""Linear multistep (Adams-Bashforth) solvers in k-diffusion's variables: LMS, iPNDM, iPNDM-v.

All three step y = (x - mu)/c against s = sigma/c (c = the schedule's ``sampling_scale``: alpha, or 1
for rectified flow), as :mod:`.euler_heun`'s Euler does, on the history of d = dy/ds (eps for
diffusion schedules). Step i goes from s_i to s_{i+1} with the k newest derivatives d_i, ..., d_{i-k+1}
(k = min(i + 1, order): the first steps warm up with the history there is):

    y_{i+1} = y_i + sum_j w_j d_{i-j}.

They differ only in the weights w_j. One model call per step; deterministic.
"""

from __future__ import annotations

from ...core.options import Option
from ...core.protocol import Query, Solver
from ...core.registry import register
from ...schedules.base import Schedule
from ..exponential.maths import ab_weights, alpha_sigma
from .euler_heun import _sigma_derivative, _sigma_step

#: iPNDM's fixed Adams-Bashforth weights (equal steps), newest derivative first, in units of the step
AB_FIXED: dict[int, tuple[float, ...]] = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def _s(schedule: Schedule, t: float) -> float:
    """k-diffusion's noise level s = sigma/c at time t (c = the schedule's ``sampling_scale``)."""
    c = schedule.sampling_scale(t)
    if c <= 0:
        raise ValueError("the linear multistep solvers step in sigma/alpha, which needs alpha > 0 on the grid")
    return alpha_sigma(schedule, t)[1] / c


class _Multistep(Solver):
    """The loop the three share: query, push d onto the history, step with :meth:`weights`."""

    #: whether a step ending at sigma = 0 is a plain Euler step (to the model's denoised sample), as
    #: k-diffusion / ComfyUI's sample_ipndm and sample_ipndm_v do; LMS takes its full step there
    euler_to_zero = False

    def max_history(self) -> int:
        raise NotImplementedError

    def check_options(self) -> None:
        # Run backwards (an inversion: ascending s, each step about 1.6 times the last on a 20-step
        # log-SNR grid), the variable-step weights of four nodes extrapolate far and blow up where the
        # flow is stiff (small sigma): digits-vp round trip at 20 steps 0.30 (2 nodes), 1.6 (3), 4.3e3
        # (4). ipndm's fixed weights do not grow with the step ratio (0.24 at 4).
        self.runs_backward = not self.variable_steps or self.max_history() <= 3
        if not self.runs_backward:
            opt = "order" if "order" in type(self).__dict__ else "max_order"
            self.backward_refusal = (
                f"with {opt}={self.max_history()} its variable-step Adams-Bashforth weights on four or more "
                "nodes are unstable run backwards (an inversion's steps grow: digits-vp round trip 4.3e3 at "
                f"20 steps); its steps do run backwards at {opt}=3 or less (round trip 1.6 at 3, 0.30 at 2)"
            )

    #: whether the weights follow the grid's step ratios (lms, ipndm-v) or are fixed (ipndm)
    variable_steps = True

    def weights(self, nodes: list[float], s: float, s_next: float) -> list[float]:
        """The weights w_j of the history (``nodes``: its s values, newest first), in units of the
        step s_next - s: the step is y' = y + (s_next - s) sum_j w_j d_j."""
        raise NotImplementedError

    def run(self, x, grid, noise, *, schedule, mu=None):
        ds_hist, s_hist = [], []  # the derivatives d and their nodes s, newest first
        k_max = self.max_history()
        for i in range(len(grid) - 1):
            t, t_next = float(grid[i]), float(grid[i + 1])
            pred = yield Query(x, t, step=i + 1)
            s, s_next = _s(schedule, t), _s(schedule, t_next)
            ds_hist = [_sigma_derivative(pred, t, schedule), *ds_hist][:k_max]
            s_hist = [s, *s_hist][:k_max]
            if self.euler_to_zero and alpha_sigma(schedule, t_next)[1] == 0:
                w = [1.0]
            else:
                w = self.weights(s_hist, s, s_next)
            d = w[0] * ds_hist[0]
            for wj, dj in zip(w[1:], ds_hist[1:]):
                d = d + wj * dj
            x = _sigma_step(pred.x, t, t_next, d, schedule, mu)
        return x


@register(
    "lms",
    family="ode",
    order=4,
    calls_per_step=1,
    deterministic=True,
    description="linear multistep in sigma (k-diffusion sample_lms, diffusers LMSDiscreteScheduler)",
    reference="Crowson, k-diffusion (sample_lms); Karras et al. 2022 (the sigma variables)",
)
class LMS(_Multistep):
    """Linear multistep (variable-step Adams-Bashforth) in sigma, as k-diffusion's ``sample_lms``
    (Katherine Crowson) and diffusers' LMSDiscreteScheduler, in k-diffusion's variables y = (x - mu)/c
    against s = sigma/c (c = alpha; 1 for rectified flow). With d = dy/ds (eps for diffusion
    schedules) and the k = min(i + 1, order) newest nodes s_i, ..., s_{i-k+1}:

        y_{i+1} = y_i + sum_{j<k} c_j d_{i-j},   c_j = int_{s_i}^{s_{i+1}} l_j(s) ds,

    l_j the Lagrange basis polynomial of node s_{i-j} on those k nodes (exact on any grid; the
    integrals are :func:`~diffsolve.solvers.exponential.maths.ab_weights`). The first k - 1 steps
    warm up with the history there is (Euler, then AB2, ...), as k-diffusion and diffusers do. Order
    4 (``order=4``) as measured on the closed-form Gaussian flow on log-SNR grids and over the first
    doublings of equal steps; the first (Euler) step's O(h^2) local error stays in the result, and on
    equal steps it takes over at fine grids (tests/test_catalog_lms.py). Cf. PLMS (Liu et al. 2022, Pseudo Numerical Methods for Diffusion Models on
    Manifolds). One model call per step. ``invert`` refuses order >= 4, saying why (its run backwards,
    on steps that grow, is unstable); orders up to 3 run backwards.
    """

    order = Option(4, "the number of past derivatives used (4 as k-diffusion and diffusers)", low=1, high=6)

    def max_history(self) -> int:
        return self.order

    def weights(self, nodes, s, s_next):
        return [w / (s_next - s) for w in ab_weights(nodes, s, s_next)]


@register(
    "ipndm",
    family="ode",
    order=2,
    calls_per_step=1,
    deterministic=True,
    description="iPNDM: fixed 4th-order Adams-Bashforth weights on d = dy/ds (k-diffusion / ComfyUI sample_ipndm)",
    reference="Zhang & Chen 2023, Fast Sampling of Diffusion Models with Exponential Integrator (DEIS)",
)
class IPNDM(_Multistep):
    """iPNDM, the improved pseudo numerical method of Zhang & Chen 2023 (DEIS, ICLR) on Liu et al.
    2022's PNDM (Pseudo Numerical Methods for Diffusion Models on Manifolds), as ComfyUI's
    ``sample_ipndm`` (from zju-pi/diff-sampler) and diffusers' IPNDMScheduler: Adams-Bashforth with the
    fixed (equal-step) weights on the history of d = dy/ds in k-diffusion's variables y = (x - mu)/c,
    s = sigma/c, whatever the grid's steps, with k = min(i + 1, max_order):

        y_{i+1} = y_i + (s_{i+1} - s_i) * { d_i                                   (k = 1)
                                            (3 d_i - d_{i-1}) / 2                 (k = 2)
                                            (23 d_i - 16 d_{i-1} + 5 d_{i-2}) / 12  (k = 3)
                                            (55 d_i - 59 d_{i-1} + 37 d_{i-2} - 9 d_{i-3}) / 24 }

    A step ending at sigma = 0 is an Euler step (to the denoised sample), as ComfyUI's; diffusers'
    IPNDMScheduler takes its full step there (on its own fixed schedule, with a v-prediction model).
    On steps equal in s this is ``lms`` (AB4, with its warm-up); on other grids (log-SNR, Karras,
    uniform in t) the fixed weights are not the AB weights of the actual steps, which leaves a local
    error O(h^3): the registered order is 2, what the closed-form Gaussian measures on log-SNR grids
    (2.00 over 80 -> 160 steps, VP, VE, flow and mean-reverting) and on steps uniform in t (2.3 and
    falling; SD's discrete schedule, t in [0.1, 0.9]). On steps equal in s the error falls 16-fold
    per doubling at first (AB4), until the warm-up's Euler step (O(h^2)) takes over at fine steps
    (tests/test_catalog_lms.py). ``ipndm-v`` uses the actual steps' weights. One model call per step.
    """

    max_order = Option(4, "the most past derivatives used (1 to 4)", low=1, high=4)
    euler_to_zero = True
    variable_steps = False

    def max_history(self) -> int:
        return self.max_order

    def weights(self, nodes, s, s_next):
        return list(AB_FIXED[len(nodes)])


@register(
    "ipndm-v",
    family="ode",
    order=4,
    calls_per_step=1,
    deterministic=True,
    description="variable-step iPNDM: Adams-Bashforth weights of the actual steps (ComfyUI sample_ipndm_v)",
    reference="Zhang & Chen 2023, Fast Sampling of Diffusion Models with Exponential Integrator (DEIS)",
)
class IPNDMV(_Multistep):
    """Variable-step iPNDM (ComfyUI's ``sample_ipndm_v``, from zju-pi/diff-sampler; Zhang & Chen 2023,
    DEIS; Liu et al. 2022, PNDM): as ``ipndm`` but with the Adams-Bashforth weights of the grid's
    actual steps, the integrals over [s_i, s_{i+1}] of the Lagrange basis polynomials on the
    k = min(i + 1, max_order) newest nodes s_i, ..., s_{i-k+1}:

        y_{i+1} = y_i + sum_{j<k} c_j d_{i-j},   c_j = int_{s_i}^{s_{i+1}} l_j(s) ds

    (e.g. k = 2, r = (s_{i+1} - s_i)/(s_i - s_{i-1}): c = (s_{i+1} - s_i) ((2 + r)/2, -r/2)). On an
    equal-step grid these are ``ipndm``'s weights. This is ``lms``'s rule with ``max_order`` <= 4 and,
    as ComfyUI's, an Euler step (to the denoised sample) when the step ends at sigma = 0. One model
    call per step. ``invert`` refuses max_order 4 (the default), saying why (unstable run backwards);
    max_order <= 3 runs backwards.
    """

    max_order = Option(4, "the most past derivatives used (1 to 4)", low=1, high=4)
    euler_to_zero = True

    def max_history(self) -> int:
        return self.max_order

    def weights(self, nodes, s, s_next):
        return [w / (s_next - s) for w in ab_weights(nodes, s, s_next)]
