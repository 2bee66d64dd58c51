"""Scheduler mode: every fixed-grid solver as a drop-in diffusers scheduler.

    pipe.scheduler = DiffsolveScheduler.from_config(pipe.scheduler.config, solver="dpmpp-2m")

:class:`DiffsolveScheduler` reads the pipeline's schedule from its scheduler config (DDPM-style
betas with eps / sample / v prediction, or flow matching with a static or dynamic shift), lists
one timestep per model call (so solvers with several calls per step, heun or pc, get them), and in
``step`` pumps the solver's generator (``diffsolve.samplers.base``): the pipeline's model output
answers the solver's last query and the next query point is returned as ``prev_sample``. No solver
is written twice. A run's state is per thread, so one pipeline may be called from two threads.
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput

from ...models.model import Prediction
from ...samplers.base import as_query
from ...samplers.noise import NoiseSource
from ...samplers.registry import get_solver, solver_info
from ...schedules import RectifiedFlow, VPDiscrete, make_grid
from .config import PREDICTIONS, flow_shift

Tensor = torch.Tensor


@dataclass
class DiffsolveSchedulerOutput(BaseOutput):
    prev_sample: Tensor
    pred_original_sample: Tensor | None = None


class _Run(threading.local):
    """Per-thread run state (what ``set_timesteps`` makes and ``step`` advances)."""

    timesteps: Tensor | None = None
    sigmas: Tensor | None = None
    grid: Tensor | None = None
    num_inference_steps: int | None = None
    step_index: int | None = None
    begin_index: int | None = None
    init_noise_sigma: float = 1.0
    gen: Any = None
    pending: Any = None


class DiffsolveScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler hosting any fixed-grid diffsolve solver.

    Parameters (besides diffusers' usual config keys, read from the pipeline's scheduler config):
    solver: a registered solver name; solver_options: its options (a dict);
    steps_grid: the time grid; None (default) places the steps exactly as the pipeline's own
        scheduler (``source``, the diffusers class whose config this was made from) does, or as
        diffusers' DDIMScheduler / FlowMatchEulerDiscreteScheduler do when the source is unknown;
        or one of diffsolve's grid kinds ("log-snr", "karras", ...);
    final: where the last step ends: "zero" (the clean end, as DDIM with ``set_alpha_to_one`` and the
        Euler/DPM-Solver schedulers with ``final_sigmas_type="zero"``) or "sigma_min" (the smallest
        training noise level);
    seed: the base seed of stochastic solvers when the pipeline passes no generator (SD3 and Flux
        never do): sample i gets seed + i.
    t_max: clip the grid's times to at most this (for flow matching the time is sigma). Flow
        pipelines start at sigma = 1, where alpha = 0: solvers that need alpha > 0 there (the
        reversible ones, SDE solvers) run with e.g. ``t_max=0.999``.
    """

    order = 1
    # diffusers schedulers whose config keys from_config drops silently (they are not ours)
    _compatibles = [e.name for e in KarrasDiffusionSchedulers] + ["FlowMatchEulerDiscreteScheduler",
                                                                    "FlowMatchHeunDiscreteScheduler"]

    @register_to_config
    def __init__(self, solver: str = "dpmpp-2m", solver_options: dict | None = None, steps_grid: str | None = None,
                 final: str = "zero", seed: int | None = None, flow: bool = False, source: str | None = None,
                 t_max: float | None = None,
                 num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Any = None, prediction_type: str = "epsilon",
                 timestep_spacing: str = "leading", steps_offset: int = 0, rescale_betas_zero_snr: bool = False,
                 shift: float = 1.0, use_dynamic_shifting: bool = False, base_shift: float = 0.5,
                 max_shift: float = 1.15, base_image_seq_len: int = 256, max_image_seq_len: int = 4096,
                 time_shift_type: str = "exponential"):
        self.solver = get_solver(solver, **(solver_options or {}))
        info = solver_info(self.solver.name)
        if not info.fixed_grid:
            raise ValueError(f"solver {self.solver.name!r} chooses its own steps; a diffusers pipeline needs a "
                             "fixed list of timesteps: use diffsolve.integrations.diffusers.sample_pipeline")
        if final not in ("zero", "sigma_min"):
            raise ValueError(f"final must be 'zero' or 'sigma_min', got {final!r}")
        if flow:
            self.schedule = RectifiedFlow()
            self.kind = "velocity"
        else:
            if prediction_type not in PREDICTIONS or prediction_type == "flow_prediction":
                raise ValueError(f"prediction_type {prediction_type!r} is not supported; allowed: epsilon, sample, "
                                 "v_prediction (flow-matching configs are recognised by their class name)")
            self.schedule = VPDiscrete.from_diffusers_config(dict(self.config))
            self.kind = PREDICTIONS[prediction_type]
        self.order = info.calls_per_step
        self._run = _Run()

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """As ConfigMixin.from_config (a config or a scheduler). The source scheduler's class (its
        config's ``_class_name``, or the scheduler's type) becomes ``source``; FlowMatch* sets ``flow``."""
        if isinstance(config, ConfigMixin):
            name, config = type(config).__name__, config.config
        else:
            name = str((config or {}).get("_class_name", "")) if hasattr(config, "get") else ""
        if "flow" not in kwargs and name.startswith("FlowMatch"):
            kwargs["flow"] = True
        if "source" not in kwargs and name and name != cls.__name__:
            kwargs["source"] = name
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    # --------------------------------------------------------------------------- run state
    timesteps = property(lambda self: self._run.timesteps)
    sigmas = property(lambda self: self._run.sigmas)
    num_inference_steps = property(lambda self: self._run.num_inference_steps)
    step_index = property(lambda self: self._run.step_index)
    init_noise_sigma = property(lambda self: self._run.init_noise_sigma)
    begin_index = property(lambda self: self._run.begin_index)

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._run.begin_index = begin_index

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # --------------------------------------------------------------------------- the grid
    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None, *,
                      timesteps: Sequence[float] | None = None, sigmas: Sequence[float] | None = None,
                      mu: float | None = None) -> None:
        """Place the steps, list one timestep per model call, and reset the run state.

        Explicit ``timesteps`` of a DDPM-style config are used as given; otherwise the source
        scheduler places the steps (DDIM's or FlowMatchEuler's placement when the source is unknown),
        or ``steps_grid`` does."""
        if num_inference_steps is None:
            given = timesteps if timesteps is not None else sigmas
            if given is None:
                raise ValueError("set_timesteps needs num_inference_steps, timesteps or sigmas")
            num_inference_steps = len(given)
        n = int(num_inference_steps)
        if sigmas is not None and not self.config.flow:
            raise ValueError("sigmas= is for flow-matching configs; give timesteps= for DDPM-style ones")
        self._run.init_noise_sigma = 1.0
        if self.config.steps_grid is not None:
            grid = self._own_grid(n, mu)
        elif timesteps is not None and not self.config.flow:
            grid = self._with_end(self.schedule.t_of_timestep(torch.as_tensor(timesteps, dtype=torch.float64)), True)
        else:
            grid = self._source_grid(n, timesteps, sigmas, mu)
        self._set_grid(grid, n, device)

    def _with_end(self, steps: Tensor, clean: bool) -> Tensor:
        """``steps`` (descending times) and the final point: the clean end when ``clean`` and
        final="zero", else the smallest training noise level."""
        if clean and self.config.final == "zero":
            end = 0.0
        elif self.config.flow:
            end = min(1.0 / self.config.num_train_timesteps, float(steps[-1]) / 2)
        else:
            end = float(self.schedule.t_of_timestep(0))
        return torch.unique_consecutive(torch.cat([steps.to(torch.float64), steps.new_tensor([end], dtype=torch.float64)]))

    def _own_grid(self, n: int, mu: float | None) -> Tensor:
        """diffsolve's grid kind ``steps_grid``; for flows on the (statically or dynamically) shifted path."""
        c = self.config
        if not c.flow:
            return self._with_end(make_grid(self.schedule, n, c.steps_grid, t_min=float(self.schedule.t_of_timestep(0))), True)
        if c.use_dynamic_shifting and mu is None:
            raise ValueError("this flow scheduler uses dynamic shifting: set_timesteps needs mu")
        path = RectifiedFlow(shift=flow_shift(c, mu), t_min=1.0 / c.num_train_timesteps)
        return self._with_end(path.sigma(make_grid(path, n, c.steps_grid)), True)

    def _source_grid(self, n, timesteps, sigmas, mu) -> Tensor:
        """The grid the source diffusers scheduler places (its distinct steps plus its final point)."""
        import diffusers

        default = "FlowMatchEulerDiscreteScheduler" if self.config.flow else "DDIMScheduler"
        ref_cls = getattr(diffusers, self.config.source or default, None) or getattr(diffusers, default)
        keys = set(inspect.signature(ref_cls.__init__).parameters) - set(self.config.get("_use_default_values", []))
        ref = ref_cls.from_config({k: v for k, v in self.config.items() if k in keys})  # the source's own defaults
        kw = {k: v for k, v in (("timesteps", timesteps), ("sigmas", sigmas), ("mu", mu)) if v is not None}
        ref.set_timesteps(n, **kw) if kw else ref.set_timesteps(n)
        if self.config.flow:
            sig = torch.unique_consecutive(torch.as_tensor(ref.sigmas, dtype=torch.float64))
            return self._with_end(sig[:-1] if float(sig[-1]) == 0.0 else sig, True)
        t = self.schedule.t_of_timestep(torch.unique_consecutive(torch.as_tensor(ref.timesteps, dtype=torch.float64)))
        # k-diffusion-style sources keep the latents as x / alpha and start them at init_noise_sigma z:
        # the same start in x is alpha(t_0) init_noise_sigma z
        init = float(getattr(ref, "init_noise_sigma", 1.0))
        self._run.init_noise_sigma = init if init == 1.0 else init * float(self.schedule.alpha(t[0]))
        final_sigma = getattr(ref, "sigmas", None)
        clean = (float(final_sigma[-1]) == 0.0) if final_sigma is not None else \
            bool(getattr(ref.config, "set_alpha_to_one", True))
        return self._with_end(t, clean)

    def _set_grid(self, grid: Tensor, n: int, device) -> None:
        if self.config.t_max is not None:
            grid = torch.unique_consecutive(grid.clamp(max=float(self.config.t_max)))
        query_t = self._query_times(grid)
        net_t = self.schedule.timestep(query_t) * (self.config.num_train_timesteps if self.config.flow else 1)
        r = self._run
        r.grid, r.num_inference_steps = grid, n
        r.timesteps = net_t.to(device=device, dtype=torch.float32)
        r.sigmas = (self.schedule.sigma(torch.cat([query_t, grid[-1:]])) /
                    self.schedule.alpha(torch.cat([query_t, grid[-1:]])).clamp_min(1e-12)).to(torch.float32) \
            if not self.config.flow else torch.cat([query_t, grid[-1:]]).to(torch.float32)
        r.step_index, r.begin_index, r.gen, r.pending = None, None, None, None

    def _query_times(self, grid: Tensor) -> Tensor:
        """The times of the solver's model calls on ``grid`` (a dry run on a one-element state)."""
        x = torch.zeros(1, 1, dtype=torch.float64)
        run = self.solver.run(x, grid, NoiseSource((1, 1), seeds=[0], dtype=torch.float64), schedule=self.schedule)
        times = []
        try:
            item = next(run)
            while True:
                q = as_query(item)
                times.append(float(q.t))
                item = run.send(Prediction(q.x, q.t, torch.zeros_like(q.x), "eps", self.schedule))
        except StopIteration:
            pass
        return torch.tensor(times, dtype=torch.float64)

    # --------------------------------------------------------------------------- the loop
    def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
        return sample

    def step(self, model_output: Tensor, timestep: Any, sample: Tensor, generator=None,
             return_dict: bool = True) -> DiffsolveSchedulerOutput | tuple:
        """Answer the solver's pending query with ``model_output`` (at ``sample``) and return its next
        query point (or the final samples) as ``prev_sample``."""
        r = self._run
        if r.grid is None:
            raise RuntimeError("call set_timesteps before step")
        if r.gen is None:
            self._start(sample, generator)
        q = r.pending
        pred = Prediction(sample.to(q.x.dtype), q.t, model_output.to(q.x.dtype), self.kind, self.schedule)
        try:
            r.pending = as_query(r.gen.send(pred))
            prev = r.pending.x
        except StopIteration as stop:
            out = stop.value
            prev = out.x if hasattr(out, "accepted") else out
            r.gen, r.pending = None, None
        r.step_index = (r.step_index or 0) + 1
        prev = prev.to(sample.dtype)
        if not return_dict:
            return (prev, pred.x0.to(sample.dtype))
        return DiffsolveSchedulerOutput(prev_sample=prev, pred_original_sample=pred.x0.to(sample.dtype))

    def _start(self, sample: Tensor, generator) -> None:
        r = self._run
        if isinstance(generator, torch.Generator):
            generator = [generator] * sample.shape[0] if sample.shape[0] > 1 else [generator]
        seeds = None
        if generator is None:
            base = self.config.seed if self.config.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
            seeds = [base + i for i in range(sample.shape[0])]
        dtype = torch.float32 if sample.dtype in (torch.float16, torch.bfloat16) else sample.dtype
        src = NoiseSource(sample.shape, seeds=seeds, generators=generator, device=sample.device, dtype=dtype)
        grid = r.grid if r.begin_index in (None, 0) else r.grid[self._begin_step():]
        r.gen = self.solver.run(sample.to(dtype), grid, src, schedule=self.schedule)
        r.pending = as_query(next(r.gen))
        r.step_index = r.begin_index or 0

    def _begin_step(self) -> int:
        """The grid index a begin index (counted in model calls, as img2img sets it) starts from."""
        return (self._run.begin_index or 0) // max(1, self.order)

    # --------------------------------------------------------------------------- forward process
    def _time_of(self, timesteps: Tensor) -> Tensor:
        t = torch.as_tensor(timesteps, dtype=torch.float64).cpu()
        if self.config.flow:
            return t / self.config.num_train_timesteps
        return self.schedule.t_of_timestep(t)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """x_t = alpha x0 + sigma noise at the pipeline's timesteps (img2img, inpainting)."""
        t = self._time_of(timesteps).reshape(-1)
        shape = (-1, *([1] * (original_samples.ndim - 1)))
        a = self.schedule.alpha(t).to(original_samples).reshape(shape)
        s = self.schedule.sigma(t).to(original_samples).reshape(shape)
        return a * original_samples + s * noise

    def scale_noise(self, sample: Tensor, timestep: Tensor, noise: Tensor) -> Tensor:
        """The flow forward process (SD3 / Flux img2img)."""
        return self.add_noise(sample, noise, timestep)
