"""Guidance wrappers and step hooks against a class-labelled Gaussian-mixture oracle with exact scores."""

import pytest
import torch

import diffsolve as ds
from diffsolve.guidance import DPS, CFGPlusPlus, ClassifierFreeGuidance, ClassifierGuidance, EnKG, Inpaint, Threshold

VP = ds.schedules.VPLinear()
# two classes, two components each, in 4-D
MEANS = torch.tensor(
    [[2.0, 2.0, 0.0, 1.0], [2.0, -2.0, 1.0, 0.0], [-2.0, 2.0, -1.0, 0.0], [-2.0, -2.0, 0.0, -1.0]], dtype=torch.float64
)
GMM = ds.models.GaussianMixture(MEANS, 0.3, weights=[1, 2, 1, 2], labels=[0, 0, 1, 1])
NULL = {"class_labels": torch.tensor(-1)}


class CountingNet:
    """The oracle's exact denoiser, counting conditional and unconditional calls (label -1)."""

    def __init__(self, oracle=GMM, schedule=VP):
        self.oracle, self.schedule = oracle, schedule
        self.cond_calls = self.uncond_calls = self.grad_calls = 0

    def __call__(self, x, t, class_labels=None):
        y = None if class_labels is None else torch.as_tensor(class_labels).reshape(-1)
        if y is None or bool((y < 0).all()):
            self.uncond_calls += 1
        else:
            self.cond_calls += 1
        self.grad_calls += int(torch.is_grad_enabled() and x.requires_grad)
        return self.oracle.denoise(x, t, self.schedule, class_labels=class_labels)


def _model(net=None):
    return ds.DiffusionModel(net or CountingNet(), VP, "x0", time_input="t")


def _x(n=16, seed=0):
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_cfg_scale_one_is_the_conditional_model_exactly():
    net = CountingNet()
    cfg = ClassifierFreeGuidance(_model(net), 1.0, uncond=NULL)
    y = {"class_labels": torch.tensor([0, 1] * 8)}
    a = ds.sample(cfg, "heun", 10, x_T=_x(), cond=y).samples
    b = ds.sample(_model(), "heun", 10, x_T=_x(), cond=y).samples
    assert torch.equal(a, b)
    assert net.uncond_calls == 0


def test_cfg_formula_rescale_and_missing_uncond():
    model = _model()
    x, t, y = _x(), 0.4, {"class_labels": torch.tensor([0, 1] * 8)}
    c, u = model(x, t, **y), model(x, t, **NULL)
    g = ClassifierFreeGuidance(model, 3.0, uncond=NULL)(x, t, **y)
    assert torch.allclose(g.output, u.output + 3.0 * (c.output - u.output), rtol=0, atol=1e-14)
    r0 = ClassifierFreeGuidance(model, 3.0, uncond=NULL, guidance_rescale=0.0)(x, t, **y)
    assert torch.equal(r0.output, g.output)
    r1 = ClassifierFreeGuidance(model, 3.0, uncond=NULL, guidance_rescale=1.0)(x, t, **y)
    assert torch.allclose(r1.output.std(dim=1), c.output.std(dim=1), rtol=1e-12)
    with pytest.raises(ValueError, match="unconditional inputs"):
        ClassifierFreeGuidance(model, 3.0)(x, t, **y)
    with pytest.raises(TypeError, match="uncond= is for classifier-free guidance"):
        ds.sample(model, "ddim", 5, x_T=x, cond=y, uncond=NULL)
    with pytest.raises(ValueError, match="guidance_rescale must be in"):
        ClassifierFreeGuidance(model, 3.0, guidance_rescale=2.0)


def test_cfg_interval_skips_the_unconditional_call_outside_it():
    net = CountingNet()
    lo, hi = 0.3, 2.0
    cfg = ClassifierFreeGuidance(_model(net), 4.0, interval=(lo, hi))
    y = {"class_labels": torch.tensor([0, 1] * 8)}
    res = ds.sample(cfg, "ddim", 20, x_T=_x(), cond=y, uncond=NULL)  # uncond given per run
    level = VP.sigma(res.grid[:-1]) / VP.alpha(res.grid[:-1])
    inside = int(((level > lo) & (level <= hi)).sum())
    assert 0 < inside < 20
    assert net.uncond_calls == inside and net.cond_calls == 20
    assert res.nfe == 20 + inside
    # outside the interval the prediction is the conditional one; per-sample times are split by row
    model = _model()
    t = torch.tensor([0.001, 0.3] * 8, dtype=torch.float64)  # sigma/alpha 0.01 (outside) and 1.2 (inside)
    x = _x()
    g = cfg(x, t, uncond=NULL, **y)
    full = ClassifierFreeGuidance(model, 4.0, uncond=NULL)(x, t, **y)
    c = model(x, t, **y)
    assert torch.equal(g.output[0::2], c.output[0::2])
    assert torch.allclose(g.output[1::2], full.output[1::2], rtol=0, atol=1e-14)


def test_cfg_sharpens_towards_the_requested_class():
    """Guided samples of class 0 land in class-0 components more often (and away from class 1)."""
    y = {"class_labels": torch.zeros(400, dtype=torch.long)}
    x_T = torch.randn(400, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    base = None
    for scale in (1.0, 3.0):
        s = ds.sample(ClassifierFreeGuidance(_model(), scale, uncond=NULL), "dpmpp-2m", 20, x_T=x_T, cond=y).samples
        assert float((s[:, 0] > 0).double().mean()) > 0.99  # class 0 has x_1 = +2
        if base is not None:  # scale 3: pushed further from the class boundary than the conditional model
            assert float(s[:, 0].mean()) > float(base[:, 0].mean())
        base = s


def test_cfgpp_lambda_zero_is_unconditional_ddim_and_its_step_renoises_with_uncond():
    model = _model()
    y = {"class_labels": torch.tensor([0, 1] * 8)}
    a = ds.sample(CFGPlusPlus(model, 0.0, uncond=NULL), "ddim", 10, x_T=_x(), cond=y).samples
    b = ds.sample(model, "ddim", 10, x_T=_x(), cond=NULL).samples
    assert torch.allclose(a, b, rtol=0, atol=1e-12)
    # one DDIM step by hand: x' = alpha' x0_lambda + sigma' eps_uncond
    x, t, t1, lam = _x(), 0.6, 0.5, 0.7
    c, u = model(x, t, **y), model(x, t, **NULL)
    T = lambda v: torch.tensor(v, dtype=torch.float64)
    a_t, s_t = float(VP.alpha(T(t))), float(VP.sigma(T(t)))
    eps_l = u.eps + lam * (c.eps - u.eps)
    x0_l = (x - s_t * eps_l) / a_t
    a1, s1 = float(VP.alpha(T(t1))), float(VP.sigma(T(t1)))
    step = ds.sample(CFGPlusPlus(model, lam, uncond=NULL), "ddim", grid=[t, t1], x_T=x, cond=y).samples
    assert torch.allclose(step, a1 * x0_l + s1 * u.eps, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        CFGPlusPlus(model, 3.0)


def test_classifier_guidance_with_the_exact_classifier_is_the_conditional_model():
    """grad log p(x_t | y) = grad log p(x_t) + grad log p(y | x_t): scale 1 turns the unconditional
    oracle into the conditional one."""

    def classifier(x, t):  # exact log p(c | x_t) for both classes, used as logits
        return torch.stack([GMM.class_log_prob(x, t, VP, c) for c in (0, 1)], dim=1)

    uncond = _model()
    guided = ClassifierGuidance(uncond, classifier, 1.0)
    x, y = _x(), torch.tensor([0, 1] * 8)
    for t in (0.05, 0.3, 0.8):
        got = guided(x, t, class_labels=y).eps
        want = uncond(x, t, class_labels=y).eps
        assert float((got - want).abs().max()) < 1e-10, t
    a = ds.sample(guided, "heun", 8, x_T=_x(), cond={"class_labels": y}).samples
    b = ds.sample(uncond, "heun", 8, x_T=_x(), cond={"class_labels": y}).samples
    assert float((a - b).abs().max()) < 1e-9


EASY = ds.models.GaussianMixture([[2.0, 2, 1, -1], [-2, -2, -1, 1], [2, -2, -1, -1]], 0.3)


def _easy_model(net=None):
    return ds.DiffusionModel(net or (lambda v, t: EASY.denoise(v, t, VP)), VP, "x0", time_input="t")


def _inpainting_problem(n=200):
    """Observe coordinates 0 and 2 of mixture samples: they tell the component, so the sign of the
    unknown coordinate 1 is determined (the replacement method gets it from the noised known ones)."""
    x0 = EASY.sample(n, torch.Generator().manual_seed(5))
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    return x0, mask, x0 * mask


def _sign_accuracy(samples, x0):
    return float((torch.sign(samples[:, 1]) == torch.sign(x0[:, 1])).double().mean())


def test_dps_lowers_the_measurement_residual_along_the_chain_and_beats_unguided():
    x0, mask, y = _inpainting_problem()
    dps = DPS(_easy_model(), lambda v: v * mask, y, zeta=2.0)
    x_T = torch.randn(200, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    res = ds.sample(dps, "ddim", 50, x_T=x_T, return_trajectory=True)
    plain = ds.sample(_easy_model(), "ddim", 50, x_T=x_T, return_trajectory=True)
    oracle = _easy_model()

    def residuals(r):  # mean residual of the exact denoiser's x0 along the chain
        return [float(dps.residual(oracle(x, t).x0).mean()) for t, x in r.trajectory[:-1]]

    guided_path, plain_path = residuals(res), residuals(plain)
    print(
        "residual along the chain (guided)",
        [round(v, 3) for v in guided_path[::10]],
        "unguided",
        [round(v, 3) for v in plain_path[::10]],
    )
    final, final_plain = float(dps.residual(res.samples).mean()), float(dps.residual(plain.samples).mean())
    print("final residual DPS", final, "unguided", final_plain)
    assert guided_path[-1] < 0.2 * guided_path[0] and all(b < a for a, b in zip(guided_path[20::5], guided_path[25::5]))
    assert final < 0.2 * final_plain
    assert _sign_accuracy(res.samples, x0) > _sign_accuracy(plain.samples, x0) + 0.15


def test_dps_batch_norm_couples_samples_and_sample_norm_does_not():
    _x0, mask, y = _inpainting_problem(8)
    x_T = torch.randn(8, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    for norm, coupled in (("sample", False), ("batch", True)):
        dps = DPS(_easy_model(), lambda v: v * mask, y, zeta=0.5, norm=norm)
        full = ds.sample(dps, "ddim", 10, x_T=x_T).samples
        first = ds.sample(
            DPS(_easy_model(), lambda v: v * mask, y[:4], zeta=0.5, norm=norm), "ddim", 10, x_T=x_T[:4]
        ).samples
        same = torch.allclose(full[:4], first, rtol=0, atol=1e-12)
        assert same != coupled, norm
    with pytest.raises(ValueError, match="norm must be one of"):
        DPS(_model(), lambda v: v, y, norm="l1")


def test_inpaint_replaces_known_pixels_and_resampling_runs_extra_calls():
    x0, mask, y = _inpainting_problem()
    x_T = torch.randn(200, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    plain = ds.sample(_easy_model(), "ddpm", 50, x_T=x_T, seed=0).samples
    res = ds.sample(_easy_model(), "ddpm", 50, x_T=x_T, seed=0, hooks=[Inpaint(mask, y)])
    assert torch.equal(res.samples * mask, y)
    acc, acc_plain = _sign_accuracy(res.samples, x0), _sign_accuracy(plain, x0)
    rep = ds.sample(_easy_model(), "ddpm", 50, x_T=x_T, seed=0, hooks=[Inpaint(mask, y, resample=3)])
    acc_rep = _sign_accuracy(rep.samples, x0)
    print("sign accuracy of the unknown coordinate: inpaint", acc, "repaint U=3", acc_rep, "unguided", acc_plain)
    assert acc > acc_plain + 0.15 and acc_rep > acc + 0.04
    assert rep.nfe == 50 * 3  # U - 1 extra calls per step
    # batch-size invariance: the hook's noise is per sample
    half = ds.sample(_easy_model(), "ddpm", 50, x_T=x_T[:7], seed=0, hooks=[Inpaint(mask, y[:7])]).samples
    assert torch.equal(half, res.samples[:7])


def test_threshold_matches_the_formula():
    hook = Threshold(ratio=0.9, max_value=3.0)
    model = _model()
    x = 4 * _x()
    for t in (0.3, 0.9):
        pred = model(x, t)
        got = hook.after(pred, type("C", (), {"schedule": VP})())
        x0 = pred.x0
        s = torch.quantile(x0.abs(), 0.9, dim=1).clamp(1.0, 3.0)[:, None]
        assert torch.allclose(got.x0, x0.clamp(-s, s) / s, rtol=0, atol=1e-12)
        assert torch.equal(got.eps, pred.eps)
    pred = model(0.1 * _x(), 0.001)
    assert float(pred.x0.abs().max()) < 1.0  # every |x0| below 1: s = 1 and nothing changes
    assert torch.equal(Threshold().after(pred, type("C", (), {"schedule": VP})()).x0, pred.x0)
    res = ds.sample(model, "ddim", 20, x_T=_x(), hooks=[Threshold(ratio=0.5)])
    assert float(res.samples.abs().max()) <= 1.0 + 1e-6


def _ensemble_at(t, n=64, seed=9):
    single = ds.models.GaussianMixture([[0.5, -1.0, 2.0, 0.0]], [[0.5, 1.0, 0.2, 2.0]])
    m = single.marginal(t, VP)
    return single, m.sample(n, torch.Generator().manual_seed(seed))


def test_enkg_on_a_linear_gaussian_problem_is_the_exact_covariance_preconditioned_update():
    """With Gaussian data Tweedie's x0 is affine, x0 = M x + b, so for linear G = A the EnKG step is
    x_j - (eta / ||C||_F) Cov_ens(x) M^T A^T r_j with the exact M, b (no model internals used)."""
    t = 0.5
    single, x = _ensemble_at(t)
    model = ds.DiffusionModel(lambda v, tt: single.denoise(v, tt, VP), VP, "x0", time_input="t")
    A = torch.tensor([[1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, -1.0]], dtype=torch.float64)
    y_obs = torch.tensor([0.3, 1.5], dtype=torch.float64)
    hook = EnKG(lambda v: v @ A.T, y_obs, guidance_scale=2.0, inner_steps=1)
    res = ds.sample(model, "ddim", grid=[t, t - 0.1], x_T=x, hooks=[hook], return_trajectory=True)
    moved = res.trajectory[0][1]
    # closed form: x0 = b + M x with M = diag(alpha s^2 / (alpha^2 s^2 + sigma^2))
    a, sg = (float(f(torch.tensor(t, dtype=torch.float64))) for f in (VP.alpha, VP.sigma))
    s2 = single.stds[0] ** 2
    M = torch.diag(a * s2 / (a * a * s2 + sg * sg))
    b = single.means[0] - M @ (a * single.means[0])
    g = (x @ M.T + b) @ A.T
    r = g - y_obs
    C = r @ (g - g.mean(0)).T / len(x)
    cov = (x - x.mean(0)).T @ (x - x.mean(0)) / len(x)
    want = x - (2.0 / C.norm()) * (r @ A @ M @ cov)  # rows: Cov M^T A^T r_j
    assert float((moved - want).abs().max()) < 1e-10
    assert res.nfe == 2  # one inner call (Tweedie) and the solver's call


def test_enkg_reduces_a_nonlinear_residual_without_gradients():
    """Squared-magnitude measurement y = x0^2 of a mixture sample: EnKG moves the ensemble towards it
    with forward evaluations only (no network call ever sees a graph)."""
    target = GMM.sample(1, torch.Generator().manual_seed(11))[0]
    y_obs = target**2
    calls = [0]

    def G(v):
        calls[0] += 1
        return v**2

    def resid(s):
        return float((s**2 - y_obs).norm(dim=1).mean())

    x_T = torch.randn(128, 4, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    net = CountingNet()
    res = ds.sample(_model(net), "ddim", 30, x_T=x_T, hooks=[EnKG(G, y_obs, 2.0, window=(0.05, 50.0))])
    plain = ds.sample(_model(), "ddim", 30, x_T=x_T).samples
    print(
        "squared-magnitude residual: EnKG",
        resid(res.samples),
        "unguided",
        resid(plain),
        "G calls",
        calls[0],
        "NFE",
        res.nfe,
    )
    assert resid(res.samples) < 0.5 * resid(plain)
    assert net.grad_calls == 0 and calls[0] > 0


def test_threshold_parity_with_diffusers_ddim_thresholding():
    """ddim + Threshold against diffusers' DDIMScheduler(thresholding=True) on the same eps network,
    timesteps (plus the clean end) and initial state."""
    from diffusers import DDIMScheduler

    w = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.3

    def net(x, t):  # its x0 leaves [-1.5, 1.5], so the threshold acts
        return torch.tanh(x @ w + (t.to(torch.float64) / 1000.0)[:, None, None]) * 0.5 - 0.3 * x

    ref = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        thresholding=True,
        dynamic_thresholding_ratio=0.9,
        sample_max_value=1.5,
    )
    ref.set_timesteps(10)
    x_T = 3 * torch.randn(6, 1, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))  # [B, C, ...]
    xd = x_T.clone()
    for t in ref.timesteps:
        xd = ref.step(net(xd, t.expand(6)), t, xd).prev_sample
    sched = ds.schedules.VPDiscrete.from_diffusers_config(ref.config)
    grid = [float(sched.t_of_timestep(float(t))) for t in ref.timesteps] + [0.0]
    model = ds.DiffusionModel(net, sched, "eps")
    ours = ds.sample(model, "ddim", grid=grid, x_T=x_T, hooks=[Threshold(0.9, 1.5)]).samples
    plain = ds.sample(model, "ddim", grid=grid, x_T=x_T).samples
    rel = float((ours - xd).abs().max() / xd.abs().max())
    print("ddim + Threshold vs diffusers: relative difference", rel)
    assert rel < 1e-6 and float((plain - xd).abs().max()) > 1e-2
