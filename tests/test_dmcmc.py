"""Denoising MCMC (dmcmc): estimators, the window rule and NFE count, and the law on an oracle."""

import math

import pytest
import torch

import diffsolve as ds
from diffsolve.metrics import mmd2
from diffsolve.samplers import ClassifierNoiseLevel, DenoiserNoiseLevel, ExactNoiseLevel

N = 1500  # = conftest.GMM_N (the threshold and reference fixtures)
GMM = ds.models.GaussianMixture.gmm_2d()
VP = ds.schedules.VPLinear()


def test_exact_estimator_on_a_gaussian_by_hand():
    """Data N(0, s0^2 I) under VE: log p_k(x) = -|x|^2 / (2 (s0^2 + sigma_k^2)) - D/2 log(s0^2 + sigma_k^2),
    maximised at sigma_k^2 = |x|^2 / D - s0^2 (clipped to the ladder)."""
    ve, s0, d = ds.schedules.VE(), 0.5, 64
    oracle = ds.models.GaussianMixture(torch.zeros(1, d), s0)
    times = ds.schedules.make_grid(ve, 999, "log-snr")
    sig = ve.sigma(times)
    x = torch.randn(6, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x * torch.tensor([0.3, 0.6, 1.0, 3.0, 10.0, 100.0], dtype=torch.float64)[:, None]
    k = ExactNoiseLevel(oracle).levels(x, None, times, ve, None)
    target = (x.pow(2).mean(1) - s0**2).clamp_min(0).sqrt()
    for i in range(6):
        lp = -x[i].pow(2).sum() / (2 * (s0**2 + sig**2)) - d / 2 * torch.log(s0**2 + sig**2)
        assert int(k[i]) == int(lp.argmax())
        if sig[-1] < target[i] < sig[0]:  # inside the ladder: the nearest level to the closed form
            assert abs(math.log(float(sig[k[i]]) / float(target[i]))) < 0.02
        else:
            assert int(k[i]) == (0 if target[i] >= sig[0] else len(times) - 1)


def test_denoiser_estimator_reads_the_noise_level():
    """Training-free: for x truly at level k the estimate is within a few levels when the data fill few
    of the dimensions (here 8 of 256, like an image manifold), so that the denoiser's residual is the
    noise. For full-rank data it is not (for N(0, s0^2 I): residual^2 / D = sigma^4 / (s0^2 + sigma^2)),
    which the test pins down too."""
    d = 256
    stds = torch.cat([torch.full((8,), 0.5), torch.full((d - 8,), 1e-3)])[None]
    oracle = ds.models.GaussianMixture(torch.zeros(1, d), stds)
    full = ds.models.GaussianMixture(torch.zeros(1, d), 0.5)
    times = ds.schedules.make_grid(VP, 99, "log-snr")
    g = torch.Generator().manual_seed(1)
    for k_true in (50, 75, 90):  # sigma/alpha 1.2, 0.11, 0.025 (near t_max, VP's sigma is ~1 at every level)
        t = float(times[k_true])
        for data in (oracle, full):
            x = data.marginal(t, VP).sample(8, g)
            k = DenoiserNoiseLevel().levels(x, data.model(VP)(x, t), times, VP, None)
            if data is oracle:
                assert (k - k_true).abs().max() <= 3, (k_true, k.tolist())
            elif k_true > 50:  # full rank, sigma well below s0: far too low a noise level
                assert (k - k_true).min() >= 9, (k_true, k.tolist())  # (99 is the last level)


def test_classifier_estimator_checks_its_ladder():
    with pytest.raises(ValueError, match="descending"):
        ClassifierNoiseLevel(lambda x: x, [0.1, 0.5])
    est = ClassifierNoiseLevel(lambda x: torch.stack([x[:, 0], -x[:, 0], 0 * x[:, 0]], 1), [1.0, 0.5, 0.1])
    assert est.levels(torch.tensor([[2.0], [-2.0]]), None, est.times, VP, None).tolist() == [0, 1]


def test_window_start_times_and_nfe_count():
    """Each output is integrated from the lowest level of its window (strict, window includes its
    start); NFE per output is n_skip + integrator calls + 1, the burn-in lands on a chain's first output."""
    res = ds.sample(
        GMM.model(VP),
        "dmcmc",
        shape=(40, 2),
        seed=0,
        dtype=torch.float64,
        estimator=ExactNoiseLevel(GMM),
        eta=0.1,
        n_skip=3,
        integrator="heun",
        integrator_steps=3,
        rounds=4,
        burn_in=5,
        burn_in_steps=4,
        return_trajectory=True,
    )
    st = res.stats
    assert st["chains"] == 10 and st["burn_in_nfe"] == 2 * 4 + 5
    assert set(st["nfe_per_output"].tolist()) <= {3 + 6 + 1, 3 + 0 + 1}  # heun 3 steps = 6 calls
    first = torch.arange(0, 40, 4)
    assert torch.equal(res.nfe_per_sample[first], st["nfe_per_output"][first] + st["burn_in_nfe"])
    rest = torch.tensor([i for i in range(40) if i % 4])
    assert torch.equal(res.nfe_per_sample[rest], st["nfe_per_output"][rest])
    # the start times are levels of the ladder, and no later than the window's first state allows
    ladder = ds.schedules.make_grid(VP, 999, "log-snr")
    assert all(bool((ladder - t).abs().min() < 1e-12) for t in st["start_time"].tolist())


def test_beats_the_integrator_from_noise_at_equal_nfe(threshold, reference):
    """GaussianMixture oracle, exact noise-level posterior, ~10 NFE per output (the paper's count):
    dmcmc + ddpm (3 Langevin + 6 ancestral steps + Tweedie) against 10 ancestral steps from noise."""
    model = GMM.model(VP)
    base = ds.sample(model, "ddpm", 10, shape=(N, 2), seed=0, dtype=torch.float64)
    res = ds.sample(
        model,
        "dmcmc",
        shape=(N, 2),
        seed=0,
        dtype=torch.float64,
        estimator=ExactNoiseLevel(GMM),
        eta=0.1,
        n_skip=3,
        integrator="ddpm",
        integrator_steps=6,
        rounds=15,
    )
    per_output = res.stats["nfe_per_output"].double().mean()
    d_base, d_mc = mmd2(base.samples, reference), mmd2(res.samples, reference)
    print(
        f"mmd2: ddpm 10 steps {d_base:.2e}, dmcmc {d_mc:.2e} at {per_output:.2f} NFE per output "
        f"({res.nfe_per_sample.double().mean():.2f} with the burn-in); threshold {threshold:.2e}"
    )
    assert per_output <= 10
    assert d_mc < 0.5 * d_base


def test_options_are_checked():
    with pytest.raises(ValueError, match="unknown solver"):
        ds.get_solver("dmcmc", integrator="nope")
    with pytest.raises(ValueError, match="n_skip must be"):
        ds.get_solver("dmcmc", n_skip=-1)
    with pytest.raises(TypeError, match="estimator must be"):
        ds.get_solver("dmcmc", estimator=0.5)
    with pytest.raises(ValueError, match="estimator 'oracle' is unknown"):
        ds.get_solver("dmcmc", estimator="oracle")
    assert isinstance(ds.get_solver("dmcmc", estimator="digits-sigma").estimator, ClassifierNoiseLevel)
    with pytest.raises(ValueError, match="multiple of rounds"):
        ds.sample(GMM.model(VP), "dmcmc", shape=(5, 2), rounds=2, seed=0)
