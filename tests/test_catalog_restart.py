"""Restart sampling (Xu et al. 2023): without restarts it is heun; the restart noise by hand; the model
calls it reports; the law of its samples (two-sample test)."""

import math

import pytest
import torch

import diffsolve as ds
from diffsolve.core.noise import NoiseSource
from diffsolve.core.registry import registered
from diffsolve.metrics import mmd2
from diffsolve.solvers.sde.restart import karras_levels

S = ds.schedules
INFO = {i.name: i for i in registered()}
GAUSS = ds.models.GaussianMixture([[0.5, -1.0, 2.0, 0.0]], [[0.5, 1.0, 0.2, 2.0]])
MU = torch.tensor([0.3, 0.3, -0.2, 0.1], dtype=torch.float64)
SCHEDULES = {
    "vp": (lambda: S.VPLinear(), None),
    "edm": (lambda: S.EDM(0.002, 80.0), None),
    "flow": (lambda: S.RectifiedFlow(t_max=0.999), None),
    "mean-reverting": (lambda: S.MeanReverting(lam=0.5), MU),
}


def test_registry_entry_and_options():
    info = INFO["restart"]
    assert (info.family, info.order, info.calls_per_step, info.deterministic) == ("sde", 2, 2, False)
    opts = ds.get_solver("restart").options()
    assert opts == {
        "restarts": ((3, 2, 0.06, 0.30),),
        "s_noise": 1.0,
        "rho": 7.0,
        "restart_gamma": 0.0,
        "s_tmin": 0.0,
        "s_tmax": float("inf"),
    }
    # the official code's restart_info text is taken as well
    solver = ds.get_solver("restart", restarts='{"0": [4, 1, 19.35, 40.79], "1": [6, 6, 0.06, 0.30]}')
    assert solver.restarts == ((4, 1, 19.35, 40.79), (6, 6, 0.06, 0.30))
    for bad in ([[1, 2, 0.1, 0.2]], [[3, 2, 0.3, 0.2]], [[3, 2, 0.1]], [[3, -1, 0.1, 0.2]]):
        with pytest.raises(ValueError):
            ds.get_solver("restart", restarts=bad)
    assert ds.get_solver("restart", restarts=[]).noise_options() == {}
    assert ds.get_solver("restart").noise_options() != {}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("off", [[], [[3, 0, 0.06, 0.3]]])
def test_without_restarts_it_is_heun(schedule, off):
    make, mu = SCHEDULES[schedule]
    model = GAUSS.model(make())
    kw = dict(shape=(16, 4), seed=1, dtype=torch.float64, mu=mu)
    a = ds.sample(model, "restart", 13, restarts=off, **kw)
    b = ds.sample(model, "heun", 13, **kw)
    assert torch.equal(a.samples, b.samples)
    assert a.nfe == b.nfe
    c = ds.sample(model, "restart", 13, **kw)  # the default restart changes the samples
    assert (c.samples - b.samples).abs().max() > 1e-3


def _levels(sched, grid):
    return [float(sched.sigma(t) / sched.alpha(t)) for t in grid]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_model_calls(schedule):
    """heun's calls plus K (n - 1) Heun steps of 2 calls per restart (1 for a step into sigma = 0)."""
    make, mu = SCHEDULES[schedule]
    sched = make()
    model = GAUSS.model(sched)
    restarts = [[3, 2, 0.06, 0.3], [5, 1, 1.0, 2.0]]
    res = ds.sample(model, "restart", 20, shape=(4, 4), seed=0, dtype=torch.float64, mu=mu, restarts=restarts)
    heun = ds.sample(model, "heun", 20, shape=(4, 4), seed=0, dtype=torch.float64, mu=mu)
    lv = _levels(sched, res.grid)
    extra = 0
    for n, k, lo, hi in restarts:
        idx = min(range(len(lv)), key=lambda j: abs(lv[j] - lo))
        assert 0 < idx < len(lv) - 1 and lv[idx] < hi
        extra += k * (n - 1) * 2
    print(schedule, "calls", res.nfe, "heun", heun.nfe, "restart calls", extra)
    assert res.nfe == heun.nfe + extra


def drive(run, model, record=None):
    """Answer a solver's queries with ``model`` (recording (x, t) of each in ``record``); its result."""
    item = next(run)
    try:
        while True:
            if record is not None:
                record.append((item.x.clone(), float(item.t)))
            item = run.send(model(item.x, item.t))
    except StopIteration as stop:
        return stop.value


class Replay:
    """The solver's noise source: fixed draws, recorded."""

    def __init__(self, shape):
        self.gen, self.shape, self.drawn = torch.Generator().manual_seed(3), shape, []

    def randn(self, index=None):
        z = torch.randn(*self.shape, generator=self.gen, dtype=torch.float64)
        self.drawn.append(z)
        return z


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("s_noise,gamma", [(1.0, 0.0), (0.7, 0.0), (1.003, 0.05)])
def test_restart_noise_by_hand(schedule, s_noise, gamma):
    """The state the first restart step queries is the state at t_k noised forward to s_max in
    y = (x - mu)/alpha: alpha(t_max) (y_k + s_noise sqrt(s_max^2 - s_k^2) z) + mu, at the time of s_max
    (with restart_gamma: then churned to s_max (1 + gamma) with a second draw); the restart grid is
    EDM's from s_max to s_k."""
    make, mu = SCHEDULES[schedule]
    sched = make()
    model = GAUSS.model(sched)
    grid = ds.schedules.make_grid(sched, 10, "uniform")
    lv = _levels(sched, grid)
    k = 6
    lo, hi = lv[k] * 1.01, lv[k] * 4.0  # snaps to grid point k
    solver = ds.get_solver("restart", restarts=[[4, 1, lo, hi]], s_noise=s_noise, restart_gamma=gamma)
    x = GAUSS.marginal(sched.t_max, sched, mu).sample(5, torch.Generator().manual_seed(0))
    noise = Replay(x.shape)
    queries: list = []
    drive(solver.run(x, grid, noise, schedule=sched, mu=mu), model, queries)
    assert len(noise.drawn) == (1 if gamma == 0 else 4)  # the restart, then a churn per restart Heun step
    first = 2 * k  # the query after heun's 2k calls of the first k steps
    xq, tq = queries[first]
    s_hat = hi * (1 + gamma)
    t_hat = float(sched.t_of_log_snr(-math.log(s_hat)))
    assert abs(tq - t_hat) < 1e-12
    x_k = drive(ds.get_solver("heun").run(x, grid[: k + 1], None, schedule=sched, mu=mu), model)  # heun to t_k
    m = 0.0 if mu is None else mu
    y = (x_k - m) / float(sched.alpha(grid[k])) + s_noise * math.sqrt(hi**2 - lv[k] ** 2) * noise.drawn[0]
    if gamma > 0:
        y = y + s_noise * math.sqrt(s_hat**2 - hi**2) * noise.drawn[1]
    expected = float(sched.alpha(t_hat)) * y + m
    err = float((xq - expected).abs().max())
    print(schedule, s_noise, gamma, "restart state by hand: max difference", err)
    assert err < 1e-12
    # the restart grid: EDM's from s_max to s_k, 4 points (3 Heun steps), then the main grid again
    times = [q[1] for q in queries[first : first + 6 : 2]]
    levels = [float(sched.sigma(t) / sched.alpha(t)) for t in times]
    expect = [s * (1 + gamma) for s in karras_levels(hi, lv[k], 4, 7.0)[:3]]
    assert max(abs(a / b - 1) for a, b in zip(levels, expect)) < 1e-9
    assert queries[first + 5][1] == float(grid[k])  # the last restart step ends at t_k
    assert queries[first + 6][1] == float(grid[k])  # and the main process goes on from there


def test_restart_noise_variance():
    """The increment of y at a restart, with the driver's own noise, has variance s_noise^2 (s_max^2 - s_k^2)."""
    sched = S.EDM(0.002, 80.0)
    grid = ds.schedules.make_grid(sched, 8, "log-snr")
    lv = _levels(sched, grid)
    k, hi, s_noise = 5, lv[5] * 3.0, 0.8
    solver = ds.get_solver("restart", restarts=[[2, 1, lv[k], hi]], s_noise=s_noise)
    x = 80.0 * torch.randn(4000, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    noise = NoiseSource(x.shape, seeds=0, dtype=torch.float64)
    zero = ds.models.GaussianMixture([[0.0] * 8], 1e-3).model(sched)
    queries: list = []
    drive(solver.run(x, grid, noise, schedule=sched), zero, queries)
    before = drive(ds.get_solver("heun").run(x, grid[: k + 1], None, schedule=sched), zero)  # x at t_k
    after = queries[2 * k][0]  # the first restart query, at s_max
    inc = after - before
    var = float(inc.var())
    want = s_noise**2 * (hi**2 - lv[k] ** 2)
    print("restart increment variance", var, "expected", want, "ratio", var / want)
    assert abs(var / want - 1) < 0.03  # 32000 draws: relative sd of the variance ~ 0.8 %
    assert abs(float(inc.mean())) < 4 * math.sqrt(want / inc.numel())


# ------------------------------------------------------------------ the law of the samples (tests/test_distribution.py)
N = 1500  # = conftest.GMM_N
GMM = ds.models.GaussianMixture.gmm_2d()
SCHED = S.VPLinear()


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"restarts": [[4, 2, 0.1, 1.0], [3, 1, 1.0, 3.0]]},
        {"restart_gamma": 0.05, "s_tmin": 0.01, "s_tmax": 1.0, "s_noise": 1.003},  # the official README's
    ],
)
def test_passes_two_sample_test(kw, threshold, reference):
    res = ds.sample(GMM.model(SCHED), "restart", 30, shape=(N, 2), seed=0, dtype=torch.float64, **kw)
    d = mmd2(res.samples, reference)
    print("restart", kw, "nfe", res.nfe, "mmd2", d, "threshold", threshold)
    assert d < threshold


def test_two_sample_test_fails_with_two_steps(threshold, reference):
    res = ds.sample(
        GMM.model(SCHED), "restart", 2, shape=(N, 2), seed=0, dtype=torch.float64, restarts=[[2, 1, 0.5, 1.0]]
    )
    d = mmd2(res.samples, reference)
    print("restart", 2, "mmd2", d, "threshold", threshold)
    assert d > 5 * threshold
