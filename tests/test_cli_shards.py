"""Sharded CLI runs: resume after a kill, and torchrun with two CPU processes (gloo)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

BASE = [sys.executable, "-m", "diffsolve", "sample", "--model", "gmm-2d", "--no-progress"]


def _env():
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _samples(out: Path) -> torch.Tensor:
    return load_file(str(out / "samples.safetensors"))["samples"]


def test_killed_run_resumes_to_the_same_result(tmp_path):
    args = ["--solver", "euler-maruyama", "--steps", "1500", "--num-samples", "200", "--shard-size", "50"]
    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [*BASE, *args, "--out", str(interrupted)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    shards = interrupted / ".shards"
    deadline = time.time() + 120
    while time.time() < deadline and not (shards / "shard-00001.safetensors").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in shards.glob("shard-*.safetensors"))
    assert 2 <= len(done) < 4, done  # killed mid-way
    assert not (interrupted / "samples.safetensors").exists()
    for p in shards.glob("shard-*.safetensors"):  # every shard on disk is complete
        assert load_file(str(p))["samples"].shape == (50, 2)

    resumed = subprocess.run([*BASE, *args, "--out", str(interrupted)], env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout and f"{len(done)} of 4 shards" in resumed.stdout
    assert not shards.exists() and not list(interrupted.glob(".*tmp*"))

    straight = tmp_path / "straight"
    full = subprocess.run([*BASE, *args, "--out", str(straight)], env=_env(), capture_output=True, text=True)
    assert full.returncode == 0, full.stderr
    assert torch.equal(_samples(interrupted), _samples(straight))


def test_resume_refuses_other_settings(tmp_path):
    out = tmp_path / "o"
    shards = out / ".shards"
    shards.mkdir(parents=True)
    (shards / "run.json").write_text('{"model": "gmm-2d", "steps": 99}')
    r = subprocess.run(
        [*BASE, "--steps", "3", "--num-samples", "4", "--out", str(out)], env=_env(), capture_output=True, text=True
    )
    assert r.returncode == 2 and "unfinished run with other settings" in r.stderr
    r = subprocess.run(
        [*BASE, "--steps", "3", "--num-samples", "4", "--out", str(out), "--force"],
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr


def test_torchrun_two_processes_equal_single_process(tmp_path):
    args = ["--solver", "ddpm", "--steps", "40", "--num-samples", "60", "--shard-size", "15", "--seed", "3"]
    single = tmp_path / "single"
    r = subprocess.run([*BASE, *args, "--out", str(single)], env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    multi = tmp_path / "multi"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "diffsolve",
        *BASE[3:],
        *args,
        "--out",
        str(multi),
    ]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stdout
    assert torch.equal(_samples(single), _samples(multi))
