"""The ``diffsolve`` command line.

    diffsolve solvers [--markdown] [--family FAMILY]
    diffsolve sample [--model gmm-2d|digits-oracle] [--solver NAME] [--steps N] [--seed S]
                     [--num-samples K] [--out DIR] [--device DEV] [--dtype float32|float64]
                     [--grid KIND] [-o key=value ...] [--force] [--no-progress]
    diffsolve --version

``sample`` writes ``samples.safetensors``, ``samples.png`` and ``manifest.json`` into the output
directory, atomically, and never overwrites earlier results unless ``--force`` is given.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

import diffsolve as ds

PROG = "diffsolve"
OUTPUT_FILES = ("samples.safetensors", "samples.png", "manifest.json")
DTYPES = ("float32", "float64")


class CLIError(Exception):
    """A user error: printed as ``diffsolve: error: <message>``, exit code 2."""


# ---------------------------------------------------------------------------------------- models
# name -> builder returning (model, event shape of one sample). Add new models here.

def _gmm_2d():
    return ds.models.GaussianMixture.gmm_2d().model(ds.schedules.VPLinear()), (2,)


def _digits_oracle():
    return ds.models.Empirical.digits().model(ds.schedules.VPLinear()), (1, 8, 8)


def _shipped(name: str):
    return lambda: (ds.pretrained.load(name), ds.pretrained.SHIPPED[name])


MODELS: dict[str, Callable[[], tuple[Any, tuple[int, ...]]]] = {
    **{name: _shipped(name) for name in ds.pretrained.SHIPPED},
    "gmm-2d": _gmm_2d,
    "digits-oracle": _digits_oracle,
}
DEFAULT_MODEL = "digits-vp"


# ------------------------------------------------------------------------------------ arguments

def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {v}")
    return v


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
    p.add_argument("--model", default=DEFAULT_MODEL, choices=list(MODELS), help=f"default: {DEFAULT_MODEL}")
    p.add_argument("--solver", default="heun", help="a registered solver name (see `diffsolve solvers`); default: heun")
    p.add_argument("--steps", type=_positive_int, default=20, help="number of steps (default: 20)")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="base seed; sample i uses seed + i (default: 0)")
    p.add_argument("--num-samples", type=_positive_int, default=64, help="number of samples (default: 64)")
    p.add_argument("--out", default=None,
                   help="output directory (default: diffsolve-out/<model>-<solver>-<steps>steps-seed<seed>)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, mps, ... (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="default: float32")
    p.add_argument("--grid", type=_grid, default=None,
                   help=f"time grid: {', '.join(ds.schedules.GRID_KINDS)}, or comma-separated descending times "
                        "(default: the schedule's)")
    p.add_argument("-o", "--option", dest="options", action="append", type=_option, default=[], metavar="KEY=VALUE",
                   help="a solver option, value parsed as YAML (repeatable), e.g. -o s_churn=10")
    p.add_argument("--force", action="store_true", help="overwrite existing results in --out")
    p.add_argument("--no-progress", action="store_true", help="do not show a progress bar")

    p = sub.add_parser("eval", help="digit sample quality: digits-FD and classifier confidence",
                       description="Score digit samples (a samples.safetensors file, or a folder holding one) "
                                   "with the shipped digit classifier: Frechet distance of its features to "
                                   "the held-out digits (digits-FD) and mean confidence.")
    p.add_argument("samples", help="samples.safetensors, or a directory containing it")
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


def _jsonable(v: Any) -> Any:
    """Strict-JSON version of ``v`` (non-finite floats become strings, tensors lists)."""
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


def _to_uint8(x: np.ndarray) -> np.ndarray:
    x = np.nan_to_num(x.astype(np.float64), nan=-1.0, posinf=1.0, neginf=-1.0)
    return np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


GRID_PER_ROW = 8
GRID_PAD = 2


def image_scale(h: int, w: int) -> int:
    """Nearest-neighbour upscaling factor so that small images are visible (8x8 -> 4x)."""
    return max(1, 32 // max(h, w))


def image_grid(samples: np.ndarray, per_row: int = GRID_PER_ROW, pad: int = GRID_PAD):
    """A PIL image of samples [K, C, H, W] (C in 1, 3) or [K, H, W], values in [-1, 1]."""
    from PIL import Image

    if samples.ndim == 3:
        samples = samples[:, None]
    k, c, h, w = samples.shape
    s = image_scale(h, w)
    imgs = _to_uint8(samples).transpose(0, 2, 3, 1)  # K, H, W, C
    imgs = imgs.repeat(s, axis=1).repeat(s, axis=2)
    th, tw = h * s, w * s
    cols = min(per_row, k)
    rows = math.ceil(k / cols)
    canvas = np.full((rows * th + (rows + 1) * pad, cols * tw + (cols + 1) * pad, c), 64, dtype=np.uint8)
    for i in range(k):
        r, q = divmod(i, cols)
        y, x = pad + r * (th + pad), pad + q * (tw + pad)
        canvas[y:y + th, x:x + tw] = imgs[i]
    return Image.fromarray(np.ascontiguousarray(canvas[..., 0] if c == 1 else canvas))


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


def _existing_outputs(out: Path) -> list[str]:
    return [f for f in OUTPUT_FILES if (out / f).exists()] if out.is_dir() else []


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

def cmd_solvers(args: argparse.Namespace) -> int:
    table = ds.list_solvers(args.family)
    print(table.markdown() if args.markdown else table)
    return 0


def cmd_sample(args: argparse.Namespace, argv: Sequence[str]) -> int:
    options = dict(args.options)
    # Validate the cheap things first: solver name and options, device, output directory.
    solver_name = ds.get_solver(args.solver, **options).name
    device = _check_device(args.device)
    out = Path(args.out) if args.out else \
        Path("diffsolve-out") / f"{args.model}-{solver_name}-{args.steps}steps-seed{args.seed}"
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {str(out)!r} exists and is not a directory")
    existing = _existing_outputs(out)
    if existing and not args.force:
        raise CLIError(f"{out} already holds {', '.join(existing)}; pass --force to overwrite, "
                       "or choose another --out")

    model, event_shape = MODELS[args.model]()
    shape = (args.num_samples, *event_shape)
    result = ds.sample(model, args.solver, args.steps, shape=shape, seed=args.seed, grid=args.grid,
                       device=device, dtype=args.dtype, progress=not args.no_progress, **options)

    samples = result.samples.detach().cpu().contiguous()
    nfe_per_sample = torch.as_tensor(result.nfe_per_sample).detach().cpu().contiguous()
    manifest = {
        "solver": result.solver,
        "options": _jsonable(dict(result.options)),
        "model": args.model,
        "steps": args.steps,
        "seed": args.seed,
        "seeds": len(result.seeds) if result.seeds is not None else None,
        "num_samples": args.num_samples,
        "shape": list(samples.shape),
        "grid": _jsonable(result.grid) if result.grid is not None else None,
        "grid_kind": args.grid if isinstance(args.grid, str) else ("explicit" if args.grid else "default"),
        "nfe": int(result.nfe),
        "wall_time": float(result.wall_time),
        "device": str(device),
        "dtype": args.dtype,
        "versions": {"diffsolve": ds.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "command": shlex.join([PROG, *argv]),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    image = render_png(samples)

    def write(tmp: Path) -> list[str]:
        from safetensors.torch import save_file

        names = ["samples.safetensors"]
        save_file({"samples": samples, "nfe_per_sample": nfe_per_sample}, str(tmp / "samples.safetensors"),
                  metadata={"solver": result.solver, "model": args.model, "steps": str(args.steps),
                            "seed": str(args.seed)})
        if image is not None:
            image.save(tmp / "samples.png", format="PNG")
            names.append("samples.png")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
        names.append("manifest.json")
        # safetensors creates its file with mode 0600; give every file the umask's mode (as the
        # manifest, written by Python, has).
        mode = (tmp / "manifest.json").stat().st_mode & 0o777
        for name in names:
            os.chmod(tmp / name, mode)
        return names

    # Re-check just before writing (another run may have written meanwhile).
    existing = _existing_outputs(out)
    if existing and not args.force:
        raise CLIError(f"{out} already holds {', '.join(existing)}; pass --force to overwrite, "
                       "or choose another --out")
    names = _write_atomically(out, write)

    print(f"{result.solver}: {args.num_samples} samples of {args.model} in {args.steps} steps, "
          f"NFE {result.nfe}, {result.wall_time:.2f} s ({device}, {args.dtype})")
    print(f"wrote {', '.join(str(out / n) for n in names)}")
    if image is None:
        print(f"(no samples.png: samples of shape {tuple(samples.shape)} are neither 2-D points nor images)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from safetensors.torch import load_file

    path = Path(args.samples)
    if path.is_dir():
        path = path / "samples.safetensors"
    if not path.exists():
        raise CLIError(f"no samples at {path}")
    samples = load_file(str(path)).get("samples")
    if samples is None:
        raise CLIError(f"{path} holds no tensor named 'samples'")
    res = ds.quality.evaluate(samples)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{path}: {res['num_samples']} samples")
        print(f"digits-FD   {res['digits_fd']:.3f}   (vs held-out real digits; lower is better)")
        print(f"confidence  {res['confidence']:.3f}   (mean max class probability)")
        print(f"classes     {res['class_histogram']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help, --version, usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        if args.command == "solvers":
            return cmd_solvers(args)
        if args.command == "eval":
            return cmd_eval(args)
        return cmd_sample(args, argv)
    except (CLIError, ValueError, TypeError, FileNotFoundError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except ds.models.NonFiniteError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
