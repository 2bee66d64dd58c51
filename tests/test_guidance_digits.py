"""Guidance on the shipped digit models: class-conditional sampling with CFG, and restoring held-out digits."""

import json

import pytest
import torch

import diffsolve as ds
from diffsolve.cli import main
from diffsolve.data import digits16
from diffsolve.guidance import (
    CFGPlusPlus,
    ClassifierFreeGuidance,
    inverse_problem,
    restore,
)
from diffsolve.guidance.tasks import DEFAULT_STEPS, DEFAULTS
from diffsolve.quality import load_classifier


def _psnr(x, ref):
    return float(ds.metrics.psnr(x.clamp(-1, 1), ref).mean())


def test_cfg_samples_are_the_requested_class():
    """digits-vp-cond with CFG at scale 3: the digit classifier reads the requested class."""
    model = ds.pretrained.load("digits-vp-cond")
    null = ds.pretrained.classes("digits-vp-cond")["null_class"]
    labels = torch.arange(100) % 10
    classifier = load_classifier()
    acc = {}
    for scale in (1.0, 3.0):
        cfg = ClassifierFreeGuidance(model, scale, uncond={"class_labels": torch.tensor(null)})
        x = ds.sample(cfg, "dpmpp-2m", 20, shape=(100, 1, 16, 16), seed=0, cond={"class_labels": labels}).samples
        with torch.no_grad():
            acc[scale] = float((classifier(x).argmax(1) == labels).float().mean())
    print("class accuracy: conditional (scale 1)", acc[1.0], "CFG scale 3", acc[3.0])
    assert acc[3.0] >= 0.95
    assert acc[3.0] >= acc[1.0]


def test_cfgpp_gives_the_requested_classes_with_ddim_and_ddpm_and_other_solvers_refuse_it():
    """CFG++ steps a (guided x0, unconditional eps) pair: ddim / ddpm step with both and give the
    requested classes; a solver that does not step with both (heun's second stage steps from x and
    x0: CFG at scale lambda) would not, so it is refused before the run."""
    model = ds.pretrained.load("digits-vp-cond")
    null = ds.pretrained.classes("digits-vp-cond")["null_class"]
    labels = torch.arange(20) % 10
    classifier = load_classifier()
    cfgpp = CFGPlusPlus(model, 0.6, uncond={"class_labels": torch.tensor(null)})
    kw = {"shape": (20, 1, 16, 16), "seed": 0, "cond": {"class_labels": labels}}
    for solver in ("ddim", "ddpm"):
        x = ds.sample(cfgpp, solver, 10, **kw).samples
        with torch.no_grad():
            acc = float((classifier(x).argmax(1) == labels).float().mean())
        print(f"CFG++ (lambda 0.6) with {solver}, 10 steps: class accuracy {acc}")
        assert acc >= 0.9, solver
    for solver in ("heun", "dpmpp-2m-sde", "mrs-adaptive"):
        with pytest.raises(ValueError, match=f"solver '{solver}'.*use one of: ddim, ddpm"):
            ds.sample(cfgpp, solver, 10, **kw)
    with pytest.raises(ValueError, match="solver 'heun'"):
        ds.invert(cfgpp, "heun", torch.zeros(2, 1, 16, 16), 10, cond={"class_labels": labels[:2]})


@pytest.mark.parametrize(
    "method,opts", [("dps", {}), ("inpaint", {}), ("repaint", {"resample": 3}), ("dflow", {"iterations": 1})]
)
def test_inpainting_half_a_digit_beats_unguided(method, opts):
    """Measured (16 digits, unguided 10.8 to 11.5 dB with each method's solver and steps): dps 17.7,
    inpaint 17.9, repaint (U = 3) 19.7, dflow (one L-BFGS step of 5 rev-heun steps, 422 calls) 20.95."""
    model = ds.pretrained.load("digits-vp")
    clean = digits16("heldout")[0][:16]
    prob = inverse_problem("inpaint", clean)
    restored, res = restore(model, prob, method, seed=0, **opts)
    steps = DEFAULT_STEPS.get(method, 50)
    plain, _ = restore(model, prob, "none", steps=steps, seed=0, solver=DEFAULTS[method][0])
    p, p0 = _psnr(restored, clean), _psnr(plain, clean)
    print(f"inpainting the bottom half, {method}: PSNR {p:.2f} dB, unguided {p0:.2f} dB, NFE {res.nfe}")
    assert p > p0 + 3.0
    if method == "dflow":
        assert res.solver == "rev-heun" and res.nfe > 10 * 16 and len(res.stats["dflow_loss"]) == 2
        assert res.stats["dflow_loss"][-1] < res.stats["dflow_loss"][0] / 100


def test_cli_restore_writes_grids_and_psnr(tmp_path):
    out = tmp_path / "r"
    argv = [
        "restore",
        "--task",
        "deblur",
        "--method",
        "dps",
        "--steps",
        "5",
        "--num-samples",
        "4",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["psnr_db"]) == {"restored", "unguided", "degraded"} and m["nfe"] == 5
    assert (out / "restore.png").stat().st_size > 0 and (out / "restored.safetensors").exists()
    assert main(argv) == 2  # no overwrite without --force
    assert main([*argv, "--force"]) == 0
    assert main(["restore", "--method", "inpaint", "--task", "deblur", "--out", str(tmp_path / "x")]) == 2
    assert main(["restore", "--method", "repaint", "--task", "deblur", "--out", str(tmp_path / "x")]) == 2
    assert (
        main(
            [
                "restore",
                "--method",
                "dps",
                "-o",
                "particles=3",
                "--steps",
                "2",
                "--num-samples",
                "1",
                "--out",
                str(tmp_path / "y"),
            ]
        )
        == 2
    )


def test_cli_class_and_guidance_scale(tmp_path, capsys):
    out = tmp_path / "c"
    assert (
        main(
            [
                "sample",
                "--model",
                "digits-vp-cond",
                "--class",
                "7",
                "--guidance-scale",
                "2",
                "--steps",
                "4",
                "--num-samples",
                "3",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    m = json.loads((out / "manifest.json").read_text())
    assert m["class"] == 7 and m["guidance_scale"] == 2.0 and m["nfe"] == 8  # two calls per step
    assert main(["sample", "--model", "digits-vp", "--class", "3", "--out", str(tmp_path / "d")]) == 2
    assert "class-conditional" in capsys.readouterr().err
    assert main(["sample", "--model", "digits-vp-cond", "--class", "10", "--out", str(tmp_path / "e")]) == 2


def test_cli_restore_with_dflow_counts_every_call(tmp_path, capsys):
    """``--method dflow`` (L-BFGS by default): the manifest's NFE is the whole optimisation's (forward
    runs and the adjoint's backward calls), its options name the adjoint; ``-o optimizer=adam`` and
    ``-o adjoint=continuous`` run too; an unknown optimiser is refused by name."""
    base = ["restore", "--method", "dflow", "--task", "deblur", "--steps", "3", "--num-samples", "2", "--no-progress"]
    assert main([*base, "-o", "iterations=2", "--out", str(tmp_path / "a")]) == 0
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["solver"] == "rev-heun" and m["steps"] == 3 and m["nfe"] > 3 * 3
    assert "dflow (rev-heun, 3 steps" in capsys.readouterr().out
    argv = [*base, "--solver", "dpmpp-2m", "-o", "optimizer=adam", "-o", "iterations=1", "-o", "adjoint=continuous"]
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["nfe"] == 3 + 3 * 4 + 3  # forward, RK4 adjoint backward, final forward
    assert main([*base, "-o", "adjoint=exact", "--out", str(tmp_path / "c")]) == 2
    assert main([*base, "-o", "optimizer=newton", "--out", str(tmp_path / "e")]) == 2
    assert "optimizer must be one of lbfgs, adam" in capsys.readouterr().err
    assert main([*base, "-o", "zeta=1", "--out", str(tmp_path / "d")]) == 2
