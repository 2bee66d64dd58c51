import pytest
import torch

import diffsolve as ds

GMM = ds.models.GaussianMixture.gmm_2d()
MODEL = GMM.model(ds.schedules.VPLinear())
CASES = [("euler-maruyama", {}), ("ddpm", {}), ("ddim", {"eta": 0.5}), ("heun", {"s_churn": 5.0}), ("euler", {}),
         ("euler-maruyama", {"noise": "brownian"}), ("adaptive-sde", {"eps_rel": 0.05}),
         ("adaptive-sde", {"eps_rel": 0.05, "noise": "gaussian"}),
         ("dmcmc", {"burn_in": 3, "burn_in_steps": 3, "eta": 0.05})]


@pytest.mark.parametrize("solver,opts", CASES)
def test_same_seed_bitwise_identical(solver, opts):
    a = ds.sample(MODEL, solver, 12, shape=(8, 2), seed=5, **opts)
    b = ds.sample(MODEL, solver, 12, shape=(8, 2), seed=5, **opts)
    assert torch.equal(a.samples, b.samples)
    c = ds.sample(MODEL, solver, 12, shape=(8, 2), seed=6, **opts)
    assert not torch.equal(a.samples, c.samples)


@pytest.mark.parametrize("solver,opts", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_independent_of_batch(solver, opts, dtype):
    """Sample i of a batch of 8 drawn with seed s equals the single sample drawn with seed s + i."""
    batch = ds.sample(MODEL, solver, 12, shape=(8, 2), seed=100, dtype=dtype, **opts).samples
    for i in range(8):
        one = ds.sample(MODEL, solver, 12, shape=(1, 2), seed=100 + i, dtype=dtype, **opts).samples
        assert torch.equal(one[0], batch[i]), i


def test_seed_list_and_generators():
    a = ds.sample(MODEL, "ddpm", 5, shape=(3, 2), seed=[7, 8, 9])
    b = ds.sample(MODEL, "ddpm", 5, shape=(3, 2), generator=[torch.Generator().manual_seed(s) for s in (7, 8, 9)])
    c = ds.sample(MODEL, "ddpm", 5, shape=(3, 2), seed=7)
    assert torch.equal(a.samples, b.samples) and torch.equal(a.samples, c.samples)
    assert a.seeds == [7, 8, 9]


def test_result_fields():
    r = ds.sample(MODEL, "heun", 10, shape=(4, 2), seed=0, return_trajectory=True)
    assert r.nfe == 20 and r.nfe_per_sample.tolist() == [20] * 4
    assert r.grid.shape == (11,) and r.wall_time > 0 and r.solver == "heun"
    assert len(r.trajectory) == 21 and torch.equal(r.trajectory[-1][1], r.samples)
    r = ds.sample(MODEL, "ddim", num_inference_steps=7, shape=(2, 2), seed=0)
    assert r.nfe == 7 and r.options == {"eta": 0.0, "renoise": False}
    x_T = torch.randn(3, 2, dtype=torch.float64)
    r = ds.sample(MODEL, "euler", 4, x_T=x_T)
    assert r.samples.dtype == torch.float64 and r.nfe == 4
