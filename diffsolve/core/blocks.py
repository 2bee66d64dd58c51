"""Batch-invariant network evaluation: the network called on blocks of a fixed number of rows.

A trained network's output for one row changes in the last bits with the number of rows it is
called on (its kernels split the work by shape): on digits-vp row 0 of a batch of 3 and of a batch
of 8 differ by 1e-6 in float32 and 1e-15 in float64. Fixed-grid solvers carry that as round-off,
but the accept / reject decisions of per-sample adaptive solvers amplify it into different samples.
Called in blocks of exactly ``size`` rows (the last block padded by repeating its last row), every
row's output depends on that row alone, whatever the batch and whichever rows are queried:
``ds.sample(..., row_block=size)``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from ..models.model import DiffusionModel

Tensor = torch.Tensor


def _as_tensor(out) -> Tensor:
    """A network's answer as a tensor (diffusers' ``UNet2DOutput`` and tuples, as DiffusionModel reads them)."""
    if isinstance(out, Tensor):
        return out
    sample = getattr(out, "sample", None)
    if isinstance(sample, Tensor):
        return sample
    return out[0] if isinstance(out, (tuple, list)) else out


class RowBlocks(torch.nn.Module):
    """``net(x, t, **kw)`` evaluated on consecutive blocks of exactly ``size`` rows of x, the last block
    padded by repeating its last row (the padding's outputs are dropped). ``t`` and every keyword
    tensor whose first dimension is x's batch size are split with x; other arguments go to every
    block whole. A module, so a wrapped module's parameters (dtype, device, gradients) show through."""

    def __init__(self, net: Callable[..., Any], size: int):
        super().__init__()
        self.net, self.size = net, check_row_block(size)

    def forward(self, x: Tensor, t: Tensor, **kw: Any) -> Tensor:
        b, k = x.shape[0], self.size
        if b == k:
            return _as_tensor(self.net(x, t, **kw))

        def rows(v, idx):
            return v[idx] if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == b else v

        outs = []
        for start in range(0, b, k):
            idx = torch.arange(start, start + k, device=x.device).clamp_max(b - 1)
            out = self.net(rows(x, idx), rows(t, idx), **{name: rows(v, idx) for name, v in kw.items()})
            outs.append(_as_tensor(out)[: min(k, b - start)])
        return torch.cat(outs)


def check_row_block(size) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"row_block must be None or an int >= 1 (rows per network call), got {size!r}")
    return size


def _innermost(model: DiffusionModel) -> DiffusionModel:
    inner = getattr(model, "inner", None)
    return _innermost(inner) if isinstance(inner, DiffusionModel) else model


def in_row_blocks(model: DiffusionModel, size: int) -> DiffusionModel:
    """A copy of ``model`` whose network runs in :class:`RowBlocks` of ``size``; through guidance
    wrappers (``model.inner``) the wrapped model's network is the one blocked. Other networks a wrapper
    calls (e.g. ClassifierGuidance's classifier) are called as they are."""
    twin = copy.copy(model)
    inner = getattr(model, "inner", None)
    if isinstance(inner, DiffusionModel):
        blocked = in_row_blocks(inner, size)
        twin.inner = blocked  # type: ignore[attr-defined]  # a guidance wrapper (core does not import guidance)
        twin.net = blocked.net
    else:
        twin.net = RowBlocks(model.net, size)
    return twin


def count_back(model: DiffusionModel, twin: DiffusionModel) -> None:
    """Carry the model calls ``twin`` (from :func:`in_row_blocks`) made over to ``model``'s lifetime
    count (the twin's count started from it)."""
    _innermost(model).nfe = _innermost(twin).nfe
