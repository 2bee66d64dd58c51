"""Train the shipped digit models on the 16x16 digits (train split), deterministically given a seed.

    python scripts/train_digits.py --model classifier        # the metric's classifier (~1 min)
    python scripts/train_digits.py --model digits-vp         # eps-UNet on a DDPM schedule (~25 min)

Runs on CPU with 2 threads; the result depends only on --seed (and the torch build). Weights go to
diffsolve/weights/<name>/ with a card.json (schedule, prediction, training settings, metric).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from diffsolve.data import digits16
from diffsolve.quality import DigitClassifier

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "diffsolve" / "weights"

UNET = dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=16)
DDPM = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
            prediction_type="epsilon", clip_sample=False)


def setup(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    return torch.Generator().manual_seed(seed)


def lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_classifier(seed: int, iters: int, out: Path) -> None:
    g = setup(seed)
    x, y = digits16("train")
    xh, yh = digits16("heldout")
    net = DigitClassifier()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    t0 = time.time()
    for step in range(iters):
        idx = torch.randint(0, len(x), (128,), generator=g)
        xb = x[idx]
        # light augmentation: random shifts by up to 1 pixel and small noise (samples are imperfect)
        sh = torch.randint(-1, 2, (2,), generator=g).tolist()
        xb = torch.roll(xb, shifts=sh, dims=(2, 3)) + 0.05 * torch.randn(xb.shape, generator=g)
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, iters, 2e-3)
        loss = torch.nn.functional.cross_entropy(net(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        acc = float((net(xh).argmax(1) == yh).float().mean())
    save_dir = out / "digits-classifier"
    save_dir.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(save_dir / "model.safetensors"))
    card = {"name": "digits-classifier", "architecture": "diffsolve.quality.DigitClassifier", "seed": seed,
            "iters": iters, "batch": 128, "optimizer": "AdamW lr 2e-3 cosine, wd 1e-4",
            "data": "digits16 train split (1497), shifts +-1 px and N(0, 0.05^2) noise",
            "metric": {"heldout_accuracy": acc}, "train_seconds": round(time.time() - t0, 1)}
    (save_dir / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"classifier: held-out accuracy {acc:.4f} ({time.time() - t0:.0f} s)")


def train_vp(seed: int, iters: int, out: Path) -> None:
    from diffusers import DDPMScheduler, UNet2DModel

    g = setup(seed)
    x, _ = digits16("train")
    net = UNet2DModel(**UNET)
    ema = UNet2DModel(**UNET)
    ema.load_state_dict(net.state_dict())
    ema.requires_grad_(False)
    sched = DDPMScheduler(**DDPM)
    acp = sched.alphas_cumprod
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)
    t0 = time.time()
    for step in range(iters):
        idx = torch.randint(0, len(x), (128,), generator=g)
        x0 = x[idx]
        t = torch.randint(0, 1000, (128,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = acp[t].sqrt()[:, None, None, None]
        s = (1 - acp[t]).sqrt()[:, None, None, None]
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, iters, 1e-3)
        loss = (net(a * x0 + s * eps, t).sample - eps).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - decay)
        if step % 100 == 0 or step == iters - 1:
            print(f"digits-vp step {step} loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    save_dir = out / "digits-vp"
    ema.save_pretrained(save_dir / "unet")
    sched.save_pretrained(save_dir / "scheduler")
    (save_dir / "model_index.json").write_text(json.dumps({
        "_class_name": "DDPMPipeline", "_diffusers_version": __import__("diffusers").__version__,
        "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}, indent=2) + "\n")
    card = {"name": "digits-vp", "kind": "diffusers UNet2DModel", "prediction": "eps",
            "schedule": {"type": "VPDiscrete", "diffusers": DDPM}, "time_input": "timestep",
            "data": "digits16 train split (1497 images, 1x16x16, [-1, 1])", "seed": seed, "iters": iters,
            "batch": 128, "optimizer": "AdamW lr 1e-3 (100 warm-up, cosine), grad clip 1, EMA 0.999",
            "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET.items()},
            "train_seconds": round(time.time() - t0, 1)}
    (save_dir / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"digits-vp: saved to {save_dir} ({time.time() - t0:.0f} s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=["classifier", "digits-vp"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iters", type=int, default=None, help="training iterations (default: per model)")
    p.add_argument("--out", type=Path, default=WEIGHTS)
    a = p.parse_args()
    if a.model == "classifier":
        train_classifier(a.seed, a.iters or 1500, a.out)
    else:
        train_vp(a.seed, a.iters or 2800, a.out)


if __name__ == "__main__":
    main()
