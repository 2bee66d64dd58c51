"""Declarative solver options (diffsolve.core.options) and the generator pump (diffsolve.core.protocol)."""

import pytest
import torch

import diffsolve as ds
from diffsolve.core.options import Option, declared
from diffsolve.core.protocol import Pump, Solver, drive
from diffsolve.core.registry import register, registered


class _Toy(Solver):
    step = Option(0.5, "a step size", low=0.0, high=1.0, low_open=True)
    count = Option(2, "a count", low=1)
    kind = Option("a", "a kind", choices=("a", "b"))
    flag = Option(True, "a flag")
    size = Option(0.1, "the new name of old_size", low=0.0)
    old_size: Option = Option(None, alias_of="size")

    def check_options(self):
        if self.kind == "b" and self.count > 3:
            raise ValueError("kind='b' needs count <= 3")


def test_values_are_checked_and_converted():
    toy = _Toy(step=1, count=3)
    assert toy.step == 1.0 and isinstance(toy.step, float) and toy.count == 3
    assert toy.options() == {"step": 1.0, "count": 3, "kind": "a", "flag": True, "size": 0.1}
    assert toy.given == {"step", "count"}
    assert _Toy().given == frozenset()
    assert _Toy(step=torch.tensor(0.25)).step == 0.25  # a 0-d tensor is a number
    for kw, err, msg in [
        (dict(step=0), ValueError, r"step must be in \(0, 1\], got 0.0"),
        (dict(step=float("nan")), ValueError, "step must be in"),
        (dict(step="x"), TypeError, r"step must be a number in \(0, 1\], got 'x'"),
        (dict(step=True), TypeError, "step must be a number"),
        (dict(count=0), ValueError, "count must be an integer >= 1, got 0"),
        (dict(count=2.0), ValueError, "count must be an integer >= 1"),
        (dict(kind="c"), ValueError, "kind must be one of a, b, got 'c'"),
        (dict(flag=1), TypeError, "flag must be True or False, got 1"),
        (dict(kind="b", count=4), ValueError, "kind='b' needs count <= 3"),
        (dict(stpe=0.1), TypeError, "has no option 'stpe' .*did you mean 'step'"),
    ]:
        with pytest.raises(err, match=msg):
            _Toy(**kw)


def test_aliases():
    assert _Toy(old_size=0.3).size == 0.3 and _Toy(old_size=0.3).given == {"size"}
    with pytest.raises(ValueError, match="give size or its alias old_size, not both"):
        _Toy(size=0.2, old_size=0.3)
    with pytest.raises(ValueError, match="old_size must be >= 0"):  # named as the caller wrote it
        _Toy(old_size=-1.0)
    assert "old_size" not in _Toy().options()
    assert ds.get_solver("adaptive-sde", eps_rel=0.03).rtol == 0.03  # GGF's paper names
    with pytest.raises(ValueError, match="give rtol or its alias eps_rel, not both"):
        ds.get_solver("adaptive-sde", rtol=0.01, eps_rel=0.03)


def test_help_lines():
    lines = {k: o.describe() for k, o in declared(_Toy).items()}
    assert lines["step"] == "step (a number in (0, 1]; default 0.5): a step size"
    assert lines["kind"] == "kind (one of 'a', 'b'; default 'a'): a kind"
    assert lines["old_size"] == "old_size: another name for size"


def test_a_redeclared_option_keeps_its_place():
    class Sub(_Toy):
        count = Option(5, "a count", low=1)

    assert list(declared(Sub)) == list(declared(_Toy)) and Sub().count == 5


def test_every_registered_solver_declares_valid_defaults():
    """Each registry entry's options come from its declarations, its defaults pass its own checks,
    and a registered solver cannot have an __init__ of its own (which would bypass them)."""
    for info in registered():
        assert "__init__" not in vars(info.cls), info.name
        slv = ds.get_solver(info.name)
        assert set(slv.options()) == set(info.options) | set(info.fixed), info.name
        for k, o in declared(info.cls).items():
            if o.choices is not None and k not in info.fixed:
                with pytest.raises(ValueError, match=f"{k} must be one of"):
                    ds.get_solver(info.name, **{k: "no-such-value"})

    class Bad(Solver):
        def __init__(self, x=1):
            self.x = x

    with pytest.raises(TypeError, match="declares its options as Option class attributes"):
        register(
            "bad-solver", family="ode", order=1, calls_per_step=1, deterministic=True, description="", reference=""
        )(Bad)


def test_pump_and_drive():
    def run():
        a = yield torch.zeros(1), 0.5
        b = yield a, 0.25
        return a + b

    p = Pump(run())
    assert p.query.t == 0.5 and not p.done
    p.answer(torch.ones(1))
    assert p.query.t == 0.25 and torch.equal(p.query.x, torch.ones(1))
    p.answer(torch.ones(1))
    assert p.done and torch.equal(p.value, 2 * torch.ones(1))
    with pytest.raises(RuntimeError, match="the run has ended"):
        p.answer(torch.ones(1))
    assert torch.equal(drive(run(), lambda q: q.x + 1), torch.tensor([3.0]))
    with pytest.raises(TypeError, match="must yield"):
        Pump(iter([1.0]))


class _ZeroPair(ds.guidance.StepHook):
    """A step hook answering every call with the pair x0 = 0, eps = 0 (not consistent with x)."""

    def after(self, pred, ctx):
        zero = torch.zeros_like(pred.x)
        return ds.models.Prediction.from_pair(pred.x, pred.t, zero, zero, ctx.schedule, pred.mu)


def test_dmcmc_keeps_a_hook_s_prediction_pair():
    """dmcmc splits each merged model call among its integrator runs; every piece keeps the (x0, eps)
    pair a step hook set (CFG++-style guidance and Threshold set one). With the pair (0, 0) every
    DDIM step of the integrator lands on alpha' 0 + sigma' 0 = 0, so every sample is 0. A piece
    rebuilt from the output alone would re-derive eps = x / sigma, and the samples would not be 0."""
    gmm = ds.models.GaussianMixture([[2.0, 2.0], [-2.0, -2.0]], 0.1)
    model = gmm.model(ds.schedules.VPLinear())
    res = ds.sample(
        model,
        "dmcmc",
        shape=(8, 2),
        seed=0,
        dtype=torch.float64,
        progress=False,
        t_min=1e-3,
        integrator="ddim",
        integrator_steps=3,
        n_skip=1,
        burn_in=1,
        burn_in_steps=3,
        denoise=False,
        estimator=ds.samplers.ExactNoiseLevel(gmm),
        hooks=[_ZeroPair()],
    )
    assert res.samples.abs().max() == 0


def test_a_solver_without_options_has_none():
    class Plain(Solver):
        pass

    assert Plain().options() == {} and repr(Plain()) == "Plain[solver]()"


def test_an_option_takes_infinity_only_where_it_says_so():
    """s_noise = inf was accepted (low = 0, no upper bound) and made NaN samples; s_tmax's default
    is infinite, so it takes inf."""
    with pytest.raises(ValueError, match="s_noise must be a finite number"):
        ds.get_solver("euler-ancestral", s_noise=float("inf"))
    with pytest.raises(ValueError, match="eta must be a finite number"):
        ds.get_solver("euler-ancestral", eta=float("inf"))
    assert ds.get_solver("heun", s_tmax=float("inf")).s_tmax == float("inf")
