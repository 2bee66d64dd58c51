"""A virtual Brownian tree per sample, vectorised over the batch and over per-sample query times.

W_i(s) for sample i is a fixed function of s and of the sample's seed (Li et al. 2020, "Scalable
gradients for SDEs", section 4; Gaines & Lyons 1997): W(t0) = 0, W(t1) = sqrt(t1 - t0) n_0, and the
value at the midpoint m of a dyadic interval [a, b] is the Brownian bridge draw

    W(m) = (W(a) + W(b)) / 2 + sqrt((b - a) / 4) n_node,

summed in closed form as its Schauder series (one tent per level, no recursion),
where every n is a standard normal vector fixed by (seed, node): a counter-based hash (splitmix64 of
seed, node and element index, then Box-Muller), so no state is kept and any time can be queried in
any order. The series stops after ``depth`` levels, i.e. the path is interpolated linearly inside
intervals of width (t1 - t0) 2^-depth.

With a time change v (increasing; ``variance=``) the tree gives B(v(s) - v(t0)) for a standard
Brownian motion B: the same dyadic nodes in s, with the bridge of [a, b] at m drawn as

    W(m) = W(a) + (v(m) - v(a)) / (v(b) - v(a)) (W(b) - W(a)) + sqrt((v(m)-v(a)) (v(b)-v(m)) / (v(b)-v(a))) n_node,

so Var(W(s) - W(r)) = v(s) - v(r) exactly, at any resolution (the tents become linear in v). So the path is the same at 20 steps and at 40, a rejected step
and its retry see one path, a reverse pass sees the forward pass's increments, and sample i's path
does not depend on the batch it sits in. Cost: ``depth`` + 1 hashes of the event per query, no Python
loop over rows or levels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

Tensor = torch.Tensor

_MASK = [(1 << (64 - k)) - 1 for k in range(65)]


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


_GOLDEN, _M1, _M2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shr(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & _MASK[k]


def _mix(x: Tensor) -> Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping arithmetic)."""
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def hashed_normal(seed: Tensor, node: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    """Standard normals of shape [len(seed), n], a pure function of (seed[r], node[r], element)."""
    key = _mix(_mix(seed * 0x2545F491 + 0x632BE59B) + node)  # [R]
    elem = torch.arange(n, device=seed.device, dtype=torch.int64)
    h = _mix(key[:, None] + 2 * elem[None, :])
    h2 = _mix(key[:, None] + 2 * elem[None, :] + 1)
    u1 = (_shr(h, 11).to(torch.float64) + 0.5) * 2.0**-53  # (0, 1)
    u2 = _shr(h2, 11).to(torch.float64) * 2.0**-53
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)).to(dtype)


class BrownianTree:
    """Brownian paths W_i on [t0, t1], one per seed (see the module docstring). ``variance``: an
    increasing function v on float64 tensors for the time-changed path B(v(s) - v(t0)) (default the
    identity, a plain Brownian motion)."""

    def __init__(
        self,
        seeds: Sequence[int],
        event_shape: Sequence[int],
        t0: float,
        t1: float,
        *,
        depth: int = 30,
        device=None,
        dtype: torch.dtype = torch.float32,
        variance: Callable[[Tensor], Tensor] | None = None,
    ):
        if not t1 > t0:
            raise ValueError(f"BrownianTree needs t0 < t1, got [{t0}, {t1}]")
        self.variance = variance
        self.seeds = torch.tensor([int(s) for s in seeds], dtype=torch.int64, device=device)
        self.event_shape = tuple(event_shape)
        self.numel = math.prod(self.event_shape)
        self.t0, self.t1, self.depth = float(t0), float(t1), int(depth)
        self.device, self.dtype = self.seeds.device, dtype

    def __call__(self, s, rows: Tensor | None = None) -> Tensor:
        """W(s) for the samples ``rows`` (all by default); s is a scalar or one time per row."""
        seed = self.seeds if rows is None else self.seeds[rows.to(self.seeds.device)]
        r = seed.shape[0]
        s = torch.as_tensor(s, dtype=torch.float64, device=self.device).expand(r)
        if bool(((s < self.t0 - 1e-12) | (s > self.t1 + 1e-12)).any()):
            raise ValueError(f"Brownian path queried at t outside its range [{self.t0}, {self.t1}]")
        span, depth, f64 = self.t1 - self.t0, self.depth, torch.float64
        v = (lambda z: z) if self.variance is None else self.variance
        # Midpoint displacement written as its Schauder (Levy-Ciesielski) sum: at level j only the
        # interval [a, b] holding s contributes, a tent (linear in v, 1 at the midpoint m) times the
        # bridge std at m times that midpoint's normal.
        u = ((s - self.t0) / span).clamp(0.0, 1.0)
        k = (u * 2.0**depth).floor().long().clamp(max=2**depth - 1)  # s lies in leaf k
        j = torch.arange(depth, device=self.device)
        prefix = k[:, None] >> (depth - j)[None, :]  # [R, L]: index of the level-j interval holding s
        node = (1 << j)[None, :] + prefix  # heap index of that interval's midpoint
        width = span * 2.0 ** -j.double()
        a = self.t0 + prefix.double() * width
        va, vm, vb = v(a), v(a + 0.5 * width), v(a + width)
        vs = v(self.t0 + u * span)[:, None]
        rise, fall = (vs - va) / (vm - va), (vb - vs) / (vb - vm)
        tent = torch.where(vs <= vm, rise, fall).clamp(0.0, 1.0)
        weight = tent * ((vm - va) * (vb - vm) / (vb - va)).sqrt()
        node = torch.cat([torch.zeros_like(k)[:, None], node], dim=1)  # node 0: W(t1) = sqrt(V) n_0
        v0, v1 = v(torch.tensor(self.t0, dtype=f64)), v(torch.tensor(self.t1, dtype=f64))
        weight = torch.cat([((vs[:, 0] - v0) / (v1 - v0).sqrt())[:, None], weight], dim=1)
        n_lv = depth + 1
        w = torch.zeros(r, self.numel, dtype=f64, device=self.device)
        chunk = max(1, 2**18 // max(1, r * self.numel))  # levels hashed together (bounded memory)
        for lo in range(0, n_lv, chunk):
            hi = min(n_lv, lo + chunk)
            normals = hashed_normal(seed.repeat_interleave(hi - lo), node[:, lo:hi].reshape(-1), self.numel, f64)
            w = w + torch.einsum("rl,rld->rd", weight[:, lo:hi], normals.reshape(r, hi - lo, self.numel))
        return w.to(self.dtype).reshape(r, *self.event_shape)

    def normal(self, t, t_next, rows: Tensor | None = None) -> Tensor:
        """(W(t) - W(t_next)) / sqrt(|t - t_next|): the standard normal of the step t -> t_next."""
        r = len(self.seeds) if rows is None else len(rows)
        t = torch.as_tensor(t, dtype=torch.float64, device=self.device).expand(r)
        t_next = torch.as_tensor(t_next, dtype=torch.float64, device=self.device).expand(r)
        dw = self(torch.maximum(t, t_next), rows) - self(torch.minimum(t, t_next), rows)
        h = (t - t_next).abs().clamp_min(1e-300).to(self.dtype)
        return dw / h.sqrt().reshape(r, *([1] * len(self.event_shape)))
