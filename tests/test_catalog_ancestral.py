"""k-diffusion's euler-ancestral, dpm-2 and dpm-2-ancestral: order, diffusers parity (same model,
sigmas, initial state and step noise; same number of model calls), and the law of the samples."""

import math

import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler, KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler
from test_orders import GAUSS, SCHEDULES, errors  # the closed-form Gaussian order test
from tiny_pipelines import eps_net_3d

import diffsolve as ds
from diffsolve.core.registry import registered
from diffsolve.metrics import mmd2

S = ds.schedules
INFO = {i.name: i for i in registered()}

# ------------------------------------------------------------------ order of dpm-2 (as tests/test_orders.py)
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_dpm2_order_two(schedule):
    make, mu = SCHEDULES[schedule]
    errs = errors("dpm-2", make(), mu)
    orders = [math.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 1)]
    print("dpm-2", schedule, "errors", [f"{e:.3e}" for e in errs], "orders", [f"{o:.2f}" for o in orders])
    assert all(e2 < e1 for e1, e2 in zip(errs, errs[1:]))
    for o in orders[1:]:
        assert abs(o - INFO["dpm-2"].order) < 0.25, (schedule, orders)


def test_registry_entries():
    assert (INFO["dpm-2"].order, INFO["dpm-2"].calls_per_step, INFO["dpm-2"].family) == (2, 2, "ode")
    assert INFO["dpm-2"].deterministic
    assert ds.get_solver("dpm-2").options() == {}  # no options declared: none reported
    for name, calls in (("euler-ancestral", 1), ("dpm-2-ancestral", 2)):
        info = INFO[name]
        assert (info.family, info.calls_per_step, info.deterministic) == ("sde", calls, False)
        assert ds.get_solver(name).options() == {"eta": 1.0, "s_noise": 1.0, "form": "scaled"}


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_euler_ancestral_is_ddim_with_the_same_eta(eta):
    """In sigma/alpha, Euler to sigma_down plus sigma_up z is DDIM's step with the same eta (the
    DDPM posterior at eta = 1): the same samples from the same seed."""
    sched = S.VPLinear()
    model = GAUSS.model(sched)
    a = ds.sample(model, "euler-ancestral", 25, shape=(16, 4), seed=3, dtype=torch.float64, eta=eta)
    b = ds.sample(model, "ddim", 25, shape=(16, 4), seed=3, dtype=torch.float64, eta=eta)
    assert (a.samples - b.samples).abs().max() < 1e-10


def test_dpm2_ancestral_with_eta_zero_is_dpm2():
    sched = S.VPLinear()
    model = GAUSS.model(sched)
    a = ds.sample(model, "dpm-2-ancestral", 15, shape=(8, 4), seed=0, dtype=torch.float64, eta=0.0)
    b = ds.sample(model, "dpm-2", 15, shape=(8, 4), seed=0, dtype=torch.float64)
    assert torch.equal(a.samples, b.samples)


# ------------------------------------------------------------------ diffusers parity
GMM3 = ds.models.GaussianMixture([[1.0, -0.5, 0.2], [-1.0, 0.5, 0.0]], 0.4)


def _call_sigma(ref):
    """The noise level diffusers' next model call is at (its scale_model_input's sigma)."""
    i = ref.step_index if ref.step_index is not None else 0
    if isinstance(ref, EulerAncestralDiscreteScheduler) or ref.state_in_first_order:
        return float(ref.sigmas[i])
    if isinstance(ref, KDPM2AncestralDiscreteScheduler):
        return float(ref.sigmas_interpol[i - 1])
    return float(ref.sigmas_interpol[i])


def _diffusers_and_ours(ref_cls, solver, n, seed=5):
    ref = ref_cls(num_train_timesteps=1000, **SD)
    ref.set_timesteps(n)
    sched = S.VPDiscrete.from_diffusers_config(ref.config)
    model = GMM3.model(sched)

    def t_of(sigma):
        return float(sched.t_of_log_snr(-math.log(sigma))) if sigma > 0 else 0.0

    # diffusers: latents in x/alpha, model input x/sqrt(1 + sigma^2); the oracle's eps at that sigma
    y_T = float(ref.init_noise_sigma) * torch.randn(
        6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    y, calls, g = y_T.clone(), 0, torch.Generator().manual_seed(seed)
    for t in ref.timesteps:
        sigma = _call_sigma(ref)
        eps = model(ref.scale_model_input(y, t), t_of(sigma)).eps
        calls += 1
        kw = {} if ref_cls is KDPM2DiscreteScheduler else {"generator": g}
        y = ref.step(eps, t, y, **kw).prev_sample

    # ours: the same sigmas as an explicit grid (ending at sigma = 0, t = 0), the same draws in order
    sigmas = ref.sigmas if ref_cls is EulerAncestralDiscreteScheduler else ref.sigmas[::2]
    grid = torch.tensor([t_of(float(s)) for s in sigmas], dtype=torch.float64)
    assert float(sigmas[-1]) == 0.0 and len(grid) == n + 1

    class Replay:
        gen = torch.Generator().manual_seed(seed)

        def step(self, t, t_next, index=None):
            return torch.randn(6, 3, generator=self.gen, dtype=torch.float64)

    x_T = y_T * float(sched.alpha(grid[0]))
    run = ds.get_solver(solver).run(x_T, grid, Replay(), schedule=sched)
    item, ours_calls = next(run), 0
    try:
        while True:
            ours_calls += 1
            item = run.send(model(*item[:2]))
    except StopIteration as stop:
        ours = stop.value
    return ours, y, ours_calls, calls


@pytest.mark.parametrize("n", [5, 12, 30])
@pytest.mark.parametrize(
    "ref_cls,solver",
    [
        (KDPM2DiscreteScheduler, "dpm-2"),
        (EulerAncestralDiscreteScheduler, "euler-ancestral"),
        (KDPM2AncestralDiscreteScheduler, "dpm-2-ancestral"),
    ],
)
def test_parity_with_diffusers(ref_cls, solver, n):
    ours, theirs, ours_calls, calls = _diffusers_and_ours(ref_cls, solver, n)
    rel = float((ours - theirs).abs().max() / theirs.abs().max())
    print(solver, n, "model calls", ours_calls, calls, "relative difference to diffusers", rel)
    assert ours_calls == calls == (n if solver == "euler-ancestral" else 2 * n - 1)
    assert rel < 1e-5


# ------------------------------------------------------------------ the law of the samples (tests/test_distribution.py)
N = 1500  # = conftest.GMM_N
GMM = ds.models.GaussianMixture.gmm_2d()
SCHED = S.VPLinear()


@pytest.mark.parametrize("solver,steps", [("euler-ancestral", 200), ("dpm-2-ancestral", 100), ("dpm-2", 50)])
def test_passes_two_sample_test(solver, steps, threshold, reference):
    res = ds.sample(GMM.model(SCHED), solver, steps, shape=(N, 2), seed=0, dtype=torch.float64, grid="uniform")
    d = mmd2(res.samples, reference)
    print(solver, steps, "mmd2", d, "threshold", threshold)
    assert d < threshold


@pytest.mark.parametrize("solver", ["euler-ancestral", "dpm-2-ancestral"])
def test_two_sample_test_fails_with_three_steps(solver, threshold, reference):
    res = ds.sample(GMM.model(SCHED), solver, 3, shape=(N, 2), seed=0, dtype=torch.float64, grid="uniform")
    d = mmd2(res.samples, reference)
    print(solver, 3, "mmd2", d, "threshold", threshold)
    assert d > 5 * threshold


@pytest.mark.parametrize("n", [5, 25])
@pytest.mark.parametrize(
    "ref_cls,solver",
    [
        (KDPM2DiscreteScheduler, "dpm-2"),
        (EulerAncestralDiscreteScheduler, "euler-ancestral"),
        (KDPM2AncestralDiscreteScheduler, "dpm-2-ancestral"),
    ],
)
def test_drop_in_for_diffusers_in_a_stable_diffusion_loop(ref_cls, solver, n):
    """DiffsolveScheduler.from_config(diffusers' scheduler, solver=...) in the SD loop on a
    timestep-conditioned network: the same timesteps (KDPM2's interpolated ones included) and number
    of model calls; for dpm-2 the same latents (the ancestral ones draw their own noise)."""
    from diffsolve.integrations.diffusers import DiffsolveScheduler

    net = eps_net_3d()

    def run(s):
        s.set_timesteps(n)
        x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * s.init_noise_sigma
        calls = 0
        for t in s.timesteps:
            out = net(s.scale_model_input(x, t), t)
            calls += 1
            x = s.step(out, t, x, generator=torch.Generator().manual_seed(calls)).prev_sample
        return x, calls

    ref = ref_cls(num_train_timesteps=1000, **SD)
    ours = DiffsolveScheduler.from_config(ref, solver=solver, seed=0)
    a, ca = run(ref) if ref_cls is not KDPM2DiscreteScheduler else run_plain(ref, net, n)
    b, cb = run(ours)
    rel = float((a - b).abs().max() / a.abs().max())
    dt = float((ours.timesteps - ref.timesteps).abs().max())
    print(solver, n, "calls", ca, cb, "max timestep difference", dt, "relative difference", rel)
    assert ca == cb and dt < 0.02 and torch.isfinite(b).all()  # midpoints: our interpolation, not diffusers'
    if solver == "dpm-2":
        assert rel < 1e-5


def run_plain(ref, net, n):
    """diffusers' KDPM2 takes no generator."""
    ref.set_timesteps(n)
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * ref.init_noise_sigma
    calls = 0
    for t in ref.timesteps:
        out = net(ref.scale_model_input(x, t), t)
        calls += 1
        x = ref.step(out, t, x).prev_sample
    return x, calls


@pytest.mark.parametrize("solver,steps", [("euler-ancestral", 200), ("dpm-2-ancestral", 100)])
def test_ancestral_on_rectified_flow_passes_two_sample_test(solver, steps, threshold, reference):
    """On a flow model the step is taken in x/alpha against sigma/alpha: the law is still right."""
    flow = S.RectifiedFlow(t_max=0.999)
    res = ds.sample(GMM.model(flow), solver, steps, shape=(N, 2), seed=0, dtype=torch.float64, grid="uniform")
    d = mmd2(res.samples, reference)
    print(solver, "rectified flow", steps, "mmd2", d, "threshold", threshold)
    assert d < threshold


# ------------------------------------------------------------------ rectified flow from t = 1 (alpha = 0)
SCALED = ["dpm-2", "res-multistep", "gradient-estimation", "exp-heun-2-x0"]
SCALED_SDE = ["euler-ancestral", "dpm-2-ancestral", "res-multistep-ancestral", "seeds-2", "seeds-3", "er-sde"]


@pytest.mark.parametrize("solver", SCALED)
def test_starts_at_alpha_zero_and_converges(solver):
    """The samplers stepping in sigma/alpha start from rectified flow's t = 1 (s infinite) with DDIM's
    jump, the limit of their step: finite, converging to the exact flow map, the calls counted."""
    flow = S.RectifiedFlow(t_min=1e-3)
    model = GAUSS.model(flow)
    x_T = GAUSS.marginal(flow.t_max, flow).sample(64, torch.Generator().manual_seed(0))
    exact = GAUSS.flow_map(x_T, flow.t_max, flow.t_min, flow)
    errs = []
    for n in (20, 80):
        res = ds.sample(model, solver, n, x_T=x_T, grid="uniform")
        assert res.samples.isfinite().all()
        assert res.nfe == 1 + (n - 1) * INFO[solver].calls_per_step  # the jump is one call
        errs.append(float((res.samples - exact).abs().max()))
    print(solver, "from t = 1: errors at 20 and 80 steps", errs)
    assert errs[0] / errs[1] > 2 ** INFO[solver].order  # 4x the steps: at least half the order


@pytest.mark.parametrize("solver", SCALED_SDE)
def test_stochastic_ones_start_at_alpha_zero(solver, threshold, reference):
    flow = S.RectifiedFlow()
    res = ds.sample(GMM.model(flow), solver, 60, shape=(N, 2), seed=0, dtype=torch.float64, grid="uniform")
    d = mmd2(res.samples, reference)
    print(solver, "rectified flow from t = 1", "mmd2", d, "threshold", threshold)
    assert d < threshold
