"""Scheduler mode: every fixed-grid solver as a drop-in diffusers scheduler.

    pipe.scheduler = DiffsolveScheduler.from_config(pipe.scheduler.config, solver="dpmpp-2m")

:class:`DiffsolveScheduler` reads the pipeline's schedule from its scheduler config (DDPM-style
betas with eps / sample / v prediction, or flow matching with a static or dynamic shift), lists
one timestep per model call (so solvers with several calls per step, heun or pc, get them), and in
``step`` pumps the solver's generator (``diffsolve.core.protocol``): the pipeline's model output
answers the solver's last query and the next query point is returned as ``prev_sample``. No solver
is written twice. A run's state is per thread, so one pipeline may be called from two threads.
"""

from __future__ import annotations

import inspect
import math
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import (
    KarrasDiffusionSchedulers,
    SchedulerMixin,
)
from diffusers.utils import BaseOutput

from ...core.noise import NoiseSource
from ...core.protocol import Pump, as_outcome, drive
from ...core.registry import get_solver, solver_info
from ...models.model import Prediction
from ...models.tuned import tuned_prediction
from ...schedules import RectifiedFlow, grid_kind_params, make_grid
from ...schedules.base import Schedule
from ...schedules.grids import MODEL_GRID_KINDS
from ...schedules.optimized import FORMAT as GRID_FORMAT
from ...schedules.optimized import OptimizedGrid, as_optimized_grid, is_grid_file
from .config import flow_shift
from .sources import Placement, make_source, source_class

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
    listed_t: list[float] | None = None  # the time of each listed model call
    reads: dict[float, float] | None = None  # grid time -> the source's timestep the output is read at (or empty)
    final_scale: float = 1.0  # the final latents are this times x (the source's latent space)
    by_timestep: dict[float, float] | None = None  # listed network timestep -> time
    num_inference_steps: int | None = None
    step_index: int | None = None
    begin_index: int | None = None
    init_noise_sigma: float = 1.0
    started: bool = False
    pump: Any = None  # the solver's run (a Pump), waiting for the next model output
    dtype: Any = None
    tuning: dict[float, tuple[float, float]] | None = None  # grid time -> (model time, data weight)


# (ignore: diffusers types config_name as str in SchedulerMixin and None in ConfigMixin, as in all its schedulers)
class DiffsolveScheduler(SchedulerMixin, ConfigMixin):  # type: ignore[misc]
    """A diffusers scheduler hosting any fixed-grid diffsolve solver.

    Made from the pipeline's scheduler config, ``DiffsolveScheduler.from_config(pipe.scheduler.config,
    solver=...)`` (a config dict or the scheduler itself), it reads the schedule the way the scheduler
    it replaces (``source``) does (:mod:`.sources`: DDPM-style betas with eps / sample / v
    prediction, flow matching, EDM preconditioning), places the steps where that scheduler places
    them, calls the network at that scheduler's timesteps, and ends where it ends; N inference steps
    of a one-call-per-step solver are N model calls.

    Parameters (besides the source's config, kept whole in ``source_config``):
    solver: a registered solver name; solver_options: its options (a dict);
    steps_grid: None (default) places the steps as ``source`` does (DDIM's or FlowMatchEuler's
        placement when the config names no class); or one of diffsolve's grid kinds ("log-snr",
        "karras", ...), or a kind with its parameters (``("karras", {"rho": 5})``), from the
        schedule's largest to its smallest training noise level, the last of the N steps jumping to
        the clean end (``final="zero"``); the kinds read off a model's noise levels ("trailing",
        "simple", "ays-sd1", "optimal-steps", ... which end at the clean end themselves) place their
        own N points, then the clean end; or an :class:`~diffsolve.OptimizedGrid` (the object, its
        .json file, or its dict as a saved config holds it) from :func:`diffsolve.optimize_grid`:
        its noise levels, for exactly its number of steps, with its solver options when ``solver``
        is the one it was fitted for and ``solver_options`` is not given;
    final: where the last step ends: None (default) where the source ends (diffsolve's grids: the
        clean end); "zero": the clean end; "sigma_min": the smallest training noise level (solvers
        that work in x/sigma, rex, need it). The number of model calls stays the same;
    seed: the base seed of stochastic solvers when the pipeline passes no generator (SD3 and Flux
        never do): sample i gets seed + i.
    t_max: clip the grid's times to at most this (for flow matching the time is sigma). Flow
        pipelines start at sigma = 1, where alpha = 0: solvers that need alpha > 0 there (the
        reversible ones, SDE solvers) run with e.g. ``t_max=0.999``.
    """

    order = 1
    # diffusers schedulers whose config keys from_config drops silently (they are not ours)
    _compatibles = [e.name for e in KarrasDiffusionSchedulers] + [
        "FlowMatchEulerDiscreteScheduler",
        "FlowMatchHeunDiscreteScheduler",
    ]

    @register_to_config
    def __init__(
        self,
        solver: str = "dpmpp-2m",
        solver_options: dict | None = None,
        steps_grid: str | tuple[str, dict] | OptimizedGrid | dict | None = None,
        final: str | None = None,
        seed: int | None = None,
        flow: bool = False,
        source: str | None = None,
        source_config: dict | None = None,
        t_max: float | None = None,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Any = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        time_shift_type: str = "exponential",
    ):
        self.solver = get_solver(solver, **(solver_options or {}))
        info = solver_info(self.solver.name)
        if self.solver.cfg_pp:
            raise ValueError(
                f"solver {self.solver.name!r} is a CFG++ sampler: it needs the conditional and the "
                "unconditional predictions, and a scheduler gets the pipeline's guided output only; "
                "sample with ds.sample and ds.guidance.CFGPlusPlus"
            )
        if not info.fixed_grid:
            raise ValueError(
                f"solver {self.solver.name!r} chooses its own steps; a diffusers pipeline needs a "
                "fixed list of timesteps: use diffsolve.integrations.diffusers.sample_pipeline"
            )
        self._optimized = None
        if is_grid_file(steps_grid) or (isinstance(steps_grid, dict) and steps_grid.get("format") == GRID_FORMAT):
            art = OptimizedGrid.from_dict(steps_grid) if isinstance(steps_grid, dict) else as_optimized_grid(steps_grid)
            if solver_options is None and self.solver.name == art.solver:
                self.solver = get_solver(solver, **art.options)  # the options it was fitted with
                self.register_to_config(solver_options=dict(art.options))
            art.check_use(self.solver.name)
            if art.teleport is not None:
                raise ValueError(
                    "steps_grid: this grid hands over from a Gaussian's exact flow (a teleport), which a "
                    "diffusers pipeline cannot run (it draws its latents at the first timestep); sample it "
                    "with ds.sample(teleport=...), or fit a grid without teleport"
                )
            self.register_to_config(steps_grid=art.to_dict())  # the config stays JSON
            self._optimized = art
        if final not in (None, "zero", "sigma_min"):
            raise ValueError(f"final must be None, 'zero' or 'sigma_min', got {final!r}")
        if source_config is None:  # made from keyword arguments: a DDPM-style or flow config of its own
            keys = set(inspect.signature(DiffsolveScheduler.__init__).parameters) - {
                "self",
                "solver",
                "solver_options",
                "steps_grid",
                "final",
                "seed",
                "flow",
                "source",
                "source_config",
                "t_max",
            }
            source_config = {k: v for k, v in self.config.items() if k in keys}
            if flow:
                source_config.pop("prediction_type", None)
        self.source = make_source(source_config, source, flow)
        self.schedule = self.source.schedule
        self.order = info.calls_per_step
        self._run = _Run()

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """As ConfigMixin.from_config, from a scheduler config (a dict, as ``pipe.scheduler.config``) or
        a scheduler. The config is kept whole (``source_config``) and its class (``_class_name``, the
        scheduler's type, or the class whose options are exactly the config's keys) is the ``source``."""
        if isinstance(config, ConfigMixin):
            name, cfg = type(config).__name__, dict(config.config)
        else:
            cfg = dict(config or {})
            name = None
        if cfg.get("_class_name") != cls.__name__ and "source_config" not in kwargs:
            name = name or source_class(cfg)
            kwargs.setdefault("source", name)
            kwargs["source_config"] = {
                k: v for k, v in cfg.items() if not k.startswith("_") or k == "_use_default_values"
            }
        return super().from_config(cfg, return_unused_kwargs=return_unused_kwargs, **kwargs)

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
        return int(self.source.config.get("num_train_timesteps", 1000))

    # --------------------------------------------------------------------------- the grid
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        *,
        timesteps: Sequence[float] | None = None,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
    ) -> None:
        """Place the steps, list one timestep per model call, and reset the run state.

        By default the source scheduler places the steps (explicit ``timesteps`` or ``sigmas`` are
        passed to it); with ``steps_grid`` diffsolve's grid does."""
        if num_inference_steps is None:
            given = timesteps if timesteps is not None else sigmas
            if given is None:
                raise ValueError("set_timesteps needs num_inference_steps, timesteps or sigmas")
            num_inference_steps = len(given)
        n = int(num_inference_steps)
        if n < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        self._run.tuning = None
        if self.config["steps_grid"] is not None:
            grid = self._own_grid(n, mu)
            place = Placement(grid, {}, self.source.prior_scale(float(grid[0])))
        else:
            place = self._with_final(self.source.place(n, timesteps, sigmas, mu))
        self._set_grid(place, n, device)

    def _final(self, grid: Tensor) -> str | None:
        """``final``, or ``"sigma_min"`` where ``grid`` ends at the clean end and the solver cannot
        reach it (:meth:`~diffsolve.core.protocol.Solver.replace_ends`: the data-form reversible solvers
        and rex divide by sigma), with a warning."""
        final = self.config["final"]
        if final is None and "t_min" in self.solver.replace_ends(self.schedule, float(grid[0]), float(grid[-1])):
            warnings.warn(
                f"solver {self.solver.name!r} cannot reach the clean end (sigma = 0): its last step "
                "ends at the smallest training noise level instead (final='sigma_min'; pass final= "
                "to choose)",
                stacklevel=3,
            )
            return "sigma_min"
        return final

    def _t_max(self, grid: Tensor) -> float | None:
        """``t_max``, or the solver's own where it cannot start where ``grid`` does (alpha = 0 there:
        flow pipelines for the noise-form reversible solvers), with a warning."""
        t_max = self.config["t_max"]
        if t_max is None and "t_max" in (
            ends := self.solver.replace_ends(self.schedule, float(grid[0]), float(grid[-1]))
        ):
            t_max = ends["t_max"]
            warnings.warn(
                f"solver {self.solver.name!r} cannot start where alpha = 0: the grid is clipped to "
                f"t_max={t_max:.6g} (pass t_max= to choose)",
                stacklevel=3,
            )
        return t_max

    def _with_final(self, place: Placement) -> Placement:
        """The source's placement with its end moved to ``final`` (same number of calls)."""
        g, lo, final = place.grid, self.source.t_min, self._final(place.grid)
        if final == "zero" and float(g[-1]) != 0.0:
            if place.identity_last:
                return replace(place, grid=torch.cat([g, g.new_zeros(1)]), identity_last=False)
            return replace(place, grid=torch.cat([g[:-1], g.new_zeros(1)]))
        if final == "sigma_min" and float(g[-1]) == 0.0:
            if float(g[-2]) <= lo:
                return replace(place, grid=g[:-1], identity_last=True)
            return replace(place, grid=torch.cat([g[:-1], g.new_tensor([lo])]))
        return place

    def _own_grid(self, n: int, mu: float | None) -> Tensor:
        """diffsolve's grid kind ``steps_grid`` for n model calls of a one-call solver: n - 1 steps
        from the largest to the smallest training noise level, then the jump to the clean end
        (``final="zero"``); or n steps ending at the smallest level (``final="sigma_min"``). Flows
        step on the (statically or dynamically) shifted path."""
        kind = self.config["steps_grid"]
        if self.source.flow:  # on the shifted path, whose times map to the source's sigmas
            sc = self.source.config
            if sc.get("use_dynamic_shifting", False) and mu is None:
                raise ValueError("this flow scheduler uses dynamic shifting: set_timesteps needs mu")
            schedule: Schedule = RectifiedFlow(shift=flow_shift(sc, mu), t_min=1.0 / len(self))
            t_min: float | None = None
            to_time: Callable[[Tensor], Tensor] = schedule.sigma
        else:
            schedule, t_min, to_time = self.schedule, self.source.t_min, (lambda g: g)
        if self._optimized is not None:  # its noise levels sigma/alpha, as times of this schedule
            art = self._optimized
            grid = to_time(self._optimized_times(art, art.sigmas, schedule, n)).to(torch.float64)
            if art.calls is not None:  # its tuned calls: the model asked at other noise levels
                model = to_time(self._optimized_times(art, art.calls["sigmas"], schedule, n)).to(torch.float64)
                self._run.tuning = {float(t): (float(m), w) for t, m, w in zip(grid, model, art.calls["data_weights"])}
            return grid
        sigma_min = self._final(torch.tensor([schedule.t_max, 0.0])) == "sigma_min"
        named = grid_kind_params(kind)
        if named is not None and named[0] in MODEL_GRID_KINDS:  # n points of the kind's own, then its end
            g = make_grid(schedule, n, kind, t_min=t_min if sigma_min else None)
            return to_time(g).to(torch.float64)
        if sigma_min:
            return to_time(make_grid(schedule, n, kind, t_min=t_min)).to(torch.float64)
        g = (
            make_grid(schedule, n - 1, kind, t_min=t_min)
            if n > 1
            else torch.tensor([schedule.t_max], dtype=torch.float64)
        )
        g = to_time(g).to(torch.float64)
        return torch.cat([g, g.new_zeros(1)])

    @staticmethod
    def _optimized_times(art: OptimizedGrid, sigmas: Sequence[float], schedule: Schedule, n: int) -> Tensor:
        """The noise levels s = sigma/alpha ``sigmas`` (of the optimized grid ``art``) as times of
        ``schedule`` (inf: its t_max; 0: the clean end); the grid's step count must be ``n``."""
        if n != art.steps:
            raise ValueError(
                f"num_inference_steps={n}, but the optimized steps_grid has {art.steps} steps "
                f"(fitted for {art.solver!r}): use {art.steps}, or fit a grid for {n} steps"
            )
        ts = []
        for s in sigmas:
            if math.isinf(s):
                ts.append(float(schedule.t_max))
            elif s <= 0:
                ts.append(0.0)
            else:
                ts.append(float(schedule.t_of_log_snr(torch.tensor(-math.log(s), dtype=torch.float64))))
        return torch.tensor(ts, dtype=torch.float64)

    def _set_grid(self, place: Placement, n: int, device) -> None:
        grid, t_max = place.grid, self._t_max(place.grid)
        if t_max is not None:
            grid = torch.unique_consecutive(grid.clamp(max=float(t_max)))
        listed = self._query_times(grid) if len(grid) > 1 else []
        if place.identity_last:
            listed.append(float(grid[-1]))
        given = [place.timesteps.get(t, None) for t in listed]
        net = [self.source.net_timestep(self._model_time(t)) if k is None else k for t, k in zip(listed, given)]
        r = self._run
        r.grid, r.num_inference_steps, r.listed_t = grid, n, listed
        r.by_timestep = dict(zip(net, listed))
        r.timesteps = torch.tensor(net, dtype=torch.float32, device=device)
        r.sigmas = torch.tensor([self.source.listed_sigma(t) for t in [*listed, float(grid[-1])]], dtype=torch.float32)
        r.init_noise_sigma = place.init_noise_sigma
        r.reads = place.timesteps if place.read_listed else {}
        r.final_scale = 1.0 / float(self.schedule.alpha(grid[-1])) if place.over_alpha else 1.0
        r.step_index, r.begin_index, r.started, r.pump = None, None, False, None

    def _query_times(self, grid: Tensor) -> list[float]:
        """The times of the solver's model calls on ``grid`` (a dry run on a one-element state)."""
        x = torch.zeros(1, 1, dtype=torch.float64)
        run = self.solver.run(x, grid, NoiseSource((1, 1), seeds=[0], dtype=torch.float64), schedule=self.schedule)
        times = []

        def answer(q):
            times.append(float(q.t))
            zero = torch.zeros_like(q.x)  # x = 0 is x0 = 0 and eps = 0 at every time, alpha = 0 included
            return Prediction.from_pair(q.x, q.t, zero, zero, self.schedule)

        drive(run, answer)
        return times

    def _model_time(self, t: float) -> float:
        """The time the network is asked at for a query at ``t``: ``t``, or a tuned call's model time."""
        return (self._run.tuning or {}).get(t, (t, 1.0))[0]

    # --------------------------------------------------------------------------- the loop
    def _current_time(self) -> float:
        r = self._run
        if r.listed_t is None:
            raise RuntimeError("call set_timesteps first")
        i = r.step_index if r.step_index is not None else (r.begin_index or 0)
        return r.listed_t[min(i, len(r.listed_t) - 1)]

    def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
        """The latents are the state x itself; only EDM-preconditioned sources scale the input."""
        c = self.source.c_in(self._model_time(self._current_time())) if self._run.listed_t else 1.0
        return sample if c == 1.0 else sample * c

    def step(
        self,
        model_output: Tensor,
        timestep: Any,
        sample: Tensor,
        generator=None,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> DiffsolveSchedulerOutput | tuple:
        """Answer the solver's pending query with ``model_output`` (at ``sample``) and return its next
        query point (or the final samples) as ``prev_sample``. Other schedulers' keyword arguments
        (``prev_timestep``, ...) are accepted and ignored."""
        r = self._run
        listed, reads = r.listed_t, r.reads
        if r.grid is None or listed is None or reads is None:  # (set together by set_timesteps)
            raise RuntimeError("call set_timesteps before step")
        if not r.started:
            self._start(sample, generator)
        x, out = sample.to(r.dtype), model_output.to(r.dtype)
        if r.pump is not None:
            t = r.pump.query.t
            read = reads.get(float(t)) if reads and torch.as_tensor(t).ndim == 0 else None
            tuned = (r.tuning or {}).get(float(t)) if torch.as_tensor(t).ndim == 0 else None
            pred = self.source.prediction(x, t if tuned is None else tuned[0], out, read)
            if tuned is not None:  # a tuned call (diffsolve.models.tuned): the output is the model's at tuned[0]
                pred = tuned_prediction(pred, x, t, tuned[1])
            r.pump.answer(pred)
            if r.pump.done:
                prev, r.pump = as_outcome(r.pump.value, self.solver.name).x, None
            else:
                prev = r.pump.query.x
        else:  # the source's last call steps from a noise level to itself: the sample stays
            pred = self.source.prediction(x, listed[-1], out, reads.get(listed[-1]))
            prev = x
        r.step_index = (r.step_index or 0) + 1
        if r.step_index >= len(listed):
            r.started = False
            if r.final_scale != 1.0:  # k-diffusion-style sources end in x/alpha (1 at the clean end)
                prev = prev * r.final_scale
        prev, x0 = prev.to(sample.dtype), pred.x0.to(sample.dtype)
        if not return_dict:
            return (prev, x0)
        return DiffsolveSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def _start(self, sample: Tensor, generator) -> None:
        r = self._run
        if isinstance(generator, torch.Generator):
            generator = [generator] * sample.shape[0] if sample.shape[0] > 1 else [generator]
        seeds = None
        if generator is None:
            seed = self.config["seed"]
            base = seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
            seeds = [base + i for i in range(sample.shape[0])]
        # the solver's arithmetic in float64 (float32 where the device has no float64): diffusers'
        # schedulers upcast half samples to float32, and a float32 sample loses 1e-5 to rounding
        # over a run at noise levels far from 1 (SVD's sigma_max = 700)
        r.dtype = torch.float32 if sample.device.type == "mps" else torch.float64
        # noise drawn in the pipeline's dtype, from its generator(s), as diffusers' schedulers draw it
        src = NoiseSource(sample.shape, seeds=seeds, generators=generator, device=sample.device, dtype=sample.dtype)
        if r.grid is None:
            raise RuntimeError("call set_timesteps before step")
        grid = r.grid if r.begin_index in (None, 0) else r.grid[self._begin_step() :]
        r.pump = None
        if len(grid) > 1:
            r.pump = Pump(self.solver.run(sample.to(r.dtype), grid, src, schedule=self.schedule))
        r.step_index = r.begin_index or 0
        r.started = True

    def _begin_step(self) -> int:
        """The grid index a begin index (counted in model calls, as img2img sets it) starts from."""
        return (self._run.begin_index or 0) // max(1, self.order)

    # --------------------------------------------------------------------------- forward process
    def _time_of(self, timesteps: Tensor) -> Tensor:
        """The times of network timesteps: those this run lists, else the source's own map."""
        ks = torch.as_tensor(timesteps, dtype=torch.float64).cpu().reshape(-1)
        table = self._run.by_timestep or {}
        return torch.tensor(
            [table[k] if k in table else self.source.t_of_net(k) for k in ks.tolist()], dtype=torch.float64
        )

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
