"""Gotta Go Fast (adaptive-sde): the step by hand, the controller, the law, the Brownian path."""

import math

import pytest
import torch

import diffsolve as ds
from diffsolve.metrics import mmd2
from diffsolve.samplers import NoiseSource, StepSizeController

N = 1500  # = conftest.GMM_N (the threshold and reference fixtures)
GMM = ds.models.GaussianMixture.gmm_2d()
VP = ds.schedules.VPLinear()


def test_controller_by_hand():
    c = StepSizeController()
    f = c.factor(torch.tensor([0.5, 1.0, 2.0, 0.0]))
    assert torch.allclose(f[:3], torch.tensor([0.9 * 0.5**-0.9, 0.9, 0.9 * 2**-0.9], dtype=torch.float64))
    assert math.isinf(f[3])
    err = torch.tensor([[0.02, -0.01], [0.0, 0.3]])
    prev = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    new = torch.tensor([[2.0, 0.5], [0.0, 10.0]])
    # delta = max(atol, rtol * max(|prev|, |new|)) with atol 0.01, rtol 0.1
    d = torch.tensor([[0.2, 0.05], [0.01, 1.0]])
    want = ((err / d) ** 2).mean(dim=1).sqrt().double()
    assert torch.allclose(c.error_norm(err, prev, new, 0.01, 0.1), want)
    pi = StepSizeController(exponent=0.7, exponent_prev=0.4, factor_min=0.2, factor_max=5.0)
    got = pi.factor(torch.tensor([0.5, 1e-9, 1e9]), torch.tensor([0.8, 1.0, 1.0]))
    assert torch.allclose(got, torch.tensor([0.9 * 0.5**-0.7 * 0.8**0.4, 5.0, 0.2], dtype=torch.float64))
    with pytest.raises(ValueError, match="safety"):
        StepSizeController(safety=1.5)


def test_pid_controller_limiter_accept_and_history_by_hand():
    """PID in k-diffusion's coefficients, its smooth atan limiter, the accept threshold, and the
    (err_prev, err_prev2) record that accepted tries shift in."""
    pid = StepSizeController.pid(3, pcoeff=0.1, icoeff=0.3, dcoeff=0.05, safety=1.0, limiter="atan", accept=1.5)
    b1, b2, b3 = (0.1 + 0.3 + 0.05) / 3, -(0.1 + 2 * 0.05) / 3, 0.05 / 3
    err = torch.tensor([0.5, 1.2, 2.0], dtype=torch.float64)
    hist = torch.tensor([[0.7, 0.9], [1.1, 0.3], [1.0, 1.0]], dtype=torch.float64)
    raw = (1 / err) ** b1 * (1 / hist[:, 0]) ** b2 * (1 / hist[:, 1]) ** b3
    assert torch.allclose(pid.factor(err, hist), 1 + torch.atan(raw - 1))
    assert pid.accepts(err).tolist() == [True, True, False]
    h0 = StepSizeController.history(3)
    assert torch.equal(h0, torch.ones(3, 2, dtype=torch.float64))
    h1 = StepSizeController.push(hist, err, pid.accepts(err))
    assert torch.equal(h1, torch.tensor([[0.5, 0.7], [1.2, 1.1], [1.0, 1.0]], dtype=torch.float64))
    # a rejected try shrinks even where the D term alone would grow it (else it retries for ever)
    d = StepSizeController(safety=0.9, exponent=0.9, exponent_prev2=0.1)
    grow = d.factor(torch.tensor([0.95, 1.2]), torch.tensor([[1.0, 0.05], [1.0, 0.05]]))
    assert float(grow[0]) > 1 and float(grow[1]) == pytest.approx(0.9 * 1.2**-0.9)
    for bad, match in (
        ({"limiter": "tanh"}, "limiter must be one of clip, atan"),
        ({"accept": 0.0}, "accept"),
        ({"exponent_prev2": -1.0}, "exponent_prev2"),
    ):
        with pytest.raises(ValueError, match=match):
            StepSizeController(**bad)


@pytest.mark.parametrize(
    "solver,order,opts",
    [
        ("adaptive-sde", 1 / 0.9, {"eps_rel": 0.05}),
        ("mrs-adaptive", 4, {"rtol": 1e-3}),
        ("mrs-sde-adaptive", 1 / 0.9, {"rtol": 0.05}),
    ],
)
def test_one_controller_object_drives_every_adaptive_solver(solver, order, opts):
    """A PID controller with the atan limiter passed to each adaptive solver is the one they use: a
    looser accept threshold accepts more and rejects less on the same problem."""
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = GMM.model(VP)
    res = {}
    for accept in (1.0, 4.0):
        c = StepSizeController.pid(
            order,
            pcoeff=0.0,
            icoeff=1.0,
            dcoeff=0.2,
            safety=0.9,
            factor_min=0.2,
            factor_max=5.0,
            limiter="atan",
            accept=accept,
        )
        r = ds.sample(model, solver, x_T=x_T, seed=0, controller=c, **opts)
        assert torch.isfinite(r.samples).all()
        res[accept] = (int(r.rejected.sum()), float(r.nfe_per_sample.double().mean()))
    print(solver, "rejected, NFE per sample at accept 1 / 4:", res)
    assert res[4.0][0] < res[1.0][0] and res[4.0][1] < res[1.0][1]


def test_one_step_by_hand_shared_noise():
    """With a zero score under VE, K2 - K1 = (g(t - h) - g(t)) sqrt(h) z: the error is pure diffusion
    change, and both stages use the same z. Checks K1, K2, the error norm, accept/reject and h."""
    ve = ds.schedules.VE()
    model = ds.DiffusionModel(lambda x, t: torch.zeros_like(x), ve, "score")
    solver = ds.get_solver("adaptive-sde", eps_rel=0.01, eps_abs=0.0039, h_init=0.01)
    x = torch.tensor([[300.0, -250.0, 400.0], [0.1, 0.2, -0.1]], dtype=torch.float64)
    grid = torch.tensor([ve.t_max, ve.t_min], dtype=torch.float64)
    noise = NoiseSource(x.shape, seeds=[3, 4], dtype=torch.float64, kind="brownian", t_range=(ve.t_min, ve.t_max))
    run = solver.run(x, grid, noise, schedule=ve)
    q1 = next(run)
    assert torch.equal(q1.x, x) and torch.equal(q1.t, torch.tensor([1.0, 1.0], dtype=torch.float64))
    h, t = 0.01, 1.0
    z = noise.step(torch.full((2,), t, dtype=torch.float64), torch.full((2,), t - h, dtype=torch.float64), q1.rows)
    g_t, g_th = math.sqrt(float(ve.g2(t))), math.sqrt(float(ve.g2(t - h)))
    k1 = g_t * math.sqrt(h) * z
    q2 = run.send(model(q1.x, q1.t))
    assert torch.allclose(q2.x, x + k1) and torch.allclose(q2.t, torch.full((2,), t - h, dtype=torch.float64))
    k2 = g_th * math.sqrt(h) * z
    q3 = run.send(model(q2.x, q2.t))
    err = ((0.5 * (k2 - k1)) / torch.maximum(x.abs(), (x + k1).abs()).mul(0.01).clamp_min(0.0039)).pow(2).mean(1).sqrt()
    ok = err <= 1
    assert ok.any() and not ok.all(), err  # row 0 (large |x|) accepts, row 1 rejects
    want_x = torch.where(ok[:, None], x + 0.5 * (k1 + k2), x)
    want_t = torch.where(ok, torch.tensor(t - h, dtype=torch.float64), torch.tensor(t, dtype=torch.float64))
    assert torch.allclose(q3.x, want_x) and torch.allclose(q3.t, want_t)
    q4 = run.send(model(q3.x, q3.t))
    h_new = h * 0.9 * err.pow(-0.9)
    assert torch.allclose(q4.t, want_t - h_new)
    run.close()


@pytest.mark.parametrize("eps_rel", [0.01, 0.05, 0.1])
def test_law_matches_with_fewer_nfe_than_em(eps_rel, threshold, reference):
    """Within the two-sample test's noise (as 1000-step Euler-Maruyama is, test_distribution) at a
    fraction of EM's 1000 calls; and the model-row count matches the accept/reject counts."""
    res = ds.sample(GMM.model(VP), "adaptive-sde", shape=(N, 2), seed=0, dtype=torch.float64, eps_rel=eps_rel)
    d = mmd2(res.samples, reference)
    rows = res.nfe_per_sample.double().mean()
    print(
        f"eps_rel {eps_rel}: mmd2 {d:.2e} (threshold {threshold:.2e}) calls {res.nfe} rows/sample {rows:.1f} "
        f"accepted {res.accepted.double().mean():.1f} rejected {res.rejected.double().mean():.1f}"
    )
    assert d < threshold
    assert res.nfe < 600 and rows < 1000 / 2
    assert torch.equal(res.nfe_per_sample, 2 * (res.accepted + res.rejected) + 1)
    if eps_rel == 0.1:
        assert rows < 1000 / 5


def test_per_sample_mode_spends_fewer_rows_than_batch_mode():
    """Per-sample step sizes let easy samples finish early and leave the batch."""
    n = 400
    kw = dict(shape=(n, 2), seed=0, dtype=torch.float64, eps_rel=0.05)
    per = ds.sample(GMM.model(VP), "adaptive-sde", mode="per_sample", **kw)
    bat = ds.sample(GMM.model(VP), "adaptive-sde", mode="batch", **kw)
    print(
        "rows: per_sample",
        int(per.nfe_per_sample.sum()),
        "batch",
        int(bat.nfe_per_sample.sum()),
        "| calls",
        per.nfe,
        bat.nfe,
    )
    assert int(per.nfe_per_sample.sum()) < 0.8 * int(bat.nfe_per_sample.sum())
    assert bat.nfe_per_sample.unique().numel() == 1 and bat.accepted.unique().numel() == 1
    assert per.nfe_per_sample.unique().numel() > 5


def test_brownian_path_consistent_through_rejections():
    """Brownian noise is one path per seed, so as the tolerance tightens the adaptive solution converges
    strongly to the fine Euler-Maruyama solution on that same path, rejections and retries included;
    with fresh Gaussian draws per try it does not."""
    model = ds.models.GaussianMixture([[1.0, -1.0]], 0.5).model(VP)
    kw = dict(shape=(16, 2), seed=0, dtype=torch.float64, denoise=False)
    ref = ds.sample(model, "euler-maruyama", 2000, grid="uniform", noise="brownian", **kw).samples
    other = ds.sample(model, "euler-maruyama", 2000, grid="uniform", noise="brownian", **{**kw, "seed": 1}).samples
    dist = lambda a: float((a - ref).norm(dim=1).median())
    loose = ds.sample(model, "adaptive-sde", eps_rel=0.1, eps_abs=0.01, **kw)
    tight = ds.sample(model, "adaptive-sde", eps_rel=0.003, eps_abs=0.0003, **kw)
    fresh = ds.sample(model, "adaptive-sde", eps_rel=0.003, eps_abs=0.0003, noise="gaussian", **kw)
    print(
        "distance to the EM path: loose",
        dist(loose.samples),
        "tight",
        dist(tight.samples),
        "tight+gaussian",
        dist(fresh.samples),
        "other seed",
        dist(other),
        "rejections",
        int(tight.rejected.sum()),
    )
    assert int(tight.rejected.sum()) > 0
    assert dist(tight.samples) < 0.2 * dist(loose.samples) and dist(tight.samples) < 0.01 * dist(other)
    assert dist(fresh.samples) > 0.3 * dist(other)


def test_options_are_checked():
    with pytest.raises(ValueError, match="mode must be one of"):
        ds.get_solver("adaptive-sde", mode="lockstep")
    with pytest.raises(ValueError, match="eps_rel must be"):
        ds.get_solver("adaptive-sde", eps_rel=0)
    with pytest.raises(TypeError, match="controller"):
        ds.get_solver("adaptive-sde", controller=0.9)
    flow = ds.models.GaussianMixture([[0.5, -1.0]], 0.5).model(ds.schedules.RectifiedFlow())
    with pytest.raises(ValueError, match="sigma\\(t_min\\) > 0"):
        ds.sample(flow, "adaptive-sde", shape=(2, 2), seed=0)
    with pytest.raises(ValueError, match="infinite drift at t = 1"):  # alpha(1) = 0
        ds.sample(flow, "adaptive-sde", shape=(2, 2), seed=0, t_min=1e-3)
    res = ds.sample(flow, "adaptive-sde", shape=(2, 2), seed=0, t_max=0.99, t_min=1e-3)
    assert torch.isfinite(res.samples).all()
