"""The ``diffsolve`` command line: in-process via ``cli.main`` plus one ``python -m diffsolve`` run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffsolve import cli

FILES = ("samples.safetensors", "samples.png", "manifest.json")


def run(*args: str) -> int:
    return cli.main([*args])


def sample(out, *args: str) -> int:
    return run("sample", "--out", str(out), "--no-progress", *args)


def read_outputs(out):
    tensors = load_file(str(out / "samples.safetensors"))
    manifest = json.loads((out / "manifest.json").read_text())
    with Image.open(out / "samples.png") as im:
        im.load()
        image = im.copy()
    return tensors, manifest, image


def digits_grid_size(k: int, per_row: int = cli.GRID_PER_ROW) -> tuple[int, int]:
    tile = 8 * cli.image_scale(8, 8)
    cols = min(per_row, k)
    rows = math.ceil(k / cols)
    pad = cli.GRID_PAD
    return cols * tile + (cols + 1) * pad, rows * tile + (rows + 1) * pad


def test_gmm_files_written_and_loadable(tmp_path, capsys):
    out = tmp_path / "gmm"
    assert (
        sample(out, "--model", "gmm-2d", "--solver", "heun", "--num-samples", "10", "--steps", "3", "--seed", "5") == 0
    )
    assert sorted(os.listdir(out)) == sorted(FILES)
    assert not [p for p in os.listdir(tmp_path) if p != "gmm"]  # the temporary directory is gone

    tensors, m, image = read_outputs(out)
    assert tensors["samples"].shape == (10, 2)
    assert tensors["samples"].dtype == torch.float32
    assert torch.isfinite(tensors["samples"]).all()
    assert tensors["nfe_per_sample"].tolist() == [6] * 10
    assert m["solver"] == "heun" and m["model"] == "gmm-2d"
    assert m["steps"] == 3 and m["seed"] == 5 and m["num_samples"] == 10
    assert m["nfe"] == 2 * 3  # heun: 2 calls per step
    assert len(m["grid"]) == 4 and m["grid"] == sorted(m["grid"], reverse=True)
    assert m["options"]["s_churn"] == 0.0
    assert m["device"] == "cpu" and m["dtype"] == "float32"
    assert set(m["versions"]) >= {"diffsolve", "torch", "python"}
    assert m["wall_time"] >= 0 and m["timestamp"] and "sample" in m["command"]
    # scatter plot: square RGB, mostly white background with some coloured points
    assert image.mode == "RGB" and image.size == (cli.SCATTER_SIZE, cli.SCATTER_SIZE)
    colours = {c for _, c in image.getcolors(maxcolors=1 << 16)}
    assert (255, 255, 255) in colours and len(colours) > 3

    printed = capsys.readouterr().out
    assert "NFE 6" in printed and str(out) in printed


def test_default_model_writes_image_grid(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run("sample", "--num-samples", "3", "--steps", "2", "--no-progress") == 0
    # 3 samples, not the default 64: a short hash of that setting follows the name
    [out] = (tmp_path / "diffsolve-out").glob("digits-vp-dpmpp-2m-2steps-seed0-*")
    tensors, m, image = read_outputs(out)
    assert tensors["samples"].shape == (3, 1, 16, 16)
    assert m["model"] == "digits-vp" and m["solver"] == "dpmpp-2m" and m["nfe"] == 2
    assert image.size == digits_grid_size(3)
    assert image.mode == "L"


def test_image_grid_layout():
    x = torch.linspace(-1, 1, 10 * 64).reshape(10, 1, 8, 8)
    im = cli.image_grid(x.numpy())
    assert im.size == digits_grid_size(10)  # 8 per row, 2 rows
    tile = 8 * cli.image_scale(8, 8)
    # first pixel of the first tile is -1 -> 0; value range mapped to [0, 255]
    assert im.getpixel((cli.GRID_PAD, cli.GRID_PAD)) == 0
    assert im.getextrema() == (0, 255)
    # nearest neighbour upscaling: a whole scale x scale block has one value
    s = cli.image_scale(8, 8)
    block = {im.getpixel((cli.GRID_PAD + i, cli.GRID_PAD + j)) for i in range(s) for j in range(s)}
    assert len(block) == 1 and tile == 32


def test_same_seed_is_bitwise_reproducible(tmp_path):
    args = ("--model", "gmm-2d", "--num-samples", "6", "--steps", "3", "--seed", "7")
    assert sample(tmp_path / "a", *args) == 0
    assert sample(tmp_path / "b", *args) == 0
    assert sample(tmp_path / "c", *args[:-1], "8") == 0
    a = load_file(str(tmp_path / "a" / "samples.safetensors"))["samples"]
    b = load_file(str(tmp_path / "b" / "samples.safetensors"))["samples"]
    c = load_file(str(tmp_path / "c" / "samples.safetensors"))["samples"]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_refuses_to_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "run"
    args = ("--model", "gmm-2d", "--num-samples", "4", "--steps", "2")
    assert sample(out, *args) == 0
    before = {f: (out / f).read_bytes() for f in FILES}
    capsys.readouterr()

    assert sample(out, *args, "--seed", "1") == 2
    err = capsys.readouterr().err
    assert err.startswith("diffsolve: error:") and "--force" in err and "--out" in err
    assert {f: (out / f).read_bytes() for f in FILES} == before

    assert sample(out, *args, "--seed", "1", "--force") == 0
    after = load_file(str(out / "samples.safetensors"))["samples"]
    assert not torch.equal(after, load_file_bytes(before["samples.safetensors"]))
    assert json.loads((out / "manifest.json").read_text())["seed"] == 1


def load_file_bytes(data: bytes) -> torch.Tensor:
    from safetensors.torch import load

    return load(data)["samples"]


def test_existing_empty_out_dir_is_fine(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert sample(out, "--model", "gmm-2d", "--num-samples", "2", "--steps", "1") == 0
    assert (out / "notes.txt").read_text() == "keep me"
    assert (out / "samples.safetensors").exists()


def test_unknown_solver_suggests_close_name(tmp_path, capsys):
    assert sample(tmp_path / "x", "--solver", "hune", "--num-samples", "2") == 2
    err = capsys.readouterr().err
    assert err.startswith("diffsolve: error:") and "'heun'" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_bad_solver_option(tmp_path, capsys):
    assert sample(tmp_path / "x", "--solver", "heun", "-o", "s_chrn=3", "--num-samples", "2") == 2
    err = capsys.readouterr().err
    assert "diffsolve: error:" in err and "s_chrn" in err and "s_churn" in err
    assert not (tmp_path / "x").exists()
    # malformed option (no '=') is an argparse usage error
    assert sample(tmp_path / "x", "-o", "s_churn", "--num-samples", "2") == 2


def test_solver_options_parsed_as_yaml(tmp_path):
    out = tmp_path / "opts"
    assert (
        sample(
            out,
            "--model",
            "gmm-2d",
            "--solver",
            "heun",
            "--num-samples",
            "2",
            "--steps",
            "2",
            "-o",
            "s_churn=0.5",
            "-o",
            "s_noise=1",
            "-o",
            "s_tmax=inf",
        )
        == 0
    )
    opts = json.loads((out / "manifest.json").read_text())["options"]
    assert opts["s_churn"] == 0.5 and opts["s_noise"] == 1 and opts["s_tmax"] == "inf"


def test_option_parser():
    assert cli._option("eta=1") == ("eta", 1)
    assert cli._option("eta=1e-3") == ("eta", 1e-3)
    assert cli._option("flag=true") == ("flag", True)
    assert cli._option("s-churn=2.5") == ("s_churn", 2.5)
    assert cli._option("name=abc") == ("name", "abc")


def test_grid_dtype_and_device_options(tmp_path, capsys):
    out = tmp_path / "g"
    assert (
        sample(
            out, "--model", "gmm-2d", "--num-samples", "2", "--steps", "4", "--grid", "uniform", "--dtype", "float64"
        )
        == 0
    )
    tensors, m, _ = read_outputs(out)
    assert tensors["samples"].dtype == torch.float64 and m["dtype"] == "float64"
    assert m["grid"] == pytest.approx(torch.linspace(m["grid"][0], m["grid"][-1], 5).tolist())

    assert sample(tmp_path / "d1", "--dtype", "float8") == 2
    assert sample(tmp_path / "d2", "--device", "no-such-device") == 2
    assert "diffsolve: error:" in capsys.readouterr().err
    assert sample(tmp_path / "d3", "--grid", "nope") == 2
    assert sample(tmp_path / "d4", "--model", "nope") == 2
    err = capsys.readouterr().err
    assert "gmm-2d" in err and "digits-oracle" in err
    assert not any((tmp_path / d).exists() for d in ("d1", "d2", "d3", "d4"))


def test_solvers_table(capsys):
    assert run("solvers") == 0
    table = capsys.readouterr().out
    assert "euler-maruyama" in table and "heun" in table and "name" in table.splitlines()[0]
    assert run("solvers", "--markdown") == 0
    md = capsys.readouterr().out
    assert md.startswith("| name |") and "| euler-maruyama |" in md


def test_version_and_no_command(capsys):
    import diffsolve

    assert run("--version") == 0
    assert diffsolve.__version__ in capsys.readouterr().out
    assert run() == 2


def test_python_dash_m(tmp_path):
    out = tmp_path / "sub"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "diffsolve",
            "sample",
            "--model",
            "gmm-2d",
            "--solver",
            "heun",
            "--num-samples",
            "4",
            "--steps",
            "2",
            "--out",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "NFE 4" in proc.stdout
    tensors, m, _ = read_outputs(out)
    assert tensors["samples"].shape == (4, 2) and m["nfe"] == 4

    proc = subprocess.run(
        [sys.executable, "-m", "diffsolve", "sample", "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--force" in proc.stderr and "Traceback" not in proc.stderr


def test_config_file_and_overrides(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: gmm-2d\nsolver: ddim\nsteps: 3\nnum_samples: 5\nseed: 4\noptions:\n  eta: 0.5\n")
    out = tmp_path / "o"
    assert run("sample", "--config", str(cfg), "--out", str(out), "--steps", "4", "--no-progress") == 0
    tensors, m, _ = read_outputs(out)
    assert m["model"] == "gmm-2d" and m["solver"] == "ddim" and m["seed"] == 4
    assert m["steps"] == 4 and m["nfe"] == 4  # the command line wins over the file
    assert m["options"]["eta"] == 0.5 and tensors["samples"].shape == (5, 2)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: gmm-2d\nsolvr: ddim\n")
    assert run("sample", "--config", str(bad), "--out", str(tmp_path / "b")) == 2


def test_shipped_configs_parse():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    for f in sorted(root.glob("*.yaml")):
        args = cli.build_parser().parse_args(["sample", *cli.load_config(str(f))])
        assert args.model in cli.MODELS and args.steps >= 1, f


def test_restoration_model_writes_before_after_clean(tmp_path):
    out = tmp_path / "mr"
    assert (
        run(
            "sample",
            "--model",
            "digits-mr",
            "--solver",
            "euler-maruyama",
            "--steps",
            "5",
            "--num-samples",
            "4",
            "--out",
            str(out),
            "--no-progress",
        )
        == 0
    )
    tensors, m, image = read_outputs(out)
    assert tensors["samples"].shape == (4, 1, 16, 16)
    r = m["restoration"]
    assert r["psnr_db"] > 0 and r["psnr_degraded_db"] > 0
    # degraded / restored / clean rows of 4, named in a margin on the left
    width, height = digits_grid_size(12, per_row=4)
    assert image.size[1] == height and image.size[0] > width
    assert r["png_rows"] == ["degraded", "restored (euler-maruyama)", "clean"]


def test_invert_and_sample_back_from_the_latent(tmp_path, capsys):
    """sample -> invert (rev-heun, exact) -> sample --latent reproduces the samples; ddim inversion is
    approximate; the latent is not overwritten without --force; bad inputs get clear errors."""
    data, lat, back = tmp_path / "data", tmp_path / "lat", tmp_path / "back"
    assert (
        sample(
            data, "--model", "gmm-2d", "--solver", "heun", "--steps", "20", "--num-samples", "50", "--dtype", "float64"
        )
        == 0
    )
    assert (
        run(
            "invert",
            "--model",
            "gmm-2d",
            "--input",
            str(data),
            "--out",
            str(lat),
            "--dtype",
            "float64",
            "--steps",
            "30",
            "--no-progress",
        )
        == 0
    )
    manifest = json.loads((lat / "manifest.json").read_text())
    assert manifest["solver"] == "rev-heun" and manifest["exact"] and manifest["nfe"] == 31
    assert sample(back, "--model", "gmm-2d", "--latent", str(lat / "latent.safetensors"), "--dtype", "float64") == 0
    x0 = load_file(str(data / "samples.safetensors"))["samples"]
    assert float((load_file(str(back / "samples.safetensors"))["samples"] - x0).abs().max()) < 1e-10
    assert run("invert", "--model", "gmm-2d", "--input", str(data), "--out", str(lat)) == 2
    assert "--force" in capsys.readouterr().err
    approx, back2 = tmp_path / "approx", tmp_path / "back2"
    assert (
        run(
            "invert",
            "--model",
            "gmm-2d",
            "--solver",
            "ddim",
            "--input",
            str(data),
            "--out",
            str(approx),
            "--dtype",
            "float64",
            "--no-progress",
        )
        == 0
    )
    assert sample(back2, "--model", "gmm-2d", "--latent", str(approx), "--dtype", "float64") == 0
    assert float((load_file(str(back2 / "samples.safetensors"))["samples"] - x0).abs().max()) > 1e-4
    assert (
        run("invert", "--model", "gmm-2d", "--solver", "ddpm", "--input", str(data), "--out", str(tmp_path / "x")) == 2
    )
    assert "stochastic" in capsys.readouterr().err
    assert run("sample", "--latent", str(tmp_path / "missing"), "--out", str(tmp_path / "y")) == 2
    assert "no such file" in capsys.readouterr().err


def test_solvers_options(capsys):
    """`diffsolve solvers --options NAME` prints each option's allowed values, default and meaning,
    from the solver's declared options; an alias's fixed options are named and left out."""
    assert run("solvers", "--options", "heun") == 0
    out = capsys.readouterr().out
    assert out.startswith("heun: ") and "s_churn (a number >= 0; default 0.0): EDM's churn" in out
    assert "space (one of 't', 'sigma'; default 'sigma')" in out
    assert run("solvers", "--options", "ddpm") == 0
    out = capsys.readouterr().out
    assert "fixes eta=1.0" in out and "\n  eta (" not in out and "renoise (" in out
    assert run("solvers", "--options", "dmcmc") == 0
    assert "eta: another name for langevin_step" in capsys.readouterr().out
    assert run("solvers", "--options", "nosuch") == 2
    assert "unknown solver 'nosuch'" in capsys.readouterr().err
