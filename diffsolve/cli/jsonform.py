"""The JSON forms the command line writes into manifests, latents and shards: strict JSON of any
value (:func:`jsonable`), solver options rebuilt from it (:func:`decode_option`), and the short
hashes that name default output folders."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

import diffsolve as ds

from .errors import CLIError


def option_classes() -> dict[str, type]:
    """The non-JSON solver option values the CLI writes as {"class": name, "init": {...}} and rebuilds."""
    return {"StepSizeController": ds.samplers.StepSizeController}


def jsonable(v: Any) -> Any:
    """Strict-JSON version of ``v`` (non-finite floats become strings, tensors lists, the option objects of
    :func:`option_classes` {"class": name, "init": their fields}, which :func:`decode_option` rebuilds)."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type) and isinstance(v, tuple(option_classes().values())):
        return {
            "class": type(v).__name__,
            "init": {f.name: jsonable(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init},
        }
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
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, (torch.dtype, torch.device)):
        return str(v)
    return repr(v)


def decode_option(v: Any) -> Any:
    """A solver option value from its JSON form (:func:`jsonable`): {"class", "init"} objects rebuilt,
    "inf" / "-inf" / "nan" as floats; older files' ``repr`` of an option object is parsed back too."""
    classes = option_classes()
    if isinstance(v, dict) and set(v) == {"class", "init"} and isinstance(v["init"], dict):
        cls = classes.get(v["class"])
        if cls is None:
            raise CLIError(f"cannot rebuild an option of class {v['class']!r}; known: {', '.join(classes)}")
        try:
            return cls(**{k: decode_option(x) for k, x in v["init"].items()})
        except (TypeError, ValueError) as e:
            raise CLIError(f"cannot rebuild {v['class']} from {v['init']}: {e}") from None
    if isinstance(v, dict):
        return {k: decode_option(x) for k, x in v.items()}
    if isinstance(v, list):
        return [decode_option(x) for x in v]
    if isinstance(v, str):
        if v in ("inf", "-inf", "nan"):
            return float(v)
        rebuilt = from_repr(v, classes)
        return v if rebuilt is None else rebuilt
    return v


def from_repr(text: str, classes: dict[str, type]) -> Any:
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

    def value(node: ast.expr) -> Any:
        if isinstance(node, ast.Name) and node.id in ("inf", "nan"):
            return float(node.id)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        return ast.literal_eval(node)

    try:
        return classes[name](**{kw.arg: value(kw.value) for kw in call.keywords if kw.arg is not None})
    except (TypeError, ValueError):
        return None


def decode_options(options: dict) -> dict:
    """Every value of ``options`` from its JSON form (:func:`decode_option`)."""
    return {k: decode_option(v) for k, v in options.items()}


def digest(value: Any) -> str:
    """A short hash of a JSON-able value."""
    return hashlib.sha256(json.dumps(jsonable(value), sort_keys=True).encode()).hexdigest()[:8]


def file_digest(path: Path) -> str:
    """A short hash of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]
