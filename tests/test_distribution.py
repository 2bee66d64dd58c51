"""SDE samplers against exact samples of a 2-D Gaussian mixture (two-sample MMD test)."""

import pytest
import torch

import diffsolve as ds
from diffsolve.metrics import mmd2, sliced_wasserstein

N = 1500  # = conftest.GMM_N (the threshold and reference fixtures)
GMM = ds.models.GaussianMixture.gmm_2d()
SCHED = ds.schedules.VPLinear()


@pytest.mark.parametrize("solver,steps", [("euler-maruyama", 500), ("ddpm", 200)])
def test_sde_sampler_passes_two_sample_test(solver, steps, threshold, reference):
    res = ds.sample(GMM.model(SCHED), solver, steps, shape=(N, 2), seed=0, dtype=torch.float64, grid="uniform")
    d = mmd2(res.samples, reference)
    print(solver, steps, "mmd2", d, "threshold", threshold, "sw", sliced_wasserstein(res.samples, reference))
    assert d < threshold


@pytest.mark.parametrize("solver", ["euler-maruyama", "ddpm"])
def test_sde_sampler_fails_with_three_steps(solver, threshold, reference):
    """The same test rejects a 3-step run: it is able to fail."""
    res = ds.sample(GMM.model(SCHED), solver, 3, shape=(N, 2), seed=0, dtype=torch.float64, grid="uniform")
    d = mmd2(res.samples, reference)
    print(solver, 3, "mmd2", d, "threshold", threshold)
    assert d > 5 * threshold


def test_brownian_noise_em_passes(threshold, reference):
    """Brownian-tree increments give the right law too."""
    good = ds.sample(
        GMM.model(SCHED),
        "euler-maruyama",
        500,
        shape=(N, 2),
        seed=3,
        dtype=torch.float64,
        grid="uniform",
        noise="brownian",
    )
    bad = ds.sample(
        GMM.model(SCHED),
        "euler-maruyama",
        3,
        shape=(N, 2),
        seed=3,
        dtype=torch.float64,
        grid="uniform",
        noise="brownian",
    )
    print("brownian EM mmd2 at 500 / 3 steps", mmd2(good.samples, reference), mmd2(bad.samples, reference))
    assert mmd2(good.samples, reference) < threshold < mmd2(bad.samples, reference)


def test_brownian_path_is_stable_across_step_counts():
    """With Brownian-tree noise a seed fixes one Brownian path whatever the step count, so EM
    converges strongly (order 1 for this additive-noise linear SDE) to one solution per seed."""
    model = ds.models.GaussianMixture([[1.0, -1.0]], 0.5).model(SCHED)
    run = lambda n, seed: (
        ds.sample(
            model,
            "euler-maruyama",
            n,
            shape=(8, 2),
            seed=seed,
            dtype=torch.float64,
            grid="uniform",
            noise="brownian",
            denoise=False,
        ).samples
    )
    ref = run(400, 0)
    e50 = float((run(50, 0) - ref).norm(dim=1).median())
    e100 = float((run(100, 0) - ref).norm(dim=1).median())
    other = float((run(400, 1) - ref).norm(dim=1).median())
    print("brownian: error at 50 / 100 steps vs 400:", e50, e100, "another seed:", other)
    assert e100 < 0.7 * e50
    assert e50 < 0.15 * other
