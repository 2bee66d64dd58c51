"""Black-box adaptive probability-flow ODE solvers against the closed-form Gaussian flow map."""

import pytest
import torch

import diffsolve as ds
from diffsolve.models import NonFiniteError

GAUSS = ds.models.GaussianMixture([[0.5, -1.0, 2.0, 0.0]], [[0.5, 1.0, 0.2, 2.0]])


@pytest.mark.parametrize("solver", ["ode-dopri5", "ode-rk45"])
@pytest.mark.parametrize("sched", [ds.schedules.VPLinear(), ds.schedules.VE()], ids=["vp", "ve"])
def test_tight_tolerance_matches_flow_map(solver, sched):
    model = GAUSS.model(sched)
    x_T = GAUSS.marginal(sched.t_max, sched).sample(16, torch.Generator().manual_seed(0))
    exact = GAUSS.flow_map(x_T, sched.t_max, sched.t_min, sched)
    res = ds.sample(model, solver, x_T=x_T, rtol=1e-8, atol=1e-8)  # adaptive: no steps needed
    err = float((res.samples - exact).abs().max())
    loose = ds.sample(model, solver, 1, x_T=x_T, rtol=1e-3, atol=1e-3)
    print(solver, "max error", err, "NFE", res.nfe, "| rtol 1e-3: NFE", loose.nfe)
    assert err < 1e-6
    assert res.nfe > loose.nfe > 0 and res.nfe_per_sample.tolist() == [res.nfe] * 16
    # 2 calls to pick the first step, then 6 per attempt (first-same-as-last), accepted or rejected
    for r in (res, loose):
        assert r.accepted.unique().numel() == 1 and r.accepted[0] > 0
        assert r.nfe == 2 + 6 * int(r.accepted[0] + r.rejected[0])


def test_nan_stops_the_worker_cleanly():
    calls = []

    def net(x, t):
        calls.append(1)
        return torch.full_like(x, float("nan")) if len(calls) > 3 else torch.zeros_like(x)

    model = ds.DiffusionModel(net, ds.schedules.VPLinear(), "eps")
    with pytest.raises(NonFiniteError, match="ode-dopri5"):
        ds.sample(model, "ode-dopri5", 1, shape=(2, 2), dtype=torch.float64)
    with pytest.raises(ValueError, match="method must be one of"):
        ds.get_solver("ode-rk45", method="LSODA")
