"""Half precision on the CPU: digits-FD of digits-vp sampled with the UNet in bfloat16 (and float16)
against float32, same solver, steps and seeds; writes benchmarks/bf16.{json,md}.

    python scripts/bench_bf16.py [--num-samples 300] [--solver dpmpp-2m] [--steps 20] [--seed 0]

In a half-precision run only the network runs in bfloat16 / float16: the solver's state and
arithmetic stay in float32 and the noise is drawn in float32, so sample i of every row starts from
the same x_T. Besides digits-FD (against the 300 held-out digits, ``diffsolve.quality.evaluate``) the
table gives each sample's RMS and max difference to its float32 twin.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import diffsolve as ds
from diffsolve.quality import evaluate

ROOT = Path(__file__).resolve().parents[1]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-samples", type=int, default=300)
    p.add_argument("--solver", default="dpmpp-2m")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "bf16"), help="output path without suffix")
    a = p.parse_args()
    rows, ref = [], None
    for dtype in DTYPES:
        model = ds.pretrained.load("digits-vp", dtype=dtype)
        start = time.perf_counter()
        res = ds.sample(model, a.solver, a.steps, shape=(a.num_samples, 1, 16, 16), seed=a.seed, progress=False)
        wall = time.perf_counter() - start
        x = res.samples.float()
        ref = x if ref is None else ref
        diff = (x - ref).flatten(1)
        q = evaluate(x)
        row = {
            "dtype": str(dtype).removeprefix("torch."),
            "samples_dtype": str(res.samples.dtype).removeprefix("torch."),
            "digits_fd": q["digits_fd"],
            "confidence": q["confidence"],
            "nfe": res.nfe,
            "wall_s": wall,
            "rms_diff_median": float(diff.pow(2).mean(1).sqrt().median()),
            "rms_diff_max": float(diff.pow(2).mean(1).sqrt().max()),
            "max_abs_diff": float(diff.abs().max()),
            "finite": bool(torch.isfinite(res.samples).all()),
        }
        print(row, flush=True)
        rows.append(row)
    meta = {
        "model": "digits-vp",
        "solver": a.solver,
        "steps": a.steps,
        "num_samples": a.num_samples,
        "seed": a.seed,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "command": f"python scripts/bench_bf16.py --num-samples {a.num_samples} --solver {a.solver} "
        f"--steps {a.steps} --seed {a.seed}",
    }
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Half precision on the CPU: digits-vp in bfloat16 / float16 vs float32",
        "",
        (
            f"digits-vp, {a.solver}, {a.steps} steps, {a.num_samples} samples, seeds {a.seed}..{a.seed + a.num_samples - 1} "
            "(the same x_T in every row), scored by digits-FD against the 300 held-out digits "
            "(`diffsolve.quality.evaluate`, as in [digits_fd.md](digits_fd.md)). In the half rows the UNet runs "
            'in that dtype (`ds.pretrained.load("digits-vp", dtype=...)`); the solver\'s state and arithmetic stay '
            "in float32 and the samples are returned in the half dtype. The diff columns compare each sample with "
            "its float32 twin (images in [-1, 1])."
        ),
        "",
        (
            f"Produced by `{meta['command']}` (torch {torch.__version__}, {meta['threads']} CPU threads; wall times "
            "are of a shared machine, indicative only)."
        ),
        "",
        "| network dtype | digits-FD | confidence | NFE | per-sample RMS diff (median / max) | max abs diff | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['digits_fd']:.1f} | {r['confidence']:.3f} | {r['nfe']} | "
            f"{r['rms_diff_median']:.4f} / {r['rms_diff_max']:.4f} | {r['max_abs_diff']:.3f} | {r['wall_s']:.1f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
