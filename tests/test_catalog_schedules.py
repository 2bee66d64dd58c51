"""Grid kinds by the names k-diffusion, ComfyUI and diffusers give them (issue 20): each against its
definition, and against diffusers' sigmas where diffusers has the kind."""

import math

import numpy as np
import pytest
import torch

import diffsolve as ds
from diffsolve.schedules import named_grids as ng

S = ds.schedules
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
NAMED = ("exponential", "polyexponential", "vp", "kl-optimal", "laplace", "beta-sigmas", "linear-quadratic")


def sd():
    return S.VPDiscrete.from_diffusers_config(SD)


def noise_levels(schedule, g):
    return (schedule.sigma(g) / schedule.alpha(g)).to(torch.float64)


def ends(schedule):
    s = noise_levels(schedule, torch.tensor([schedule.t_max, schedule.t_min], dtype=torch.float64))
    return float(s[0]), float(s[1])


SCHEDULES = {
    "sd": sd,
    "vp-linear": lambda: S.VPLinear(),
    "edm": lambda: S.EDM(),
    "flow": lambda: S.RectifiedFlow(t_min=1e-3, t_max=1 - 1e-3),
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("kind", NAMED)
@pytest.mark.parametrize("steps", [1, 2, 7, 10, 50])
def test_shape_ends_monotone(name, kind, steps):
    s = SCHEDULES[name]()
    g = S.make_grid(s, steps, kind)
    assert g.dtype == torch.float64 and g.shape == (steps + 1,)
    assert g[0] == s.t_max and g[-1] == s.t_min
    assert bool((g[1:] < g[:-1]).all())


@pytest.mark.parametrize("kind", ["kl-optimal", "polyexponential", "vp", "beta-sigmas", "linear-quadratic"])
def test_many_steps_and_narrow_ranges_stay_strictly_decreasing(kind):
    for s in (sd(), S.VPLinear(), S.EDM()):
        for steps in (100, 200):
            S.make_grid(s, steps, kind)
        lo, hi = s.t_min + 0.4 * (s.t_max - s.t_min), s.t_min + 0.6 * (s.t_max - s.t_min)
        S.make_grid(s, 200, kind, t_min=lo, t_max=hi)


def test_comfyui_spellings_and_aliases():
    s = sd()
    for comfy, ours in [
        ("kl_optimal", "kl-optimal"),
        ("linear_quadratic", "linear-quadratic"),
        ("beta_sigmas", "beta-sigmas"),
    ]:
        assert S.grid_kind_name(comfy) == ours
        assert torch.equal(S.make_grid(s, 9, comfy), S.make_grid(s, 9, ours))
    # uniform in log(sigma/alpha) is uniform in lambda = -log(sigma/alpha): the log-SNR grid
    assert torch.equal(S.make_grid(s, 9, "exponential"), S.make_grid(s, 9, "log-snr"))
    # polyexponential with rho = 1 is exponential
    assert torch.allclose(S.make_grid(s, 9, "polyexponential"), S.make_grid(s, 9, "exponential"), rtol=1e-12)
    # ComfyUI's beta (quantiles in timestep) is another grid than diffusers' beta sigmas (linear in sigma)
    assert not torch.allclose(S.make_grid(s, 9, "beta"), S.make_grid(s, 9, "beta-sigmas"), rtol=1e-3)


def _closed(kind, r, s_max, s_min):
    """The source definitions, written out with Python floats at the ramp value r = i/(n - 1)."""
    if kind == "polyexponential3":
        return math.exp(math.log(s_min) + (1 - r) ** 3 * (math.log(s_max) - math.log(s_min)))
    if kind == "kl-optimal":
        return math.tan((1 - r) * math.atan(s_max) + r * math.atan(s_min))
    if kind == "laplace":
        x = r
        lmb = 0.0 - 0.5 * math.copysign(1.0, 0.5 - x) * math.log(1 - 2 * abs(0.5 - x) + 1e-5) if x != 0.5 else 0.0
        return min(max(math.exp(lmb), s_min), s_max)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["polyexponential3", "kl-optimal", "laplace"])
def test_closed_form_at_a_few_points(kind):
    s = sd()
    steps = 10
    opts = {"rho": 3.0} if kind == "polyexponential3" else {}
    g = S.make_grid(s, steps, kind.rstrip("3"), **opts)
    lev = noise_levels(s, g)
    s_max, s_min = ends(s)
    for i in (1, 3, 5, 8):
        want = _closed(kind, i / steps, s_max, s_min)
        assert math.isclose(float(lev[i]), want, rel_tol=1e-9), (i, float(lev[i]), want)


def test_vp_is_k_diffusion_get_sigmas_vp():
    """k-diffusion: t = linspace(1, eps_s, n), sigma = sqrt(exp(beta_d t^2/2 + beta_min t) - 1)."""
    beta_d, beta_min, eps_s, n = 19.9, 0.1, 1e-3, 12
    t = np.linspace(1, eps_s, n)
    want = np.sqrt(np.exp(beta_d * t**2 / 2 + beta_min * t) - 1)
    s = S.EDM(sigma_min=float(want[-1]), sigma_max=float(want[0]))  # t = sigma on EDM
    g = S.make_grid(s, n - 1, "vp").numpy()
    assert np.allclose(g, want, rtol=1e-12, atol=0)
    # on VPLinear(0.1, 20) with its own ends it is the uniform grid in t
    v = S.VPLinear()
    assert torch.allclose(S.make_grid(v, 10, "vp"), S.make_grid(v, 10, "uniform"), rtol=1e-10)


def test_linear_quadratic_is_mochi():
    """Mochi's 1 - sigma schedule on a rectified flow with t in [0, 1] (sigma = t)."""
    rf = S.RectifiedFlow()
    for steps in (1, 2, 9, 10, 64):
        m = steps // 2
        thr = 0.025
        if steps == 1:
            want = [1.0, 0.0]
        else:
            lin = [i * thr / m for i in range(m)]
            q = steps - m
            diff = m - thr * steps
            qc = diff / (m * q**2)
            lc = thr / m - 2 * diff / q**2
            c = qc * m**2
            want = [1.0 - x for x in lin + [qc * i**2 + lc * i + c for i in range(m, steps)] + [1.0]]
        g = S.make_grid(rf, steps, "linear-quadratic")
        assert np.allclose(g.numpy(), want, rtol=0, atol=1e-12)


def test_laplace_clamps_and_refuses_repeats():
    s = sd()
    with pytest.raises(ValueError, match="not strictly decreasing"):
        S.make_grid(s, 1000, "laplace")
    assert "laplace" not in S.GRID_KINDS and "laplace" in S.ALL_GRID_KINDS


# ---------------------------------------------------------------- against diffusers
diffusers = pytest.importorskip("diffusers")

MAX_REL: dict[str, float] = {}


@pytest.mark.parametrize(
    "kind,flag",
    [("karras", "use_karras_sigmas"), ("exponential", "use_exponential_sigmas"), ("beta-sigmas", "use_beta_sigmas")],
)
@pytest.mark.parametrize("n", [2, 5, 10, 25, 50])
def test_matches_diffusers_sigmas(kind, flag, n):
    sched = diffusers.EulerDiscreteScheduler(**SD, **{flag: True})
    sched.set_timesteps(n)
    want = sched.sigmas[:-1].to(torch.float64)
    s = sd()
    got = noise_levels(s, S.make_grid(s, n - 1, kind))
    rel = float(((got - want) / want).abs().max())
    MAX_REL[kind] = max(MAX_REL.get(kind, 0.0), rel)
    assert rel < 1e-5, (kind, n, rel)


def test_named_grid_functions_reject_bad_options():
    u = torch.linspace(0, 1, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="rho"):
        ng.polyexponential(u, 10.0, 0.1, rho=0.0)
    with pytest.raises(ValueError, match="beta"):
        S.make_grid(sd(), 5, "laplace", beta=-1.0)
    with pytest.raises(ValueError, match="alpha and beta"):
        S.make_grid(sd(), 5, "beta-sigmas", alpha=0.0)


def test_sample_runs_on_kl_optimal():
    sched = sd()
    model = ds.models.GaussianMixture.gmm_2d().model(sched)
    for kind in ("kl-optimal", "kl_optimal", "vp", "beta-sigmas"):
        out = ds.sample(model, "euler", grid=kind, steps=10, shape=(4, 2), seed=0)
        assert out.samples.shape == (4, 2) and bool(torch.isfinite(out.samples).all())


# ---------------------------------------------------------------- a model's own noise levels
def comfy_table():
    """ComfyUI's ModelSamplingDiscrete sigma table of Stable Diffusion (in float64)."""
    s = sd()
    return ((1 - s.alphas_cumprod) / s.alphas_cumprod).sqrt()


def comfy_sigma(table, tau):
    """ComfyUI's sigma(timestep): log sigma linear between table entries."""
    lo = math.floor(tau)
    hi = min(lo + 1, len(table) - 1)
    w = tau - lo
    return math.exp((1 - w) * math.log(float(table[lo])) + w * math.log(float(table[hi])))


def comfy_reference(kind, steps):
    """The four schedules' definitions (solver_catalog.md section 3: ComfyUI's simple, sgm_uniform,
    normal and ddim_uniform) as formulas on the sigma table, without the trailing 0."""
    table = comfy_table()
    n = len(table)
    if kind == "simple":
        ss = n / steps
        return [float(table[-(1 + int(x * ss))]) for x in range(steps)]
    if kind == "sgm-uniform":
        return [comfy_sigma(table, float(t)) for t in np.linspace(n - 1, 0, steps + 1)[:-1]]
    if kind == "normal":
        return [comfy_sigma(table, float(t)) for t in np.linspace(n - 1, 0, steps)]
    if kind == "ddim-uniform":
        c = max(n // steps, 1)
        return [float(table[x]) for x in range(1, n, c)][::-1]
    raise AssertionError(kind)


COMFY_REL: dict[str, float] = {}


@pytest.mark.parametrize("kind", ["simple", "sgm-uniform", "normal", "ddim-uniform"])
@pytest.mark.parametrize("steps", [1, 4, 10, 20, 50])
def test_comfy_discrete_kinds(kind, steps):
    s = sd()
    if kind == "ddim-uniform" and len(range(1, 1000, 1000 // steps)) != steps:
        with pytest.raises(ValueError, match="ddim-uniform' gives"):
            S.make_grid(s, steps, kind)
        return
    g = S.make_grid(s, steps, kind)
    assert g.shape == (steps + 1,) and g[-1] == 0.0 and bool((g[1:] < g[:-1]).all())
    got = noise_levels(s, g)[:-1].numpy()
    want = np.array(comfy_reference(kind, steps))
    rel = float(np.abs(got / want - 1).max())
    COMFY_REL[kind] = max(COMFY_REL.get(kind, 0.0), rel)
    # table entries exactly; between entries ComfyUI interpolates log sigma, VPDiscrete log alpha
    assert rel < (1e-12 if kind in ("simple", "ddim-uniform") else 2e-3), rel
    # t_min given: the last point is there instead of t = 0
    g2 = S.make_grid(s, steps, kind, t_min=float(g[-2]) / 2)
    assert torch.equal(g2[:-1], g[:-1]) and g2[-1] == float(g[-2]) / 2


def test_comfy_discrete_kinds_need_a_discrete_schedule():
    for kind in ("simple", "sgm_uniform", "normal", "ddim_uniform"):
        with pytest.raises(ValueError, match="needs a VPDiscrete schedule"):
            S.make_grid(S.VPLinear(), 10, kind)
    with pytest.raises(ValueError, match="leave t_max out"):
        S.make_grid(sd(), 10, "simple", t_max=0.9)


def test_ays_tables():
    s = sd()
    # at 10 steps: the table, at diffusers' AysSchedules timesteps, and 0
    for kind, ts in [
        ("ays-sd1", [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]),
        ("ays-sdxl", [999, 845, 730, 587, 443, 310, 193, 116, 53, 13]),
    ]:
        g = S.make_grid(s, 10, kind)
        assert g[-1] == 0.0
        lev = noise_levels(s, g)[:-1].numpy()
        assert np.allclose(lev[1:], ng.AYS_TABLES[kind][1:-1], rtol=1e-9)
        assert np.array_equal(np.round(s.timestep(g[:-1]).numpy()), ts)
        # other step counts: log-linear interpolation of the table (every other point at 20 steps)
        g20 = S.make_grid(s, 20, kind)
        assert np.allclose(noise_levels(s, g20)[2:-1:2].numpy(), ng.AYS_TABLES[kind][1:-1], rtol=1e-9)
        lev5 = noise_levels(s, S.make_grid(s, 5, kind))[1:-1].numpy()
        assert np.allclose(lev5, ng.AYS_TABLES[kind][2:-1:2], rtol=1e-9)
    svd = S.EDM(sigma_min=0.002, sigma_max=700.0)
    g = S.make_grid(svd, 10, "ays_svd")
    assert np.allclose(g[:-1].numpy(), ng.AYS_TABLES["ays-svd"][:-1], rtol=1e-12) and g[-1] == 0.0
    for kind, other in [("ays-sd1", S.VPLinear()), ("ays-sdxl", S.EDM()), ("ays-svd", s)]:
        with pytest.raises(ValueError, match="Align Your Steps' table"):
            S.make_grid(other, 10, kind)
    assert torch.equal(S.make_grid(s, 7, "ays-sd1", t_min=s.t_min)[:-1], S.make_grid(s, 7, "ays-sd1")[:-1])


def test_sample_runs_on_model_kinds():
    sched = sd()
    model = ds.models.GaussianMixture.gmm_2d().model(sched)
    for kind in ("ays-sd1", "simple", "normal"):
        out = ds.sample(model, "euler", grid=kind, steps=10, shape=(4, 2), seed=0)
        assert out.samples.shape == (4, 2) and bool(torch.isfinite(out.samples).all())


def test_cli_takes_the_names():
    import argparse

    from diffsolve.cli.parser import grid_spec

    assert grid_spec("kl_optimal") == "kl-optimal" and grid_spec("ays-sd1") == "ays-sd1"
    with pytest.raises(argparse.ArgumentTypeError, match="invalid grid"):
        grid_spec("betas")
