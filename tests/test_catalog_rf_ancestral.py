"""ComfyUI's rectified-flow ancestral forms (``sample_euler_ancestral_RF``, ``sample_dpm_2_ancestral_RF``)
as ``form="rf"`` of euler-ancestral and dpm-2-ancestral: the update written out by hand, parity with
diffusers' LTXEulerAncestralRFScheduler (its noise replayed), the law of the samples, the start at t = 1
and the refusal on schedules without alpha = 1 - sigma."""

import math

import pytest
import torch
from by_hand import run_by_hand
from diffusers import LTXEulerAncestralRFScheduler

import diffsolve as ds
from diffsolve.metrics import mmd2

S = ds.schedules
GMM3 = ds.models.GaussianMixture([[1.0, -0.5, 0.2], [-1.0, 0.5, 0.0]], 0.4)


class Replay:
    """The step noise as a list of draws, in order."""

    def __init__(self, draws):
        self.draws, self.k = draws, 0

    def step(self, t, t_next, index=None):
        self.k += 1
        return self.draws[self.k - 1]


def drive(solver, x, grid, noise, sched, **opts):
    return run_by_hand(ds.get_solver(solver, **opts), x, grid, noise, sched, GMM3.model(sched))


def t_of_sigma(sched, sigma):
    """RectifiedFlow's time at noise level sigma (sigma = shift t / (1 + (shift - 1) t))."""
    return sigma / (sched.shift - (sched.shift - 1.0) * sigma)


def by_hand(kind, x, sigmas, draws, sched, eta, s_noise):
    """ComfyUI's RF samplers written out, with D(x, sigma) the model's x0 at that noise level."""
    model = GMM3.model(sched)

    def denoise(x, sigma):
        return model(x, t_of_sigma(sched, sigma)).x0

    k, calls = 0, 0
    for i in range(len(sigmas) - 1):
        sig, nxt = sigmas[i], sigmas[i + 1]
        x0 = denoise(x, sig)
        calls += 1
        down = nxt * (1 + (nxt / sig - 1) * eta)
        a_next, a_down = 1 - nxt, 1 - down
        renoise = math.sqrt(max(nxt**2 - down**2 * a_next**2 / a_down**2, 0.0))
        if kind == "euler":
            if nxt == 0:
                x = x0
                continue
            x = (down / sig) * x + (1 - down / sig) * x0
        else:
            d = (x - x0) / sig
            if down == 0:
                x = x - sig * d
                continue
            mid = math.exp(0.5 * (math.log(sig) + math.log(down)))
            x2 = x + d * (mid - sig)
            d2 = (x2 - denoise(x2, mid)) / mid
            calls += 1
            x = x + d2 * (down - sig)
        if eta > 0:
            x = (a_next / a_down) * x
            if renoise > 0 and s_noise > 0:
                x = x + draws[k] * s_noise * renoise
                k += 1
    return x, calls


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("eta,s_noise", [(1.0, 1.0), (0.6, 0.8), (0.0, 1.0)])
@pytest.mark.parametrize("solver,kind", [("euler-ancestral", "euler"), ("dpm-2-ancestral", "dpm2")])
def test_three_steps_by_hand_from_t_one(solver, kind, eta, s_noise, shift):
    """Three steps from t = 1 (sigma = 1: ComfyUI's step, finite there) to sigma = 0, as ComfyUI writes
    them: 1e-12 relative."""
    sched = S.RectifiedFlow(shift=shift)
    grid = torch.tensor([1.0, 0.6, 0.25, 0.0], dtype=torch.float64)
    sigmas = [float(sched.sigma(t)) for t in grid]
    x_T = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    draws = [torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(10 + i)) for i in range(3)]
    ours, calls = drive(solver, x_T, grid, Replay(draws), sched, form="rf", eta=eta, s_noise=s_noise)
    theirs, their_calls = by_hand(kind, x_T, sigmas, draws, sched, eta, s_noise)
    rel = float((ours - theirs).abs().max() / theirs.abs().max())
    print(solver, "shift", shift, "eta", eta, "calls", calls, their_calls, "relative difference", rel)
    assert calls == their_calls == (3 if kind == "euler" else 5)
    assert rel < 1e-12


def test_rf_form_differs_from_scaled_and_is_euler_at_eta_zero():
    sched = S.RectifiedFlow(t_min=1e-3)
    model = GMM3.model(sched)
    kw = dict(shape=(32, 3), seed=1, dtype=torch.float64)
    rf = ds.sample(model, "euler-ancestral", 12, form="rf", **kw).samples
    scaled = ds.sample(model, "euler-ancestral", 12, **kw).samples
    assert float((rf - scaled).abs().max()) > 1e-2
    # at eta = 0 the rf step is rectified flow's Euler step in t (shift 1: t = sigma)
    a = ds.sample(model, "euler-ancestral", 12, form="rf", eta=0.0, **kw).samples
    b = ds.sample(model, "euler", 12, **kw).samples
    assert float((a - b).abs().max()) < 1e-12


@pytest.mark.parametrize("solver", ["euler-ancestral", "dpm-2-ancestral"])
def test_rf_form_refused_without_alpha_one_minus_sigma(solver):
    for sched in (S.VPLinear(), S.VE()):
        with pytest.raises(ValueError, match="alpha = 1 - sigma"):
            ds.sample(GMM3.model(sched), solver, 4, shape=(2, 3), seed=0, form="rf")
    with pytest.raises(ValueError, match="form must be one of"):
        ds.get_solver(solver, form="comfy")


# ------------------------------------------------------------------ diffusers LTXEulerAncestralRFScheduler
@pytest.mark.parametrize("n", [5, 12, 30])
@pytest.mark.parametrize("eta,s_noise", [(1.0, 1.0), (0.5, 0.7)])
def test_parity_with_diffusers_ltx_euler_ancestral_rf(n, eta, s_noise):
    """diffusers' plain loop (its FlowMatchEuler sigmas, velocity output, its float32 noise drawn from
    one generator) against ours on the same grid with the same draws: 1e-5 relative, n calls each."""
    ref = LTXEulerAncestralRFScheduler(eta=eta, s_noise=s_noise)
    ref.set_timesteps(n)
    sched = S.RectifiedFlow()
    model = GMM3.model(sched)
    grid = torch.as_tensor(ref.sigmas, dtype=torch.float64)
    x_T = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    x, calls, g = x_T.clone(), 0, torch.Generator().manual_seed(3)
    for k, t in enumerate(ref.timesteps):
        v = model(x, float(grid[k])).velocity
        calls += 1
        x = ref.step(v, t, x, generator=g).prev_sample
    theirs = x

    g2 = torch.Generator().manual_seed(3)
    draws = [torch.randn(6, 3, generator=g2, dtype=torch.float32).double() for _ in range(n)]
    ours, ours_calls = drive("euler-ancestral", x_T, grid, Replay(draws), sched, form="rf", eta=eta, s_noise=s_noise)
    rel = float((ours - theirs).abs().max() / theirs.abs().max())
    print("ltx euler-ancestral-rf", n, eta, "calls", ours_calls, calls, "relative difference", rel)
    assert ours_calls == calls == n
    assert rel < 1e-5


# ------------------------------------------------------------------ the law of the samples (tests/test_distribution.py)
N = 1500  # = conftest.GMM_N
GMM = ds.models.GaussianMixture.gmm_2d()


@pytest.mark.parametrize("solver,steps", [("euler-ancestral", 200), ("dpm-2-ancestral", 100)])
def test_rf_form_passes_two_sample_test_from_t_one(solver, steps, threshold, reference):
    flow = S.RectifiedFlow()  # t_max = 1: the first step is ComfyUI's, from sigma = 1
    res = ds.sample(
        GMM.model(flow), solver, steps, shape=(N, 2), seed=0, dtype=torch.float64, grid="uniform", form="rf"
    )
    d = mmd2(res.samples, reference)
    print(solver, "rf form", steps, "mmd2", d, "threshold", threshold, "nfe", res.nfe)
    assert res.samples.isfinite().all()
    assert d < threshold


@pytest.mark.parametrize("solver,steps", [("euler-ancestral", 3), ("dpm-2-ancestral", 1)])
def test_rf_form_two_sample_test_fails_with_too_few_steps(solver, steps, threshold, reference):
    """The test has power: euler-ancestral's rf form at 3 steps (mmd2 0.038) fails. dpm-2-ancestral's
    passes already at 2 steps on this mixture (mmd2 0.0031 against 0.0058), so its check is 1 step
    (the mixture's mean, mmd2 1.28)."""
    flow = S.RectifiedFlow()
    res = ds.sample(
        GMM.model(flow), solver, steps, shape=(N, 2), seed=0, dtype=torch.float64, grid="uniform", form="rf"
    )
    d = mmd2(res.samples, reference)
    print(solver, "rf form", steps, "mmd2", d, "threshold", threshold)
    assert d > 5 * threshold


@pytest.mark.parametrize("n", [5, 20])
def test_drop_in_for_ltx_euler_ancestral_rf(n):
    """DiffsolveScheduler.from_config(LTXEulerAncestralRFScheduler's config, flow=True,
    solver="euler-ancestral", form rf) in a pipeline loop (float32 latents, velocity output, the
    network timestep sigma * 1000, one generator passed at every step): the same timesteps, the same
    number of calls and, with the generator's draws the same, the same latents to 1e-5."""
    from diffsolve.integrations.diffusers import DiffsolveScheduler

    sched = S.RectifiedFlow()
    model = GMM3.model(sched)

    def run(s):
        s.set_timesteps(n)
        x = torch.randn(1, 3, generator=torch.Generator().manual_seed(0))
        g, calls = torch.Generator().manual_seed(4), 0
        for t in s.timesteps:
            v = model(x.double(), float(t) / 1000.0).velocity.float()
            calls += 1
            x = s.step(v, t, x, generator=g).prev_sample
        return x.double(), calls, s.timesteps

    ref = LTXEulerAncestralRFScheduler(eta=1.0, s_noise=1.0)
    ours = DiffsolveScheduler.from_config(
        ref.config, solver="euler-ancestral", solver_options={"form": "rf"}, flow=True
    )
    by_object = DiffsolveScheduler.from_config(ref, solver="euler-ancestral", solver_options={"form": "rf"})
    by_object.set_timesteps(n)  # the scheduler object names its class: a flow source without flow=True
    a, ca, ta = run(ref)
    b, cb, tb = run(ours)
    assert torch.equal(by_object.timesteps, tb)
    rel = float((a - b).abs().max() / a.abs().max())
    dt = float((ta - tb).abs().max())
    print("ltx drop-in", n, "calls", ca, cb, "max timestep difference", dt, "relative difference", rel)
    assert ca == cb == n and dt < 1e-3
    assert rel < 1e-5
