"""A fixed-grid, deterministic sampling run captured once as a CUDA graph and replayed.

Every step of a fixed-grid solver launches the same kernels on tensors of the same shapes, and none
reads anything back to the host (``tests/test_gpu_readiness.py``), so the whole run (model calls
included, where the network allows capture: static shapes, no host reads, no CPU fallbacks) can be
recorded once and replayed with one launch. That removes the per-kernel launch cost, which dominates
small batches on a GPU.

    sampler = CUDAGraphSampler(model, "dpmpp-2m", 20, shape=(16, 4, 64, 64), dtype=torch.float16)
    x0 = sampler(x_T)      # copy x_T in, replay, return a copy of the samples

Stochastic solvers are refused: their noise comes from per-sample host generators, which a replay
would not advance. The finite checks of the captured run are read after each replay, so a NaN still
raises :class:`~diffsolve.models.NonFiniteError` naming the step and time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..models.model import DiffusionModel, FiniteGuard
from .registry import solver_info

Tensor = torch.Tensor
_DRIVER_OPTIONS = ("grid", "t_max", "t_min", "mu", "cond", "uncond", "hooks", "seed", "noise")


class CUDAGraphSampler:
    """``ds.sample(model, solver, steps, x_T=...)`` as one CUDA graph (see the module docstring).

    ``shape``, ``device`` (a CUDA device) and ``dtype`` fix the input; ``warmup`` eager runs on a
    side stream come first (they fill the schedule memos and let cuDNN / compile pick kernels);
    ``options`` go to :func:`diffsolve.sample` (grid, t_max, cond as tensors of the batch, ...).
    """

    def __init__(
        self,
        model: DiffusionModel,
        solver: str,
        steps: int,
        shape: Sequence[int],
        *,
        device: str | torch.device = "cuda",
        dtype: torch.dtype = torch.float32,
        warmup: int = 2,
        **options: Any,
    ):
        from .driver import resolve_solver, sample

        slv = resolve_solver(solver, {k: v for k, v in options.items() if k not in _DRIVER_OPTIONS})
        info = solver_info(slv.name)
        if not info.fixed_grid or not info.deterministic:
            raise ValueError(
                f"CUDAGraphSampler replays fixed-grid deterministic solvers; {slv.name!r} is "
                f"{'adaptive' if not info.fixed_grid else 'stochastic'} (its steps or its host-side "
                "noise differ from run to run)"
            )
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"CUDAGraphSampler needs a CUDA device, got device={str(device)!r}")
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1, got {warmup!r}")
        self.shape, self.device, self.dtype = tuple(int(s) for s in shape), device, dtype
        self._x = torch.zeros(self.shape, device=device, dtype=dtype)

        def run():
            return sample(model, solver, steps, x_T=self._x, progress=False, **options)

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(warmup):
                res = run()
        torch.cuda.current_stream(device).wait_stream(side)
        self.nfe = res.nfe
        self.graph = torch.cuda.CUDAGraph()
        before = len(FiniteGuard.captured)
        with torch.cuda.graph(self.graph), torch.no_grad():
            self._out = run().samples
        self._guards = FiniteGuard.captured[before:]
        del FiniteGuard.captured[before:]

    def __call__(self, x_T: Tensor) -> Tensor:
        if tuple(x_T.shape) != self.shape:
            raise ValueError(f"x_T must have the captured shape {self.shape}, got {tuple(x_T.shape)}")
        self._x.copy_(x_T)
        self.graph.replay()
        for g in self._guards:  # one host read per replay
            g.finish()
        return self._out.clone()
