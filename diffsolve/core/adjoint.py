"""Exact gradients through a reversible sampler in constant memory (the reversible adjoint).

``ds.sample(model, solver, ..., grad=True)`` with a reversible solver (one with an exact inverse step,
:class:`~diffsolve.core.protocol.ExactInverse`: :mod:`diffsolve.solvers.reversible`) runs the
steps without storing the trajectory. The backward pass walks them in reverse: it rebuilds state S_k
from S_{k+1} with the solver's exact inverse step (``unstep``), re-runs that one step with a graph and
back-propagates the cotangent of S_{k+1} through it, to S_k, the conditioning, mu and the network's
parameters (Kidger et al. 2021's reversible adjoint, generalised to any scheme with an exact inverse
step). The gradient equals autograd through the unrolled sampler up to round-off; memory holds one
step's graph whatever the number of steps. Cost: a backward step is an inverse step plus a forward
step with its VJP (for rev-heun, 1 + 1 model calls, as torchsde's ``AdjointReversibleHeun``).

Only the steps run inside the custom autograd function; the start (e.g. the DDIM step that gives a
two-level scheme its second state) and the final conversion are ordinary differentiable code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..models.model import DiffusionModel, check_finite
from .protocol import ExactInverse, drive

Tensor = torch.Tensor


def require_reversible(slv) -> None:
    """Raise a clear error unless ``slv`` has exact inverse steps (what the adjoint needs)."""
    if not isinstance(slv, ExactInverse):
        from .registry import list_solvers

        reversible = ", ".join(i.name for i in list_solvers("reversible"))
        raise ValueError(
            f"grad=True needs a reversible solver ({reversible}), got {slv.name!r}; "
            "for other solvers call sample() under autograd, which stores every step"
        )


def reversible_sample(
    model: DiffusionModel,
    slv: ExactInverse,
    x: Tensor,
    grid: Tensor,
    *,
    mu: Tensor | None = None,
    cond: Mapping[str, Any] | None = None,
    aux: Tensor | None = None,
    counter=None,
    params: Sequence[Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Sample with ``slv`` from ``x`` (at grid[0]) so that the result back-propagates in constant memory.

    Gradients reach ``x`` (and ``aux``), ``mu``, the tensors in ``cond`` and ``params`` (default: the
    parameters of ``model.net`` that require grad, when it is a ``torch.nn.Module``). The model is
    queried in ``dtype`` (default: x's); the states keep x's precision.
    """
    require_reversible(slv)
    cond = dict(cond or {})
    if params is None:
        params = (
            [p for p in model.net.parameters() if p.requires_grad] if isinstance(model.net, torch.nn.Module) else []
        )
    keys = [k for k in sorted(cond) if isinstance(cond[k], Tensor)]
    fixed = {k: v for k, v in cond.items() if k not in keys}

    def caller(mu_, cond_, counter_=None):
        def call(q):
            pred = model(q.x, q.t, mu=mu_, counter=counter_, **cond_, **fixed)
            check_finite(pred.output, f"solver {slv.name!r}, step {q.step} (t={float(q.t):.6g})")
            return pred

        return call

    call = caller(mu, {k: cond[k] for k in keys}, counter)
    fr = slv.frame(grid, model.schedule, mu)
    fr.dtype = dtype
    st = drive(slv.start(fr, x, aux), call)  # differentiable, outside the reversible part
    m = len(st)
    ctx_args = (slv, fr, grid, model.schedule, caller, keys, m, counter)
    out = _Steps.apply(ctx_args, *st, mu, *[cond[k] for k in keys], *params)
    y = slv.sample_of(fr, out[:m])
    return y if dtype is None else y.to(dtype)


class _Steps(torch.autograd.Function):
    """S_0 -> S_m through the solver's steps; backward rebuilds each S_k with ``unstep``."""

    @staticmethod
    def forward(ctx, args, *inputs):
        slv, fr, _grid, _schedule, caller, keys, m, counter = args
        st, mu, cond_in = inputs[:m], inputs[m], inputs[m + 1 : m + 1 + len(keys)]
        call = caller(mu, dict(zip(keys, cond_in)), counter)
        for k in range(slv.n_steps(fr)):
            st = drive(slv.step(fr, st, k), call)
        st = tuple(s.clone() if any(s is i for i in inputs[:m]) else s for s in st)
        ctx.args = args
        ctx.save_for_backward(*st, *inputs[m:])
        return st

    @staticmethod
    def backward(ctx, *grad_st):
        slv, fr, grid, schedule, caller, keys, m, _ = ctx.args
        saved = ctx.saved_tensors
        st, mu = saved[:m], saved[m]
        cond_in, params = saved[m + 1 : m + 1 + len(keys)], saved[m + 1 + len(keys) :]
        # differentiable copies of mu and the condition, and the leaves the VJPs reach
        mu_g = mu.detach().requires_grad_(mu.requires_grad) if mu is not None else None
        cond_g = [c.detach().requires_grad_(c.requires_grad) for c in cond_in]
        extra = [mu_g, *cond_g, *params]
        wrt = [t for t in extra if t is not None and t.requires_grad]
        acc = [torch.zeros_like(t) for t in wrt]
        call_ng = caller(mu, dict(zip(keys, cond_in)))
        call_g = caller(mu_g, dict(zip(keys, cond_g)))
        fr_g = slv.frame(grid, schedule, mu_g)
        fr_g.dtype = fr.dtype
        cot = [torch.zeros_like(s) if g is None else g for g, s in zip(grad_st, st)]
        for k in reversed(range(slv.n_steps(fr))):
            with torch.no_grad():
                prev = drive(slv.unstep(fr, st, k), call_ng)
            with torch.enable_grad():
                inp = [p.detach().requires_grad_(True) for p in prev]
                out = drive(slv.step(fr_g, tuple(inp), k), call_g)
                pairs = [(o, c) for o, c in zip(out, cot) if o.requires_grad]
                grads = torch.autograd.grad(
                    [o for o, _ in pairs], [*inp, *wrt], [c for _, c in pairs], allow_unused=True
                )
            cot = [torch.zeros_like(p) if g is None else g for g, p in zip(grads[:m], prev)]
            for a, g in zip(acc, grads[m:]):
                if g is not None:
                    a += g
            st = prev
        it = iter(acc)
        rest = [next(it) if t is not None and t.requires_grad else None for t in extra]
        return (None, *cot, *rest)
