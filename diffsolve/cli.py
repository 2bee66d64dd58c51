"""The ``diffsolve`` command line.

    diffsolve solvers [--markdown] [--family FAMILY]
    diffsolve sample [--model gmm-2d|digits-oracle] [--solver NAME] [--steps N] [--seed S]
                     [--num-samples K] [--out DIR] [--device DEV] [--dtype float32|float64|float16|bfloat16]
                     [--grid KIND] [--t-max T] [--t-min T] [-o key=value ...] [--latent DIR] [--force]
                     [--no-progress]
    diffsolve invert --input DIR [--model M] [--solver NAME] [--steps N] [--t-max T] [--t-min T] ...
    diffsolve restore [--task inpaint|deblur] [--method dps|enkg|inpaint] [--model digits-vp] ...
    diffsolve eval DIR [--tensor NAME] [--json]
    diffsolve bench [--quick] [--only NAMES]
    diffsolve --version

``sample`` writes ``samples.safetensors``, ``samples.png`` and ``manifest.json`` into the output
directory, atomically, and never overwrites earlier results unless ``--force`` is given. The default
output folder is named by the model, solver, steps and seed, plus a short hash of every other setting
that changes the result (solver options, dtype, grid, time range, sample count, latent, class).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import diffsolve as ds

PROG = "diffsolve"
BENCH_NAMES = ("ode", "sde", "adaptive", "overhead", "inversion", "reversible")  # = diffsolve.bench.NAMES (imported lazily)
OUTPUT_FILES = ("samples.safetensors", "samples.png", "manifest.json")
LATENT_FILES = ("latent.safetensors", "manifest.json")
DTYPES = ("float32", "float64", "float16", "bfloat16")
DTYPE_HELP = ("precision of the network and of the samples: float32, float64, or float16 / bfloat16 (the network "
              "in half precision, the solver's arithmetic in float32) (default: float32")
DEFAULT_STEPS = 20
DEFAULT_NUM_SAMPLES = 64
DEFAULT_GUIDANCE = 3.0


class CLIError(Exception):
    """A user error: printed as ``diffsolve: error: <message>``, exit code 2."""


# ---------------------------------------------------------------------------------------- models
# name -> builder returning a Target. Add new models here.

class Target:
    """What `diffsolve sample` samples: a model, the shape of one sample, and for conditional
    (restoration) models a function making the condition mu and the clean originals."""

    def __init__(self, model, event_shape: tuple[int, ...],
                 condition: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]] | None = None,
                 classes: dict | None = None):
        self.model, self.event_shape, self.condition = model, tuple(event_shape), condition
        self.classes = classes  # class-conditional models: {"num_classes", "null_class"}


def _gmm_2d(device="cpu", dtype=torch.float32) -> Target:
    return Target(ds.models.GaussianMixture.gmm_2d().model(ds.schedules.VPLinear()), (2,))


def _digits_oracle(device="cpu", dtype=torch.float32) -> Target:
    return Target(ds.models.Empirical.digits().model(ds.schedules.VPLinear()), (1, 8, 8))


def _restoration_condition(card: dict):
    """Degrade the first K held-out digits as the model's card records (noise seeded by --seed)."""
    from diffsolve.data import degrade, digits16

    def make(k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        clean = digits16("heldout")[0]
        if k > len(clean):
            raise CLIError(f"--num-samples {k}: there are only {len(clean)} held-out digits to restore")
        clean = clean[:k]
        return degrade(clean, card["degradation"], torch.Generator().manual_seed(seed)), clean

    return make


def _shipped(name: str) -> Callable[[], Target]:
    def build(device="cpu", dtype=torch.float32) -> Target:
        c = ds.pretrained.card(name)
        cond = _restoration_condition(c) if c.get("degradation") else None
        return Target(ds.pretrained.load(name, device, dtype), ds.pretrained.SHIPPED[name], cond,
                      ds.pretrained.classes(name))

    return build


def _diffusers_folder(path: str, device="cpu", dtype=torch.float32) -> Target:
    cfg_file = Path(path) / "unet" / "config.json"
    if not cfg_file.exists():
        raise CLIError(f"--model {path!r} is neither a known model ({', '.join(MODELS)}) nor a diffusers "
                       "folder with unet/ and scheduler/")
    cfg = json.loads(cfg_file.read_text())
    size = cfg.get("sample_size", 32)
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    return Target(ds.pretrained.load_diffusers_ddpm(path, device, dtype), (cfg.get("in_channels", 3), *size))


MODELS: dict[str, Callable[[], Target]] = {
    **{name: _shipped(name) for name in ds.pretrained.SHIPPED},
    "gmm-2d": _gmm_2d,
    "digits-oracle": _digits_oracle,
}
DEFAULT_MODEL = "digits-vp"


# ------------------------------------------------------------------------------------ arguments

def _int_at_least(low: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v < low:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}")
        return v

    return parse


_positive_int = _int_at_least(1, "positive")
_nonneg_int = _int_at_least(0, "non-negative")


def _finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


TIME_RANGE_HELP = ("the time range: sampling starts at t_max and ends at t_min (default: the schedule's; flow models "
                   "need e.g. --t-max 0.999 for SDE, adaptive and reversible solvers)")


def _option(text: str) -> tuple[str, Any]:
    """``key=value`` with the value parsed as YAML (numbers, bools, null, lists)."""
    import yaml

    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"solver options are key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 leaves "1e-3", "inf", "nan" as strings
        try:
            value = float(value)
        except ValueError:
            pass
    return key, value


def _grid(text: str):
    """A grid kind, or an explicit comma-separated descending list of times."""
    if "," in text:
        try:
            return [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"an explicit grid is comma-separated numbers, got {text!r}") from None
    kinds = tuple(ds.schedules.GRID_KINDS)
    if text not in kinds:
        raise argparse.ArgumentTypeError(
            f"invalid grid {text!r} (choose from {', '.join(map(repr, kinds))}, or give comma-separated times)")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=ds.__doc__)
    parser.add_argument("--version", action="version",
                        version=f"{PROG} {ds.__version__} (torch {torch.__version__}, python {platform.python_version()})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("solvers", help="list the registered solvers", description="List the registered solvers.")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("--family", default=None, help="only solvers of this family (ode, sde, ...)")

    p = sub.add_parser("sample", help="sample from a built-in model and save the results",
                       description="Sample from a built-in model with a registered solver; writes "
                                   + ", ".join(OUTPUT_FILES) + " into --out.")
    p.add_argument("--model", default=None,
                   help=f"{', '.join(MODELS)}, or a path to a diffusers DDPM-style folder (default: {DEFAULT_MODEL}, "
                        "or the latent's model with --latent)")
    p.add_argument("--solver", default=None,
                   help="a registered solver name (see `diffsolve solvers`); default: dpmpp-2m, or the "
                        "latent's solver with --latent")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help=f"number of steps (default: {DEFAULT_STEPS}; adaptive solvers choose their own)")
    p.add_argument("--latent", default=None, metavar="DIR",
                   help="start from a latent written by `diffsolve invert` (a folder or its latent.safetensors): "
                        "its samples, grid, model, solver, options and dtype unless given; --steps, "
                        "--num-samples, --t-max and --t-min do not apply")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="base seed; sample i uses seed + i (default: 0)")
    p.add_argument("--num-samples", type=_positive_int, default=DEFAULT_NUM_SAMPLES,
                   help=f"number of samples (default: {DEFAULT_NUM_SAMPLES})")
    p.add_argument("--out", default=None,
                   help="output directory (default: diffsolve-out/<model>-<solver>-<steps>steps-seed<seed>, plus "
                        "-<hash> of any other setting that changes the result; 'adaptive' for the steps of "
                        "adaptive solvers)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, mps, ... (default: cpu)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network (worth it for long runs on a GPU; the first call compiles)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help=DTYPE_HELP + ", or the latent's with --latent)")
    p.add_argument("--grid", type=_grid, default=None,
                   help=f"time grid: {', '.join(ds.schedules.GRID_KINDS)}, or comma-separated descending times "
                        "(default: the schedule's)")
    p.add_argument("--t-max", type=_finite_float, default=None, metavar="T", help=TIME_RANGE_HELP)
    p.add_argument("--t-min", type=_finite_float, default=None, metavar="T", help="see --t-max")
    p.add_argument("-o", "--option", dest="options", action="append", type=_option, default=[], metavar="KEY=VALUE",
                   help="a solver option, value parsed as YAML (repeatable), e.g. -o s_churn=10")
    p.add_argument("--force", action="store_true", help="overwrite existing results in --out")
    p.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    p.add_argument("--shard-size", type=_positive_int, default=512,
                   help="samples per shard: shards are written as they finish, a rerun of an interrupted run "
                        "resumes at the first missing shard, and under torchrun the ranks share the shards "
                        "(default: 512)")
    p.add_argument("--pipeline", default=None, metavar="PATH",
                   help="a local diffusers pipeline folder (any DiffusionPipeline: DDPM, Stable Diffusion, SD3, "
                        "Flux); sampled in driver mode with --solver; --model does not apply")
    p.add_argument("--prompt", default=None, help="the text prompt of a text-to-image --pipeline")
    p.add_argument("--class", dest="label", type=_nonneg_int, default=None, metavar="K",
                   help="class-conditional models (digits-vp-cond): sample class K (default: sample i gets "
                        "class i mod the number of classes)")
    p.add_argument("--guidance-scale", type=float, default=None, metavar="S",
                   help="classifier-free guidance scale for class-conditional models (default: 3; 1 = the "
                        "conditional model, no unconditional calls)")
    p.add_argument("--config", default=None, metavar="FILE.yaml",
                   help="a saved run configuration (keys: the long options above, with '_' for '-', and "
                        "'options' for solver options; flags take true or false); options given on the "
                        "command line win")

    p = sub.add_parser("invert", help="map data to latents with a deterministic or reversible solver",
                       description="Invert data (samples.safetensors, as `diffsolve sample` writes) to the "
                                   "latent at t_max; `diffsolve sample --latent DIR/latent.safetensors` "
                                   "samples it back (exactly, for reversible solvers).")
    p.add_argument("--model", default=None,
                   help=f"as for sample (default: the model recorded with --input, else {DEFAULT_MODEL})")
    p.add_argument("--solver", default=ds.samplers.DEFAULT_INVERSION_SOLVER,
                   help=f"a deterministic solver that can invert (default: {ds.samplers.DEFAULT_INVERSION_SOLVER})")
    p.add_argument("--input", required=True, metavar="FILE", help="samples.safetensors, or a directory holding it")
    p.add_argument("--steps", type=_positive_int, default=50,
                   help="number of steps (default: 50; adaptive solvers choose their own)")
    p.add_argument("--grid", type=_grid, default=None, help="grid kind or explicit times (as for sample)")
    p.add_argument("--t-max", type=_finite_float, default=None, metavar="T",
                   help="the time range: the latent is at t_max, the data at t_min (default: the schedule's)")
    p.add_argument("--t-min", type=_finite_float, default=None, metavar="T", help="see --t-max")
    p.add_argument("--out", default=None,
                   help="output directory (default: diffsolve-out/<model>-<solver>-<steps>steps-latent-<hash of "
                        "the input and settings>)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help=DTYPE_HELP + ")")
    p.add_argument("-o", "--option", dest="options", action="append", type=_option, default=[], metavar="KEY=VALUE",
                   help="a solver option, repeatable")
    p.add_argument("--force", action="store_true", help="overwrite an existing latent in --out")
    p.add_argument("--no-progress", action="store_true", help="do not show a progress bar")

    p = sub.add_parser("restore", help="solve an inverse problem on held-out digits (inpainting, deblurring)",
                       description="Restore the first --num-samples held-out digits from a degraded measurement "
                                   "with DPS, EnKG or Inpaint (and, for comparison, unguided samples with the same "
                                   "seeds); writes restored.safetensors, restore.png (rows: degraded / restored / "
                                   "unguided / clean) and manifest.json (PSNR) into --out.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"an unconditional digit model (default: {DEFAULT_MODEL})")
    p.add_argument("--task", default="inpaint", choices=ds.guidance.tasks.TASKS,
                   help="inpaint: the top half known; deblur: Gaussian blur (std 1.5 px) + noise 0.05 "
                        "(default: inpaint)")
    p.add_argument("--method", default="dps", choices=[m for m in ds.guidance.tasks.METHODS if m != "none"],
                   help="default: dps")
    p.add_argument("--solver", default=None, help="default: ddim (dps, enkg) or ddpm (inpaint)")
    p.add_argument("--steps", type=_positive_int, default=50, help="number of steps (default: 50)")
    p.add_argument("--num-samples", type=_positive_int, default=16, help="digits to restore (default: 16)")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="base seed (default: 0)")
    p.add_argument("--out", default=None,
                   help="output directory (default: diffsolve-out/restore-<task>-<method>, plus -<hash> of any "
                        "other setting not at its default)")
    p.add_argument("-o", "--option", dest="options", action="append", type=_option, default=[], metavar="KEY=VALUE",
                   help="a method option, repeatable: zeta (dps, default 4), particles / guidance_scale "
                        "(enkg, default 16 / 2), resample (inpaint, default 1)")
    p.add_argument("--force", action="store_true", help="overwrite existing results in --out")
    p.add_argument("--no-progress", action="store_true", help="do not show a progress bar")

    p = sub.add_parser("bench", help="run the benchmarks: tables (Markdown, JSON) and plots",
                       description="Run the benchmarks side by side in one process and write their tables and "
                                   "plots: ode (accuracy against NFE, ours against diffusers' schedulers and "
                                   "k-diffusion), sde (quality against NFE), adaptive (error at equal NFE), "
                                   "overhead (time per step outside the model), inversion (round trips), reversible (reversible "
                                   "solvers against non-reversible ones at equal calls, on the digit models). "
                                   "--quick runs a reduced set in minutes on a CPU.")
    p.add_argument("--quick", action="store_true", help="the reduced benchmarks (default output benchmarks/quick)")
    p.add_argument("--only", default=None, metavar="NAMES",
                   help="comma-separated subset of: " + ", ".join(BENCH_NAMES))
    p.add_argument("--out", default=None, help="output folder (default benchmarks, or benchmarks/quick with --quick)")
    p.add_argument("--force", action="store_true", help="overwrite earlier results in the output folder")

    p = sub.add_parser("eval", help="digit sample quality: digits-FD and classifier confidence",
                       description="Score digit samples (what `diffsolve sample`, `sample --pipeline` and "
                                   "`restore` write: a folder, or its .safetensors file) with the shipped digit "
                                   "classifier: Frechet distance of its features to the 300 held-out digits "
                                   "(digits-FD) and mean confidence. digits-FD depends on the sample count: "
                                   "compare scores of equally many samples.")
    p.add_argument("samples", help="a folder holding samples.safetensors or restored.safetensors, or the file")
    p.add_argument("--tensor", default=None, metavar="NAME",
                   help="the tensor to score (default: samples, restored or images, whichever is there; "
                        "e.g. unguided or degraded in restore's output)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


# -------------------------------------------------------------------------------------- helpers

def _check_device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError) as e:
        raise CLIError(f"unknown device {name!r}: {e}") from None
    try:
        torch.empty(1, device=dev)
    except (RuntimeError, AssertionError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CLIError(f"device {name!r} is not usable here: {first}") from None
    return dev


def _option_classes() -> dict[str, type]:
    """The non-JSON solver option values the CLI writes as {"class": name, "init": {...}} and rebuilds."""
    return {"StepSizeController": ds.samplers.StepSizeController}


def _jsonable(v: Any) -> Any:
    """Strict-JSON version of ``v`` (non-finite floats become strings, tensors lists, the option objects of
    :func:`_option_classes` {"class": name, "init": their fields}, which :func:`_decode_option` rebuilds)."""
    if isinstance(v, tuple(_option_classes().values())):
        return {"class": type(v).__name__,
                "init": {f.name: _jsonable(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}}
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().tolist()
    elif isinstance(v, np.ndarray):
        v = v.tolist()
    elif isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (torch.dtype, torch.device)):
        return str(v)
    return repr(v)


def _decode_option(v: Any) -> Any:
    """A solver option value from its JSON form (:func:`_jsonable`): {"class", "init"} objects rebuilt,
    "inf" / "-inf" / "nan" as floats; older files' ``repr`` of an option object is parsed back too."""
    classes = _option_classes()
    if isinstance(v, dict) and set(v) == {"class", "init"} and isinstance(v["init"], dict):
        cls = classes.get(v["class"])
        if cls is None:
            raise CLIError(f"cannot rebuild an option of class {v['class']!r}; known: {', '.join(classes)}")
        try:
            return cls(**{k: _decode_option(x) for k, x in v["init"].items()})
        except (TypeError, ValueError) as e:
            raise CLIError(f"cannot rebuild {v['class']} from {v['init']}: {e}") from None
    if isinstance(v, dict):
        return {k: _decode_option(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_decode_option(x) for x in v]
    if isinstance(v, str):
        if v in ("inf", "-inf", "nan"):
            return float(v)
        rebuilt = _from_repr(v, classes)
        return v if rebuilt is None else rebuilt
    return v


def _from_repr(text: str, classes: dict[str, type]) -> Any:
    """``Name(key=value, ...)`` (a dataclass repr, as older manifests hold) as the object, else None."""
    name = text.partition("(")[0]
    if name not in classes or not text.endswith(")"):
        return None
    try:
        call = ast.parse(text, mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(call, ast.Call) or call.args:
        return None

    def value(node):
        if isinstance(node, ast.Name) and node.id in ("inf", "nan"):
            return float(node.id)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        return ast.literal_eval(node)

    try:
        return classes[name](**{kw.arg: value(kw.value) for kw in call.keywords})
    except (TypeError, ValueError):
        return None


def _decode_options(options: dict) -> dict:
    return {k: _decode_option(v) for k, v in options.items()}


def _non_default_options(solver: str, options: dict) -> dict:
    """The options of ``solver`` (as it resolves them) that differ from its defaults."""
    resolved, default = ds.get_solver(solver, **options).options(), ds.get_solver(solver).options()
    return {k: v for k, v in resolved.items() if _jsonable(v) != _jsonable(default.get(k))}


def _digest(value: Any) -> str:
    """A short hash of a JSON-able value."""
    return hashlib.sha256(json.dumps(_jsonable(value), sort_keys=True).encode()).hexdigest()[:8]


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _default_out(stem: str, settings: dict) -> Path:
    """diffsolve-out/<stem>, plus -<hash> of the settings that are not None (those at their defaults are
    left None, so the plain runs keep plain names)."""
    settings = {k: v for k, v in settings.items() if v is not None and v != {}}
    return Path("diffsolve-out") / (f"{stem}-{_digest(settings)}" if settings else stem)


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _given(args: argparse.Namespace) -> set[str]:
    """The options given on the command line or in --config (set by main; empty otherwise)."""
    return getattr(args, "given", set())


def _to_uint8(x: np.ndarray) -> np.ndarray:
    x = np.nan_to_num(x.astype(np.float64), nan=-1.0, posinf=1.0, neginf=-1.0)
    return np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


GRID_PER_ROW = 8
GRID_PAD = 2


def image_scale(h: int, w: int) -> int:
    """Nearest-neighbour upscaling factor so that small images are visible (8x8 -> 4x)."""
    return max(1, 32 // max(h, w))


def grid_columns(k: int, rows_per_sample: int = 1, least: int = GRID_PER_ROW) -> int:
    """Columns of a near-square picture of ``k`` samples (each ``rows_per_sample`` tiles tall, as in the
    restoration panels); at least ``least`` (or ``k``)."""
    return min(k, max(least, math.ceil(math.sqrt(k * rows_per_sample))))


def image_grid(samples: np.ndarray, per_row: int | None = None, pad: int = GRID_PAD,
               row_labels: Sequence[str] | None = None, blank: np.ndarray | None = None):
    """A PIL image of samples [K, C, H, W] (C in 1, 3) or [K, H, W], values in [-1, 1]: ``per_row`` a row
    (default: a near-square grid, at least 8 a row); ``row_labels`` name the rows in a left margin, in
    turn (rows of a restoration panel: degraded / restored / clean); tiles where ``blank`` is True are
    left empty."""
    from PIL import Image

    if samples.ndim == 3:
        samples = samples[:, None]
    k, c, h, w = samples.shape
    s = image_scale(h, w)
    imgs = _to_uint8(samples).transpose(0, 2, 3, 1)  # K, H, W, C
    imgs = imgs.repeat(s, axis=1).repeat(s, axis=2)
    th, tw = h * s, w * s
    cols = grid_columns(k) if per_row is None else min(per_row, k)
    rows = math.ceil(k / cols)
    canvas = np.full((rows * th + (rows + 1) * pad, cols * tw + (cols + 1) * pad, c), 64, dtype=np.uint8)
    for i in range(k):
        if blank is not None and blank[i]:
            continue
        r, q = divmod(i, cols)
        y, x = pad + r * (th + pad), pad + q * (tw + pad)
        canvas[y:y + th, x:x + tw] = imgs[i]
    image = Image.fromarray(np.ascontiguousarray(canvas[..., 0] if c == 1 else canvas))
    if row_labels:
        image = _label_rows(image, [row_labels[r % len(row_labels)] for r in range(rows)], th, pad)
    return image


def _label_rows(image, labels: Sequence[str], tile: int, pad: int):
    """``image`` with a left margin holding ``labels[r]`` beside tile row r, in Pillow's built-in bitmap
    font (no font file needed); without a usable font the image is returned as it is (the manifest
    names the rows too)."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default_imagefont() if hasattr(ImageFont, "load_default_imagefont") \
            else ImageFont.load_default()
        boxes = [ImageDraw.Draw(image).textbbox((0, 0), t, font=font) for t in labels]
    except (OSError, ImportError, AttributeError):
        return image
    margin = max(b[2] for b in boxes) + 3 * pad + 4
    out = Image.new(image.mode, (image.width + margin, image.height), 64 if image.mode == "L" else (64, 64, 64))
    out.paste(image, (margin, 0))
    draw = ImageDraw.Draw(out)
    white = 255 if image.mode == "L" else (255, 255, 255)
    for r, (text, box) in enumerate(zip(labels, boxes)):
        y = pad + r * (tile + pad) + (tile - (box[3] - box[1])) // 2 - box[1]
        draw.text((2 * pad + 2, y), text, fill=white, font=font)
    return out


def panel_image(rows: Sequence[tuple[str, torch.Tensor]]) -> tuple[Any, int]:
    """A near-square labelled picture of paired image rows (e.g. degraded / restored / clean): every
    band holds the next ``cols`` digits of each row. Returns (image, cols)."""
    k = len(rows[0][1])
    cols = grid_columns(k, len(rows))
    tiles, blank = [], []
    for i in range(0, k, cols):
        for _, x in rows:  # a short last band: its rows padded with blank tiles
            part = x[i:i + cols].detach().to("cpu", torch.float64)
            tiles += [part, part.new_zeros((cols - len(part), *part.shape[1:]))]
            blank += [False] * len(part) + [True] * (cols - len(part))
    image = image_grid(torch.cat(tiles).numpy(), per_row=cols, row_labels=[name for name, _ in rows],
                       blank=np.array(blank))
    return image, cols


SCATTER_SIZE = 512


def scatter_plot(points: np.ndarray, size: int = SCATTER_SIZE):
    """A PIL scatter plot of 2-D points [K, 2], with light axes and unit ticks."""
    from PIL import Image, ImageDraw

    pts = points.astype(np.float64)
    finite = pts[np.isfinite(pts).all(axis=1)]
    lim = float(np.abs(finite).max()) if len(finite) else 1.0
    lim = max(1.0, math.ceil(lim * 1.1 * 2) / 2)  # symmetric range, a multiple of 0.5
    margin = 16
    span = size - 2 * margin

    def px(x: float, y: float) -> tuple[float, float]:
        return margin + (x + lim) / (2 * lim) * span, margin + (lim - y) / (2 * lim) * span

    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img, "RGBA")
    light, tick = (225, 225, 225), (190, 190, 190)
    draw.rectangle([margin, margin, size - margin, size - margin], outline=light)
    x0, y0 = px(0.0, 0.0)
    draw.line([(margin, y0), (size - margin, y0)], fill=tick)
    draw.line([(x0, margin), (x0, size - margin)], fill=tick)
    for v in range(-int(lim), int(lim) + 1):
        if v == 0:
            continue
        tx, _ = px(v, 0.0)
        _, ty = px(0.0, v)
        draw.line([(tx, margin), (tx, size - margin)], fill=light + (120,))
        draw.line([(margin, ty), (size - margin, ty)], fill=light + (120,))
        draw.line([(tx, y0 - 4), (tx, y0 + 4)], fill=tick)
        draw.line([(x0 - 4, ty), (x0 + 4, ty)], fill=tick)
    r = 2.5 if len(finite) <= 2000 else 1.5
    for x, y in finite:
        cx, cy = px(x, y)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(31, 119, 180, 170))
    return img


def render_png(samples: torch.Tensor):
    """The picture of a batch: a scatter plot for 2-D points, an image grid for images; else None."""
    a = samples.detach().to("cpu", torch.float64).numpy()
    if a.ndim == 2 and a.shape[1] == 2:
        return scatter_plot(a)
    if a.ndim == 3 or (a.ndim == 4 and a.shape[1] in (1, 3)):
        return image_grid(a)
    return None


def _psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean PSNR (dB) over images in [-1, 1]."""
    return float(ds.metrics.psnr(x, ref).mean())


def _existing_outputs(out: Path, files: Sequence[str] = OUTPUT_FILES) -> list[str]:
    return [f for f in files if (out / f).exists()] if out.is_dir() else []


def _write_atomically(out: Path, write: Callable[[Path], list[str]]) -> list[str]:
    """Build the files in a temporary directory beside ``out``, then move each into ``out``."""
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    try:
        names = write(tmp)
        out.mkdir(exist_ok=True)
        for name in names:
            os.replace(tmp / name, out / name)
        return names
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -------------------------------------------------------------------------------------- commands

def _write_bundle(tmp: Path, names: Sequence[str], tensors: dict, image, manifest: dict,
                  metadata: dict | None = None) -> list[str]:
    """Write ``names`` = (tensors file, png, manifest) into ``tmp`` (the png only if ``image``), every
    file with the umask's mode."""
    from safetensors.torch import save_file

    tensor_file, png, manifest_file = names
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / tensor_file), metadata=metadata)
    written = [tensor_file]
    if image is not None:
        image.save(tmp / png, format="PNG")
        written.append(png)
    (tmp / manifest_file).write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
    written.append(manifest_file)
    _umask_mode(tmp, *written)
    return written


def _umask_mode(folder: Path, *names: str) -> None:
    """Give the files ``names`` in ``folder`` the mode of the last one, a text file written as the
    umask says (safetensors alone would create its file 0600)."""
    mode = (folder / names[-1]).stat().st_mode & 0o777
    for name in names[:-1]:
        os.chmod(folder / name, mode)


def cmd_solvers(args: argparse.Namespace) -> int:
    table = ds.list_solvers(args.family)
    print(table.markdown() if args.markdown else table)
    return 0


def _rank_device(name: str) -> str:
    """The device this process runs on: under torchrun with several processes, a CUDA device is the
    process's own GPU, cuda:LOCAL_RANK (chosen before the model is loaded onto it); else ``name``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return name
    try:
        cuda = torch.device(name).type == "cuda"
    except (RuntimeError, ValueError, TypeError):
        return name  # _check_device names the error
    return f"cuda:{int(os.environ.get('LOCAL_RANK', os.environ.get('RANK', '0')))}" if cuda else name


def _distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); under torchrun, joins the process group (gloo on CPU, nccl on CUDA, with
    ``device``, the process's GPU, made current first)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


SHARD_DIR = ".shards"


def _prepare_shards(shard_dir: Path, spec: dict, force: bool) -> int:
    """Create the shard folder with run.json, or resume one written by the same settings."""
    run_file = shard_dir / "run.json"
    if run_file.exists():
        try:
            old = json.loads(run_file.read_text())
        except json.JSONDecodeError:
            old = None
        if old == spec:
            return len(list(shard_dir.glob("shard-*.safetensors")))
        if not force:
            raise CLIError(f"{shard_dir.parent} holds an unfinished run with other settings; pass --force to "
                           "discard it, or choose another --out")
        shutil.rmtree(shard_dir)
    elif shard_dir.exists():
        shutil.rmtree(shard_dir)
    shard_dir.mkdir(parents=True)
    tmp = shard_dir / ".run.json.tmp"
    tmp.write_text(json.dumps(spec, indent=2) + "\n")
    os.replace(tmp, run_file)
    return 0


def _save_shard(path: Path, result) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    meta = {"nfe": str(int(result.nfe)), "wall_time": repr(float(result.wall_time)),
            "grid": json.dumps(_jsonable(result.grid)), "options": json.dumps(_jsonable(dict(result.options))),
            "solver": result.solver}
    save_file({"samples": result.samples.detach().cpu().contiguous(),
               "nfe_per_sample": torch.as_tensor(result.nfe_per_sample).cpu().contiguous()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def _load_shards(shard_dir: Path, n: int) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    from safetensors import safe_open

    samples, nfe, metas = [], [], []
    for j in range(n):
        with safe_open(str(shard_dir / f"shard-{j:05d}.safetensors"), framework="pt") as f:
            samples.append(f.get_tensor("samples"))
            nfe.append(f.get_tensor("nfe_per_sample"))
            metas.append(f.metadata())
    return torch.cat(samples), torch.cat(nfe), metas


def _adaptive(solver_name: str) -> bool:
    return not ds.samplers.solver_info(solver_name).fixed_grid


def _steps_label(steps: int | None) -> str:
    return "adaptive" if steps is None else f"{steps}steps"


def _run_steps(args: argparse.Namespace, solver_name: str) -> int | None:
    """The steps a run takes: ``args.steps``, or None for an adaptive solver (which chooses its own;
    a warning says so when --steps was given)."""
    if not _adaptive(solver_name):
        return args.steps
    if "steps" in _given(args):
        _warn(f"--steps is ignored: {solver_name} is adaptive and chooses its own steps from t_max to t_min")
    return None


def cmd_pipeline(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """`diffsolve sample --pipeline PATH`: driver mode on a local diffusers pipeline."""
    if args.latent is not None:
        raise CLIError("--latent does not apply with --pipeline (invert a pipeline's latents in Python with "
                       "ds.integrations.diffusers.invert_pipeline)")
    ignored = [n for n in ("model", "label", "shard_size", "compile") if n in _given(args)]
    if ignored:
        _warn(f"{_flags(ignored)} ignored: not used with --pipeline")
    from diffusers import DiffusionPipeline

    from diffsolve.integrations.diffusers import sample_pipeline

    options = _decode_options(dict(args.options))
    solver = args.solver or "dpmpp-2m"
    solver_name = ds.get_solver(solver, **options).name
    args.steps = DEFAULT_STEPS if args.steps is None else args.steps
    steps = _run_steps(args, solver_name)
    dtype = args.dtype or "float32"
    device = _check_device(args.device)
    path = Path(args.pipeline)
    if not (path / "model_index.json").exists():
        raise CLIError(f"--pipeline {args.pipeline!r} is not a diffusers pipeline folder (no model_index.json)")
    settings = {"pipeline": str(path.resolve()), "prompt": args.prompt, "guidance_scale": args.guidance_scale,
                "num_samples": None if args.num_samples == DEFAULT_NUM_SAMPLES else args.num_samples,
                "options": _non_default_options(solver_name, options), "dtype": None if dtype == "float32" else dtype,
                "grid": args.grid, "t_max": args.t_max, "t_min": args.t_min}
    out = Path(args.out) if args.out else \
        _default_out(f"{path.name}-{solver_name}-{_steps_label(steps)}-seed{args.seed}", settings)
    existing = _existing_outputs(out)
    if existing and not args.force:
        raise CLIError(f"{out} already holds {', '.join(existing)}; pass --force to overwrite, or choose another --out")
    pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True,
                                             torch_dtype=getattr(torch, dtype)).to(device)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator(device).manual_seed(args.seed + i) for i in range(args.num_samples)]
    kw = {"prompt": args.prompt} if args.prompt is not None else {}
    if args.guidance_scale is not None:
        kw["guidance_scale"] = args.guidance_scale
    res = sample_pipeline(pipe, solver, num_inference_steps=args.steps, num_images_per_prompt=args.num_samples,
                          generator=gens, output_type="np", progress=not args.no_progress, grid=args.grid,
                          t_max=args.t_max, t_min=args.t_min, **kw, **options)
    images = torch.from_numpy(np.asarray(res.images)).permute(0, 3, 1, 2).contiguous()
    manifest = {"pipeline": str(path), "pipeline_class": type(pipe).__name__, "prompt": args.prompt,
                "guidance_scale": args.guidance_scale, "solver": solver_name, "options": _jsonable(options),
                "steps": steps, "seed": args.seed, "num_samples": args.num_samples, "dtype": dtype,
                "grid_kind": _grid_kind(args.grid), "t_max": args.t_max, "t_min": args.t_min, "nfe": res.result.nfe,
                "wall_time": res.result.wall_time, "images": "in [0, 1], [N, C, H, W]",
                "command": shlex.join([PROG, *argv]),
                "versions": {"diffsolve": ds.__version__, "torch": torch.__version__}}
    image = image_grid((images * 2 - 1).numpy())
    tensors = {"images": images, "latents": res.latents.detach().float().cpu()}
    names = _write_atomically(out, lambda tmp: _write_bundle(tmp, OUTPUT_FILES, tensors, image, manifest))
    print(f"{solver_name}: {args.num_samples} images from {type(pipe).__name__} ({path.name}), NFE {res.result.nfe}, "
          f"{res.result.wall_time:.2f} s")
    print(f"wrote {', '.join(str(out / n) for n in names)}")
    return 0


def _grid_kind(grid) -> str:
    return grid if isinstance(grid, str) else ("explicit" if grid else "default")


def _latent_defaults(args: argparse.Namespace, latent: ds.Latent, meta: dict) -> None:
    """Fill in what --latent decides: its model, solver and dtype unless given; its sample count and
    steps always (with a warning where --steps / --num-samples were given)."""
    for name in ("t_max", "t_min"):
        if getattr(args, name) is not None:
            raise CLIError(f"{_flags([name])} does not apply with --latent: the latent's grid sets the time range "
                           f"({float(latent.grid[0]):.6g} to {float(latent.grid[-1]):.6g})")
    ignored = [n for n in ("steps", "num_samples") if n in _given(args)]
    if ignored:
        _warn(f"{_flags(ignored)} ignored: the latent sets the steps (its grid) and the number of samples")
    recorded = meta.get("model")
    if args.model is None:
        args.model = recorded or DEFAULT_MODEL
    elif recorded and args.model != recorded:
        _warn(f"the latent was made with --model {recorded}; sampling it with --model {args.model}")
    args.solver = args.solver or latent.solver
    args.dtype = args.dtype or meta.get("dtype") or "float32"
    args.num_samples, args.steps = latent.x.shape[0], len(latent.grid) - 1


def _after_failure(out: Path, shard_dir: Path, out_existed: bool) -> int:
    """A run stopped (an error, Ctrl-C): with no shard saved, remove its shard folder (and ``out`` if this
    run made it and it is empty), so that a corrected command is not refused. Returns the shards saved."""
    saved = len(list(shard_dir.glob("shard-*.safetensors"))) if shard_dir.is_dir() else 0
    if not saved:
        shutil.rmtree(shard_dir, ignore_errors=True)
        if not out_existed:
            try:
                out.rmdir()
            except OSError:
                pass
    return saved


def cmd_sample(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if args.pipeline is not None:
        return cmd_pipeline(args, argv)
    if args.prompt is not None:
        raise CLIError("--prompt needs --pipeline (a text-to-image diffusers pipeline folder)")
    options = _decode_options(dict(args.options))
    latent = latent_file = None
    if args.latent:
        latent, meta, latent_file = load_latent(args.latent)
        _latent_defaults(args, latent, meta)
        if ds.samplers.solver_info(args.solver).name == latent.solver:
            options = {**latent.options, **options}
    args.model = args.model or DEFAULT_MODEL
    args.solver = args.solver or "dpmpp-2m"
    args.dtype = args.dtype or "float32"
    args.steps = DEFAULT_STEPS if args.steps is None else args.steps
    # Validate the cheap things first: solver name and options, device, output directory.
    solver_name = ds.get_solver(args.solver, **options).name
    steps = (None if _adaptive(solver_name) else args.steps) if latent is not None else _run_steps(args, solver_name)
    device = _check_device(_rank_device(args.device))
    model_label = args.model if args.model in MODELS else Path(args.model).name
    settings = {"model_path": None if args.model in MODELS else str(Path(args.model).resolve()),
                "num_samples": None if latent is not None or args.num_samples == DEFAULT_NUM_SAMPLES else args.num_samples,
                "options": _non_default_options(solver_name, options),
                "dtype": None if args.dtype == "float32" else args.dtype, "grid": args.grid,
                "t_max": args.t_max, "t_min": args.t_min,
                "latent": None if latent_file is None else _file_digest(latent_file), "class": args.label,
                "guidance_scale": None if args.guidance_scale in (None, DEFAULT_GUIDANCE) else args.guidance_scale}
    out = Path(args.out) if args.out else \
        _default_out(f"{model_label}-{solver_name}-{_steps_label(steps)}-seed{args.seed}", settings)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {str(out)!r} exists and is not a directory")
    existing = _existing_outputs(out)
    if existing and not args.force:
        raise CLIError(f"{out} already holds {', '.join(existing)}; pass --force to overwrite, "
                       "or choose another --out")

    # the network lives where the samples are drawn, in their precision
    dtype = getattr(torch, args.dtype)
    target = (MODELS[args.model](device, dtype) if args.model in MODELS
              else _diffusers_folder(args.model, device, dtype))
    if latent is not None and tuple(latent.x.shape[1:]) != target.event_shape:
        raise CLIError(f"--latent {args.latent!r} holds samples of shape {tuple(latent.x.shape[1:])} (made with "
                       f"--model {meta.get('model', '?')}); --model {args.model} samples {target.event_shape}")
    if args.compile:
        target.model = target.model.compile()
    model, labels, uncond, scale = _class_conditioning(target, args)
    rank, world = _distributed(device)
    k = args.num_samples
    size = min(k, args.shard_size)
    n_shards = math.ceil(k / size)
    mu = clean = None
    if target.condition is not None:
        mu, clean = target.condition(k, args.seed)
    shard_dir = out / SHARD_DIR
    spec = {"model": args.model, "solver": solver_name, "options": _jsonable(options), "steps": steps,
            "latent": args.latent,
            "seed": args.seed, "num_samples": k, "shard_size": size, "grid": _jsonable(args.grid),
            "t_max": args.t_max, "t_min": args.t_min,
            "dtype": args.dtype, "device": device.type, "class": args.label, "guidance_scale": scale}
    out_existed = out.exists()
    if rank == 0:
        done = _prepare_shards(shard_dir, spec, args.force)
        if done:
            print(f"resuming {out}: {done} of {n_shards} shards already done")
    _barrier(world)

    try:
        for j in range(rank, n_shards, world):
            path = shard_dir / f"shard-{j:05d}.safetensors"
            if path.exists():
                continue
            lo, hi = j * size, min(k, (j + 1) * size)
            start = {"seed": [args.seed + i for i in range(lo, hi)]}
            if latent is not None:
                start["latent"] = dataclasses.replace(latent, x=latent.x[lo:hi].to(device), aux=None if latent.aux is None
                                                      else latent.aux[lo:hi].to(device))
            else:
                start.update(steps=steps, shape=(hi - lo, *target.event_shape), grid=args.grid, t_max=args.t_max,
                             t_min=args.t_min)
            if labels is not None:
                start["cond"], start["uncond"] = {"class_labels": labels[lo:hi].to(device)}, uncond
            result = ds.sample(model, args.solver, device=device, dtype=args.dtype, progress=not args.no_progress,
                               mu=None if mu is None else mu[lo:hi], **start, **options)
            _save_shard(path, result)
    except BaseException as e:
        if rank == 0:
            saved = _after_failure(out, shard_dir, out_existed)
            if isinstance(e, KeyboardInterrupt):
                raise KeyboardInterrupt(
                    f"{saved} of {n_shards} shards are saved in {shard_dir}; rerun the same command to resume" if saved
                    else "no shard was finished, nothing is saved") from None
        raise
    _barrier(world)
    if rank != 0:
        return 0

    samples, nfe_per_sample, metas = _load_shards(shard_dir, n_shards)
    nfe = max(int(m["nfe"]) for m in metas)
    wall = sum(float(m["wall_time"]) for m in metas)
    manifest = {
        "solver": solver_name,
        "options": json.loads(metas[0]["options"]),
        "model": args.model,
        "steps": steps,
        "seed": args.seed,
        "num_samples": k,
        "shape": list(samples.shape),
        "grid": json.loads(metas[0]["grid"]),
        "grid_kind": _grid_kind(args.grid),
        "t_max": args.t_max,
        "t_min": args.t_min,
        **({"latent": args.latent} if latent is not None else {}),
        "nfe": nfe,
        "nfe_total": int(nfe_per_sample.sum()),
        "wall_time": wall,
        "shards": n_shards,
        "shard_size": size,
        "world_size": world,
        "device": str(device),
        "dtype": args.dtype,
        **({"class": args.label if args.label is not None else "i mod num_classes",
            "guidance_scale": scale} if labels is not None else {}),
        "versions": {"diffsolve": ds.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "command": shlex.join([PROG, *argv]),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if mu is not None:  # restoration: labelled rows of degraded / restored / clean digits
        rows = [("degraded", mu), (f"restored ({solver_name})", samples), ("clean", clean)]
        image, cols = panel_image(rows)
        manifest["restoration"] = {"png_rows": [name for name, _ in rows], "png_columns": cols,
                                   "psnr_db": _psnr(samples, clean), "psnr_degraded_db": _psnr(mu, clean)}
    else:
        image = render_png(samples)

    def write(tmp: Path) -> list[str]:
        return _write_bundle(tmp, OUTPUT_FILES, {"samples": samples, "nfe_per_sample": nfe_per_sample}, image, manifest,
                             metadata={"solver": solver_name, "model": args.model, "steps": str(steps),
                                       "seed": str(args.seed), "dtype": args.dtype})

    # Re-check just before writing (another run may have written meanwhile).
    existing = _existing_outputs(out)
    if existing and not args.force:
        raise CLIError(f"{out} already holds {', '.join(existing)}; pass --force to overwrite, "
                       "or choose another --out")
    names = _write_atomically(out, write)
    shutil.rmtree(shard_dir, ignore_errors=True)

    how = f"in {steps} steps" if steps is not None else "(adaptive steps)"
    print(f"{solver_name}: {k} samples of {args.model} {how}, "
          f"NFE {nfe}, {wall:.2f} s ({device}, {args.dtype}, {n_shards} shard(s), {world} process(es))")
    print(f"wrote {', '.join(str(out / n) for n in names)}")
    if image is None:
        print(f"(no samples.png: samples of shape {tuple(samples.shape)} are neither 2-D points nor images)")
    return 0


def _class_conditioning(target: Target, args: argparse.Namespace):
    """(model to sample, per-sample labels or None, uncond inputs, guidance scale) from --class and
    --guidance-scale."""
    if target.classes is None:
        if args.label is not None or args.guidance_scale is not None:
            conditional = [n for n in ds.pretrained.SHIPPED if ds.pretrained.classes(n)]
            raise CLIError(f"--class and --guidance-scale need a class-conditional model ({', '.join(conditional)}); "
                           f"{args.model} is not one")
        return target.model, None, None, None
    n, null = target.classes["num_classes"], target.classes["null_class"]
    if args.label is not None and args.label >= n:
        raise CLIError(f"--class must be in 0..{n - 1}, got {args.label}")
    scale = DEFAULT_GUIDANCE if args.guidance_scale is None else args.guidance_scale
    if not math.isfinite(scale):
        raise CLIError(f"--guidance-scale must be a finite number, got {scale}")
    k = args.num_samples
    labels = torch.full((k,), args.label) if args.label is not None else torch.arange(k) % n
    uncond = {"class_labels": torch.tensor(null)}
    model = target.model if scale == 1 else ds.guidance.ClassifierFreeGuidance(target.model, scale)
    return model, labels, uncond, scale


RESTORE_FILES = ("restored.safetensors", "restore.png", "manifest.json")


def cmd_restore(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from diffsolve.data import digits16
    from diffsolve.guidance.tasks import DEFAULTS, inverse_problem, restore

    options = dict(args.options)
    if args.solver is not None:
        ds.get_solver(args.solver)
    defaults = getattr(args, "defaults", {})
    settings = {n: getattr(args, n) for n in ("model", "solver", "steps", "num_samples", "seed")
                if getattr(args, n) != defaults.get(n, getattr(args, n))}
    out = Path(args.out) if args.out else _default_out(f"restore-{args.task}-{args.method}", {**settings, "options": options})
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {str(out)!r} exists and is not a directory")
    existing = _existing_outputs(out, RESTORE_FILES)
    if existing and not args.force:
        raise CLIError(f"{out} already holds {', '.join(existing)}; pass --force to overwrite, or choose another --out")
    if args.model not in MODELS or args.model == "gmm-2d":
        raise CLIError(f"--model must be a digit model ({', '.join(n for n in MODELS if n != 'gmm-2d')}), got {args.model!r}")
    target = MODELS[args.model]()
    if target.condition is not None or target.classes is not None:
        raise CLIError(f"--model {args.model}: restore needs an unconditional digit model (e.g. digits-vp)")
    if args.method == "inpaint" and args.task != "inpaint":
        raise CLIError("--method inpaint works only with --task inpaint")
    clean = digits16("heldout")[0]
    if args.num_samples > len(clean):
        raise CLIError(f"--num-samples {args.num_samples}: there are only {len(clean)} held-out digits")
    clean = clean[: args.num_samples]
    if tuple(clean.shape[1:]) != target.event_shape:
        clean = torch.nn.functional.interpolate(clean, size=target.event_shape[1:], mode="bilinear",
                                                align_corners=False)
    prob = inverse_problem(args.task, clean, seed=args.seed)
    restored, res = restore(target.model, prob, args.method, steps=args.steps, solver=args.solver, seed=args.seed,
                            progress=not args.no_progress, **options)
    plain_solver = args.solver or DEFAULTS[args.method][0]
    plain, _ = restore(target.model, prob, "none", steps=args.steps, solver=plain_solver, seed=args.seed, progress=False)
    restored, plain = restored.clamp(-1, 1), plain.clamp(-1, 1)
    psnr = {"restored": _psnr(restored, clean), "unguided": _psnr(plain, clean), "degraded": _psnr(prob.display, clean)}
    rows = [("degraded", prob.display), (f"{args.method} ({res.solver})", restored),
            (f"unguided ({plain_solver})", plain), ("clean", clean)]
    image, cols = panel_image(rows)
    manifest = {"task": args.task, "method": args.method, "model": args.model, "solver": res.solver,
                "options": _jsonable(options), "steps": args.steps, "seed": args.seed, "num_samples": len(clean),
                "nfe": res.nfe, "wall_time": res.wall_time, "psnr_db": psnr,
                "png_rows": [name for name, _ in rows], "png_columns": cols,
                "command": shlex.join([PROG, *argv]),
                "versions": {"diffsolve": ds.__version__, "torch": torch.__version__}}

    tensors = {"restored": restored, "degraded": prob.display, "unguided": plain, "clean": clean}
    names = _write_atomically(out, lambda tmp: _write_bundle(tmp, RESTORE_FILES, tensors, image, manifest))
    print(f"{args.method} ({res.solver}, {args.steps} steps, NFE {res.nfe}): {args.task} of {len(clean)} held-out digits; "
          f"PSNR {psnr['restored']:.2f} dB (unguided {psnr['unguided']:.2f}, degraded {psnr['degraded']:.2f})")
    print(f"wrote {', '.join(str(out / n) for n in names)}")
    return 0


def load_latent(path: str) -> tuple[ds.Latent, dict, Path]:
    """A latent written by `diffsolve invert` or ``Latent.save`` (a latent.safetensors file or the folder
    holding it with its manifest.json), read by :meth:`ds.Latent.load`: (the latent, with its options
    and dtype; its manifest, with ``dtype`` by name; its tensors file). Latents from older versions
    load too: their option objects, saved in the CLI's JSON form or as a repr, are rebuilt, and a dtype
    saved by name becomes the torch dtype."""
    from safetensors import SafetensorError

    p = Path(path)
    p = p / LATENT_FILES[0] if p.is_dir() else p
    if not p.exists():
        raise CLIError(f"--latent {path!r}: no such file (expected {LATENT_FILES[0]} from `diffsolve invert`)")
    try:
        lat = ds.Latent.load(p)
        meta = json.loads((p.parent / LATENT_FILES[1]).read_text())
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise CLIError(f"--latent {path!r} is not a latent written by `diffsolve invert` or Latent.save "
                       f"({type(e).__name__}: {e})") from None
    dtype = lat.dtype
    if isinstance(dtype, str):  # older latents name it
        dtype = getattr(torch, dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise CLIError(f"--latent {path!r}: unknown dtype {lat.dtype!r}")
    lat = dataclasses.replace(lat, options=_decode_options(lat.options), dtype=dtype)
    meta["dtype"] = None if dtype is None else str(dtype).removeprefix("torch.")
    return lat, meta, p


def cmd_invert(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from safetensors import safe_open

    options = _decode_options(dict(args.options))
    solver = ds.get_solver(args.solver, **options)
    ds.samplers.check_invertible(solver)  # before any file is read or model loaded
    solver_name = solver.name
    steps = _run_steps(args, solver_name)
    src = Path(args.input)
    src = src / OUTPUT_FILES[0] if src.is_dir() else src
    if not src.exists():
        raise CLIError(f"--input {args.input!r}: no such file")
    with safe_open(str(src), framework="pt") as f:
        if "samples" not in set(f.keys()):
            raise CLIError(f"--input {args.input!r} holds no 'samples' tensor (write one with `diffsolve sample`)")
        x0, recorded = f.get_tensor("samples"), (f.metadata() or {}).get("model")
    args.model = args.model or recorded or DEFAULT_MODEL
    model_label = args.model if args.model in MODELS else Path(args.model).name
    settings = {"input": _file_digest(src), "model_path": None if args.model in MODELS else str(Path(args.model).resolve()),
                "options": _non_default_options(solver_name, options),
                "dtype": None if args.dtype == "float32" else args.dtype, "grid": args.grid,
                "t_max": args.t_max, "t_min": args.t_min}
    out = Path(args.out) if args.out else _default_out(f"{model_label}-{solver_name}-{_steps_label(steps)}-latent", settings)
    existing = _existing_outputs(out, LATENT_FILES)
    if existing and not args.force:
        raise CLIError(f"{out} already holds {', '.join(existing)}; pass --force to overwrite, or choose another --out")
    dtype = getattr(torch, args.dtype)
    cpu = torch.device("cpu")
    target = MODELS[args.model](cpu, dtype) if args.model in MODELS else _diffusers_folder(args.model, cpu, dtype)
    if target.condition is not None:
        raise CLIError(f"--model {args.model}: inverting a conditional (restoration) model is not supported here")
    if tuple(x0.shape[1:]) != target.event_shape:
        raise CLIError(f"--input {args.input!r} holds samples of shape {tuple(x0.shape[1:])} (made with --model "
                       f"{recorded or '?'}); --model {args.model} samples {target.event_shape}")
    x0 = x0.to(dtype)
    lat = ds.invert(target.model, args.solver, x0, steps, grid=args.grid, t_max=args.t_max, t_min=args.t_min,
                    progress=not args.no_progress, **options)
    # Latent.save writes the latent's own fields (x, aux, grid, solver, options, nfe, dtype); the rest
    # of the run goes into its manifest beside them
    extra = {"model": args.model, "input": str(src), "steps": steps, "grid_kind": _grid_kind(args.grid),
             "t_max": args.t_max, "t_min": args.t_min, "shape": list(lat.x.shape), "exact": lat.aux is not None,
             "command": shlex.join([PROG, *argv]), "versions": {"diffsolve": ds.__version__, "torch": torch.__version__}}

    def write(tmp: Path) -> list[str]:
        lat.save(tmp, manifest=extra)
        _umask_mode(tmp, LATENT_FILES[0], LATENT_FILES[1])
        return list(LATENT_FILES)

    names = _write_atomically(out, write)
    kind = "an exact latent (two states)" if lat.aux is not None else "a latent (approximate inversion)"
    how = f"in {steps} steps" if steps is not None else "(adaptive steps)"
    print(f"{lat.solver}: {kind} for {len(x0)} samples {how}, NFE {lat.nfe}")
    print(f"wrote {', '.join(str(out / n) for n in names)}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    names = list(BENCH_NAMES) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCH_NAMES]
    if unknown or not names:
        raise CLIError(f"--only: unknown benchmark(s) {unknown}; choose from {', '.join(BENCH_NAMES)}")
    out = Path(args.out) if args.out else bench.default_out(args.quick)
    if not args.force:
        existing = [p for n in names for p in bench.outputs(n, out) if p.exists()]
        if existing:
            raise CLIError(f"{len(existing)} result files exist already in {out} (e.g. {existing[0]}); "
                           "pass --force to overwrite them")
    if bench.pyplot() is None:
        _warn("matplotlib is not installed: the plots (.png) are left out, the tables are written "
              "(pip install matplotlib, then rerun with --force for the plots)")
    written: list[Path] = []
    for i, n in enumerate(names):
        try:
            written += bench.run([n], out, quick=args.quick, force=True)
        except KeyboardInterrupt:
            rest = ",".join(names[i:])
            again = " ".join(["diffsolve bench", *(["--quick"] if args.quick else []), "--only", rest,
                              *(["--out", str(out)] if args.out else []), *(["--force"] if args.force else [])])
            finished = f"{', '.join(names[:i])} finished (in {out}); " if i else ""
            raise KeyboardInterrupt(f"{finished}a rerun does not resume the benchmarks; run the rest with "
                                    f"`{again}`") from None
    for path in written:
        print(path)
    return 0


EVAL_FILES = ("samples.safetensors", "restored.safetensors")
EVAL_TENSORS = ("samples", "restored", "images")  # sample, restore, sample --pipeline (images in [0, 1])


def cmd_eval(args: argparse.Namespace) -> int:
    from safetensors.torch import load_file

    path = Path(args.samples)
    if path.is_dir():
        found = [path / n for n in EVAL_FILES if (path / n).exists()]
        if not found:
            raise CLIError(f"{path} holds none of {', '.join(EVAL_FILES)} (written by `diffsolve sample` and "
                           "`diffsolve restore`)")
        path = found[0]
    if not path.exists():
        raise CLIError(f"no samples at {path}")
    tensors = load_file(str(path))
    key = args.tensor or next((n for n in EVAL_TENSORS if n in tensors), None)
    if key not in tensors:
        raise CLIError(f"{path} holds {', '.join(sorted(tensors))}; choose one with --tensor"
                       if key else f"{path} holds none of {', '.join(EVAL_TENSORS)} (it has {', '.join(sorted(tensors))})")
    samples = tensors[key]
    if key == "images":
        samples = samples * 2 - 1
    res = ds.quality.evaluate(samples)
    if args.json:
        print(json.dumps({**res, "file": str(path), "tensor": key}, indent=2), flush=True)
    else:
        print(f"{path} [{key}]: {res['num_samples']} samples")
        print(f"digits-FD   {res['digits_fd']:.3f}   (vs held-out real digits; lower is better)")
        print(f"confidence  {res['confidence']:.3f}   (mean max class probability)")
        print(f"classes     {res['class_histogram']}", flush=True)
    print("note: digits-FD depends on the sample count (digits-vp, dpmpp-2m, 20 steps: 327 from 64 samples, 94 "
          "from 2048); compare scores of equally many samples (benchmarks/digits_fd.md uses 300)", file=sys.stderr)
    return 0


FLAG_NAMES = {"label": "class"}  # dests whose option is named otherwise


def _flags(names: Sequence[str]) -> str:
    return ", ".join("--" + FLAG_NAMES.get(n, n).replace("_", "-") for n in names)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def config_keys() -> dict[str, argparse.Action]:
    """The keys of a --config file: sample's long options with '_' for '-' (and 'options' for -o)."""
    keys = {}
    for action in _subcommands(build_parser())["sample"]._actions:
        long = next((o for o in action.option_strings if o.startswith("--")), None)
        if long is not None and long not in ("--help", "--config", "--option"):
            keys[long[2:].replace("-", "_")] = action
    return keys


def load_config(path: str) -> list[str]:
    """A YAML run configuration as command-line arguments (to be placed before the user's own)."""
    import yaml

    try:
        cfg = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise CLIError(f"cannot read --config {path!r}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise CLIError(f"--config {path!r} is not valid YAML: {e}") from None
    if not isinstance(cfg, dict):
        raise CLIError(f"--config {path!r} must hold a mapping of option names to values")
    keys = config_keys()
    allowed = [*keys, "options"]
    unknown = sorted(set(cfg) - set(allowed), key=str)
    if unknown:
        raise CLIError(f"--config {path!r}: unknown keys {unknown}; allowed: {', '.join(allowed)}")
    args: list[str] = []
    for key, value in cfg.items():
        flag = f"--{key.replace('_', '-')}"
        if key == "options":
            if not isinstance(value, dict):
                raise CLIError(f"--config {path!r}: 'options' must be a mapping of solver options")
            for k, v in value.items():
                args += ["-o", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
        elif keys[key].nargs == 0:  # a flag: true or false
            if not isinstance(value, bool):
                raise CLIError(f"--config {path!r}: {key} is a flag, give true or false (got {value!r})")
            args += [flag] if value else []
        elif value is None:
            continue
        elif key == "grid" and isinstance(value, list):
            args += ["--grid", ",".join(str(v) for v in value)]
        else:
            args += [flag, str(value)]
    return args


def _explicit(parser: argparse.ArgumentParser, argv: Sequence[str], command: str) -> tuple[set[str], dict]:
    """(the options given in ``argv``, the command's defaults): ``argv`` parsed again with no defaults."""
    defaults = {a.dest: a.default for a in _subcommands(parser)[command]._actions}
    bare = build_parser()
    for action in _subcommands(bare)[command]._actions:
        action.default = argparse.SUPPRESS
    return set(vars(bare.parse_args(argv))) - {"command"}, defaults


def _user_error(e: BaseException) -> bool:
    """Whether ``e`` is a deliberate check (a ``raise`` statement in diffsolve's own code, or a missing
    file) rather than a bug (an error inside an expression, or raised by another library)."""
    if isinstance(e, FileNotFoundError):
        return True
    frames = traceback.extract_tb(e.__traceback__)
    if not frames:
        return True
    last = frames[-1]
    try:
        ours = Path(last.filename).resolve().is_relative_to(Path(ds.__file__).resolve().parent)
    except (OSError, ValueError):
        ours = False
    return ours and (last.line or "").lstrip().startswith("raise")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "config", None):
            # the config's values go first, so flags given on the command line override them
            cfg_args = load_config(args.config)
            argv = [argv[0], *cfg_args, *argv[1:]]
            args = parser.parse_args(argv)
        if args.command is not None:
            args.given, args.defaults = _explicit(parser, argv, args.command)
    except SystemExit as e:  # argparse: --help, --version, usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except CLIError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        if args.command == "solvers":
            return cmd_solvers(args)
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "bench":
            return cmd_bench(args)
        if args.command == "invert":
            return cmd_invert(args, argv)
        if args.command == "restore":
            return cmd_restore(args, argv)
        return cmd_sample(args, argv)
    except CLIError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError) as e:
        if not _user_error(e):  # a bug: not a usage error, keep the traceback
            print(f"{PROG}: internal error (a bug in diffsolve or a library it calls; please report it with "
                  "the traceback below)", file=sys.stderr)
            raise
        hint = " (on the command line: --t-max / --t-min)" if "t_max" in str(e) or "t_min" in str(e) else ""
        print(f"{PROG}: error: {e}{hint}", file=sys.stderr)
        return 2
    except ds.models.NonFiniteError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(f"{PROG}: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
