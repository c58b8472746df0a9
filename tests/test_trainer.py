"""The shared trainer and `gptlab train` / `gptlab eval ppl`: schedule, optimizer groups, accumulation,
exact resume (Ctrl-C mid-accumulation, SIGINT, kill -9), corrupted checkpoints, divergence, outputs.

Real tiny models on a tiny character corpus; no mocks. Runs in well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gptlab.cli import main
from gptlab.config import GPTConfig
from gptlab.errors import CheckpointError, ConfigError
from gptlab.model import GPT
from gptlab.runs import load_model
from gptlab.stages.pretrain import build_model_config, run_pretrain
from gptlab.train.checkpoints import checkpoint_dirs, verify_checkpoint
from gptlab.train.config import TrainConfig
from gptlab.train.loop import Stage, Trainer
from gptlab.train.metrics import peak_flops, read_metrics
from gptlab.train.optim import lr_at, make_optimizers, param_groups, set_lr

ROOT = Path(__file__).resolve().parents[1]

# A tiny model: 2 layers, 32 wide, 32-character context (a step takes a few milliseconds).
TINY_MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32}
# The reference run shared by the resume tests: accumulation and dropout make resumption non-trivial.
RUN_ARGS = ["--max-steps", "40", "--batch-size", "4", "--grad-accum", "2", "--dropout", "0.1",
            "--lr", "3e-3", "--min-lr", "3e-4", "--warmup-steps", "5", "--eval-every", "10",
            "--eval-batches", "2", "--checkpoint-every", "10", "--keep-last", "5", "--sample-tokens", "8",
            "--log-every", "1", "--seed", "7"]


def corpus(n_chars: int = 40_000, seed: int = 0) -> str:
    """Deterministic pseudo-English with enough structure for a tiny model to learn quickly."""
    rng = random.Random(seed)
    subjects = ["the king", "a fool", "my lord", "the queen", "good sir", "this night"]
    verbs = ["speaks", "sleeps", "loves", "fears", "will go", "hath seen"]
    objects = ["the crown.", "his horse.", "a letter.", "the sea.", "her ring.", "no more."]
    out, n = [], 0
    while n < n_chars:
        line = f"{rng.choice(subjects).upper() if rng.random() < 0.2 else rng.choice(subjects)} " \
               f"{rng.choice(verbs)} {rng.choice(objects)}\n"
        out.append(line)
        n += len(line)
    return "".join(out)


def write_config(path: Path, model: dict | None = None, train: dict | None = None) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"model": model if model is not None else TINY_MODEL,
                                    "train": train or {}}), encoding="utf-8")
    return path


def prepare(text: str, out: Path) -> Path:
    src = out.parent / f"{out.name}.txt"
    src.write_text(text, encoding="utf-8")
    assert main(["prepare", "--input", str(src), "--tokenizer", "char", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("trainer")


@pytest.fixture(scope="module")
def data_dir(work) -> Path:
    return prepare(corpus(), work / "data")


@pytest.fixture(scope="module")
def tiny_config(work) -> Path:
    return write_config(work / "tiny.yaml")


def train_cli(data: Path, out: Path, config: Path, *extra: str) -> int:
    return main(["train", "--data", str(data), "--out", str(out), "--config", str(config), *extra])


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl")]


def weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


@pytest.fixture(scope="module")
def reference_run(work, data_dir, tiny_config) -> Path:
    """40 uninterrupted steps; every resume test must reproduce it exactly."""
    run = work / "reference"
    assert train_cli(data_dir, run, tiny_config, *RUN_ARGS) == 0
    return run


# ------------------------------------------------------------------ schedule
def test_lr_schedule_hand_values():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, lr_decay_steps=110, max_steps=200)
    assert lr_at(0, cfg) == 0.0
    assert lr_at(1, cfg) == pytest.approx(1e-4)
    assert lr_at(5, cfg) == pytest.approx(5e-4)
    assert lr_at(10, cfg) == pytest.approx(1e-3)  # peak exactly at the end of warmup
    assert lr_at(60, cfg) == pytest.approx(5.5e-4)  # half way down the cosine: (1e-3 + 1e-4) / 2
    assert lr_at(35, cfg) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi / 4)) * 9e-4)
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    assert lr_at(150, cfg) == pytest.approx(1e-4)  # floor after the decay
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    # lr_decay_steps defaults to max_steps; no warmup starts on the cosine
    cfg = TrainConfig(lr=2.0, min_lr=0.0, warmup_steps=0, max_steps=4)
    assert [lr_at(s, cfg) for s in (1, 2, 3, 4)] == pytest.approx(
        [1 + math.cos(math.pi / 4), 1.0, 1 + math.cos(3 * math.pi / 4), 0.0])


def test_weight_decay_only_on_matrices():
    model = GPT(GPTConfig(vocab_size=50, **TINY_MODEL))
    decay, no_decay = param_groups(model.parameters(), 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    plain = {names[id(p)] for p in no_decay["params"]}
    assert {"wte.weight", "wpe.weight", "h.0.attn.c_attn.weight", "h.1.mlp.c_proj.weight"} <= decayed
    assert all(n.endswith(".bias") or ".ln_" in n or n.startswith("ln_f") for n in plain)
    assert all(not n.endswith(".bias") and "ln" not in n for n in decayed)
    # the tied LM head is the embedding: counted once, every parameter in exactly one group
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params()


@pytest.mark.parametrize("preset", ["tiny", "modern-tiny-moe"])
def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(preset):
    model = GPT(GPTConfig.from_preset(preset, vocab_size=50, n_layer=2))
    adamw, muon = make_optimizers(model, TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.05), torch.device("cpu"))
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, torch.optim.Muon)
    names = {id(p): n for n, p in model.named_parameters()}
    orthogonalised = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    rest = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert not orthogonalised & rest and len(orthogonalised | rest) == len(names)
    assert all(n.startswith("h.") and n.endswith("weight") and "router" not in n and "norm" not in n
               and "ln_" not in n for n in orthogonalised)
    assert {"wte.weight", "lm_head.weight"} & set(names) <= rest
    assert "h.1.attn.c_attn.weight" in orthogonalised
    set_lr([adamw, muon], 50, TrainConfig(lr=1e-3, muon_lr=0.05, warmup_steps=100))
    assert adamw.param_groups[0]["lr"] == pytest.approx(5e-4) and muon.param_groups[0]["lr"] == pytest.approx(0.025)


def test_peak_flops_table():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert peak_flops("NVIDIA A10", "bf16") == 125e12
    assert peak_flops("NVIDIA A10G", "bf16") is None  # not in the table: no MFU rather than a guess
    assert peak_flops("Some Future GPU", "bf16") is None


# ------------------------------------------------------------------ configs
def test_train_config_types_and_unknown_keys():
    assert TrainConfig.from_dict({"lr": "1e-3", "max_steps": 5}).lr == 1e-3  # PyYAML reads 1e-3 as str
    with pytest.raises(ConfigError, match="max_steps"):
        TrainConfig.from_dict({"max_steps": 2.5}, source="x.yaml: train")
    with pytest.raises(ConfigError, match="x.yaml: train.*bogus"):
        TrainConfig.from_dict({"bogus": 1}, source="x.yaml: train")
    with pytest.raises(ConfigError, match="min_lr"):
        TrainConfig(lr=1e-4, min_lr=1e-3)
    cfg = build_model_config({"preset": "tiny"}, 77, TrainConfig(block_size=48, dropout=0.2))
    assert (cfg.vocab_size, cfg.block_size, cfg.dropout, cfg.n_layer) == (77, 48, 0.2, 4)
    with pytest.raises(ConfigError, match="vocab_size"):
        build_model_config({"preset": "tiny", "vocab_size": 10}, 77, TrainConfig())


def test_config_file_unknown_key_exits_2(work, data_dir, capsys):
    bad = write_config(work / "bad.yaml", train={"max_steps": 3, "lerning_rate": 0.1})
    assert train_cli(data_dir, work / "bad-run", bad) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.yaml" in err and "lerning_rate" in err
    bad = write_config(work / "bad2.yaml", model={**TINY_MODEL, "n_layers": 3})
    assert train_cli(data_dir, work / "bad-run", bad) == 2
    assert "n_layers" in capsys.readouterr().err
    bad = write_config(work / "bad3.yaml", train={"batch_size": "eight"})
    assert train_cli(data_dir, work / "bad-run", bad) == 2
    assert "batch_size" in capsys.readouterr().err
    assert not (work / "bad-run").exists()


# -------------------------------------------------------------- the loop
class FixedStage(Stage):
    """The same 8 sequences every step, split into micro batches of ``per_micro`` (for accumulation)."""

    name = "fixed"

    def __init__(self, x: torch.Tensor, y: torch.Tensor, per_micro: int):
        self.x, self.y, self.per_micro = x, y, per_micro

    def batch(self, step: int, micro_step: int):
        s = slice(micro_step * self.per_micro, (micro_step + 1) * self.per_micro)
        return self.x[s], self.y[s]

    def loss(self, model, batch):
        _, loss = model(*batch)
        return loss, {}

    def save(self, run_dir, model):
        pass


def test_grad_accumulation_equivalence(tmp_path):
    """8 sequences as one batch of 8 == eight micro batches of 1 (gradients and the step after them)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50, (8, 32), generator=g)
    y = torch.randint(0, 50, (8, 32), generator=g)
    grads, params = [], []
    for i, (batch, accum) in enumerate([(8, 1), (1, 8), (2, 4)]):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=50, **TINY_MODEL))
        cfg = TrainConfig(max_steps=1, batch_size=batch, grad_accum=accum, lr=1e-2, warmup_steps=0,
                          eval_every=0, checkpoint_every=0)
        trainer = Trainer(model, FixedStage(x, y, batch), cfg, tmp_path / f"r{i}", progress=False)
        loss, _, _, _ = trainer.forward_backward(1)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        trainer._optimizer_step(1)
        params.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for other in grads[1:]:
        for n, gr in grads[0].items():
            assert torch.allclose(gr, other[n], atol=1e-6, rtol=0), n
    for other in params[1:]:
        for n, p in params[0].items():
            assert torch.allclose(p, other[n], atol=1e-6, rtol=0), n


def test_loss_falls(work, data_dir, tiny_config):
    run = work / "falls"
    assert train_cli(data_dir, run, tiny_config, "--max-steps", "200", "--batch-size", "8", "--lr", "3e-3",
                     "--warmup-steps", "20", "--eval-every", "100", "--eval-batches", "4",
                     "--checkpoint-every", "0", "--log-every", "10") == 0
    recs = read_metrics(run / "metrics.jsonl")
    assert recs[0]["step"] == 10 and recs[-1]["step"] == 200
    first, last = recs[0]["loss"], recs[-1]["loss"]
    assert last < first - 1.5 and last < 2.0, (first, last)  # ~3.7 -> ~1.6 nats
    val = [r["val_loss"] for r in recs if "val_loss" in r]
    assert len(val) == 2 and val[-1] < val[0] and val[-1] < 2.0
    # the final model is a run directory that load_model understands, tokenizer included
    model = load_model(str(run))
    assert model.config.vocab_size == json.loads((data_dir / "meta.json").read_text())["vocab_size"]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["stage"] == "pretrain" and cfg["train"]["max_steps"] == 200 and cfg["tokenizer"] == "tokenizer"
    assert all("_orig_mod" not in k for k in weights(run))


def test_outputs_of_a_run(reference_run, data_dir):
    recs = read_metrics(reference_run / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, 41))
    for r in recs:
        assert {"step", "loss", "lr", "tokens_per_sec", "grad_norm"} <= set(r)
        assert r["tokens"] == r["step"] * 4 * 2 * 32
    evals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30, 40]
    bpt = json.loads((data_dir / "meta.json").read_text())
    for r in evals:
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2) / _bytes_per_token(data_dir))
        assert isinstance(r["sample"], str) and len(r["sample"]) > 0
    assert bpt["vocab_size"] > 0
    from matplotlib.image import imread

    img = imread(str(reference_run / "loss.png"))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert [p.name for p in checkpoint_dirs(reference_run)] == [f"step-{s:08d}" for s in (10, 20, 30, 40)]
    manifest = verify_checkpoint(checkpoint_dirs(reference_run)[-1])
    assert {"model.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json"} <= set(manifest["files"])
    state = json.loads((checkpoint_dirs(reference_run)[-1] / "trainer_state.json").read_text())
    assert state["step"] == 40 and state["cursor"] == {"step": 41, "micro_step": 0} and state["metrics_lines"] == 40
    # tensors-only optimizer state
    opt = torch.load(checkpoint_dirs(reference_run)[-1] / "optimizer.pt", weights_only=True)
    assert "wte.weight" in opt["state"] and "lm_head.weight" not in opt["state"]


def _bytes_per_token(data_dir: Path) -> float:
    from gptlab.data import TokenData

    return float(TokenData(str(data_dir)).bytes_per_token("val"))


def test_keep_last(work, data_dir, tiny_config):
    run = work / "keep"
    assert train_cli(data_dir, run, tiny_config, "--max-steps", "12", "--checkpoint-every", "3",
                     "--keep-last", "2", "--eval-every", "0", "--sample-tokens", "0") == 0
    assert [p.name for p in checkpoint_dirs(run)] == ["step-00000009", "step-00000012"]


# ---------------------------------------------------------- exact resume
def test_resume_after_keyboard_interrupt_mid_accumulation(work, data_dir, tiny_config, reference_run):
    """Ctrl-C raised inside micro step 1 of step 23: the step is dropped, step 22 saved, resume is exact."""
    from gptlab.stages import pretrain

    run = work / "kbint"
    orig = pretrain.PretrainStage.batch

    def batch(self, step, micro_step):
        if (step, micro_step) == (23, 1):
            raise KeyboardInterrupt
        return orig(self, step, micro_step)

    pretrain.PretrainStage.batch = batch
    try:
        assert train_cli(data_dir, run, tiny_config, *RUN_ARGS) == 130
    finally:
        pretrain.PretrainStage.batch = orig
    assert checkpoint_dirs(run)[-1].name == "step-00000022"
    assert [s for s, _ in losses(run)] == list(range(1, 23))
    assert train_cli(data_dir, run, tiny_config, *RUN_ARGS, "--resume") == 0
    assert losses(run) == losses(reference_run)  # bit for bit, including dropout
    ref = weights(reference_run)
    assert all(torch.equal(v, ref[k]) for k, v in weights(run).items())


def _start(data: Path, run: Path, config: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "gptlab.cli", "train", "--data", str(data), "--out", str(run),
                             "--config", str(config), *RUN_ARGS, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    end = time.time() + timeout
    while not cond():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"trainer exited early ({proc.returncode}): {err.decode()[-2000:]}")
        if time.time() > end:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.002)


def _metric_lines(run: Path) -> int:
    try:
        return (run / "metrics.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_checkpoints_and_resumes_exactly(work, data_dir, tiny_config, reference_run, sig, code):
    run = work / f"sig{int(sig)}"
    proc = _start(data_dir, run, tiny_config)
    _wait_for(lambda: _metric_lines(run) >= 3, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err.decode()[-2000:]
    last = checkpoint_dirs(run)[-1]
    stopped = int(last.name.split("-")[1])
    assert 3 <= stopped < 40  # a checkpoint at the step it was in when the signal came
    assert len(read_metrics(run / "metrics.jsonl")) == stopped
    assert train_cli(data_dir, run, tiny_config, *RUN_ARGS, "--resume") == 0
    assert losses(run) == losses(reference_run)


def test_kill9_between_checkpoints_resumes_exactly(work, data_dir, tiny_config, reference_run):
    run = work / "kill9"
    proc = _start(data_dir, run, tiny_config)
    _wait_for(lambda: (run / "checkpoints" / "step-00000020").is_dir(), proc)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert len(read_metrics(run / "metrics.jsonl")) >= 20  # lines after the checkpoint are dropped on resume
    assert train_cli(data_dir, run, tiny_config, *RUN_ARGS, "--resume") == 0
    assert losses(run) == losses(reference_run)
    ref = weights(reference_run)
    assert all(torch.equal(v, ref[k]) for k, v in weights(run).items())
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, 41))


# -------------------------------------------------------------- failures
def test_corrupted_checkpoint_is_named(work, reference_run, data_dir, tiny_config, capsys):
    run = work / "corrupt"
    shutil.copytree(reference_run, run)
    latest = checkpoint_dirs(run)[-1]
    blob = bytearray((latest / "model.safetensors").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (latest / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="model.safetensors.*corrupted"):
        verify_checkpoint(latest)
    assert train_cli(data_dir, run, tiny_config, *RUN_ARGS, "--resume") == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "delete" in err and str(latest) in err
    # truncated optimizer state
    shutil.rmtree(latest)
    latest = checkpoint_dirs(run)[-1]
    opt = latest / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="optimizer.pt.*truncated"):
        verify_checkpoint(latest)
    # deleting the bad checkpoint resumes from the one before
    shutil.rmtree(latest)
    assert train_cli(data_dir, run, tiny_config, *RUN_ARGS, "--resume") == 0
    assert losses(run) == losses(reference_run)


def test_existing_run_dir_without_resume_exits_2(reference_run, data_dir, tiny_config, capsys):
    before = (reference_run / "metrics.jsonl").read_bytes()
    assert train_cli(data_dir, reference_run, tiny_config, *RUN_ARGS) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--out" in err and len(err.strip().splitlines()) == 1
    assert (reference_run / "metrics.jsonl").read_bytes() == before


def test_a_resumed_run_restores_its_own_model_from_python(work, data_dir):
    """run_pretrain(resume=True) with no model takes the saved one; a different one is a clear error."""
    out = work / "resume-model"
    train = {"max_steps": 2, "batch_size": 2, "eval_every": 0, "checkpoint_every": 1, "sample_tokens": 0}
    run_pretrain(data_dir, out, {**TINY_MODEL, "n_layer": 1}, train, progress=False)
    saved = json.loads((out / "config.json").read_text())
    with pytest.raises(ConfigError, match="differs from the run's"):
        run_pretrain(data_dir, out, {**TINY_MODEL, "n_layer": 2}, {**train, "max_steps": 4}, resume=True,
                     progress=False)
    assert json.loads((out / "config.json").read_text()) == saved
    result = run_pretrain(data_dir, out, train={"max_steps": 4}, resume=True, progress=False)
    assert (result.step, result.steps_run) == (4, 2)
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == saved["model"] and config["train"]["max_steps"] == 4
    assert load_model(str(out)).config.n_layer == 1


def test_nan_loss_stops_and_keeps_last_good_checkpoint(work, data_dir, tiny_config, capsys):
    run = work / "nan"
    code = train_cli(data_dir, run, tiny_config, "--max-steps", "20", "--lr", "1e30", "--min-lr", "0",
                     "--warmup-steps", "0", "--checkpoint-every", "1", "--eval-every", "0", "--sample-tokens", "0")
    assert code == 2
    err = capsys.readouterr().err
    assert "diverged at step" in err
    bad_step = int(err.split("diverged at step ")[1].split(":")[0])
    kept = checkpoint_dirs(run)
    assert kept and int(kept[-1].name.split("-")[1]) == bad_step - 1
    state = torch.load(kept[-1] / "optimizer.pt", weights_only=True)
    assert state["state"]  # a loadable, complete checkpoint
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(str(kept[-1] / "model.safetensors")).values())
    assert not (run / "model.safetensors").exists()


# ------------------------------------------------------------------ eval
def test_eval_ppl_cli(reference_run, data_dir, work, capsys):
    from gptlab.evaluate import evaluate_ppl

    assert main(["eval", "ppl", "--model", str(reference_run), "--data", str(data_dir), "--batch-size", "4",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert set(r) == {"loss", "perplexity", "bits_per_byte", "tokens"}
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    model = load_model(str(reference_run))
    direct = evaluate_ppl(model, data_dir, batch_size=4)
    assert direct["loss"] == pytest.approx(r["loss"], rel=1e-6) and direct["tokens"] == r["tokens"]
    # the training-time val_loss scores the first eval_batches of the same windows
    part = evaluate_ppl(model, data_dir, batch_size=4, block_size=32, max_batches=2)
    last = [x for x in read_metrics(reference_run / "metrics.jsonl") if "val_loss" in x][-1]
    assert part["loss"] == pytest.approx(last["val_loss"], rel=1e-5)
    assert main(["eval", "ppl", "--model", str(reference_run), "--data", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "bits/byte" in out
    # data tokenized with a different vocabulary
    other = prepare("completely different alphabet: xyz 0123456789 QWERTY!?\n" * 200, work / "other-data")
    assert main(["eval", "ppl", "--model", str(reference_run), "--data", str(other)]) == 2
    err = capsys.readouterr().err
    assert "tokenizer mismatch" in err and str(other) in err and str(reference_run) in err


def test_compile_saves_plain_keys(work, data_dir, tiny_config):
    pytest.importorskip("torch._inductor")
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile on CPU needs a C compiler")
    run = work / "compiled"
    assert train_cli(data_dir, run, tiny_config, "--max-steps", "3", "--compile", "--eval-every", "0",
                     "--sample-tokens", "0", "--checkpoint-every", "2") == 0
    assert all("_orig_mod" not in k for k in weights(run))
    from safetensors.torch import load_file

    ckpt = load_file(str(checkpoint_dirs(run)[0] / "model.safetensors"))
    assert all("_orig_mod" not in k for k in ckpt)
    opt = torch.load(checkpoint_dirs(run)[0] / "optimizer.pt", weights_only=True)
    assert all("_orig_mod" not in k for k in opt["state"])


# ------------------------------------------------------ modern blocks, MoE, Muon
MOE_MUON_ARGS = ["--preset", "modern-tiny-moe", "--n-layer", "2", "--n-embd", "32", "--n-head", "2",
                 "--block-size", "32", "--n-experts", "4", "--top-k", "2", "--optimizer", "muon", "--max-steps", "24",
                 "--batch-size", "4", "--grad-accum", "2", "--lr", "3e-3", "--muon-lr", "0.03", "--warmup-steps", "2",
                 "--eval-every", "12", "--eval-batches", "2", "--checkpoint-every", "12", "--keep-last", "5",
                 "--sample-tokens", "8", "--seed", "5", "--device", "cpu"]


def test_moe_with_muon_learns_logs_its_experts_and_resumes_exactly(work, data_dir):
    """`gptlab train --preset ... --ffn moe --n-experts 4 --top-k 2 --optimizer muon`: the loss falls, each
    expert's load is logged and plotted, and a run resumed from its middle checkpoint is the same run."""
    run = work / "moe-muon"
    assert main(["train", "--data", str(data_dir), "--out", str(run), *MOE_MUON_ARGS]) == 0
    records = read_metrics(run / "metrics.jsonl")
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    loads = [records[-1][f"moe_load_{e}"] for e in range(4)]
    assert sum(loads) == pytest.approx(1.0) and min(loads) > 0.05  # dropless, and no expert starved
    assert records[-1]["moe_balance"] >= 1.0 - 1e-6  # the Switch loss is 1 at perfect balance, more otherwise
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["ffn"] == "moe" and saved["train"]["optimizer"] == "muon"
    resumed = work / "moe-muon-resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(checkpoint_dirs(resumed)[-1])
    (resumed / "model.safetensors").unlink()
    assert main(["train", "--data", str(data_dir), "--out", str(resumed), "--resume", "--device", "cpu"]) == 0
    assert losses(resumed) == losses(run)
    ref = weights(run)
    assert all(torch.equal(v, ref[k]) for k, v in weights(resumed).items())
