"""L-BFGS run on each sample of a batch as its own problem, with the samples' evaluations batched.

A batch of independent problems min_z f_b(z_b) should be solved as if each were alone: the same
iterates whatever the batch size. An elementwise optimiser over the whole batch (Adam, SGD) does that
by construction; L-BFGS does not, since its inner products, curvature pairs, line search and stopping
tests would mix the samples. Here each sample runs its own L-BFGS, written as a generator that
yields the points it wants evaluated; every round, all samples' points are evaluated in one batched
call (a finished sample rides along at its final point and its result is dropped), so an evaluation
must be batch-independent (row b's value and gradient depend on row b only).

The algorithm is torch.optim.LBFGS's (Nocedal & Wright, "Numerical Optimization", 2006, Algorithm
7.4, the two-loop recursion; the strong-Wolfe line search with cubic interpolation of Algorithms
3.5 and 3.6, as in Schmidt's minFunc): with the same options, one sample alone follows torch's
iterates (tests/test_lbfgs.py), and ``steps`` here are torch's ``step(closure)`` calls, each of up to
``max_iter`` iterations and ``max_eval`` evaluations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass

import torch

Tensor = torch.Tensor
#: evaluate(x [B, ...]) -> (objective [B] to minimise, its gradient [B, ...], a value [B] to record)
Evaluate = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]
#: a sample's run: yields points [D], is sent (objective, gradient [D], record) for each
Run = Generator[Tensor, tuple[float, Tensor, Tensor], tuple[Tensor, list[Tensor]]]


@dataclass(frozen=True)
class LBFGS:
    """torch.optim.LBFGS's options and defaults, except the line search: strong Wolfe by default
    (``line_search=None``: fixed steps of ``lr``)."""

    lr: float = 1.0
    max_iter: int = 20
    max_eval: int | None = None  # max_iter * 5 // 4
    tolerance_grad: float = 1e-7
    tolerance_change: float = 1e-9
    history_size: int = 100
    line_search: str | None = "strong_wolfe"

    def __post_init__(self) -> None:
        if not (self.lr > 0 and self.max_iter >= 1 and self.history_size >= 1):
            raise ValueError(f"LBFGS needs lr > 0, max_iter >= 1 and history_size >= 1, got {self}")
        if self.line_search not in (None, "strong_wolfe"):
            raise ValueError(f"line_search must be 'strong_wolfe' or None, got {self.line_search!r}")


def minimise_per_sample(opts: LBFGS, x0: Tensor, evaluate: Evaluate, steps: int) -> tuple[Tensor, list[Tensor], int]:
    """``steps`` L-BFGS steps (``opts``) on each row of ``x0`` ([B, ...]) as its own problem, the
    rows' evaluations batched: ``evaluate(x)`` on all rows gives the per-row objective, its gradient
    and a value to record. Returns the final rows [B, ...], the record of each row's first evaluation
    in each step (``steps`` tensors of shape [B]) and the number of batched evaluations."""
    rows = [x0[b].detach().reshape(-1).clone() for b in range(x0.shape[0])]
    runs = [_run(opts, x, steps) for x in rows]
    asked: dict[int, Tensor] = {b: next(run) for b, run in enumerate(runs)} if steps else {}
    histories: list[list[Tensor]] = [[] for _ in rows]
    evaluations = 0
    while asked:
        x = torch.stack([asked.get(b, rows[b]) for b in range(len(rows))]).reshape(x0.shape)
        f, g, record = evaluate(x)
        evaluations += 1
        for b in list(asked):
            try:
                asked[b] = runs[b].send((float(f[b]), g[b].detach().reshape(-1), record[b].detach()))
            except StopIteration as done:
                rows[b], histories[b] = done.value
                del asked[b]
    history = [torch.stack([h[i] for h in histories]) for i in range(steps)]
    return torch.stack(rows).reshape(x0.shape), history, evaluations


def _run(o: LBFGS, x: Tensor, steps: int) -> Run:
    """One sample's L-BFGS: ``steps`` calls of torch's ``step``, the state carried between them."""
    max_eval = o.max_eval if o.max_eval is not None else o.max_iter * 5 // 4
    dirs: list[Tensor] = []  # y_k = g_{k+1} - g_k
    stps: list[Tensor] = []  # s_k = x_{k+1} - x_k
    rho: list[Tensor] = []  # 1 / (y_k . s_k)
    h_diag = torch.ones((), dtype=x.dtype)  # H_0 = h_diag I, y.s / y.y of the newest pair
    iterations = 0  # over all steps: the first one starts along -g
    prev_g, t = x, 0.0  # the last iteration's gradient and step, set before any later one reads them
    history: list[Tensor] = []
    for _ in range(steps):
        f, g, record = yield x
        history.append(record)
        evals = 1
        if float(g.abs().max()) <= o.tolerance_grad:
            continue
        inner = 0
        while inner < o.max_iter:
            inner += 1
            iterations += 1
            if iterations == 1:
                d = -g
            else:
                y, s = g - prev_g, d * t
                ys = y.dot(s)
                if ys > 1e-10:  # keep the pair only if the curvature condition holds
                    if len(dirs) == o.history_size:
                        del dirs[0], stps[0], rho[0]
                    dirs.append(y)
                    stps.append(s)
                    rho.append(1.0 / ys)
                    h_diag = ys / y.dot(y)
                d = _two_loop(g, dirs, stps, rho, h_diag)
            prev_g, prev_f = g.clone(), f
            t = min(1.0, 1.0 / float(g.abs().sum())) * o.lr if iterations == 1 else o.lr
            gtd = g.dot(d)
            if gtd > -o.tolerance_change:  # not a descent direction
                break
            if o.line_search is None:
                x = x.add(d, alpha=t)
                ls_evals = 0
                if inner != o.max_iter:
                    f, g, _ = yield x
                    ls_evals = 1
            else:
                f, g, t, ls_evals = yield from _strong_wolfe(x, t, d, f, g, gtd, max_ls=max_eval - evals)
                x = x.add(d, alpha=t)
            evals += ls_evals
            if inner == o.max_iter or evals >= max_eval or float(g.abs().max()) <= o.tolerance_grad:
                break
            if float((d * t).abs().max()) <= o.tolerance_change or abs(f - prev_f) < o.tolerance_change:
                break
    return x, history


def _two_loop(g: Tensor, dirs: list[Tensor], stps: list[Tensor], rho: list[Tensor], h_diag: Tensor) -> Tensor:
    """-H g for the L-BFGS inverse-Hessian H of the stored pairs (Nocedal & Wright, Algorithm 7.4),
    H_0 = h_diag I."""
    q = -g
    alpha: list[Tensor] = []  # newest pair first
    for i in reversed(range(len(dirs))):
        alpha.append(stps[i].dot(q) * rho[i])
        q = q.add(dirs[i], alpha=-float(alpha[-1]))
    alpha.reverse()
    r = q * h_diag
    for i in range(len(dirs)):
        beta = dirs[i].dot(r) * rho[i]
        r = r.add(stps[i], alpha=float(alpha[i] - beta))
    return r


def _cubic_minimum(
    a: float, fa: float, ga: float, b: float, fb: float, gb: float, bounds: tuple[float, float] | None = None
) -> float:
    """The minimiser of the cubic through (a, fa) and (b, fb) with slopes ga, gb (Nocedal & Wright,
    eq. 3.59), clamped to ``bounds`` (default: between a and b); the midpoint of the bounds where the
    cubic has no minimum."""
    lo, hi = bounds if bounds is not None else (min(a, b), max(a, b))
    d1 = ga + gb - 3 * (fa - fb) / (a - b)
    disc = d1 * d1 - ga * gb
    if disc < 0:
        return (lo + hi) / 2
    d2 = math.sqrt(disc)
    if a <= b:
        m = b - (b - a) * (gb + d2 - d1) / (gb - ga + 2 * d2)
    else:
        m = a - (a - b) * (ga + d2 - d1) / (ga - gb + 2 * d2)
    return min(max(m, lo), hi)


@dataclass
class _Point:
    """A trial step t along d: the objective there, its gradient and its slope along d."""

    t: float
    f: float
    g: Tensor
    slope: float


def _strong_wolfe(
    x: Tensor, t: float, d: Tensor, f: float, g: Tensor, gtd: Tensor, *, max_ls: int, c1=1e-4, c2=0.9, tol=1e-9
) -> Generator[Tensor, tuple[float, Tensor, Tensor], tuple[float, Tensor, float, int]]:
    """A step t along d satisfying the strong Wolfe conditions f(x + t d) <= f + c1 t g.d and
    |g(x + t d).d| <= c2 |g.d| (Nocedal & Wright, Algorithms 3.5 and 3.6): bracket by extrapolating
    with cubic interpolation, then zoom, within ``max_ls`` further evaluations (torch: the step's
    evaluations left) and until the bracket is shorter than ``tol`` along d. Returns (f, g at the
    step, t, evaluations)."""
    slope0 = float(gtd)
    d_norm = float(d.abs().max())

    def probe(step: float):
        fn, gn, _ = yield x.add(d, alpha=step)
        return _Point(step, fn, gn, float(gn.dot(d)))

    new = yield from probe(t)
    evals, prev = 1, _Point(0.0, f, g, slope0)
    bracket: list[_Point] | None = None
    done, ls_iter = False, 0
    while ls_iter < max_ls:
        if new.f > f + c1 * new.t * slope0 or (ls_iter > 1 and new.f >= prev.f):
            bracket = [prev, new]
            break
        if abs(new.slope) <= -c2 * slope0:
            bracket, done = [new], True
            break
        if new.slope >= 0:
            bracket = [prev, new]
            break
        step = _cubic_minimum(
            prev.t, prev.f, prev.slope, new.t, new.f, new.slope, (new.t + 0.01 * (new.t - prev.t), new.t * 10)
        )
        prev = new
        new = yield from probe(step)
        evals += 1
        ls_iter += 1
    if bracket is None:  # max_ls reached while extrapolating
        bracket = [_Point(0.0, f, g, slope0), new]
    low, high = (0, 1) if bracket[0].f <= bracket[-1].f else (1, 0)
    insufficient = False
    while not done and ls_iter < max_ls:
        a, b = bracket
        if abs(b.t - a.t) * d_norm < tol:
            break
        step = _cubic_minimum(a.t, a.f, a.slope, b.t, b.f, b.slope)
        lo, hi = min(a.t, b.t), max(a.t, b.t)
        eps = 0.1 * (hi - lo)
        if min(hi - step, step - lo) < eps:  # too close to an end of the bracket
            if insufficient or step >= hi or step <= lo:
                step = hi - eps if abs(step - hi) < abs(step - lo) else lo + eps
                insufficient = False
            else:
                insufficient = True
        else:
            insufficient = False
        new = yield from probe(step)
        evals += 1
        ls_iter += 1
        if new.f > f + c1 * new.t * slope0 or new.f >= bracket[low].f:
            bracket[high] = new
            low, high = (0, 1) if bracket[0].f <= bracket[1].f else (1, 0)
        else:
            if abs(new.slope) <= -c2 * slope0:
                done = True
            elif new.slope * (bracket[high].t - bracket[low].t) >= 0:
                bracket[high] = bracket[low]
            bracket[low] = new
    best = bracket[low]
    return best.f, best.g, best.t, evals
