"""What a sampling run returns, and how it is saved: tensors in safetensors, the rest in JSON.

``SampleResult.save(folder)`` writes ``samples.safetensors`` and ``manifest.json`` (the files
``diffsolve sample`` writes), ``Latent.save(folder)`` writes ``latent.safetensors`` and
``manifest.json`` (those of ``diffsolve invert``); ``load`` reads them back, from the folder or its
tensors file. In the manifest a tensor is ``{"$tensor": name}`` (its name in the tensors file), a
non-finite float ``{"$float": "inf"}``, a tuple ``{"$tuple": [...]}``, a dtype ``{"$dtype":
"float64"}``, and a solver option that is one of the :data:`SAVABLE` objects (a
``StepSizeController``, a ``ReNoise`` ...) ``{"$object": "<module>.<class>", "kwargs": {...}}``,
rebuilt from its class and init arguments on load.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

Tensor = torch.Tensor

MANIFEST = "manifest.json"

#: objects that may be saved as solver options: their class (by module path) and init arguments
SAVABLE = (
    "diffsolve.core.control.StepSizeController",
    "diffsolve.core.renoise.ReNoise",
    "diffsolve.solvers.mcmc.dmcmc.DenoiserNoiseLevel",
)
#: where files written before the core / solvers split name those classes
MOVED = {
    "diffsolve.samplers.control.StepSizeController": SAVABLE[0],
    "diffsolve.samplers.renoise.ReNoise": SAVABLE[1],
    "diffsolve.samplers.dmcmc.DenoiserNoiseLevel": SAVABLE[2],
}


def _init_kwargs(obj) -> dict:
    """The arguments that rebuild ``obj``: a dataclass's init fields, else its attributes."""
    if dataclasses.is_dataclass(obj):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}
    return dict(vars(obj))


def _encode(v: Any, tensors: dict[str, Tensor], key: str, strict: bool) -> Any:
    """``v`` as JSON, its tensors moved into ``tensors`` (named after ``key``, the path to ``v``). An
    object that is neither JSON, a tensor nor :data:`SAVABLE` is refused (TypeError naming ``key``)
    when ``strict``, else kept as its repr (a string on load)."""
    if isinstance(v, Tensor):
        t = v.detach().cpu().contiguous()
        if any(t.untyped_storage().data_ptr() == u.untyped_storage().data_ptr() for u in tensors.values()):
            t = t.clone()  # safetensors refuses tensors that share memory
        tensors[key] = t
        return {"$tensor": key}
    if isinstance(v, np.generic):
        v = v.item()
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"$float": repr(v)}
    if isinstance(v, torch.dtype):
        return {"$dtype": str(v).removeprefix("torch.")}
    if isinstance(v, (list, tuple)):
        items = [_encode(x, tensors, f"{key}.{i}", strict) for i, x in enumerate(v)]
        return items if isinstance(v, list) else {"$tuple": items}
    if isinstance(v, Mapping) and all(isinstance(k, str) for k in v):
        d = {k: _encode(x, tensors, f"{key}.{k}", strict) for k, x in v.items()}
        return {"$dict": d} if any(k.startswith("$") for k in d) else d
    path = f"{type(v).__module__}.{type(v).__qualname__}"
    if path in SAVABLE:
        return {"$object": path, "kwargs": _encode(_init_kwargs(v), tensors, f"{key}.kwargs", strict)}
    if strict:
        raise TypeError(
            f"{key}: a {type(v).__name__} cannot be saved; allowed: JSON values, tensors and the "
            f"objects {', '.join(p.rsplit('.', 1)[1] for p in SAVABLE)}"
        )
    return {"$repr": repr(v)}


def _decode(v: Any, tensors: Mapping[str, Tensor]) -> Any:
    """The inverse of :func:`_encode`."""
    if isinstance(v, list):
        return [_decode(x, tensors) for x in v]
    if not isinstance(v, dict):
        return v
    if "$tensor" in v:
        return tensors[v["$tensor"]]
    if "$float" in v:
        return float(v["$float"])
    if "$dtype" in v:
        dtype = getattr(torch, v["$dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"the manifest names an unknown dtype {v['$dtype']!r}")
        return dtype
    if "$tuple" in v:
        return tuple(_decode(x, tensors) for x in v["$tuple"])
    if "$repr" in v:
        return v["$repr"]
    if "$object" in v:
        path = MOVED.get(v["$object"], v["$object"])
        if path not in SAVABLE:
            raise ValueError(f"the manifest holds an object of class {path!r}; only {', '.join(SAVABLE)} are loaded")
        module, name = path.rsplit(".", 1)
        return getattr(importlib.import_module(module), name)(**_decode(v["kwargs"], tensors))
    d = v.get("$dict", v)
    return {k: _decode(x, tensors) for k, x in d.items()}


def _save(obj, folder, tensor_file: str, strict: bool, extra: Mapping[str, Any] | None) -> Path:
    """Write the dataclass ``obj`` into ``folder``: its tensors to ``tensor_file``, the rest (and
    ``extra``) to the manifest. Returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.suffix == ".safetensors":
        raise ValueError(
            f"path: save takes a folder (it writes {tensor_file} and {MANIFEST} into it), got {str(folder)!r}"
        )
    tensors: dict[str, Tensor] = {}
    meta = {f.name: _encode(getattr(obj, f.name), tensors, f.name, strict) for f in dataclasses.fields(obj)}
    own = {"format", "version", "tensors", *meta}
    if extra is not None and own & set(extra):
        raise ValueError(
            f"manifest: the entries {sorted(own & set(extra))} are the saved object's own; name yours otherwise"
        )
    manifest = {
        "format": f"diffsolve.{type(obj).__name__}",
        "version": 1,
        **meta,
        "tensors": {
            k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for k, t in tensors.items()
        },
        **_encode(dict(extra or {}), tensors, "manifest", True),
    }
    header = {"format": manifest["format"], "solver": str(getattr(obj, "solver", ""))}
    header.update(_header(obj, meta))
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / tensor_file), metadata=header)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
    return folder


def _header(obj, meta: dict) -> dict[str, str]:
    """The tensors file's metadata beyond format and solver: a latent's options and nfe as
    ``diffsolve invert`` writes them (its ``--latent`` reader takes them from there)."""
    if isinstance(obj, Latent):
        return {"options": json.dumps(meta["options"]), "nfe": str(obj.nfe)}
    return {}


def _load(cls, path, tensor_file: str) -> dict[str, Any]:
    """The fields of a ``cls`` saved in ``path`` (its folder, or the tensors file in it): tensors from
    the tensors file, the rest from the manifest. Files that ``diffsolve sample`` / ``invert`` wrote
    load too (their tensors named as the fields, the rest in their manifests)."""
    from safetensors.torch import load_file

    p = Path(path)
    folder, file = (p.parent, p) if p.suffix == ".safetensors" else (p, p / tensor_file)
    meta = json.loads((folder / MANIFEST).read_text()) if (folder / MANIFEST).exists() else {}
    fmt = meta.get("format", f"diffsolve.{cls.__name__}")
    if fmt != f"diffsolve.{cls.__name__}":
        raise ValueError(f"path: {str(path)!r} holds a {fmt.removeprefix('diffsolve.')}, not a {cls.__name__}")
    if not file.exists() or not meta:
        raise FileNotFoundError(f"path: {str(path)!r} holds no saved {cls.__name__} ({tensor_file} and {MANIFEST})")
    tensors = load_file(str(file))
    names = {f.name for f in dataclasses.fields(cls)}
    fields = {k: _decode(v, tensors) for k, v in meta.items() if k in names}
    fields.update({k: t for k, t in tensors.items() if k in names and k not in fields})
    return fields


@dataclass
class SampleResult:
    """The samples of one run and what it cost.

    ``nfe`` counts network calls (a call on any number of rows counts once); ``nfe_per_sample``
    counts, for each sample, the calls that evaluated its row. ``accepted``/``rejected`` are
    per-sample step counts for adaptive solvers (None otherwise); ``stats`` holds whatever else a
    solver reports (e.g. dmcmc's per-sample start times). ``trajectory`` (on request) lists
    the (t, x) of every model query.
    """

    samples: Tensor
    nfe: int
    nfe_per_sample: Tensor
    grid: Tensor | None
    wall_time: float
    solver: str
    options: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] | None = None
    accepted: Tensor | None = None
    rejected: Tensor | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    trajectory: list[tuple[Any, Tensor]] | None = None

    def __repr__(self) -> str:
        return (
            f"SampleResult(samples={tuple(self.samples.shape)} {self.samples.dtype}, nfe={self.nfe}, "
            f"solver={self.solver!r}, wall_time={self.wall_time:.3f}s)"
        )

    TENSORS = "samples.safetensors"

    def save(self, path: str | Path, manifest: Mapping[str, Any] | None = None) -> Path:
        """Write this result into the folder ``path`` (made if missing; the two files are overwritten):
        ``samples.safetensors`` holds its tensors (``samples``, ``nfe_per_sample``, ``grid``, and any
        in ``accepted`` / ``rejected`` / ``stats`` / ``trajectory``), ``manifest.json`` the rest, as
        ``diffsolve sample`` writes them. ``manifest`` adds entries of your own (e.g. the model's
        name). A solver option that is neither JSON, a tensor nor a :data:`SAVABLE` object is kept as
        its repr. Returns the folder; :meth:`load` reads it back."""
        return _save(self, path, self.TENSORS, strict=False, extra=manifest)

    @classmethod
    def load(cls, path: str | Path) -> SampleResult:
        """A result saved by :meth:`save` (or written by ``diffsolve sample``), from its folder or its
        ``samples.safetensors``. Tensors load on the CPU."""
        f = _load(cls, path, cls.TENSORS)
        grid = f.get("grid")
        seeds = f.get("seeds")
        return cls(
            samples=f["samples"],
            nfe=int(f.get("nfe", 0)),
            nfe_per_sample=f["nfe_per_sample"],
            grid=None if grid is None else torch.as_tensor(grid, dtype=torch.float64),
            wall_time=float(f.get("wall_time", 0.0)),
            solver=f.get("solver", ""),
            options=f.get("options") or {},
            seeds=seeds if isinstance(seeds, list) else None,
            accepted=f.get("accepted"),
            rejected=f.get("rejected"),
            stats=f.get("stats") or {},
            trajectory=f.get("trajectory"),
        )


@dataclass
class Latent:
    """What :func:`~diffsolve.invert` returns: the state at t_max that samples back to the data.

    ``x`` is the noise-side state; ``aux`` the second state of a reversible scheme (None for plain
    inversion, e.g. DDIM inversion); ``grid`` the descending time grid to sample on; ``solver`` and
    ``options`` what made it; ``nfe`` what the inversion cost. ``ds.sample(model, solver, latent=lat)``
    reproduces the data: to round-off for reversible solvers, approximately otherwise. A reversible
    latent keeps its states in float64 (as the solver carries them); ``dtype`` is the data's dtype,
    the one the model is run in when sampling it back.
    """

    x: Tensor
    aux: Tensor | None
    grid: Tensor
    solver: str
    options: dict[str, Any] = field(default_factory=dict)
    nfe: int = 0
    dtype: torch.dtype | None = None

    def __repr__(self) -> str:
        pair = ", with its second state" if self.aux is not None else ""
        return f"Latent({tuple(self.x.shape)} {self.x.dtype}{pair}, solver={self.solver!r}, steps={len(self.grid) - 1})"

    TENSORS = "latent.safetensors"

    def save(self, path: str | Path, manifest: Mapping[str, Any] | None = None) -> Path:
        """Write this latent into the folder ``path`` (made if missing; the two files are overwritten):
        ``latent.safetensors`` holds ``x``, ``aux`` and ``grid`` (in their precision), ``manifest.json``
        the solver, its options, nfe and dtype, as ``diffsolve invert`` writes them; ``manifest``
        adds entries of your own. Options that are objects (a ``ReNoise``, a ``StepSizeController``)
        are saved as their class and init arguments; one that is not a :data:`SAVABLE` object is
        refused (TypeError naming it), since sampling back needs it. Returns the folder."""
        return _save(self, path, self.TENSORS, strict=True, extra=manifest)

    @classmethod
    def load(cls, path: str | Path) -> Latent:
        """A latent saved by :meth:`save` (or written by ``diffsolve invert``), from its folder or its
        ``latent.safetensors``; ``ds.sample(model, latent.solver, latent=lat)`` samples it back with
        its options. Tensors load on the CPU."""
        f = _load(cls, path, cls.TENSORS)
        return cls(
            x=f["x"],
            aux=f.get("aux"),
            grid=torch.as_tensor(f["grid"], dtype=torch.float64),
            solver=f["solver"],
            options=f.get("options") or {},
            nfe=int(f.get("nfe", 0)),
            dtype=f.get("dtype"),
        )
