"""diffusers' consistency-model schedulers as diffsolve's ``lcm``: CMStochasticIterativeScheduler
(``lcm`` with ``from_end=True`` on EDM sigmas), SCMScheduler (``lcm`` on S.TrigFlow,
alpha = cos t, sigma = sigma_data sin t) and FlowMatchLCMScheduler
(``lcm`` on RectifiedFlow). Parity in a plain diffusers loop (the same oracle model, the same grid,
diffusers' step noise replayed, the same number of model calls) and, for FlowMatchLCM, through
DiffsolveScheduler.

Each diffusers class wraps the network output in its own parameterisation; the loops here invert
that wrapping so that the scheduler's denoised estimate is the oracle's x0 (CM: the boundary
condition c_skip x + c_out F; sCM: x0 = cos(s) x - sin(s) F; flow: x0 = x - sigma v). All three draw
a noise at every step, the last one unused (its coefficient is 0): ``lcm`` draws n - 1, the same
stream in the same order.

On an exact denoiser oracle (x0 = E[x_0 | x_t]) a consistency sampler does not sample the data law:
its last step returns a posterior mean, whose spread is smaller than the data's. The law test below
states that measured shrinkage as a bound rather than a two-sample pass."""

import math

import pytest
import torch
from by_hand import run_by_hand
from diffusers import CMStochasticIterativeScheduler, FlowMatchLCMScheduler, SCMScheduler

import diffsolve as ds
from diffsolve.schedules.base import Schedule

S = ds.schedules
GMM3 = ds.models.GaussianMixture([[1.0, -0.5, 0.2], [-1.0, 0.5, 0.0]], 0.4)


class Replay:
    """The draws of one generator in order, in diffusers' dtype, handed out in float64."""

    def __init__(self, seed, shape=(6, 3), dtype=torch.float64):
        self.gen, self.shape, self.dtype, self.draws = torch.Generator().manual_seed(seed), shape, dtype, 0

    def step(self, t, t_next, index=None):
        self.draws += 1
        return torch.randn(*self.shape, generator=self.gen, dtype=self.dtype).to(torch.float64)


def _ours(solver, grid, sched, model, x_T, noise, **opts):
    return run_by_hand(ds.get_solver(solver, **opts), x_T, grid, noise, sched, model)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_from_end_option():
    assert ds.get_solver("lcm").options() == {"from_end": False, "s_noise": 1.0}
    assert ds.get_solver("lcm", from_end=True, s_noise=0.5).options() == {"from_end": True, "s_noise": 0.5}
    with pytest.raises(ValueError):
        ds.get_solver("lcm", s_noise=-1.0)


# ----------------------------------------------------------------------------- CM (Song et al. 2023)


def _cm_run(n=None, timesteps=None, seed=3, s_noise=1.0):
    """(ours, diffusers', our calls, theirs, our draws, the scheduler, diffusers' last-step residue)."""
    ref = CMStochasticIterativeScheduler(clip_denoised=False, s_noise=s_noise)
    ref.set_timesteps(n) if timesteps is None else ref.set_timesteps(timesteps=timesteps)
    sched = S.EDM(ref.config.sigma_min, ref.config.sigma_max)
    model = GMM3.model(sched)
    sigmas = ref.sigmas.to(torch.float64)  # float32 in diffusers: the same grid on both sides
    x_T = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * float(sigmas[0])

    x, calls, g = x_T.clone(), 0, torch.Generator().manual_seed(seed)
    for i, k in enumerate(ref.timesteps):
        s = float(sigmas[i])
        ref.scale_model_input(x, k)  # the network's input scaling; the oracle takes x itself
        c_skip, c_out = ref.get_scalings_for_boundary_condition(ref.sigmas[i])  # diffusers' own (float32)
        f = (model(x, s).x0 - c_skip * x) / c_out  # so that c_skip x + c_out f = the oracle's x0
        calls += 1
        x = ref.step(f, k, x, generator=g).prev_sample
    noise = Replay(seed)
    ours, ours_calls = _ours("lcm", sigmas, sched, model, x_T, noise, from_end=True, s_noise=s_noise)
    draws = noise.draws
    # diffusers' last step adds z sqrt(sigma_hat^2 - sigma_min^2) with sigma_hat = float32(sigma_min):
    # a rounding residue c ~ 6e-7 (0 in exact arithmetic), on the draw it makes at that step
    smin = ref.config.sigma_min
    c = float((torch.tensor(smin, dtype=torch.float32) ** 2 - smin**2) ** 0.5)  # in float32, as diffusers
    residue = c * s_noise * noise.step(0, 0) if n != 1 and len(ref.timesteps) > 1 else 0.0
    return ours, x, ours_calls, calls, draws, ref, residue


@pytest.mark.parametrize("s_noise", [1.0, 0.6])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 10])
def test_cm_stochastic_iterative_parity(n, s_noise):
    ours, theirs, ours_calls, calls, draws, ref, residue = _cm_run(n=n, s_noise=s_noise)
    rel, rel_residue = _rel(ours, theirs), _rel(ours + residue, theirs)
    print("cm s_noise", s_noise, "n", n, "sigmas", [round(float(s), 4) for s in ref.sigmas], "calls", calls)
    print("  relative difference", rel, "without diffusers' last-step rounding residue", rel_residue)
    assert ours_calls == calls == n and draws == n - 1
    assert rel < 1e-5 and rel_residue < 1e-7


def test_cm_stochastic_iterative_parity_custom_timesteps():
    ours, theirs, ours_calls, calls, _, _, residue = _cm_run(timesteps=[22, 0])  # the paper's 2-step ImageNet setting
    rel, rel_residue = _rel(ours, theirs), _rel(ours + residue, theirs)
    print("cm timesteps [22, 0] relative difference", rel, "without the residue", rel_residue)
    assert ours_calls == calls == 2 and rel < 1e-5 and rel_residue < 1e-7


def test_cm_differs_from_plain_lcm():
    """from_end matters: without it the re-noising ignores sigma_min, a measurable difference."""
    ref = CMStochasticIterativeScheduler()
    ref.set_timesteps(3)
    sigmas = ref.sigmas.to(torch.float64)
    sched = S.EDM()
    model = GMM3.model(sched)
    x_T = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 80
    a, _ = _ours("lcm", sigmas, sched, model, x_T, Replay(3), from_end=True)
    b, _ = _ours("lcm", sigmas, sched, model, x_T, Replay(3))
    rel = _rel(a, b)
    print("cm from_end vs plain relative difference", rel)
    assert 1e-9 < rel < 1e-2


def test_cm_step_by_hand_on_vp():
    """from_end on a VP schedule: x1 = r x0 + sqrt(sigma_1^2 - r^2 sigma_N^2) z, r = alpha_1 / alpha_N."""
    sched = S.VPLinear()
    model = GMM3.model(sched)
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    t0, t1, t2 = 0.9, 0.5, 0.05
    grid = torch.tensor([t0, t1, t2], dtype=torch.float64)
    a1, s1 = sched.at(t1)
    a2, s2 = sched.at(t2)
    r = a1 / a2
    z = Replay(7).step(t0, t1)
    x1 = r * model(x, t0).x0 + math.sqrt(s1**2 - r**2 * s2**2) * z
    expect = model(x1, t1).x0
    ours, _ = _ours("lcm", grid, sched, model, x, Replay(7), from_end=True)
    assert (ours - expect).abs().max() < 1e-12


# ----------------------------------------------------------------------------- sCM (Lu & Song 2024)


def test_trigflow_schedule():
    """S.TrigFlow: alpha = cos t, sigma = sigma_d sin t; closed-form derivatives and log-SNR inverse
    against autograd / bisection / central differences."""
    sched = S.TrigFlow(0.5, t_min=1e-3, t_max=1.5)
    t = torch.linspace(0.01, 1.5, 9, dtype=torch.float64)
    assert torch.allclose(sched.alpha(t), torch.cos(t)) and torch.allclose(sched.sigma(t), 0.5 * torch.sin(t))
    assert torch.allclose(sched.t_of_log_snr(sched.log_snr(t)), t, rtol=1e-12, atol=1e-12)
    assert torch.allclose(sched.log_snr(t), torch.log(sched.alpha(t) / sched.sigma(t)), atol=1e-12)
    assert torch.allclose(Schedule.t_of_log_snr(sched, sched.log_snr(t)), t, atol=1e-9)
    h = 1e-6
    assert torch.allclose(sched.alpha_dot(t), (sched.alpha(t + h) - sched.alpha(t - h)) / (2 * h), atol=1e-8)
    assert torch.allclose(sched.sigma_dot(t), (sched.sigma(t + h) - sched.sigma(t - h)) / (2 * h), atol=1e-8)
    assert bool((sched.g2(t) > 0).all())
    assert S.TrigFlow().t_max == math.pi / 2
    with pytest.raises(ValueError):
        S.TrigFlow(t_max=1.5708)  # beyond pi/2 alpha < 0
    with pytest.raises(ValueError):
        S.TrigFlow(sigma_data=0.0)


@pytest.mark.parametrize(
    "n,timesteps,inter",
    [(2, None, 1.3), (1, None, None), (4, None, None), (3, [1.5, 1.1, 0.6, 0.0], None)],
)
def test_scm_parity(n, timesteps, inter):
    ref = SCMScheduler()
    sd = ref.config.sigma_data
    if timesteps is None:
        ref.set_timesteps(n, max_timesteps=1.5, intermediate_timesteps=inter)
    else:
        ref.set_timesteps(n, timesteps=timesteps, max_timesteps=None, intermediate_timesteps=None)
    sched = S.TrigFlow(sd)
    model = GMM3.model(sched)
    grid = ref.timesteps.to(torch.float64)  # float32 in diffusers: the same grid on both sides
    x_T = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * sd

    x, calls, g = x_T.clone(), 0, torch.Generator().manual_seed(4)
    for s in ref.timesteps[:-1]:  # the last timestep (0) closes the grid, as in SanaSprintPipeline
        sv = float(s)
        f = (math.cos(sv) * x - model(x, sv).x0) / math.sin(sv)  # x0 = cos(s) x - sin(s) F
        calls += 1
        x = ref.step(f, s, x, generator=g).prev_sample
    noise = Replay(4, dtype=torch.float32)  # diffusers' SCM draws float32 noise
    ours, ours_calls = _ours("lcm", grid, sched, model, x_T, noise)
    rel = _rel(ours, x)
    print("scm", ref.timesteps.tolist(), "calls", ours_calls, calls, "relative difference", rel)
    assert ours_calls == calls == n and noise.draws == n - 1
    assert rel < 1e-5


# ----------------------------------------------------------------------------- FlowMatchLCM


def _flow_lcm_plain(ref, n, x_T, model, seed):
    ref.set_timesteps(n)
    x, calls, g = x_T.clone(), 0, torch.Generator().manual_seed(seed)
    for i, k in enumerate(ref.timesteps):
        s = float(ref.sigmas[i])
        v = model(x, s).velocity
        calls += 1
        x = ref.step(v, k, x, generator=g).prev_sample
    return x, calls


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_flow_match_lcm_parity(n, shift):
    ref = FlowMatchLCMScheduler(shift=shift)
    sched = S.RectifiedFlow()  # the grid is diffusers' (shifted) sigmas themselves: t = sigma
    model = GMM3.model(sched)
    x_T = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    theirs, calls = _flow_lcm_plain(ref, n, x_T, model, 5)
    grid = ref.sigmas.to(torch.float64)
    noise = Replay(5)
    ours, ours_calls = _ours("lcm", grid, sched, model, x_T, noise)
    rel = _rel(ours, theirs)
    print("flow lcm shift", shift, "n", n, "sigmas", ref.sigmas.tolist(), "relative difference", rel)
    assert float(grid[-1]) == 0.0
    assert ours_calls == calls == n and noise.draws == n - 1
    assert rel < 1e-5


@pytest.mark.parametrize("n", [2, 4])
def test_flow_match_lcm_through_diffsolve_scheduler(n):
    """DiffsolveScheduler.from_config(FlowMatchLCMScheduler, solver='lcm') in diffusers' loop on a
    sigma-conditioned velocity network: the same timesteps, the same number of model calls and,
    with the same generator, the same samples."""
    from diffsolve.integrations.diffusers import DiffsolveScheduler

    sched = S.RectifiedFlow()
    model = GMM3.model(sched)

    def run(s):
        s.set_timesteps(n)
        # one sample: diffsolve draws each sample's noise from its own generator, diffusers draws the
        # whole batch from one, and the two agree for a batch of one
        x = torch.randn(1, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        g, calls = torch.Generator().manual_seed(9), 0
        for t in s.timesteps:
            v = model(x, float(t) / 1000).velocity  # the network's time is sigma = timestep / 1000
            calls += 1
            x = s.step(v, t, x, generator=g).prev_sample
        return x, calls

    ref = FlowMatchLCMScheduler(shift=3.0)
    ours = DiffsolveScheduler.from_config(ref.config, solver="lcm")
    a, ca = run(ref)
    b, cb = run(ours)
    rel = _rel(b, a)
    dt = float((ours.timesteps.to(torch.float64) - ref.timesteps.to(torch.float64)).abs().max())
    print(
        "flow lcm via DiffsolveScheduler n", n, "calls", ca, cb, "timestep difference", dt, "relative difference", rel
    )
    assert ca == cb == n and dt < 1e-3
    assert rel < 1e-5


# ----------------------------------------------------------------------------- the law on an exact oracle


def _lcm_law(grid, sched, m, s, from_end):
    """Mean and variance of lcm's output on the exact oracle of N(m, s^2) data (1-D), from
    x_T ~ N(0, sigma_0^2) (the prior, as the test draws it). The oracle's x0 is
    m + k (x - alpha m), k = alpha s^2 / (alpha^2 s^2 + sigma^2), and each step is x' = r x0 + c z
    (r, c: alpha', sigma' or, with from_end, the forward process from the grid's end)."""
    mu, v = 0.0, sched.at(float(grid[0]))[1] ** 2
    a_e, s_e = sched.at(float(grid[-1]))
    for i in range(len(grid) - 1):
        a, sg = sched.at(float(grid[i]))
        k = a * s * s / (a * a * s * s + sg * sg)
        mu0, v0 = m + k * (mu - a * m), k * k * v  # the law of x0
        if i == len(grid) - 2:
            return mu0, v0
        a_n, s_n = sched.at(float(grid[i + 1]))
        r, c = (a_n / a_e, math.sqrt(max(s_n**2 - (a_n / a_e) ** 2 * s_e**2, 0.0))) if from_end else (a_n, s_n)
        mu, v = r * mu0, r * r * v0 + c * c
    return mu, v


@pytest.mark.parametrize(
    "sched_name,grid,from_end",
    [
        ("edm", [80.0, 2.2404, 0.002], True),
        ("edm", [80.0, 23.61, 5.38, 0.8229, 0.0628, 0.002], True),
        ("flow", [1.0, 0.75, 0.5, 0.25, 0.0], False),
        ("flow", [1.0, 0.9, 0.5, 0.0], False),
    ],
)
def test_law_on_an_exact_oracle_is_the_posterior_mean_law(sched_name, grid, from_end):
    """On the exact denoiser of Gaussian data N(m, s^2) the output is Gaussian with the closed-form
    mean and variance of _lcm_law (the last step returns a posterior mean): the sample moments of
    40000 runs match them, and the variance is measurably below the data's s^2 (the sampler does not
    give the data law on a denoiser oracle; it does on a trained consistency function)."""
    m, s, n = 0.7, 0.5, 40000
    sched = S.EDM() if sched_name == "edm" else S.RectifiedFlow()
    model = ds.models.GaussianMixture([[m]], s).model(sched)
    g = torch.tensor(grid, dtype=torch.float64)
    x_T = torch.randn(n, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * sched.at(grid[0])[1]
    out, _ = _ours("lcm", g, sched, model, x_T, Replay(11, shape=(n, 1)), from_end=from_end)
    mu, v = _lcm_law(g, sched, m, s, from_end)
    emp_mu, emp_v = float(out.mean()), float(out.var())
    z_mu = (emp_mu - mu) / math.sqrt(v / n)
    z_v = (emp_v / v - 1) / math.sqrt(2 / (n - 1))
    print(sched_name, grid, "law mean", mu, "measured", emp_mu, "law var", v, "measured", emp_v, "data var", s * s)
    print("  z-scores", z_mu, z_v)
    assert abs(z_mu) < 5 and abs(z_v) < 5
    assert v < 0.9 * s * s


@pytest.mark.parametrize("cls", [CMStochasticIterativeScheduler, SCMScheduler])
def test_diffsolve_scheduler_refuses_cm_and_scm_sources(cls):
    """DiffsolveScheduler has no source for these classes (CM's timesteps are 250 log sigma on
    Karras sigmas with its own boundary-condition wrapping; SCM's TrigFlow time and its 'trigflow'
    prediction type): from_config(scheduler) refuses them with an error naming the class."""
    from diffsolve.integrations.diffusers import DiffsolveScheduler

    with pytest.raises(ValueError, match=cls.__name__):
        DiffsolveScheduler.from_config(cls(), solver="lcm")


def test_diffsolve_scheduler_refuses_flow_match_lcm_scale_factors():
    """FlowMatchLCM's scale_factors resize x0 between steps: refused by name, not silently dropped."""
    from diffsolve.integrations.diffusers import DiffsolveScheduler

    with pytest.raises(ValueError, match="scale_factors"):
        DiffsolveScheduler.from_config(FlowMatchLCMScheduler(scale_factors=[1.5, 2.0]), solver="lcm")
    DiffsolveScheduler.from_config(FlowMatchLCMScheduler(), solver="lcm").set_timesteps(2)  # None (the default) is fine
