"""Empirical convergence orders against the closed-form probability-flow map of Gaussian data."""

import math

import pytest
import torch

import diffsolve as ds

S = ds.schedules
GAUSS = ds.models.GaussianMixture([[0.5, -1.0, 2.0, 0.0]], [[0.5, 1.0, 0.2, 2.0]])
STEPS = (10, 20, 40, 80)
SCHEDULES = {
    "vp": (lambda: S.VPLinear(), None),
    "ve": (lambda: S.VE(), None),
    "flow": (lambda: S.RectifiedFlow(t_min=1e-3, t_max=1 - 1e-3), None),
    "sd-discrete": (
        lambda: S.VPDiscrete.from_diffusers_config(
            {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
        ),
        None,
    ),
    "mean-reverting": (lambda: S.MeanReverting(lam=0.5), torch.tensor([0.3, 0.3, -0.2, 0.1], dtype=torch.float64)),
}
EXPECTED = {"euler": 1.0, "ddim": 1.0, "heun": 2.0}


def errors(solver, sched, mu, **opts):
    model = GAUSS.model(sched)
    x_T = GAUSS.marginal(sched.t_max, sched, mu).sample(64, torch.Generator().manual_seed(0))
    exact = GAUSS.flow_map(x_T, sched.t_max, sched.t_min, sched, mu)
    errs = []
    for n in STEPS:
        res = ds.sample(model, solver, n, x_T=x_T, grid="log-snr", mu=mu, **opts)
        assert res.samples.dtype == torch.float64
        errs.append(float((res.samples - exact).abs().max()))
    return errs


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("solver", EXPECTED)
def test_ode_order(solver, schedule):
    make, mu = SCHEDULES[schedule]
    errs = errors(solver, make(), mu, **({"eta": 0.0} if solver == "ddim" else {}))
    orders = [math.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 1)]
    print(solver, schedule, "errors", [f"{e:.3e}" for e in errs], "orders", [f"{o:.2f}" for o in orders])
    assert all(e2 < e1 for e1, e2 in zip(errs, errs[1:])), "the error must fall as steps double"
    # the asymptotic order: the two finest doublings (10 -> 20 may still be pre-asymptotic for VE)
    for o in orders[1:]:
        assert abs(o - EXPECTED[solver]) < 0.25, (solver, schedule, orders)


def test_heun_churn_is_stochastic_and_converges_in_distribution():
    """s_churn > 0 (EDM Algorithm 2) adds noise: different seeds differ, and the mean/std still match."""
    sched = S.EDM()
    model = GAUSS.model(sched)
    a = ds.sample(model, "heun", 30, shape=(2000, 4), seed=0, dtype=torch.float64, s_churn=10.0)
    b = ds.sample(model, "heun", 30, shape=(2000, 4), seed=1, dtype=torch.float64, s_churn=10.0)
    assert not torch.equal(a.samples, b.samples)
    target = GAUSS.marginal(sched.t_min, sched)
    assert torch.allclose(a.samples.mean(0), target.means[0], atol=0.12)
    assert torch.allclose(a.samples.std(0), target.stds[0], rtol=0.08)
    assert a.nfe == 60
