import math

import pytest
import torch
from diffusers import DDPMScheduler

from diffsolve import schedules as S

ALL = {
    "vp-linear": lambda: S.VPLinear(),
    "vp-cosine": lambda: S.VPCosine(),
    "vp-discrete": lambda: S.VPDiscrete(betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)),
    "sd-discrete": lambda: S.VPDiscrete.from_diffusers_config(
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    ),
    "subvp": lambda: S.SubVP(),
    "ve": lambda: S.VE(),
    "edm": lambda: S.EDM(),
    "flow": lambda: S.RectifiedFlow(t_min=1e-3, t_max=1 - 1e-3),
    "flow-shift3": lambda: S.RectifiedFlow(shift=3.0, t_min=1e-3, t_max=1 - 1e-3),
    "mr-cosine": lambda: S.MeanReverting(),
    "mr-linear": lambda: S.MeanReverting(lam=0.5, theta="linear"),
    "ouve": lambda: S.OUVE(),
}


def interior(s, n=9):
    return torch.linspace(s.t_min, s.t_max, n + 2, dtype=torch.float64)[1:-1]


@pytest.mark.parametrize("name", ALL)
def test_log_snr_inverse(name):
    s = ALL[name]()
    t = interior(s)
    assert torch.allclose(s.t_of_log_snr(s.log_snr(t)), t, rtol=1e-9, atol=1e-9)
    lam = s.log_snr(t)
    assert bool((lam[1:] < lam[:-1]).all()), "log-SNR must decrease in t"
    assert torch.allclose(lam, torch.log(s.alpha(t) / s.sigma(t)), atol=1e-10)


@pytest.mark.parametrize("name", ALL)
def test_f_g2_consistent_with_sigma(name):
    """d sigma^2/dt = -2 f sigma^2 + g2 and d alpha/dt = -f alpha, by central differences."""
    s = ALL[name]()
    t = interior(s)
    h = 1e-6 * (s.t_max - s.t_min)
    dvar = (s.sigma(t + h) ** 2 - s.sigma(t - h) ** 2) / (2 * h)
    rhs = -2 * s.f(t) * s.sigma(t) ** 2 + s.g2(t)
    assert torch.allclose(dvar, rhs, rtol=1e-5, atol=1e-8)
    dalpha = (s.alpha(t + h) - s.alpha(t - h)) / (2 * h)
    assert torch.allclose(dalpha, -s.f(t) * s.alpha(t), rtol=1e-5, atol=1e-8)
    assert bool((s.g2(t) > 0).all())


def test_g2_equals_minus_two_sigma2_dlambda():
    s = S.MeanReverting()
    t = interior(s)
    h = 1e-6
    dlam = (s.log_snr(t + h) - s.log_snr(t - h)) / (2 * h)
    assert torch.allclose(s.g2(t), -2 * s.sigma(t) ** 2 * dlam, rtol=1e-5)


@pytest.mark.parametrize(
    "cfg",
    [
        {},
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"beta_schedule": "linear", "num_train_timesteps": 500, "beta_end": 0.03},
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "rescale_betas_zero_snr": True},
    ],
)
def test_vpdiscrete_matches_diffusers(cfg):
    ref = DDPMScheduler(**cfg)
    s = S.VPDiscrete.from_diffusers_config(ref.config)
    n = ref.config.num_train_timesteps
    k = torch.arange(n)
    acp = s.alpha(s.t_of_timestep(k)) ** 2
    expect = ref.alphas_cumprod.to(torch.float64).clamp(min=2.0**-24)
    assert (acp - expect).abs().max() < 1e-6
    assert torch.allclose(s.timestep(s.t_of_timestep(k)), k.to(torch.float64))


def test_vpdiscrete_continuous_limit():
    """A fine discrete linear schedule approaches the continuous VP-SDE (beta = N * beta_discrete)."""
    n = 1000
    disc = S.VPDiscrete(betas=torch.linspace(0.1 / n, 20 / n, n, dtype=torch.float64))
    cont = S.VPLinear()
    t = torch.linspace(0.05, 1, 20, dtype=torch.float64)
    assert (disc.alpha(t) - cont.alpha(t)).abs().max() < 5e-3


def test_schedule_reference_values():
    # VE: sigma(t) = sigma_min (sigma_max/sigma_min)^t
    ve = S.VE(sigma_min=0.01, sigma_max=50)
    assert math.isclose(float(ve.sigma(0.5)), 0.01 * 5000**0.5, rel_tol=1e-12)
    # sub-VP std is 1 - alpha^2
    sub = S.SubVP()
    assert math.isclose(float(sub.sigma(0.3)), 1 - float(sub.alpha(0.3)) ** 2, rel_tol=1e-12)
    # mean-reverting: alpha(1) = alpha_end, sigma -> lam sqrt(1 - alpha^2)
    mr = S.MeanReverting(lam=0.3, alpha_end=0.005)
    assert math.isclose(float(mr.alpha(1.0)), 0.005, rel_tol=1e-10)
    assert math.isclose(float(mr.sigma(1.0)), 0.3 * math.sqrt(1 - 0.005**2), rel_tol=1e-10)
    # with lam = 1, IR-SDE is VP with beta = 2 theta: alpha^2 + sigma^2 = 1
    mr1 = S.MeanReverting(lam=1.0)
    t = interior(mr1)
    assert torch.allclose(mr1.alpha(t) ** 2 + mr1.sigma(t) ** 2, torch.ones_like(t))
    # OUVE reference values from the SGMSE brief (table in shared research notes, section 9.1)
    ou = S.OUVE()
    for t_, a_, std_ in [(0.03, 0.955997, 0.018830), (0.5, 0.472367, 0.121657), (1.0, 0.223130, 0.388983)]:
        assert math.isclose(float(ou.alpha(t_)), a_, rel_tol=1e-5)
        assert math.isclose(float(ou.sigma(t_)), std_, rel_tol=1e-4)
    # the closed-form g of OUVE matches the derived g2
    L = math.log(0.5 / 0.05)
    g = 0.05 * (0.5 / 0.05) ** 0.5 * math.sqrt(2 * L)
    assert math.isclose(float(ou.g2(0.5)), g * g, rel_tol=1e-10)
    # rectified flow with shift: SD3's sigma = s t / (1 + (s - 1) t)
    rf = S.RectifiedFlow(shift=3.0)
    assert math.isclose(float(rf.sigma(0.5)), 1.5 / 2.0, rel_tol=1e-12)


def test_grids():
    s = S.VPLinear()
    for kind in S.GRID_KINDS:
        g = S.make_grid(s, 10, kind)
        assert g.dtype == torch.float64 and g.shape == (11,)
        assert g[0] == s.t_max and g[-1] == s.t_min
        assert bool((g[1:] < g[:-1]).all())
    lam = s.log_snr(S.make_grid(s, 10, "log-snr"))
    assert torch.allclose(lam.diff(), lam.diff()[0].expand(10), rtol=1e-9)
    g = S.make_grid(s, 10, "uniform", t_max=0.5, t_min=0.1)
    assert torch.allclose(g, torch.linspace(0.5, 0.1, 11, dtype=torch.float64))


def test_karras_grid_matches_edm():
    """EDM's N = 18 schedule (shared research notes, D.1)."""
    g = S.make_grid(S.EDM(), 17, "karras")
    expect = [
        80,
        57.586,
        40.786,
        28.375,
        19.353,
        12.910,
        8.401,
        5.315,
        3.257,
        1.923,
        1.088,
        0.585,
        0.296,
        0.1395,
        0.0599,
        0.0229,
        0.0075,
        0.002,
    ]
    # the notes print 3-4 significant digits
    assert torch.allclose(g, torch.tensor(expect, dtype=torch.float64), rtol=5e-3, atol=1e-4)
    i = torch.arange(18, dtype=torch.float64)
    formula = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert torch.allclose(g, formula, rtol=1e-12)


def test_flow_shift_grid_is_sd3_shift():
    g = S.make_grid(S.RectifiedFlow(), 10, "flow-shift", shift=3.0)
    u = torch.linspace(1, 0, 11, dtype=torch.float64)
    assert torch.allclose(g, 3 * u / (1 + 2 * u))


def test_grid_errors():
    s = S.VPLinear()
    with pytest.raises(ValueError, match="allowed"):
        S.make_grid(s, 10, "cosine")
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        S.make_grid(s, 0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        S.make_grid(s, None, [0.5, 0.7, 0.1])
    with pytest.raises(ValueError, match="finite log-SNR"):
        S.make_grid(S.RectifiedFlow(), 10, "log-snr")
    with pytest.raises(ValueError, match="t_min must be < t_max"):
        S.VPLinear(t_min=0.5, t_max=0.1)
    with pytest.raises(ValueError, match="beta_schedule"):
        S.VPDiscrete.from_diffusers_config({"beta_schedule": "sigmoid"})
    with pytest.raises(ValueError, match="theta"):
        S.MeanReverting(theta="constant")


from hypothesis import given, settings
from hypothesis import strategies as st


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(sorted(ALL)),
    kind=st.sampled_from(S.GRID_KINDS),
    steps=st.integers(1, 200),
    lo=st.floats(0.0, 0.4),
    hi=st.floats(0.6, 1.0),
)
def test_any_grid_is_descending_with_exact_ends(name, kind, steps, lo, hi):
    s = ALL[name]()
    t_min = s.t_min + lo * (s.t_max - s.t_min)
    t_max = s.t_min + hi * (s.t_max - s.t_min)
    g = S.make_grid(s, steps, kind, t_min=t_min, t_max=t_max)
    assert g.shape == (steps + 1,) and g[0] == t_max and g[-1] == t_min
    assert bool((g[1:] < g[:-1]).all())


def test_prior():
    s = S.MeanReverting(lam=0.3)
    z = torch.randn(4, 2, dtype=torch.float64)
    mu = torch.ones(4, 2, dtype=torch.float64)
    assert torch.allclose(s.prior((4, 2), mu, z), mu + float(s.sigma(1.0)) * z)
    assert torch.allclose(S.VE().prior(noise=z), 50.0 * z)
    with pytest.raises(ValueError, match="noise has shape"):
        s.prior((3, 2), None, z)
