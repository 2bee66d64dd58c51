"""mrs-sde-adaptive: the adaptive SDE-DPM-Solver++ / MRS SDE pair in log-SNR on one Brownian path."""

import math

import pytest
import torch

import diffsolve as ds
from diffsolve.metrics import mmd2
from diffsolve.samplers import NoiseSource
from diffsolve.solvers.exponential.adaptive import MRSSDEAdaptive

N = 1500  # = conftest.GMM_N (the threshold and reference fixtures)
GMM = ds.models.GaussianMixture.gmm_2d()
S = ds.schedules


@pytest.mark.parametrize("kind", ["brownian", "gaussian"])
def test_the_pair_noises_have_the_exact_joint_law(kind):
    """N(s -> s + rh) and N(s -> s + h), per unit sigma, are OU integrals: variances 1 - e^{-2rh},
    1 - e^{-2h} and covariance e^{-(1-r)h} (1 - e^{-2rh}); also on the e^{2 lambda} clock far below
    its top (lambda_s = -6 with the path's top at 4)."""
    m, r = 40000, 0.5
    noise = NoiseSource((m, 1), seeds=range(m), dtype=torch.float64, kind=kind)
    lo, hi = -8.0, 4.0
    path = MRSSDEAdaptive()._path(noise, lo, hi)
    like = torch.zeros(m, 1, dtype=torch.float64)
    for ls, h in ((-6.0, 0.3), (1.0, 1.5), (3.5, 0.5)):
        lsr, hr = torch.full((m,), ls, dtype=torch.float64), torch.full((m,), h, dtype=torch.float64)
        n_r, n_t = MRSSDEAdaptive._noises(path, lsr, hr, r, torch.arange(m), like)
        v_r, v_t = 1 - math.exp(-2 * r * h), 1 - math.exp(-2 * h)
        cov = math.exp(-(1 - r) * h) * v_r
        assert abs(float(n_r.var()) / v_r - 1) < 0.03 and abs(float(n_t.var()) / v_t - 1) < 0.03, (ls, h)
        assert abs(float((n_r * n_t).mean()) - cov) < 0.015, (ls, h)


@pytest.mark.parametrize("name", ["vp", "mean-reverting"])
def test_law_matches_at_a_fraction_of_em_calls(name, threshold, reference):
    """Two-sample test against the mixture (as 1000-step Euler-Maruyama passes it), at rtol 0.1 and
    0.02, with far fewer calls than Gotta Go Fast at its loosest tolerance (104 rows per sample)."""
    sched, mu = {
        "vp": (S.VPLinear(), None),
        "mean-reverting": (S.MeanReverting(), torch.tensor([0.5, -0.5], dtype=torch.float64)),
    }[name]
    for rtol in (0.1, 0.02):
        res = ds.sample(
            GMM.model(sched), "mrs-sde-adaptive", shape=(N, 2), seed=0, dtype=torch.float64, mu=mu, rtol=rtol
        )
        d, rows = mmd2(res.samples, reference), float(res.nfe_per_sample.double().mean())
        print(name, rtol, f"mmd2 {d:.2e} (threshold {threshold:.2e}) rows/sample {rows:.1f}")
        assert d < threshold
        assert torch.equal(res.nfe_per_sample, 2 * res.accepted + res.rejected + 1)  # a retry reuses its first call
        assert rows < (100 if rtol == 0.1 else 250)


def test_converges_pathwise_on_one_brownian_path():
    """As the tolerance tightens the solution converges to one path-wise solution (rejected steps
    and their retries see one Brownian path): distances to the tightest run shrink, far below the
    distance to another seed's."""
    model = GMM.model(S.VPLinear())
    runs = {
        tol: ds.sample(
            model, "mrs-sde-adaptive", shape=(32, 2), seed=0, dtype=torch.float64, rtol=tol, atol=tol / 10
        ).samples
        for tol in (0.1, 0.01, 1e-3, 2e-4)
    }
    other = ds.sample(
        model, "mrs-sde-adaptive", shape=(32, 2), seed=500, dtype=torch.float64, rtol=2e-4, atol=2e-5
    ).samples
    dist = [float((runs[t] - runs[2e-4]).norm(dim=1).median()) for t in (0.1, 0.01, 1e-3)]
    far = float((other - runs[2e-4]).norm(dim=1).median())
    print("median distance to the 2e-4 run", dist, "another seed", far)
    assert dist[0] > dist[1] > dist[2] and dist[2] < 0.01 * far


def test_per_sample_batch_invariance_and_fewer_rows_than_batch_mode():
    gmm = ds.models.GaussianMixture([[-4.0, 0.0], [4.0, 0.0], [0.0, 6.0]], torch.tensor([0.02, 1.0, 0.2]))
    model = gmm.model(S.VPLinear())
    full = ds.sample(model, "mrs-sde-adaptive", shape=(200, 2), seed=3, dtype=torch.float64, rtol=0.02)
    part = ds.sample(model, "mrs-sde-adaptive", shape=(4, 2), seed=[6, 7, 8, 9], dtype=torch.float64, rtol=0.02)
    assert torch.equal(full.samples[3:7], part.samples)
    batch = ds.sample(model, "mrs-sde-adaptive", shape=(200, 2), seed=3, dtype=torch.float64, rtol=0.02, mode="batch")
    rows = int(full.nfe_per_sample.sum()), int(batch.nfe_per_sample.sum())
    print("model rows: per_sample", rows[0], "batch", rows[1])
    assert rows[0] < rows[1]
    with pytest.raises(TypeError, match="denoise"):
        ds.get_solver("mrs-sde-adaptive", denoise="yes")
    with pytest.raises(ValueError, match="finite log-SNR at both ends"):
        ds.sample(GMM.model(S.VPLinear()), "mrs-sde-adaptive", shape=(2, 2), t_min=0.0)
