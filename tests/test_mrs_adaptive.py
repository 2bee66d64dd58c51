"""mrs-adaptive: error-controlled singlestep exponential integrator pairs in log-SNR, per sample."""

import pytest
import torch

import diffsolve as ds

S = ds.schedules
GAUSS = ds.models.GaussianMixture([[0.5, -1.0, 2.0, 0.0]], [[0.5, 1.0, 0.2, 2.0]])
MU = torch.tensor([0.3, -0.2, 0.1, 0.5], dtype=torch.float64)
SCHEDULES = {"vp": (S.VPLinear(), None), "ve": (S.VE(), None), "flow": (S.RectifiedFlow(t_max=0.999, t_min=1e-3), None),
             "mean-reverting": (S.MeanReverting(), MU)}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_error_tracks_the_tolerance_on_the_closed_form_gaussian(name):
    sched, mu = SCHEDULES[name]
    model = GAUSS.model(sched)
    x_T = GAUSS.marginal(sched.t_max, sched, mu).sample(64, torch.Generator().manual_seed(0))
    exact = GAUSS.flow_map(x_T, sched.t_max, sched.t_min, sched, mu)
    nfe = []
    for rtol in (1e-2, 1e-3, 1e-4, 1e-5):
        res = ds.sample(model, "mrs-adaptive", x_T=x_T, mu=mu, rtol=rtol, atol=rtol)
        err = float((res.samples - exact).abs().max())
        nfe.append(float(res.nfe_per_sample.double().mean()))
        print(name, rtol, "max error", err, "NFE per sample", nfe[-1])
        assert rtol / 10 <= err <= 10 * rtol, (rtol, err)
        assert torch.equal(res.nfe_per_sample, 3 * res.accepted + 2 * res.rejected)  # a retry reuses its first call
    assert nfe == sorted(nfe)


def test_per_sample_mode_spends_fewer_rows_than_batch_mode_on_a_heterogeneous_batch():
    """Well-separated components of very different sizes: each sample's path needs its own steps."""
    gmm = ds.models.GaussianMixture([[-4.0, 0.0], [4.0, 0.0], [0.0, 6.0]], torch.tensor([0.02, 1.0, 0.2]))
    model = gmm.model(S.VPLinear())
    x_T = torch.randn(200, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rows = {}
    for mode in ("per_sample", "batch"):
        res = ds.sample(model, "mrs-adaptive", x_T=x_T, rtol=1e-3, atol=1e-3, mode=mode)
        rows[mode] = int(res.nfe_per_sample.sum())
        if mode == "batch":
            assert res.stats["grid"][0] == S.VPLinear().t_max and len(res.stats["grid"]) == int(res.accepted[0]) + 1
    print("model rows: per_sample", rows["per_sample"], "batch", rows["batch"])
    assert rows["per_sample"] < rows["batch"]


def test_per_sample_results_do_not_depend_on_the_batch():
    model = GAUSS.model(S.VPLinear())
    x_T = torch.randn(12, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    full = ds.sample(model, "mrs-adaptive", x_T=x_T, rtol=1e-3).samples
    part = ds.sample(model, "mrs-adaptive", x_T=x_T[3:7], rtol=1e-3).samples
    assert torch.allclose(full[3:7], part, rtol=0, atol=1e-12)


def test_order_two_pair_and_errors():
    model = GAUSS.model(S.VPLinear())
    x_T = torch.randn(8, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    res = ds.sample(model, "mrs-adaptive", x_T=x_T, order=2, rtol=1e-3)
    assert torch.equal(res.nfe_per_sample, 2 * res.accepted + res.rejected)
    with pytest.raises(ValueError, match="order must be 2 or 3"):
        ds.get_solver("mrs-adaptive", order=1)
    with pytest.raises(ValueError, match="t_max < 1"):
        ds.sample(GAUSS.model(S.RectifiedFlow()), "mrs-adaptive", x_T=x_T)


def test_pilot_grid_replayed_by_the_fixed_grid_solver_keeps_the_accuracy():
    """mrs-adaptive chooses a grid on 8 pilot samples (batch mode); dpmpp-3s, the same step on a fixed
    grid, replays it on 64 other samples: its error is within 2x of mrs-adaptive's own on them."""
    for name in ("vp", "mean-reverting"):
        sched, mu = SCHEDULES[name]
        model = GAUSS.model(sched)
        grid = ds.samplers.pilot_grid(model, (8, 4), seed=100, mu=mu, rtol=1e-4, atol=1e-4)
        x_T = GAUSS.marginal(sched.t_max, sched, mu).sample(64, torch.Generator().manual_seed(0))
        exact = GAUSS.flow_map(x_T, sched.t_max, sched.t_min, sched, mu)
        adaptive = ds.sample(model, "mrs-adaptive", x_T=x_T, mu=mu, rtol=1e-4, atol=1e-4)
        replay = ds.sample(model, "dpmpp-3s", x_T=x_T, mu=mu, grid=grid.tolist())
        e_a = float((adaptive.samples - exact).abs().max())
        e_r = float((replay.samples - exact).abs().max())
        print(name, "pilot grid of", len(grid) - 1, "steps: replay error", e_r, "adaptive error", e_a,
              "NFE per sample", replay.nfe, float(adaptive.nfe_per_sample.double().mean()))
        assert e_r <= 2 * e_a and replay.nfe == 3 * (len(grid) - 1)


def test_dpmpp_3s_is_third_order():
    sched = S.VPLinear()
    model = GAUSS.model(sched)
    x_T = GAUSS.marginal(sched.t_max, sched).sample(32, torch.Generator().manual_seed(0))
    exact = GAUSS.flow_map(x_T, sched.t_max, sched.t_min, sched)
    errs = [float((ds.sample(model, "dpmpp-3s", n, x_T=x_T, grid="log-snr").samples - exact).abs().max())
            for n in (20, 40, 80)]
    import math
    order = math.log2(errs[1] / errs[2])
    print("dpmpp-3s errors", errs, "order", order)
    assert order > 2.6


def test_pilot_grid_replayed_by_the_diffusers_scheduler_adapter():
    """The grid chosen on a pilot batch, as explicit timesteps of DiffsolveScheduler(dpmpp-3s) in a
    diffusers-style loop, gives the driver's replay of the same grid."""
    from diffsolve.integrations.diffusers import DiffsolveScheduler

    cfg = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
    sd = S.VPDiscrete.from_diffusers_config(cfg)
    model = GAUSS.model(sd)
    grid = ds.samplers.pilot_grid(model, (8, 4), seed=3, rtol=1e-3, atol=1e-3)
    assert float(grid[-1]) == sd.t_min  # ends at timestep 0
    sched = DiffsolveScheduler.from_config({**cfg, "prediction_type": "epsilon"}, solver="dpmpp-3s",
                                           final="sigma_min")
    sched.set_timesteps(timesteps=sd.timestep(grid[:-1]).tolist())
    x_T = torch.randn(16, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x = x_T.clone()
    for ts in sched.timesteps:
        eps = model(x, sd.t_of_timestep(torch.as_tensor(ts, dtype=torch.float64))).eps
        x = sched.step(eps, ts, x).prev_sample
    want = ds.sample(model, "dpmpp-3s", x_T=x_T, grid=grid.tolist()).samples
    print("pilot grid of", len(grid) - 1, "steps; scheduler vs driver", float((x - want).abs().max()))
    assert len(sched.timesteps) == 3 * (len(grid) - 1)
    assert torch.allclose(x, want, rtol=0, atol=1e-7)  # the loop queries the model at float32 timesteps
