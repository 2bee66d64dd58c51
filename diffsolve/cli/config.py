"""Settings from text: ``-o key=value`` solver options (values parsed as YAML) and ``--config`` run
files, whose keys are sample's long options (turned into the arguments they stand for)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .errors import CLIError


def parse_option(text: str) -> tuple[str, Any]:
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


def config_keys() -> dict[str, argparse.Action]:
    """The keys of a --config file: sample's long options with '_' for '-' (and 'options' for -o)."""
    from .parser import build_parser, subcommands

    keys = {}
    for action in subcommands(build_parser())["sample"]._actions:
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
        elif key == "grid" and isinstance(value, list) and len(value) == 2 and isinstance(value[1], dict):
            kind, params = value  # [kind, {parameters}]
            args += ["--grid", ":".join([str(kind), *(f"{k}={json.dumps(v)}" for k, v in params.items())])]
        elif key == "grid" and isinstance(value, list):
            args += ["--grid", ",".join(str(v) for v in value)]
        else:
            args += [flag, str(value)]
    return args
