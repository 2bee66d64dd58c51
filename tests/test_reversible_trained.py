"""Reversible solvers on the shipped trained models, where the oracles' smooth fields cannot show a
parasitic mode: samples as accurate as a non-reversible solver's, or a clear error, never noise.

Each check samples the same x_T with the reversible solver and with dpmpp-2m at 40 steps (the
reference) and compares the RMS distance with that of a non-reversible solver of the same order at
the same number of model calls (benchmarks/reversible.md has digits-FD and class accuracy at 10 to
100 steps, and rex)."""

import warnings

import pytest
import torch

import diffsolve as ds
from diffsolve.quality import load_classifier

N = 8
EXACT = ("rev-heun", "bdia", "o-belm", "edict", "rex")


def _rms(a, b):
    return float((a.double() - b.double()).pow(2).mean().sqrt())


def _run(model, solver, steps, x_T, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reversible solvers' own t_min on digits-flow
        return ds.sample(model, solver, steps, x_T=x_T, **kw)


@pytest.fixture(scope="module")
def models():
    return {name: ds.pretrained.load(name) for name in ("digits-vp", "digits-flow", "digits-vp-cond")}


def _cfg(models):
    null = ds.pretrained.classes("digits-vp-cond")["null_class"]
    cfg = ds.guidance.ClassifierFreeGuidance(models["digits-vp-cond"], 3.0, uncond={"class_labels": torch.tensor(null)})
    return cfg, {"class_labels": torch.arange(N) % 10}


@pytest.mark.parametrize("name", ["digits-vp", "digits-flow", "digits-vp-cond"])
def test_reversible_samples_match_a_non_reversible_solver_at_equal_calls(models, name):
    """Before the data form, rev-heun, bdia and edict gave values to +-7 (rev-heun, 50 steps) and
    +-110 (bdia, 10 steps) on digits-vp. At 10 steps the second-order ones are compared with dpmpp-2m
    and edict (first order, 2 calls per step) with ddim, at equal calls. Measured RMS distances to the
    reference (the comparison's in brackets): digits-vp rev-heun 0.038 (0.020 at 11 calls), bdia and
    o-belm 0.038 (0.026), edict 0.017 (ddim 0.036); digits-flow 0.016 to 0.021 (0.016 to 0.020), edict
    0.011 (0.020); CFG 0.043 (0.029 to 0.039), edict 0.021 (0.044). Bound: twice the comparison's,
    plus 0.01."""
    model, cond = (models[name], None) if name != "digits-vp-cond" else _cfg(models)
    kw = {} if cond is None else {"cond": cond}
    per_call = 2 if cond is not None else 1
    x_T = torch.randn(N, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    ref = _run(model, "dpmpp-2m", 40, x_T, **kw).samples
    for solver, peer in (("rev-heun", "dpmpp-2m"), ("bdia", "dpmpp-2m"), ("o-belm", "dpmpp-2m"), ("edict", "ddim")):
        res = _run(model, solver, 10, x_T, **kw)
        base = _run(model, peer, res.nfe // per_call, x_T, **kw)
        err, err_base = _rms(res.samples, ref), _rms(base.samples, ref)
        print(f"{name}: {solver} {err:.4f} (nfe {res.nfe}), {peer} {err_base:.4f} (nfe {base.nfe})")
        assert float(res.samples.abs().max()) < 1.5, solver
        assert err < 2 * err_base + 0.01, solver


@pytest.mark.parametrize("solver", ["rev-heun", "bdia", "edict"])
def test_the_noise_form_is_refused_on_a_trained_model(models, solver):
    """The noise form of these schemes turns digits-vp's samples into noise (their parasitic mode
    grows where eps_hat's Jacobian contracts the flow): the run stops and names the stable form."""
    x_T = torch.randn(N, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    with pytest.raises(
        ds.UnstableError,
        match=f"'{solver}'.*form='noise'.*unstable at step .* of 10.*Its default, form='data', is stable",
    ):
        ds.sample(models["digits-vp"], solver, 10, x_T=x_T, form="noise")


def test_o_belm_in_the_data_form_is_refused(models):
    """O-BELM's damping needs steps that shrink towards the data: in alpha / sigma they grow."""
    x_T = torch.randn(N, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    with pytest.raises(ds.UnstableError, match=r"'o-belm'.*form='data'.*Its default, form='noise'"):
        ds.sample(models["digits-vp"], "o-belm", 10, x_T=x_T, form="data")


@pytest.mark.parametrize("solver", EXACT)
def test_cfg_classes_with_reversible_solvers(models, solver):
    """digits-vp-cond with CFG at scale 3 and 10 steps: the classifier reads the requested classes."""
    cfg, cond = _cfg(models)
    x = _run(cfg, solver, 10, torch.randn(N, 1, 16, 16, generator=torch.Generator().manual_seed(6)), cond=cond).samples
    with torch.no_grad():
        acc = float((load_classifier()(x).argmax(1) == cond["class_labels"]).float().mean())
    assert acc >= 7 / 8, (solver, acc)
