"""GPU readiness: fixed-grid solvers read nothing of the data path back to the host per step.

On a GPU such a read (``bool``, ``.item()``, ``.tolist()``, ``.cpu()``, ``nonzero`` ...) makes the host
wait for the device. Here, on the CPU, the state is a tensor subclass that counts those reads, and the
finite checks run as on an accelerator (deferred to the end of the run): the count must not grow
with the number of steps. With CUDA present, ``torch.cuda.set_sync_debug_mode("error")`` checks the
same on the device.
"""

from typing import ClassVar

import pytest
import torch

import diffsolve as ds
from diffsolve.models.model import FiniteGuard

READS = {"__bool__", "item", "tolist", "cpu", "numpy", "__float__", "__int__", "__index__", "nonzero"}


class Tracked(torch.Tensor):
    reads: ClassVar[list] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS:
            Tracked.reads.append(name)
        return super().__torch_function__(func, types, args, kwargs or {})


def _fixed_grid_solvers():
    return [i.name for i in ds.list_solvers() if i.fixed_grid]


@pytest.fixture
def deferred(monkeypatch):
    monkeypatch.setattr(FiniteGuard, "eager", staticmethod(lambda device: False))


@pytest.mark.parametrize("solver", _fixed_grid_solvers())
def test_no_host_reads_per_step(solver, deferred):
    sched = ds.schedules.VPLinear()
    model = ds.DiffusionModel(lambda x, t: 0.5 * x, sched, "eps")
    counts = []
    for steps in (4, 12):
        x_T = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0)).as_subclass(Tracked)
        Tracked.reads = []
        res = ds.sample(model, solver, steps, x_T=x_T, seed=0)
        assert isinstance(res.samples, Tracked)
        counts.append(list(Tracked.reads))
    print(solver, "host reads at 4 / 12 steps:", counts)
    # at most the one deferred finite check, and the reversible solvers' one parasitic-mode check
    once = 2 if ds.samplers.solver_info(solver).family == "reversible" else 1
    assert len(counts[0]) == len(counts[1]) <= once, counts


def test_deferred_check_still_names_the_step(deferred):
    sched = ds.schedules.VPLinear()
    calls = []

    def net(x, t):
        calls.append(1)
        return x * float("nan") if len(calls) == 3 else 0.5 * x

    with pytest.raises(ds.models.NonFiniteError, match=r"step 3 of 6.*model call 3.*checked once"):
        ds.sample(ds.DiffusionModel(net, sched, "eps"), "ddim", 6, shape=(2, 3), seed=0)
    assert len(calls) == 6  # deferred: the run went on to its end


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "solver", ["ddim", "euler", "heun", "ddpm", "dpmpp-2m", "dpmpp-3m", "mrs-ode", "dpmpp-3s", "mrs-pc"]
)
def test_no_synchronisation_on_cuda(solver):
    """torch's sync debug mode warns at every synchronising CUDA call: as many at 12 steps as at 4."""
    import warnings

    sched = ds.schedules.VPLinear()
    model = ds.DiffusionModel(lambda x, t: 0.5 * x, sched, "eps")
    x_T = torch.randn(3, 2, 4, 4, device="cuda")
    ds.sample(model, solver, 3, x_T=x_T, seed=0)  # warm-up
    counts = []
    for steps in (4, 12):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                res = ds.sample(model, solver, steps, x_T=x_T, seed=0, progress=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    print(solver, "synchronising calls at 4 / 12 steps:", counts)
    assert res.samples.device.type == "cuda" and counts[0] == counts[1], counts


def test_compiled_model_gives_the_same_samples():
    """DiffusionModel.compile wraps the network in torch.compile (here the "eager" backend, which
    needs no compiler): same schedule and parameterisation, the same samples."""
    sched = ds.schedules.VPLinear()
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 8), torch.nn.Unflatten(1, (2, 4)))
    model = ds.DiffusionModel(lambda x, t: net(x) * t.to(x.dtype)[:, None, None], sched, "eps")
    fast = model.compile(backend="eager")
    assert fast.schedule is model.schedule and fast.prediction == model.prediction and fast.net is not model.net
    with torch.no_grad():
        a = ds.sample(model, "dpmpp-2m", 6, shape=(3, 2, 4), seed=0).samples
        b = ds.sample(fast, "dpmpp-2m", 6, shape=(3, 2, 4), seed=0).samples
    assert torch.equal(a, b)


def test_cuda_graph_sampler_refuses_what_it_cannot_replay():
    model = ds.DiffusionModel(lambda x, t: 0.5 * x, ds.schedules.VPLinear(), "eps")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        ds.samplers.CUDAGraphSampler(model, "ddim", 4, (2, 3), device="cpu")
    for solver, why in (("ddpm", "stochastic"), ("mrs-adaptive", "adaptive")):  # checked before the device
        with pytest.raises(ValueError, match=why):
            ds.samplers.CUDAGraphSampler(model, solver, 4, (2, 3), device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("solver", ["ddim", "heun", "dpmpp-2m", "dpmpp-3m"])
def test_cuda_graph_replay_equals_eager_sampling(solver):
    net = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.SiLU(), torch.nn.Linear(32, 6)).cuda()
    model = ds.DiffusionModel(lambda x, t: net(x) * t.to(x.dtype)[:, None], ds.schedules.VPLinear(), "eps")
    graphed = ds.samplers.CUDAGraphSampler(model, solver, 10, (5, 6))
    for seed in (0, 1):  # the second replay sees new inputs
        x_T = torch.randn(5, 6, generator=torch.Generator().manual_seed(seed)).cuda()
        with torch.no_grad():
            eager = ds.sample(model, solver, 10, x_T=x_T).samples
        assert torch.allclose(graphed(x_T), eager, rtol=1e-5, atol=1e-6)

    def bad(x, t):  # finite on the zero warm-up input, NaN on large ones: the replay's check names the step
        return torch.where(x.abs() > 10, torch.full_like(x, float("nan")), 0.5 * x)

    graphed_bad = ds.samplers.CUDAGraphSampler(
        ds.DiffusionModel(bad, ds.schedules.VPLinear(), "eps"), solver, 10, (5, 6)
    )
    with pytest.raises(ds.models.NonFiniteError, match="step"):
        graphed_bad(100 * torch.randn(5, 6).cuda())
