"""ComfyUI's res-multistep, res-multistep-ancestral and gradient-estimation (issue 20): the second step
against its formula with explicit numbers, the order of res-multistep on the closed-form Gaussian, and
the law of the ancestral sampler's samples."""

import math

import pytest
import torch
from test_orders import SCHEDULES, errors  # the closed-form Gaussian order test

import diffsolve as ds
from diffsolve.core.registry import registered, solver_info
from diffsolve.metrics import mmd2
from diffsolve.solvers.ode.dpm2 import noise_level
from diffsolve.solvers.ode.res import res_weights
from diffsolve.solvers.sde.ancestral import ancestral_split

S = ds.schedules
INFO = {i.name: i for i in registered()}


def test_registry_entries():
    for name, family, order, det, opts in (
        ("res-multistep", "ode", 2, True, {}),
        ("res-multistep-ancestral", "sde", 1, False, {"eta": 1.0, "s_noise": 1.0}),
        ("gradient-estimation", "ode", 1, True, {"ge_gamma": 2.0}),
    ):
        info = INFO[name]
        assert (info.family, info.order, info.calls_per_step, info.deterministic) == (family, order, 1, det)
        assert ds.get_solver(name).options() == opts
        assert solver_info(name.replace("-", "_")).name == name  # ComfyUI's spelling finds it


def test_res_weights_explicit_numbers():
    """h = 0.5 after h_prev = 0.4: phi_1(-h) = (1 - e^{-0.5})/0.5, phi_2(-h) = (phi_1 - 1)/(-0.5),
    c2 = -0.8, b2 = phi_2/c2, b1 = phi_1 - b2; equal small steps give Adams-Bashforth's (3/2, -1/2)."""
    phi1 = (1 - math.exp(-0.5)) / 0.5
    phi2 = (phi1 - 1) / -0.5
    assert abs(phi1 - 0.7869386805747332) < 1e-15 and abs(phi2 - 0.4261226388505337) < 1e-15
    b1, b2 = res_weights(0.5, 0.4)
    assert abs(b2 - phi2 / -0.8) < 1e-12 and abs(b2 - -0.5326532985631671) < 1e-12
    assert abs(b1 - (phi1 - phi2 / -0.8)) < 1e-12 and abs(b1 - 1.3195919791379003) < 1e-12
    b1, b2 = res_weights(1e-6, 1e-6)  # the series of phi_functions, not the cancelling closed form
    assert abs(b1 - 1.5) < 1e-6 and abs(b2 + 0.5) < 1e-6


# ------------------------------------------------------------------ the second step by hand
GMM3 = ds.models.GaussianMixture([[1.0, -0.5, 0.2], [-1.0, 0.5, 0.0]], 0.4)
GRID = torch.tensor([0.9, 0.6, 0.35], dtype=torch.float64)
Z = [torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(k)) for k in (11, 12)]


class Fixed:
    """The step noise z_1, z_2 in order."""

    def __init__(self):
        self.k = 0

    def step(self, t, t_next, index=None):
        self.k += 1
        return Z[self.k - 1]


def _two_steps(name, sched, mu=None, **opts):
    """The solver's two steps on GRID; the model's predictions at its two calls and the result."""
    model = GMM3.model(sched)
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    run = ds.get_solver(name, **opts).run(x, GRID, Fixed(), schedule=sched, mu=mu)
    preds, item = [], next(run)
    try:
        while True:
            preds.append(model(*item[:2]))
            item = run.send(preds[-1])
    except StopIteration as stop:
        out = stop.value
    assert len(preds) == 2 and torch.equal(preds[0].x, x)
    return preds, out


SCHEDS = {
    "vp": (lambda: S.VPLinear(), None),
    "flow": (lambda: S.RectifiedFlow(), None),
    "mean-reverting": (lambda: S.MeanReverting(lam=0.5), torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)),
}


def _levels(sched):
    a = [float(sched.alpha(t)) for t in GRID]
    s = [noise_level(sched, float(t)) for t in GRID]
    return a, s


@pytest.mark.parametrize("schedule", SCHEDS)
def test_res_multistep_second_step_by_hand(schedule):
    make, mu = SCHEDS[schedule]
    sched = make()
    (p0, p1), out = _two_steps("res-multistep", sched, mu)
    a, s = _levels(sched)
    m = 0.0 if mu is None else mu
    y0 = (p0.x - m) / a[0]
    y1 = y0 + (s[1] - s[0]) * p0.eps  # first step: Euler in s
    assert float((p1.x - (m + a[1] * y1)).abs().max()) < 1e-12
    h_prev, h = math.log(s[0] / s[1]), math.log(s[1] / s[2])
    phi1 = -math.expm1(-h) / h
    phi2 = (phi1 - 1) / -h
    c2 = -h_prev / h
    b2 = phi2 / c2
    b1 = phi1 - b2
    y2 = math.exp(-h) * y1 + h * (b1 * (p1.x0 - m) + b2 * (p0.x0 - m))
    err = float((out - (m + a[2] * y2)).abs().max())
    print(schedule, "h", h, "h_prev", h_prev, "b1", b1, "b2", b2, "error", err)
    assert err < 1e-12


@pytest.mark.parametrize("schedule", SCHEDS)
def test_res_multistep_ancestral_second_step_by_hand(schedule):
    make, mu = SCHEDS[schedule]
    sched = make()
    eta, s_noise = 0.7, 0.9
    (p0, p1), out = _two_steps("res-multistep-ancestral", sched, mu, eta=eta, s_noise=s_noise)
    a, s = _levels(sched)
    m = 0.0 if mu is None else mu
    down, up = [], []
    for i in (0, 1):  # k-diffusion's get_ancestral_step
        u = min(s[i + 1], eta * math.sqrt(s[i + 1] ** 2 * (s[i] ** 2 - s[i + 1] ** 2) / s[i] ** 2))
        up.append(u)
        down.append(math.sqrt(s[i + 1] ** 2 - u**2))
        assert ancestral_split(s[i], s[i + 1], eta) == pytest.approx((down[i], up[i]), rel=1e-14)
    y0 = (p0.x - m) / a[0]
    y1 = y0 + (down[0] - s[0]) * p0.eps + s_noise * up[0] * Z[0]
    assert float((p1.x - (m + a[1] * y1)).abs().max()) < 1e-12
    h_prev, h = math.log(s[0] / down[0]), math.log(s[1] / down[1])  # ComfyUI's h_prev: to sigma_down
    phi1 = -math.expm1(-h) / h
    phi2 = (phi1 - 1) / -h
    b2 = phi2 / (-h_prev / h)
    b1 = phi1 - b2
    y2 = (down[1] / s[1]) * y1 + h * (b1 * (p1.x0 - m) + b2 * (p0.x0 - m)) + s_noise * up[1] * Z[1]
    err = float((out - (m + a[2] * y2)).abs().max())
    print(schedule, "sigma_down", down, "sigma_up", up, "error", err)
    assert err < 1e-12


@pytest.mark.parametrize("gamma", [2.0, 1.5])
@pytest.mark.parametrize("schedule", SCHEDS)
def test_gradient_estimation_second_step_by_hand(schedule, gamma):
    make, mu = SCHEDS[schedule]
    sched = make()
    (p0, p1), out = _two_steps("gradient-estimation", sched, mu, ge_gamma=gamma)
    a, s = _levels(sched)
    m = 0.0 if mu is None else mu
    y1 = (p0.x - m) / a[0] + (s[1] - s[0]) * p0.eps
    assert float((p1.x - (m + a[1] * y1)).abs().max()) < 1e-12
    y2 = y1 + (s[2] - s[1]) * (p1.eps + (gamma - 1) * (p1.eps - p0.eps))
    err = float((out - (m + a[2] * y2)).abs().max())
    print(schedule, gamma, "error", err)
    assert err < 1e-12


def test_special_cases():
    """eta = 0 is res-multistep; ge_gamma = 1 is Euler in sigma/alpha (euler-ancestral with eta = 0)."""
    model = GMM3.model(S.VPLinear())
    kw = {"shape": (8, 3), "seed": 0, "dtype": torch.float64}
    a = ds.sample(model, "res-multistep-ancestral", 12, eta=0.0, **kw).samples
    assert torch.equal(a, ds.sample(model, "res-multistep", 12, **kw).samples)
    b = ds.sample(model, "gradient-estimation", 12, ge_gamma=1.0, **kw).samples
    assert float((b - ds.sample(model, "euler-ancestral", 12, eta=0.0, **kw).samples).abs().max()) < 1e-12


# ------------------------------------------------------------------ order of res-multistep (as tests/test_orders.py)
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_res_multistep_order_two(schedule):
    """Measured (10/20/40/80 steps): orders 1.91 2.03 2.03 (vp), 1.96 2.03 2.03 (ve), 1.70 2.01 2.03
    (flow), 1.99 2.03 2.02 (sd-discrete), 1.91 2.03 2.03 (mean-reverting)."""
    make, mu = SCHEDULES[schedule]
    errs = errors("res-multistep", make(), mu)
    orders = [math.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 1)]
    print("res-multistep", schedule, "errors", [f"{e:.3e}" for e in errs], "orders", [f"{o:.2f}" for o in orders])
    assert all(e2 < e1 for e1, e2 in zip(errs, errs[1:]))
    for o in orders[1:]:
        assert abs(o - INFO["res-multistep"].order) < 0.25, (schedule, orders)


def test_gradient_estimation_converges_with_order_one():
    """gamma = 2 extrapolates with a weight that ignores the step sizes: order 1, not 2. Measured on vp
    (10/20/40/80 steps): orders 0.29 0.68 0.84, tending to 1."""
    errs = errors("gradient-estimation", S.VPLinear(), None)
    orders = [math.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 1)]
    print("gradient-estimation vp errors", [f"{e:.3e}" for e in errs], "orders", [f"{o:.2f}" for o in orders])
    assert all(e2 < e1 for e1, e2 in zip(errs, errs[1:]))
    assert 0.7 < orders[-1] < 1.2


# ------------------------------------------------------------------ the law of the samples (tests/test_distribution.py)
N = 1500  # = conftest.GMM_N
GMM = ds.models.GaussianMixture.gmm_2d()
SCHED = S.VPLinear()


@pytest.mark.parametrize(
    "solver,steps", [("res-multistep-ancestral", 100), ("res-multistep", 50), ("gradient-estimation", 50)]
)
def test_passes_two_sample_test(solver, steps, threshold, reference):
    res = ds.sample(GMM.model(SCHED), solver, steps, shape=(N, 2), seed=0, dtype=torch.float64, grid="uniform")
    d = mmd2(res.samples, reference)
    print(solver, steps, "mmd2", d, "threshold", threshold)
    assert d < threshold


def test_two_sample_test_fails_with_three_steps(threshold, reference):
    model = GMM.model(SCHED)
    res = ds.sample(model, "res-multistep-ancestral", 3, shape=(N, 2), seed=0, dtype=torch.float64, grid="uniform")
    d = mmd2(res.samples, reference)
    print("res-multistep-ancestral", 3, "mmd2", d, "threshold", threshold)
    assert d > 5 * threshold
