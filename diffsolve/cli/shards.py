"""Sharded sampling runs: ``sample`` writes its samples shard by shard into ``<out>/.shards`` (with
the run's settings in run.json), so that a rerun of an interrupted run resumes at the first missing
shard, and under torchrun the processes share the shards (rank r takes shards r, r + world, ...)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .jsonform import jsonable
from .output import refuse

SHARD_DIR = ".shards"


def distributed(device: torch.device) -> tuple[int, int]:
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


def barrier(world: int) -> None:
    """Wait for every process of a distributed run."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def shard_path(shard_dir: Path, j: int) -> Path:
    """The file of shard ``j``."""
    return shard_dir / f"shard-{j:05d}.safetensors"


def saved_shards(shard_dir: Path) -> int:
    """How many shards ``shard_dir`` holds."""
    return len(list(shard_dir.glob("shard-*.safetensors"))) if shard_dir.is_dir() else 0


def prepare_shards(shard_dir: Path, spec: dict, force: bool) -> int:
    """Create the shard folder with run.json, or resume one written by the same settings. Returns
    the shards already done."""
    run_file = shard_dir / "run.json"
    if run_file.exists():
        try:
            old = json.loads(run_file.read_text())
        except json.JSONDecodeError:
            old = None
        if old == spec:
            return saved_shards(shard_dir)
        if not force:
            refuse(f"{shard_dir.parent} holds an unfinished run with other settings", "discard it")
        shutil.rmtree(shard_dir)
    elif shard_dir.exists():
        shutil.rmtree(shard_dir)
    shard_dir.mkdir(parents=True)
    tmp = shard_dir / ".run.json.tmp"
    tmp.write_text(json.dumps(spec, indent=2) + "\n")
    os.replace(tmp, run_file)
    return 0


def save_shard(path: Path, result) -> None:
    """Write one shard's SampleResult (samples, NFE per sample, the run's record) atomically."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    meta = {
        "nfe": str(int(result.nfe)),
        "wall_time": repr(float(result.wall_time)),
        "grid": json.dumps(jsonable(result.grid)),
        "options": json.dumps(jsonable(dict(result.options))),
        "solver": result.solver,
    }
    save_file(
        {
            "samples": result.samples.detach().cpu().contiguous(),
            "nfe_per_sample": torch.as_tensor(result.nfe_per_sample).cpu().contiguous(),
        },
        str(tmp),
        metadata=meta,
    )
    os.replace(tmp, path)


def load_shards(shard_dir: Path, n: int) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """(samples, NFE per sample, each shard's record) of the first ``n`` shards, in order."""
    from safetensors import safe_open

    samples, nfe, metas = [], [], []
    for j in range(n):
        with safe_open(str(shard_path(shard_dir, j)), framework="pt") as f:
            samples.append(f.get_tensor("samples"))
            nfe.append(f.get_tensor("nfe_per_sample"))
            metas.append(f.metadata())
    return torch.cat(samples), torch.cat(nfe), metas


def after_failure(out: Path, shard_dir: Path, out_existed: bool) -> int:
    """A run stopped (an error, Ctrl-C): with no shard saved, remove its shard folder (and ``out`` if this
    run made it and it is empty), so that a corrected command is not refused. Returns the shards saved."""
    saved = saved_shards(shard_dir)
    if not saved:
        shutil.rmtree(shard_dir, ignore_errors=True)
        if not out_existed:
            try:
                out.rmdir()
            except OSError:
                pass
    return saved
