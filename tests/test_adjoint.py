"""Reversible adjoint: exact gradients through rev-heun in constant memory."""

import pytest
import torch

import diffsolve as ds
from diffsolve.samplers.adjoint import rev_heun_sample


class _Net(torch.nn.Module):
    """An eps-network with a conditioning vector c."""

    def __init__(self):
        super().__init__()
        self.m = torch.nn.Sequential(torch.nn.Linear(9, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).double()

    def forward(self, x, t, c):
        return self.m(torch.cat([x, t[:, None].to(x.dtype), c.expand(x.shape[0], -1)], 1))


def _setup():
    torch.manual_seed(0)
    net = _Net()
    model = ds.DiffusionModel(net, ds.schedules.VPLinear(), "eps", time_input="t")
    x_T = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(1, 4, dtype=torch.float64, requires_grad=True)
    return net, model, x_T, c


def _loss(x):
    return (x**2).sum() + x.sum()


@pytest.mark.parametrize("steps", [5, 30])
def test_gradient_equals_autograd_through_the_unrolled_sampler(steps):
    net, model, x_T, c = _setup()
    wrt = [x_T, c, *net.parameters()]
    out = rev_heun_sample(model, x_T, steps, cond={"c": c})
    got = torch.autograd.grad(_loss(out), wrt)
    ref = ds.sample(model, "rev-heun", steps, x_T=x_T, cond={"c": c}).samples
    assert torch.equal(out.detach(), ref.detach())
    want = torch.autograd.grad(_loss(ref), wrt)
    rel = max(float((a - b).norm() / b.norm()) for a, b in zip(got, want))
    print(steps, "steps: max relative gradient difference", rel)
    assert rel < 1e-8


def _saved_bytes(fn, steps):
    """Bytes the forward pass stores for backward (every tensor autograd saves, weights included)."""
    net, model, x_T, c = _setup()
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(model, x_T, steps, c)
    _loss(out).backward()  # and the backward runs
    assert x_T.grad is not None and torch.isfinite(x_T.grad).all()
    return total[0]


def test_memory_is_flat_in_the_number_of_steps():
    """What the forward keeps for backward: constant for the reversible adjoint (its three final
    states), linear in the steps for autograd through the unrolled loop. (The reversible backward
    then holds one step's graph at a time.)"""
    rev = lambda m, x, n, c: rev_heun_sample(m, x, n, cond={"c": c})  # noqa: E731
    unrolled = lambda m, x, n, c: ds.sample(m, "rev-heun", n, x_T=x, cond={"c": c}).samples  # noqa: E731
    r = {n: _saved_bytes(rev, n) for n in (10, 50, 200)}
    u = {n: _saved_bytes(unrolled, n) for n in (10, 50, 200)}
    print("bytes saved for backward, reversible", r, "unrolled", u)
    assert r[10] == r[50] == r[200]
    assert u[200] > 15 * u[10] and u[10] > r[10]
