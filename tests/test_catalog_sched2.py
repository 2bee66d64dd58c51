"""Schedules by name, second part (issue 20): ComfyUI's ``beta``, ``sd-turbo``, diffusers'
``leading`` / ``trailing`` / ``linspace`` timestep spacings, the published ``gits`` and
``optimal-steps`` tables, each against its definition (solver_catalog.md sections 3 and 4) and
against diffusers where diffusers has it; grid parameters as ``(kind, {params})`` pairs; the names
through ds.sample, DiffsolveScheduler(steps_grid=...) and the CLI."""

import math

import numpy as np
import pytest
import torch

import diffsolve as ds
from diffsolve.schedules import named_grids as ng
from diffsolve.schedules import tables

S = ds.schedules
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
NEW = ("beta", "sd-turbo", "leading", "trailing", "linspace", "gits", "optimal-steps")


def sd():
    return S.VPDiscrete.from_diffusers_config(SD)


def levels(schedule, g):
    """sigma/alpha at the grid's times (k-diffusion's, ComfyUI's and diffusers' sigmas)."""
    return (schedule.sigma(g) / schedule.alpha(g)).to(torch.float64)


def table_sigmas(schedule):
    """The discrete model's table of sigma/alpha, as ComfyUI's ModelSamplingDiscrete holds it."""
    acp = schedule.alphas_cumprod
    return ((1 - acp) / acp).sqrt()


def test_names_are_registered_and_take_their_parameters():
    for k in NEW:
        assert k in S.ALL_GRID_KINDS
    assert S.GRID_PARAMS["gits"] == ("coeff", "force") and S.GRID_PARAMS["leading"] == ("steps_offset",)
    assert S.grid_kind_name("optimal_steps") == "optimal-steps" and S.grid_kind_name("SD_Turbo") == "sd-turbo"
    for comfy, ours in [("sgm_uniform", "sgm-uniform"), ("kl_optimal", "kl-optimal"), ("ddim_uniform", "ddim-uniform")]:
        assert S.grid_kind_name(comfy) == ours


# ---------------------------------------------------------------- beta (ComfyUI)
def comfy_beta_reference(steps, alpha=0.6, beta=0.6):
    """ComfyUI's beta scheduler from its definition: timestep indices rint(ppf(1 - i/n) (T - 1)) with
    scipy.stats.beta.ppf, consecutive repeats dropped, looked up in the sigma table (no trailing 0)."""
    from scipy.stats import beta as beta_dist

    table = table_sigmas(sd())
    ts = np.rint(beta_dist.ppf(1 - np.linspace(0, 1, steps, endpoint=False), alpha, beta) * (len(table) - 1))
    out, last = [], None
    for t in ts:
        if t != last:
            out.append(float(table[int(t)]))
        last = t
    return out


@pytest.mark.parametrize("steps", [1, 2, 4, 10, 20, 50, 138])
def test_beta_is_comfyui_beta(steps):
    s = sd()
    g = S.make_grid(s, steps, "beta")
    assert g.shape == (steps + 1,) and g[0] == s.t_max and g[-1] == 0.0 and bool((g[1:] < g[:-1]).all())
    want = np.array(comfy_beta_reference(steps))
    got = levels(s, g)[:-1].numpy()
    assert len(want) == steps
    rel = float(np.abs(got / want - 1).max())
    assert rel < 1e-12, rel  # table entries exactly
    assert np.array_equal(s.timestep(g[:-1]).round().numpy(), ng.comfy_beta(1000, steps).numpy())


def test_beta_parameters_and_repeats():
    s = sd()
    g = S.make_grid(s, 10, ("beta", {"alpha": 0.3, "beta": 0.9}))
    want = np.array(comfy_beta_reference(10, 0.3, 0.9))
    assert float(np.abs(levels(s, g)[:-1].numpy() / want - 1).max()) < 1e-12
    assert torch.equal(g, S.make_grid(s, 10, "beta", alpha=0.3, beta=0.9))
    # Beta(0.6, 0.6) crowds the ends: from 139 steps on, the first quantiles round to the same
    # training step; ComfyUI drops the repeats (fewer steps), we refuse and say how many it gives
    assert len(comfy_beta_reference(139)) < 139
    with pytest.raises(ValueError, match=r"'beta' gives \d+ steps, not 139"):
        S.make_grid(s, 139, "beta")
    # Beta(3, 3) crowds the middle: at 600 steps quantiles round to the same training step; ComfyUI
    # drops the repeats (fewer steps), we refuse and say how many it gives
    assert len(comfy_beta_reference(600, 3.0, 3.0)) < 600
    with pytest.raises(ValueError, match=r"'beta' gives \d+ steps, not 600"):
        S.make_grid(s, 600, ("beta", {"alpha": 3.0, "beta": 3.0}))
    with pytest.raises(ValueError, match="needs a VPDiscrete schedule"):
        S.make_grid(S.VPLinear(), 10, "beta")
    # not diffusers' beta sigmas (linear in sigma): the two differ by far more than round-off
    lb, lbs = levels(s, S.make_grid(s, 10, "beta"))[1:-1], levels(s, S.make_grid(s, 10, "beta-sigmas"))[1:-1]
    assert float((lb / lbs - 1).abs().max()) > 0.1


# ---------------------------------------------------------------- sd-turbo
@pytest.mark.parametrize("steps", [1, 2, 4, 10])
def test_sd_turbo(steps):
    s = sd()
    g = S.make_grid(s, steps, "sd_turbo")
    ts = [999 - 100 * i for i in range(steps)]
    assert np.allclose(s.timestep(g[:-1]).numpy(), ts, rtol=0, atol=1e-9) and g[-1] == 0.0
    want = table_sigmas(s)[ts]
    assert float((levels(s, g)[:-1] / want - 1).abs().max()) < 1e-12


def test_sd_turbo_refusals():
    with pytest.raises(ValueError, match="10 timesteps"):
        S.make_grid(sd(), 11, "sd-turbo")
    with pytest.raises(ValueError, match="1000 training steps"):
        S.make_grid(S.VPDiscrete.from_diffusers_config({**SD, "num_train_timesteps": 500}), 4, "sd-turbo")


# ---------------------------------------------------------------- diffusers' timestep spacings
diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 3, 7, 10, 25, 50, 333])
@pytest.mark.parametrize("offset", [0, 1])
def test_spacings_match_diffusers_timesteps_and_sigmas(spacing, n, offset):
    """The timesteps of DDIMScheduler and EulerDiscreteScheduler.set_timesteps exactly, and Euler's
    sigmas: table entries at integer timesteps (float32 in diffusers: 1e-6); between entries
    (Euler's unrounded linspace) diffusers interpolates sigma linearly, VPDiscrete log alpha (2e-5 of sigma_max)."""
    s = sd()
    params = {"steps_offset": offset} if spacing == "leading" else {}
    g = S.make_grid(s, n, (spacing, params))
    assert g.shape == (n + 1,) and g[-1] == 0.0 and bool((g[1:] < g[:-1]).all())
    ts = s.timestep(g[:-1])

    euler = diffusers.EulerDiscreteScheduler(**SD, timestep_spacing=spacing, steps_offset=offset)
    euler.set_timesteps(n)
    assert float((ts - euler.timesteps.double()).abs().max()) < 1e-9
    rel = float((levels(s, g) - euler.sigmas.double()).abs().max() / euler.sigmas.max())
    integral = bool((euler.timesteps == euler.timesteps.round()).all())
    assert rel < (1e-6 if integral else 2e-5), rel  # measured 6e-8 and 3.6e-6

    ddim = diffusers.DDIMScheduler(**SD, timestep_spacing=spacing, steps_offset=offset)
    ddim.set_timesteps(n)
    gd = S.make_grid(s, n, (spacing, {**params, "rounded": True} if spacing == "linspace" else params))
    assert torch.equal(s.timestep(gd[:-1]).round(), ddim.timesteps.double())
    assert float((s.timestep(gd[:-1]) - ddim.timesteps.double()).abs().max()) < 1e-9


def test_spacing_refusals():
    s = sd()
    with pytest.raises(ValueError, match="steps_offset"):
        S.make_grid(s, 10, ("leading", {"steps_offset": 1.5}))
    with pytest.raises(ValueError, match="not strictly decreasing below 1000"):
        S.make_grid(s, 10, ("leading", {"steps_offset": 150}))  # 900 + 150 is past the table
    with pytest.raises(ValueError, match="'trailing' takes no parameters"):
        S.make_grid(s, 10, ("trailing", {"steps_offset": 1}))
    with pytest.raises(ValueError, match="needs a VPDiscrete schedule"):
        S.make_grid(S.EDM(), 10, "trailing")


# ---------------------------------------------------------------- GITS
def test_gits_table_is_transcribed():
    """15 coefficients 0.80 .. 1.50, rows for 2 .. 20 steps, each from 14.61464119 to 0.02916753; every
    level is Stable Diffusion 1.x's noise level at a timestep j 999/100 (GITS searches a 100-point
    coarse grid): a mistyped digit would leave its level off that grid."""
    assert sorted(tables.GITS_TABLES) == [round(0.80 + 0.05 * i, 2) for i in range(15)]
    s = sd()
    for rows in tables.GITS_TABLES.values():
        assert [len(r) for r in rows] == list(range(3, 22))
        for r in rows:
            assert r[0] == 14.61464119 and r[-1] == 0.02916753 and all(a > b for a, b in zip(r, r[1:]))
    every = torch.tensor(
        sorted({v for rows in tables.GITS_TABLES.values() for r in rows for v in r}), dtype=torch.float64
    )
    j = s.timestep(s.t_of_log_snr(-torch.log(every))) / 9.99
    off = float((j - j.round()).abs().max())
    assert off < 1e-3, off
    # the catalog's example: coeff 1.20, 10 steps
    want = (14.6146, 5.8552, 2.8448, 1.6705, 1.0890, 0.7481, 0.5012, 0.3210, 0.1989, 0.0982, 0.0292)
    assert np.allclose(tables.GITS_TABLES[1.20][8], want, rtol=0, atol=6e-5)


@pytest.mark.parametrize("coeff", [0.8, 1.15, 1.2, 1.5])
def test_gits_rows_and_interpolation(coeff):
    s = sd()
    for steps in (2, 5, 10, 20):
        g = S.make_grid(s, steps, ("gits", {"coeff": coeff}) if coeff != 1.2 else "gits")
        row = tables.GITS_TABLES[coeff][steps - 2]
        assert g.shape == (steps + 1,) and g[0] == s.t_max and g[-1] == 0.0
        assert np.allclose(levels(s, g)[1:-1].numpy(), row[1:-1], rtol=1e-9)
    # past 20 steps: the 20-step row, log-linearly interpolated (at 40 steps every other point is the row)
    row20 = tables.GITS_TABLES[coeff][-1]
    g40 = S.make_grid(s, 40, "gits", coeff=coeff)
    assert np.allclose(levels(s, g40)[2:-1:2].numpy(), row20[1:-1], rtol=1e-9)
    lv = np.log(levels(s, g40)[1:-1:2].numpy())  # odd points: midway in log sigma
    assert np.allclose(lv, 0.5 * (np.log(row20[:-1]) + np.log(row20[1:]))[: len(lv)], rtol=0, atol=1e-9)
    assert g40.shape == (41,) and g40[-1] == 0.0


def test_gits_refusals_and_force():
    s = sd()
    with pytest.raises(ValueError, match="from 2 steps"):
        S.make_grid(s, 1, "gits")
    with pytest.raises(ValueError, match="coeff must be one of"):
        S.make_grid(s, 10, "gits", coeff=1.17)
    for other in (S.VPLinear(), S.EDM(), S.RectifiedFlow(t_min=1e-3, t_max=1 - 1e-3)):
        with pytest.raises(ValueError, match=r"GITS' tables.*force=True"):
            S.make_grid(other, 10, "gits")
    # forced onto EDM (t = sigma): the table's noise levels as they are, from 14.61 (not EDM's 80)
    g = S.make_grid(S.EDM(), 10, ("gits", {"force": True}))
    assert np.allclose(g[:-1].numpy(), tables.GITS_TABLES[1.20][8][:-1], rtol=1e-12) and g[-1] == 0.0
    # ays takes force too
    g = S.make_grid(S.EDM(), 10, "ays-sd1", force=True)
    assert np.allclose(g[:-1].numpy(), tables.AYS_TABLES["ays-sd1"][:-1], rtol=1e-12)


# ---------------------------------------------------------------- OptimalSteps
@pytest.mark.parametrize("model,n", [("flux", 10), ("wan", 20), ("chroma", 40)])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_optimal_steps_tables(model, n, shift):
    """On a flow schedule (shifted or not) the grid's flow sigmas are the published table, the last
    level (0.001) replaced by 0 as ComfyUI does; other step counts interpolate log sigma."""
    rf = S.RectifiedFlow(shift=shift)
    table = tables.OPTIMAL_STEPS_TABLES[model]
    g = S.make_grid(rf, n, ("optimal-steps", {"model": model}))
    sig = rf.sigma(g).numpy()
    assert np.allclose(sig[:-1], table[:-1], rtol=1e-12, atol=1e-15) and sig[-1] == 0.0
    assert bool((g[1:] < g[:-1]).all()) and g.shape == (n + 1,)
    g2 = S.make_grid(rf, 2 * n, "optimal_steps", model=model.upper())
    sig2 = rf.sigma(g2).numpy()
    assert np.allclose(sig2[:-1:2], table[:-1], rtol=1e-12, atol=1e-15)
    mid = np.exp(0.5 * (np.log(table[:-2]) + np.log(table[1:-1])))
    assert np.allclose(sig2[1:-2:2], mid, rtol=1e-12)


def test_optimal_steps_refusals_and_force():
    with pytest.raises(ValueError, match="not a RectifiedFlow"):
        S.make_grid(sd(), 10, "optimal-steps")
    with pytest.raises(ValueError, match="model must be one of flux, wan, chroma"):
        S.make_grid(S.RectifiedFlow(), 10, "optimal-steps", model="sd3")
    # forced on EDM: noise levels sigma/(1 - sigma) of the flow table
    tab = np.array(tables.OPTIMAL_STEPS_TABLES["flux"])
    g = S.make_grid(S.EDM(sigma_max=500.0), 10, "optimal-steps", force=True)
    assert np.allclose(g[:-1].numpy(), (tab / (1 - tab))[:-1], rtol=1e-12)


# ---------------------------------------------------------------- parameters of the formula kinds
def test_parameters_by_pair_and_keyword():
    s = sd()
    for kind, params in [
        ("karras", {"rho": 5.0}),
        ("polyexponential", {"rho": 2.0}),
        ("laplace", {"mu": 0.5, "beta": 0.7}),
        ("vp", {"beta_d": 10.0, "beta_min": 0.5}),
        ("linear-quadratic", {"threshold_noise": 0.05, "linear_steps": 3}),
        ("beta-sigmas", {"alpha": 0.5, "beta": 0.7}),
    ]:
        a = S.make_grid(s, 9, (kind, params))
        assert torch.equal(a, S.make_grid(s, 9, kind, **params))
        assert torch.equal(a, S.make_grid(s, 9, [kind.replace("-", "_"), params]))  # a JSON config's list
        assert not torch.allclose(a, S.make_grid(s, 9, kind), rtol=1e-4)  # the parameter acts
    with pytest.raises(ValueError, match="'karras' takes rho; got 'shift'"):
        S.make_grid(s, 9, ("karras", {"shift": 2.0}))
    with pytest.raises(ValueError, match="'uniform' takes no parameters"):
        S.make_grid(s, 9, "uniform", rho=3.0)
    with pytest.raises(ValueError, match="given twice"):
        S.make_grid(s, 9, ("karras", {"rho": 5.0}), rho=5.0)
    with pytest.raises(ValueError, match="explicit grid takes no grid parameters"):
        S.make_grid(s, None, [0.9, 0.5, 0.1], rho=5.0)


def test_karras_rho_against_diffusers_formula():
    s = sd()
    g = S.make_grid(s, 12, "karras", rho=3.0)
    lev = levels(s, g).numpy()
    hi, lo = lev[0], lev[-1]
    r = np.linspace(0, 1, 13)
    want = (hi ** (1 / 3) + r * (lo ** (1 / 3) - hi ** (1 / 3))) ** 3
    assert np.allclose(lev, want, rtol=1e-9)


def test_vp_parameters_are_k_diffusion_get_sigmas_vp():
    """k-diffusion: t = linspace(1, eps_s, n), sigma = sqrt(exp(beta_d t^2/2 + beta_min t) - 1), with
    its own ends when eps_s is given (here on EDM, where t = sigma)."""
    for beta_d, beta_min, eps_s in [(19.9, 0.1, 1e-3), (10.0, 0.5, 1e-2), (5.0, 1.0, 0.05)]:
        n = 12
        t = np.linspace(1, eps_s, n)
        want = np.sqrt(np.exp(beta_d * t**2 / 2 + beta_min * t) - 1)
        s = S.EDM(sigma_min=0.002, sigma_max=200.0)
        g = S.make_grid(s, n - 1, ("vp", {"beta_d": beta_d, "beta_min": beta_min, "eps_s": eps_s})).numpy()
        assert np.allclose(g, want, rtol=1e-10, atol=0), (beta_d, beta_min)
    with pytest.raises(ValueError, match="leave t_max / t_min out"):
        S.make_grid(S.EDM(), 5, "vp", eps_s=1e-3, t_max=50.0)
    with pytest.raises(ValueError, match="eps_s must be in"):
        S.make_grid(S.EDM(), 5, "vp", eps_s=2.0)


def test_linear_quadratic_parameters_are_mochi():
    rf = S.RectifiedFlow()
    steps, thr, m = 12, 0.1, 4
    lin = [i * thr / m for i in range(m)]
    q = steps - m
    diff = m - thr * steps
    qc, lc = diff / (m * q**2), thr / m - 2 * diff / q**2
    want = [1.0 - x for x in lin + [qc * i**2 + lc * i + qc * m**2 for i in range(m, steps)] + [1.0]]
    g = S.make_grid(rf, steps, "linear_quadratic", threshold_noise=thr, linear_steps=m)
    assert np.allclose(g.numpy(), want, rtol=0, atol=1e-12)


def test_laplace_parameters():
    s = sd()
    g = S.make_grid(s, 10, "laplace", mu=0.3, beta=0.8)
    lev = levels(s, g).numpy()
    s_max, s_min = lev[0], lev[-1]
    for i in (2, 4, 7):
        x = i / 10
        lam = 0.3 - 0.8 * math.copysign(1.0, 0.5 - x) * math.log(1 - 2 * abs(0.5 - x) + 1e-5)
        assert math.isclose(lev[i], min(max(math.exp(lam), s_min), s_max), rel_tol=1e-9)


# ---------------------------------------------------------------- through ds.sample, the scheduler, the CLI
def test_sample_takes_the_new_kinds():
    s = sd()
    gmm = ds.models.GaussianMixture.gmm_2d()
    for grid, steps in [
        ("beta", 10),
        ("sd-turbo", 4),
        (("leading", {"steps_offset": 1}), 10),
        ("trailing", 10),
        ("linspace", 10),
        ("gits", 10),
        (("gits", {"coeff": 0.9}), 25),
        (("karras", {"rho": 5}), 10),
    ]:
        out = ds.sample(gmm.model(s), "euler", grid=grid, steps=steps, shape=(4, 2), seed=0)
        assert torch.equal(out.grid, S.make_grid(s, steps, grid)) and out.nfe_per_sample.tolist() == [steps] * 4
        assert bool(torch.isfinite(out.samples).all())
    rf = S.RectifiedFlow()
    out = ds.sample(gmm.model(rf), "euler", grid=("optimal-steps", {"model": "wan"}), steps=20, shape=(4, 2), seed=0)
    assert np.allclose(out.grid[:-1].numpy(), tables.OPTIMAL_STEPS_TABLES["wan"][:-1]) and out.grid[-1] == 0.0


def _scheduler_timesteps(steps_grid, n, **cfg):
    from diffsolve.integrations.diffusers import DiffsolveScheduler

    sch = DiffsolveScheduler(solver="euler", steps_grid=steps_grid, **{**SD, **cfg})
    sch.set_timesteps(n)
    return sch


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_scheduler_steps_grid_lists_diffusers_timesteps(spacing):
    """DiffsolveScheduler(steps_grid=spacing) lists the timesteps EulerDiscreteScheduler lists, and the
    same sigmas (one model call per timestep)."""
    for n in (4, 10, 25):
        ref = diffusers.EulerDiscreteScheduler(**SD, timestep_spacing=spacing, steps_offset=1)
        ref.set_timesteps(n)
        grid = ("leading", {"steps_offset": 1}) if spacing == "leading" else spacing
        sch = _scheduler_timesteps(grid, n)
        assert len(sch.timesteps) == n
        assert float((sch.timesteps.double() - ref.timesteps.double()).abs().max()) < 1e-3
        rel = float((sch.sigmas.double() - ref.sigmas.double()).abs().max() / ref.sigmas.max())
        assert rel < (1e-6 if spacing != "linspace" else 2e-5), rel


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_parity_with_euler_discrete_in_a_plain_loop(spacing):
    """EulerDiscreteScheduler with timestep_spacing in a plain diffusers loop on the Gaussian oracle's
    eps, against DiffsolveScheduler(solver="euler", steps_grid=spacing) in the same loop and against
    ds.sample("euler", grid=spacing): 1e-5 relative, the same number of model calls. Each loop starts
    from the same x_T in its own variable: Euler's x/alpha, DiffsolveScheduler's x (its
    init_noise_sigma is 1)."""
    from diffsolve.integrations.diffusers import DiffsolveScheduler

    s = sd()
    gauss = ds.models.GaussianMixture([[0.5, -1.0, 2.0, 0.0]], [[0.5, 1.0, 0.2, 2.0]])
    model = gauss.model(s)
    grid = ("leading", {"steps_offset": 1}) if spacing == "leading" else spacing
    for n in (10, 25):
        t0 = float(S.make_grid(s, n, grid)[0])
        x_T = gauss.marginal(t0, s, None).sample(16, torch.Generator().manual_seed(3))

        def loop(sch, y, n=n):
            sch.set_timesteps(n)
            calls = 0
            for t in sch.timesteps:
                eps = model(sch.scale_model_input(y, t), float(s.t_of_timestep(float(t)))).eps
                calls += 1
                y = sch.step(eps, t, y).prev_sample
            return y, calls

        ref = diffusers.EulerDiscreteScheduler(**SD, timestep_spacing=spacing, steps_offset=1)
        a, ca = loop(ref, x_T / s.at(t0)[0])
        ours = DiffsolveScheduler(solver="euler", steps_grid=grid, **SD)
        ours.set_timesteps(n)
        assert float(ours.init_noise_sigma) == 1.0
        b, cb = loop(ours, x_T)
        res = ds.sample(model, "euler", grid=grid, steps=n, x_T=x_T)
        r1 = float((a - b).abs().max() / a.abs().max())
        r2 = float((a - res.samples).abs().max() / a.abs().max())
        print(spacing, n, "relative difference: scheduler", f"{r1:.1e}", "ds.sample", f"{r2:.1e}")
        assert r1 < 1e-5 and r2 < 1e-5, (r1, r2)
        assert ca == cb == res.nfe == n


def test_scheduler_takes_model_kinds_and_pairs():
    s = sd()
    for grid, n in [("gits", 10), (("gits", {"coeff": 0.85}), 12), ("beta", 10), ("sd_turbo", 4), ("ays-sd1", 10)]:
        sch = _scheduler_timesteps(grid, n)
        want = s.timestep(S.make_grid(s, n, grid)[:-1])
        assert len(sch.timesteps) == n
        assert float((sch.timesteps.double() - want).abs().max()) < 1e-3
    # a JSON round trip keeps the pair (as a list)
    from diffsolve.integrations.diffusers import DiffsolveScheduler

    sch = _scheduler_timesteps(("karras", {"rho": 5.0}), 10)
    back = DiffsolveScheduler.from_config(dict(sch.config))
    back.set_timesteps(10)
    assert torch.equal(back.timesteps, sch.timesteps)


def test_scheduler_optimal_steps_on_a_flow_config():
    """On FlowMatchEuler's config (shift 3): the listed sigmas are the published table (and 0)."""
    from diffsolve.integrations.diffusers import DiffsolveScheduler

    sch = DiffsolveScheduler(
        solver="euler",
        steps_grid=("optimal-steps", {"model": "flux"}),
        flow=True,
        source="FlowMatchEulerDiscreteScheduler",
    )
    sch.set_timesteps(10)
    table = tables.OPTIMAL_STEPS_TABLES["flux"]
    assert np.allclose(sch.sigmas.double().numpy()[:-1], table[:-1], rtol=1e-6) and float(sch.sigmas[-1]) == 0.0


def test_cli_grid_with_parameters(tmp_path, monkeypatch):
    import argparse
    import json

    from diffsolve import cli
    from diffsolve.cli import models as cli_models
    from diffsolve.cli.parser import grid_spec

    assert grid_spec("karras:rho=5") == ("karras", {"rho": 5})
    assert grid_spec("gits:coeff=1.15:force=true") == ("gits", {"coeff": 1.15, "force": True})
    assert grid_spec("optimal_steps:model=wan") == ("optimal-steps", {"model": "wan"})
    assert grid_spec("sgm_uniform") == "sgm-uniform" and grid_spec("beta") == "beta"
    with pytest.raises(argparse.ArgumentTypeError, match="'karras' takes rho; got 'shift'"):
        grid_spec("karras:shift=2")
    with pytest.raises(argparse.ArgumentTypeError, match="KEY=VALUE"):
        grid_spec("karras:5")

    monkeypatch.setitem(
        cli_models.MODELS,
        "gmm-sd",
        lambda device="cpu", dtype=torch.float32: cli_models.Target(
            ds.models.GaussianMixture.gmm_2d().model(sd()), (2,)
        ),
    )
    for i, (grid, steps) in enumerate(
        [("trailing", 10), ("beta", 10), ("leading:steps_offset=1", 10), ("gits:coeff=0.9", 8), ("sd-turbo", 4)]
    ):
        out = tmp_path / f"r{i}"
        rc = cli.main(
            ["sample", "--out", str(out), "--no-progress", "--model", "gmm-sd", "--solver", "euler"]
            + ["--num-samples", "2", "--steps", str(steps), "--grid", grid]
        )
        assert rc == 0, grid
        m = json.loads((out / "manifest.json").read_text())
        want = S.make_grid(sd(), steps, grid_spec(grid))
        assert np.allclose(m["grid"], want.tolist(), rtol=1e-12) and m["grid_kind"] == grid.split(":")[0]
    # a refusal is the user's to fix: exit code 2
    assert (
        cli.main(["sample", "--out", str(tmp_path / "bad"), "--no-progress", "--model", "gmm-2d", "--grid", "gits"])
        == 2
    )
