"""Heun++ (``heunpp2``, ComfyUI's ``sample_heunpp2``): ComfyUI's step written out by hand, the calls,
convergence, and the start from alpha = 0."""

import math

import torch

import diffsolve as ds
from diffsolve.core.protocol import drive

S = ds.schedules
GAUSS = ds.models.GaussianMixture([[0.5, -1.0, 2.0, 0.0]], [[0.5, 1.0, 0.2, 2.0]])


def comfy_heunpp2(denoise, x, sigmas):
    """ComfyUI's update in its own variables (x against sigma, alpha = 1), from its maths."""
    s0, end = float(sigmas[0]), float(sigmas[-1])
    for i in range(len(sigmas) - 1):
        s, s1 = float(sigmas[i]), float(sigmas[i + 1])
        d = (x - denoise(x, s)) / s
        if s1 == end:
            x = x + d * (s1 - s)
            continue
        x2 = x + d * (s1 - s)
        d2 = (x2 - denoise(x2, s1)) / s1
        if float(sigmas[i + 2]) == end:
            w2 = s1 / (2 * s0)
            x = x + ((1 - w2) * d + w2 * d2) * (s1 - s)
            continue
        s2 = float(sigmas[i + 2])
        x3 = x2 + d2 * (s2 - s1)
        d3 = (x3 - denoise(x3, s2)) / s2
        w2, w3 = s1 / (3 * s0), s2 / (3 * s0)
        x = x + ((1 - w2 - w3) * d + w2 * d2 + w3 * d3) * (s1 - s)
    return x


def test_matches_comfyui_step_by_step():
    sched = S.EDM()  # t = sigma, alpha = 1: ComfyUI's variables
    model = GAUSS.model(sched)
    sigmas = torch.tensor([14.6, 6.0, 2.5, 0.9, 0.3, 0.0], dtype=torch.float64)
    x_T = 14.6 * torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    calls = [0]

    def answer(q):
        calls[0] += 1
        return model(q.x, q.t)

    ours = drive(ds.get_solver("heunpp2").run(x_T, sigmas, None, schedule=sched), answer)
    theirs = comfy_heunpp2(lambda x, s: model(x, s).x0, x_T, sigmas)
    print("heunpp2 against ComfyUI's update", float((ours - theirs).abs().max()), "calls", calls[0])
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-12)
    assert calls[0] == 3 * 5 - 3


def test_calls_and_convergence_on_a_vp_schedule():
    sched = S.VPLinear()
    model = GAUSS.model(sched)
    x_T = GAUSS.marginal(sched.t_max, sched).sample(32, torch.Generator().manual_seed(0))
    exact = GAUSS.flow_map(x_T, sched.t_max, sched.t_min, sched)
    errs = []
    for n in (10, 40):
        res = ds.sample(model, "heunpp2", n, x_T=x_T, grid="log-snr")
        assert res.nfe == 3 * n - 3
        errs.append(float((res.samples - exact).abs().max()))
    order = math.log(errs[0] / errs[1], 4)
    print("heunpp2 errors", errs, "order", order)
    assert order > 0.8


def test_starts_at_alpha_zero():
    flow = S.RectifiedFlow(t_min=1e-3)
    model = GAUSS.model(flow)
    x_T = GAUSS.marginal(flow.t_max, flow).sample(32, torch.Generator().manual_seed(0))
    exact = GAUSS.flow_map(x_T, flow.t_max, flow.t_min, flow)
    errs = []
    for n in (12, 48):
        res = ds.sample(model, "heunpp2", n, x_T=x_T, grid="uniform")
        assert res.nfe == 1 + 3 * (n - 1) - 3  # the jump from t = 1 is one call
        errs.append(float((res.samples - exact).abs().max()))
    print("heunpp2 from t = 1", errs)
    assert errs[1] < errs[0] / 2.5
