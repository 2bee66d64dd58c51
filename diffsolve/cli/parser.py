"""The argument parser of the ``diffsolve`` command: its subcommands, their options and defaults,
and the argument types that check numbers and grids as they are parsed."""

from __future__ import annotations

import argparse
import math
import platform
from collections.abc import Callable, Sequence
from typing import Any

import torch

import diffsolve as ds

from .config import parse_option
from .errors import PROG
from .models import DEFAULT_MODEL, MODELS
from .output import OUTPUT_FILES

# = diffsolve.bench.NAMES (that package is imported only by `diffsolve bench`)
BENCH_NAMES = ("ode", "sde", "adaptive", "overhead", "inversion", "reversible")
DTYPES = ("float32", "float64", "float16", "bfloat16")
DTYPE_HELP = (
    "precision of the network and of the samples: float32, float64, or float16 / bfloat16 (the network "
    "in half precision, the solver's arithmetic in float32) (default: float32"
)
DEFAULT_STEPS = 20
DEFAULT_NUM_SAMPLES = 64
DEFAULT_GUIDANCE = 3.0
#: --guidance-scale's default with a CFG++ solver name: CFGPlusPlus's lambda
DEFAULT_CFGPP_GUIDANCE = 0.6

TIME_RANGE_HELP = (
    "the time range: sampling starts at t_max and ends at t_min (default: the schedule's; flow models "
    "need e.g. --t-max 0.999 for SDE, adaptive and reversible solvers)"
)


def int_at_least(low: int, what: str) -> Callable[[str], int]:
    """An argument type: an integer >= ``low`` (``what`` names it in the error)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v < low:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}")
        return v

    return parse


positive_int = int_at_least(1, "positive")
nonneg_int = int_at_least(0, "non-negative")


def finite_float(text: str) -> float:
    """An argument type: a finite number."""
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def grid_spec(text: str) -> str | tuple[str, dict[str, Any]] | list[float]:
    """A grid kind, a kind with parameters (``KIND:KEY=VALUE[:KEY=VALUE...]``, values parsed as YAML:
    ``karras:rho=5``, ``gits:coeff=1.15``, ``optimal-steps:model=wan``), or an explicit comma-separated
    descending list of times, or the .json file of an optimized grid (``diffsolve optimize-grid``)."""
    if text.lower().endswith(".json"):
        try:
            ds.OptimizedGrid.load(text)
        except (OSError, ValueError) as e:
            raise argparse.ArgumentTypeError(f"--grid {text!r}: {e}") from None
        return text
    if "," in text:
        try:
            return [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"an explicit grid is comma-separated numbers, got {text!r}") from None
    kinds = tuple(ds.schedules.ALL_GRID_KINDS)
    name, *pairs = text.split(":")
    try:
        kind = ds.schedules.grid_kind_name(name)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid grid {text!r} (choose from {', '.join(map(repr, kinds))}, optionally with parameters "
            "KIND:KEY=VALUE, or give comma-separated times)"
        ) from None
    if not pairs:
        return kind
    params: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise argparse.ArgumentTypeError(f"grid parameters are KEY=VALUE after the kind, got {pair!r} in {text!r}")
        key, value = parse_option(pair)
        params[key] = value
    try:
        ds.schedules.grid_kind_params((kind, params))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return kind, params


def add_run_flags(p: argparse.ArgumentParser, *, option_help: str, force_help: str) -> None:
    """The flags every command that runs a solver takes: ``-o KEY=VALUE`` (repeatable, parsed as
    YAML), ``--force`` and ``--no-progress``."""
    p.add_argument(
        "-o",
        "--option",
        dest="options",
        action="append",
        type=parse_option,
        default=[],
        metavar="KEY=VALUE",
        help=option_help,
    )
    p.add_argument("--force", action="store_true", help=force_help)
    p.add_argument("--no-progress", action="store_true", help="do not show a progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``diffsolve`` and its subcommands."""
    parser = argparse.ArgumentParser(prog=PROG, description=ds.__doc__)
    version = f"{PROG} {ds.__version__} (torch {torch.__version__}, python {platform.python_version()})"
    parser.add_argument("--version", action="version", version=version)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("solvers", help="list the registered solvers", description="List the registered solvers.")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("--family", default=None, help="only solvers of this family (ode, sde, ...)")
    p.add_argument(
        "--options",
        default=None,
        metavar="NAME",
        help="print the options of solver NAME (allowed values, default, meaning) instead of the table",
    )

    p = sub.add_parser(
        "sample",
        help="sample from a built-in model and save the results",
        description="Sample from a built-in model with a registered solver; writes "
        + ", ".join(OUTPUT_FILES)
        + " into --out.",
    )
    p.add_argument(
        "--model",
        default=None,
        help=f"{', '.join(MODELS)}, or a path to a diffusers DDPM-style folder (default: {DEFAULT_MODEL}, "
        "or the latent's model with --latent)",
    )
    p.add_argument(
        "--solver",
        default=None,
        help="a registered solver name (see `diffsolve solvers`); default: dpmpp-2m, or the "
        "latent's solver with --latent",
    )
    p.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help=f"number of steps (default: {DEFAULT_STEPS}; adaptive solvers choose their own)",
    )
    p.add_argument(
        "--latent",
        default=None,
        metavar="DIR",
        help="start from a latent written by `diffsolve invert` (a folder or its latent.safetensors): "
        "its samples, grid, model, solver, options and dtype unless given; --steps, "
        "--num-samples, --t-max and --t-min do not apply",
    )
    p.add_argument("--seed", type=nonneg_int, default=0, help="base seed; sample i uses seed + i (default: 0)")
    p.add_argument(
        "--num-samples",
        type=positive_int,
        default=DEFAULT_NUM_SAMPLES,
        help=f"number of samples (default: {DEFAULT_NUM_SAMPLES})",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output directory (default: diffsolve-out/<model>-<solver>-<steps>steps-seed<seed>, plus "
        "-<hash> of any other setting that changes the result; 'adaptive' for the steps of "
        "adaptive solvers)",
    )
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, mps, ... (default: cpu)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the network (worth it for long runs on a GPU; the first call compiles)",
    )
    p.add_argument("--dtype", default=None, choices=DTYPES, help=DTYPE_HELP + ", or the latent's with --latent)")
    p.add_argument(
        "--grid",
        type=grid_spec,
        default=None,
        help=f"time grid: {', '.join(ds.schedules.ALL_GRID_KINDS)}, with parameters as KIND:KEY=VALUE[:KEY=VALUE] "
        "(karras:rho=5, gits:coeff=1.15, optimal-steps:model=wan), comma-separated descending times, "
        "or an optimized grid's FILE.json (diffsolve optimize-grid; its steps and, for its solver, its "
        "options) (default: the schedule's)",
    )
    p.add_argument("--t-max", type=finite_float, default=None, metavar="T", help=TIME_RANGE_HELP)
    p.add_argument("--t-min", type=finite_float, default=None, metavar="T", help="see --t-max")
    add_run_flags(
        p,
        option_help="a solver option, value parsed as YAML (repeatable), e.g. -o s_churn=10",
        force_help="overwrite existing results in --out",
    )
    p.add_argument(
        "--shard-size",
        type=positive_int,
        default=512,
        help="samples per shard: shards are written as they finish, a rerun of an interrupted run "
        "resumes at the first missing shard, and under torchrun the ranks share the shards "
        "(default: 512)",
    )
    p.add_argument(
        "--pipeline",
        default=None,
        metavar="PATH",
        help="a local diffusers pipeline folder (any DiffusionPipeline: DDPM, Stable Diffusion, SD3, "
        "Flux); sampled in driver mode with --solver; --model does not apply",
    )
    p.add_argument("--prompt", default=None, help="the text prompt of a text-to-image --pipeline")
    p.add_argument(
        "--class",
        dest="label",
        type=nonneg_int,
        default=None,
        metavar="K",
        help="class-conditional models (digits-vp-cond): sample class K (default: sample i gets "
        "class i mod the number of classes)",
    )
    p.add_argument(
        "--guidance-scale",
        "--cfg",
        dest="guidance_scale",
        type=float,
        default=None,
        metavar="S",
        help="classifier-free guidance scale for class-conditional models (default: 3; 1 = the "
        "conditional model, no unconditional calls); with a CFG++ solver name (--solver "
        "euler_cfg_pp, dpmpp-2m-cfg-pp, ...) CFG++'s lambda in [0, 1], as ComfyUI's cfg (default: 0.6)",
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE.yaml",
        help="a saved run configuration (keys: the long options above, with '_' for '-', and "
        "'options' for solver options; flags take true or false); options given on the "
        "command line win",
    )

    p = sub.add_parser(
        "invert",
        help="map data to latents with a deterministic or reversible solver",
        description="Invert data (samples.safetensors, as `diffsolve sample` writes) to the "
        "latent at t_max; `diffsolve sample --latent DIR/latent.safetensors` "
        "samples it back (exactly, for reversible solvers).",
    )
    p.add_argument(
        "--model", default=None, help=f"as for sample (default: the model recorded with --input, else {DEFAULT_MODEL})"
    )
    p.add_argument(
        "--solver",
        default=ds.samplers.DEFAULT_INVERSION_SOLVER,
        help=f"a deterministic solver that can invert (default: {ds.samplers.DEFAULT_INVERSION_SOLVER})",
    )
    p.add_argument("--input", required=True, metavar="FILE", help="samples.safetensors, or a directory holding it")
    p.add_argument(
        "--steps",
        type=positive_int,
        default=50,
        help="number of steps (default: 50; adaptive solvers choose their own)",
    )
    p.add_argument("--grid", type=grid_spec, default=None, help="grid kind or explicit times (as for sample)")
    p.add_argument(
        "--t-max",
        type=finite_float,
        default=None,
        metavar="T",
        help="the time range: the latent is at t_max, the data at t_min (default: the schedule's)",
    )
    p.add_argument("--t-min", type=finite_float, default=None, metavar="T", help="see --t-max")
    p.add_argument(
        "--out",
        default=None,
        help="output directory (default: diffsolve-out/<model>-<solver>-<steps>steps-latent-<hash of "
        "the input and settings>)",
    )
    p.add_argument("--dtype", default="float32", choices=DTYPES, help=DTYPE_HELP + ")")
    add_run_flags(p, option_help="a solver option, repeatable", force_help="overwrite an existing latent in --out")

    p = sub.add_parser(
        "restore",
        help="solve an inverse problem on held-out digits (inpainting, deblurring)",
        description="Restore the first --num-samples held-out digits from a degraded measurement "
        "with DPS, EnKG, Inpaint, RePaint or D-Flow (and, for comparison, unguided samples with the same "
        "seeds); writes restored.safetensors, restore.png (rows: degraded / restored / "
        "unguided / clean) and manifest.json (PSNR) into --out.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"an unconditional digit model (default: {DEFAULT_MODEL})")
    p.add_argument(
        "--task",
        default="inpaint",
        choices=ds.guidance.tasks.TASKS,
        help="inpaint: the top half known; deblur: Gaussian blur (std 1.5 px) + noise 0.05 (default: inpaint)",
    )
    p.add_argument(
        "--method", default="dps", choices=[m for m in ds.guidance.tasks.METHODS if m != "none"], help="default: dps"
    )
    p.add_argument(
        "--solver", default=None, help="default: ddim (dps, enkg), ddpm (inpaint, repaint) or rev-heun (dflow)"
    )
    p.add_argument(
        "--steps", type=positive_int, default=None, help="number of steps (default: 50; dflow: 5 per iteration)"
    )
    p.add_argument("--num-samples", type=positive_int, default=16, help="digits to restore (default: 16)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="base seed (default: 0)")
    p.add_argument(
        "--out",
        default=None,
        help="output directory (default: diffsolve-out/restore-<task>-<method>, plus -<hash> of any "
        "other setting not at its default)",
    )
    add_run_flags(
        p,
        option_help="a method option, repeatable: zeta (dps, default 4), particles / guidance_scale "
        "(enkg, default 16 / 2), resample (inpaint, default 1; repaint, default 10), optimizer / iterations / "
        "lr / noise_reg / adjoint (dflow, default lbfgs / 2 (adam: 60) / 1 (adam: 0.1) / 1 / reversible for a "
        "reversible solver)",
        force_help="overwrite existing results in --out",
    )

    p = sub.add_parser(
        "optimize-grid",
        help="fit a step grid to a built-in model and a solver; writes a JSON file for --grid",
        description="Find the best --steps-step grid for --model and --solver (ds.optimize_grid): "
        "teacher trajectories from --samples noises, a search over --candidates log-SNR spaced "
        "times scored with the solver's own update, then a local refinement, checked on other "
        "noises. Writes the grid with its errors to --out (a JSON file that `diffsolve sample "
        "--grid FILE` and ds.sample(grid=FILE) take).",
    )
    p.add_argument("--model", default=None, help=f"a built-in model (default: {DEFAULT_MODEL})")
    p.add_argument("--solver", default="dpmpp-2m", help="a deterministic fixed-grid solver (default: dpmpp-2m)")
    p.add_argument("--steps", type=positive_int, default=5, help="steps of the grid (default: 5)")
    p.add_argument("--samples", type=positive_int, default=64, help="teacher trajectories to fit (default: 64)")
    p.add_argument("--candidates", type=positive_int, default=40, help="candidate steps of the search (default: 40)")
    p.add_argument("--no-refine", action="store_true", help="only the search over the candidates")
    p.add_argument(
        "--stop-early", action="store_true", help="also search grids that stop above sigma = 0 (return that state)"
    )
    p.add_argument(
        "--teleport",
        action="store_true",
        help="shipped models: search a hand-over from the exact flow of the training data's Gaussian",
    )
    p.add_argument(
        "--tune-calls",
        action="store_true",
        help="also tune, with the grid, the time each model call is asked at and the weight of its data "
        "prediction (slower: a Nelder-Mead fit)",
    )
    p.add_argument("--seed", type=nonneg_int, default=0, help="base seed of the fitting noise (default: 0)")
    p.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="class-conditional models: fit with classifier-free guidance at this scale, every class alike",
    )
    p.add_argument(
        "--out",
        default=None,
        help="the JSON file to write (default: diffsolve-out/grid-<model>-<solver>-<steps>steps.json)",
    )
    add_run_flags(p, option_help="a solver option, value parsed as YAML (repeatable)", force_help="overwrite --out")

    p = sub.add_parser(
        "bench",
        help="run the benchmarks: tables (Markdown, JSON) and plots",
        description="Run the benchmarks side by side in one process and write their tables and "
        "plots: ode (accuracy against NFE, ours against diffusers' schedulers and "
        "k-diffusion), sde (quality against NFE), adaptive (error at equal NFE), "
        "overhead (time per step outside the model), inversion (round trips), "
        "reversible (reversible solvers against non-reversible ones at equal calls, on "
        "the digit models). "
        "--quick runs a reduced set in minutes on a CPU.",
    )
    p.add_argument("--quick", action="store_true", help="the reduced benchmarks (default output benchmarks/quick)")
    p.add_argument("--only", default=None, metavar="NAMES", help="comma-separated subset of: " + ", ".join(BENCH_NAMES))
    p.add_argument("--out", default=None, help="output folder (default benchmarks, or benchmarks/quick with --quick)")
    p.add_argument("--force", action="store_true", help="overwrite earlier results in the output folder")

    p = sub.add_parser(
        "eval",
        help="digit sample quality: digits-FD and classifier confidence",
        description="Score digit samples (what `diffsolve sample`, `sample --pipeline` and "
        "`restore` write: a folder, or its .safetensors file) with the shipped digit "
        "classifier: Frechet distance of its features to the 300 held-out digits "
        "(digits-FD) and mean confidence. digits-FD depends on the sample count: "
        "compare scores of equally many samples.",
    )
    p.add_argument("samples", help="a folder holding samples.safetensors or restored.safetensors, or the file")
    p.add_argument(
        "--tensor",
        default=None,
        metavar="NAME",
        help="the tensor to score (default: samples, restored or images, whichever is there; "
        "e.g. unguided or degraded in restore's output)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommands' parsers of ``parser``, by name."""
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


FLAG_NAMES = {"label": "class"}  # dests whose option is named otherwise


def flags(names: Sequence[str]) -> str:
    """The options of the dests ``names``, as the user types them: "--steps, --num-samples"."""
    return ", ".join("--" + FLAG_NAMES.get(n, n).replace("_", "-") for n in names)
