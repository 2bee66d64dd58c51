"""Why approximate inversion looks erratic on digits-vp (issue 18 point 16): the evidence behind the
explanation in benchmarks/inversion.md. Prints its findings; about 17 minutes on one CPU core.

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/diag_inversion_digits.py [--part A,B,C,D,E]

A  all 300 held-out digits: round trip of dpmpp-2m, dpmpp-3m and heun at 20 and 50 steps (max, median
   over digits of each digit's max error, digits that come back as another image: max error > 0.5)
B  dpmpp-3m on the first 32 digits (the benchmark's set) at 30 to 70 steps: the worst digit
C  held-out digit 2 (and digit 0, a typical one): the inversion's and the sampling-back trajectory of
   dpmpp-3m and dpmpp-2m at 50 steps against the exact path (dpmpp-2m on 1000 log-SNR steps)
D  conditioning at digit 2's exact latent: where the exact map (dpmpp-2m, 1000 steps) sends the
   approximate latents, and the exact latent moved by random perturbations of the same RMS size
E  dpmpp-3m with lower orders at the data end: order <= 2 in the first third of the inversion; or
   orders 2, 1 in the last two sampling steps (the mirror of the inversion's warm-up); all 300 digits
F  dpmpp-3s, 8 digits at 50 and 100 steps: how far the sampling-back state is from the inversion's after
   the first step and along the path, and the round trip in float64
"""

from __future__ import annotations

import argparse
import time

import torch

import diffsolve as ds
import diffsolve.solvers.exponential.multistep as ex
from diffsolve.core.driver import execute
from diffsolve.core.noise import NoiseSource
from diffsolve.data import digits16

FLIP = 0.5


def per_digit(back, x0):
    e = (back.double() - x0.double()).abs().flatten(1)
    return e.amax(1), float(e.pow(2).mean().sqrt())


def summary(back, x0) -> str:
    m, rms = per_digit(back, x0)
    top = m.topk(4)
    return (
        f"max {m.max():.3f} median {m.median():.4f} rms {rms:.4f} flipped {(m > FLIP).sum().item()} "
        f"worst digits {top.indices.tolist()} ({', '.join(f'{v:.2f}' for v in top.values.tolist())})"
    )


def part_a(model, held):
    print("A: all 300 held-out digits", flush=True)
    for solver in ("dpmpp-2m", "dpmpp-3m", "heun"):
        for k in (20, 50):
            lat = ds.invert(model, solver, held, k)
            print(
                f"  {solver:9s} {k:3d} steps: {summary(ds.sample(model, solver, latent=lat).samples, held)}", flush=True
            )


def part_b(model, held):
    print("B: dpmpp-3m, first 32 digits", flush=True)
    x0 = held[:32]
    for k in (20, 30, 40, 50, 60, 70, 100):
        lat = ds.invert(model, "dpmpp-3m", x0, k)
        print(f"  {k:3d} steps: {summary(ds.sample(model, 'dpmpp-3m', latent=lat).samples, x0)}", flush=True)


def inversion_path(model, solver, x0, k):
    """The latent and the states of an inversion at its grid points (t -> x)."""
    slv = ds.get_solver(solver)
    lat = ds.invert(model, solver, x0, k)
    g = lat.grid
    src = NoiseSource(tuple(x0.shape), seeds=0, device=x0.device, dtype=x0.dtype, t_range=(float(g[-1]), float(g[0])))
    _out, _, traj, _ = execute(
        slv.run(x0.clone(), g.flip(0), src, schedule=model.schedule),
        slv,
        model,
        g.flip(0),
        len(x0),
        return_trajectory=True,
    )
    path = {round(float(torch.as_tensor(t).flatten()[0]), 9): x for t, x in traj}
    path[round(float(g[0]), 9)] = lat.x
    return lat, path


def part_c(model, held):
    print(
        "C: digits 2 and 0, 50 steps: max abs distance to the exact path at grid points "
        "(inv: the inversion's state; back: the sampling-back state)",
        flush=True,
    )
    x0 = held[[2, 0]]
    _, exact = inversion_path(model, "dpmpp-2m", x0, 1000)
    for solver in ("dpmpp-3m", "dpmpp-2m"):
        lat, inv = inversion_path(model, solver, x0, 50)
        res = ds.sample(model, solver, latent=lat, return_trajectory=True)
        back = {round(float(t), 9): x for t, x in res.trajectory}
        ts = sorted(inv, reverse=True)
        back[ts[-1]] = res.samples
        print(f"  {solver}: log-SNR | inv - exact (digit 2, 0) | back - exact (digit 2, 0)")
        for t in ts[::5] + ts[-1:]:
            ref = exact[min(exact, key=lambda s: abs(s - t))]
            lam = float(model.schedule.log_snr(torch.tensor(t, dtype=torch.float64)))
            d_inv = (inv[t] - ref).flatten(1).abs().amax(1).tolist()
            d_back = (back[t] - ref).flatten(1).abs().amax(1).tolist()
            print(f"    {lam:6.2f} | {d_inv[0]:.3f} {d_inv[1]:.3f} | {d_back[0]:.3f} {d_back[1]:.3f}", flush=True)


def part_d(model, held):
    print("D: conditioning at digit 2's latent (exact map: dpmpp-2m on 1000 steps); digit 0 for comparison", flush=True)
    for i in (2, 0):
        x0 = held[i : i + 1]
        exact = ds.invert(model, "dpmpp-2m", x0, 1000)
        lats = {"exact latent": exact.x}
        for solver, k in (("dpmpp-3m", 50), ("dpmpp-3m", 100), ("dpmpp-2m", 50)):
            lats[f"{solver} {k}-step latent"] = ds.invert(model, solver, x0, k).x
        size = float((lats["dpmpp-3m 50-step latent"] - exact.x).pow(2).mean().sqrt())
        gen = torch.Generator().manual_seed(0)
        for j in range(4):
            d = torch.randn(exact.x.shape, generator=gen)
            lats[f"random perturbation {j}"] = exact.x + d * (size / float(d.pow(2).mean().sqrt()))
        batch = torch.cat(list(lats.values()))
        out = ds.sample(model, "dpmpp-2m", 1000, x_T=batch).samples
        print(f"  digit {i} (RMS size of the dpmpp-3m 50-step latent error: {size:.4f})")
        for (name, lat), o in zip(lats.items(), out):
            print(
                f"    {name:28s} max abs to exact latent {float((lat - exact.x).abs().max()):.4f}  "
                f"-> exact map's max error {float((o - x0[0]).abs().max()):.3f}",
                flush=True,
            )


def part_e(model, held):
    print("E: dpmpp-3m with lower orders at the data end, all 300 digits", flush=True)
    orig = ex._step_orders
    mode = {"variant": None, "inverting": False}

    def orders(order, n, lower_order_final, final_zero):
        o = orig(order, n, lower_order_final, final_zero)
        if mode["variant"] == "inversion: order <= 2 in its first third" and mode["inverting"]:
            o = [min(v, 2) if j < n // 3 else v for j, v in enumerate(o)]
        if mode["variant"] == "sampling: orders 2, 1 in its last two steps" and not mode["inverting"]:
            o[-1], o[-2] = 1, min(o[-2], 2)
        return o

    class Variant(ex.MRSODE):
        def run(self, x, grid, noise, **kw):
            mode["inverting"] = bool(grid[0] < grid[-1])
            return (yield from super().run(x, grid, noise, **kw))

    ex._step_orders = orders
    try:
        slv = Variant(order=3, parameterization="data", solver_type="midpoint")
        for variant in ("inversion: order <= 2 in its first third", "sampling: orders 2, 1 in its last two steps"):
            mode["variant"] = variant
            for k in (20, 50):
                lat = ds.invert(model, slv, held, k)
                print(f"  {variant}, {k} steps: {summary(ds.sample(model, slv, latent=lat).samples, held)}", flush=True)
    finally:
        ex._step_orders = orig


def part_f(model, held):
    print(
        "F: dpmpp-3s, first 8 digits: sampling-back state - inversion state (median over digits of the max abs)",
        flush=True,
    )
    x0 = held[:8]
    for k in (50, 100):
        lat, inv = inversion_path(model, "dpmpp-3s", x0, k)
        res = ds.sample(model, "dpmpp-3s", latent=lat, return_trajectory=True)
        back = {round(float(torch.as_tensor(t).flatten()[0]), 9): x for t, x in res.trajectory}
        ts = [round(float(t), 9) for t in lat.grid]
        back[ts[-1]] = res.samples
        gaps = [float((back[t] - inv[t]).flatten(1).abs().amax(1).median()) for t in ts]
        print(
            f"  {k} steps: after step 1 {gaps[1]:.5f}, half way {gaps[k // 2]:.5f}, at the data end {gaps[-1]:.5f}; "
            f"round trip {summary(res.samples, x0)}",
            flush=True,
        )
    m64 = ds.pretrained.load("digits-vp", dtype=torch.float64)
    x64 = held[:4].double()
    for k in (50, 100):
        lat = ds.invert(m64, "dpmpp-3s", x64, k)
        print(
            f"  float64, 4 digits, {k} steps: {summary(ds.sample(m64, 'dpmpp-3s', latent=lat).samples, x64)}",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="A,B,C,D,E,F")
    a = p.parse_args()
    torch.set_num_threads(1)
    model = ds.pretrained.load("digits-vp")
    held = digits16("heldout")[0]
    for name in a.part.split(","):
        t0 = time.perf_counter()
        {"A": part_a, "B": part_b, "C": part_c, "D": part_d, "E": part_e, "F": part_f}[name.strip()](model, held)
        print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
