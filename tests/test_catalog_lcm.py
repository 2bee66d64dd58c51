"""lcm and tcd (consistency-model samplers): registry entries, one step by hand, and parity with
diffusers' LCMScheduler / TCDScheduler in a plain diffusers loop (the same oracle model, timesteps as
an explicit grid, diffusers' step noise replayed, the same number of model calls).

How the parity is set up. Our grid is t = (k + 1)/N for diffusers' timesteps k
(VPDiscrete.from_diffusers_config), closed by t_min = 1/N (k = 0). LCMScheduler wraps the model's x0
in the boundary condition c_skip x + c_out x0 (timestep_scaling): with timestep_scaling = 1e4 these
are 1 - c_out, c_skip < 1e-9 at the timesteps used, so diffusers' ``denoised`` is the oracle's x0;
with the default 10 they are ~1e-5 (measured and printed below). TCDScheduler's intermediate
timestep is floor((1 - gamma) k_next); ours is the same without the floor, so the TCD grids are
chosen where the floor is exact (checked)."""

import math

import pytest
import torch
from by_hand import run_by_hand
from diffusers import LCMScheduler, TCDScheduler

import diffsolve as ds
from diffsolve.core.registry import registered

S = ds.schedules
INFO = {i.name: i for i in registered()}
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
GMM3 = ds.models.GaussianMixture([[1.0, -0.5, 0.2], [-1.0, 0.5, 0.0]], 0.4)


def test_registry_entries():
    for name in ("lcm", "tcd"):
        info = INFO[name]
        assert (info.family, info.calls_per_step, info.deterministic) == ("sde", 1, False)
    assert ds.get_solver("lcm").options() == {"from_end": False, "s_noise": 1.0}
    assert ds.get_solver("tcd").options() == {"gamma": 0.3}
    with pytest.raises(ValueError):
        ds.get_solver("tcd", gamma=1.5)


class Replay:
    """A noise source handing out the draws of one generator in order (diffusers' randn_tensor on CPU)."""

    def __init__(self, seed, shape=(6, 3)):
        self.gen, self.shape, self.draws = torch.Generator().manual_seed(seed), shape, 0

    def step(self, t, t_next, index=None):
        self.draws += 1
        return torch.randn(*self.shape, generator=self.gen, dtype=torch.float64)


def _ours(solver, grid, sched, model, x_T, noise, **opts):
    return run_by_hand(ds.get_solver(solver, **opts), x_T, grid, noise, sched, model)


def _diffusers_and_ours(ref, solver, seed=5, timesteps=None, n=None, **opts):
    if timesteps is not None:
        ref.set_timesteps(timesteps=timesteps)
    else:
        ref.set_timesteps(n)
    N = ref.config.num_train_timesteps
    sched = S.VPDiscrete.from_diffusers_config(ref.config)
    model = GMM3.model(sched)
    ks = [int(k) for k in ref.timesteps]
    x_T = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    x, calls, g = x_T.clone(), 0, torch.Generator().manual_seed(seed)
    kw = {"eta": opts["gamma"]} if "gamma" in opts else {}
    for k in ref.timesteps:
        eps = model(x, (int(k) + 1) / N).eps  # scale_model_input is the identity for both
        calls += 1
        x = ref.step(eps, k, x, generator=g, **kw).prev_sample

    grid = torch.tensor([(k + 1) / N for k in ks] + [1 / N], dtype=torch.float64)
    noise = Replay(seed)
    ours, ours_calls = _ours(solver, grid, sched, model, x_T, noise, **opts)
    return ours, x, ours_calls, calls, noise.draws


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_lcm_parity_with_diffusers(n):
    ref = LCMScheduler(num_train_timesteps=1000, timestep_scaling=1e4, clip_sample=False, **SD)
    ours, theirs, ours_calls, calls, draws = _diffusers_and_ours(ref, "lcm", n=n)
    rel = float((ours - theirs).abs().max() / theirs.abs().max())
    print("lcm", n, "timesteps", ref.timesteps.tolist(), "calls", ours_calls, calls, "relative difference", rel)
    assert ours_calls == calls == n and draws == n - 1
    assert rel < 1e-5


def test_lcm_with_diffusers_default_boundary_scaling():
    """diffusers' default timestep_scaling = 10: the boundary condition moves denoised by ~1e-5."""
    for n in (4, 8):
        ref = LCMScheduler(num_train_timesteps=1000, clip_sample=False, **SD)
        ours, theirs, *_ = _diffusers_and_ours(ref, "lcm", n=n)
        rel = float((ours - theirs).abs().max() / theirs.abs().max())
        print("lcm default timestep_scaling", n, "relative difference", rel)
        assert rel < 1e-4


TCD_GRIDS = [[999, 800, 600, 400, 200], [999, 500], [899, 700, 420, 300, 160, 80, 20]]


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("timesteps", TCD_GRIDS)
def test_tcd_parity_with_diffusers(gamma, timesteps):
    ref = TCDScheduler(num_train_timesteps=1000, **SD)
    for k in timesteps[1:] + [0]:  # diffusers' floor is exact on these grids
        assert int(torch.floor((1 - gamma) * torch.tensor(k))) == round((1 - gamma) * k)
    ours, theirs, ours_calls, calls, draws = _diffusers_and_ours(ref, "tcd", timesteps=timesteps, gamma=gamma)
    rel = float((ours - theirs).abs().max() / theirs.abs().max())
    print("tcd gamma", gamma, "timesteps", timesteps, "calls", ours_calls, calls, "relative difference", rel)
    assert ours_calls == calls == len(timesteps)
    assert draws == (len(timesteps) - 1 if gamma > 0 else 0)
    assert rel < 1e-5


def test_one_step_by_hand():
    """Two steps on VPLinear, computed from alpha, sigma and the oracle's x0, eps by hand."""
    sched = S.VPLinear()
    model = GMM3.model(sched)
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    t0, t1, t2 = 0.9, 0.5, 0.2
    grid = torch.tensor([t0, t1, t2], dtype=torch.float64)
    p = model(x, t0)
    a1, s1 = (float(v) for v in sched.at(t1))

    z = Replay(7).step(t0, t1)
    x1 = a1 * p.x0 + s1 * z
    expect = model(x1, t1).x0  # the last step returns x0
    ours, _ = _ours("lcm", grid, sched, model, x, Replay(7))
    assert (ours - expect).abs().max() < 1e-12

    gamma = 0.4
    s = t2 + (1 - gamma) * (t1 - t2)
    a_s, s_s = (float(v) for v in sched.at(s))
    x_s = a_s * p.x0 + s_s * p.eps
    x1 = (a1 / a_s) * x_s + math.sqrt(s1**2 - (a1 / a_s) ** 2 * s_s**2) * z
    p1 = model(x1, t1)
    a2, s2 = (float(v) for v in sched.at(t2))
    expect = a2 * p1.x0 + s2 * p1.eps  # last step: s = t2, no noise
    ours, _ = _ours("tcd", grid, sched, model, x, Replay(7), gamma=gamma)
    assert (ours - expect).abs().max() < 1e-12


@pytest.mark.parametrize("solver", ["lcm", "tcd"])
def test_sample_runs_and_refuses_inversion(solver):
    sched = S.VPLinear()
    res = ds.sample(GMM3.model(sched), solver, 4, shape=(8, 3), seed=0, dtype=torch.float64)
    assert res.samples.shape == (8, 3) and torch.isfinite(res.samples).all()
    assert res.nfe == 4
    with pytest.raises(ValueError, match=solver):
        ds.invert(GMM3.model(sched), solver, res.samples, 4)


def test_tcd_on_diffusers_default_timesteps():
    """On diffusers' own timesteps (20 j - 1) the floor of its intermediate timestep differs from
    ours by < 1 index: a small, measured difference."""
    for n in (4, 8):
        ref = TCDScheduler(num_train_timesteps=1000, **SD)
        ours, theirs, ours_calls, calls, _ = _diffusers_and_ours(ref, "tcd", n=n, gamma=0.3)
        rel = float((ours - theirs).abs().max() / theirs.abs().max())
        print("tcd default timesteps", n, ref.timesteps.tolist(), "relative difference", rel)
        assert ours_calls == calls == n and rel < 1e-2
