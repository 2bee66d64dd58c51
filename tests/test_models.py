import math

import pytest
import torch
from test_schedules import ALL

import diffsolve as ds
from diffsolve.models import PREDICTIONS, Coefs, Empirical, GaussianMixture, from_x0_eps, to_x0_eps
from diffsolve.models.model import Prediction


def coefs_at(s, t, x):
    shape = (-1,) + (1,) * (x.ndim - 1)
    return Coefs(
        s.alpha(t).reshape(shape),
        s.sigma(t).reshape(shape),
        s.alpha_dot(t).reshape(shape),
        s.sigma_dot(t).reshape(shape),
    )


@pytest.mark.parametrize("name", ALL)
def test_every_parameterisation_round_trips(name):
    """Every prediction kind converts to every other and back to 1e-10 (float64), mu included."""
    s = ALL[name]()
    g = torch.Generator().manual_seed(0)
    b = 6
    t = s.t_min + (s.t_max - s.t_min) * torch.linspace(0.05, 0.95, b, dtype=torch.float64)
    x0 = torch.randn(b, 3, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(b, 3, 4, generator=g, dtype=torch.float64)
    mu = torch.randn(b, 3, 4, generator=g, dtype=torch.float64) if "mr" in name or "ouve" in name else 0.0
    c = coefs_at(s, t, x0)
    x = mu + c.alpha * (x0 - mu) + c.sigma * eps
    for src in PREDICTIONS:
        out = from_x0_eps(src, x0, eps, c, mu)
        x0_b, eps_b = to_x0_eps(src, out, x, c, mu)
        assert torch.allclose(x0_b, x0, atol=1e-10, rtol=1e-10), src
        assert torch.allclose(eps_b, eps, atol=1e-10, rtol=1e-10), src
        for dst in PREDICTIONS:
            pred = Prediction(x, t, out, src, s, mu if isinstance(mu, torch.Tensor) else None)
            expect = from_x0_eps(dst, x0, eps, c, mu)
            got = getattr(pred, {"eps": "eps", "x0": "x0", "v": "v", "score": "score", "velocity": "velocity"}[dst])
            assert torch.allclose(got, expect, atol=1e-10, rtol=1e-10), (src, dst)


def test_velocity_is_probability_flow_drift():
    """velocity = -f (x - mu) - g2/2 score, the probability-flow ODE drift."""
    s = ds.schedules.MeanReverting(lam=0.4)
    gmm = GaussianMixture([[1.0, -1.0], [-0.5, 0.5]], [0.3, 0.5])
    model = gmm.model(s)
    x = torch.randn(5, 2, dtype=torch.float64)
    mu = torch.tensor([0.2, -0.3], dtype=torch.float64)
    pred = model(x, 0.4, mu=mu)
    drift = -s.f(0.4) * (x - mu) - 0.5 * s.g2(0.4) * pred.score
    assert torch.allclose(pred.velocity, drift, atol=1e-12)
    # rectified flow: velocity = eps - x0
    rf = ds.schedules.RectifiedFlow()
    pred = gmm.model(rf)(x, 0.3)
    assert torch.allclose(pred.velocity, pred.eps - pred.x0, atol=1e-12)


@pytest.mark.parametrize("sched", [ds.schedules.VPLinear(), ds.schedules.VE(), ds.schedules.MeanReverting(lam=0.5)])
def test_gmm_denoiser_is_tweedie(sched):
    """The mixture's x0 prediction equals Tweedie's formula with the autograd score of log p_t."""
    gmm = GaussianMixture([[1.0, -1.0, 0.0], [-1.0, 0.5, 2.0]], [[0.3, 0.2, 0.4], [0.5, 0.6, 0.1]], [0.3, 0.7])
    mu = torch.tensor([0.5, 0.1, -0.2], dtype=torch.float64) if isinstance(sched, ds.schedules.MeanReverting) else None
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    t = 0.37
    (score,) = torch.autograd.grad(gmm.log_prob(x, t, sched, mu).sum(), x)
    a, s = float(sched.alpha(t)), float(sched.sigma(t))
    m = 0.0 if mu is None else mu
    tweedie = m + (x.detach() - m + s * s * score) / a
    assert torch.allclose(gmm.denoise(x.detach(), t, sched, mu), tweedie, atol=1e-10)


def test_gmm_marginal_sampling_and_flow_map():
    gmm = GaussianMixture([[2.0, -1.0]], [[0.5, 1.5]])
    sched = ds.schedules.VPLinear()
    x = gmm.marginal(0.8, sched).sample(4000, torch.Generator().manual_seed(1))
    y = gmm.flow_map(x, 0.8, 0.01, sched)
    target = gmm.marginal(0.01, sched)
    assert torch.allclose(y.mean(0), target.means[0], atol=0.1)
    assert torch.allclose(y.std(0), target.stds[0], rtol=0.05)
    # flow map composes: 0.8 -> 0.4 -> 0.01 equals 0.8 -> 0.01
    assert torch.allclose(gmm.flow_map(gmm.flow_map(x, 0.8, 0.4, sched), 0.4, 0.01, sched), y, atol=1e-12)


def test_empirical_oracle():
    e = Empirical.digits()
    assert e.data.shape == (1797, 1, 8, 8)
    assert e.data.min() == -1 and e.data.max() == 1
    assert e.labels.shape == (1797,) and set(e.labels.tolist()) == set(range(10))
    sched = ds.schedules.VPLinear()
    # at low noise the optimal denoiser returns the nearest data point
    x = e.data[:5] * float(sched.alpha(1e-3)) + 1e-3 * torch.randn(5, 1, 8, 8, dtype=torch.float64)
    assert torch.allclose(e.denoise(x, 1e-3, sched), e.data[:5], atol=1e-6)
    # at high noise it returns (nearly) the data mean
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64) * 0.01
    assert torch.allclose(e.denoise(x, 1.0, sched), e.data.mean(0).expand(3, 1, 8, 8), atol=0.05)
    # it agrees with a Gaussian mixture of tiny-std components on the same points
    pts = torch.tensor([[0.0, 1.0], [1.0, -1.0], [-2.0, 0.5]], dtype=torch.float64)
    mix = GaussianMixture(pts, 1e-6)
    x = torch.randn(8, 2, dtype=torch.float64)
    assert torch.allclose(Empirical(pts).denoise(x, 0.5, sched), mix.denoise(x, 0.5, sched), atol=1e-8)


def test_time_inputs_and_nfe_count():
    sched = ds.schedules.VPDiscrete.from_diffusers_config({})
    seen = []

    def net(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    x = torch.zeros(3, 2)
    t = sched.t_of_timestep(torch.tensor(499.0))
    ds.DiffusionModel(net, sched)(x, t)
    assert torch.allclose(seen[-1], torch.full((3,), 499.0, dtype=torch.float64))
    ds.DiffusionModel(net, sched, time_input="1000t")(x, 0.25)
    assert torch.allclose(seen[-1], torch.full((3,), 250.0, dtype=torch.float64))
    edm = ds.schedules.EDM()
    ds.DiffusionModel(net, edm, time_input="c_noise")(x, 2.0)
    assert torch.allclose(seen[-1], torch.full((3,), math.log(2.0) / 4, dtype=torch.float64))
    m = ds.DiffusionModel(net, sched, time_input=lambda t: t * 2)
    m(x, torch.tensor([0.1, 0.2, 0.3]))
    assert torch.allclose(seen[-1], torch.tensor([0.2, 0.4, 0.6], dtype=torch.float64))
    assert m.nfe == 1
    with pytest.raises(ValueError, match="time_input"):
        ds.DiffusionModel(net, sched, time_input="seconds")
    with pytest.raises(ValueError, match="prediction"):
        ds.DiffusionModel(net, sched, prediction="noise")
    with pytest.raises(ValueError, match=r"\[B\]"):
        m(x, torch.tensor([0.1, 0.2]))
