"""diffsolve.guidance.lbfgs: L-BFGS per sample with batched evaluations follows torch.optim.LBFGS on
each sample alone (strong-Wolfe line search or fixed steps, any history size), whatever the batch."""

from __future__ import annotations

import pytest
import torch

from diffsolve.guidance.lbfgs import LBFGS, minimise_per_sample

#: Rosenbrock rows of different steepness and starts: their line searches take different counts
SCALE = torch.tensor([1.0, 10.0, 100.0, 30.0], dtype=torch.float64)
X0 = torch.tensor([[-1.2, 1.0], [-1.0, 1.5], [0.5, -0.5], [2.0, 2.0]], dtype=torch.float64)


def _rosenbrock(x, scale):
    return (1 - x[:, 0]) ** 2 + scale * (x[:, 1] - x[:, 0] ** 2) ** 2


def _evaluator(scale):
    """evaluate(x) for rows of the given scales: (f, its gradient, f to record)."""

    def evaluate(x):
        z = x.detach().requires_grad_(True)
        f = _rosenbrock(z, scale)
        (g,) = torch.autograd.grad(f.sum(), z)
        return f.detach(), g, f.detach()

    return evaluate


def _torch_alone(b, steps, **opts):
    """Row b minimised by torch.optim.LBFGS itself; its iterate and its closure calls."""
    z = X0[b : b + 1].clone().requires_grad_(True)
    opt = torch.optim.LBFGS([z], **opts)
    calls = [0]

    def closure():
        opt.zero_grad()
        f = _rosenbrock(z, SCALE[b : b + 1]).sum()
        f.backward()
        calls[0] += 1
        return f

    for _ in range(steps):
        opt.step(closure)
    return z.detach(), calls[0]


@pytest.mark.parametrize(
    "opts",
    [
        dict(line_search_fn="strong_wolfe"),
        dict(line_search_fn="strong_wolfe", max_iter=7, history_size=3, lr=0.5),
        dict(line_search_fn=None, lr=0.02, max_iter=10),
    ],
)
def test_each_row_follows_torchs_lbfgs_alone(opts):
    """Four Rosenbrock rows, 3 steps: each row ends where torch's LBFGS takes it alone, bitwise (in
    float64), and the batched evaluations number the most any row needed alone, not their sum
    (measured with the line search: 32 batched against 15 to 32 alone)."""
    ours = LBFGS(
        lr=opts.get("lr", 1.0),
        max_iter=opts.get("max_iter", 20),
        history_size=opts.get("history_size", 100),
        line_search=opts["line_search_fn"],
    )
    x, history, evaluations = minimise_per_sample(ours, X0, _evaluator(SCALE), 3)
    assert len(history) == 3 and torch.equal(history[0], _rosenbrock(X0, SCALE))
    counts = []
    for b in range(len(X0)):
        alone, calls = _torch_alone(b, 3, **opts)
        counts.append(calls)
        assert torch.equal(x[b : b + 1], alone), (b, x[b], alone)
    print(opts, "evaluations: batched", evaluations, "torch alone", counts, "f:", _rosenbrock(x, SCALE).tolist())
    assert evaluations == max(counts)
    if opts["line_search_fn"]:
        assert len(set(counts)) > 1


def test_a_row_alone_equals_the_row_in_a_batch_bitwise():
    x, history, _ = minimise_per_sample(LBFGS(), X0, _evaluator(SCALE), 4)
    alone, hist_alone, _ = minimise_per_sample(LBFGS(), X0[2:3], _evaluator(SCALE[2:3]), 4)
    assert torch.equal(alone[0], x[2]) and all(torch.equal(a[0], h[2]) for a, h in zip(hist_alone, history))
    assert float(_rosenbrock(x, SCALE).max()) < 1e-8  # every row at the minimum (1, 1)


def test_no_steps_leave_the_start():
    x, history, evaluations = minimise_per_sample(LBFGS(), X0, _evaluator(SCALE), 0)
    assert torch.equal(x, X0) and history == [] and evaluations == 0


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="line_search must be"):
        LBFGS(line_search="armijo")
    with pytest.raises(ValueError, match="lr > 0"):
        LBFGS(lr=0.0)
