"""digits-FD of the shipped generators (and the real-data floor); writes benchmarks/digits_fd.{json,md}
and records each generator's numbers in its card.json ("metric").

    python scripts/eval_digits.py [--models digits-vp ...] [--num-samples 300] [--seed 0]

Generators are sampled with 100-step and 10-step solvers; digits-mr restores the held-out digits
(degraded as its card records) and is also scored by PSNR against the clean digits.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import diffsolve as ds
from diffsolve.data import degrade, digits16
from diffsolve.quality import evaluate

ROOT = Path(__file__).resolve().parents[1]
RUNS = [("ddim", 100), ("ddpm", 100), ("ddim", 10), ("dpmpp-2m", 10), ("heun", 5)]


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(ds.metrics.psnr(x, ref).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=list(ds.pretrained.SHIPPED))
    p.add_argument("--num-samples", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    out = ROOT / "benchmarks"
    # rows of models not evaluated now are kept from an earlier run
    old = json.loads((out / "digits_fd.json").read_text()) if (out / "digits_fd.json").exists() else []
    rows = []
    train, _ = digits16("train")
    floor = evaluate(
        train[torch.randperm(len(train), generator=torch.Generator().manual_seed(a.seed))[: a.num_samples]]
    )
    rows.append({"model": "real digits (train split)", "solver": "-", "steps": 0, "nfe": 0, **floor})
    print(rows[-1])
    held, _ = digits16("heldout")
    for name in a.models:
        try:
            model = ds.pretrained.load(name)
        except FileNotFoundError as e:
            print(f"skip {name}: {e}")
            continue
        card_path = ds.pretrained.path_of(name) / "card.json"
        card = json.loads(card_path.read_text())
        mu = clean = None
        n = a.num_samples
        if card.get("degradation"):
            clean = held
            mu = degrade(clean, card["degradation"], torch.Generator().manual_seed(a.seed))
            n = len(clean)
        metric = {}
        for solver, steps in RUNS:
            t0 = time.time()
            res = ds.sample(model, solver, steps, shape=(n, 1, 16, 16), seed=a.seed, mu=mu)
            q = evaluate(res.samples)
            row = {
                "model": name,
                "solver": solver,
                "steps": steps,
                "nfe": res.nfe,
                **q,
                "seconds": round(time.time() - t0, 1),
            }
            if clean is not None:
                row["psnr_db"] = psnr(res.samples, clean)
                row["psnr_degraded_db"] = psnr(mu, clean)
            rows.append(row)
            metric[f"{solver}-{steps}"] = {k: row[k] for k in ("digits_fd", "confidence", "nfe", "psnr_db") if k in row}
            print(row, flush=True)
        card["metric"] = {"digits_fd_floor": floor["digits_fd"], "num_samples": n, **metric}
        card_path.write_text(json.dumps(card, indent=2) + "\n")
    done = {r["model"] for r in rows}
    rows += [r for r in old if r["model"] not in done]
    order = ["real digits (train split)", *ds.pretrained.SHIPPED]
    rows.sort(key=lambda r: order.index(r["model"]) if r["model"] in order else len(order))
    out.mkdir(exist_ok=True)
    (out / "digits_fd.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "| model | solver | steps | NFE | digits-FD | confidence | PSNR dB (degraded) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ps = f"{r['psnr_db']:.2f} ({r['psnr_degraded_db']:.2f})" if "psnr_db" in r else "-"
        lines.append(
            f"| {r['model']} | {r['solver']} | {r['steps']} | {r['nfe']} | {r['digits_fd']:.1f} | "
            f"{r['confidence']:.3f} | {ps} |"
        )
    md = "\n".join(lines) + "\n"
    (out / "digits_fd.md").write_text(
        f"# digits-FD of the shipped generators\n\n{a.num_samples} samples per row (digits-mr restores the 300 held-out "
        f"digits), seed {a.seed}, scored against the 300 held-out digits by `diffsolve.quality.evaluate`. "
        "The first row is the floor: real training digits.\n\n" + md
    )
    print(md)


if __name__ == "__main__":
    main()
