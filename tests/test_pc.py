"""Predictor-corrector samplers (Score-SDE): step size by hand, moments, PC against predictor-only."""

import pytest
import torch

import diffsolve as ds
from diffsolve.metrics import mmd2, sliced_wasserstein
from diffsolve.solvers.sde.pc import langevin_step_size

GAUSS = ds.models.GaussianMixture([[1.0] * 16], 0.5)


def test_langevin_step_size_by_hand():
    score = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    z = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    # sample 0: |z| = 1, |s| = 5 -> 2 (0.16 / 5)^2; sample 1: |z| = 2, |s| = 2 -> 2 (0.16)^2
    eps = langevin_step_size(score, z, 0.16, per_sample=True)
    assert torch.allclose(eps.flatten(), torch.tensor([2 * (0.16 / 5) ** 2, 2 * 0.16**2]))
    # Score-SDE: norms averaged over the batch first: |z| = 1.5, |s| = 3.5
    eps = langevin_step_size(score, z, 0.16)
    assert torch.allclose(eps.flatten(), torch.full((2,), 2 * (0.16 * 1.5 / 3.5) ** 2))


@pytest.mark.parametrize("predictor", ["euler-maruyama", "reverse-diffusion", "ancestral"])
@pytest.mark.parametrize("corrector", ["langevin", "ald", "none"])
def test_pc_reaches_the_target_moments(predictor, corrector):
    sched = ds.schedules.VE(sigma_max=20.0)
    steps = 200 if corrector == "none" else 100  # equal NFE
    res = ds.sample(
        GAUSS.model(sched),
        "pc",
        steps,
        shape=(2000, 16),
        seed=0,
        dtype=torch.float64,
        predictor=predictor,
        corrector=corrector,
        snr=0.1,
    )
    assert res.nfe == 200
    target = GAUSS.marginal(sched.t_min, sched)
    assert (res.samples.mean(0) - target.means[0]).abs().max() < 0.06
    var = res.samples.var(0).mean()
    assert abs(float(var) / float(target.stds[0, 0] ** 2) - 1) < 0.08, float(var)


def test_ancestral_predictor_is_the_ddpm_step():
    sched = ds.schedules.VPLinear()
    model = GAUSS.model(sched)
    x_T = torch.randn(4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = ds.sample(model, "pc", 10, x_T=x_T, seed=1, predictor="ancestral", corrector="none", denoise=False)
    b = ds.sample(model, "ddpm", 10, x_T=x_T, seed=1)
    assert (a.samples - b.samples).abs().max() < 1e-12


def test_pc_option_errors():
    with pytest.raises(ValueError, match="predictor must be one of"):
        ds.get_solver("pc", predictor="heun")
    with pytest.raises(ValueError, match="corrector must be one of"):
        ds.get_solver("pc", corrector="hmc")
    with pytest.raises(ValueError, match="needs a corrector"):
        ds.get_solver("pc", predictor="none", corrector="none")


def test_corrector_beats_predictor_only_at_equal_nfe():
    """VE with sigma_max = 1 on the 2-D mixture of radius 2: the prior N(0, I) is not p_{t_max}, and a
    predictor alone carries that error to the end whatever its step count; Langevin correction pulls
    every level back towards p_t (Score-SDE's reason for correctors). Equal NFE = 100, one shared
    exact reference, so the comparison is paired (seed-to-seed spread of these MMDs is ~1e-4)."""
    gmm = ds.models.GaussianMixture.gmm_2d()
    sched = ds.schedules.VE(sigma_max=1.0)
    n = 2000
    ref = gmm.marginal(sched.t_min, sched).sample(n, torch.Generator().manual_seed(7))
    kw = dict(shape=(n, 2), seed=0, dtype=torch.float64)
    model = gmm.model(sched)
    p_rd = ds.sample(model, "pc", 100, corrector="none", **kw)
    p_em = ds.sample(model, "pc", 100, predictor="euler-maruyama", corrector="none", **kw)
    pc = ds.sample(model, "pc", 50, corrector="langevin", snr=0.16, **kw)
    assert p_rd.nfe == p_em.nfe == pc.nfe == 100
    d = {k: mmd2(r.samples, ref) for k, r in (("rd", p_rd), ("em", p_em), ("pc", pc))}
    w = {k: sliced_wasserstein(r.samples, ref) for k, r in (("rd", p_rd), ("em", p_em), ("pc", pc))}
    print("mmd2", d, "sliced W", w)
    assert d["pc"] < min(d["rd"], d["em"]) - 1e-3
    assert w["pc"] < min(w["rd"], w["em"])


@pytest.mark.parametrize("name", ["subvp", "ouve"])
def test_pc_on_subvp_and_ouve(name):
    """sub-VP with Score-SDE's default PC; OUVE (mean-reverting towards mu) with SGMSE's sampler:
    reverse diffusion + annealed Langevin, snr 0.5."""
    if name == "subvp":
        sched, mu, opts = ds.schedules.SubVP(), None, {}
    else:
        sched, mu, opts = (
            ds.schedules.OUVE(),
            torch.linspace(-1.0, 1.0, 16, dtype=torch.float64),
            {"corrector": "ald", "snr": 0.5},
        )
    res = ds.sample(
        GAUSS.model(sched),
        "pc",
        100,
        shape=(2000, 16),
        seed=0,
        dtype=torch.float64,
        mu=mu,
        predictor="reverse-diffusion",
        **opts,
    )
    target = GAUSS.marginal(sched.t_min, sched, mu=mu)
    err_mean = float((res.samples.mean(0) - target.means[0]).abs().max())
    ratio = float(res.samples.var(0).mean() / (target.stds[0] ** 2).mean())
    print(name, "max mean error", err_mean, "variance ratio", ratio)
    assert err_mean < 0.06 and abs(ratio - 1) < 0.08
