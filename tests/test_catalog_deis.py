"""DEIS (``deis``): parity with diffusers' DEISMultistepScheduler (plain loop and DiffsolveScheduler),
measured orders on the closed-form Gaussian flow, and ComfyUI's "tab" / "rhoab" modes computed by hand."""

import math

import pytest
import torch
from diffusers import DEISMultistepScheduler
from scipy.integrate import quad
from tiny_pipelines import eps_net_3d

import diffsolve as ds
from diffsolve.solvers.exponential import deis as deis_mod

S = ds.schedules


def _run(solver, x_T, grid, model, sched):
    """Drives the solver's generator by hand; returns (result, model calls)."""
    run = solver.run(x_T, grid, None, schedule=sched)
    item, calls = next(run), 1
    try:
        while True:
            item = run.send(model(item[0], item[1]))
            calls += 1
    except StopIteration as stop:
        return stop.value, calls


#: measured relative differences (float64 states, diffusers' float32 sigmas): order 1 2e-8 / 1.4e-7,
#: order 2 2.9e-8 / 2.1e-7, order 3 2.7e-7 / 1.4e-6 (8 / 20 steps)
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("n", [8, 20])
@pytest.mark.parametrize("lower_order_final", [True, False])
def test_parity_with_diffusers_deis(order, n, lower_order_final):
    """Same eps network, timesteps (plus diffusers' final sigma, that of timestep 0), initial state;
    as many model calls."""
    net = eps_net_3d()
    ref = DEISMultistepScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        solver_order=order,
        lower_order_final=lower_order_final,
    )
    ref.set_timesteps(n)
    x_T = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    xd, ref_calls = x_T.clone(), 0
    for t in ref.timesteps:
        xd = ref.step(net(xd, t.expand(4)), t, xd).prev_sample
        ref_calls += 1
    sched = S.VPDiscrete.from_diffusers_config(ref.config)
    model = ds.DiffusionModel(net, sched, "eps")
    ts = [float(sched.t_of_timestep(float(t))) for t in ref.timesteps] + [float(sched.t_of_timestep(0.0))]
    solver = ds.get_solver("deis", order=order, lower_order_final=lower_order_final)
    ours, calls = _run(solver, x_T, torch.tensor(ts, dtype=torch.float64), model, sched)
    assert calls == ref_calls == n
    rel = float((ours - xd).abs().max() / xd.abs().max())
    print("deis", order, n, lower_order_final, "relative difference to diffusers", f"{rel:.2e}")
    assert rel < 1e-5


SIGMA_OPTIONS = [
    {},
    {"use_karras_sigmas": True},
    {"use_exponential_sigmas": True},
    {"timestep_spacing": "trailing"},
    {"prediction_type": "v_prediction", "timestep_spacing": "trailing", "rescale_betas_zero_snr": False},
]


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize(
    "options", SIGMA_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default"
)
def test_parity_through_diffsolve_scheduler(order, options):
    """A DEISMultistepScheduler config (SD 1.5's betas) in a plain diffusers loop against
    DiffsolveScheduler.from_config(cfg, solver="deis", solver_options={"order": ...}): the same
    latents to 1e-5, the same number of model calls (4, 12 and 20 steps; lower_order_final True and
    False). Measured 1.2e-7 to 3.6e-7.

    Not covered: with Karras / exponential sigmas diffusers repeats the last sigma (its last call
    steps from a sigma to itself, which DiffsolveScheduler answers without the solver) and, below 15
    steps with ``lower_order_final``, lowers the order of that no-op step instead of the last real
    one: its last real step is second order where deis's is first (2.0e-3 relative at 4 steps, order
    2). Those are compared at 20 steps and with ``lower_order_final=False``."""
    from test_scheduler_configs import load

    base = {k: v for k, v in load("sd15.json").items() if not k.startswith("_") and k != "skip_prk_steps"}
    repeats_last = any(k.startswith("use_") for k in options)
    for lof, steps in ((True, (20,) if repeats_last else (4, 12, 20)), (False, (4, 12))):
        cfg = dict(
            DEISMultistepScheduler.from_config(
                {**base, **options, "solver_order": order, "lower_order_final": lof}
            ).config
        )
        _compare(cfg, order, lof, steps, options)


def _compare(cfg, order, lof, steps, options):
    from test_scheduler_configs import loop, rel

    from diffsolve.integrations.diffusers import DiffsolveScheduler

    for n in steps:
        a, ca = loop(DEISMultistepScheduler.from_config(cfg), n, cfg)
        opts = {"order": order, "lower_order_final": lof}
        b, cb = loop(DiffsolveScheduler.from_config(cfg, solver="deis", solver_options=opts), n, cfg)
        print("deis scheduler", order, lof, options, n, f"{rel(a, b):.2e}")
        assert ca == cb == n
        assert rel(a, b) < 1e-5, (order, options, n, rel(a, b))


GAUSS = ds.models.GaussianMixture([[0.5, -1.0, 2.0, 0.0]], [[0.5, 1.0, 0.2, 2.0]])
STEPS = (20, 40, 80, 160)


def _errors(sched, mu, grid="log-snr", **opts):
    model = GAUSS.model(sched)
    x_T = GAUSS.marginal(sched.t_max, sched, mu).sample(64, torch.Generator().manual_seed(0))
    exact = GAUSS.flow_map(x_T, sched.t_max, sched.t_min, sched, mu)
    return [
        float((ds.sample(model, "deis", n, x_T=x_T, grid=grid, mu=mu, **opts).samples - exact).abs().max())
        for n in STEPS
    ]


#: measured on log-SNR grids, finest doubling (80 -> 160 steps), VP / mean-reverting:
#: logrho 0.99 / 0.99, 1.98 / 1.98, 3.55 / 3.28; tab (VP) 0.99, 1.98, 2.91; rhoab (VP) 0.99, 1.93, 2.85
@pytest.mark.parametrize("mode", ["logrho", "tab", "rhoab"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_deis_orders(mode, order):
    """Closed-form Gaussian flow (VPLinear, and MeanReverting with mu != 0), lower_order_final=False:
    k interpolated outputs give order k in every mode (at least 3 for k = 3)."""
    cases = [(S.VPLinear(), None)]
    if mode == "logrho":
        cases.append((S.MeanReverting(lam=0.5), torch.tensor([0.3, 0.3, -0.2, 0.1]).double()))
    for sched, mu in cases:
        errs = _errors(sched, mu, order=order, mode=mode, lower_order_final=False)
        orders = [math.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 1)]
        print("deis", mode, type(sched).__name__, order, [f"{e:.2e}" for e in errs], [f"{o:.2f}" for o in orders])
        assert orders[-1] > order - 0.25, orders
        if order < 3:  # order 3 is superconvergent on this problem (as mrs-ode's and UniP-3's)
            assert orders[-1] < order + 0.25, orders


def test_registered_order_is_measured_at_the_default_grid():
    """The registry's order (3) is the measured order at order=3 (above); the default order is diffusers' 2."""
    from diffsolve.core.registry import solver_info

    assert solver_info("deis").order == 3
    assert ds.get_solver("deis").order == 2 and ds.get_solver("deis").mode == "logrho"


def test_tab_weights_by_hand():
    """One "tab" step as ComfyUI (zju-pi/diff-sampler) writes its coefficients: the integral over the
    VP time tau of d rho / d tau times the Lagrange basis in tau, rho(tau) = sqrt(exp(beta_d tau^2 / 2 +
    beta_min tau) - 1) fitted through rho(1) = 80 and rho(1e-3) = 0.002; here by scipy's quad in tau."""
    beta_min, beta_d = deis_mod._vp_fit()

    def rho(tau):
        return math.sqrt(math.expm1(0.5 * beta_d * tau * tau + beta_min * tau))

    assert abs(rho(1.0) - 80.0) < 1e-9 and abs(rho(1e-3) - 0.002) < 1e-12
    for r in (0.01, 0.5, 3.0, 60.0):
        assert abs(rho(deis_mod.tab_time(r)) - r) < 1e-10 * max(r, 1.0)

    def drho(tau):  # d rho / d tau
        return (0.5 * beta_d * 2 * tau + beta_min) * (rho(tau) ** 2 + 1) / (2 * rho(tau))

    nodes = [2.0, 3.1, 4.5]  # rho_i, rho_{i-1}, rho_{i-2}; the step goes from 2.0 to 1.2
    taus = [deis_mod.tab_time(r) for r in nodes]
    t_cur, t_next = taus[0], deis_mod.tab_time(1.2)

    def basis(j, tau):
        return math.prod((tau - taus[m]) / (taus[j] - taus[m]) for m in range(3) if m != j)

    by_hand = [
        quad(lambda tau, j=j: drho(tau) * basis(j, tau), t_cur, t_next, epsabs=0, epsrel=1e-12)[0] for j in range(3)
    ]
    ours = deis_mod.tab_weights(nodes, 2.0, 1.2)
    print("tab weights", ours, by_hand)
    assert max(abs(a - b) for a, b in zip(ours, by_hand)) < 1e-10
    assert abs(sum(ours) - (1.2 - 2.0)) < 1e-12  # the basis sums to one: the weights to the step in rho
    # and it differs from the log-rho and rho weights of the same nodes (a distinct discretisation)
    from diffsolve.solvers.exponential.maths import ab_weights

    assert max(abs(a - b) for a, b in zip(ours, ab_weights(nodes, 2.0, 1.2))) > 1e-3


def test_tab_step_by_hand():
    """A 3-step run of mode="tab", order 3, VP, eps model: the last step is x_3 / alpha_3 =
    x_2 / alpha_2 + sum_j C_j eps_{2-j} with the tab weights of rho_2, rho_1, rho_0."""
    sched = S.VPLinear()
    net = eps_net_3d()
    model = ds.DiffusionModel(lambda x, t: net(x, t * 1000.0), sched, "eps")
    grid = torch.tensor([0.9, 0.6, 0.4, 0.25], dtype=torch.float64)
    x_T = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    solver = ds.get_solver("deis", order=3, mode="tab", lower_order_final=False)
    run = solver.run(x_T, grid, None, schedule=sched)
    xs, eps, item = [], [], next(run)
    try:
        while True:
            xs.append(item[0])
            p = model(item[0], item[1])
            eps.append(p.eps)
            item = run.send(p)
    except StopIteration as stop:
        out = stop.value
    a = [float(sched.alpha(t)) for t in grid]
    r = [float(sched.sigma(t)) / ai for t, ai in zip(grid, a)]
    w = deis_mod.tab_weights([r[2], r[1], r[0]], r[2], r[3])
    by_hand = a[3] * (xs[2] / a[2] + w[0] * eps[2] + w[1] * eps[1] + w[2] * eps[0])
    assert float((out - by_hand).abs().max()) < 1e-12
    # the first step is DDIM: x_1 / alpha_1 = x_0 / alpha_0 + (rho_1 - rho_0) eps_0
    assert float((xs[1] - a[1] * (xs[0] / a[0] + (r[1] - r[0]) * eps[0])).abs().max()) < 1e-12


@pytest.mark.parametrize("order", [1, 2, 3])
def test_rhoab_is_ipndm_v(order):
    """rho-AB is variable-step Adams-Bashforth in rho: ipndm-v with max_order = order (both take an
    Euler step to sigma = 0), on a VP model and on rectified flow."""
    for sched in (S.VPLinear(), S.RectifiedFlow(t_max=0.999)):
        model = GAUSS.model(sched)
        x_T = GAUSS.marginal(sched.t_max, sched, None).sample(16, torch.Generator().manual_seed(0))
        a = ds.sample(model, "deis", 10, x_T=x_T, mode="rhoab", order=order, lower_order_final=False).samples
        b = ds.sample(model, "ipndm-v", 10, x_T=x_T, max_order=order).samples
        assert float((a - b).abs().max()) < 1e-12


def test_first_order_is_ddim_in_every_mode():
    sched = S.VPLinear()
    model = GAUSS.model(sched)
    x_T = GAUSS.marginal(sched.t_max, sched, None).sample(16, torch.Generator().manual_seed(0))
    ref = ds.sample(model, "ddim", 12, x_T=x_T).samples
    for mode in ("logrho", "tab", "rhoab"):
        out = ds.sample(model, "deis", 12, x_T=x_T, mode=mode, order=1).samples
        assert float((out - ref).abs().max()) < 1e-10, mode


def test_refusals_name_the_reason():
    sched = S.RectifiedFlow()
    model = GAUSS.model(sched)
    with pytest.raises(ValueError, match="alpha = 0"):
        ds.sample(model, "deis", 5, x_T=torch.zeros(2, 4, dtype=torch.float64), grid="uniform")
