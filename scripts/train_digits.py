"""Train the shipped digit models on the 16x16 digits (train split), deterministically given a seed.

    python scripts/train_digits.py --model classifier        # the metric's classifier (~1 min)
    python scripts/train_digits.py --model digits-vp         # eps-UNet on a DDPM schedule (~25 min)
    python scripts/train_digits.py --model digits-vp-cond    # class-conditional digits-vp, label dropout (~25 min)
    python scripts/train_digits.py --model digits-flow       # rectified-flow velocity UNet (~25 min)
    python scripts/train_digits.py --model digits-mr         # IR-SDE restoration UNet, mu concat (~25 min)
    python scripts/train_digits.py --model digits-sigma      # noise-level classifier for DMCMC (~3 min)
    python scripts/train_digits.py --model all

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

UNET = dict(
    sample_size=16,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=16,
)
DDPM = dict(
    num_train_timesteps=1000,
    beta_schedule="linear",
    beta_start=1e-4,
    beta_end=0.02,
    prediction_type="epsilon",
    clip_sample=False,
)


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
    card = {
        "name": "digits-classifier",
        "architecture": "diffsolve.quality.DigitClassifier",
        "seed": seed,
        "iters": iters,
        "batch": 128,
        "optimizer": "AdamW lr 2e-3 cosine, wd 1e-4",
        "data": "digits16 train split (1497), shifts +-1 px and N(0, 0.05^2) noise",
        "metric": {"heldout_accuracy": acc},
        "train_seconds": round(time.time() - t0, 1),
    }
    (save_dir / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"classifier: held-out accuracy {acc:.4f} ({time.time() - t0:.0f} s)")


def _unet(in_channels: int = 1, **extra):
    from diffusers import UNet2DModel

    return UNet2DModel(**{**UNET, "in_channels": in_channels, **extra})


def train_unet(name: str, seed: int, iters: int, in_channels: int, batch_fn, out: Path, **unet_extra):
    """Shared loop: AdamW lr 1e-3 (100 warm-up steps, cosine), grad clip 1, EMA 0.999, batch 128.

    ``batch_fn(g)`` returns (network input, network time, regression target[, network keyword
    arguments]). Returns the EMA net.
    """
    g = setup(seed)
    net = _unet(in_channels, **unet_extra)
    ema = _unet(in_channels, **unet_extra)
    ema.load_state_dict(net.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)
    t0 = time.time()
    for step in range(iters):
        inp, t_net, target, *kw = batch_fn(g)
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, iters, 1e-3)
        loss = (net(inp, t_net, **(kw[0] if kw else {})).sample - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - decay)
        if step % 100 == 0 or step == iters - 1:
            print(f"{name} step {step} loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    ema.save_pretrained(out / name / "unet")
    return ema, time.time() - t0


def _common_card(name: str, seed: int, iters: int, seconds: float) -> dict:
    return {
        "name": name,
        "kind": "diffusers UNet2DModel",
        "seed": seed,
        "iters": iters,
        "batch": 128,
        "data": "digits16 train split (1497 images, 1x16x16, [-1, 1])",
        "optimizer": "AdamW lr 1e-3 (100 warm-up, cosine), grad clip 1, EMA 0.999",
        "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET.items()},
        "train_seconds": round(seconds, 1),
    }


def train_vp(seed: int, iters: int, out: Path) -> None:
    """digits-vp: eps prediction on diffusers' linear DDPM schedule (1000 steps)."""
    from diffusers import DDPMScheduler

    x, _ = digits16("train")
    sched = DDPMScheduler(**DDPM)
    acp = sched.alphas_cumprod

    def batch(g):
        x0 = x[torch.randint(0, len(x), (128,), generator=g)]
        t = torch.randint(0, 1000, (128,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a, s = acp[t].sqrt()[:, None, None, None], (1 - acp[t]).sqrt()[:, None, None, None]
        return a * x0 + s * eps, t, eps

    _, secs = train_unet("digits-vp", seed, iters, 1, batch, out)
    save_dir = out / "digits-vp"
    sched.save_pretrained(save_dir / "scheduler")
    (save_dir / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "DDPMPipeline",
                "_diffusers_version": __import__("diffusers").__version__,
                "scheduler": ["diffusers", "DDPMScheduler"],
                "unet": ["diffusers", "UNet2DModel"],
            },
            indent=2,
        )
        + "\n"
    )
    card = {
        **_common_card("digits-vp", seed, iters, secs),
        "prediction": "eps",
        "time_input": "timestep",
        "schedule": {"type": "VPDiscrete", "diffusers": DDPM},
    }
    (save_dir / "card.json").write_text(json.dumps(card, indent=2) + "\n")


NULL_CLASS, LABEL_DROPOUT = 10, 0.1


def train_vp_cond(seed: int, iters: int, out: Path) -> None:
    """digits-vp-cond: digits-vp's set-up with a class embedding (10 digits + a null class 10). The
    label is replaced by the null class with probability 0.1 (label dropout), so one network gives
    both the conditional and the unconditional prediction that classifier-free guidance combines."""
    from diffusers import DDPMScheduler

    x, y = digits16("train")
    acp = DDPMScheduler(**DDPM).alphas_cumprod

    def batch(g):
        idx = torch.randint(0, len(x), (128,), generator=g)
        x0, labels = x[idx], y[idx].clone()
        labels[torch.rand(128, generator=g) < LABEL_DROPOUT] = NULL_CLASS
        t = torch.randint(0, 1000, (128,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a, s = acp[t].sqrt()[:, None, None, None], (1 - acp[t]).sqrt()[:, None, None, None]
        return a * x0 + s * eps, t, eps, {"class_labels": labels}

    _, secs = train_unet("digits-vp-cond", seed, iters, 1, batch, out, num_class_embeds=NULL_CLASS + 1)
    card = {
        **_common_card("digits-vp-cond", seed, iters, secs),
        "prediction": "eps",
        "time_input": "timestep",
        "schedule": {"type": "VPDiscrete", "diffusers": DDPM},
        "class_labels": {"num_classes": 10, "null_class": NULL_CLASS, "label_dropout": LABEL_DROPOUT},
    }
    card["unet"]["num_class_embeds"] = NULL_CLASS + 1
    (out / "digits-vp-cond" / "card.json").write_text(json.dumps(card, indent=2) + "\n")


def train_flow(seed: int, iters: int, out: Path) -> None:
    """digits-flow: rectified-flow velocity (eps - x0) on x_t = (1 - t) x0 + t eps, t ~ U(0, 1), net time 1000 t."""
    x, _ = digits16("train")

    def batch(g):
        x0 = x[torch.randint(0, len(x), (128,), generator=g)]
        t = torch.rand(128, generator=g)
        eps = torch.randn(x0.shape, generator=g)
        tb = t[:, None, None, None]
        return (1 - tb) * x0 + tb * eps, 1000 * t, eps - x0

    _, secs = train_unet("digits-flow", seed, iters, 1, batch, out)
    card = {
        **_common_card("digits-flow", seed, iters, secs),
        "prediction": "velocity",
        "time_input": "1000t",
        "schedule": {"type": "RectifiedFlow", "shift": 1.0},
    }
    (out / "digits-flow" / "card.json").write_text(json.dumps(card, indent=2) + "\n")


MR_SCHEDULE = {"type": "MeanReverting", "lam": 0.25, "theta": "cosine", "alpha_end": 0.005, "t_min": 0.01}
MR_DEGRADATION = {"type": "blur-noise", "blur_sigma": 1.5, "noise_std": 0.1}


def train_mr(seed: int, iters: int, out: Path) -> None:
    """digits-mr: IR-SDE eps prediction conditioned on the degraded image mu (channel concat), net time 1000 t."""
    from diffsolve.data import degrade
    from diffsolve.schedules import MeanReverting

    x, _ = digits16("train")
    sched = MeanReverting(**{k: v for k, v in MR_SCHEDULE.items() if k != "type"})

    def batch(g):
        x0 = x[torch.randint(0, len(x), (128,), generator=g)]
        mu = degrade(x0, MR_DEGRADATION, g)
        t = sched.t_min + (1 - sched.t_min) * torch.rand(128, generator=g, dtype=torch.float64)
        eps = torch.randn(x0.shape, generator=g)
        a = sched.alpha(t).float()[:, None, None, None]
        s = sched.sigma(t).float()[:, None, None, None]
        xt = a * x0 + (1 - a) * mu + s * eps
        return torch.cat([xt, mu], dim=1), 1000 * t.float(), eps

    _, secs = train_unet("digits-mr", seed, iters, 2, batch, out)
    card = {
        **_common_card("digits-mr", seed, iters, secs),
        "prediction": "eps",
        "time_input": "1000t",
        "schedule": MR_SCHEDULE,
        "condition": "mu concatenated as a second input channel",
        "degradation": MR_DEGRADATION,
    }
    (out / "digits-mr" / "card.json").write_text(json.dumps(card, indent=2) + "\n")


SIGMA_LEVELS = 100


def train_sigma(seed: int, iters: int, out: Path) -> None:
    """digits-sigma: a noise-level classifier q(k | x_t) over SIGMA_LEVELS levels uniform in log-SNR of
    digits-vp's schedule (Denoising MCMC's classifier, for the VP state x_t = alpha x0 + sigma eps)."""
    from diffsolve.quality import NoiseLevelClassifier
    from diffsolve.schedules import VPDiscrete, make_grid

    g = setup(seed)
    x, _ = digits16("train")
    sched = VPDiscrete.from_diffusers_config(DDPM)
    levels = make_grid(sched, SIGMA_LEVELS - 1, "log-snr")  # class 0 = t_max (most noise)
    a = sched.alpha(levels).float()
    s = sched.sigma(levels).float()
    net = NoiseLevelClassifier(SIGMA_LEVELS)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    t0 = time.time()
    for step in range(iters):
        x0 = x[torch.randint(0, len(x), (100,), generator=g)]
        k = torch.randint(0, SIGMA_LEVELS, (100,), generator=g)
        xt = a[k][:, None, None, None] * x0 + s[k][:, None, None, None] * torch.randn(x0.shape, generator=g)
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, iters, 1e-3)
        loss = torch.nn.functional.cross_entropy(net(xt), k)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == iters - 1:
            print(f"digits-sigma step {step} loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    net.eval()
    with torch.no_grad():  # held-out: mean |predicted - true| class
        xh, _ = digits16("heldout")
        gh = torch.Generator().manual_seed(seed + 1)
        k = torch.randint(0, SIGMA_LEVELS, (len(xh),), generator=gh)
        xt = a[k][:, None, None, None] * xh + s[k][:, None, None, None] * torch.randn(xh.shape, generator=gh)
        err = float((net(xt).argmax(1) - k).abs().float().mean())
    save_dir = out / "digits-sigma"
    save_dir.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({k_: v.contiguous() for k_, v in net.state_dict().items()}, str(save_dir / "model.safetensors"))
    card = {
        "name": "digits-sigma",
        "architecture": "diffsolve.quality.NoiseLevelClassifier",
        "seed": seed,
        "iters": iters,
        "batch": 100,
        "optimizer": "Adam lr 1e-3 (cosine)",
        "levels": SIGMA_LEVELS,
        "level_times": levels.tolist(),
        "schedule": {"type": "VPDiscrete", "diffusers": DDPM},
        "input": "the VP state x_t = alpha(t) x0 + sigma(t) eps of digits-vp; class 0 is the noisiest",
        "metric": {"heldout_mean_abs_class_error": err},
        "train_seconds": round(time.time() - t0, 1),
    }
    (save_dir / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"digits-sigma: held-out mean |class error| {err:.2f} of {SIGMA_LEVELS} ({time.time() - t0:.0f} s)")


TRAINERS = {
    "classifier": (train_classifier, 1500),
    "digits-vp": (train_vp, 2800),
    "digits-vp-cond": (train_vp_cond, 2800),
    "digits-flow": (train_flow, 2800),
    "digits-mr": (train_mr, 2800),
    "digits-sigma": (train_sigma, 3000),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=[*TRAINERS, "all"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iters", type=int, default=None, help="training iterations (default: per model)")
    p.add_argument("--out", type=Path, default=WEIGHTS)
    a = p.parse_args()
    for name in TRAINERS if a.model == "all" else [a.model]:
        fn, iters = TRAINERS[name]
        fn(a.seed, a.iters or iters, a.out)


if __name__ == "__main__":
    main()
