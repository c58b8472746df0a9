"""Distributed training on CPU: `torchrun --nproc_per_node 2` with gloo, DDP and FSDP2, for every stage.

Two processes with a micro batch of 4 each must follow the loss trajectory of one
process with a batch of 8 (the same global batch: ranks take slices of it), write
the final model in the single-process format, and leave checkpoints that resume in
one process. FSDP2 (`fully_shard`) runs on CPU with gloo in torch >= 2.6, so it is
tested the same way, for every stage that allows it (PPO does not: its rollouts need
whole models on every rank, and its rollouts are per rank, so it is checked to run,
save and resume rather than against one process).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptlab.cli import main
from gptlab.config import GPTConfig
from gptlab.model import GPT
from gptlab.runs import save_model
from gptlab.tokenizer import EOS, CharTokenizer
from gptlab.train.checkpoints import checkpoint_dirs
from gptlab.train.metrics import read_metrics

from test_trainer import corpus, prepare, write_config

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--max-steps", "20", "--lr-decay-steps", "20", "--grad-accum", "2", "--lr", "3e-3", "--min-lr", "3e-4",
        "--warmup-steps", "4", "--eval-every", "10", "--eval-batches", "3", "--checkpoint-every", "10",
        "--keep-last", "5", "--sample-tokens", "8", "--seed", "3", "--device", "cpu"]
STAGE_ARGS = ["--max-steps", "6", "--eval-every", "3", "--checkpoint-every", "3", "--keep-last", "5",
              "--lr", "3e-3", "--min-lr", "3e-4", "--seed", "3", "--device", "cpu"]
ALPHABET = "abcdefghij ."

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def torchrun(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "gptlab.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def assert_same_trajectory(a: Path, b: Path, steps: int, tol: float = 1e-4) -> None:
    ra, rb = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(1, steps + 1))
    for x, y in zip(ra, rb):
        assert abs(x["loss"] - y["loss"]) <= tol, (x["step"], x["loss"], y["loss"])
        assert x["tokens"] == y["tokens"]
        if "val_loss" in x:
            assert abs(x["val_loss"] - y["val_loss"]) <= tol


def assert_same_weights(a: Path, b: Path, tol: float = 1e-4) -> None:
    """The final model and any head file beside it hold the same tensors."""
    files = sorted(p.name for p in a.glob("*.safetensors"))
    assert files == sorted(p.name for p in b.glob("*.safetensors")) and "model.safetensors" in files
    for name in files:
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys()
        assert all(torch.allclose(wa[k], wb[k], atol=tol) for k in wa), name


def resume_on_one(run: Path, out: Path, command: list[str], *extra: str) -> None:
    """A copy of ``run`` without its last checkpoint and final model, resumed in this process."""
    shutil.copytree(run, out)
    shutil.rmtree(checkpoint_dirs(out)[-1])
    (out / "model.safetensors").unlink()
    assert main([*command, "--out", str(out), "--resume", *extra]) == 0


# ------------------------------------------------------------------ pretraining
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("dist")
    data = prepare(corpus(30_000, seed=1), work / "data")
    config = write_config(work / "tiny.yaml")
    single = work / "single"
    assert main(["train", "--data", str(data), "--out", str(single), "--config", str(config),
                 "--batch-size", "8", *ARGS]) == 0
    return work, data, config, single


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_and_resume_on_one(setup, mode):
    work, data, config, single = setup
    run = work / mode
    torchrun("train", "--data", str(data), "--out", str(run), "--config", str(config), "--batch-size", "4", *ARGS,
             *(["--fsdp"] if mode == "fsdp" else []))
    assert_same_trajectory(single, run, 20)
    # the final model and the checkpoints have the single-process format
    assert [p.name for p in checkpoint_dirs(run)] == ["step-00000010", "step-00000020"]
    assert_same_weights(single, run)
    opt = torch.load(checkpoint_dirs(run)[-1] / "optimizer.pt", weights_only=True)
    assert set(opt["state"]) == set(torch.load(checkpoint_dirs(single)[-1] / "optimizer.pt",
                                               weights_only=True)["state"])
    # a checkpoint written by two processes resumes in one (with the same global batch)
    resumed = work / f"{mode}-resumed-on-1"
    resume_on_one(run, resumed, ["train", "--data", str(data), *ARGS], "--batch-size", "8")
    assert_same_trajectory(single, resumed, 20)


# ------------------------------------------------- Muon and a mixture of experts
MOE = ["--preset", "modern-tiny-moe", "--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--n-experts", "4",
       "--top-k", "2", "--block-size", "32", "--no-zero-init-proj"]
SHORT = [{"20": "10", "10": "5"}.get(a, a) for a in ARGS]  # 10 steps, checkpoints at 5 and 10


@pytest.mark.parametrize("mode,optimizer,tol", [("ddp", "adamw", 1e-4), ("fsdp", "muon", 2e-3)])
def test_moe_and_muon_in_two_processes_match_one(setup, mode, optimizer, tol):
    """The router's per-sequence losses make the same gradient on two ranks as on one, and Muon
    orthogonalises the whole matrix under FSDP2's shards. Muon's Newton-Schulz runs in bfloat16 (torch's,
    as Keller Jordan's), so the last-bit differences of a gradient summed on two ranks become ~1e-4
    differences of the update, and more in an expert with few tokens (a small gradient is scaled up): the
    losses follow within 2e-3 and the weights are not compared (AdamW with the same model matches to 1e-6)."""
    work, data, _, _ = setup
    single, run = work / f"moe-single-{mode}", work / f"moe-{mode}"
    flags = [*MOE, "--optimizer", optimizer, "--muon-lr", "0.03"]
    assert main(["train", "--data", str(data), "--out", str(single), *flags, "--batch-size", "8", *SHORT]) == 0
    torchrun("train", "--data", str(data), "--out", str(run), *flags, "--batch-size", "4", *SHORT,
             *(["--fsdp"] if mode == "fsdp" else []))
    assert_same_trajectory(single, run, 10, tol=tol)
    if optimizer == "adamw":
        assert_same_weights(single, run)
    resumed = work / f"moe-{mode}-resumed-on-1"
    resume_on_one(run, resumed, ["train", "--data", str(data), *SHORT], "--batch-size", "8")
    assert_same_trajectory(single, resumed, 10, tol=tol)


# ------------------------------------------------------------ the other stages
def words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice(ALPHABET[:10]) for _ in range(rng.randint(1, 4))) for _ in range(n))


def jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory) -> dict[str, str]:
    """A tiny base model and a file of each kind; sequences of different lengths, so a loss averaged per rank
    would differ from the one process's (the stages normalise by the global batch)."""
    work = tmp_path_factory.mktemp("dist-stages")
    rng = random.Random(0)
    tok = CharTokenizer.from_text(ALPHABET, special_tokens=[EOS])
    torch.manual_seed(0)
    base = save_model(work / "base", GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64,
                                                   vocab_size=tok.vocab_size)), tok)
    task = [{"text": words(rng, rng.randint(1, 6)), "label": rng.choice(["x", "y"])} for _ in range(48)]
    sft = [{"prompt": words(rng, 2), "response": words(rng, rng.randint(1, 5))} for _ in range(48)]
    ranks = [{"prompt": words(rng, 2), "responses": [words(rng, rng.randint(1, 4)) + s for s in ("a", "b", "c")],
              "ranking": [0, 1, 2]} for _ in range(48)]
    inputs = {"work": str(work), "base": str(base),
              "task": jsonl(work / "task.jsonl", task[:40]), "task_val": jsonl(work / "task_val.jsonl", task[40:]),
              "sft": jsonl(work / "sft.jsonl", sft[:40]), "sft_val": jsonl(work / "sft_val.jsonl", sft[40:]),
              "rank": jsonl(work / "rank.jsonl", ranks[:40]), "rank_val": jsonl(work / "rank_val.jsonl", ranks[40:]),
              "prompts": jsonl(work / "prompts.jsonl", [{"prompt": words(rng, 2)} for _ in range(32)])}
    assert main(["rm", "--model", str(base), "--data", inputs["rank"], "--out", str(work / "rm"),
                 "--max-steps", "2", "--device", "cpu"]) == 0
    inputs["rm"] = str(work / "rm")
    return inputs


def stage_command(stage: str, x: dict[str, str]) -> list[str]:
    if stage == "finetune":
        return ["finetune", "--task", "classification", "--model", x["base"], "--train", x["task"],
                "--val", x["task_val"], "--dropout", "0", *STAGE_ARGS]  # dropout draws differ per rank
    if stage == "ppo":
        return ["ppo", "--policy", x["base"], "--reward", x["rm"], "--prompts", x["prompts"], "--iterations", "2",
                "--rollout-batch", "4", "--minibatches", "2", "--ppo-epochs", "1", "--max-new-tokens", "4",
                "--val-fraction", "0.2", "--lr", "1e-3", "--min-lr", "1e-3", "--seed", "3", "--device", "cpu"]
    data, val = {"sft": ("sft", "sft_val"), "rm": ("rank", "rank_val"), "dpo": ("rank", "rank_val")}[stage]
    return [stage, "--model", x["base"], "--data", x[data], "--val", x[val], *STAGE_ARGS]


@pytest.fixture(scope="module")
def single_runs(stage_inputs) -> dict[str, Path]:
    """Each stage in one process with a batch of 8: the runs two processes must reproduce."""
    runs = {}
    for stage in ("finetune", "sft", "rm", "dpo"):
        runs[stage] = Path(stage_inputs["work"]) / f"{stage}-single"
        assert main([*stage_command(stage, stage_inputs), "--out", str(runs[stage]), "--batch-size", "8"]) == 0
    return runs


@pytest.mark.parametrize("stage,mode", [(s, m) for s in ("finetune", "sft", "rm", "dpo") for m in ("ddp", "fsdp")])
def test_every_stage_on_two_processes_matches_one_and_resumes_on_one(stage_inputs, single_runs, stage, mode):
    work, command = Path(stage_inputs["work"]), stage_command(stage, stage_inputs)
    run = work / f"{stage}-{mode}"
    torchrun(*command, "--out", str(run), "--batch-size", "4", *(["--fsdp"] if mode == "fsdp" else []))
    assert_same_trajectory(single_runs[stage], run, 6)
    assert [p.name for p in checkpoint_dirs(run)] == ["step-00000003", "step-00000006"]
    # The ranking loss does not change when every score shifts: the gradients of the head's bias and of what
    # only shifts scores are rounding noise, which Adam scales up to steps of the learning rate's size.
    weight_tol = 1e-3 if stage == "rm" else 1e-4
    assert_same_weights(single_runs[stage], run, weight_tol)  # the final save (a head too, for finetune and rm)
    single_config = json.loads((single_runs[stage] / "config.json").read_text())
    run_config = json.loads((run / "config.json").read_text())
    assert run_config["stage"] == single_config["stage"] and run_config.keys() == single_config.keys()
    resumed = work / f"{stage}-{mode}-resumed-on-1"
    resume_on_one(run, resumed, command, "--batch-size", "8")
    assert_same_trajectory(single_runs[stage], resumed, 6)
    assert_same_weights(single_runs[stage], resumed, weight_tol)


def test_ppo_on_two_processes_saves_and_resumes_on_one(stage_inputs):
    work, command = Path(stage_inputs["work"]), stage_command("ppo", stage_inputs)
    run = work / "ppo-ddp"
    torchrun(*command, "--out", str(run))
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all("reward" in r and "kl" in r for r in records)
    assert [p.name for p in checkpoint_dirs(run)] == ["step-00000002", "step-00000004"]
    assert json.loads((run / "config.json").read_text())["stage"] == "ppo" and (run / "model.safetensors").is_file()
    resumed = work / "ppo-resumed-on-1"
    resume_on_one(run, resumed, command)
    again = read_metrics(resumed / "metrics.jsonl")
    assert [r["step"] for r in again] == [1, 2, 3, 4] and again[:2] == records[:2]
    assert (resumed / "model.safetensors").is_file()


def test_lora_on_two_processes_matches_one(stage_inputs):
    """DDP trains the adapters alone (the frozen weights have no gradients to reduce) as one process does."""
    work, command = Path(stage_inputs["work"]), [*stage_command("sft", stage_inputs), "--lora-rank", "2"]
    single, run = work / "sft-lora-single", work / "sft-lora-ddp"
    assert main([*command, "--out", str(single), "--batch-size", "8"]) == 0
    torchrun(*command, "--out", str(run), "--batch-size", "4")
    assert_same_trajectory(single, run, 6)
    assert (run / "adapter_model.safetensors").is_file()
    assert_same_weights(single, run)  # the frozen base and the adapters
