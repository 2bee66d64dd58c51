"""EDM-style and flow schedulers of diffusers against diffsolve's entries: EDMEulerScheduler (euler, with
EDM's churn), EDMDPMSolverMultistepScheduler (dpmpp-2m, dpmpp-3m, dpmpp-2m-sde) and
FlowMatchHeunDiscreteScheduler (heun on rectified flow with shift). Each in a plain diffusers loop
against diffsolve's driver on the scheduler's own sigmas (same network, start and noise; the same
number of model calls) and through DiffsolveScheduler in the same loop."""

import math

import pytest
import torch
from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler, FlowMatchHeunDiscreteScheduler

import diffsolve as ds
from diffsolve.integrations.diffusers import DiffsolveScheduler

S = ds.schedules
W = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.3


def net(x, t):
    """A smooth time-conditioned network F(x_in, t_net) (the UNet's place)."""
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(x @ W + 0.3 * t) * 0.5 + 0.1 * x


def edm_model(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, prediction_type="epsilon"):
    """diffsolve's model of ``net`` under diffusers' EDM preconditioning (Karras et al. 2022, Table 1):
    x0 = c_skip x + c_out F(c_in x, log(s)/4), on the EDM schedule (alpha = 1, sigma = t)."""
    sign = 1.0 if prediction_type == "epsilon" else -1.0

    def pre(x, sigma):
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
        d = s * s + sigma_data**2
        f = net(x / d.sqrt(), 0.25 * torch.log(s).reshape(-1))
        return (sigma_data**2 / d) * x + sign * s * sigma_data / d.sqrt() * f

    return ds.models.DiffusionModel(pre, S.EDM(sigma_min, sigma_max), "x0", time_input="sigma")


def diffusers_loop(sched, n, x_T, gen=None, **step_kw):
    """The pipelines' loop: scale_model_input, the network at the scheduler's timestep, step."""
    sched.set_timesteps(n)
    x, calls = x_T.clone(), 0
    for t in sched.timesteps:
        scale = getattr(sched, "scale_model_input", None)  # FlowMatchHeun has none: the input is x
        out = net(x if scale is None else scale(x, t), t)
        calls += 1
        kw = dict(step_kw)
        if gen is not None:
            kw["generator"] = gen
        x = sched.step(out, t, x, **kw).prev_sample
    return x, calls


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def start(shape=(6, 3), seed=1):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


class Replay:
    """A noise source drawing from one generator in order (as a diffusers loop with ``generator=``)."""

    def __init__(self, seed, shape):
        self.gen, self.shape = torch.Generator().manual_seed(seed), shape

    def randn(self, index=None):
        return torch.randn(*self.shape, generator=self.gen, dtype=torch.float64)

    def step(self, t, t_next, index=None):
        return self.randn(index)


def drive(run, model):
    item, calls = next(run), 0
    try:
        while True:
            calls += 1
            item = run.send(model(item[0], item[1]))
    except StopIteration as stop:
        return stop.value, calls


# ------------------------------------------------------------------ EDMEulerScheduler: euler
EDM_CONFIGS = [
    {"sigma_schedule": "karras"},
    {"sigma_schedule": "exponential"},
    {"sigma_schedule": "karras", "prediction_type": "v_prediction", "sigma_data": 1.0},
    {"sigma_schedule": "karras", "sigma_min": 0.02, "sigma_max": 20.0, "rho": 5.0},
]


def _edm_model_of(ref):
    c = ref.config
    return edm_model(c.sigma_min, c.sigma_max, c.sigma_data, c.prediction_type)


@pytest.mark.parametrize("n", [4, 18])
@pytest.mark.parametrize("cfg", EDM_CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_edm_euler_matches_euler(cfg, n):
    ref = EDMEulerScheduler(**cfg)
    ref.set_timesteps(n)
    x_T = start() * float(ref.init_noise_sigma)
    theirs, calls = diffusers_loop(ref, n, x_T)
    model = _edm_model_of(ref)
    ours = ds.sample(model, "euler", grid=ref.sigmas.double(), x_T=x_T, dtype=torch.float64)
    ours_b, calls_b = diffusers_loop(DiffsolveScheduler.from_config(ref, solver="euler"), n, x_T)
    e1, e2 = rel(ours.samples, theirs), rel(ours_b, theirs)
    print(cfg, n, "calls", calls, ours.nfe, calls_b, "relative difference: driver", e1, "scheduler", e2)
    assert calls == ours.nfe == calls_b == n
    assert e1 < 1e-5 and e2 < 1e-5


def test_edm_euler_alias():
    assert ds.get_solver("edm-euler").name == "euler"
    assert ds.get_solver("edm_euler", s_churn=1.0).options()["s_churn"] == 1.0


def _euler_churn_by_hand(model, sigmas, x, z, s_churn, s_tmin, s_tmax, s_noise):
    """EDM's Algorithm 2 with an Euler step (k-diffusion's sample_euler), written out."""
    n = len(sigmas) - 1
    for i in range(n):
        s = float(sigmas[i])
        gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= s <= s_tmax else 0.0
        s_hat = s * (1 + gamma)
        if gamma > 0:
            x = x + z[i] * s_noise * (s_hat**2 - s**2) ** 0.5
        d = (x - model(x, s_hat).x0) / s_hat
        x = x + d * (float(sigmas[i + 1]) - s_hat)
    return x


@pytest.mark.parametrize("churn", [(10.0, 0.0, float("inf"), 1.0), (40.0, 0.05, 5.0, 1.007)])
def test_euler_churn_is_edm_algorithm_2(churn):
    """euler with s_churn > 0 is EDM's stochastic sampler with Euler steps: by hand, with the same draws."""
    s_churn, s_tmin, s_tmax, s_noise = churn
    ref = EDMEulerScheduler()
    ref.set_timesteps(12)
    model = edm_model()
    x_T = start() * float(ref.init_noise_sigma)
    grid = ref.sigmas.double()
    gen = Replay(7, x_T.shape)
    zs = [gen.randn() for _ in range(12)]
    solver = ds.get_solver("euler", s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)

    class Draws:
        k = 0

        def randn(self, index=None):
            self.k += 1
            return zs[self.k - 1]

    churned = [i for i in range(12) if s_tmin <= float(grid[i]) <= s_tmax]
    z_used = [zs[churned.index(i)] if i in churned else None for i in range(12)]
    ours, calls = drive(solver.run(x_T, grid, Draws(), schedule=model.schedule), model)
    hand = _euler_churn_by_hand(model, grid, x_T, z_used, s_churn, s_tmin, s_tmax, s_noise)
    e = rel(ours, hand)
    print("euler churn", churn, "calls", calls, "relative difference to Algorithm 2 by hand", e)
    assert calls == 12 and e < 1e-12
    assert rel(ours, drive(ds.get_solver("euler").run(x_T, grid, None, schedule=model.schedule), model)[0]) > 1e-3


def test_diffusers_edm_euler_churn_uses_the_output_before_the_churn():
    """diffusers' EDMEulerScheduler churns after the model call: it combines the network output F at
    (x, s) with the churned x_hat at s_hat (x0 = c_skip(s_hat) x_hat + c_out(s_hat) F(c_in(s) x, s)).
    By hand that rule is diffusers' run to float32 precision; EDM's Algorithm 2 (our euler with the same
    draws) re-evaluates the model at (x_hat, s_hat) and differs. With s_churn = 0 they agree
    (test_edm_euler_matches_euler)."""
    n, s_churn = 12, 10.0
    ref = EDMEulerScheduler()
    ref.set_timesteps(n)
    x_T = start() * float(ref.init_noise_sigma)
    theirs, _ = diffusers_loop(ref, n, x_T, gen=torch.Generator().manual_seed(7), s_churn=s_churn)
    sd, sig = 0.5, ref.sigmas.double()
    gen = torch.Generator().manual_seed(7)
    x = x_T.clone()
    for i in range(n):
        s = float(sig[i])
        gamma = min(s_churn / n, 2**0.5 - 1)
        s_hat = s * (1 + gamma)
        f = net(x / math.sqrt(s * s + sd * sd), 0.25 * math.log(s))
        z = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        x = x + z * (s_hat**2 - s**2) ** 0.5
        x0 = sd**2 / (s_hat**2 + sd**2) * x + s_hat * sd / math.sqrt(s_hat**2 + sd**2) * f
        x = x + (x - x0) / s_hat * (float(sig[i + 1]) - s_hat)
    hand = rel(x, theirs)
    model = edm_model()
    zs = Replay(7, x_T.shape)
    ours, _ = drive(ds.get_solver("euler", s_churn=s_churn).run(x_T, sig, zs, schedule=model.schedule), model)
    alg2 = rel(ours, theirs)
    print("diffusers EDMEuler churn: by hand (model before churn)", hand, "EDM Algorithm 2 (ours)", alg2)
    assert hand < 1e-5 and alg2 > 1e-3


# ------------------------------------------------------------------ EDMDPMSolverMultistepScheduler
@pytest.mark.parametrize("n", [5, 12, 20])
@pytest.mark.parametrize(
    "solver,kw",
    [
        ("dpmpp-2m", {"solver_order": 2}),
        ("dpmpp-3m", {"solver_order": 3}),
        ("dpmpp-2m", {"solver_order": 2, "sigma_schedule": "exponential"}),
        ("dpmpp-3m", {"solver_order": 3, "prediction_type": "v_prediction"}),
    ],
)
def test_edm_dpmsolver_multistep_matches(solver, kw, n):
    """Order 3 is diffusers' with dpmpp-3m's ``published_d2`` (the paper's second divided difference,
    as tests/test_exponential.py checks for DPMSolverMultistepScheduler)."""
    ref = EDMDPMSolverMultistepScheduler(**kw)
    ref.set_timesteps(n)
    x_T = start() * float(ref.init_noise_sigma)
    theirs, calls = diffusers_loop(ref, n, x_T)
    model = _edm_model_of(ref)
    opts = {"published_d2": True} if solver == "dpmpp-3m" else {}
    ours = ds.sample(model, solver, grid=ref.sigmas.double(), x_T=x_T, dtype=torch.float64, **opts)
    ours_b, calls_b = diffusers_loop(DiffsolveScheduler.from_config(ref, solver=solver, solver_options=opts), n, x_T)
    e1, e2 = rel(ours.samples, theirs), rel(ours_b, theirs)
    print(solver, kw, n, "calls", calls, ours.nfe, calls_b, "relative difference: driver", e1, "scheduler", e2)
    assert calls == ours.nfe == calls_b == n
    assert e1 < 1e-5 and e2 < 1e-5


@pytest.mark.parametrize("n", [5, 12, 20])
def test_edm_sde_dpmsolver_matches_dpmpp_2m_sde(n):
    """algorithm_type='sde-dpmsolver++' with the same draws: the step noise of diffusers' generator replayed."""
    ref = EDMDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2)
    ref.set_timesteps(n)
    x_T = start() * float(ref.init_noise_sigma)
    theirs, calls = diffusers_loop(ref, n, x_T, gen=torch.Generator().manual_seed(5))
    model = _edm_model_of(ref)
    ours, ours_calls = drive(
        ds.get_solver("dpmpp-2m-sde").run(x_T, ref.sigmas.double(), Replay(5, x_T.shape), schedule=model.schedule),
        model,
    )
    e = rel(ours, theirs)
    print("dpmpp-2m-sde", n, "calls", calls, ours_calls, "relative difference", e)
    assert calls == ours_calls == n
    assert e < 1e-5
    # through DiffsolveScheduler: the same calls and a finite run (it draws its own noise)
    b, calls_b = diffusers_loop(DiffsolveScheduler.from_config(ref, solver="dpmpp-2m-sde", seed=0), n, x_T)
    assert calls_b == n and torch.isfinite(b).all()


# ------------------------------------------------------------------ FlowMatchHeunDiscreteScheduler: heun
@pytest.mark.parametrize("n", [4, 10, 25])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_match_heun_matches_heun(shift, n):
    ref = FlowMatchHeunDiscreteScheduler(shift=shift)
    x_T = start()
    theirs, calls = diffusers_loop(ref, n, x_T)
    ours_b, calls_b = diffusers_loop(DiffsolveScheduler.from_config(ref, solver="heun"), n, x_T)
    # the driver: rectified flow, the network's velocity at timestep 1000 t, on the scheduler's sigmas
    model = ds.models.DiffusionModel(net, S.RectifiedFlow(), "velocity", time_input="1000t")
    grid = torch.unique_consecutive(ref.sigmas.double())  # diffusers repeats each inner sigma (two stages)
    ours = ds.sample(model, "heun", grid=grid, x_T=x_T, dtype=torch.float64)
    e1, e2 = rel(ours.samples, theirs), rel(ours_b, theirs)
    print("heun flow shift", shift, n, "calls", calls, ours.nfe, calls_b, "relative difference", e1, e2)
    assert calls == ours.nfe == calls_b == 2 * n - 1
    assert e1 < 1e-5 and e2 < 1e-5


# ------------------------------------------------------------------ DPMSolverSinglestepScheduler: dpmpp-singlestep
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
GMM3 = ds.models.GaussianMixture([[1.0, -0.5, 0.2], [-1.0, 0.5, 0.0]], 0.4)


def test_group_orders_are_diffusers():
    from diffusers import DPMSolverSinglestepScheduler

    from diffsolve.solvers.exponential.grouped import group_orders

    for order in (1, 2, 3):
        for lof in (True, False):
            for final in ("zero", "sigma_min"):
                for n in range(1, 20):
                    ref = DPMSolverSinglestepScheduler(
                        solver_order=order, lower_order_final=lof, final_sigmas_type=final
                    )
                    ref.set_timesteps(n)
                    assert group_orders(order, n, lof, final == "zero") == ref.order_list[:n], (order, lof, final, n)


@pytest.mark.parametrize("n", [5, 9, 20])
@pytest.mark.parametrize(
    "kw",
    [
        {"solver_order": 1},
        {"solver_order": 2},
        {"solver_order": 3},
        {"solver_order": 2, "solver_type": "heun"},
        {"solver_order": 3, "solver_type": "heun"},
        {"solver_order": 3, "use_karras_sigmas": True},
        {"solver_order": 3, "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
        {"solver_order": 3, "final_sigmas_type": "sigma_min"},
        {"solver_order": 2, "final_sigmas_type": "sigma_min", "lower_order_final": True},
    ],
    ids=lambda k: "-".join(str(v) for v in k.values()),
)
def test_dpm_solver_singlestep_matches(kw, n):
    """diffusers' DPMSolverSinglestepScheduler (its stages are grid points) against dpmpp-singlestep:
    a plain eps loop against the driver on the same sigmas, and DiffsolveScheduler in the same loop."""
    from diffusers import DPMSolverSinglestepScheduler

    ref = DPMSolverSinglestepScheduler(num_train_timesteps=1000, **SD, **kw)
    ref.set_timesteps(n)
    sched = S.VPDiscrete.from_diffusers_config(ref.config)
    model = GMM3.model(sched)

    def t_of(sigma):  # float32 sigmas: the top one may map a rounding past t_max
        return min(float(sched.t_of_log_snr(-math.log(sigma))), sched.t_max) if sigma > 0 else 0.0

    x_T = start() * float(ref.init_noise_sigma)
    x, calls = x_T.clone(), 0
    for i, t in enumerate(ref.timesteps):
        eps = model(ref.scale_model_input(x, t), t_of(float(ref.sigmas[i]))).eps
        calls += 1
        x = ref.step(eps, t, x).prev_sample
    opts = {
        "order": kw["solver_order"],
        "solver_type": kw.get("solver_type", "midpoint"),
        "parameterization": "noise" if kw.get("algorithm_type") == "dpmsolver" else "data",
        "lower_order_final": kw.get("lower_order_final", False),
    }
    grid = torch.tensor([t_of(float(s)) for s in ref.sigmas], dtype=torch.float64)
    ours = ds.sample(model, "dpmpp-singlestep", grid=grid, x_T=x_T, dtype=torch.float64, **opts)
    e1 = rel(ours.samples, x)
    # through DiffsolveScheduler, on a time-conditioned network
    ref2 = DPMSolverSinglestepScheduler(num_train_timesteps=1000, **SD, **kw)
    theirs_b, calls_a = diffusers_loop(ref2, n, x_T)
    ours_b, calls_b = diffusers_loop(
        DiffsolveScheduler.from_config(ref2, solver="dpmpp-singlestep", solver_options=opts), n, x_T
    )
    e2 = rel(ours_b, theirs_b)
    print(kw, n, "calls", calls, ours.nfe, calls_a, calls_b, "relative difference: driver", e1, "scheduler", e2)
    assert calls == ours.nfe == calls_a == calls_b == n
    assert e1 < 1e-5 and e2 < 1e-5


GAUSS = ds.models.GaussianMixture([[0.5, -1.0, 2.0, 0.0]], [[0.5, 1.0, 0.2, 2.0]])
MU = torch.tensor([0.3, 0.3, -0.2, 0.1], dtype=torch.float64)


@pytest.mark.parametrize(
    "schedule,mu",
    [
        (S.VPLinear(), None),
        (S.VE(), None),
        (S.VPDiscrete.from_diffusers_config(SD), None),
        (S.MeanReverting(lam=0.5), MU),
    ],
    ids=["vp", "ve", "sd-discrete", "mean-reverting"],
)
@pytest.mark.parametrize("order,solver_type", [(3, "midpoint"), (3, "heun"), (2, "midpoint"), (1, "midpoint")])
def test_dpmpp_singlestep_order(schedule, mu, order, solver_type):
    """The order of each group on the closed-form Gaussian (whole groups: n a multiple of 6, no shortened
    last group), uniform in log-SNR; registered order 3 = the highest."""
    model = GAUSS.model(schedule)
    x_T = GAUSS.marginal(schedule.t_max, schedule, mu).sample(64, torch.Generator().manual_seed(0))
    exact = GAUSS.flow_map(x_T, schedule.t_max, schedule.t_min, schedule, mu)
    errs = []
    for n in (12, 24, 48, 96):
        res = ds.sample(
            model,
            "dpmpp-singlestep",
            n,
            x_T=x_T,
            grid="log-snr",
            mu=mu,
            order=order,
            solver_type=solver_type,
            lower_order_final=False,
        )
        errs.append(float((res.samples - exact).abs().max()))
    orders = [math.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 1)]
    print(order, solver_type, "errors", [f"{e:.3e}" for e in errs], "orders", [f"{o:.2f}" for o in orders])
    assert all(e2 < e1 for e1, e2 in zip(errs, errs[1:]))
    assert abs(orders[-1] - order) < 0.3, orders
