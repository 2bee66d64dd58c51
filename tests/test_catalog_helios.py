"""The last diffusers schedulers of catalog section 2 against existing diffsolve entries, each in a
plain diffusers loop (the same network, start, grid and step noise; the same number of model calls):

- HeliosScheduler (Helios video model), one stage at a time: ``euler`` (scheduler_type="euler") or
  ``unipc`` order 2, bh2, data form (scheduler_type="unipc") on rectified flow, the grid being the
  stage's sigmas (linspace(0.999, 0.000999, n) then 0; with stages=1 the shifted
  linspace(1, 1/1000, n + 1)[:-1] then 0) and the network time the stage's own timesteps (an affine
  map of sigma within a stage);
- HeliosDMDScheduler: ``lcm`` on the same flow grid (x0 = x - sigma v, then (1 - sigma') x0 +
  sigma' z), where z is the stage's start latent, the same at every step (the pipeline's
  ``dmd_noisy_tensor``);
- DDPMWuerstchenScheduler (Pernias et al. 2023): ``ddpm`` on the continuous cosine VP schedule
  (VPCosine, s = 0.008), the grid the times of its clamped alphas_cumprod (clamped to [1e-4, 0.9999];
  ``scaler`` warps t); its last step (to t = 0, alphas_cumprod 0.9999) adds no noise;
- UnCLIPScheduler (Karlo, variance_type="fixed_small_log", clip_sample=False, prev_timestep given as
  the Karlo pipeline gives it): ``ddpm`` on VPDiscrete of its squaredcos_cap_v2 table.

The stages themselves (upsampling and re-noising the latents between stages) are the pipeline's,
not a solver step; each stage is one diffsolve run.
"""

import math

import diffusers
import pytest
import torch

import diffsolve as ds

S = ds.schedules
W = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.3


def net(x, k):
    """A smooth time-conditioned stand-in for the network (k: the network's time input)."""
    return torch.tanh(x @ W + torch.as_tensor(k, dtype=torch.float64).reshape(-1)[:1] / 300.0) * 0.5 + 0.1 * x


def rel(a, b) -> float:
    return float((a - b).abs().max() / a.abs().max())


def start(shape=(6, 3), seed=1):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


class Listed:
    """Step noise by step: the i-th listed draw for the step leaving grid[i] (the last index of a
    repeated grid point, whose zero-length steps draw nothing)."""

    def __init__(self, grid, draws):
        self.grid, self.list, self.draws = grid, draws, 0

    def step(self, t, t_next, index=None):
        self.draws += 1
        return self.list[int((self.grid == t).nonzero().max())]


class Same:
    """The same tensor at every step (the DMD scheduler's re-noising with the stage's start)."""

    def __init__(self, z):
        self.z, self.draws = z, 0

    def step(self, t, t_next, index=None):
        self.draws += 1
        return self.z


def ours(solver, schedule, grid, net_times, x_T, noise=None, prediction="velocity", **opts):
    """The solver's run driven by hand; the k-th model call gets the source's k-th network time."""
    k = [0]
    model = ds.DiffusionModel(net, schedule, prediction, time_input=lambda t: net_times[k[0]].expand(t.shape))
    run = ds.get_solver(solver, **opts).run(x_T, grid, noise, schedule=schedule)
    item, calls = next(run), 1
    try:
        while True:
            item = run.send(model(*item[:2]))
            calls += 1
            k[0] += 1
    except StopIteration as stop:
        return stop.value, calls


# ------------------------------------------------------------------------------ Helios
def _helios(kind, solver, stages, shift, stage, n, **opts):
    ref = diffusers.HeliosScheduler(scheduler_type=kind, stages=stages, shift=shift)
    ref.set_timesteps(n, stage_index=stage)
    x, calls = start(), 0
    for t in ref.timesteps:
        x = ref.step(net(x, t), t, x).prev_sample
        calls += 1
    b, cb = ours(solver, S.RectifiedFlow(), ref.sigmas.double(), ref.timesteps.double(), start(), **opts)
    print("Helios", kind, "stages", stages, "shift", shift, "stage", stage, n, "calls", calls, cb, "rel", rel(x, b))
    assert calls == cb == n and rel(x, start()) > 1e-2
    return rel(x, b)


HELIOS = [(3, 1.0, 0), (3, 1.0, 1), (3, 1.0, 2), (1, 1.0, 0), (1, 3.0, 0)]
UNIPC = {"order": 2, "variant": "bh2", "parameterization": "data"}


@pytest.mark.parametrize("stages,shift,stage", HELIOS)
def test_helios_euler_parity(stages, shift, stage):
    """Measured 1.5e-8 to 1.9e-7."""
    for n in (1, 2, 5, 12, 30):
        assert _helios("euler", "euler", stages, shift, stage, n) < 1e-5


@pytest.mark.parametrize("stages,shift,stage", HELIOS[:3])
def test_helios_unipc_parity(stages, shift, stage):
    """The staged grids start at sigma = 0.999: measured 1e-8 to 5e-8."""
    for n in (1, 2, 5, 12, 30):
        assert _helios("unipc", "unipc", stages, shift, stage, n, **UNIPC) < 1e-5


def test_helios_unipc_single_stage_measured_gaps():
    """stages=1 starts at sigma = 1, where the source's alpha = 0 and its log-SNR is -inf: the
    second step's ratio r of log-SNR steps is infinite there, which makes that step first order in
    the source, finite in diffsolve. Measured (shift 1) 1.5e-3 at 5 steps, 2.0e-4 at 12, 3.0e-5 at
    30; (shift 3) 4.6e-6, 5.0e-7, 1.2e-7; 1 and 2 steps (first order only) 1e-8."""
    for n in (1, 2):
        assert _helios("unipc", "unipc", 1, 1.0, 0, n, **UNIPC) < 1e-5
    gaps = [_helios("unipc", "unipc", 1, 1.0, 0, n, **UNIPC) for n in (5, 12, 30)]
    assert gaps[0] < 3e-3 and gaps[1] < 4e-4 and gaps[2] < 6e-5 and gaps[0] > gaps[1] > gaps[2]
    for n in (5, 12, 30):
        assert _helios("unipc", "unipc", 1, 3.0, 0, n, **UNIPC) < 1e-5


@pytest.mark.parametrize("stages,shift,stage", HELIOS)
def test_helios_dmd_is_lcm_with_the_stage_start_as_noise(stages, shift, stage):
    """The DMD step as the Helios pyramid pipeline calls it (cur_sampling_step, dmd_noisy_tensor =
    the stage's start latent, the scheduler's sigmas and timesteps): measured 0 to 3e-8."""
    shape = (1, 6, 1, 1, 3)  # the scheduler reshapes sigma to video latents' 5 dimensions
    for n in (1, 2, 4, 8):
        ref = diffusers.HeliosDMDScheduler(stages=stages, shift=shift)
        ref.set_timesteps(n, stage_index=stage)
        x_T = start(shape)
        z = x_T if stage == 0 else start(shape, seed=2)  # later stages start from re-noised latents
        x, calls = x_T.clone(), 0
        for i, t in enumerate(ref.timesteps):
            kw = {"dmd_noisy_tensor": z, "dmd_sigmas": ref.sigmas, "dmd_timesteps": ref.timesteps}
            x = ref.step(net(x, t), t, x, cur_sampling_step=i, all_timesteps=ref.timesteps, **kw).prev_sample
            calls += 1
        noise = Same(z)
        b, cb = ours("lcm", S.RectifiedFlow(), ref.sigmas.double(), ref.timesteps.double(), x_T, noise)
        print("HeliosDMD", stages, shift, stage, n, "calls", calls, cb, "rel", rel(x, b))
        assert calls == cb == n and noise.draws == n - 1
        assert rel(x, b) < 1e-5 and rel(x, x_T) > 1e-2


# ------------------------------------------------------------------------------ DDPMWuerstchen
def _wuerstchen(scaler, n, zero_last=True, seed=5):
    ref = diffusers.DDPMWuerstchenScheduler(scaler=scaler)
    ref.set_timesteps(n)
    x, g, calls = start(), torch.Generator().manual_seed(seed), 0
    for r in ref.timesteps[:-1]:  # the Würstchen pipelines call the prior at all but the last t
        x = ref.step(net(x, r), r[None], x, generator=g).prev_sample
        calls += 1
    # VPCosine's alpha^2 is Würstchen's unclamped alphas_cumprod: the grid is where it equals the
    # clamped values the source steps between (the clamp at 1e-4 repeats points at the top)
    schedule = S.VPCosine(s=0.008, t_min=0.0, t_max=1.0)
    acp = ref._alpha_cumprod(ref.timesteps.double(), "cpu").double()
    grid = schedule.t_of_log_snr(0.5 * torch.log(acp / (1 - acp))).double()
    assert float((schedule.alpha(grid) ** 2 / acp - 1).abs().max()) < 1e-9
    g = torch.Generator().manual_seed(seed)
    draws = [torch.randn(6, 3, dtype=torch.float64, generator=g) for _ in range(n)]
    if zero_last:
        draws[-1] = torch.zeros(6, 3, dtype=torch.float64)
    b, cb = ours("ddpm", schedule, grid, ref.timesteps.double(), start(), Listed(grid, draws), prediction="eps")
    print("DDPMWuerstchen", scaler, n, "calls", calls, cb, "rel", rel(x, b))
    assert calls == cb == n and rel(x, start()) > 1e-2
    return rel(x, b)


@pytest.mark.parametrize("scaler", [1.0, 1.5, 0.7])
def test_wuerstchen_parity_given_the_same_noise(scaler):
    """Measured 1e-8 to 8e-6 (float32 alphas_cumprod in the source; 200 steps reach the clamp)."""
    for n in (1, 4, 12, 60, 200):
        assert _wuerstchen(scaler, n) < 1e-5


def test_wuerstchen_last_step_noise():
    """The source's last step (to alphas_cumprod 0.9999, not 1) drops its noise; ddpm adds the
    posterior noise there (its std is sqrt(1e-4 beta / (1 - alphas_cumprod)) of the last step's
    start): with that draw replayed the gap is that noise's size, measured 9.3e-5 at 12 steps."""
    gap = _wuerstchen(1.0, 12, zero_last=False)
    assert 3e-5 < gap < 1e-3


# ------------------------------------------------------------------------------ UnCLIP
def _unclip(n, float64_table, seed=5):
    ref = diffusers.UnCLIPScheduler(clip_sample=False)
    ref.set_timesteps(n)
    if float64_table:  # the source's own betas_for_alpha_bar, in float64
        a = [math.cos((i / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(1001)]
        ref.betas = torch.tensor([min(1 - a[i + 1] / a[i], 0.999) for i in range(1000)], dtype=torch.float64)
        ref.alphas, ref.one = 1 - ref.betas, ref.one.double()
        ref.alphas_cumprod = torch.cumprod(ref.alphas, 0)
    ks = [int(k) for k in ref.timesteps]
    x, g = start(), torch.Generator().manual_seed(seed)
    for i, k in enumerate(ks):  # the Karlo pipeline's prev_timestep: the next listed one, at the end t - 1
        x = ref.step(net(x, k), k, x, prev_timestep=ks[i + 1] if i + 1 < n else None, generator=g).prev_sample
    schedule = S.VPDiscrete(alphas_cumprod=ref.alphas_cumprod, zero_snr_floor=1e-12)  # acp[999] = 2.4e-9
    grid = torch.tensor([(k + 1) / 1000 for k in ks] + [0.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    noise = Listed(grid, [torch.randn(6, 3, dtype=torch.float64, generator=g) for _ in range(n)])
    b, cb = ours("ddpm", schedule, grid, torch.tensor(ks, dtype=torch.float64), start(), noise, prediction="eps")
    print("UnCLIP float64" if float64_table else "UnCLIP float32", n, "calls", n, cb, "rel", rel(x, b))
    assert cb == n and noise.draws == n - 1 and rel(x, start()) > 1e-2
    return rel(x, b)


def test_unclip_parity_given_the_same_noise():
    """On the source's table built in float64: measured 3e-16 to 3e-14."""
    for n in (2, 5, 25, 100):
        assert _unclip(n, True) < 1e-5


def test_unclip_float32_last_step_gap():
    """In float32 the source's last step takes beta = betas[0] (4.1284e-5) against 1 -
    alphas_cumprod[0] = 4.1306e-5 (float32 rounding of 1 - beta): its x0 coefficient is 0.99947,
    not 1. Measured 5.3e-4 to 5.7e-4 at 2 to 100 steps."""
    for n in (2, 25, 100):
        assert 1e-4 < _unclip(n, False) < 1e-3


# ------------------------------------------------------------------------------ DiffsolveScheduler
@pytest.mark.parametrize("cls", ["HeliosScheduler", "HeliosDMDScheduler", "DDPMWuerstchenScheduler"])
def test_diffsolve_scheduler_refuses_the_stage_wise_and_wuerstchen_sources(cls):
    """A drop-in would silently step another grid (Helios' stages=1 grid is linspace(1, 1/1000,
    n + 1)[:-1], not FlowMatchEuler's): refused, by the scheduler object and by its class name."""
    from diffsolve.integrations.diffusers import DiffsolveScheduler

    ref = getattr(diffusers, cls)()
    for source in (ref, {**ref.config, "_class_name": cls}):
        with pytest.raises(ValueError, match="not supported"):
            DiffsolveScheduler.from_config(source, solver="euler")


def test_unclip_through_diffsolve_scheduler():
    """DiffsolveScheduler(solver="ddpm") from UnCLIPScheduler: its own timesteps, the same noise
    from the same generator, against the source in float32 with the Karlo pipeline's
    prev_timestep; the gap is the source's float32 last step (test_unclip_float32_last_step_gap):
    measured 5.3e-4 (2 steps), 5.1e-4 (5), 7.3e-4 (25)."""
    from diffsolve.integrations.diffusers import DiffsolveScheduler

    for n in (2, 5, 25):
        ref = diffusers.UnCLIPScheduler(clip_sample=False)
        ref.set_timesteps(n)
        ks = [int(k) for k in ref.timesteps]
        x, g = start(), torch.Generator().manual_seed(5)
        for i, k in enumerate(ks):
            x = ref.step(net(x, k), k, x, prev_timestep=ks[i + 1] if i + 1 < n else None, generator=g).prev_sample
        ours_ = DiffsolveScheduler.from_config(ref, solver="ddpm")
        ours_.set_timesteps(n)
        assert [int(k) for k in ours_.timesteps] == ks
        y, g, calls = start(), torch.Generator().manual_seed(5), 0
        for t in ours_.timesteps:
            y = ours_.step(net(ours_.scale_model_input(y, t), t), t, y, generator=g).prev_sample
            calls += 1
        print("UnCLIP through DiffsolveScheduler", n, "calls", calls, "rel", rel(x, y))
        assert calls == n and 1e-4 < rel(x, y) < 2e-3
