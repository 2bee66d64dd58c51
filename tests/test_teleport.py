"""Analytical teleportation (issue 21; Wang & Vastola 2024): a Gaussian's exact probability-flow map
carries x_T to a hand-over time at no model call, a solver runs from there, and optimize_grid
searches the hand-over time."""

from __future__ import annotations

import json

import pytest
import torch

import diffsolve as ds
from diffsolve.core.noise import NoiseSource

S = ds.schedules
G = torch.Generator().manual_seed(0)
A = torch.randn(3, 3, dtype=torch.float64, generator=G)
GAUSS = ds.models.Gaussian(torch.tensor([0.5, -1.0, 0.25], dtype=torch.float64), A @ A.T + 0.1 * torch.eye(3))


@pytest.mark.parametrize("schedule", [S.VPLinear(), S.RectifiedFlow(), S.VE()], ids=["vp", "flow", "ve"])
def test_the_flow_map_is_the_probability_flow_ode_of_the_gaussian(schedule):
    """Against 400 dpmpp-3s log-SNR steps of the Gaussian's own exact denoiser, from t_max to t = 0.3
    and on to the end: agreement to 1e-7 relative."""
    model = GAUSS.model(schedule)
    lo, hi = schedule.time_range
    top = hi if schedule.alpha(torch.tensor(hi)) > 0 else hi - 1e-3  # the flow's alpha = 0 end: just inside
    noise = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x_T = schedule.prior((16, 3), noise=noise, t=top)
    mid = 0.3 * (hi - lo) + lo
    ode = ds.sample(model, "dpmpp-3s", 400, x_T=x_T, grid="log-snr", t_max=top, t_min=mid)
    exact = GAUSS.flow_map(x_T, top, mid, schedule)
    rel = float((ode.samples - exact).norm() / exact.norm())
    print(f"{schedule!r}: relative {rel:.2e}")
    assert rel < 1e-7


def test_the_denoiser_is_the_one_component_mixtures_for_a_diagonal_covariance():
    stds = torch.tensor([0.3, 0.7, 1.1], dtype=torch.float64)
    mean = torch.tensor([1.0, -0.5, 0.2], dtype=torch.float64)
    gauss, gmm = ds.models.Gaussian(mean, torch.diag(stds**2)), ds.models.GaussianMixture(mean[None], stds[None])
    x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    t = torch.linspace(0.1, 0.9, 8, dtype=torch.float64)
    assert torch.allclose(gauss.denoise(x, t, S.VPLinear()), gmm.denoise(x, t, S.VPLinear()), atol=1e-12, rtol=0)


def test_from_samples_recovers_the_moments_and_refuses_bad_input():
    x = (
        GAUSS.mean
        + torch.randn(20000, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        @ torch.linalg.cholesky(GAUSS.cov).T
    )
    fit = ds.models.Gaussian.from_samples(x)
    assert torch.allclose(fit.mean, GAUSS.mean, atol=0.05) and torch.allclose(fit.cov, GAUSS.cov, atol=0.1)
    assert (
        fit.fingerprint() != GAUSS.fingerprint()
        and GAUSS.fingerprint() == ds.models.Gaussian(GAUSS.mean, GAUSS.cov).fingerprint()
    )
    with pytest.raises(ValueError, match="positive semi-definite"):
        ds.models.Gaussian(torch.zeros(2), torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
    with pytest.raises(ValueError, match="cov must be a 2 x 2"):
        ds.models.Gaussian(torch.zeros(2), torch.eye(3))
    with pytest.raises(ValueError, match="shrinkage"):
        ds.models.Gaussian.from_samples(x, shrinkage=2.0)


def test_sample_teleports_at_no_model_call_and_on_gaussian_data_is_exact():
    """The run from a teleport is the run from the Gaussian's flow map of x_T, whose own agreement
    with the ODE is tested above; on Gaussian data it ends within the solver's error of the exact
    sample (40 dpmpp-3m log-SNR steps from t = 0.2: 2.5e-3, the steps' error; 160: 1.6e-4). The
    calls are the steps'; seeded noise is drawn at the schedule's t_max, as an x_T given there."""
    sched = S.VPLinear()
    model = GAUSS.model(sched)
    noise = torch.randn(32, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    x_T = sched.prior((32, 3), noise=noise, t=sched.t_max)
    res = ds.sample(model, "dpmpp-3m", 160, x_T=x_T, t_max=0.2, teleport=GAUSS)
    by_hand = ds.sample(model, "dpmpp-3m", 160, x_T=GAUSS.flow_map(x_T, sched.t_max, 0.2, sched), t_max=0.2)
    assert torch.equal(res.samples, by_hand.samples)
    exact = GAUSS.flow_map(x_T, sched.t_max, float(res.grid[-1]), sched)
    seeded = ds.sample(model, "dpmpp-3m", 40, shape=(32, 3), seed=0, t_max=0.2, teleport=GAUSS, dtype=torch.float64)
    drawn = sched.prior((32, 3), noise=NoiseSource((32, 3), seeds=0, dtype=torch.float64).randn(), t=sched.t_max)
    assert torch.equal(seeded.samples, ds.sample(model, "dpmpp-3m", 40, x_T=drawn, t_max=0.2, teleport=GAUSS).samples)
    assert res.nfe == 160 and res.stats["teleport"] == {"from": sched.t_max, "to": 0.2}
    err = float((res.samples - exact).abs().max())
    print(f"teleport + 160 steps against the exact flow: {err:.2e}")
    assert err < 5e-4
    with pytest.raises(ValueError, match="must be below the schedule's t_max"):
        ds.sample(model, "dpmpp-3m", 4, shape=(2, 3), teleport=GAUSS)
    with pytest.raises(TypeError, match=r"teleport must be a diffsolve\.models\.Gaussian"):
        ds.sample(model, "dpmpp-3m", 4, shape=(2, 3), t_max=0.5, teleport="gaussian")


def test_optimize_grid_searches_the_hand_over_and_the_grid_needs_its_gaussian(tmp_path):
    """A mixture whose components overlap is close to its moment-matched Gaussian at high noise: the
    search hands over below t_max, with a held-out error no worse than its fit without a teleport
    (the no-teleport start is among those searched); the saved grid records the hand-over and is
    refused without its Gaussian."""
    means = torch.tensor([[0.4, 0.2], [-0.3, -0.5], [-0.4, 0.3]], dtype=torch.float64)
    gmm = ds.models.GaussianMixture(means, 0.5)
    samples = gmm.sample(20000, generator=torch.Generator().manual_seed(4))
    gauss = ds.models.Gaussian.from_samples(samples)
    model = gmm.model(S.VPLinear())
    plain = ds.optimize_grid(model, "dpmpp-2m", 3, shape=(64, 2), candidates=20)
    tele = ds.optimize_grid(model, "dpmpp-2m", 3, shape=(64, 2), candidates=20, teleport=gauss)
    rec = tele.search["tried"][0]["teleport"]
    print(
        f"hand-over {tele.teleport}; fit errors by start {rec['fit_errors']}; held-out {tele.heldout_error:.3g} against {plain.heldout_error:.3g}"
    )
    assert len(rec["fit_errors"]) > 1 and tele.teleport is not None and tele.grid[0] < S.VPLinear().t_max
    assert tele.teleport["gaussian"] == gauss.fingerprint()
    assert tele.heldout_error < plain.heldout_error
    path = tele.save(tmp_path / "g.json")
    with pytest.raises(ValueError, match=r"pass teleport=the diffsolve\.models\.Gaussian"):
        ds.sample(model, "dpmpp-2m", grid=str(path), shape=(4, 2), seed=0)
    with pytest.raises(ValueError, match="fitted without a teleport"):
        ds.sample(model, "dpmpp-2m", grid=plain, shape=(4, 2), seed=0, teleport=gauss)
    res = ds.sample(model, "dpmpp-2m", grid=str(path), shape=(4, 2), seed=0, teleport=gauss)
    by_hand = ds.sample(model, "dpmpp-2m", grid=tele.grid, shape=(4, 2), seed=0, teleport=gauss)
    assert res.nfe == 3 and torch.equal(res.samples, by_hand.samples)
    from diffsolve.integrations.diffusers import DiffsolveScheduler

    with pytest.raises(ValueError, match="a diffusers pipeline cannot run"):
        DiffsolveScheduler(solver="dpmpp-2m", steps_grid=str(path))
    with pytest.warns(UserWarning, match="another Gaussian"):
        ds.sample(
            model, "dpmpp-2m", grid=tele, shape=(4, 2), seed=0, teleport=GAUSS.__class__(torch.zeros(2), torch.eye(2))
        )


def test_cli_fits_a_teleport_grid_for_a_shipped_model_and_samples_with_it(tmp_path, capsys):
    """`diffsolve optimize-grid --teleport` hands over from the training data's Gaussian
    (ds.pretrained.gaussian); `diffsolve sample --grid FILE` takes the Gaussian along; a model with no
    shipped data is refused with the flag named."""
    from diffsolve import cli

    gauss = ds.pretrained.gaussian("digits-vp")
    assert gauss.dim == 256 and gauss.event_shape == (1, 16, 16)
    out = tmp_path / "g.json"
    argv = ["optimize-grid", "--model", "digits-vp", "--steps", "3", "--samples", "8", "--candidates", "8"]
    assert cli.main([*argv, "--teleport", "--no-refine", "--out", str(out)]) == 0
    art = ds.OptimizedGrid.load(out)
    assert len(art.search["tried"][0]["teleport"]["fit_errors"]) > 1
    s = tmp_path / "s"
    assert cli.main(["sample", "--model", "digits-vp", "--grid", str(out), "--num-samples", "2", "--out", str(s)]) == 0
    assert json.loads((s / "manifest.json").read_text())["nfe"] == 3
    capsys.readouterr()
    assert (
        cli.main(["optimize-grid", "--model", "gmm-2d", "--steps", "2", "--teleport", "--out", str(tmp_path / "h")])
        == 2
    )
    assert "--teleport needs a shipped model" in capsys.readouterr().err
