"""SEEDS (Gonzalez et al. 2023) as ComfyUI's ``sample_seeds_2`` / ``sample_seeds_3``, and ComfyUI's
exponential Heun in x0 (``sample_exp_heun_2_x0``, ``sample_exp_heun_2_x0_sde``), the same class with
r = 1 and phi_2.

The steps are exponential Runge-Kutta stages of the data-prediction form in the half log-SNR
lambda = log(alpha/sigma), taken in y = (x - mu)/alpha against s = sigma/alpha = e^{-lambda} as
:mod:`diffsolve.solvers.ode.dpm2`. A step from s to s' has h = log(s/s') > 0; with eta >= 0 its
stochastic variant integrates with the rate H = (1 + eta) h, so that at node c (lambda_s + c h, level
s_c = s e^{-c h}) a stage is (D_0 = the model's x0_hat - mu at the start of the step, D_j the one at
an earlier stage j; phi_k as :func:`diffsolve.solvers.exponential.maths.phi_functions`)

    y_c = e^{-c H} y + (1 - e^{-c H}) D_0 + w_c (D_j - D_0) + s_noise s_c N_c

with 1 - e^{-cH} = cH phi_1(-cH). N_c is the step's noise up to node c, one Ornstein-Uhlenbeck path
across the stages (SEEDS' correlated noise segments, as ComfyUI draws them): with seg = (c - c_prev) h eta,

    N_c = e^{-seg} N_{c_prev} + sqrt(1 - e^{-2 seg}) z_c,    N_0 = 0,

z_c the standard normal of the segment (``noise.step(t_{c_prev}, t_c)``), so Var N_c = 1 - e^{-2 c h eta}.
At eta = 0 there is no noise (nothing is drawn) and the steps are the deterministic exponential
integrators of DPM-Solver++ (Lu et al. 2022): order 2 (seeds-2, exp-heun-2-x0) and 3 (seeds-3).
A step to s' = 0 is the jump y = D_0 (one call); a step from s = 0 (an inversion's start) is the
DDIM step y + (s' - s) eps.

Flow models: ComfyUI writes the same formulas with x, sigma and alpha = sigma e^{lambda}, where
lambda is log((1 - sigma)/sigma) on rectified flow; that is algebraically this step in x/alpha
against sigma/alpha, so the two differ only in rounding. ComfyUI also moves a first sigma of 1
(alpha = 0) to the level at 1e-4 of the schedule and multiplies s_noise by the model's
``noise_scale``; here a grid starting at alpha = 0 is refused with an error (start below, e.g.
t_max = 0.999), and s_noise is taken as given.
"""

from __future__ import annotations

import math

import torch

from ...core.options import Option
from ...core.protocol import Query, Solver
from ...core.registry import register
from ..exponential.maths import model_output, phi_functions
from ..ode.dpm2 import ScaledVariables

ETA = Option(1.0, "the SDE's noise strength: 0 is the deterministic exponential integrator", low=0.0)
S_NOISE = Option(1.0, "a scale on the drawn noise (ComfyUI's s_noise)", low=0.0)
SOLVER_TYPES = ("phi_1", "phi_2")


def phi12(z: float) -> tuple[float, float]:
    """(phi_1(z), phi_2(z)) as floats (:func:`phi_functions`, the series at small |z|)."""
    p1, p2 = phi_functions(torch.tensor(z, dtype=torch.float64), 2)
    return float(p1), float(p2)


class _ExponentialStages(Solver):
    """The shared loop of the SEEDS samplers (module docstring): subclasses give the nodes c of the
    stages (the last one 1) and the weight w_c of each later stage's difference D_j - D_0."""

    eta = ETA
    s_noise = S_NOISE

    def nodes(self) -> list[float]:
        raise NotImplementedError

    def difference(self, k: int, big_h: float) -> tuple[int, float]:
        """(j, w) of stage k >= 1 (0-based): the earlier model output D_j it uses and its weight."""
        raise NotImplementedError

    def run(self, x, grid, noise, *, schedule, mu=None):
        maps = ScaledVariables(schedule, mu)
        x, grid = yield from maps.enter(x, grid)
        nodes = self.nodes()
        inject = self.eta > 0 and self.s_noise > 0
        for i, t, t_next, s, s_next in maps.steps(grid):
            pred = yield Query(x, t, step=maps.first + i + 1)
            y = maps.y(pred.x, t)
            if s_next <= 0 or s <= 0:  # the jump to D (s' = 0) or DDIM from s = 0
                x = maps.x(y + (s_next - s) * pred.eps, t_next)
                continue
            h = math.log(s) - math.log(s_next)
            big_h = (1.0 + self.eta) * h
            d = [model_output(pred, mu, "data")]
            n_c, c_prev, t_prev = None, 0.0, t
            for k, c in enumerate(nodes):
                final = k == len(nodes) - 1
                s_c = s_next if c == 1.0 else s * math.exp(-c * h)
                t_c = t_next if c == 1.0 else maps.t(s_c)
                y_c = math.exp(-c * big_h) * y + (-math.expm1(-c * big_h)) * d[0]
                if k > 0:
                    j, w = self.difference(k, big_h)
                    y_c = y_c + w * (d[j] - d[0])
                if inject:
                    seg = (c - c_prev) * h * self.eta
                    if seg != 0:
                        z = math.sqrt(-math.expm1(-2.0 * seg)) * noise.step(t_prev, t_c)
                        n_c = z if n_c is None else math.exp(-seg) * n_c + z
                    if n_c is not None:
                        y_c = y_c + (self.s_noise * s_c) * n_c
                if final:
                    y = y_c
                else:
                    pred_c = yield Query(maps.x(y_c, t_c), t_c, step=maps.first + i + 1)
                    d.append(model_output(pred_c, mu, "data"))
                c_prev, t_prev = c, t_c
            x = maps.x(y, t_next)
        return x


@register(
    "seeds-2",
    family="sde",
    order=2,
    calls_per_step=2,
    deterministic=False,
    description="SEEDS-2 (ComfyUI sample_seeds_2): 2-stage exponential SDE solver in x0 and log-SNR",
    reference="Gonzalez et al. 2023, SEEDS: Exponential SDE Solvers for Fast High-Quality Sampling from "
    "Diffusion Models (NeurIPS, arXiv 2305.14267)",
)
class Seeds2(_ExponentialStages):
    """SEEDS-2 (Gonzalez et al. 2023, "SEEDS: Exponential SDE Solvers for Fast High-Quality Sampling
    from Diffusion Models", NeurIPS, arXiv 2305.14267), as ComfyUI's ``sample_seeds_2``. With the
    module docstring's notation (H = (1 + eta) h, N the correlated noise), for each step:

        y_r  = e^{-rH} y + (1 - e^{-rH}) D_0 + s_noise s_r N_r                     (model call at s_r)
        phi_1:  y' = e^{-H} y + (1 - e^{-H}) (D_0 + (D_r - D_0)/(2r)) + s_noise s' N_1
        phi_2:  y' = e^{-H} y + (1 - e^{-H}) D_0 + H phi_2(-H)/r (D_r - D_0) + s_noise s' N_1

    Two model calls per step (one on the step to s' = 0). At eta = 0 it is the deterministic
    second-order exponential Runge-Kutta step (r = 1/2, phi_1: DPM-Solver++(2S)'s midpoint form;
    r = 1, phi_2: ``exp-heun-2-x0``); the registered order 2 is that limit's (measured on the
    closed-form Gaussian). With eta > 0 the noise is the exact Ornstein-Uhlenbeck part of the
    reverse SDE in lambda over each segment, so the step reaches the marginal noise level at s'.
    """

    r = Option(
        0.5, "the intermediate stage's node in lambda, as a fraction of the step", low=0.0, low_open=True, high=1.0
    )
    solver_type = Option(
        "phi_1", "the final stage's weights: phi_1 (a blend of D_0, D_r) or phi_2", choices=SOLVER_TYPES
    )

    def nodes(self) -> list[float]:
        return [self.r, 1.0]

    def difference(self, k: int, big_h: float) -> tuple[int, float]:
        p1, p2 = phi12(-big_h)
        if self.solver_type == "phi_1":
            return 1, big_h * p1 / (2.0 * self.r)
        return 1, big_h * p2 / self.r


class ExpHeun2X0(Seeds2):
    """ComfyUI's exponential Heun in x0 and log-SNR (``sample_exp_heun_2_x0``,
    ``sample_exp_heun_2_x0_sde``): ``seeds-2`` with r = 1 and, by default, phi_2. Each step is a
    DPM-Solver++(1) (DDIM) predictor to s', a model call there, and the corrector

        y' = e^{-H} y + (1 - e^{-H}) D_0 + H phi_2(-H) (D' - D_0) + s_noise s' N,

    i.e. the trapezoid-like second-order exponential Runge-Kutta (Heun) step (eta = 0: H = h,
    no noise). With eta > 0 the predictor's noise is carried to the corrector whole (the second
    segment is empty)."""

    solver_type = Option("phi_2", "the corrector's weights: phi_2 (Heun, default) or phi_1", choices=SOLVER_TYPES)


register(
    "exp-heun-2-x0",
    family="ode",
    order=2,
    calls_per_step=2,
    deterministic=True,
    fixed={"eta": 0.0, "s_noise": 0.0, "r": 1.0},
    description="exponential Heun in x0 (ComfyUI sample_exp_heun_2_x0 = seeds-2 eta 0, r 1, phi_2)",
    reference="Gonzalez et al. 2023, SEEDS (arXiv 2305.14267); Lu et al. 2022, DPM-Solver++",
)(ExpHeun2X0)
register(
    "exp-heun-2-x0-sde",
    family="sde",
    order=2,
    calls_per_step=2,
    deterministic=False,
    fixed={"r": 1.0},
    description="stochastic exponential Heun in x0 (ComfyUI sample_exp_heun_2_x0_sde = seeds-2 r 1, phi_2)",
    reference="Gonzalez et al. 2023, SEEDS (arXiv 2305.14267); Lu et al. 2022, DPM-Solver++",
)(ExpHeun2X0)


@register(
    "seeds-3",
    family="sde",
    order=3,
    calls_per_step=3,
    deterministic=False,
    description="SEEDS-3 (ComfyUI sample_seeds_3): 3-stage exponential SDE solver in x0 and log-SNR",
    reference="Gonzalez et al. 2023, SEEDS: Exponential SDE Solvers for Fast High-Quality Sampling from "
    "Diffusion Models (NeurIPS, arXiv 2305.14267)",
)
class Seeds3(_ExponentialStages):
    """SEEDS-3 (Gonzalez et al. 2023, "SEEDS: Exponential SDE Solvers for Fast High-Quality Sampling
    from Diffusion Models", NeurIPS, arXiv 2305.14267), as ComfyUI's ``sample_seeds_3``. With the
    module docstring's notation, nodes r_1 < r_2 < 1 and each step:

        y_1 = e^{-r_1 H} y + (1 - e^{-r_1 H}) D_0 + s_noise s_1 N_1                          (call at s_1)
        y_2 = e^{-r_2 H} y + (1 - e^{-r_2 H}) D_0 + (r_2/r_1) r_2 H phi_2(-r_2 H) (D_1 - D_0) + s_noise s_2 N_2   (call at s_2)
        y'  = e^{-H} y + (1 - e^{-H}) D_0 + H phi_2(-H)/r_2 (D_2 - D_0) + s_noise s' N_3

    Three model calls per step (one on the step to s' = 0). At eta = 0 this is the third-order
    singlestep DPM-Solver-3 in data prediction (Lu et al. 2022; r_1 = 1/3, r_2 = 2/3), the registered
    order 3 (measured on the closed-form Gaussian); the noise segments are one Ornstein-Uhlenbeck path.
    """

    r_1 = Option(
        1.0 / 3.0, "the first intermediate node in lambda (fraction of the step)", low=0.0, low_open=True, high=1.0
    )
    r_2 = Option(
        2.0 / 3.0, "the second intermediate node in lambda (fraction of the step)", low=0.0, low_open=True, high=1.0
    )

    def check_options(self) -> None:
        if not self.r_1 < self.r_2:
            raise ValueError(f"seeds-3 needs r_1 < r_2, got r_1={self.r_1!r}, r_2={self.r_2!r}")

    def nodes(self) -> list[float]:
        return [self.r_1, self.r_2, 1.0]

    def difference(self, k: int, big_h: float) -> tuple[int, float]:
        if k == 1:
            _, p2 = phi12(-self.r_2 * big_h)
            return 1, (self.r_2 / self.r_1) * self.r_2 * big_h * p2
        _, p2 = phi12(-big_h)
        return 2, big_h * p2 / self.r_2
