"""The virtual Brownian tree: Brownian law, a pure function of (seed, t), batch invariant."""

import pytest
import torch

from diffsolve.core.brownian import BrownianTree, hashed_normal

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


def test_time_changed_law():
    """With variance v the path is B(v(s) - v(t0)): exact increment variances at any scale, including
    where v changes by orders of magnitude within one tree interval (v = e^{2 lambda}, as the
    log-SNR SDE solvers use it)."""
    lo, hi = -8.0, 5.0
    bt = BrownianTree(range(M), (2,), lo, hi, dtype=torch.float64, variance=lambda s: torch.exp(2 * (s - hi)))
    v = lambda s: torch.exp(torch.tensor(2 * (s - hi), dtype=torch.float64))
    assert torch.equal(bt(lo), torch.zeros(M, 2, dtype=torch.float64))
    pts = (-7.9, -7.85, -3.0, 0.2, 4.9, 5.0)
    w = {s: bt(s) for s in pts}
    for s0, s1 in zip(pts, pts[1:]):
        inc = w[s1] - w[s0]
        assert abs(float(inc.var()) / float(v(s1) - v(s0)) - 1) < 0.03, (s0, s1)
    a, b = w[-3.0] - w[-7.85], w[4.9] - w[-3.0]
    assert abs(float((a * b).mean()) / float(((v(-3.0) - v(-7.85)) * (v(4.9) - v(-3.0))).sqrt())) < 0.02
    fine = bt(-7.85 + 1e-7) - w[-7.85]
    assert abs(float(fine.var()) / float(v(-7.85 + 1e-7) - v(-7.85)) - 1) < 0.05
