"""Linear multistep solvers (lms, ipndm, ipndm-v): measured orders on the closed-form Gaussian flow,
hand computations of the weights, and parity with diffusers' LMSDiscreteScheduler and IPNDMScheduler."""

import math

import pytest
import torch
from diffusers import IPNDMScheduler, LMSDiscreteScheduler

import diffsolve as ds
from diffsolve.core.protocol import drive
from diffsolve.core.registry import solver_info

S = ds.schedules
GAUSS = ds.models.GaussianMixture([[0.5, -1.0, 2.0, 0.0]], [[0.5, 1.0, 0.2, 2.0]])
STEPS = (20, 40, 80, 160)


def _errors(solver, sched, grid_of, t_max, t_min, steps=STEPS, mu=None, **opts):
    model = GAUSS.model(sched)
    x_T = GAUSS.marginal(t_max, sched, mu).sample(64, torch.Generator().manual_seed(0))
    exact = GAUSS.flow_map(x_T, t_max, t_min, sched, mu)
    out = [ds.sample(model, solver, n, x_T=x_T, grid=grid_of(n), mu=mu, **opts).samples for n in steps]
    return [float((x - exact).abs().max()) for x in out], out


def _orders(errs):
    return [math.log2(a / b) for a, b in zip(errs, errs[1:])]


MU = torch.tensor([0.3, 0.3, -0.2, 0.1], dtype=torch.float64)
SCHEDULES = {
    "vp": (S.VPLinear, None),
    "ve": (S.VE, None),
    "flow": (lambda: S.RectifiedFlow(t_min=1e-3, t_max=1 - 1e-3), None),
    "mean-reverting": (lambda: S.MeanReverting(lam=0.5), MU),
}


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_lms_order_on_log_snr_grid(schedule):
    """lms (order 4, the default) on the log-SNR grid: the error falls about 16-fold per doubling at
    the finest steps (the registry's order 4); ipndm-v is the same rule (AB weights of the actual
    steps), so its samples agree; ipndm's fixed weights on these unequal steps are second order."""
    make, mu = SCHEDULES[schedule]
    sched = make()
    assert solver_info("lms").order == 4

    def grid_of(n):
        return S.make_grid(sched, n, "log-snr")

    errs, lms = _errors("lms", sched, grid_of, sched.t_max, sched.t_min, mu=mu)
    orders = _orders(errs)
    print(schedule, "lms errors", [f"{e:.2e}" for e in errs], "orders", [f"{o:.2f}" for o in orders])
    assert all(b < a for a, b in zip(errs, errs[1:]))
    assert orders[-1] > 3.5, orders

    _, v = _errors("ipndm-v", sched, grid_of, sched.t_max, sched.t_min, mu=mu)
    assert max(float((a - b).abs().max()) for a, b in zip(lms, v)) < 1e-10

    errs_i, _ = _errors("ipndm", sched, grid_of, sched.t_max, sched.t_min, mu=mu)
    orders_i = _orders(errs_i)
    print(schedule, "ipndm errors", [f"{e:.2e}" for e in errs_i], "orders", [f"{o:.2f}" for o in orders_i])
    assert abs(orders_i[-1] - 2.0) < 0.3, orders_i


@pytest.mark.parametrize("solver", ["ipndm", "ipndm-v", "lms"])
def test_equal_steps_order_and_the_warm_up_floor(solver):
    """On steps equal in s = sigma/alpha (EDM, sigma in [0.05, 2]) the three are one rule (the fixed
    AB weights are the equal-step ones): fourth order over 20 -> 40 steps; the warm-up's first
    (Euler) step leaves an O(h^2) term that takes over at fine steps (k-diffusion's and diffusers'
    warm-up, kept for parity)."""
    sched = S.EDM()

    def grid_of(n):
        return torch.linspace(2.0, 0.05, n + 1, dtype=torch.float64)

    errs, xs = _errors(solver, sched, grid_of, 2.0, 0.05, steps=(20, 40, 80, 160, 320))
    orders = _orders(errs)
    print(solver, "equal steps: errors", [f"{e:.2e}" for e in errs], "orders", [f"{o:.2f}" for o in orders])
    assert orders[0] > 3.7, orders
    assert abs(orders[-1] - 2.0) < 0.1, orders  # the warm-up's Euler step
    _, ref = _errors("lms", sched, grid_of, 2.0, 0.05, steps=(20, 40, 80, 160, 320))
    assert max(float((a - b).abs().max()) for a, b in zip(xs, ref)) < 1e-10


def _recorded_run(solver, x, grid, sched, **opts):
    """Run ``solver`` with the Gaussian oracle, recording each query's (x, t) and prediction."""
    model = GAUSS.model(sched)
    seen = []

    def call(q):
        pred = model(q.x, q.t)
        seen.append((q.x, float(q.t), pred))
        return pred

    out = drive(ds.get_solver(solver, **opts).run(x, grid, None, schedule=sched), call)
    return out, seen


def test_ipndm_weights_by_hand():
    """EDM (alpha = 1: y = x, s = sigma = t, d = eps) on an uneven grid: ipndm's steps 2, 3 and 4 apply
    (3, -1)/2, (23, -16, 5)/12 and (55, -59, 37, -9)/24 to the recorded derivatives; ipndm-v's step 2
    applies ((2 + r)/2, -r/2), r the ratio of the steps; the last step to sigma = 0 is an Euler step,
    which lands on the model's denoised sample."""
    sched = S.EDM()
    grid = torch.tensor([3.0, 2.0, 1.5, 0.9, 0.6, 0.0], dtype=torch.float64)
    x0 = GAUSS.marginal(3.0, sched, None).sample(5, torch.Generator().manual_seed(1))
    out, seen = _recorded_run("ipndm", x0, grid, sched)
    assert len(seen) == 5
    x = [q[0] for q in seen] + [out]
    d = [q[2].eps for q in seen]
    s = grid.tolist()
    assert (x[1] - (x[0] + (s[1] - s[0]) * d[0])).abs().max() < 1e-12
    assert (x[2] - (x[1] + (s[2] - s[1]) * (3 * d[1] - d[0]) / 2)).abs().max() < 1e-12
    assert (x[3] - (x[2] + (s[3] - s[2]) * (23 * d[2] - 16 * d[1] + 5 * d[0]) / 12)).abs().max() < 1e-12
    step4 = x[3] + (s[4] - s[3]) * (55 * d[3] - 59 * d[2] + 37 * d[1] - 9 * d[0]) / 24
    assert (x[4] - step4).abs().max() < 1e-12
    assert (x[5] - seen[-1][2].x0).abs().max() < 1e-12  # sigma_next = 0: Euler, to the denoised sample

    _, seen_v = _recorded_run("ipndm-v", x0, grid, sched)
    xv = [q[0] for q in seen_v]
    dv = [q[2].eps for q in seen_v]
    r = (s[2] - s[1]) / (s[1] - s[0])
    assert (xv[2] - (xv[1] + (s[2] - s[1]) * ((2 + r) / 2 * dv[1] - r / 2 * dv[0]))).abs().max() < 1e-12
    assert (xv[2] - x[2]).abs().max() > 1e-4  # the grid is uneven: the two differ from step 2 on

    out_1, _ = _recorded_run("ipndm", x0, grid, sched, max_order=1)
    euler = ds.sample(GAUSS.model(sched), "euler", x_T=x0, grid=grid).samples
    assert (out_1 - euler).abs().max() < 1e-12


@pytest.mark.parametrize("n", [10, 25])
def test_lms_parity_with_diffusers(n):
    """diffusers' LMSDiscreteScheduler (order 4) in a plain loop on the Gaussian oracle's eps, against
    ds.sample("lms") on the same timesteps (plus the final sigma = 0): to 1e-5 relative, with the same
    number of model calls."""
    ref = LMSDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing"
    )
    ref.set_timesteps(n)
    sched = S.VPDiscrete.from_diffusers_config(ref.config)
    model = GAUSS.model(sched)
    grid = torch.tensor([float(sched.t_of_timestep(float(t))) for t in ref.timesteps] + [0.0], dtype=torch.float64)
    # the grid's sigma/alpha are the scheduler's sigmas
    k_sigmas = torch.tensor([sched.at(float(t))[1] / sched.at(float(t))[0] for t in grid], dtype=torch.float64)
    assert (k_sigmas - ref.sigmas.double()).abs().max() / ref.sigmas.max() < 1e-6

    x_T = GAUSS.marginal(float(grid[0]), sched, None).sample(16, torch.Generator().manual_seed(2))
    y = x_T * (ref.sigmas[0].double() ** 2 + 1) ** 0.5  # diffusers' state is x / alpha
    calls = 0
    for i, t in enumerate(ref.timesteps):
        eps = model(ref.scale_model_input(y, t), float(grid[i])).eps
        calls += 1
        y = ref.step(eps, t, y).prev_sample
    res = ds.sample(model, "lms", x_T=x_T, grid=grid)
    rel = float((res.samples - y).abs().max() / y.abs().max())
    print("lms", n, "relative difference to diffusers", rel, "calls", calls, res.nfe)
    assert rel < 1e-5
    assert res.nfe == calls == n


@pytest.mark.parametrize("n", [10, 25])
def test_ipndm_parity_with_diffusers(n):
    """diffusers' IPNDMScheduler is iPNDM in the same variables on a fixed schedule of its own:
    alpha = cos(pi tau / 2), sigma = sin(pi tau / 2) at the angles tau it passes as timesteps, a
    v-prediction model (its ets = sigma x + alpha v is eps) and the DDIM step with the combined eps
    (= a step of y = x/alpha against sigma/alpha with d = eps). Its first step starts at alpha = 0,
    where sigma/alpha is infinite, and its last takes the full AB step to sigma = 0 where ipndm (as
    ComfyUI) takes an Euler step: the loops are compared from its second timestep to its last but one."""
    ref = IPNDMScheduler()
    ref.set_timesteps(n)
    ref.set_begin_index(1)
    taus = ref.timesteps.double()
    sched = S.VPCosine(s=0.0, t_min=1e-4, t_max=1.0 - 1e-4)
    model = GAUSS.model(sched)
    grid = taus[1:]  # tau_1 ... tau_{n-1}: n - 2 steps
    x_T = GAUSS.marginal(float(grid[0]), sched, None).sample(16, torch.Generator().manual_seed(2))
    x = x_T.clone()
    for i in range(1, n - 1):
        pred = model(x, float(taus[i]))
        a, s = sched.at(float(taus[i]))
        v = a * pred.eps - s * pred.x0
        x = ref.step(v, ref.timesteps[i], x).prev_sample
    res = ds.sample(model, "ipndm", x_T=x_T, grid=grid)
    rel = float((res.samples - x).abs().max() / x.abs().max())
    print("ipndm", n, "relative difference to diffusers", rel, "calls", res.nfe)
    assert rel < 1e-5
    assert res.nfe == n - 2


def test_options():
    assert ds.get_solver("lms").order == 4
    assert ds.get_solver("ipndm").max_order == 4
    with pytest.raises(ValueError, match="max_order"):
        ds.get_solver("ipndm", max_order=5)
    with pytest.raises(ValueError, match="order"):
        ds.get_solver("lms", order=0)


def test_invert_refuses_four_node_variable_step_weights():
    """Run backwards (ascending s, each step ~1.6 times the last on digits-vp's 20-step log-SNR grid)
    the variable-step weights of four nodes blow up where the flow is stiff: round trip 4.3e3 before
    it was refused. With two nodes (0.30) and ipndm's fixed weights (0.24) it runs backwards."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffsolve.data import digits16

    model = ds.pretrained.load("digits-vp")
    x0 = digits16("heldout")[0][:4]
    for name in ("lms", "ipndm-v"):
        assert not ds.get_solver(name).runs_backward
        with pytest.raises(ValueError, match=f"solver '{name}' cannot invert"):
            ds.invert(model, name, x0, 20)
    assert ds.get_solver("lms", order=3).runs_backward and ds.get_solver("ipndm").runs_backward
    for name, opts, bound in [("lms", {"order": 2}, 0.4), ("ipndm", {}, 0.3)]:
        with torch.no_grad():
            lat = ds.invert(model, name, x0, 20, **opts)
            back = ds.sample(model, name, latent=lat, **opts).samples
        err = float((back.double() - x0.double()).abs().max())
        print(name, opts, "round trip", err)
        assert err < bound


def test_ipndm_registered_order_is_the_measured_one():
    """ipndm's registered order is what the closed-form Gaussian measures on log-SNR grids (2,
    test_lms_order_on_log_snr_grid); lms and ipndm-v (the actual steps' AB weights) measure 4."""
    assert solver_info("ipndm").order == 2
    assert solver_info("lms").order == solver_info("ipndm-v").order == 4


@pytest.mark.parametrize("name,opt", [("lms", "order"), ("ipndm-v", "max_order")])
def test_refusal_to_invert_says_why(name, opt):
    """At four nodes (their default) lms and ipndm-v refuse to invert, and say the true reason: their
    variable-step weights are unstable run backwards, not that their steps only run down in time;
    with three nodes they invert."""
    slv = ds.get_solver(name)
    assert not slv.runs_backward
    from diffsolve.core.driver import check_invertible

    with pytest.raises(ValueError) as err:
        check_invertible(slv)
    msg = str(err.value)
    print(msg)
    assert f"{opt}=4" in msg and "unstable run backwards" in msg and f"{opt}=3 or less" in msg
    assert "only run down in time" not in msg and "rev-heun" in msg
    assert ds.get_solver(name, **{opt: 3}).runs_backward
