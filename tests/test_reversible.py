"""Exact inversion: reversible solvers round-trip to round-off; plain inversion (DDIM etc.) does not."""

import math

import pytest
import torch

import diffsolve as ds
from diffsolve import UnstableError

SD = ds.schedules.VPDiscrete.from_diffusers_config(
    {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
)
_g = torch.Generator().manual_seed(0)
GMM = ds.models.GaussianMixture(0.8 * torch.randn(3, 16, generator=_g, dtype=torch.float64), 0.15)
X0 = GMM.sample(64, torch.Generator().manual_seed(1))
GAUSS = ds.models.GaussianMixture([[0.5, -1.0, 2.0, 0.0]], [[0.5, 1.0, 0.2, 2.0]])


def _rms(a, b):
    return float((a - b).pow(2).mean().sqrt())


EXACT = ["rev-heun", "bdia", "o-belm", "edict", "rex"]


@pytest.mark.parametrize("solver", EXACT)
def test_one_step_is_algebraically_reversible_with_a_random_mlp(solver):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4)).double()
    model = ds.DiffusionModel(
        lambda x, t: net(torch.cat([x, t[:, None].to(x.dtype)], 1)), ds.schedules.VPLinear(), "eps", time_input="t"
    )
    x0 = torch.randn(32, 4, dtype=torch.float64)
    info = ds.core.registry.solver_info(solver)
    with torch.no_grad():
        for steps in (1, 2, 7):
            lat = ds.invert(model, solver, x0, steps, grid="uniform")
            back = ds.sample(model, solver, latent=lat).samples
            assert float((back - x0).abs().max()) < (1e-12 if steps == 1 else 1e-10), steps
            assert lat.aux is not None
            if solver == "rev-heun":
                assert lat.nfe == steps + 1
            assert lat.nfe <= info.calls_per_step * steps + 1


def test_rectified_flow_inverts_from_its_clean_end():
    """Rectified flow's grid reaches sigma = 0: an x0-predicting model gives eps = 0 there (the limit
    for data with a density), so inversion can start at t_min = 0. The data form needs sigma > 0 and
    the noise form alpha > 0: with no range given the solvers move the singular end (where sigma / alpha
    or alpha / sigma is 0.002) and say so; an explicit grid through it is refused clearly; the
    exponential integrators need a finite log-SNR."""
    rf = ds.schedules.RectifiedFlow()
    model = GAUSS.model(rf)
    x0 = GAUSS.sample(16, torch.Generator().manual_seed(2))
    pred = model(x0, 0.0)
    assert torch.equal(pred.eps, torch.zeros_like(x0)) and torch.allclose(pred.x0, x0)
    ends = {"data": ("t_min", -1, 0.002 / 1.002), "noise": ("t_max", 0, 1 / 1.002)}
    for solver, form in (
        ("rev-heun", "data"),
        ("bdia", "data"),
        ("edict", "data"),
        ("rex", "data"),
        ("o-belm", "noise"),
        ("rev-heun", "noise"),
    ):
        opts = {} if solver == "rex" else {"form": form}
        key, i, t_end = ends[form]
        with pytest.warns(UserWarning, match=f"cannot reach RectifiedFlow's {key}=.*pass {key} to choose"):
            lat = ds.invert(model, solver, x0, 50, **opts)
        assert float(lat.grid[i]) == pytest.approx(t_end, rel=1e-9), (solver, form)
        assert _rms(ds.sample(model, solver, latent=lat, **opts).samples, x0) < 1e-9, (solver, form)
        grid = torch.linspace(1.0, 0.0, 11).tolist()
        with pytest.raises(ValueError, match="sigma > 0" if form == "data" else "alpha > 0 .*t_max"):
            ds.invert(model, solver, x0, grid=grid, **opts)
    with pytest.raises(ValueError, match="dpmpp-2m cannot step away from sigma = 0"):
        ds.invert(model, "dpmpp-2m", x0, 50)
    heun = ds.invert(model, "heun", x0, 50)  # plain inversion works from the clean end
    assert _rms(ds.sample(model, "heun", latent=heun).samples, x0) < 0.05


@pytest.mark.parametrize("solver", EXACT)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 5e-5)])
def test_round_trip_on_a_stable_diffusion_schedule(solver, dtype, tol):
    """x0 -> invert -> sample at 50 steps on the SD scaled-linear schedule (16-D mixture, unit scale)."""
    model = GMM.model(SD)
    x0 = X0.to(dtype)
    lat = ds.invert(model, solver, x0, 50)
    err = _rms(ds.sample(model, solver, latent=lat).samples, x0)
    ddim = ds.invert(model, "ddim", x0, 50)
    err_ddim = _rms(ds.sample(model, "ddim", latent=ddim).samples, x0)
    print(f"{dtype}: round trip rms {solver} {err:.2e}, ddim inversion {err_ddim:.2e}")
    assert err < tol
    assert err_ddim > 1e-3  # plain DDIM inversion is not exact: the gain is visible


def test_documented_instabilities():
    """BDIA with gamma < 1 divides by gamma in the inverse (x2 per step at 0.5: 2^100 at 100 steps, more
    than float64's 1e16 can absorb, and the states are float64 even for float32 data); EDICT's inverse
    mixing expands x - y by 1/p^2 = 1.156 per step, so at 100 steps its latent runs away from the ODE
    latent (its round trip stays exact)."""
    model = GMM.model(SD)
    x32 = X0.to(torch.float32)
    for x in (x32, X0):
        lat = ds.invert(model, "bdia", x, 100, gamma=0.5)
        with pytest.raises(UnstableError, match=r"'bdia'.*unstable at step .* of 100: its state is no longer finite"):
            ds.sample(model, "bdia", latent=lat, gamma=0.5)
    lat = ds.invert(model, "bdia", x32, 30, gamma=0.5)  # 2^30 x 1e-16: still exact at 30 steps
    assert _rms(ds.sample(model, "bdia", latent=lat, gamma=0.5).samples, x32) < 1e-5
    exact = {n: ds.invert(model, "rev-heun", X0, 400).x for n in (50, 100)}  # reference latent (2nd order)
    e50 = _rms(ds.invert(model, "edict", x32, 50).x.double(), exact[50])
    lat100 = ds.invert(model, "edict", x32, 100)
    e100 = _rms(lat100.x.double(), exact[100])
    print("edict latent error at 50 / 100 steps", e50, e100)
    assert e100 > 10 * e50 and e100 > 0.1
    assert _rms(ds.sample(model, "edict", latent=lat100).samples, x32) < 5e-5


@pytest.mark.parametrize(
    "solver,form,order",
    [
        ("rev-heun", "data", 2),
        ("rev-heun", "noise", 2),
        ("o-belm", "noise", 2),
        ("o-belm", "data", 2),
        ("bdia", "data", 2),
        ("bdia", "noise", 2),
        ("edict", "noise", 1),
        ("edict", "data", 2),
    ],
)
def test_sampling_order_on_the_closed_form_gaussian(solver, form, order):
    """Orders in both forms. EDICT is first order in general; in the data form on a single Gaussian
    (a field linear in u) it superconverges to 2 (measured 1.9, 2.3). EDICT's noise form at 20 steps
    parts its chains by 1.15 times the state mid-run and is refused (UnstableError): from 40 steps,
    where it converges at least at first order (measured 1.8 between 80 and 160 steps)."""
    sched = ds.schedules.VPLinear()
    x_T = GAUSS.marginal(sched.t_max, sched).sample(64, torch.Generator().manual_seed(0))
    exact = GAUSS.flow_map(x_T, sched.t_max, sched.t_min, sched)
    counts = (40, 80, 160) if (solver, form) == ("edict", "noise") else (20, 40, 80)
    errs = [
        float((ds.sample(GAUSS.model(sched), solver, n, x_T=x_T, form=form).samples - exact).abs().max())
        for n in counts
    ]
    orders = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    print(solver, "errors", errs, "orders", orders)
    if solver == "edict":
        assert orders[-1] > order - 0.3
    else:
        assert abs(orders[-1] - order) < 0.3


@pytest.mark.parametrize("base,order", [("euler", 1), ("midpoint", 2)])
def test_rex_follows_its_base_order(base, order):
    """On the 16-D mixture under VPLinear against 1000 heun steps. Measured: euler base about 1.8 (the
    coupled pair is nearly symmetric at zeta = 0.999), midpoint base 2.0; on a single Gaussian they
    superconverge (2.4 and 4.1), so the mixture is the honest check."""
    sched = ds.schedules.VPLinear()
    model = GMM.model(sched)
    x_T = torch.randn(32, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = ds.sample(model, "heun", 1000, x_T=x_T).samples
    errs = [_rms(ds.sample(model, "rex", n, x_T=x_T, base=base).samples, ref) for n in (40, 80)]
    print("rex", base, "errors", errs, "order", math.log2(errs[0] / errs[1]))
    assert math.log2(errs[0] / errs[1]) > order - 0.3


@pytest.mark.parametrize("solver,order", [("ddim", 1), ("heun", 2), ("dpmpp-2m", 2)])
def test_plain_inversion_converges_to_the_exact_latent(solver, order):
    """Deterministic solvers invert by running their steps backwards; the latent converges to the exact
    ODE latent at the solver's order."""
    sched = ds.schedules.VPLinear()
    model = GAUSS.model(sched)
    x0 = GAUSS.marginal(sched.t_min, sched).sample(32, torch.Generator().manual_seed(0))
    exact = GAUSS.flow_map(x0, sched.t_min, sched.t_max, sched)
    errs = [float((ds.invert(model, solver, x0, n).x - exact).abs().max()) for n in (40, 80)]
    print(solver, "latent errors", errs)
    assert math.log2(errs[0] / errs[1]) > order - 0.35


def test_reversible_option_errors():
    with pytest.raises(ValueError, match="gamma must be in"):
        ds.get_solver("bdia", gamma=0)
    with pytest.raises(ValueError, match="p must be in"):
        ds.get_solver("edict", p=1.0)
    with pytest.raises(ValueError, match="base must be one of"):
        ds.get_solver("rex", base="rk4")
    with pytest.raises(ValueError, match="coupling must be in"):
        ds.get_solver("rex", coupling=1.5)


def test_invert_errors():
    model = GAUSS.model(ds.schedules.VPLinear())
    x0 = torch.zeros(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="stochastic"):
        ds.invert(model, "ddpm", x0, 10)
    with pytest.raises(TypeError, match="x0 must be"):
        ds.invert(model, "ddim", None, 10)
    lat = ds.invert(model, "rev-heun", x0, 5)
    with pytest.raises(ValueError, match="made by 'rev-heun'"):
        ds.sample(model, "ddim", latent=lat)
    with pytest.raises(ValueError, match="x_T or latent"):
        ds.sample(model, "rev-heun", latent=lat, x_T=x0)


def test_renoise_refines_ddim_inversion():
    """ReNoise iterates the implicit inversion of the DDIM step; at convergence DDIM sampling undoes it.
    Paper defaults cut the 50-step round trip by about 100x; more iterations reach round-off."""
    model = GMM.model(SD)
    plain = ds.invert(model, "ddim", X0, 50)
    rn = ds.invert(model, "ddim", X0, 50, renoise=True)
    many = ds.invert(
        model,
        "ddim",
        X0,
        50,
        renoise=ds.samplers.ReNoise(steps=20, average=(15, 20), first_steps=20, first_average=(15, 20)),
    )
    errs = [_rms(ds.sample(model, "ddim", latent=lat).samples, X0) for lat in (plain, rn, many)]
    print("ddim round trip: plain / renoise / renoise x20", errs, "NFE", plain.nfe, rn.nfe, many.nfe)
    assert errs[1] < errs[0] / 30 and errs[2] < 1e-8
    g = rn.grid  # 1 + K calls per step; K = 5 for steps ending in the first quarter of the time range
    first = int(((g[:-1] - g[-1]) < 0.25 * (g[0] - g[-1])).sum())
    assert rn.nfe == 50 + 9 * (50 - first) + 5 * first and 0 < first < 50
    with pytest.raises(TypeError, match="renoise"):  # an option of ddim only
        ds.invert(model, "heun", X0, 10, renoise=True)
    with pytest.raises(ValueError, match="needs eta = 0"):
        ds.get_solver("ddim", eta=0.5, renoise=True)
    with pytest.raises(ValueError, match="averaging window"):
        ds.samplers.ReNoise(steps=3, average=(5, 6))
