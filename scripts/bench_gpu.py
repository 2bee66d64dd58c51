"""GPU throughput: samples per second of our solvers against diffusers' schedulers on CUDA.

    python scripts/bench_gpu.py [--quick] [--out benchmarks] [--force]

Models: the shipped digits-vp UNet (1x16x16) and a small Stable-Diffusion-style UNet2DConditionModel
built from a config in code (random weights, 4x32x32 latents, 77x64 text states; no download).
For each model, batch size (1, 8, 64; quick: 8) and dtype (float16, bfloat16), 20 steps of:
ours eager (``ds.sample``), ours as one CUDA graph (:class:`diffsolve.samplers.CUDAGraphSampler`),
ours with a ``torch.compile``-d network, and diffusers' SD loop (``scale_model_input``, the network,
``step``) with the paired scheduler: ddim / DDIMScheduler, dpmpp-2m / DPMSolverMultistepScheduler.
Timed with CUDA events after a warm-up, median of ``repeats``; the table gives samples/s and the
ratio to diffusers in the same run. Writes gpu.{json,md} with the GPU's name. Needs CUDA: without
it the script says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

import diffsolve as ds
from diffsolve.bench import write_text

PAIRS = {"ddim": ("DDIMScheduler", {}), "dpmpp-2m": ("DPMSolverMultistepScheduler", {"solver_order": 2})}
STEPS = 20


def tiny_sd_unet(device, dtype):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    return unet.to(device=device, dtype=dtype).eval()


def models(device, dtype):
    """name -> (DiffusionModel, event shape, raw network(x, t) for the diffusers loop, scheduler config)."""
    digits = ds.pretrained.load("digits-vp", device, dtype)
    cfg = dict(ds.pretrained.card("digits-vp")["schedule"]["diffusers"])
    unet = tiny_sd_unet(device, dtype)
    text = torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)

    def sd_net(x, t):
        return unet(x, t.to(dtype), encoder_hidden_states=text.expand(x.shape[0], -1, -1)).sample

    sd_cfg = {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    }
    sd_model = ds.DiffusionModel(
        sd_net, ds.schedules.VPDiscrete.from_diffusers_config(sd_cfg), "eps", time_input="timestep"
    )
    return {
        "digits-vp": (digits, (1, 16, 16), digits.net, cfg),
        "tiny-sd-unet": (sd_model, (4, 32, 32), sd_net, sd_cfg),
    }


def timed(fn, repeats):
    """Median seconds of ``fn()`` over ``repeats`` runs (CUDA events), after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1000)
    return statistics.median(times)


def diffusers_loop(cls_name, opts, cfg, net, x_T):
    import diffusers

    sched = getattr(diffusers, cls_name).from_config({**cfg, **opts})

    def run():
        sched.set_timesteps(STEPS, device=x_T.device)
        x = x_T * sched.init_noise_sigma
        for t in sched.timesteps:
            x = sched.step(net(sched.scale_model_input(x, t), t.expand(x.shape[0])), t, x).prev_sample
        return x

    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 8 only, 3 repeats")
    ap.add_argument("--out", type=Path, default=Path("benchmarks"))
    ap.add_argument("--force", action="store_true", help="overwrite an earlier gpu.{json,md}")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: CUDA is not available here; run this on a machine with an NVIDIA GPU", file=sys.stderr)
        return 2
    if not args.force and any((args.out / f"gpu.{e}").exists() for e in ("md", "json")):
        print(f"bench_gpu: {args.out}/gpu.md exists; pass --force to overwrite", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    gpu = torch.cuda.get_device_name(device)
    batches, repeats = ((8,), 3) if args.quick else ((1, 8, 64), 5)
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        for name, (model, shape, net, cfg) in models(device, dtype).items():
            compiled = model.compile(mode="max-autotune-no-cudagraphs")
            for b in batches:
                x_T = torch.randn(b, *shape, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
                for solver, (cls_name, opts) in PAIRS.items():
                    with torch.no_grad():
                        t_ref = timed(diffusers_loop(cls_name, opts, cfg, net, x_T), repeats)
                        t_eager = timed(lambda: ds.sample(model, solver, STEPS, x_T=x_T, progress=False), repeats)
                        t_comp = timed(lambda: ds.sample(compiled, solver, STEPS, x_T=x_T, progress=False), repeats)
                    graphed = ds.samplers.CUDAGraphSampler(model, solver, STEPS, x_T.shape, dtype=dtype)
                    t_graph = timed(lambda: graphed(x_T), repeats)
                    row = {
                        "model": name,
                        "dtype": str(dtype).replace("torch.", ""),
                        "batch": b,
                        "solver": solver,
                        "diffusers": cls_name,
                        "samples_per_s": {
                            "diffusers": b / t_ref,
                            "ours": b / t_eager,
                            "ours_compiled": b / t_comp,
                            "ours_cuda_graph": b / t_graph,
                        },
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    write_text(
        args.out / "gpu.json",
        json.dumps({"gpu": gpu, "torch": torch.__version__, "steps": STEPS, "rows": rows}, indent=2) + "\n",
    )
    lines = [
        "# GPU throughput",
        "",
        (
            f"Written by `scripts/bench_gpu.py`{' --quick' if args.quick else ''} on "
            f"**{gpu}** (torch {torch.__version__}), {STEPS} steps, median of {repeats} after a warm-up. "
            "Samples per second; the ratios are to diffusers' scheduler loop in the same run."
        ),
        "",
        "| model | dtype | batch | solver | diffusers | ours | ours, compiled | ours, CUDA graph |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["samples_per_s"]
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['batch']} | {r['solver']} vs {r['diffusers']} | "
            f"{s['diffusers']:.1f} | {s['ours']:.1f} ({s['ours'] / s['diffusers']:.2f}x) | "
            f"{s['ours_compiled']:.1f} ({s['ours_compiled'] / s['diffusers']:.2f}x) | "
            f"{s['ours_cuda_graph']:.1f} ({s['ours_cuda_graph'] / s['diffusers']:.2f}x) |"
        )
    write_text(args.out / "gpu.md", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
