"""Edges of the ``diffsolve`` command line (issue 18): latents that load back with their model and
solver options, t_max / t_min, failed runs that leave nothing behind, config keys, eval of every
output, folder names that tell runs apart, bench notes, interrupts and labelled pictures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import diffsolve as ds
from diffsolve import cli

GMM = ("--model", "gmm-2d", "--no-progress")


def run(*args: str) -> int:
    return cli.main([*args])


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def samples(out: Path, name: str = "samples.safetensors", key: str = "samples") -> torch.Tensor:
    return load_file(str(out / name))[key]


@pytest.fixture(scope="module")
def gmm_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "gmm"
    assert (
        run(
            "sample",
            *GMM,
            "--solver",
            "heun",
            "--steps",
            "10",
            "--num-samples",
            "6",
            "--dtype",
            "float64",
            "--out",
            str(out),
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def restored(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("restore") / "r"
    assert run("restore", "--steps", "2", "--num-samples", "4", "--out", str(out), "--no-progress") == 0
    return out


# ---------------------------------------------------------------------- 2: latent options round trip


def _start_latent(x: torch.Tensor, solver: str = "mrs-adaptive") -> ds.Latent:
    """A latent that only starts a run (mrs-adaptive cannot invert, issue 18 point 2): x at VPLinear's
    t_max, sampled to its t_min with the solver's options."""
    sched = ds.schedules.VPLinear()
    return ds.Latent(
        x=x,
        aux=None,
        grid=torch.tensor([sched.t_max, sched.t_min], dtype=torch.float64),
        solver=solver,
        options=ds.get_solver(solver).options(),
        dtype=x.dtype,
    )


def test_controller_option_round_trips_through_a_latent(tmp_path, gmm_data):
    lat = _start_latent(samples(gmm_data)).save(tmp_path / "lat", manifest={"model": "gmm-2d"})
    assert manifest(lat)["options"]["controller"]["$object"].endswith(".StepSizeController")
    assert run("sample", *GMM, "--latent", str(lat), "--out", str(tmp_path / "back")) == 0
    saved = manifest(tmp_path / "back")["options"]["controller"]
    assert saved["class"] == "StepSizeController" and saved["init"]["safety"] == 0.7

    # a controller given as an option, and the JSON form rebuilt
    c = ds.samplers.StepSizeController(safety=0.8, factor_max=math.inf)
    assert cli._decode_option(cli._jsonable(c)) == c
    assert (
        run(
            "sample",
            *GMM,
            "--solver",
            "mrs-adaptive",
            "--num-samples",
            "2",
            "--out",
            str(tmp_path / "o"),
            "-o",
            "controller={class: StepSizeController, init: {safety: 0.8}}",
        )
        == 0
    )
    assert manifest(tmp_path / "o")["options"]["controller"]["init"]["safety"] == 0.8


@pytest.mark.parametrize("form", ["repr", "json"])
def test_latents_written_before_the_fix_still_load(tmp_path, gmm_data, form):
    """Latents that `diffsolve invert` wrote before it used Latent.save: the options in the header and
    the manifest, a controller as its repr (older) or as {"class", "init"}, the dtype by name or not
    at all. They load, with the controller rebuilt."""
    c = ds.samplers.StepSizeController(safety=0.7, exponent=0.25, factor_min=0.2, factor_max=2.0)
    opts = {"controller": repr(c) if form == "repr" else cli._jsonable(c)}
    lat = _start_latent(samples(gmm_data))
    folder = tmp_path / "lat"
    folder.mkdir()
    meta = {"solver": "mrs-adaptive", "options": json.dumps(opts), "model": "gmm-2d", "nfe": "1"}
    save_file({"x": lat.x, "grid": lat.grid}, str(folder / "latent.safetensors"), metadata=meta)
    old = {**meta, "options": opts, "nfe": 1, **({"dtype": "float64"} if form == "json" else {})}
    (folder / "manifest.json").write_text(json.dumps(old))
    read, info, _ = cli.load_latent(str(folder))
    assert read.options == {"controller": c} and info["model"] == "gmm-2d"
    assert read.dtype == (torch.float64 if form == "json" else None)
    assert run("sample", *GMM, "--latent", str(folder), "--dtype", "float64", "--out", str(tmp_path / "back")) == 0


# ----------------------------------------------------------------------------- 8: --t-max, --t-min


def test_t_max_and_t_min(tmp_path, gmm_data, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    base = ("sample", *GMM, "--solver", "euler", "--steps", "3", "--num-samples", "2")
    assert run(*base, "--t-max", "0.5", "--t-min", "0.01", "--out", "a") == 0
    m = manifest(tmp_path / "a")
    assert m["grid"][0] == pytest.approx(0.5) and m["grid"][-1] == pytest.approx(0.01)
    assert m["t_max"] == 0.5 and m["t_min"] == 0.01
    # part of the default folder name: runs with other time ranges do not collide
    assert run(*base) == 0 and run(*base, "--t-max", "0.5") == 0
    assert len(list((tmp_path / "diffsolve-out").iterdir())) == 2

    lat = tmp_path / "lat"
    assert (
        run(
            "invert",
            "--model",
            "gmm-2d",
            "--input",
            str(gmm_data),
            "--steps",
            "4",
            "--t-max",
            "0.7",
            "--out",
            str(lat),
            "--no-progress",
        )
        == 0
    )
    assert manifest(lat)["t_max"] == 0.7
    assert load_file(str(lat / "latent.safetensors"))["grid"][0].item() == pytest.approx(0.7)
    capsys.readouterr()
    assert run("sample", *GMM, "--latent", str(lat), "--t-max", "0.5", "--out", str(tmp_path / "x")) == 2
    assert "--t-max" in capsys.readouterr().err
    assert run(*base, "--t-max", "nan", "--out", "y") == 2


def test_flow_model_with_an_sde_solver_needs_t_max(tmp_path, capsys):
    out = tmp_path / "flow"
    args = (
        "sample",
        "--model",
        "digits-flow",
        "--solver",
        "euler-maruyama",
        "--steps",
        "2",
        "--num-samples",
        "2",
        "--out",
        str(out),
        "--no-progress",
    )
    assert run(*args) == 2
    assert "t_max" in capsys.readouterr().err
    assert run(*args, "--t-max", "0.999") == 0
    assert manifest(out)["t_max"] == 0.999


# ---------------------------------------------------------------- 9: a failed run leaves nothing


def test_failed_run_leaves_no_unfinished_run(tmp_path):
    out = tmp_path / "flow"
    args = (
        "sample",
        "--model",
        "digits-flow",
        "--steps",
        "2",
        "--num-samples",
        "2",
        "--out",
        str(out),
        "--no-progress",
    )
    assert run(*args, "--solver", "euler-maruyama") == 2  # fails in the first step (alpha = 0 at t = 1)
    assert not (out / cli.SHARD_DIR).exists()
    assert run(*args, "--solver", "euler") == 0  # the corrected command is not refused


# --------------------------------------------------------------- 10: the latent's model and solver


def test_sample_from_a_latent_takes_its_model_solver_and_dtype(tmp_path, gmm_data, capsys):
    lat = tmp_path / "lat"
    assert (
        run(
            "invert",
            "--input",
            str(gmm_data),
            "--out",
            str(lat),
            "--dtype",
            "float64",
            "--steps",
            "20",
            "--no-progress",
        )
        == 0
    )  # the model comes from the samples' own record
    assert manifest(lat)["model"] == "gmm-2d"
    back = tmp_path / "back"
    assert run("sample", "--latent", str(lat), "--out", str(back), "--no-progress") == 0
    m = manifest(back)
    assert m["model"] == "gmm-2d" and m["solver"] == "rev-heun" and m["dtype"] == "float64"
    assert float((samples(back) - samples(gmm_data)).abs().max()) < 1e-10
    # a model that does not fit the latent: a clear error, no traceback
    capsys.readouterr()
    assert (
        run("sample", "--latent", str(lat), "--model", "digits-oracle", "--out", str(tmp_path / "x"), "--no-progress")
        == 2
    )
    assert "gmm-2d" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 11: config keys


def test_config_takes_every_key_its_help_names(tmp_path):
    cfg = tmp_path / "cond.yaml"
    out = tmp_path / "cond"
    cfg.write_text(
        f"model: digits-vp-cond\nclass: 3\nguidance_scale: 1.5\nforce: true\nsteps: 2\nnum_samples: 2\n"
        f"no_progress: true\nout: {out}\n"
    )
    assert run("sample", "--config", str(cfg)) == 0
    assert run("sample", "--config", str(cfg)) == 0  # force: true
    m = manifest(out)
    assert m["class"] == 3 and m["guidance_scale"] == 1.5

    cfg.write_text(
        "pipeline: some/folder\nprompt: a cat\nlatent: some/latent\nt_max: 0.9\nt_min: 0.01\n"
        "compile: false\nshard_size: 8\n"
    )
    args = cli.build_parser().parse_args(["sample", *cli.load_config(str(cfg))])
    assert (args.pipeline, args.prompt, args.latent, args.t_max, args.t_min) == (
        "some/folder",
        "a cat",
        "some/latent",
        0.9,
        0.01,
    )
    assert not args.compile and args.shard_size == 8
    cfg.write_text("model: gmm-2d\nsolvr: ddim\n")
    with pytest.raises(cli.CLIError, match="guidance_scale"):  # the error lists what is allowed
        cli.load_config(str(cfg))


# ------------------------------------------------------------------------ 12: eval of every output


def test_eval_reads_restore_and_pipeline_outputs(tmp_path, restored, capsys):
    capsys.readouterr()
    assert run("eval", str(restored)) == 0
    out, err = capsys.readouterr()
    assert "digits-FD" in out and "restored" in out
    assert "sample count" in err and "300" in err  # digits-FD is only comparable at equal counts
    assert run("eval", str(restored), "--tensor", "unguided") == 0
    assert "unguided" in capsys.readouterr().out
    assert run("eval", str(restored), "--tensor", "nope") == 2
    assert "restored" in capsys.readouterr().err  # names what is there

    pipe = tmp_path / "pipe"
    assert (
        run(
            "sample",
            "--pipeline",
            str(ds.pretrained.path_of("digits-vp")),
            "--steps",
            "2",
            "--num-samples",
            "3",
            "--out",
            str(pipe),
            "--no-progress",
        )
        == 0
    )
    capsys.readouterr()
    assert run("eval", str(pipe), "--json") == 0
    assert json.loads(capsys.readouterr().out)["num_samples"] == 3


# ------------------------------------------------------------------ 13: default output folder names


def test_default_folders_tell_runs_apart(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    base = ("sample", *GMM, "--solver", "ddim", "--steps", "3", "--num-samples", "2")
    for extra in ((), ("-o", "eta=0.5"), ("--dtype", "float64"), ("--grid", "uniform"), ("--num-samples", "3")):
        assert run(*base, *extra) == 0, extra
    names = sorted(p.name for p in (tmp_path / "diffsolve-out").iterdir())
    assert len(names) == 5 and all(n.startswith("gmm-2d-ddim-3steps-seed0") for n in names)
    assert run(*base, "-o", "eta=0") == 2  # eta=0 is ddim's default: the same run, refused without --force
    capsys.readouterr()
    # adaptive solvers: no step count in the name, and a warning that --steps is ignored
    assert run("sample", *GMM, "--solver", "ode-rk45", "--steps", "7", "--num-samples", "2") == 0
    assert "--steps" in capsys.readouterr().err
    adaptive = [p for p in (tmp_path / "diffsolve-out").iterdir() if "rk45" in p.name]
    assert len(adaptive) == 1 and "7steps" not in adaptive[0].name and "adaptive" in adaptive[0].name
    assert manifest(adaptive[0])["steps"] is None


def test_default_folder_of_a_latent_run_depends_on_the_latent(tmp_path, gmm_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for seed in ("1", "2"):
        data = tmp_path / f"data{seed}"
        assert run("sample", *GMM, "--steps", "3", "--num-samples", "2", "--seed", seed, "--out", str(data)) == 0
        assert run("invert", "--input", str(data), "--steps", "4", "--no-progress") == 0
    lats = sorted((tmp_path / "diffsolve-out").iterdir())
    assert len(lats) == 2  # two inputs, two latent folders
    for lat in lats:
        assert run("sample", "--latent", str(lat), "--no-progress") == 0
    assert len(list((tmp_path / "diffsolve-out").iterdir())) == 4


# ------------------------------------------------------------------------------------ 15: bench etc.


def _fake_bench(monkeypatch, fail: str | None = None):
    from diffsolve import bench

    def fake(name):
        def run_it(out, quick=False):
            if name == fail:
                raise KeyboardInterrupt
            for stem in bench.module(name).STEMS:
                bench.write_text(out / f"{stem}.md", "table\n")

        return run_it

    for n in bench.NAMES:
        monkeypatch.setattr(bench.module(n), "run", fake(n))
    return bench


def test_bench_says_when_plots_are_left_out(tmp_path, monkeypatch, capsys):
    bench = _fake_bench(monkeypatch)
    monkeypatch.setattr(bench, "pyplot", lambda: None)
    assert run("bench", "--only", "ode", "--out", str(tmp_path)) == 0
    assert "matplotlib" in capsys.readouterr().err


def test_bench_interrupt_says_how_to_go_on(tmp_path, monkeypatch, capsys):
    _fake_bench(monkeypatch, fail="adaptive")
    assert run("bench", "--only", "ode,sde,adaptive,overhead", "--out", str(tmp_path)) == 130
    err = capsys.readouterr().err
    assert "--only adaptive,overhead" in err and "ode, sde" in err


def test_sample_interrupt_says_rerun_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    args = ("sample", *GMM, "--steps", "2", "--num-samples", "4", "--shard-size", "2", "--out", str(out))
    real, calls = ds.sample, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ds, "sample", flaky)
    assert run(*args) == 130
    err = capsys.readouterr().err
    assert "1 of 2 shards" in err and "rerun" in err and "resume" in err
    monkeypatch.setattr(ds, "sample", real)
    assert run(*args) == 0
    assert "resuming" in capsys.readouterr().out


def test_many_samples_make_a_near_square_picture():
    im = cli.image_grid(np.zeros((2048, 1, 16, 16)))
    assert 0.8 < im.width / im.height < 1.25
    im = cli.image_grid(np.zeros((10, 1, 8, 8)))  # few samples: 8 a row as before
    assert im.width > im.height


def test_restore_picture_labels_its_rows(restored):
    m = manifest(restored)
    with Image.open(restored / "restore.png") as im:
        im.load()
        picture = im.copy()
    tile, pad, cols = 8 * cli.image_scale(8, 8), cli.GRID_PAD, 4
    unlabelled = cols * tile + (cols + 1) * pad
    margin = picture.width - unlabelled
    assert margin > 20 and picture.height == 4 * tile + 5 * pad
    labels = np.asarray(picture)[:, :margin]
    assert (labels == 255).sum() > 20  # text
    assert m["png_rows"] == ["degraded", "dps (ddim)", "unguided (ddim)", "clean"]


def test_manifest_names_the_sample_count_once(tmp_path):
    assert run("sample", *GMM, "--steps", "2", "--num-samples", "3", "--out", str(tmp_path / "o")) == 0
    m = manifest(tmp_path / "o")
    assert "seeds" not in m and m["num_samples"] == 3


# ------------------------------------------------------------------------- errors and library bugs


def test_library_bugs_are_not_reported_as_usage_errors(tmp_path, monkeypatch, capsys):
    def broken(*a, **k):
        return None + 1  # a bug, not a check

    monkeypatch.setattr(ds, "sample", broken)
    with pytest.raises(TypeError):
        run("sample", *GMM, "--steps", "2", "--num-samples", "2", "--out", str(tmp_path / "o"))
    assert "bug" in capsys.readouterr().err
    # a check in the library stays a usage error
    monkeypatch.undo()
    assert (
        run("sample", *GMM, "--steps", "2", "--num-samples", "2", "--grid", "1,0.5,0.7", "--out", str(tmp_path / "p"))
        == 2
    )


def test_an_error_raised_inside_a_run_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    """Only what checks the user's input becomes a usage error: a ValueError from inside sampling (here
    ds.sample itself, then a check of the library's raised from a solver's step) propagates, the
    unfinished run is cleaned up as after any failure, and a bad --solver is still a usage error."""

    def boom(*a, **k):
        raise ValueError("boom")

    monkeypatch.setattr(ds, "sample", boom)
    with pytest.raises(ValueError, match="boom"):
        run("sample", *GMM, "--steps", "2", "--num-samples", "2", "--out", str(tmp_path / "o"))
    assert "diffsolve: error:" not in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    monkeypatch.undo()

    def broken_run(self, x, grid, noise, *, schedule, mu=None):  # a bug: a check of the library's, misused
        yield from ()
        ds.schedules.check_grid([float(grid[0])])

    monkeypatch.setattr(ds.samplers.solver_info("euler").cls, "run", broken_run)
    with pytest.raises(ValueError, match="at least 2 times"):
        run("sample", *GMM, "--solver", "euler", "--steps", "2", "--num-samples", "2", "--out", str(tmp_path / "s"))
    assert "bug" in capsys.readouterr().err
    monkeypatch.undo()

    assert run("sample", *GMM, "--solver", "nosuch", "--out", str(tmp_path / "x")) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffsolve: error:") and "'nosuch'" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_settings_the_library_checks_during_a_run_are_usage_errors(tmp_path, capsys):
    """A run refuses some settings only when it meets them: a method option's value (restore), a
    time range a solver cannot start from (sample); both name the setting and exit 2."""
    assert (
        run(
            "restore",
            "--method",
            "inpaint",
            "--steps",
            "2",
            "--num-samples",
            "1",
            "-o",
            "resample=0",
            "--out",
            str(tmp_path / "r"),
            "--no-progress",
        )
        == 2
    )
    assert "resample" in capsys.readouterr().err
    assert run("restore", "--method", "dps", "-o", "particles=3", "--out", str(tmp_path / "p")) == 2
    assert "particles" in capsys.readouterr().err
    assert (
        run(
            "sample",
            *GMM,
            "--solver",
            "mrs-adaptive",
            "--num-samples",
            "2",
            "--t-min",
            "0",
            "--out",
            str(tmp_path / "t"),
        )
        == 2
    )
    assert "t_min" in capsys.readouterr().err
    assert not (tmp_path / "t" / cli.SHARD_DIR).exists()
