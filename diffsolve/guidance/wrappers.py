"""Guidance as model wrappers: each takes a DiffusionModel and returns one, so every solver can use it.

``GuidedModel`` is the base: it shares the wrapped model's schedule, network and parameterisation and
overrides the call. The driver passes ``cond`` (and ``uncond``, for classifier-free guidance) to the
call; per-sample solvers may call with a subset of rows (``index``), and wrappers keep that contract.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..core.protocol import take_rows
from ..core.registry import pair_solvers
from ..models.model import DiffusionModel, Prediction
from ..models.wrapped import GuidedModel

Tensor = torch.Tensor
#: an operator A of an inverse problem: ``A(x0) -> y``, or ``A(x0, rows=index) -> y`` when its
#: signature has a ``rows`` parameter (:func:`takes_rows`)
Operator = Callable[..., Tensor]


def _finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def noise_level(schedule, t, like: Tensor) -> Tensor:
    """EDM's noise level sigma / alpha at t, per row of ``like`` ([B], float64)."""
    tt = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(like.shape[0])
    return schedule.sigma(tt) / schedule.alpha(tt)


class ClassifierFreeGuidance(GuidedModel):
    """Classifier-free guidance (Ho & Salimans 2022) in diffusers' form, on the model's own output
    (eps, x0, v, ... whichever the network predicts; the forms agree for affine parameterisations):

        out = out_uncond + s (out_cond - out_uncond)            s = ``guidance_scale``

    s = 1 is the conditional model (the unconditional call is skipped); s = 1 + w is the paper's w.

    ``guidance_rescale`` phi (Lin et al. 2024, default 0): out <- phi out std(out_cond) / std(out) +
    (1 - phi) out, with per-sample standard deviations over all non-batch dimensions.

    ``interval`` (sigma_lo, sigma_hi) (Kynkaenniemi et al. 2024): guide only where the noise level
    sigma / alpha (EDM's sigma) is in (sigma_lo, sigma_hi]; elsewhere the conditional prediction is
    returned and the unconditional network is not called (per sample, for per-sample times).

    The conditional call gets ``cond`` (e.g. ``class_labels``), the unconditional one ``uncond``: given
    here, or per run as ``ds.sample(..., uncond=...)`` (which wins). Two network calls per guided step
    (each counted in the NFE).
    """

    def __init__(
        self,
        model: DiffusionModel,
        guidance_scale: float = 3.0,
        *,
        uncond: Mapping[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        interval: tuple[float, float] | None = None,
    ):
        super().__init__(model)
        self.guidance_scale = _finite("guidance_scale", guidance_scale)
        self.guidance_rescale = _finite("guidance_rescale", guidance_rescale)
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale!r}")
        if interval is not None:
            try:
                lo, hi = (float(v) for v in interval)
            except (TypeError, ValueError):
                raise ValueError(f"interval must be (sigma_lo, sigma_hi), got {interval!r}") from None
            if not 0.0 <= lo < hi:
                raise ValueError(f"interval must satisfy 0 <= sigma_lo < sigma_hi, got {interval!r}")
            interval = (lo, hi)
        self.interval = interval
        if uncond is not None and not isinstance(uncond, Mapping):
            raise TypeError(f"uncond must be a dict of network keyword arguments, got {type(uncond).__name__}")
        self.uncond = None if uncond is None else dict(uncond)
        if self.uncond is not None:
            model.check_cond(self.uncond, "uncond")  # the unconditional call needs them too

    def for_solver(self, solver) -> DiffusionModel:
        """A solver got by a CFG++ name (``solver.cfg_pp``: ``euler-cfg-pp``, ComfyUI's
        ``euler_cfg_pp``) runs under :class:`CFGPlusPlus` with this guidance scale as its lambda, the
        same uncond inputs and interval: ComfyUI's cfg_pp samplers read the cfg value so, guiding the
        denoised prediction U + cfg (C - U) that renoises with the unconditional one; lambda must be
        in [0, 1]. Other solvers run with this model."""
        if not getattr(solver, "cfg_pp", False) or isinstance(self, CFGPlusPlus):
            return self
        if self.guidance_rescale != 0:
            raise ValueError(f"solver {solver.name!r} is a CFG++ sampler: CFG++ has no guidance_rescale")
        try:
            return CFGPlusPlus(self.inner, self.guidance_scale, uncond=self.uncond, interval=self.interval)
        except ValueError as e:
            raise ValueError(
                f"solver {solver.name!r} runs this ClassifierFreeGuidance as CFGPlusPlus, with its "
                f"guidance_scale as lambda: {e}"
            ) from None

    def skips_uncond(self) -> bool:
        """Whether the guided prediction is the conditional one everywhere."""
        return self.guidance_scale == 1.0 and self.guidance_rescale == 0.0

    def _rows(self, x: Tensor, t) -> Tensor | None:
        """Rows to guide: None for all, else their indices (maybe empty)."""
        if self.interval is None:
            return None
        s = noise_level(self.schedule, t, x)
        inside = (s > self.interval[0]) & (s <= self.interval[1])
        return None if bool(inside.all()) else inside.nonzero().reshape(-1).to(x.device)

    def __call__(self, x, t, *, mu=None, counter=None, index=None, uncond=None, **cond):
        c = self.inner(x, t, mu=mu, counter=counter, index=index, **cond)
        if self.skips_uncond():
            return c
        rows = self._rows(x, t)
        if rows is not None and rows.numel() == 0:
            return c
        if uncond is None:
            uncond = self.uncond
            if uncond is None:
                raise ValueError(
                    "classifier-free guidance needs the unconditional inputs: give "
                    "ClassifierFreeGuidance(..., uncond={...}) or ds.sample(..., uncond={...})"
                )
            uncond = {k: take_rows(v, index) for k, v in uncond.items()}
        if rows is None:
            u = self.inner(x, t, mu=mu, counter=counter, index=index, **uncond)
        else:
            tt = t[rows] if isinstance(t, Tensor) and t.ndim > 0 else t
            u = self.inner(
                x[rows],
                tt,
                mu=take_rows(mu, rows),
                counter=counter,
                index=rows if index is None else index[rows],
                **{k: take_rows(v, rows) for k, v in uncond.items()},
            )
        return self.combine(c, u, rows)

    def _guided(self, cond_out: Tensor, uncond_out: Tensor) -> Tensor:
        out = uncond_out + self.guidance_scale * (cond_out - uncond_out)
        if self.guidance_rescale > 0:
            dims = tuple(range(1, out.ndim))
            ratio = cond_out.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True)
            out = self.guidance_rescale * (out * ratio) + (1 - self.guidance_rescale) * out
        return out

    def combine(self, c: Prediction, u: Prediction, rows: Tensor | None) -> Prediction:
        """The guided prediction from the conditional one and the unconditional one on ``rows``."""
        if rows is None:
            out = self._guided(c.output, u.output)
        else:
            out = c.output.clone()
            out[rows] = self._guided(c.output[rows], u.output)
        return Prediction(c.x, c.t, out, c.kind, self.schedule, c.mu)


class CFGPlusPlus(ClassifierFreeGuidance):
    """CFG++ (Chung et al. 2025): guide the data prediction, renoise with the unconditional noise.
    With eps_lambda = eps_uncond + lambda (eps_cond - eps_uncond), lambda = ``guidance_scale`` in [0, 1]:

        x0 = (x - sigma eps_lambda) / alpha   (the guided x0),    eps = eps_uncond

    so a DDIM step alpha' x0 + sigma' eps is the paper's CFG++ DDIM step (with eta > 0, or ``ddpm``,
    its ancestral form). The pair is deliberately inconsistent (x != alpha x0 + sigma eps), so only
    solvers that step with x0 and eps as separate terms (``steps_with_pair``: ``ddim``, ``ddpm``,
    ``euler``, ``euler-ancestral``, ``dpmpp-2m``, ``res-multistep``, ``res-multistep-ancestral``,
    ``gradient-estimation``, ...; :func:`diffsolve.core.registry.pair_solvers`) take it as meant;
    the others are refused before the run (a solver stepping from x and x0, such as ``heun``'s
    second stage, would see CFG at scale lambda <= 1; one stepping from x and eps the unconditional
    model). lambda = 0 is the unconditional model.

    ComfyUI's cfg_pp samplers (``euler_cfg_pp``, ``euler_ancestral_cfg_pp``, ``dpmpp_2m_cfg_pp``,
    ``res_multistep_cfg_pp``, ``res_multistep_ancestral_cfg_pp``, ``gradient_estimation_cfg_pp``)
    are these solvers under this wrapper, also by those names (``ds.sample(cfg, "euler_cfg_pp")``
    with a :class:`ClassifierFreeGuidance` ``cfg`` runs it as CFGPlusPlus). ComfyUI's cfg value is
    lambda itself: it guides the denoised prediction, U + cfg (C - U), which for an affine
    parameterisation is the x0 of eps_lambda above, and renoises with the unconditional one.
    """

    def __init__(
        self,
        model: DiffusionModel,
        guidance_scale: float = 0.6,
        *,
        uncond: Mapping[str, Any] | None = None,
        interval: tuple[float, float] | None = None,
    ):
        super().__init__(model, guidance_scale, uncond=uncond, interval=interval)
        if not 0.0 <= self.guidance_scale <= 1.0:
            raise ValueError(f"guidance_scale (lambda) of CFG++ must be in [0, 1], got {guidance_scale!r}")

    def skips_uncond(self) -> bool:
        return False

    def check_solver(self, solver) -> None:
        if not getattr(solver, "steps_with_pair", False):
            ok = ", ".join(pair_solvers())
            raise ValueError(
                f"CFGPlusPlus does not work with solver {solver.name!r}: it does not step with x0 and "
                f"eps as separate terms, so CFG++'s (guided x0, unconditional eps) pair would not "
                f"be stepped as meant; use one of: {ok}"
            )
        super().check_solver(solver)

    def combine(self, c, u, rows):
        g = super().combine(c, u, rows)
        eps = u.eps if rows is None else c.eps.index_copy(0, rows, u.eps)
        return Prediction.from_pair(c.x, c.t, g.x0, eps, self.schedule, c.mu, renoise=True)


class ClassifierGuidance(GuidedModel):
    """Classifier guidance (Dhariwal & Nichol 2021) with a classifier on noisy inputs:

        eps <- eps - s sigma grad_x log p(y | x_t)      (score <- score + s grad_x log p(y | x_t))
        x0  <- x0 + s (sigma^2 / alpha) grad_x log p(y | x_t)      (x0 unchanged where alpha = 0)

    ``classifier(x, t)`` returns logits [B, C] at the continuous time t ([B]); the labels y are
    ``cond[label_key]`` (taken out of the wrapped model's inputs). One classifier gradient per call.
    """

    def __init__(
        self,
        model: DiffusionModel,
        classifier: Callable[[Tensor, Tensor], Tensor],
        scale: float = 1.0,
        *,
        label_key: str = "class_labels",
    ):
        super().__init__(model)
        if not callable(classifier):
            raise TypeError(
                f"classifier must be callable as classifier(x, t) -> logits, got {type(classifier).__name__}"
            )
        self.classifier, self.scale, self.label_key = classifier, _finite("scale", scale), label_key

    def __call__(self, x, t, *, mu=None, counter=None, index=None, **cond):
        if self.label_key not in cond:
            raise ValueError(f"classifier guidance needs the labels: pass cond={{{self.label_key!r}: ...}}")
        labels = cond.pop(self.label_key)
        pred = self.inner(x, t, mu=mu, counter=counter, index=index, **cond)
        tt = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(x.shape[0]).to(x.device)
        y = torch.as_tensor(labels, device=x.device).reshape(-1).expand(x.shape[0])
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logp = torch.log_softmax(self.classifier(xg, tt), dim=1).gather(1, y[:, None].long()).sum()
            grad = torch.autograd.grad(logp, xg)[0]
        # score + s grad: eps moves by -s sigma grad and x0 by s sigma^2 / alpha grad, a consistent pair;
        # where alpha = 0 (a flow's t = 1) x_t holds nothing of x0 and x0 stays (not 0 / 0)
        alpha, sigma = pred.coefs.alpha, pred.coefs.sigma
        shift = torch.where(alpha > 0, sigma * sigma / torch.where(alpha > 0, alpha, 1.0), 0.0)
        return Prediction.from_pair(
            x, t, pred.x0 + self.scale * shift * grad, pred.eps - self.scale * sigma * grad, self.schedule, mu
        )


class DPS(GuidedModel):
    """Diffusion posterior sampling (Chung et al. 2023) as a guided denoiser, usable by any solver:

        x0_hat <- x0_hat(x_t) - zeta grad_{x_t} ||y - A(x0_hat(x_t))||

    (the gradient goes through the denoiser; in score terms the likelihood score is
    -(zeta alpha_t / sigma_t^2) grad ||.||). ``norm="sample"`` (default) takes each sample's own residual
    norm, so samples stay independent; ``norm="batch"`` takes one norm over the whole batch, as the
    official code and azula do (samples coupled). The paper instead moves the state by -zeta grad after
    each of 1000 DDPM steps; in the denoiser form the correction scales with the step the solver takes,
    so the same ``zeta`` behaves alike across solvers and step counts (it is not the paper's zeta).
    One network call with a graph, and its VJP, per model call.

    Per-sample solvers (``adaptive-sde``, ``mrs-adaptive``, ``mrs-sde-adaptive``) query only the rows
    still running. The ``measurement`` ([B, ...] or one row for all) is subset to them here; an
    ``operator`` that holds per-sample tensors must subset them too: if its signature has a ``rows``
    parameter it is called as ``operator(x0, rows=index)`` (the query's rows in the full batch, None
    for all), e.g. :class:`Masked`. A plain ``operator(x0)`` sees x0 of the query's rows only.
    """

    NORMS = ("sample", "batch")

    def __init__(
        self, model: DiffusionModel, operator: Operator, measurement: Tensor, zeta: float = 1.0, *, norm: str = "sample"
    ):
        super().__init__(model)
        if not callable(operator):
            raise TypeError(f"operator must be callable as A(x0) -> y, got {type(operator).__name__}")
        if not isinstance(measurement, Tensor):
            raise TypeError(f"measurement must be a tensor, got {type(measurement).__name__}")
        if norm not in self.NORMS:
            raise ValueError(f"norm must be one of {', '.join(self.NORMS)}, got {norm!r}")
        self.operator, self.measurement, self.zeta, self.norm = operator, measurement, _finite("zeta", zeta), norm
        self.operator_takes_rows = takes_rows(operator)

    def apply(self, x0: Tensor, index: Tensor | None = None) -> Tensor:
        """A(x0) for x0 of the batch rows ``index`` (None: all)."""
        if self.operator_takes_rows:
            return self.operator(x0, rows=index)
        if index is None:
            return self.operator(x0)
        try:
            return self.operator(x0)
        except RuntimeError as e:
            raise RuntimeError(
                f"DPS: operator(x0) failed on a query of {x0.shape[0]} rows of the batch ({e}). Per-sample "
                "solvers query only the rows still running; an operator holding per-sample tensors must "
                "take them: give it a `rows` parameter (operator(x0, rows): rows are the query's indices "
                "in the batch, None for all) or use ds.guidance.Masked(mask)"
            ) from e

    def residual(self, x0: Tensor, index: Tensor | None = None) -> Tensor:
        """Per-sample residual norms ||y - A(x0)|| ([B]) of x0 on the batch rows ``index`` (None: all)."""
        r = take_rows(self.measurement, index) - self.apply(x0, index)
        return r.reshape(r.shape[0], -1).norm(dim=1)

    def __call__(self, x, t, *, mu=None, counter=None, index=None, **cond):
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            pred = self.inner(xg, t, mu=mu, counter=counter, index=index, **cond)
            norms = self.residual(pred.x0, index)
            loss = norms.sum() if self.norm == "sample" else torch.linalg.vector_norm(norms)  # (0 at a zero residual)
            grad = torch.autograd.grad(loss, xg)[0]
        x0 = pred.x0.detach() - self.zeta * grad
        return Prediction(x, t, x0, "x0", self.schedule, mu)


def takes_rows(fn: Callable) -> bool:
    """Whether ``fn``'s signature has a ``rows`` parameter (an operator that subsets what it holds)."""
    try:
        return "rows" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature to read (some builtins)
        return False


class Masked:
    """The masking operator A(x) = mask * x for :class:`DPS` (inpainting). ``mask`` holds one row per
    sample ([B, ...], the samples' dimensions) or broadcasts to every row (fewer dimensions, or
    batch size 1). Called with ``rows`` (as DPS does) it uses the mask of those rows, so a
    per-sample mask works with every solver, including the per-sample adaptive ones."""

    def __init__(self, mask: Tensor):
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a tensor (1 where the measurement is known), got {type(mask).__name__}")
        self.mask = mask

    def __call__(self, x: Tensor, rows: Tensor | None = None) -> Tensor:
        return x * take_rows(self.mask, rows, x.ndim).to(x)

    def __repr__(self) -> str:
        return f"Masked(mask of shape {tuple(self.mask.shape)})"
