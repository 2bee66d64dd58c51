"""PNDM / PLMS (``pndm``, ``plms``): parity with diffusers' PNDMScheduler (PRK warm-up and
skip_prk_steps, plain loop and DiffsolveScheduler, the same model calls), the transfer and a PRK step
by hand, measured orders on the closed-form Gaussian."""

import math

import pytest
import torch
from diffusers import PNDMScheduler
from tiny_pipelines import eps_net_3d

import diffsolve as ds
from diffsolve.core.protocol import drive
from diffsolve.core.registry import solver_info

S = ds.schedules


def _run(solver, x_T, grid, model, sched):
    """Drives the solver's generator by hand; returns (result, the network timesteps it asked for)."""
    run = solver.run(x_T, grid, None, schedule=sched)
    item, asked = next(run), []
    try:
        while True:
            asked.append(float(sched.timestep(torch.as_tensor(item[1], dtype=torch.float64))))
            item = run.send(model(item[0], item[1]))
    except StopIteration as stop:
        return stop.value, asked


#: measured relative differences 1.3e-8 to 7.7e-8
@pytest.mark.parametrize("skip_prk_steps", [True, False])
@pytest.mark.parametrize("n", [10, 25])
@pytest.mark.parametrize("offset,alpha_to_one", [(1, False), (0, True)])
def test_parity_with_diffusers_pndm(skip_prk_steps, n, offset, alpha_to_one):
    """Same eps network, steps (the distinct timesteps, then diffusers' final alpha), initial state:
    the same result to 1e-5, the same model calls at the same timesteps (diffusers lists N + 1 for
    PLMS, N + 9 with the PRK warm-up)."""
    net = eps_net_3d()
    ref = PNDMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        skip_prk_steps=skip_prk_steps,
        steps_offset=offset,
        set_alpha_to_one=alpha_to_one,
    )
    ref.set_timesteps(n)
    x_T = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    xd = x_T.clone()
    for t in ref.timesteps:
        xd = ref.step(net(xd, t.expand(4)), t, xd).prev_sample
    assert len(ref.timesteps) == n + (1 if skip_prk_steps else 9)

    sched = S.VPDiscrete.from_diffusers_config(ref.config)
    model = ds.DiffusionModel(net, sched, "eps")
    steps = sorted({int(t) for t in ref._timesteps}, reverse=True)
    end = 0.0 if alpha_to_one else float(sched.t_of_timestep(0.0))
    grid = torch.tensor([float(sched.t_of_timestep(float(t))) for t in steps] + [end], dtype=torch.float64)
    name = "plms" if skip_prk_steps else "pndm"
    ours, asked = _run(ds.get_solver(name), x_T, grid, model, sched)
    assert [round(t, 6) for t in asked] == [float(t) for t in ref.timesteps]
    rel = float((ours - xd).abs().max() / xd.abs().max())
    print(name, n, offset, alpha_to_one, "relative difference to diffusers", f"{rel:.2e}", "calls", len(asked))
    assert rel < 1e-5


@pytest.mark.parametrize("skip_prk_steps", [True, False])
def test_parity_through_diffsolve_scheduler(skip_prk_steps):
    """Stable Diffusion 1.5's published PNDMScheduler config (skip_prk_steps True; and with the PRK
    warm-up) in a plain diffusers loop against DiffsolveScheduler.from_config(cfg, solver="pndm"):
    the same latents to 1e-5 and as many model calls (N + 1, resp. N + 9). Measured 2.0e-7 to 4.5e-7.
    With the PRK warm-up diffusers takes its half steps at the integer timestep t - (1000 // N) // 2,
    pndm at the midpoint: they agree where 1000 // N is even (4, 10, 20 steps), not at 12 or 30 steps
    (1.2e-4, 7.4e-5)."""
    from test_scheduler_configs import load, loop, rel

    from diffsolve.integrations.diffusers import DiffsolveScheduler

    cfg = dict(PNDMScheduler.from_config({**load("sd15.json"), "skip_prk_steps": skip_prk_steps}).config)
    for n in (4, 10, 20):
        a, ca = loop(PNDMScheduler.from_config(cfg), n, cfg)
        b, cb = loop(
            DiffsolveScheduler.from_config(cfg, solver="pndm", solver_options={"skip_prk_steps": skip_prk_steps}),
            n,
            cfg,
        )
        print("pndm scheduler", skip_prk_steps, n, ca, cb, f"{rel(a, b):.2e}")
        assert ca == cb == n + (1 if skip_prk_steps else 9)
        assert rel(a, b) < 1e-5, (n, rel(a, b))
    # the SD 1.5 config as published, the solver named "plms"
    cfg = load("sd15.json")
    a, ca = loop(PNDMScheduler.from_config(cfg), 12, cfg)
    b, cb = loop(DiffsolveScheduler.from_config(cfg, solver="plms"), 12, cfg)
    assert ca == cb == 13 and rel(a, b) < 1e-5


def _recorded(name, x, grid, sched, **opts):
    model = GAUSS.model(sched)
    seen = []

    def call(q):
        pred = model(q.x, q.t)
        seen.append((q.x, float(q.t), pred))
        return pred

    return drive(ds.get_solver(name, **opts).run(x, grid, None, schedule=sched), call), seen


GAUSS = ds.models.GaussianMixture([[0.5, -1.0, 2.0, 0.0]], [[0.5, 1.0, 0.2, 2.0]])


def _phi(sched, y, eps, s, t):
    """PNDM's transfer (the paper's eq. (9)) written as there, with abar = alpha^2."""
    ab_s, ab_t = sched.at(s)[0] ** 2, sched.at(t)[0] ** 2
    denom = ab_s * (1 - ab_t) ** 0.5 + (ab_s * (1 - ab_s) * ab_t) ** 0.5
    return (ab_t / ab_s) ** 0.5 * y - (ab_t - ab_s) / denom * eps


def test_prk_and_plms_steps_by_hand():
    """VP on an uneven grid: the first step is the pseudo Runge-Kutta step (four calls, at t_0, the
    midpoint twice, t_1), later ones pseudo AB with the fixed weights; the transfer is eq. (9)."""
    sched = S.VPLinear()
    grid = torch.tensor([0.9, 0.7, 0.55, 0.4, 0.3, 0.2], dtype=torch.float64)
    x0 = GAUSS.marginal(0.9, sched, None).sample(5, torch.Generator().manual_seed(1))
    _, seen = _recorded("pndm", x0, grid, sched)
    assert len(seen) == 3 * 4 + 2
    g = grid.tolist()
    tm = 0.5 * (g[0] + g[1])
    assert [q[1] for q in seen[:4]] == [g[0], tm, tm, g[1]]
    e = [q[2].eps for q in seen]
    assert (seen[1][0] - _phi(sched, x0, e[0], g[0], tm)).abs().max() < 1e-12
    assert (seen[2][0] - _phi(sched, x0, e[1], g[0], tm)).abs().max() < 1e-12
    assert (seen[3][0] - _phi(sched, x0, e[2], g[0], g[1])).abs().max() < 1e-12
    x1 = _phi(sched, x0, (e[0] + 2 * e[1] + 2 * e[2] + e[3]) / 6, g[0], g[1])
    assert (seen[4][0] - x1).abs().max() < 1e-12
    # the 4th step: PLMS-4 on the first call of each PRK step and the new one
    e_grid = [e[0], e[4], e[8], e[12]]
    x3 = seen[12][0]
    x4 = _phi(sched, x3, (55 * e_grid[3] - 59 * e_grid[2] + 37 * e_grid[1] - 9 * e_grid[0]) / 24, g[3], g[4])
    assert (seen[13][0] - x4).abs().max() < 1e-12

    _, seen = _recorded("plms", x0, grid, sched)
    assert len(seen) == len(grid)  # N + 1 calls
    e = [q[2].eps for q in seen]
    assert [q[1] for q in seen[:3]] == [g[0], g[1], g[1]]
    assert (seen[1][0] - _phi(sched, x0, e[0], g[0], g[1])).abs().max() < 1e-12
    x1 = _phi(sched, x0, (e[0] + e[1]) / 2, g[0], g[1])
    assert (seen[2][0] - x1).abs().max() < 1e-12
    x2 = _phi(sched, x1, (3 * e[2] - e[0]) / 2, g[1], g[2])
    assert (seen[3][0] - x2).abs().max() < 1e-12


#: measured (80 -> 160 steps) on log-SNR grids: pndm 2.01 (VP), plms 1.98; SD's discrete schedule on
#: steps uniform in t (t in [0.9, 0.1]): pndm 2.00, plms 1.97
@pytest.mark.parametrize("name", ["pndm", "plms"])
def test_orders(name):
    """The fixed Adams-Bashforth weights assume steps equal in sigma/alpha: on log-SNR grids and on
    steps uniform in t the measured order is 2, the registered one."""
    assert solver_info(name).order == 2
    for sched, grid in ((S.VPLinear(), "log-snr"), (S.VPLinear(), "uniform")):
        model = GAUSS.model(sched)
        x_T = GAUSS.marginal(sched.t_max, sched, None).sample(64, torch.Generator().manual_seed(0))
        exact = GAUSS.flow_map(x_T, sched.t_max, sched.t_min, sched, None)
        errs = [
            float((ds.sample(model, name, n, x_T=x_T, grid=grid).samples - exact).abs().max()) for n in (40, 80, 160)
        ]
        orders = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
        print(name, grid, [f"{e:.2e}" for e in errs], [f"{o:.2f}" for o in orders])
        if grid == "log-snr":
            assert abs(orders[-1] - 2.0) < 0.25, orders
        else:
            assert errs[-1] < errs[0] / 3, errs  # converging (the last steps near t_min dominate here)


def test_plms_second_step_is_an_ipndm_step():
    """The transfer with a combined eps is an Euler step of x/alpha against sigma/alpha with that eps:
    after the first step PLMS is ipndm (the fixed AB weights on eps), only the warm-up differs."""
    sched = S.VPLinear()
    model = GAUSS.model(sched)
    grid = S.make_grid(sched, 12, "log-snr", t_max=0.9, t_min=0.1)
    x0 = GAUSS.marginal(0.9, sched, None).sample(8, torch.Generator().manual_seed(3))
    _, seen = _recorded("plms", x0, grid, sched)
    x1 = seen[2][0]  # the state after the first (improved Euler) step
    a = ds.sample(model, "plms", x_T=x0, grid=grid).samples
    # ipndm from x1 with the history of eps at t_0: feed it by running it from t_0 with x0 and
    # replacing its first step; equivalently compare the second step by hand
    e0, e2 = seen[0][2].eps, seen[2][2].eps
    s = [sched.at(float(t))[1] / sched.at(float(t))[0] for t in grid[:3]]
    al = [sched.at(float(t))[0] for t in grid[:3]]
    euler = al[2] * (x1 / al[1] + (s[2] - s[1]) * (3 * e2 - e0) / 2)
    assert (seen[3][0] - euler).abs().max() < 1e-12
    assert a.isfinite().all()


def test_refusals():
    sched = S.RectifiedFlow()
    model = GAUSS.model(sched)
    with pytest.raises(ValueError, match="alpha = 0"):
        ds.sample(model, "pndm", 5, x_T=torch.zeros(2, 4, dtype=torch.float64), grid="uniform")
