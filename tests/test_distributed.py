"""Distributed training on CPU: `torchrun --nproc_per_node 2` with gloo, DDP and FSDP2.

Two processes with a micro batch of 4 each must follow the loss trajectory of one
process with a batch of 8 (the same global batch: ranks take slices of it), and a
checkpoint written by two processes (gathered full state dicts) must resume in one.
FSDP2 (`fully_shard`) runs on CPU with gloo in torch >= 2.6, so it is tested the same way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptlab.cli import main
from gptlab.train.checkpoints import checkpoint_dirs
from gptlab.train.metrics import read_metrics

from test_trainer import corpus, prepare, write_config

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--max-steps", "20", "--lr-decay-steps", "20", "--grad-accum", "2", "--lr", "3e-3", "--min-lr", "3e-4",
        "--warmup-steps", "4", "--eval-every", "10", "--eval-batches", "3", "--checkpoint-every", "10",
        "--keep-last", "5", "--sample-tokens", "8", "--seed", "3", "--device", "cpu"]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("dist")
    data = prepare(corpus(30_000, seed=1), work / "data")
    config = write_config(work / "tiny.yaml")
    single = work / "single"
    assert main(["train", "--data", str(data), "--out", str(single), "--config", str(config),
                 "--batch-size", "8", *ARGS]) == 0
    return work, data, config, single


def torchrun(data: Path, out: Path, config: Path, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "gptlab.cli", "train", "--data", str(data), "--out", str(out), "--config", str(config),
           "--batch-size", "4", *ARGS, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def assert_same_trajectory(a: Path, b: Path, tol: float = 1e-4) -> None:
    ra, rb = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(1, 21))
    for x, y in zip(ra, rb):
        assert abs(x["loss"] - y["loss"]) <= tol, (x["step"], x["loss"], y["loss"])
        assert x["tokens"] == y["tokens"]
        if "val_loss" in x:
            assert abs(x["val_loss"] - y["val_loss"]) <= tol


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_and_resume_on_one(setup, mode):
    work, data, config, single = setup
    run = work / mode
    torchrun(data, run, config, *(["--fsdp"] if mode == "fsdp" else []))
    assert_same_trajectory(single, run)
    # the final model and the checkpoints have the single-process format
    assert [p.name for p in checkpoint_dirs(run)] == ["step-00000010", "step-00000020"]
    from safetensors.torch import load_file

    a, b = load_file(str(single / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    opt = torch.load(checkpoint_dirs(run)[-1] / "optimizer.pt", weights_only=True)
    assert set(opt["state"]) == set(torch.load(checkpoint_dirs(single)[-1] / "optimizer.pt",
                                               weights_only=True)["state"])

    # a checkpoint written by two processes resumes in one (with the same global batch)
    resumed = work / f"{mode}-resumed-on-1"
    shutil.copytree(run, resumed)
    shutil.rmtree(checkpoint_dirs(resumed)[-1])
    (resumed / "model.safetensors").unlink()
    assert main(["train", "--data", str(data), "--out", str(resumed), "--resume", "--batch-size", "8",
                 *ARGS]) == 0
    assert_same_trajectory(single, resumed)
