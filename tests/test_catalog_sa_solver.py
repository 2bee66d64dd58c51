"""SA-Solver (``sa-solver``, ``sa-solver-pece``): parity with diffusers' SASolverScheduler given the
same noise (a plain diffusers loop, and DiffsolveScheduler), the deterministic limit's orders on the
closed-form Gaussian, a step computed by hand, and the law of the samples.

How the parity is set up. Our grid is t = (k + 1)/N for diffusers' timesteps k, closed by
t = 1/N (k = 0, diffusers' last sigma); diffusers' tau_func (1 for 200 <= k <= 800) is then
tau_window = (0.201, 0.801) with tau_at = "start". diffusers draws one normal per step with the
pipeline's generator (randn_tensor), and so does sa-solver, so replaying the generator gives the same
noise. diffusers keeps its sigmas in float32 and builds its weights from monomials in the absolute
log-SNR, which loses up to 2e-4 relative at orders 3-4 (measured below); those parity runs cast
diffusers' sigmas to float64 (its own arithmetic, in double precision)."""

import math

import pytest
import torch
from by_hand import run_by_hand
from diffusers import SASolverScheduler
from tiny_pipelines import eps_net_3d

import diffsolve as ds
from diffsolve.core.registry import registered
from diffsolve.metrics import mmd2
from diffsolve.solvers.exponential.sa_solver import SASolver

S = ds.schedules
INFO = {i.name: i for i in registered()}
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
GMM3 = ds.models.GaussianMixture([[1.0, -0.5, 0.2], [-1.0, 0.5, 0.0]], 0.4)
DIFFUSERS_WINDOW = (0.201, 0.801)  # diffusers' 200 <= k <= 800 at t = (k + 1)/1000


def test_registry_entries():
    for name, calls in (("sa-solver", 1), ("sa-solver-pece", 2)):
        info = INFO[name]
        assert (info.family, info.calls_per_step, info.deterministic, info.order) == ("sde", calls, False, 2)
        assert ds.get_solver(name.replace("-", "_")).name == name
    assert ds.get_solver("sa-solver").options() == {
        "predictor_order": 2,
        "corrector_order": 2,
        "tau": 1.0,
        "tau_window": (0.2, 0.8),
        "tau_at": "start",
        "s_noise": 1.0,
        "parameterization": "data",
        "simple_order_2": True,
        "lower_order_final": True,
    }
    pece = ds.get_solver("sa-solver-pece").options()
    assert (pece["predictor_order"], pece["corrector_order"], pece["tau_at"], pece["simple_order_2"]) == (
        3,
        4,
        "end",
        False,
    )
    s = ds.get_solver("sa-solver", algorithm="noise_prediction", eta=0.5, tau_window=[0.1, 0.9])
    assert (s.parameterization, s.tau, s.tau_window) == ("noise", 0.5, (0.1, 0.9))
    for bad in ({"tau_window": (0.8, 0.2)}, {"tau_window": 0.5}, {"tau": -1.0}, {"predictor_order": 5}):
        with pytest.raises(ValueError):
            ds.get_solver("sa-solver", **bad)


def test_tau_window_start_and_end():
    """diffusers tests the step's start time, ComfyUI its end: the same window gives tau to a
    different set of steps."""
    grid = [1.0, 0.85, 0.75, 0.5, 0.25, 0.15, 0.0]
    start = ds.get_solver("sa-solver", tau=0.7)
    end = ds.get_solver("sa-solver", tau=0.7, tau_at="end")
    steps = list(zip(grid, grid[1:]))
    assert [start._tau(t, u) for t, u in steps] == [0.0, 0.0, 0.7, 0.7, 0.7, 0.0]
    assert [end._tau(t, u) for t, u in steps] == [0.0, 0.7, 0.7, 0.7, 0.0, 0.0]
    assert [ds.get_solver("sa-solver", tau_window=None)._tau(t, u) for t, u in steps] == [1.0] * 6


# ------------------------------------------------------------------ diffusers parity
class Replay:
    """diffusers' draws in order: one torch.randn of the state's shape per step from one generator."""

    def __init__(self, seed, shape=(6, 3)):
        self.gen, self.shape, self.draws = torch.Generator().manual_seed(seed), shape, 0

    def step(self, t, t_next, index=None):
        self.draws += 1
        return torch.randn(*self.shape, generator=self.gen, dtype=torch.float64)


def _drive(solver, x_T, grid, noise, sched, model):
    return run_by_hand(solver, x_T, grid, noise, sched, model)


def _diffusers_and_ours(n, predictor_order, corrector_order, algo, float64_sigmas=True, seed=5):
    ref = SASolverScheduler(
        num_train_timesteps=1000,
        predictor_order=predictor_order,
        corrector_order=corrector_order,
        algorithm_type=algo,
        **SD,
    )
    ref.set_timesteps(n)
    if float64_sigmas:
        ref.sigmas = ref.sigmas.double()
    big_n = ref.config.num_train_timesteps
    sched = S.VPDiscrete.from_diffusers_config(ref.config)
    model = GMM3.model(sched)
    x_T = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x, calls, g = x_T.clone(), 0, torch.Generator().manual_seed(seed)
    for k in ref.timesteps:
        eps = model(x, (int(k) + 1) / big_n).eps  # init_noise_sigma = 1, scale_model_input the identity
        calls += 1
        x = ref.step(eps, k, x, generator=g).prev_sample

    grid = torch.tensor([(int(k) + 1) / big_n for k in ref.timesteps] + [1 / big_n], dtype=torch.float64)
    solver = ds.get_solver(
        "sa-solver",
        predictor_order=predictor_order,
        corrector_order=corrector_order,
        algorithm=algo,
        tau_window=DIFFUSERS_WINDOW,
    )
    noise = Replay(seed)
    ours, ours_calls = _drive(solver, x_T, grid, noise, sched, model)
    return ours, x, ours_calls, calls, noise.draws


@pytest.mark.parametrize("n", [5, 12, 30])
@pytest.mark.parametrize("orders", [(1, 1), (2, 2), (3, 4), (4, 4), (1, 3)])
@pytest.mark.parametrize("algo", ["data_prediction", "noise_prediction"])
def test_parity_with_diffusers(algo, orders, n):
    """Measured 4e-8 .. 9e-7 relative for every case (the oracle's sigmas are computed in float64
    from the betas, diffusers' in float32)."""
    ours, theirs, ours_calls, calls, draws = _diffusers_and_ours(n, *orders, algo)
    rel = float((ours - theirs).abs().max() / theirs.abs().max())
    print("sa-solver", algo, orders, n, "calls", ours_calls, calls, "draws", draws, "relative difference", rel)
    assert ours_calls == calls == draws == n
    assert rel < 1e-5


def test_parity_with_diffusers_in_its_own_float32():
    """diffusers as it comes (float32 sigmas): within 1e-5 at its default orders, up to 2.4e-4 at orders
    3-4 in the noise form (its monomial weights in float32; measured)."""
    for algo in ("data_prediction", "noise_prediction"):
        for n in (5, 12, 30):
            ours, theirs, *_ = _diffusers_and_ours(n, 2, 2, algo, float64_sigmas=False)
            rel = float((ours - theirs).abs().max() / theirs.abs().max())
            print("float32 diffusers, orders (2, 2)", algo, n, rel)
            assert rel < 1e-5
    ours, theirs, *_ = _diffusers_and_ours(12, 4, 4, "noise_prediction", float64_sigmas=False)
    rel = float((ours - theirs).abs().max() / theirs.abs().max())
    print("float32 diffusers, orders (4, 4), noise, 12 steps", rel)
    assert 1e-5 < rel < 1e-3


def _sd_loop(s, net, n, float64_sigmas):
    s.set_timesteps(n)
    if float64_sigmas and isinstance(s, SASolverScheduler):
        s.sigmas = s.sigmas.double()
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * s.init_noise_sigma
    gens = [torch.Generator().manual_seed(10 + i) for i in range(4)]  # one per sample, as pipelines pass them
    calls = 0
    for t in s.timesteps:
        out = net(s.scale_model_input(x, t), t)
        calls += 1
        x = s.step(out, t, x, generator=gens).prev_sample
    return x, calls


@pytest.mark.parametrize("n", [5, 12, 30])
@pytest.mark.parametrize("orders,float64_sigmas", [((2, 2), False), ((1, 1), False), ((3, 4), True), ((4, 4), True)])
@pytest.mark.parametrize("algo", ["data_prediction", "noise_prediction"])
def test_drop_in_for_diffusers_in_a_stable_diffusion_loop(algo, orders, float64_sigmas, n):
    """DiffsolveScheduler.from_config(SASolverScheduler, solver="sa-solver") in the SD loop on a
    timestep-conditioned network, the pipeline's generators: the same timesteps, model calls and
    latents. Measured: <= 4e-7 relative at orders (2, 2) and (1, 1) against diffusers' float32, <= 2e-13
    at orders 3-4 against its float64."""
    from diffsolve.integrations.diffusers import DiffsolveScheduler

    net = eps_net_3d()
    p, c = orders
    ref = SASolverScheduler(num_train_timesteps=1000, predictor_order=p, corrector_order=c, algorithm_type=algo, **SD)
    opts = {"predictor_order": p, "corrector_order": c, "algorithm": algo, "tau_window": DIFFUSERS_WINDOW}
    ours = DiffsolveScheduler.from_config(ref, solver="sa-solver", solver_options=opts)
    a, ca = _sd_loop(ref, net, n, float64_sigmas)
    b, cb = _sd_loop(ours, net, n, float64_sigmas)
    rel = float((a - b).abs().max() / a.abs().max())
    print("sa-solver", algo, orders, n, "calls", ca, cb, "relative difference", rel)
    assert ca == cb == n
    assert torch.equal(ours.timesteps, ref.timesteps.to(ours.timesteps.dtype))
    assert rel < 1e-5


def test_default_window_is_diffusers_where_no_timestep_is_on_its_edge():
    """With the default tau_window (0.2, 0.8) the 12 linspace timesteps (none at k = 199 or 800)
    get diffusers' tau: the same latents."""
    from diffsolve.integrations.diffusers import DiffsolveScheduler

    net = eps_net_3d()
    ref = SASolverScheduler(num_train_timesteps=1000, **SD)
    ours = DiffsolveScheduler.from_config(ref, solver="sa-solver")
    a, _ = _sd_loop(ref, net, 12, False)
    b, _ = _sd_loop(ours, net, 12, False)
    assert not {199, 800} & set(ref.timesteps.tolist())
    assert float((a - b).abs().max() / a.abs().max()) < 1e-5


# ------------------------------------------------------------------ a step by hand
def test_steps_by_hand():
    """Two steps (predictor, corrector with the new output, predictor) on VPLinear with tau = 0.7
    everywhere, from alpha, sigma and the oracle's x0 (data) or eps (noise) by hand; the PECE variant
    calls the model again at the corrected point."""
    sched = S.VPLinear()
    model = GMM3.model(sched)
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ts = [0.9, 0.5, 0.2]
    grid = torch.tensor(ts, dtype=torch.float64)
    (a0, s0), (a1, s1), (a2, s2) = (tuple(float(v) for v in sched.at(t)) for t in ts)
    lam = [math.log(a / s) for a, s in ((a0, s0), (a1, s1), (a2, s2))]
    h0, h1 = lam[1] - lam[0], lam[2] - lam[1]
    tau = 0.7
    c = 1 + tau**2
    rep = Replay(7)
    z0, z1 = rep.step(0, 0), rep.step(0, 0)

    def jj(h):  # int_0^h e^{-c (h - u)} du, int_0^h e^{-c (h - u)} u/h du
        return -math.expm1(-c * h) / c, (c * h - 1 + math.exp(-c * h)) / (c * c * h)

    def noise_std(s, h):
        return s * math.sqrt(-math.expm1(-2 * tau**2 * h))

    for pece in (False, True):
        d0 = model(x, ts[0]).x0
        base = (s1 / s0) * math.exp(-(tau**2) * h0) * x + noise_std(s1, h0) * z0
        x1p = base + c * a1 * jj(h0)[0] * d0
        d1 = model(x1p, ts[1]).x0
        j0, j1 = jj(h0)
        m1 = j1 if pece else h0 / 2  # the exact first moment (PECE's default) or the simple one (diffusers)
        x1 = base + c * a1 * ((j0 - m1) * d0 + m1 * d1)
        if pece:
            d1 = model(x1, ts[1]).x0
        x2 = (s2 / s1) * math.exp(-(tau**2) * h1) * x1 + c * a2 * jj(h1)[0] * d1 + noise_std(s2, h1) * z1
        name = "sa-solver-pece" if pece else "sa-solver"
        solver = ds.get_solver(name, tau=tau, tau_window=None, predictor_order=2, corrector_order=2)
        ours, calls = _drive(solver, x, grid, Replay(7, (6, 3)), sched, model)
        print(name, "calls", calls, "difference to the hand computation", float((ours - x2).abs().max()))
        assert calls == (3 if pece else 2)
        assert (ours - x2).abs().max() < 1e-12

    # noise form, one predictor step: y_t = (a_t/a_s) y_s - c s_t (e^h - 1) eps + tau s_t sqrt(e^{2h} - 1) z
    eps = model(x, ts[0]).eps
    want = (a1 / a0) * x - c * s1 * math.expm1(h0) * eps + tau * s1 * math.sqrt(math.expm1(2 * h0)) * z0
    solver = ds.get_solver("sa-solver", tau=tau, tau_window=None, parameterization="noise")
    ours, _ = _drive(solver, x, grid[:2], Replay(7), sched, model)
    assert (ours - want).abs().max() < 1e-12


def test_simple_order_2_is_the_paper_appendix_d_form():
    """The order-2 predictor's weights with simple_order_2: alpha_t c h^2/2 / (lambda_{-1} - lambda_s)
    on the older output and alpha_t (1 - e^{-c h}) minus that on the newer (Xue et al. 2023, App. D)."""
    from diffsolve.solvers.exponential.sa_solver import sa_step

    h, r, tau, a_t, s_t, a_s, s_s = 0.4, -0.7, 0.6, 0.8, 0.6, 0.5, 0.866
    c = 1 + tau**2
    q0, q1, y = torch.eye(2, dtype=torch.float64).unbind(0) + (torch.zeros(2, dtype=torch.float64),)
    out = sa_step("data", y, [q0, q1], [0.0, r], (a_t, s_t, a_s, s_s), h, tau, None, simple_order_2=True)
    b_old = a_t * c * h * h / 2 / (r * h)
    assert abs(float(out[1]) - b_old) < 1e-12
    assert abs(float(out[0]) - (-a_t * math.expm1(-c * h) - b_old)) < 1e-12


# ------------------------------------------------------------------ deterministic limit: orders
GAUSS = ds.models.GaussianMixture([[0.5, -1.0, 2.0, 0.0]], [[0.5, 1.0, 0.2, 2.0]])
SCHEDULES = {
    "vp": (lambda: S.VPLinear(), None),
    "ve": (lambda: S.VE(), None),
    "flow": (lambda: S.RectifiedFlow(t_min=1e-3, t_max=1 - 1e-3), None),
    "mean-reverting": (lambda: S.MeanReverting(lam=0.5), torch.tensor([0.3, 0.3, -0.2, 0.1], dtype=torch.float64)),
}


def _orders(solver, schedule, steps, **opts):
    make, mu = SCHEDULES[schedule]
    sched = make()
    model = GAUSS.model(sched)
    x_T = GAUSS.marginal(sched.t_max, sched, mu).sample(64, torch.Generator().manual_seed(0))
    exact = GAUSS.flow_map(x_T, sched.t_max, sched.t_min, sched, mu)
    errs = []
    for n in steps:
        res = ds.sample(model, solver, n, x_T=x_T, grid="log-snr", mu=mu, seed=0, tau=0.0, **opts)
        errs.append(float((res.samples - exact).abs().max()))
    orders = [math.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 1)]
    print(solver, schedule, opts, "errors", [f"{e:.2e}" for e in errs], "orders", [f"{o:.2f}" for o in orders])
    return errs, orders


@pytest.mark.parametrize(
    "solver,schedule", [("sa-solver", "vp"), ("sa-solver", "ve"), ("sa-solver", "flow"), ("sa-solver-pece", "vp")]
)
def test_registered_order_at_tau_zero(solver, schedule):
    """The defaults at tau = 0 (the ODE) converge at the registered order 2: (2, 2) is second order,
    and PECE's (3, 4) is held to 2 by lower_order_final's first-order last step. Measured (20 .. 160
    steps): sa-solver 2.56 2.33 2.18 (vp), 2.51 2.30 2.16 (ve), 2.72 2.44 2.25 (flow); sa-solver-pece
    2.90 2.67 2.13 (vp)."""
    errs, orders = _orders(solver, schedule, (20, 40, 80, 160))
    assert all(e2 < e1 for e1, e2 in zip(errs, errs[1:]))
    assert abs(orders[-1] - INFO[solver].order) < 0.3 and min(orders) > INFO[solver].order - 0.3


@pytest.mark.parametrize(
    "param,schedule", [("data", "vp"), ("data", "flow"), ("data", "mean-reverting"), ("noise", "vp")]
)
@pytest.mark.parametrize("predictor,corrector,order", [(1, 0, 1), (2, 0, 2), (1, 2, 2), (2, 3, 3)])
def test_predictor_p_is_order_p_and_the_corrector_adds_one(param, predictor, corrector, order, schedule):
    """Without lowering at the end: predictor order p alone is order p; with the corrector of order
    p + 1 (the new output and p old ones) order p + 1. Measured (vp, data): 0.96 0.98 / 2.19 2.09 /
    2.18 2.11 / 3.12 3.07."""
    opts = {"predictor_order": predictor, "corrector_order": corrector, "lower_order_final": False}
    errs, orders = _orders("sa-solver", schedule, (10, 20, 40, 80), parameterization=param, **opts)
    assert all(e2 < e1 for e1, e2 in zip(errs, errs[1:]))
    for o in orders[1:]:
        assert abs(o - order) < 0.35, orders


def test_third_and_fourth_order():
    """(3, 0) and (3, 4) without lowering: beyond third order on fine grids (measured 4.05 4.18 4.79 and
    2.03 3.30 3.77 on vp, 20 .. 160 steps)."""
    _, o3 = _orders("sa-solver", "vp", (20, 40, 80, 160), predictor_order=3, corrector_order=0, lower_order_final=False)
    _, o4 = _orders("sa-solver", "vp", (20, 40, 80, 160), predictor_order=3, corrector_order=4, lower_order_final=False)
    assert min(o3) > 2.8 and o4[-1] > 3.3


# ------------------------------------------------------------------ the law of the samples (tests/test_distribution.py)
N = 1500  # = conftest.GMM_N
GMM = ds.models.GaussianMixture.gmm_2d()
SCHED = S.VPLinear()


@pytest.mark.parametrize(
    "solver,steps,opts",
    [
        ("sa-solver", 20, {}),
        ("sa-solver", 50, {}),
        ("sa-solver-pece", 25, {}),
        ("sa-solver", 50, {"tau_window": None}),
        ("sa-solver", 50, {"tau_window": None, "parameterization": "noise"}),
    ],
)
def test_passes_two_sample_test(solver, steps, opts, threshold, reference):
    """Measured MMD^2 (threshold 5.8e-3): 4e-5, -7e-4, -1e-3, -2e-4, -2e-4."""
    res = ds.sample(GMM.model(SCHED), solver, steps, shape=(N, 2), seed=0, dtype=torch.float64, grid="uniform", **opts)
    d = mmd2(res.samples, reference)
    print(solver, steps, opts, "mmd2", d, "threshold", threshold, "nfe", res.nfe)
    assert res.nfe == (2 * steps - 1 if solver == "sa-solver-pece" else steps)
    assert d < threshold


@pytest.mark.parametrize("steps,opts", [(3, {}), (50, {"tau_window": None, "s_noise": 0.0})])
def test_two_sample_test_fails(steps, opts, threshold, reference):
    """Three steps, or the SDE's drift without its noise (s_noise = 0 at tau = 1): the law is wrong
    (measured MMD^2 0.21 and 0.057)."""
    res = ds.sample(
        GMM.model(SCHED), "sa-solver", steps, shape=(N, 2), seed=0, dtype=torch.float64, grid="uniform", **opts
    )
    d = mmd2(res.samples, reference)
    print("sa-solver", steps, opts, "mmd2", d, "threshold", threshold)
    assert d > 5 * threshold


def test_on_rectified_flow_from_t_one(threshold, reference):
    """From alpha = 0 (t = 1: h = inf, the first-order limit) the data form still samples the law."""
    flow = S.RectifiedFlow()
    res = ds.sample(GMM.model(flow), "sa-solver", 50, shape=(N, 2), seed=0, dtype=torch.float64, grid="uniform")
    d = mmd2(res.samples, reference)
    print("sa-solver rectified flow from t = 1, mmd2", d)
    assert torch.isfinite(res.samples).all() and d < threshold
    with pytest.raises(ValueError, match="alpha = 0"):
        ds.sample(GMM.model(flow), "sa-solver", 5, shape=(4, 2), seed=0, parameterization="noise")


def test_tau_zero_is_deterministic_and_inversion_is_refused():
    """tau = 0 (the ODE): the noise draws are multiplied by nothing, the seed does not matter; at the
    default tau it does."""
    model = GMM3.model(SCHED)
    x_T = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def run(seed, **opts):
        return ds.sample(model, "sa-solver", 10, x_T=x_T, seed=seed, **opts).samples

    assert torch.equal(run(0, tau=0.0), run(1, tau=0.0))
    assert (run(0) - run(1)).abs().max() > 1e-2
    for name in ("sa-solver", "sa-solver-pece"):
        with pytest.raises(ValueError, match=name):
            ds.invert(model, name, x_T, 4)


def test_solver_class_declares_no_init():
    assert "__init__" not in vars(SASolver)


def test_parity_inside_a_ddpm_pipeline():
    """The digits-vp DDPMPipeline with diffusers' SASolverScheduler, then with DiffsolveScheduler made
    from it (the pipeline's one generator draws the noise for both): measured 2.4e-7 on the images."""
    import numpy as np
    from diffusers import DDPMPipeline

    from diffsolve.integrations.diffusers import DiffsolveScheduler

    pipe = DDPMPipeline.from_pretrained(str(ds.pretrained.path_of("digits-vp")))
    pipe.set_progress_bar_config(disable=True)

    def images(scheduler):
        pipe.scheduler = scheduler
        gen = torch.Generator().manual_seed(0)
        return pipe(batch_size=3, generator=gen, num_inference_steps=10, output_type="np").images

    ref = SASolverScheduler.from_config(pipe.scheduler.config)
    a = images(ref)
    b = images(DiffsolveScheduler.from_config(ref, solver="sa-solver"))
    assert not {199, 800} & set(ref.timesteps.tolist())  # the default window is diffusers' on these
    diff = float(np.abs(a - b).max())
    print("sa-solver in the DDPM pipeline, max difference", diff)
    assert diff < 1e-4
