"""Guidance with per-sample tensors on every solver: per-sample adaptive solvers query only the rows
still running, and wrappers and hooks subset what they hold to those rows."""

import pytest
import torch

import diffsolve as ds
from diffsolve.guidance import DPS, HookContext, Inpaint, Masked

VP = ds.schedules.VPLinear()
EASY = ds.models.GaussianMixture([[2.0, 2, 1, -1], [-2, -2, -1, 1], [2, -2, -1, -1]], 0.3)
# one solver of each kind that queries row subsets, and a fixed-grid one
SOLVERS = [
    ("ddim", {"steps": 10}),
    ("adaptive-sde", {"eps_rel": 0.2, "t_min": 1e-2}),
    ("mrs-adaptive", {"rtol": 0.05, "t_min": 1e-2}),
    ("mrs-sde-adaptive", {"rtol": 0.1, "t_min": 1e-2}),
]


def _model():
    return ds.DiffusionModel(lambda v, t: EASY.denoise(v, t, VP), VP, "x0", time_input="t")


def _problem(n=6):
    """Each sample observes its own two of the four coordinates (a per-sample mask)."""
    x0 = EASY.sample(n, torch.Generator().manual_seed(5))
    pairs = torch.tensor([[0, 2], [1, 3], [0, 1], [2, 3], [0, 3], [1, 2]])[torch.arange(n) % 6]
    mask = torch.zeros(n, 4, dtype=torch.float64).scatter_(1, pairs, 1.0)
    return x0, mask, x0 * mask


@pytest.mark.parametrize("solver,opts", SOLVERS)
def test_dps_with_a_per_sample_mask_works_with_every_solver(solver, opts):
    """The README's pattern with a mask per sample: each row is guided by its own mask and
    measurement, whichever rows the solver queries (row i of the batch = that sample run alone)."""
    _, mask, y = _problem(4)
    res = ds.sample(DPS(_model(), Masked(mask), y, zeta=1.0), solver, shape=(4, 4), seed=0, **opts)
    if solver != "ddim":  # rows finished at different times, so later queries held fewer rows
        assert len(set(res.nfe_per_sample.tolist())) > 1
    i = 3
    one = ds.sample(
        DPS(_model(), Masked(mask[i : i + 1]), y[i : i + 1], zeta=1.0), solver, shape=(1, 4), seed=i, **opts
    )
    torch.testing.assert_close(one.samples[0], res.samples[i], rtol=1e-9, atol=1e-9)
    # the known coordinates are pulled towards the measurement (unguided: the prior's spread)
    plain = ds.sample(_model(), solver, shape=(4, 4), seed=0, **opts).samples
    err, err_plain = float(((res.samples - y) * mask).norm()), float(((plain - y) * mask).norm())
    assert err < 0.8 * err_plain, (err, err_plain)


def test_an_operator_with_a_rows_parameter_gets_the_query_rows():
    _, mask, y = _problem(4)
    seen = []

    def operator(x, rows):  # the README's lambda form of Masked
        seen.append(None if rows is None else rows.tolist())
        return x * (mask if rows is None else mask[rows])

    kw = {"shape": (4, 4), "seed": 0, "rtol": 0.1, "t_min": 1e-2}
    a = ds.sample(DPS(_model(), operator, y, zeta=1.0), "mrs-sde-adaptive", **kw)
    b = ds.sample(DPS(_model(), Masked(mask), y, zeta=1.0), "mrs-sde-adaptive", **kw)
    assert torch.equal(a.samples, b.samples)
    assert any(r is not None and len(r) < 4 for r in seen)


def test_an_operator_holding_per_sample_tensors_without_rows_gets_a_clear_error():
    _, mask, y = _problem(4)
    kw = {"shape": (4, 4), "seed": 0, "rtol": 0.1, "t_min": 1e-2}
    with pytest.raises(RuntimeError, match=r"rows.*Masked"):
        ds.sample(DPS(_model(), lambda x: x * mask, y, zeta=1.0), "mrs-sde-adaptive", **kw)
    # shared tensors need nothing: a plain lambda with one mask for all rows runs on every solver
    shared = mask[0]
    res = ds.sample(DPS(_model(), lambda x: x * shared, y, zeta=1.0), "mrs-sde-adaptive", **kw)
    assert torch.isfinite(res.samples).all()


def test_masked_broadcasts_a_shared_mask_and_subsets_a_per_sample_one():
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    one = (torch.arange(16).reshape(4, 4) % 2).double()  # [H, W]: for every row, even with B = 4 = H
    assert torch.equal(Masked(one)(x, rows=torch.tensor([0, 2, 3])), x * one)
    per = torch.rand(5, 1, 4, 4, dtype=torch.float64)
    rows = torch.tensor([4, 0, 2])
    assert torch.equal(Masked(per)(x, rows=rows), x * per[rows])
    assert torch.equal(Masked(per[:3])(x), x * per[:3])
    with pytest.raises(TypeError, match="mask must be a tensor"):
        Masked([1, 0])


def test_inpaint_subsets_a_per_sample_mask_to_the_query_rows():
    _, mask, y = _problem()
    hook = Inpaint(mask, y)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rows = torch.tensor([1, 4, 5])
    grid = torch.tensor([0.5, 0.0], dtype=torch.float64)

    def ctx(index):  # fresh per-sample noise for each call: the same draws for a row, whichever rows are asked
        noise = ds.core.noise.NoiseSource((6, 4), seeds=list(range(6)), dtype=torch.float64)
        return HookContext(VP, grid, 1, index, None, None, noise)

    full, part = hook.before(x, 0.5, ctx(None)), hook.before(x[rows], 0.5, ctx(rows))
    assert torch.equal(part, full[rows])
    assert torch.equal(hook.finish(x[rows], ctx(rows)), hook.finish(x, ctx(None))[rows])
