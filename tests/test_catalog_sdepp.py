"""k-diffusion's stochastic DPM-Solver++ family: dpmpp-2s-ancestral, dpmpp-sde and dpmpp-3m-sde. Orders at
eta = 0 on the closed-form Gaussian, a hand-computed step, diffusers parity (DPMSolverSDEScheduler with its
own Brownian tree replayed; DPMSolverMultistepScheduler's sde-dpmsolver++ at order 3), Brownian-tree
consistency across step counts, and the law of the samples at eta = 1."""

import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, DPMSolverSDEScheduler
from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler
from tiny_pipelines import eps_net_3d

import diffsolve as ds
from diffsolve.core.registry import registered
from diffsolve.metrics import mmd2

S = ds.schedules
INFO = {i.name: i for i in registered()}
NAMES = ("dpmpp-2s-ancestral", "dpmpp-sde", "dpmpp-3m-sde")
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


# ------------------------------------------------------------------ registry
def test_registry_entries():
    for name, order, calls in (("dpmpp-2s-ancestral", 2, 2), ("dpmpp-sde", 2, 2), ("dpmpp-3m-sde", 3, 1)):
        info = INFO[name]
        assert (info.family, info.order, info.calls_per_step, info.deterministic) == ("sde", order, calls, False)
        assert ds.get_solver(name.replace("-", "_")).name == name
    assert ds.get_solver("dpmpp-2s-ancestral").options() == {"eta": 1.0, "s_noise": 1.0}
    assert ds.get_solver("dpmpp-sde").options() == {"eta": 1.0, "s_noise": 1.0, "r": 0.5}
    assert ds.get_solver("dpmpp-3m-sde").options() == {"eta": 1.0, "s_noise": 1.0, "published_d2": False}
    assert ds.get_solver("dpmpp-sde").default_noise == ds.get_solver("dpmpp-3m-sde").default_noise == "brownian"
    with pytest.raises(ValueError, match="r must be in"):
        ds.get_solver("dpmpp-sde", r=1.5)


# ------------------------------------------------------------------ orders at eta = 0 (as tests/test_orders.py)
GAUSS = ds.models.GaussianMixture([[0.5, -1.0, 2.0, 0.0]], [[0.5, 1.0, 0.2, 2.0]])
MU = torch.tensor([0.3, 0.3, -0.2, 0.1], dtype=torch.float64)
SCHEDULES = {
    "vp": (lambda: S.VPLinear(), None),
    "ve": (lambda: S.VE(), None),
    "flow": (lambda: S.RectifiedFlow(t_min=1e-3, t_max=1 - 1e-3), None),
    "sd-discrete": (lambda: S.VPDiscrete.from_diffusers_config(SD), None),
    "mean-reverting": (lambda: S.MeanReverting(lam=0.5), MU),
}


def errors(solver, sched, mu, steps, **opts):
    model = GAUSS.model(sched)
    x_T = GAUSS.marginal(sched.t_max, sched, mu).sample(64, torch.Generator().manual_seed(0))
    exact = GAUSS.flow_map(x_T, sched.t_max, sched.t_min, sched, mu)
    errs = []
    for n in steps:
        res = ds.sample(model, solver, n, x_T=x_T, grid="log-snr", mu=mu, seed=0, **opts)
        assert res.samples.dtype == torch.float64 and res.nfe == n * INFO[solver].calls_per_step
        errs.append(float((res.samples - exact).abs().max()))
    return errs


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("solver", ["dpmpp-2s-ancestral", "dpmpp-sde"])
def test_singlestep_order_two_at_eta_zero(solver, schedule):
    make, mu = SCHEDULES[schedule]
    errs = errors(solver, make(), mu, (10, 20, 40, 80), eta=0.0)
    orders = [math.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 1)]
    print(solver, schedule, "errors", [f"{e:.3e}" for e in errs], "orders", [f"{o:.2f}" for o in orders])
    assert all(e2 < e1 for e1, e2 in zip(errs, errs[1:]))
    for o in orders[1:]:
        assert abs(o - INFO[solver].order) < 0.25, (schedule, orders)


@pytest.mark.parametrize("schedule", ["vp", "flow", "mean-reverting"])
def test_3m_sde_order_three_at_eta_zero(schedule):
    """Taylor-exact D2 weight: order >= 3 (this problem superconverges to about 4, as dpmpp-3m);
    k-diffusion's published weight (half of it): order 2."""
    make, mu = SCHEDULES[schedule]
    errs = errors("dpmpp-3m-sde", make(), mu, (20, 40, 80, 160), eta=0.0)
    pub = errors("dpmpp-3m-sde", make(), mu, (20, 40, 80, 160), eta=0.0, published_d2=True)
    orders = [math.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 1)]
    porders = [math.log2(pub[i] / pub[i + 1]) for i in range(len(pub) - 1)]
    print("dpmpp-3m-sde", schedule, [f"{e:.2e}" for e in errs], [f"{o:.2f}" for o in orders])
    print("  published_d2", [f"{e:.2e}" for e in pub], [f"{o:.2f}" for o in porders])
    assert min(orders) > INFO["dpmpp-3m-sde"].order - 0.25
    assert abs(porders[-1] - 2) < 0.25 and errs[-1] < pub[-1] / 20


def test_eta_zero_identities():
    """At eta = 0: dpmpp-sde (r = 1/2) is dpmpp-2s-ancestral (DPM-Solver++(2S)), and dpmpp-3m-sde is
    mrs-ode at order 3 in data form with the Taylor second-order term and no lowered final orders."""
    sched = S.MeanReverting(lam=0.5)
    model = GAUSS.model(sched)
    x_T = GAUSS.marginal(sched.t_max, sched, MU).sample(16, torch.Generator().manual_seed(1))
    a = ds.sample(model, "dpmpp-sde", 12, x_T=x_T, mu=MU, eta=0.0).samples
    b = ds.sample(model, "dpmpp-2s-ancestral", 12, x_T=x_T, mu=MU, eta=0.0).samples
    assert (a - b).abs().max() < 1e-12
    c = ds.sample(model, "dpmpp-3m-sde", 12, x_T=x_T, mu=MU, eta=0.0).samples
    opts = {"order": 3, "parameterization": "data", "solver_type": "taylor", "lower_order_final": False}
    d = ds.sample(model, "mrs-ode", 12, x_T=x_T, mu=MU, **opts).samples
    assert (c - d).abs().max() < 1e-12
    # eta = 1, one step: the first-order SDE-DPM-Solver++ step of mrs-sde, with the same noise
    e = ds.sample(model, "dpmpp-3m-sde", 1, x_T=x_T, mu=MU, grid=[1.0, 0.5], seed=3, noise="gaussian").samples
    f = ds.sample(model, "mrs-sde", 1, x_T=x_T, mu=MU, grid=[1.0, 0.5], seed=3, order=1).samples
    assert (e - f).abs().max() < 1e-12


# ------------------------------------------------------------------ a step by hand
def test_hand_computed_steps():
    """One step of each on EDM (alpha = 1, sigma = t: x = y, s = t), from k-diffusion's formulas with
    the model's D."""
    sched = S.EDM()
    model = GAUSS.model(sched)
    x = torch.tensor([[1.0, -2.0, 0.5, 3.0]], dtype=torch.float64) * 4.0
    t, t_next, eta = 4.0, 1.0, 0.7
    z = torch.randn(2, 1, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))

    class Draws:  # the two normals the step asks for, in order
        kind = "gaussian"

        def __init__(self):
            self.k = 0

        def step(self, t0, t1, index=None):
            self.k += 1
            return z[self.k - 1]

    def run(name, **opts):
        out = ds.get_solver(name, **opts).run(
            x, torch.tensor([t, t_next], dtype=torch.float64), Draws(), schedule=sched
        )
        item = next(out)
        try:
            while True:
                item = out.send(model(*item[:2]))
        except StopIteration as stop:
            return stop.value

    def d_of(y, s):
        return model(y, s).x0

    def split(s, s2):
        up = min(s2, eta * math.sqrt(s2**2 * (s**2 - s2**2) / s**2))
        return math.sqrt(s2**2 - up**2), up

    s, s2 = t, t_next
    down, up = split(s, s2)
    sm = math.sqrt(s * down)  # the midpoint of [log down, log s]
    x2 = (sm / s) * x - math.expm1(-0.5 * math.log(s / down)) * d_of(x, s)
    want = (down / s) * x - math.expm1(-math.log(s / down)) * d_of(x2, sm) + 1.3 * up * z[0]
    got = run("dpmpp-2s-ancestral", eta=eta, s_noise=1.3)
    assert (got - want).abs().max() < 1e-12

    # dpmpp-sde: stage at sqrt(s s2), its noise z1, the full step's noise correlated with it
    sr = math.sqrt(s * s2)
    d1, u1 = split(s, sr)
    xr = (d1 / s) * x + (1 - d1 / s) * d_of(x, s) + u1 * z[0]
    c = math.sqrt((s - sr) / (s - s2))
    z2 = c * z[0] + math.sqrt(1 - c * c) * z[1]
    want = (down / s) * x + (1 - down / s) * d_of(xr, sr) + up * z2
    assert (run("dpmpp-sde", eta=eta) - want).abs().max() < 1e-12

    # dpmpp-3m-sde's first step: e^{-h_eta} x + (1 - e^{-h_eta}) D + s2 sqrt(1 - e^{-2 eta h}) z
    h = math.log(s / s2)
    he = (1 + eta) * h
    want = math.exp(-he) * x - math.expm1(-he) * d_of(x, s) + s2 * math.sqrt(-math.expm1(-2 * eta * h)) * z[0]
    assert (run("dpmpp-3m-sde", eta=eta) - want).abs().max() < 1e-12


# ------------------------------------------------------------------ diffusers: DPMSolverSDEScheduler (dpmpp-sde)
GMM3 = ds.models.GaussianMixture([[1.0, -0.5, 0.2], [-1.0, 0.5, 0.0]], 0.4)


class ReplayedPath:
    """diffusers' Brownian path W(sigma) (its torchsde tree), known at the levels diffusers queried:
    the grid levels from the cumulated increments, each midpoint from its own. A NoiseSource stand-in
    with kind 'brownian' whose ``time_changed`` path is W at sigma = e^u, looked up at the nearest
    queried level (our float64 levels match diffusers' float32 ones to 1e-6)."""

    kind = "brownian"

    def __init__(self, nodes, mids, steps, stages):
        w, self.table = torch.zeros_like(steps[0]), [(float(nodes[0]), torch.zeros_like(steps[0]))]
        for i, (dw, dr) in enumerate(zip(steps, stages)):
            self.table.append((float(mids[i]), w + dr))
            w = w + dw
            self.table.append((float(nodes[i + 1]), w))
        self.t0, self.t1 = -math.inf, math.inf

    def time_changed(self, lo, hi, variance):
        return self

    def __call__(self, u, rows=None):
        level = math.exp(float(u))
        best = min(self.table, key=lambda kv: abs(kv[0] - level))
        assert abs(best[0] - level) < 1e-6 * level, (best[0], level)
        return best[1]


def _sde_diffusers_and_ours(n, seed=5, b=6):
    ref = DPMSolverSDEScheduler(num_train_timesteps=1000, noise_sampler_seed=seed, **SD)
    ref.set_timesteps(n)
    sched = S.VPDiscrete.from_diffusers_config(ref.config)
    model = GMM3.model(sched)

    def t_of(sigma):
        return float(sched.t_of_log_snr(-math.log(sigma))) if sigma > 0 else 0.0

    y_T = float(ref.init_noise_sigma) * torch.randn(
        b, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    pos = ref.sigmas[ref.sigmas > 0]
    sampler = BrownianTreeNoiseSampler(y_T, pos.min().item(), pos.max().item(), seed)
    tree, record = sampler.tree, []

    def recording(a, c):  # W(c) - W(a), as diffusers' sampler asks for it
        w = tree(a, c)
        record.append((float(a), float(c), w.clone()))
        return w

    sampler.tree = recording
    ref.noise_sampler = sampler  # the sampler diffusers would build at its first step, recorded
    y, calls = y_T.clone(), 0
    for t in ref.timesteps:
        sigma = float(ref.sigmas[ref.step_index or 0]) if ref.state_in_first_order else float(ref.mid_point_sigma)
        eps = model(ref.scale_model_input(y, t), t_of(sigma)).eps
        calls += 1
        y = ref.step(eps, t, y).prev_sample

    nodes = [float(ref.sigmas[0])] + [float(v) for v in ref.sigmas[1:-1:2]] + [0.0]
    grid = torch.tensor([t_of(s) for s in nodes], dtype=torch.float64)
    stages, steps, mids = record[0::2], record[1::2], [r[1] for r in record[0::2]]
    assert len(stages) == len(steps) == n - 1 and all(abs(s[1] - nodes[i + 1]) < 1e-6 for i, s in enumerate(steps))
    path = ReplayedPath(nodes, mids, [s[2] for s in steps], [s[2] for s in stages])
    x_T = y_T * float(sched.alpha(grid[0]))
    run = ds.get_solver("dpmpp-sde").run(x_T, grid, path, schedule=sched)
    item, ours_calls = next(run), 0
    try:
        while True:
            ours_calls += 1
            item = run.send(model(*item[:2]))
    except StopIteration as stop:
        ours = stop.value
    return ours, y, ours_calls, calls


@pytest.mark.parametrize("n", [5, 12, 30])
def test_dpmpp_sde_parity_with_diffusers_brownian_tree(n):
    """The same model, sigmas, initial state and Brownian path (diffusers' torchsde tree, replayed
    through our noise interface): the same samples, with the same 2n - 1 model calls."""
    ours, theirs, ours_calls, calls = _sde_diffusers_and_ours(n)
    rel = float((ours - theirs).abs().max() / theirs.abs().max())
    print("dpmpp-sde", n, "model calls", ours_calls, calls, "relative difference to diffusers", rel)
    assert ours_calls == calls == 2 * n - 1
    assert rel < 1e-5


@pytest.mark.parametrize("n", [5, 25])
def test_dpmpp_sde_drop_in_for_diffusers(n):
    """DiffsolveScheduler.from_config(DPMSolverSDEScheduler, solver='dpmpp-sde') in the SD loop on a
    timestep-conditioned network: the same timesteps and model calls; with s_noise = 0 on both sides
    (diffusers' step takes s_noise) the same latents; with noise, finite latents."""
    from diffsolve.integrations.diffusers import DiffsolveScheduler

    net = eps_net_3d()

    def run(s, **kw):
        s.set_timesteps(n)
        x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * s.init_noise_sigma
        calls = 0
        for t in s.timesteps:
            out = net(s.scale_model_input(x, t), t)
            calls += 1
            x = s.step(out, t, x, **kw).prev_sample
        return x, calls

    ref = DPMSolverSDEScheduler(num_train_timesteps=1000, **SD)
    quiet = DiffsolveScheduler.from_config(ref, solver="dpmpp-sde", solver_options={"s_noise": 0.0}, seed=0)
    a, ca = run(ref, s_noise=0.0)
    b, cb = run(quiet)
    rel = float((a - b).abs().max() / a.abs().max())
    dt = float((quiet.timesteps - ref.timesteps).abs().max())
    print("dpmpp-sde", n, "calls", ca, cb, "max timestep difference", dt, "relative difference (s_noise=0)", rel)
    assert ca == cb == 2 * n - 1 and dt < 0.02 and rel < 1e-5
    noisy, _ = run(DiffsolveScheduler.from_config(ref, solver="dpmpp-sde", seed=0))
    assert torch.isfinite(noisy).all() and (noisy - b).abs().max() > 1e-3


# ------------------------------------------------------------------ diffusers: sde-dpmsolver++ at order 3 (dpmpp-3m-sde)
class SignFixedMultistep(DPMSolverMultistepScheduler):
    """diffusers' DPMSolverMultistepScheduler with the D2 weight of its sde-dpmsolver++ third-order
    step set to k-diffusion's: diffusers weighs D2 by alpha_t ((1 - e^{-2h} - 2h)/(2h)^2 - 1/2) = alpha_t
    (-1 + h/3 + ...), k-diffusion by alpha_t ((1 - e^{-2h} - 2h)/(2h)^2 + 1/2) = alpha_t (h/3 + ...),
    i.e. -phi_3 of sample_dpmpp_3m_sde at eta = 1 (this adds the missing alpha_t D2)."""

    def multistep_dpm_solver_third_order_update(self, model_output_list, *args, sample=None, noise=None, **kw):
        out = super().multistep_dpm_solver_third_order_update(
            model_output_list, *args, sample=sample, noise=noise, **kw
        )
        i = self.step_index
        pairs = [self._sigma_to_alpha_sigma_t(self.sigmas[j]) for j in (i + 1, i, i - 1, i - 2)]
        lam = [torch.log(a) - torch.log(s) for a, s in pairs]
        h, r0, r1 = lam[0] - lam[1], (lam[1] - lam[2]), (lam[2] - lam[3])
        r0, r1 = r0 / h, r1 / h
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        d2 = ((m0 - m1) / r0 - (m1 - m2) / r1) / (r0 + r1)
        return out + pairs[0][0] * d2


def _multistep_sde(ref_cls, n, **opts):
    net = eps_net_3d()
    ref = ref_cls(**SD, algorithm_type="sde-dpmsolver++", solver_order=3, solver_type="heun", lower_order_final=False)
    ref.set_timesteps(n)
    x_T = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    noises = [
        torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + i)) for i in range(n)
    ]
    xd = x_T.clone()
    for i, t in enumerate(ref.timesteps):
        xd = ref.step(net(xd, t.expand(4)), t, xd, variance_noise=noises[i]).prev_sample
    sched = S.VPDiscrete.from_diffusers_config(ref.config)
    model = ds.DiffusionModel(net, sched, "eps")
    grid = torch.tensor([float(sched.t_of_timestep(float(t))) for t in ref.timesteps] + [0.0], dtype=torch.float64)

    class Replay:  # the same step noise, in order (no kind: fresh-normal mode)
        k = 0

        def step(self, t, t_next, index=None):
            self.k += 1
            return noises[self.k - 1]

    run = ds.get_solver("dpmpp-3m-sde", **opts).run(x_T, grid, Replay(), schedule=sched)
    item, calls = next(run), 1
    try:
        while True:
            item = run.send(model(*item[:2]))
            calls += 1
    except StopIteration as stop:
        ours = stop.value
    return ours, xd, calls


@pytest.mark.parametrize("n", [8, 20])
def test_3m_sde_parity_with_diffusers_sde_dpmsolver_order_3(n):
    """diffusers' sde-dpmsolver++ at solver_order=3 (solver_type='heun', lower_order_final=False) is
    k-diffusion's 3M SDE at eta = 1 up to the sign of one term of its D2 weight: with that fixed, the
    same samples as published_d2=True to 1e-5 (same model, timesteps, initial state and step noise,
    n model calls); diffusers as shipped differs by far more."""
    ours, fixed, calls = _multistep_sde(SignFixedMultistep, n, published_d2=True)
    _, shipped, _ = _multistep_sde(DPMSolverMultistepScheduler, n, published_d2=True)
    taylor, _, _ = _multistep_sde(SignFixedMultistep, n)
    rel = float((ours - fixed).abs().max() / fixed.abs().max())
    gap = float((ours - shipped).abs().max() / shipped.abs().max())
    tgap = float((taylor - fixed).abs().max() / fixed.abs().max())
    print("dpmpp-3m-sde", n, "vs sign-fixed diffusers", rel, "vs shipped diffusers", gap, "Taylor-exact D2", tgap)
    assert calls == n and rel < 1e-5 and gap > 1e-3 and tgap > 100 * max(rel, 1e-12)


# ------------------------------------------------------------------ Brownian noise: consistent across step counts
def test_brownian_noise_is_consistent_across_step_counts():
    """With the default Brownian path the samples at 40 and 80 steps are close (one path, finer
    steps); with fresh draws they are unrelated draws of the law."""
    gmm = ds.models.GaussianMixture.gmm_2d()
    model = gmm.model(S.VPLinear())
    for name in ("dpmpp-sde", "dpmpp-3m-sde"):
        near = [ds.sample(model, name, n, shape=(200, 2), seed=0, dtype=torch.float64).samples for n in (40, 80)]
        far = [
            ds.sample(model, name, n, shape=(200, 2), seed=0, dtype=torch.float64, noise="gaussian").samples
            for n in (40, 80)
        ]
        d_near = float((near[0] - near[1]).norm(dim=1).median())
        d_far = float((far[0] - far[1]).norm(dim=1).median())
        print(name, "median distance 40 vs 80 steps: brownian", d_near, "gaussian", d_far)
        assert d_near < d_far / 4


# ------------------------------------------------------------------ the law of the samples (tests/test_distribution.py)
N = 1500  # = conftest.GMM_N
GMM = ds.models.GaussianMixture.gmm_2d()
SCHED = S.VPLinear()


@pytest.mark.parametrize("solver,steps", [("dpmpp-2s-ancestral", 100), ("dpmpp-sde", 100), ("dpmpp-3m-sde", 100)])
def test_passes_two_sample_test(solver, steps, threshold, reference):
    res = ds.sample(GMM.model(SCHED), solver, steps, shape=(N, 2), seed=0, dtype=torch.float64, grid="uniform")
    d = mmd2(res.samples, reference)
    print(solver, steps, "mmd2", d, "threshold", threshold)
    assert d < threshold


@pytest.mark.parametrize("solver", NAMES)
def test_two_sample_test_fails_with_two_steps(solver, threshold, reference):
    res = ds.sample(GMM.model(SCHED), solver, 2, shape=(N, 2), seed=0, dtype=torch.float64, grid="uniform")
    d = mmd2(res.samples, reference)
    print(solver, 2, "mmd2", d, "threshold", threshold)
    assert d > 5 * threshold


@pytest.mark.parametrize("solver", NAMES)
def test_on_rectified_flow_passes_two_sample_test(solver, threshold, reference):
    flow = S.RectifiedFlow(t_max=0.999)
    res = ds.sample(GMM.model(flow), solver, 100, shape=(N, 2), seed=0, dtype=torch.float64, grid="uniform")
    d = mmd2(res.samples, reference)
    print(solver, "rectified flow mmd2", d, "threshold", threshold)
    assert d < threshold


@pytest.mark.parametrize("n", [8, 20])
def test_3m_sde_drop_in_for_diffusers(n):
    """DiffsolveScheduler.from_config(sde-dpmsolver++ at order 3, solver='dpmpp-3m-sde',
    published_d2=True) in a plain loop with one generator for the run: the same timesteps, model calls
    and noise draws as (sign-fixed) diffusers, so the same latents to 1e-5."""
    from diffsolve.integrations.diffusers import DiffsolveScheduler

    net = eps_net_3d()

    def run(s):
        s.set_timesteps(n)
        x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * s.init_noise_sigma
        g, calls = torch.Generator().manual_seed(7), 0
        for t in s.timesteps:
            out = net(s.scale_model_input(x, t), t)
            calls += 1
            x = s.step(out, t, x, generator=g).prev_sample
        return x, calls

    cfg = {"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "solver_type": "heun", "lower_order_final": False}
    ref = SignFixedMultistep(**SD, **cfg)
    base = DPMSolverMultistepScheduler(**SD, **cfg)
    ours = DiffsolveScheduler.from_config(base, solver="dpmpp-3m-sde", solver_options={"published_d2": True})
    a, ca = run(ref)
    b, cb = run(ours)
    rel = float((a - b).abs().max() / a.abs().max())
    dt = float((ours.timesteps - ref.timesteps).abs().max())
    print("dpmpp-3m-sde", n, "calls", ca, cb, "max timestep difference", dt, "relative difference", rel)
    assert ca == cb == n and dt < 0.02 and rel < 1e-5
