"""Reversible solvers on the trained digit models: sample quality against a non-reversible solver of
the same order at equal model calls, and the exact round trip.

    diffsolve bench --only reversible [--quick]  (or python scripts/bench_reversible.py [--quick])

Quality (digits-vp, digits-flow, and digits-vp-cond with classifier-free guidance at scale 3; the same
seeds and the same sample count in every row): digits-FD against the 300 held-out digits, the
classifier's confidence, its accuracy on the requested labels (conditional model), and the RMS
distance of the samples to the same seeds' reference ODE solution (dpmpp-2m on 4 x the largest step
count: the pairing makes this far less noisy than digits-FD). Every reversible solver runs in its
default form; rev-heun, bdia and edict also in the noise form, which may refuse with
``ds.UnstableError``. Each is compared at equal model calls with

    rev-heun (order 2, N + 1 calls)   -> dpmpp-2m on N + 1 steps
    bdia, o-belm (order 2, N calls)   -> dpmpp-2m on N steps
    edict (order 1, 2N calls)         -> ddim on 2N steps
    rex (midpoint base, 4N calls)     -> dpmpp-2m on 4N steps

Round trip: digits-vp inverts held-out digits and samples them back with every reversible solver;
max abs error in float32 and in float64 (the model loaded in float64), and the latent's RMS distance
to the exact ODE latent.

Writes reversible.{json,md} and (with matplotlib) reversible.png. Sized for about 25 minutes on one
CPU core: 64 samples at 10, 20 and 50 steps (100 steps would more than double it), round trips of 16
digits (float32) and 4 (float64: 3 times slower) at 10, 20, 50 and 100 steps. ``quick``: 16 samples at 10 steps,
round trips of 4 digits at 10 and 20 steps.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import torch

import diffsolve as ds
from diffsolve.data import digits16

from . import pyplot, save_figure, write_text

STEMS = ("reversible",)
QUALITY_STEPS = (10, 20, 50)
ROUND_TRIP_STEPS = (10, 20, 50, 100)
NUM_SAMPLES = 64
RT_DIGITS = {torch.float32: 16, torch.float64: 4}
CFG_SCALE = 3.0
SEED = 0

# label -> (solver, options, calls for N steps, comparison (solver, steps for N))
REVERSIBLE = {
    "rev-heun": ("rev-heun", {}, lambda n: n + 1, ("dpmpp-2m", lambda n: n + 1)),
    "bdia": ("bdia", {}, lambda n: n, ("dpmpp-2m", lambda n: n)),
    "o-belm": ("o-belm", {}, lambda n: n, ("dpmpp-2m", lambda n: n)),
    "edict": ("edict", {}, lambda n: 2 * n, ("ddim", lambda n: 2 * n)),
    "rex": ("rex", {}, lambda n: 4 * n, ("dpmpp-2m", lambda n: 4 * n)),
    "rev-heun noise": ("rev-heun", {"form": "noise"}, lambda n: n + 1, ("dpmpp-2m", lambda n: n + 1)),
    "bdia noise": ("bdia", {"form": "noise"}, lambda n: n, ("dpmpp-2m", lambda n: n)),
    "edict noise": ("edict", {"form": "noise"}, lambda n: 2 * n, ("ddim", lambda n: 2 * n)),
}
ROUND_TRIP = ("rev-heun", "bdia", "o-belm", "edict", "rex")
MODELS = ("digits-vp", "digits-flow", "digits-vp-cond")


class _Setup:
    """A model (guided for digits-vp-cond) and the keyword arguments of its runs."""

    def __init__(self, name: str, n: int):
        self.name = name
        base = ds.pretrained.load(name)
        self.kw: dict = {"shape": (n, 1, 16, 16), "seed": SEED}
        self.labels = None
        self.model: ds.DiffusionModel
        if name == "digits-vp-cond":
            self.labels = torch.arange(n) % 10
            self.model = ds.guidance.ClassifierFreeGuidance(
                base, CFG_SCALE, uncond={"class_labels": torch.full((n,), 10)}
            )
            self.kw["cond"] = {"class_labels": self.labels}
        else:
            self.model = base

    def sample(self, solver: str, steps: int, **opts):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = ds.sample(self.model, solver, steps, **self.kw, **opts)
        notes = sorted({str(w.message).split("\n")[0] for w in caught})
        return res, notes


def _quality(samples: torch.Tensor, labels, clf, ref: torch.Tensor | None) -> dict:
    q = ds.quality.evaluate(samples, classifier=clf)
    out = {
        "digits_fd": q["digits_fd"],
        "confidence": q["confidence"],
        "out_of_range": float((samples.abs() > 1.05).float().mean()),
    }
    if labels is not None:
        with torch.no_grad():
            pred = clf(samples.detach().to(torch.float32).clamp(-1, 1)).argmax(1)
        out["accuracy"] = float((pred == labels).float().mean())
    if ref is not None:
        out["ode_distance"] = float((samples.double() - ref.double()).pow(2).mean().sqrt())
    return out


def _floor(n: int, clf) -> dict:
    """digits-FD of n real training digits (5 draws): the floor and the spread at this sample count."""
    train = digits16("train")[0]
    fds = [
        ds.quality.evaluate(
            train[torch.randperm(len(train), generator=torch.Generator().manual_seed(s))[:n]], classifier=clf
        )["digits_fd"]
        for s in range(5)
    ]
    return {"mean": sum(fds) / len(fds), "min": min(fds), "max": max(fds)}


def _quality_rows(steps, n, clf, log) -> list[dict]:
    rows = []
    for name in MODELS:
        setup = _Setup(name, n)
        cache: dict = {}

        def comparison(solver, k, setup=setup, cache=cache):
            if (solver, k) not in cache:
                t0 = time.perf_counter()
                res, notes = setup.sample(solver, k)
                cache[solver, k] = (res, notes, time.perf_counter() - t0)
            return cache[solver, k]

        # the reference ODE solution of these seeds: dpmpp-2m on 4 x the largest step count (rex's comparison)
        ref = comparison("dpmpp-2m", 4 * max(steps))[0].samples
        for k in steps:
            kept = {}
            for label, (solver, opts, calls, (csolver, csteps)) in REVERSIBLE.items():
                c_res, _c_notes, c_sec = comparison(csolver, csteps(k))
                row = {
                    "model": name,
                    "steps": k,
                    "method": label,
                    "solver": solver,
                    "options": opts,
                    "comparison": f"{csolver} {csteps(k)} steps",
                    "comparison_nfe": c_res.nfe,
                    "comparison_quality": _quality(c_res.samples, setup.labels, clf, ref),
                    "comparison_seconds": round(c_sec, 1),
                }
                t0 = time.perf_counter()
                try:
                    res, notes = setup.sample(solver, k, **opts)
                    row.update(nfe=res.nfe, quality=_quality(res.samples, setup.labels, clf, ref), notes=notes)
                    kept[label] = res.samples
                    if label == "o-belm" and "bdia" in kept:
                        row["max_abs_to_bdia"] = float((res.samples.double() - kept["bdia"].double()).abs().max())
                except ds.UnstableError as e:
                    row.update(nfe=calls(k) * (2 if setup.labels is not None else 1), quality=None, unstable=str(e))
                row["seconds"] = round(time.perf_counter() - t0, 1)
                rows.append(row)
                log(row)
    return rows


def _round_trip_rows(steps, digits, log) -> list[dict]:
    rows = []
    held = digits16("heldout")[0]
    for dtype, count in digits.items():
        model = ds.pretrained.load("digits-vp", dtype=dtype)
        x0 = held[:count].to(dtype)
        # the exact ODE latent, to see where each solver's latent lies (dpmpp-2m on 400 log-SNR steps)
        ode_latent = ds.invert(model, "dpmpp-2m", x0, 400).x.double()
        for solver in ROUND_TRIP:
            for k in steps:
                t0 = time.perf_counter()
                lat = ds.invert(model, solver, x0, k)
                res = ds.sample(model, solver, latent=lat)
                err = (res.samples.double() - x0.double()).abs()
                rows.append(
                    {
                        "dtype": str(dtype).replace("torch.", ""),
                        "digits": count,
                        "solver": solver,
                        "steps": k,
                        "max_abs": float(err.max()),
                        "rms": float(err.pow(2).mean().sqrt()),
                        "nfe": lat.nfe + res.nfe,
                        "latent_rms": float(lat.x.double().pow(2).mean().sqrt()),
                        "latent_to_ode": float((lat.x.double() - ode_latent).pow(2).mean().sqrt()),
                        "seconds": round(time.perf_counter() - t0, 1),
                    }
                )
                log(rows[-1])
    return rows


def run(out: Path, quick: bool = False) -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    steps = (10,) if quick else QUALITY_STEPS
    rt_steps = (10, 20) if quick else ROUND_TRIP_STEPS
    n = 16 if quick else NUM_SAMPLES
    digits = dict.fromkeys(RT_DIGITS, 4) if quick else RT_DIGITS
    clf = ds.quality.load_classifier()

    def log(row):
        print(json.dumps({k: v for k, v in row.items() if k != "unstable"}), flush=True)

    floor = _floor(n, clf)
    quality = _quality_rows(steps, n, clf, log)
    round_trip = _round_trip_rows(rt_steps, digits, log)
    wall = time.perf_counter() - start
    write_text(
        out / "reversible.json",
        json.dumps(
            {
                "quick": quick,
                "num_samples": n,
                "seed": SEED,
                "cfg_scale": CFG_SCALE,
                "floor": floor,
                "quality": quality,
                "round_trip": round_trip,
                "wall_seconds": round(wall),
            },
            indent=2,
        )
        + "\n",
    )
    write_text(out / "reversible.md", _markdown(quick, n, steps, rt_steps, digits, floor, quality, round_trip, wall))
    _plot(out, steps, quality)


def _summary(steps, quality, round_trip, digits) -> list[str]:
    """The issue's targets against what was measured: ODE-distance ratios and the round-trip bounds."""
    lines = [
        "## Summary",
        "",
        (
            "RMS distance to the ODE solution, reversible solver (default form) / its comparison at equal model calls "
            "(below 1: closer to the ODE solution than the non-reversible solver; digits-FD and accuracy are in the "
            "tables below):"
        ),
        "",
        "| solver | " + " | ".join(f"{m.replace('digits-', '')} {k}" for m in MODELS for k in steps) + " |",
        "|---|" + "---|" * (len(MODELS) * len(steps)),
    ]
    for label in ROUND_TRIP:
        cells = []
        for m in MODELS:
            for k in steps:
                r = next(r for r in quality if r["model"] == m and r["steps"] == k and r["method"] == label)
                c = r["comparison_quality"]["ode_distance"]
                cells.append(
                    "-" if r["quality"] is None else ("ref" if c == 0 else f"{r['quality']['ode_distance'] / c:.2f}")
                )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "(rex's comparison on the largest step count is the reference itself.)", ""]
    for dtype, bound in ((torch.float32, 1e-4), (torch.float64, 1e-10)):
        name = str(dtype).replace("torch.", "")
        rows = [r for r in round_trip if r["dtype"] == name]
        if not rows:
            continue
        worst = max(rows, key=lambda r: r["max_abs"])
        over = [f"{r['solver']} at {r['steps']} steps ({r['max_abs']:.1e})" for r in rows if r["max_abs"] >= bound]
        lines.append(
            f"- Round trip, {name} (target below {bound:.0e}): largest {worst['max_abs']:.1e} ({worst['solver']}, "
            f"{worst['steps']} steps); "
            + ("every solver and step count meets it." if not over else "not met by " + ", ".join(over) + ".")
        )
    lines.append("")
    return lines


def _ref_err(quality, k) -> list[float]:
    """The reference's own error, estimated as 1/16 of dpmpp-2m's distance to it on k steps (second order)."""
    return [
        r["comparison_quality"]["ode_distance"] / 16
        for r in quality
        if r["steps"] == k and r["comparison"] == f"dpmpp-2m {k} steps"
    ] or [float("nan")]


def _cell(q: dict | None, key: str, fmt: str) -> str:
    return "-" if q is None or key not in q else format(q[key], fmt)


def _markdown(quick, n, steps, rt_steps, digits, floor, quality, round_trip, wall) -> str:
    lines = [
        "# Reversible solvers on the trained digit models",
        "",
        (
            f"Written by `diffsolve bench{' --quick' if quick else ''} --only reversible` "
            f"(diffsolve/bench/reversible.py) in {wall / 60:.0f} minutes on one CPU core."
        ),
        "",
        *_summary(steps, quality, round_trip, digits),
        "## Quality at equal model calls",
        "",
        (
            f"{n} samples per row, seeds {SEED}..{SEED + n - 1} in every row (the same x_T for every solver); "
            "digits-FD against the 300 held-out digits (it depends on the sample count: compare only within "
            f"this table; {n} real training digits score {floor['mean']:.1f} (5 draws: {floor['min']:.1f} to "
            f"{floor['max']:.1f})). *ODE dist*: RMS distance to the same seeds' samples of dpmpp-2m on "
            f"{4 * max(steps)} steps (second order: its own error is about 1/16 of the dpmpp-2m {max(steps)}-step rows' "
            f"distance, at most {max(_ref_err(quality, max(steps))):.1e} here). digits-vp-cond: classifier-free guidance, "
            f"scale {CFG_SCALE:g}, labels 0..9 in turn; *acc*: the classifier's accuracy on the requested labels; "
            "its NFE counts both calls of a guided step. digits-flow: the data-form solvers end where "
            "sigma / alpha = 0.002 (t = 0.002), the noise forms start where alpha / sigma = 0.002, the "
            "comparisons run the full [0, 1]. A reversible run whose parasitic mode grows raises "
            "`UnstableError` (no samples): shown as *unstable at step k*."
        ),
        "",
    ]
    for model in MODELS:
        cond = model == "digits-vp-cond"
        lines += [
            f"### {model}" + (f" (CFG {CFG_SCALE:g})" if cond else ""),
            "",
            "| steps | solver | NFE | digits-FD | " + ("acc | " if cond else "") + "ODE dist | comparison | NFE | "
            "digits-FD | " + ("acc | " if cond else "") + "ODE dist |",
            "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if cond else ""),
        ]
        for r in (r for r in quality if r["model"] == model):
            q, c = r["quality"], r["comparison_quality"]
            if q is None:
                at = (
                    r["unstable"].split(" went unstable at ")[1].split(":")[0]
                    if " went unstable at " in r["unstable"]
                    else "?"
                )
                mine = [f"unstable at {at}"] + (["-"] if cond else []) + ["-"]
            else:
                mine = (
                    [_cell(q, "digits_fd", ".1f")]
                    + ([_cell(q, "accuracy", ".3f")] if cond else [])
                    + [_cell(q, "ode_distance", ".3f")]
                )
            theirs = (
                [_cell(c, "digits_fd", ".1f")]
                + ([_cell(c, "accuracy", ".3f")] if cond else [])
                + [_cell(c, "ode_distance", ".3f")]
            )
            lines.append(
                f"| {r['steps']} | {r['method']} | {r['nfe']} | " + " | ".join(mine) + f" | {r['comparison']} | "
                f"{r['comparison_nfe']} | " + " | ".join(theirs) + " |"
            )
        lines.append("")
        same = [r["max_abs_to_bdia"] for r in quality if r["model"] == model and "max_abs_to_bdia" in r]
        if same:
            lines += [
                f"o-belm's samples differ from bdia's by at most {max(same):.1e} (max abs, over these step counts)"
                + (
                    ": on a grid uniform in log-SNR (this model's default) O-BELM in the noise form and BDIA "
                    "(gamma 1) in the data form are the same recurrence, v_{k+1} = v_{k-1} + (s_{k+1} - s_{k-1}) "
                    "x0_hat_k in v = x / sigma, s = alpha / sigma."
                    if max(same) < 1e-4
                    else "."
                ),
                "",
            ]
        noisy = [
            r
            for r in quality
            if r["model"] == model
            and r["quality"] is not None
            and (r["quality"].get("ode_distance", 0) > 1 or r["quality"]["out_of_range"] > 0.1)
        ]
        for r in noisy:
            lines += [
                (
                    f"Not refused but noise: {r['method']} at {r['steps']} steps ({r['quality']['out_of_range']:.0%} of "
                    f"the pixels outside [-1.05, 1.05], RMS {r['quality']['ode_distance']:.3g} from the ODE solution)."
                ),
                "",
            ]
    unstable = [r for r in quality if r["quality"] is None]
    if unstable:
        lines += ["The `UnstableError` messages (first of each solver):", ""]
        seen = set()
        for r in unstable:
            if r["method"] not in seen:
                seen.add(r["method"])
                lines.append(f"- {r['model']}, {r['method']}, {r['steps']} steps: {r['unstable']}")
        lines.append("")
    lines += [
        "## Round trip sample(invert(x0)) - x0 on digits-vp",
        "",
        (
            "Held-out digits (`diffsolve.data.digits16('heldout')`, the first ones), inverted and sampled back "
            "with each reversible solver on its default grid; max abs error over all pixels (RMS in the JSON). "
            "float32: the shipped model; float64: `ds.pretrained.load('digits-vp', dtype=torch.float64)` with "
            "float64 digits. (Reversible states are carried in float64 in both; float32 differs in the "
            "model's precision.)"
        ),
        "",
    ]
    for dtype in digits:
        name = str(dtype).replace("torch.", "")
        lines += [
            f"### {name} ({digits[dtype]} digits)",
            "",
            "| solver | " + " | ".join(f"{k} steps" for k in rt_steps) + " |",
            "|---|" + "---|" * len(rt_steps),
        ]
        for solver in ROUND_TRIP:
            vals = [
                next(
                    r["max_abs"] for r in round_trip if r["dtype"] == name and r["solver"] == solver and r["steps"] == k
                )
                for k in rt_steps
            ]
            lines.append(f"| {solver} | " + " | ".join(f"{v:.1e}" for v in vals) + " |")
        lines.append("")
    lines += [
        "### Where the latents lie",
        "",
        (
            "RMS distance of each solver's latent x_T (`Latent.x`) to the exact ODE latent of the same digits "
            "(dpmpp-2m inversion on 400 log-SNR steps; the latents themselves have RMS about 0.77), float32:"
        ),
        "",
        "| solver | " + " | ".join(f"{k} steps" for k in rt_steps) + " |",
        "|---|" + "---|" * len(rt_steps),
    ]
    for solver in ROUND_TRIP:
        vals = [
            next(
                r["latent_to_ode"]
                for r in round_trip
                if r["dtype"] == "float32" and r["solver"] == solver and r["steps"] == k
            )
            for k in rt_steps
        ]
        lines.append(f"| {solver} | " + " | ".join(f"{v:.2g}" for v in vals) + " |")
    lines.append("")
    far = sorted({r["solver"] for r in round_trip if r["latent_rms"] > 2})  # a Gaussian-like x_T has RMS about 1
    if far:
        lines += [
            (
                f"{', '.join(far)}: the latent is far from any Gaussian-like x_T (RMS up to "
                f"{max(r['latent_rms'] for r in round_trip if r['solver'] in far):.2g}) although the round trip is exact: "
                "the inversion lets its two chains part (for edict, the mixing expands their gap by 1/p^2 per step), "
                "so the latent serves a round trip but not as noise to edit or resample from."
            ),
            "",
        ]
    return "\n".join(lines)


def _plot(out: Path, steps, quality) -> None:
    plt = pyplot()
    if plt is None:
        return
    colors = dict(zip(ROUND_TRIP, ("C0", "C1", "C2", "C3", "C4")))
    fig, axes = plt.subplots(1, len(MODELS), figsize=(5 * len(MODELS), 4.2))
    for ax, model in zip(axes, MODELS):
        rows = [r for r in quality if r["model"] == model]
        for label, (solver, opts, _, _) in REVERSIBLE.items():
            pts = [(r["nfe"], r["quality"]["ode_distance"]) for r in rows if r["method"] == label and r["quality"]]
            if pts:
                noise = opts.get("form") == "noise"
                ax.loglog(
                    *zip(*pts),
                    "x" if noise else "o-",
                    color=colors[solver],
                    label=label + (" (not refused)" if noise else ""),
                )
        comps = {
            (r["comparison"].split()[0], r["comparison_nfe"], r["comparison_quality"]["ode_distance"])
            for r in rows
            if r["comparison_quality"]["ode_distance"] > 0
        }
        for solver in sorted({c[0] for c in comps}):
            pts = sorted((nfe, d) for s, nfe, d in comps if s == solver)
            ax.loglog(*zip(*pts), "k--" if solver == "dpmpp-2m" else "k:", label=f"{solver} (comparison)")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel("NFE")
        ax.set_title(f"{model}: RMS distance to the ODE solution", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, out / "reversible.png")
