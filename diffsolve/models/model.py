"""The common model interface: ``DiffusionModel`` wraps a network, ``Prediction`` is one answer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch

from ..schedules.base import Schedule, as_time, memoised
from .parameterization import Coefs, check_prediction, compose, from_x0_eps, to_x0_eps

Tensor = torch.Tensor

TIME_INPUTS = ("t", "1000t", "timestep", "sigma", "c_noise", "log_snr")

#: the dtypes a network and a run may have, by name (``dtype=`` takes the names or the torch dtypes)
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def as_dtype(dtype: str | torch.dtype | None, name: str = "dtype") -> torch.dtype | None:
    """A dtype argument as a torch.dtype (None stays None): a name in :data:`DTYPES` or one of their
    dtypes; anything else is refused with a ValueError naming ``name``. The one place dtype names are read."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"{name} {dtype!r} is not supported; allowed: {', '.join(DTYPES)} (names or torch dtypes)")


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are the same (a device without an index, e.g. ``cuda``, matches any of its type)."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


class NonFiniteError(FloatingPointError):
    """The model returned NaN or Inf; the message names the solver, the step and the time."""


class NFECounter:
    """Counts network calls for one run: in total and per sample (rows evaluated)."""

    def __init__(self, batch_size: int):
        self.calls = 0
        self.per_sample = torch.zeros(batch_size, dtype=torch.long)

    def add(self, index: Tensor | None = None) -> None:
        self.calls += 1
        if index is None:
            self.per_sample += 1
        else:
            self.per_sample[index.cpu()] += 1


def all_finite(out: Tensor) -> Tensor:
    """A 0-d bool tensor: no NaN or Inf in ``out``. One reduction pass: the float32 sum of a finite
    tensor is finite unless the values are near float32's limit, which the exact test then settles."""
    total = out.sum(dtype=torch.float64 if out.dtype == torch.float64 else torch.float32)
    return torch.isfinite(total)


def check_finite(out: Tensor, where: str | Callable[[], str]) -> None:
    """Raise :class:`NonFiniteError` naming ``where`` (a string, or a callable built only on failure)
    if ``out`` has a NaN or Inf."""
    if bool(all_finite(out)):
        return
    finite = torch.isfinite(out)
    if bool(finite.all()):  # a finite tensor whose sum overflowed
        return
    where = where() if callable(where) else where
    bad_rows = (~finite).reshape(finite.shape[0], -1).any(dim=1) if out.ndim > 0 else (~finite).reshape(1)
    n_nan = int(torch.isnan(out).sum())
    raise NonFiniteError(
        f"{where}: the model returned non-finite values ({n_nan} NaN, {int((~finite).sum()) - n_nan} Inf) "
        f"in {int(bad_rows.sum())} of {bad_rows.numel()} samples"
    )


class FiniteGuard:
    """The NaN / Inf checks of one run's model outputs.

    On the CPU every output is checked when it arrives (``check_finite``), so a bad output stops the
    run at once. On an accelerator that check would make the host wait for the device at every call,
    so the verdict stays on the device (one flag per run, the index of the first bad call) and is
    read once, at :meth:`finish`: the run ends, then raises :class:`NonFiniteError` naming the first
    bad call's step and time all the same. ``where`` is a callable, built only for that message.
    """

    def __init__(self) -> None:
        self._wheres: list[Callable[[], str]] = []
        self._first: Tensor | None = None

    @staticmethod
    def eager(device: torch.device) -> bool:
        return device.type == "cpu"

    def check(self, out: Tensor, where: Callable[[], str]) -> None:
        if self.eager(out.device):
            check_finite(out, where)
            return
        bad = ~torch.isfinite(out).all()
        if self._first is None:
            self._first = torch.full((), -1, dtype=torch.long, device=out.device)
        self._first = torch.where((self._first < 0) & bad, len(self._wheres), self._first)
        self._wheres.append(where)

    #: guards whose run was captured into a CUDA graph (read after each replay instead)
    captured: ClassVar[list[FiniteGuard]] = []

    def finish(self) -> None:
        """Raise if a deferred check found a bad output (one host read for the whole run). During
        CUDA-graph capture nothing may be read: the guard joins :attr:`captured` and is finished
        after each replay (:class:`diffsolve.core.graphs.CUDAGraphSampler`)."""
        if self._first is None:
            return
        if self._first.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            FiniteGuard.captured.append(self)
            return
        k = int(self._first)
        if k >= 0:
            raise NonFiniteError(
                f"{self._wheres[k]()}: the model returned non-finite values (on "
                f"{self._first.device.type} the outputs are checked once, at the end of the run)"
            )


def _coef(value: Tensor, x: Tensor) -> Tensor:
    """Cast a float64 coefficient of shape [] or [B] to x's dtype and broadcast shape."""
    value = value.to(device=x.device, dtype=x.dtype)
    if value.ndim == 0:
        return value
    return value.reshape(value.shape[0], *([1] * (x.ndim - 1)))


def _grid_coefs(schedule: Schedule, t: float, x: Tensor) -> Coefs:
    """Coefs at one time as 0-d tensors in x's dtype and device, memoised on the schedule (with
    :meth:`Schedule.at`): one lookup per model call instead of several tensor evaluations."""

    def make():
        a, sg = schedule.at(t)
        return Coefs(torch.tensor(a, dtype=x.dtype, device=x.device), torch.tensor(sg, dtype=x.dtype, device=x.device))

    return memoised(schedule, "_coefs_memo", (t, x.dtype, x.device), make)


def _device_time(schedule: Schedule, t: float, device: torch.device) -> Tensor:
    """A grid time as a 0-d float64 tensor on ``device``, memoised on the schedule: no host-to-device
    copy per model call (which CUDA-graph capture would also forbid)."""
    return memoised(schedule, "_time_memo", (t, device), lambda: torch.tensor(t, dtype=torch.float64, device=device))


def timestep_input(t: Tensor, x: Tensor) -> Tensor:
    """A network's timestep for input x: in x's dtype, but at least float32 (diffusers embeds it in
    float32; a bfloat16 timestep would round 999 to 1000)."""
    return t.to(torch.promote_types(x.dtype, torch.float32))


class Prediction:
    """One model answer at (x, t), from which every parameterisation is derived.

    Attributes: ``x`` (the state the model saw), ``t`` (scalar or per-sample [B] tensor), ``mu``,
    ``output`` (the raw network output) and ``kind`` (its parameterisation). Properties ``x0``,
    ``eps``, ``score``, ``v`` and ``velocity`` are computed on first use, all through
    :mod:`diffsolve.models.parameterization`.
    """

    def __init__(self, x: Tensor, t, output: Tensor, kind: str, schedule: Schedule, mu: Tensor | None = None):
        self.x = x
        self.t = as_time(t)
        self.output = output
        self.kind = check_prediction(kind)
        self.schedule = schedule
        self.mu = mu
        self._x0_eps: tuple[Tensor, Tensor] | None = None
        self._pair_given = False  # _x0_eps given by from_pair (not derived from output)
        self._renoise = False  # from_pair(renoise=True): solvers step from the state the pair composes
        self._coefs: Coefs | None = None

    @classmethod
    def from_pair(
        cls,
        x: Tensor,
        t,
        x0: Tensor,
        eps: Tensor,
        schedule: Schedule,
        mu: Tensor | None = None,
        *,
        renoise: bool = False,
    ) -> Prediction:
        """A prediction given by its (x0, eps) pair, which need not satisfy x = alpha x0 + sigma eps
        (CFG++ and thresholding step with a data part and a noise part from different sources).
        ``output`` is x0; every other parameterisation is derived from the pair.

        ``renoise=True`` (CFG++): x0 is the point to denoise toward and eps the noise to renoise
        with, so the solvers that step with the pair (``Solver.steps_with_pair``) step from the state
        they compose (:attr:`pair_x`) and keep the prediction eps makes at x as their history
        (:meth:`eps_prediction`). Otherwise (thresholding, clipping) they step from x with this x0
        and eps, as diffusers' schedulers do with a thresholded x0."""
        pred = cls(x, t, x0, "x0", schedule, mu)
        pred._x0_eps = (x0, eps)
        pred._pair_given = True
        pred._renoise = bool(renoise)
        return pred

    def rebased(self, x: Tensor, mu: Tensor | None = None) -> Prediction:
        """The same answer for the state ``x``, the state the model saw in another precision (a
        half-precision network answering for a float32 state): the output (and the (x0, eps) pair of
        :meth:`from_pair`) cast to x's dtype; every other form is derived afresh in that dtype."""
        if self._pair_given:
            x0, eps = self._pair()  # the pair as given
            return Prediction.from_pair(
                x, self.t, x0.to(x.dtype), eps.to(x.dtype), self.schedule, mu, renoise=self._renoise
            )
        return Prediction(x, self.t, self.output.to(x.dtype), self.kind, self.schedule, mu)

    def rows(self, index: Tensor | slice) -> Prediction:
        """This answer for the rows ``index`` of the batch (a (x0, eps) pair of :meth:`from_pair`
        kept as given)."""
        t = self.t if self.t.ndim == 0 else self.t[index]
        mu = self.mu[index] if isinstance(self.mu, Tensor) and self.mu.ndim > 0 and self.mu.shape[0] > 1 else self.mu
        if self._pair_given:
            x0, eps = self._pair()  # the pair as given
            return Prediction.from_pair(
                self.x[index], t, x0[index], eps[index], self.schedule, mu, renoise=self._renoise
            )
        return Prediction(self.x[index], t, self.output[index], self.kind, self.schedule, mu)

    @property
    def coefs(self) -> Coefs:
        if self._coefs is None:
            t = self.t
            s = self.schedule
            if t.ndim == 0 and t.device.type == "cpu" and not t.requires_grad:  # a grid time: memoised
                self._coefs = _grid_coefs(s, float(t), self.x)
            else:
                self._coefs = Coefs(_coef(s.alpha(t), self.x), _coef(s.sigma(t), self.x))
        return self._coefs

    def _coefs_with_dots(self) -> Coefs:
        c = self.coefs
        if c.alpha_dot is None:
            s = self.schedule
            c = self._coefs = c._replace(
                alpha_dot=_coef(s.alpha_dot(self.t), self.x), sigma_dot=_coef(s.sigma_dot(self.t), self.x)
            )
        return c

    @property
    def _mu(self):
        return 0.0 if self.mu is None else self.mu

    def _pair(self) -> tuple[Tensor, Tensor]:
        if self._x0_eps is None:
            c = self._coefs_with_dots() if self.kind == "velocity" else self.coefs
            self._x0_eps = to_x0_eps(self.kind, self.output, self.x, c, self._mu)
        return self._x0_eps

    def _as(self, kind: str) -> Tensor:
        if kind == self.kind:
            return self.output
        x0, eps = self._pair()
        c = self._coefs_with_dots() if kind == "velocity" else self.coefs
        return from_x0_eps(kind, x0, eps, c, self._mu)

    @property
    def x0(self) -> Tensor:
        if self._x0_eps is None and self.kind == "x0" and not isinstance(self.mu, Tensor):
            return self.output  # no conversion pass when the network already predicts it
        return self._pair()[0]

    @property
    def eps(self) -> Tensor:
        if self._x0_eps is None and self.kind == "eps":
            return self.output
        return self._pair()[1]

    @property
    def score(self) -> Tensor:
        return self._as("score")

    @property
    def v(self) -> Tensor:
        """The v-prediction target alpha eps - sigma (x0 - mu) (Salimans & Ho 2022; diffusers'
        ``prediction_type="v_prediction"``). Not a velocity: for the drift of the probability-flow ODE
        see :attr:`velocity`."""
        return self._as("v")

    @property
    def velocity(self) -> Tensor:
        """The probability-flow ODE drift dx/dt at (x, t): alpha' (x0 - mu) + sigma' eps (the
        flow-matching velocity on rectified flow). Not the v-prediction target (:attr:`v`)."""
        return self._as("velocity")

    @property
    def pair_x(self) -> Tensor:
        """The state the solvers that step with the pair (``Solver.steps_with_pair``) step from: for a
        pair given by :meth:`from_pair` with ``renoise=True`` (CFG++) the state it composes,
        alpha x0 + (1 - alpha) mu + sigma eps, so that CFG++'s (guided x0, unconditional eps) pair
        gives its renoised step; otherwise ``x`` itself (the same tensor)."""
        if not self._renoise:
            return self.x
        x0, eps = self._pair()
        return compose(x0, eps, self.coefs.alpha, self.coefs.sigma, self._mu)

    def eps_prediction(self) -> Prediction:
        """For a pair given by :meth:`from_pair` with ``renoise=True`` (CFG++), the consistent
        prediction its eps alone makes at x (x0 = (x - (1 - alpha) mu - sigma eps) / alpha): CFG++'s
        unconditional prediction, which multistep solvers keep as their history. Otherwise, and where
        alpha = 0 (x then holds nothing of x0), this prediction itself."""
        if not self._renoise or bool((self.coefs.alpha <= 0).any()):
            return self
        return Prediction(self.x, self.t, self._pair()[1], "eps", self.schedule, self.mu)

    def state_at(self, alpha, sigma, eps: Tensor | None = None) -> Tensor:
        """alpha x0 + (1 - alpha) mu + sigma eps, with this prediction's x0 (and eps unless given)."""
        return compose(self.x0, self.eps if eps is None else eps, alpha, sigma, self._mu)

    def __repr__(self) -> str:
        t = self.t.tolist() if self.t.ndim == 0 else f"[{self.t.shape[0]} times]"
        return f"Prediction(kind={self.kind!r}, t={t}, shape={tuple(self.x.shape)})"


class DiffusionModel:
    """Wraps any callable ``net(x, t_net, **cond)`` predicting one of eps / x0 / v / score / velocity.

    Parameters
    ----------
    net:
        the network; called as ``net(x, t_net, **cond)`` (with ``mu=mu`` added for mean-reverting
        models when a condition is given). Its output has the shape of x.
    schedule:
        the forward process the network was trained on (:mod:`diffsolve.schedules`).
    prediction:
        what the network outputs: ``"eps" | "x0" | "v" | "score" | "velocity"``.
    time_input:
        maps continuous t to what the network was trained on: ``"t"``, ``"1000t"``, ``"timestep"``
        (the schedule's own, e.g. diffusers' discrete timestep for :class:`VPDiscrete`, sigma for
        rectified flow), ``"sigma"``, ``"c_noise"`` (EDM's log(sigma/alpha)/4), ``"log_snr"``, or a
        callable ``t -> t_net``. Default: ``"timestep"``.
    dtype, device:
        the network's precision and device, when ``net`` is not a ``torch.nn.Module`` (for a module
        they are read from its parameters); None: unknown (e.g. an analytic model). A run's dtype
        and device must be the network's (:func:`diffsolve.sample` refuses others; :meth:`to`
        converts the model); without ``dtype=`` / ``device=`` a run samples in them.
    requires:
        the inputs every network call needs: ``"mu"`` (the condition of a mean-reverting model) and
        keys of ``cond`` (e.g. ``"class_labels"``). :func:`diffsolve.sample` and
        :func:`diffsolve.invert` refuse a run without them before the first call.

    Calling the model returns a :class:`Prediction`. ``t`` is a scalar or a per-sample ``[B]`` tensor.
    """

    def __init__(
        self,
        net: Callable[..., Tensor],
        schedule: Schedule,
        prediction: str = "eps",
        time_input: str | Callable[[Tensor], Tensor] | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        requires: Sequence[str] = (),
    ):
        if not callable(net):
            raise TypeError(f"net must be callable, got {type(net).__name__}")
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a diffsolve Schedule, got {type(schedule).__name__}")
        self.net = net
        self.schedule = schedule
        self.prediction = check_prediction(prediction)
        time_input = "timestep" if time_input is None else time_input
        if not callable(time_input) and time_input not in TIME_INPUTS:
            raise ValueError(f"time_input {time_input!r} is unknown; allowed: {', '.join(TIME_INPUTS)} or a callable")
        self.time_input = time_input
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
        self._dtype = dtype
        self._device = None if device is None else torch.device(device)
        if isinstance(requires, str) or not all(isinstance(k, str) for k in requires):
            raise TypeError(
                f"requires must be a sequence of input names (e.g. ('mu',) or ('class_labels',)), got {requires!r}"
            )
        self.requires = tuple(requires)
        self.nfe = 0  # network calls over this object's lifetime (a run's own count lives in its NFECounter)

    def _parameter(self) -> Tensor | None:
        """The network's first floating-point parameter (None when it is not a module or has none)."""
        if not isinstance(self.net, torch.nn.Module):
            return None
        return next((p for p in self.net.parameters() if p.is_floating_point()), None)

    @property
    def dtype(self) -> torch.dtype | None:
        """The network's dtype: as declared, else its parameters' (a module), else None (unknown)."""
        if getattr(self, "_dtype", None) is not None:
            return self._dtype
        p = self._parameter()
        return None if p is None else p.dtype

    @property
    def device(self) -> torch.device | None:
        """The network's device: as declared, else its parameters' (a module), else None (unknown)."""
        if getattr(self, "_device", None) is not None:
            return self._device
        p = self._parameter()
        return None if p is None else p.device

    def to(self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> DiffusionModel:
        """Move the network to ``device`` and cast it to ``dtype`` (a name such as ``"float64"`` or a
        torch dtype), in place, and return this model, as :meth:`torch.nn.Module.to` does. A network
        that is a ``torch.nn.Module`` is converted (its parameters and buffers); a plain callable of
        unknown dtype / device (an analytic oracle, which computes in its input's) takes them as
        declared; a plain callable declared in another dtype or device cannot be converted (TypeError).
        Runs then sample in the new dtype and on the new device by default."""
        dtype = as_dtype(dtype)
        device = None if device is None else torch.device(device)
        module = isinstance(self.net, torch.nn.Module)
        if isinstance(self.net, torch.nn.Module):
            self.net.to(device=device, dtype=dtype)
        else:

            def refuse(name: str, new: object, old: object) -> TypeError:
                return TypeError(
                    f"{name}: the network ({self._net_name()}) is a plain callable declared with "
                    f"{name} {old}; DiffusionModel.to cannot convert it to {new}: convert it "
                    "yourself and wrap it again, or make it a torch.nn.Module"
                )

            if dtype is not None and self._dtype is not None and dtype != self._dtype:
                raise refuse("dtype", dtype, self._dtype)
            if device is not None and self._device is not None and not same_device(device, self._device):
                raise refuse("device", device, self._device)
        # a declaration follows the conversion (a module's own dtype / device are read from it)
        if dtype is not None and (self._dtype is not None or not module):
            self._dtype = dtype
        if device is not None and (self._device is not None or not module):
            self._device = device
        return self

    def check_solver(self, solver: Any) -> None:
        """Raise if this model cannot be sampled with ``solver`` (a Solver): :func:`diffsolve.sample`
        and :func:`diffsolve.invert` ask before the run. A plain model takes any solver; guidance
        wrappers may refuse some (CFG++ needs a solver that steps with the (x0, eps) pair)."""

    def for_solver(self, solver: Any) -> DiffusionModel:
        """The model to run ``solver`` (a Solver) with: this one, asked before :meth:`check_solver`
        by :func:`diffsolve.sample` and :func:`diffsolve.invert`. A solver got by a CFG++ name
        (``solver.cfg_pp``: ``euler-cfg-pp``, ComfyUI's ``euler_cfg_pp``) needs classifier-free
        guidance: :class:`~diffsolve.guidance.ClassifierFreeGuidance` answers with its
        :class:`~diffsolve.guidance.CFGPlusPlus` twin; any other model refuses it here."""
        if getattr(solver, "cfg_pp", False):
            raise ValueError(
                f"solver {solver.name!r} is a CFG++ sampler: give a classifier-free guided model, "
                "ds.guidance.CFGPlusPlus(model, lam, uncond=...) (or ClassifierFreeGuidance(model, lam, "
                f"uncond=...), which it then runs as CFGPlusPlus), or use {solver.name[: -len('-cfg-pp')]!r}"
            )
        return self

    def check_inputs(self, mu: Tensor | None = None, cond: Any = None, uncond: Any = None) -> None:
        """Refuse a run that lacks an input the network needs (:attr:`requires`), with a ValueError
        naming the argument: ``mu``, or a key missing from ``cond`` (or from ``uncond``, when given)."""
        if "mu" in self.requires and mu is None:
            raise ValueError(
                f"mu: the network ({self._net_name()}) needs mu=, the condition of its "
                "mean-reverting schedule (e.g. the degraded image, batch first)"
            )
        self.check_cond(cond, "cond")
        if uncond is not None:
            self.check_cond(uncond, "uncond")

    def check_cond(self, inputs: Any, name: str = "cond") -> None:
        """Refuse network keyword arguments ``inputs`` (named ``name`` in the message) that lack a key
        the network needs (:attr:`requires`, ``mu`` aside)."""
        missing = [k for k in self.requires if k != "mu" and k not in (inputs or {})]
        if missing:
            raise ValueError(
                f"{name}: the network ({self._net_name()}) needs {name}={{{missing[0]!r}: ...}} on "
                f"every call; missing {', '.join(map(repr, missing))}"
            )

    def _net_name(self) -> str:
        return getattr(self.net, "__name__", type(self.net).__name__)

    def net_time(self, t: Tensor) -> Tensor:
        """The network's time input for continuous times ``t``."""
        ti, s = self.time_input, self.schedule
        if callable(ti):
            return ti(t)
        if ti == "t":
            return t
        if ti == "1000t":
            return 1000.0 * t
        if ti == "timestep":
            return s.timestep(t)
        if ti == "sigma":
            return s.sigma(t)
        if ti == "log_snr":
            return s.log_snr(t)
        return -s.log_snr(t) / 4.0  # c_noise

    def __call__(
        self,
        x: Tensor,
        t,
        *,
        mu: Tensor | None = None,
        counter: NFECounter | None = None,
        index: Tensor | None = None,
        **cond: Any,
    ) -> Prediction:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim < 1:
            raise ValueError("x must have a batch dimension")
        tt = as_time(t, like=x)
        if tt.ndim == 0 and tt.device.type == "cpu" and x.device.type != "cpu" and not tt.requires_grad:
            t_batch = _device_time(self.schedule, float(tt), x.device).expand(x.shape[0])  # no copy per call
        elif tt.ndim == 0:
            t_batch = tt.expand(x.shape[0]).to(x.device)
        elif tt.ndim == 1 and tt.shape[0] == x.shape[0]:
            t_batch = tt.to(x.device)
        else:
            raise ValueError(f"t must be a scalar or a [B] tensor with B = {x.shape[0]}, got shape {tuple(tt.shape)}")
        if "uncond" in cond:
            raise TypeError(
                "uncond= is for classifier-free guidance: wrap the model in diffsolve.guidance.ClassifierFreeGuidance"
            )
        kwargs = dict(cond)
        if mu is not None:
            kwargs["mu"] = mu
        out = self.net(x, self.net_time(t_batch), **kwargs)
        if not isinstance(out, Tensor):  # e.g. diffusers' UNet2DOutput
            out = getattr(out, "sample", out[0] if isinstance(out, (tuple, list)) else out)
        if out.shape != x.shape:
            raise ValueError(f"the network returned shape {tuple(out.shape)} for an input of shape {tuple(x.shape)}")
        self.nfe += 1
        if counter is not None:
            counter.add(index)
        return Prediction(x, tt, out, self.prediction, self.schedule, mu)

    def compile(self, **options: Any) -> DiffusionModel:
        """A copy of this model whose network is ``torch.compile(net, **options)`` (same schedule and
        parameterisation; the first call compiles). Options go to :func:`torch.compile`, e.g.
        ``mode="reduce-overhead"`` (CUDA graphs of the network) or ``backend="eager"``."""
        import copy

        twin = copy.copy(self)
        twin.net = torch.compile(self.net, **options)
        twin.nfe = 0
        return twin

    def __repr__(self) -> str:
        return f"DiffusionModel({self._net_name()}, {self.schedule!r}, prediction={self.prediction!r})"
