"""The continuous adjoint (AdjointDPM, ``ds.sample(..., grad="continuous")``) on the closed-form Gaussian.

The model: data N(m + shift, diag(s^2)) with m and log s the network's parameters and ``shift`` a
conditioning tensor; its denoiser is exact, so the sample of the exact flow from x_T is
x = alpha_0 m' + nu_0 (x_T - alpha_T m') / nu_T with nu = sqrt(alpha^2 s^2 + sigma^2), and so is its
gradient. Float64. Measured (VP, 3 samples of dimension 4, the loss sum(w * x)):

    exp-rk4, 50 steps: continuous adjoint vs autograd through the unrolled run 4.3e-7, vs exact 1.5e-6;
    the adjoint alone (exact forward) vs exact at 10 / 25 / 50 / 100 steps: 1.5e-3, 3.6e-5, 2.3e-6, 1.5e-7
    (order 3.97 at the last doubling); dpmpp-2m / heun / unipc at 25 -> 100 steps: 3.0e-3 -> 2.0e-4,
    7.0e-3 -> 4.1e-4, 1.5e-3 -> 2.5e-5 (the forward solver's error);
    ode-dopri5 at rtol 1e-10 on rectified flow: adjoint vs exact 5.5e-7, autograd through the
    adaptive run 5.9e-4 (the step-size controller's decisions are differentiated too).
"""

import math

import pytest
import torch

import diffsolve as ds
from diffsolve.core.continuous_adjoint import adjoint_backward, exp_pieces
from diffsolve.schedules import RectifiedFlow, VPLinear


class GaussNet(torch.nn.Module):
    """The exact x0-denoiser of N(m + shift, diag(exp(2 logs)))."""

    def __init__(self, schedule, d: int = 4):
        super().__init__()
        self.schedule = schedule
        self.m = torch.nn.Parameter(torch.linspace(-1, 1, d, dtype=torch.float64))
        self.logs = torch.nn.Parameter(torch.full((d,), -0.5, dtype=torch.float64))

    def forward(self, x, t, shift=None):
        a = self.schedule.alpha(t).reshape(-1, 1)
        s = self.schedule.sigma(t).reshape(-1, 1)
        m = self.m if shift is None else self.m + shift
        v = torch.exp(2 * self.logs)
        return m + a * v / (a * a * v + s * s) * (x - a * m)


def setup(schedule):
    net = GaussNet(schedule)
    model = ds.DiffusionModel(net, schedule, prediction="x0", time_input="t")
    x_T = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shift = torch.tensor([[0.3, -0.2, 0.1, 0.0]] * 3, dtype=torch.float64)
    w = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return net, model, x_T, shift, w


def grads(net, model, x_T, shift, w, solver, steps=None, grad=False, **options):
    """d sum(w * sample) / d (x_T, shift, m, logs), flattened."""
    x = x_T.clone().requires_grad_(True)
    c = shift.clone().requires_grad_(True)
    net.zero_grad()
    res = ds.sample(model, solver, steps, x_T=x, cond={"shift": c}, grad=grad, **options)
    (res.samples * w).sum().backward()
    return torch.cat([x.grad.flatten(), c.grad.flatten(), net.m.grad, net.logs.grad]), res


def exact(net, x_T, shift, w, schedule, t_hi, t_lo):
    x = x_T.clone().requires_grad_(True)
    c = shift.clone().requires_grad_(True)
    net.zero_grad()
    m, s = net.m + c, torch.exp(net.logs)
    tt = torch.tensor([t_hi, t_lo], dtype=torch.float64)
    (a_T, a_0), (s_T, s_0) = schedule.alpha(tt), schedule.sigma(tt)
    out = a_0 * m + torch.sqrt(a_0**2 * s**2 + s_0**2) * (x - a_T * m) / torch.sqrt(a_T**2 * s**2 + s_T**2)
    (out * w).sum().backward()
    return torch.cat([x.grad.flatten(), c.grad.flatten(), net.m.grad, net.logs.grad]), out.detach()


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_matches_autograd_through_the_unrolled_sampler_at_50_steps():
    """exp-rk4 (the adjoint's own scheme) at 50 steps: measured 4.3e-7 against autograd, 1.5e-6
    against the exact gradient; every input gets its gradient."""
    sched = VPLinear()
    net, model, x_T, shift, w = setup(sched)
    auto, res = grads(net, model, x_T, shift, w, "exp-rk4", 50)
    adj, res_adj = grads(net, model, x_T, shift, w, "exp-rk4", 50, grad="continuous")
    ex, _ = exact(net, x_T, shift, w, sched, float(res.grid[0]), float(res.grid[-1]))
    print("adjoint vs autograd", rel(adj, auto), "vs exact", rel(adj, ex), "autograd vs exact", rel(auto, ex))
    assert rel(adj, auto) < 1e-6
    assert rel(adj, ex) < 5e-6
    assert torch.equal(res.samples, res_adj.samples)  # the forward run is the solver's own
    assert res_adj.nfe == res.nfe == 200


def test_error_against_the_step_count_falls_at_fourth_order():
    """The backward integration alone (started from the exact sample): relative error of all the
    gradients against the exact ones, 10 to 100 steps."""
    sched = VPLinear()
    net, model, x_T, shift, w = setup(sched)
    errs = []
    for n in (10, 25, 50, 100):
        g = ds.schedules.make_grid(sched, n)
        ex, x_end = exact(net, x_T, shift, w, sched, float(g[0]), float(g[-1]))
        c = shift.clone().requires_grad_(True)
        x_back, a, acc = adjoint_backward(
            model, g, x_end, w, mu=None, cond={"shift": c}, fixed={}, wrt=[c, net.m, net.logs]
        )
        errs.append(rel(torch.cat([a.flatten(), *(t.flatten() for t in acc)]), ex))
        back = rel(x_back, x_T)  # x_T rebuilt on the way back
    print("adjoint error vs steps", errs, "x_T rebuilt at 100 steps", back)
    assert errs[-1] < 3e-7 and back < 1e-6
    assert math.log(errs[2] / errs[3]) / math.log(2) > 3.5  # 50 -> 100 steps


@pytest.mark.parametrize("solver", ["dpmpp-2m", "heun", "unipc"])
def test_any_fixed_grid_solver_converges_with_its_forward_error(solver):
    """The adjoint is the exact flow's gradient along the run: its error is the forward solver's;
    it falls with the steps as autograd's does (measured in the module docstring)."""
    sched = VPLinear()
    net, model, x_T, shift, w = setup(sched)
    e = []
    for n in (25, 100):
        adj, res = grads(net, model, x_T, shift, w, solver, n, grad="continuous")
        ex, _ = exact(net, x_T, shift, w, sched, float(res.grid[0]), float(res.grid[-1]))
        e.append(rel(adj, ex))
    print(solver, e)
    assert e[1] < e[0] / 3 and e[1] < 5e-3


def test_adaptive_solver_gradient_is_the_flows_where_autograd_through_the_controller_is_not():
    sched = RectifiedFlow()
    net, model, x_T, shift, w = setup(sched)
    opts = dict(rtol=1e-10, atol=1e-10)
    adj, res = grads(net, model, x_T, shift, w, "ode-dopri5", grad="continuous", **opts)
    auto, _ = grads(net, model, x_T, shift, w, "ode-dopri5", **opts)
    ex, _ = exact(net, x_T, shift, w, sched, float(res.grid[0]), float(res.grid[-1]))
    print("dopri5: adjoint", rel(adj, ex), "autograd", rel(auto, ex))
    assert rel(adj, ex) < 2e-6
    assert rel(adj, ex) < rel(auto, ex) / 10


def test_memory_does_not_grow_with_the_steps():
    """What autograd keeps for the backward pass: the same at 10 and 100 steps with the continuous
    adjoint (the sample and the inputs), growing with the steps through the unrolled run."""
    _, model, x_T, shift, _ = setup(VPLinear())

    def saved_bytes(steps, grad):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        x = x_T.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ds.sample(model, "dpmpp-2m", steps, x_T=x, cond={"shift": shift}, grad=grad)
        return total

    assert saved_bytes(10, "continuous") == saved_bytes(100, "continuous")
    assert saved_bytes(100, False) > 5 * saved_bytes(10, "continuous")


def test_exp_pieces_share_variables_both_ways_and_split_only_alpha0_to_sigma0():
    flow = RectifiedFlow()
    assert [p[0] for p in exp_pieces(flow, 1.0, 0.0)] == ["x0", "eps"]
    assert [p[0] for p in exp_pieces(flow, 1.0, 0.9)] == ["x0"]
    assert [p[0] for p in exp_pieces(flow, 0.1, 0.0)] == ["eps"]
    fwd, back = exp_pieces(flow, 1.0, 0.0), exp_pieces(flow, 0.0, 1.0)
    assert [p[0] for p in fwd] == [p[0] for p in reversed(back)]
    # one step from pure noise to data is still a sample of the Gaussian (8 calls, exact to RK4)
    _, model, x_T, shift, _ = setup(flow)
    res = ds.sample(model, "exp-rk4", 1, x_T=x_T, cond={"shift": shift})
    assert res.nfe == 8 and torch.isfinite(res.samples).all()


def test_refusals():
    _, model, x_T, _, _ = setup(VPLinear())
    x = x_T.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="grad must be False, True, or one of"):
        ds.sample(model, "euler", 5, x_T=x, grad="adjoint")
    with pytest.raises(ValueError, match=r"deterministic solver .*'euler-ancestral' draws noise"):
        ds.sample(model, "euler-ancestral", 5, x_T=x, grad="continuous")
    with pytest.raises(ValueError, match=r"eta=1\.0"):
        ds.sample(model, "ddim", 5, x_T=x, grad="continuous", eta=1.0)
    with pytest.raises(ValueError, match="step hooks"):
        ds.sample(model, "euler", 5, x_T=x, grad="continuous", hooks=[ds.guidance.Threshold()])
    with pytest.raises(ValueError, match="needs a reversible solver"):
        ds.sample(model, "euler", 5, x_T=x, grad=True)


@pytest.mark.parametrize("schedule", ["vp", "mean-reverting"])
def test_nonlinear_network_gradients_converge_to_autograds_at_fourth_order(schedule):
    """An MLP eps-network with a conditioning vector (tests/test_adjoint.py's), on VP and on a
    mean-reverting schedule (mu a fixed input): the continuous adjoint of exp-rk4 against autograd
    through the same run, to x_T, c and the weights, falls at about fourth order with the steps.
    Measured at 10 / 20 / 40 steps: VP 4.3e-3, 1.8e-4, 1.0e-5; mean-reverting 2.9e-3, 7.0e-5, 2.3e-6."""
    from test_adjoint import _loss, _setup

    sched = ds.schedules.VPLinear() if schedule == "vp" else ds.schedules.MeanReverting()
    net, model, x_T, c = _setup(sched)
    mu = (
        None if schedule == "vp" else torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    )
    wrt = [x_T, c, *net.parameters()]
    diffs = []
    for steps in (10, 20, 40):
        kw = dict(x_T=x_T, cond={"c": c}, mu=mu, **({"t_min": 1e-3} if mu is None else {}))
        got = torch.autograd.grad(_loss(ds.sample(model, "exp-rk4", steps, grad="continuous", **kw).samples), wrt)
        want = torch.autograd.grad(_loss(ds.sample(model, "exp-rk4", steps, **kw).samples), wrt)
        diffs.append(max(rel(a, b) for a, b in zip(got, want)))
    print(schedule, "continuous vs autograd at 10, 20, 40 steps", diffs)
    assert diffs[2] < 3e-5 and diffs[0] / diffs[1] > 8 and diffs[1] / diffs[2] > 8
