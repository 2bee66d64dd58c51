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

The package, by concern: :mod:`.main` (entry point, exit codes), :mod:`.parser` (arguments),
:mod:`.config` (``-o key=value``, ``--config`` files), :mod:`.errors` (usage errors and where the
library's errors become them), :mod:`.models` (the model catalogue), :mod:`.commands` (one module a
subcommand), :mod:`.output` (atomic output bundles, the one refusal to overwrite without --force),
:mod:`.shards` (sharded and distributed runs), :mod:`.devices`, :mod:`.render` (pictures) and
:mod:`.jsonform` (JSON forms of options, folder-name hashes).
"""

from __future__ import annotations

from .commands.latent import load_latent
from .commands.sample import class_conditioning
from .config import config_keys, load_config, parse_option
from .devices import check_device, rank_device
from .errors import PROG, CLIError, refusals_of, user_input
from .jsonform import decode_option, decode_options, jsonable
from .main import main
from .models import DEFAULT_MODEL, MODELS, Target
from .output import LATENT_FILES, OUTPUT_FILES, RESTORE_FILES, check_out, write_atomically
from .parser import BENCH_NAMES, DEFAULT_GUIDANCE, DEFAULT_NUM_SAMPLES, DEFAULT_STEPS, DTYPES, build_parser
from .render import (
    GRID_PAD,
    GRID_PER_ROW,
    SCATTER_SIZE,
    grid_columns,
    image_grid,
    image_scale,
    panel_image,
    render_png,
    scatter_plot,
)
from .shards import SHARD_DIR

# The names of the single-module CLI, which tests and scripts use. The sample and pipeline commands
# look _check_device up here at each call, so replacing diffsolve.cli._check_device takes effect.
_option = parse_option
_jsonable = jsonable
_decode_option = decode_option
_decode_options = decode_options
_check_device = check_device
_rank_device = rank_device

__all__ = [
    "BENCH_NAMES",
    "DEFAULT_GUIDANCE",
    "DEFAULT_MODEL",
    "DEFAULT_NUM_SAMPLES",
    "DEFAULT_STEPS",
    "DTYPES",
    "GRID_PAD",
    "GRID_PER_ROW",
    "LATENT_FILES",
    "MODELS",
    "OUTPUT_FILES",
    "PROG",
    "RESTORE_FILES",
    "SCATTER_SIZE",
    "SHARD_DIR",
    "CLIError",
    "Target",
    "build_parser",
    "check_device",
    "check_out",
    "class_conditioning",
    "config_keys",
    "grid_columns",
    "image_grid",
    "image_scale",
    "load_config",
    "load_latent",
    "main",
    "panel_image",
    "rank_device",
    "refusals_of",
    "render_png",
    "scatter_plot",
    "user_input",
    "write_atomically",
]
