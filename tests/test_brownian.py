"""The virtual Brownian tree: Brownian law, a pure function of (seed, t), batch invariant."""

import pytest
import torch

from diffsolve.samplers.brownian import BrownianTree, hashed_normal

M = 20000


def test_hashed_normals_are_standard_normal():
    z = hashed_normal(torch.arange(M), torch.full((M,), 5), 8, torch.float64)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.var()) - 1) < 0.01
    assert abs(float((z**4).mean()) - 3) < 0.06  # Gaussian kurtosis
    c = torch.corrcoef(z.T)
    assert float((c - torch.eye(8, dtype=torch.float64)).abs().max()) < 0.03


def test_brownian_law():
    bt = BrownianTree(range(M), (2,), -1.0, 2.0, dtype=torch.float64)
    assert torch.equal(bt(-1.0), torch.zeros(M, 2, dtype=torch.float64))
    w = {s: bt(s) for s in (-0.4, 0.3, 1.234567, 2.0)}
    for s, v in w.items():
        assert abs(float(v.var()) / (s + 1.0) - 1) < 0.03, s
    inc1, inc2 = w[0.3] - w[-0.4], w[1.234567] - w[0.3]
    assert abs(float(inc1.var()) / 0.7 - 1) < 0.03 and abs(float(inc2.var()) / 0.934567 - 1) < 0.03
    assert abs(float((inc1 * inc2).mean())) < 0.02  # independent increments
    small = (bt(0.3 + 1e-6) - w[0.3]) / 1e-3
    assert abs(float(small.var()) - 1) < 0.05  # fine increments keep their variance


def test_pure_function_of_seed_and_time():
    bt = BrownianTree([11, 12, 13, 14], (3, 2), 0.0, 1.0)
    t = torch.tensor([0.9, 0.1, 0.5, 0.33])
    a = bt(t)
    b = bt(t[[2, 0]], torch.tensor([2, 0]))  # other rows, another order
    assert torch.equal(b[0], a[2]) and torch.equal(b[1], a[0])
    assert torch.equal(BrownianTree([13], (3, 2), 0.0, 1.0)(0.5)[0], a[2])  # batch invariant
    z = bt.normal(0.6, 0.2)  # standardised increment, either direction
    assert torch.allclose(z, bt.normal(0.2, 0.6)) and torch.allclose(z, (bt(0.6) - bt(0.2)) / 0.4**0.5)
    with pytest.raises(ValueError, match="outside its range"):
        bt(1.5)
