"""`gptlab train --init-from RUN|hf:DIR`: continue training a model (nanoGPT's init_from), and the README's
"Start from a pretrained model" walk-through on a tiny random GPT-2 built with transformers.

    .venv/bin/pytest -q tests/test_init_from.py
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptlab.cli import main
from gptlab.data import PretrainBatches, TokenData
from gptlab.model import rebuilt
from gptlab.runs import load_model
from gptlab.train.metrics import read_metrics

transformers = pytest.importorskip("transformers")

TEXT = "".join(f"the {w} of the {v} is {x}.\n" for w in ("king", "sea", "night", "ring") for v in ("lord", "fool")
               for x in ("gone", "here", "bright", "cold", "sweet")) * 40
STEP0 = ["--max-steps", "1", "--batch-size", "4", "--log-every", "1", "--eval-every", "0", "--checkpoint-every", "0",
         "--sample-tokens", "0", "--dropout", "0", "--seed", "3", "--warmup-steps", "1"]


def prepare(text: str, out: Path, tokenizer: str = "char") -> Path:
    src = out.parent / f"{out.name}.txt"
    src.write_text(text, encoding="utf-8")
    assert main(["prepare", "--input", str(src), "--tokenizer", tokenizer, "--out", str(out), "--workers", "1"]) == 0
    return out


def step0_loss(model: torch.nn.Module, data: Path, block: int) -> float:
    """The loss of ``model`` on the batch a run with STEP0's seed and batch size trains on first."""
    x, y = PretrainBatches(TokenData(str(data)).split("train"), 4, block, 3).get(1, 0)  # steps count from 1
    with torch.no_grad():
        if isinstance(model, transformers.PreTrainedModel):
            logits = model(x).logits
            return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)))
        return float(model(x, y)[1])


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("init_from")


@pytest.fixture(scope="module")
def char_data(work) -> Path:
    return prepare(TEXT, work / "data")


@pytest.fixture(scope="module")
def source_run(work, char_data) -> Path:
    run = work / "source"
    assert main(["train", "--data", str(char_data), "--out", str(run), "--n-layer", "2", "--n-head", "2",
                 "--n-embd", "32", "--block-size", "32", "--max-steps", "60", "--batch-size", "8", "--lr", "3e-3",
                 "--warmup-steps", "5", "--eval-every", "0", "--checkpoint-every", "0", "--sample-tokens", "0",
                 "--dropout", "0"]) == 0
    return run


def test_continuing_a_run_starts_at_its_loss(work, char_data, source_run):
    out = work / "continued"
    assert main(["train", "--init-from", str(source_run), "--data", str(char_data), "--out", str(out), *STEP0]) == 0
    first = read_metrics(out / "metrics.jsonl")[0]
    expected = step0_loss(load_model(source_run), char_data, 32)
    vocab = load_model(source_run).config.vocab_size
    assert first["step"] == 1 and first["loss"] == pytest.approx(expected, abs=1e-5)
    assert first["loss"] < math.log(vocab) - 1  # a trained model's loss, not a fresh one's ln V
    saved = json.loads((out / "config.json").read_text())
    source = json.loads((source_run / "config.json").read_text())
    assert saved["init_from"] == {"path": str(source_run.resolve()), "weights_sha256": source["weights"]["sha256"]}
    assert saved["model"] == source["model"]


def test_block_size_crops_and_dropout_changes(work, char_data, source_run, capsys):
    out = work / "cropped"
    assert main(["train", "--init-from", str(source_run), "--data", str(char_data), "--out", str(out),
                 *STEP0[:-6], "--seed", "3", "--warmup-steps", "1", "--block-size", "16", "--dropout", "0.2"]) == 0
    cfg = load_model(out).config
    assert (cfg.block_size, cfg.dropout) == (16, 0.2)
    # the crop itself changes nothing the model computes on sequences that fit
    src = load_model(source_run)
    cropped = rebuilt(src, block_size=16).eval()
    idx = torch.randint(0, src.config.vocab_size, (2, 16))
    assert torch.equal(cropped(idx), src(idx))
    assert main(["train", "--init-from", str(source_run), "--data", str(char_data), "--out", str(work / "long"),
                 *STEP0, "--block-size", "64"]) == 2
    err = capsys.readouterr().err
    assert "--block-size 64 exceeds the context of --init-from" in err and "32" in err
    assert not (work / "long" / "model.safetensors").exists()


def test_other_tokenizer_and_model_flags_are_refused(work, source_run, capsys):
    other = prepare("completely different alphabet: xyz 0123456789 QWERTY!?\n" * 200, work / "other")
    assert main(["train", "--init-from", str(source_run), "--data", str(other), "--out", str(work / "x"), *STEP0]) == 2
    err = capsys.readouterr().err
    assert "tokenizer mismatch" in err and str(other) in err and str(source_run) in err
    assert main(["train", "--init-from", str(source_run), "--data", str(other), "--out", str(work / "y"),
                 "--n-layer", "3", *STEP0]) == 2
    assert "--init-from" in capsys.readouterr().err


def test_a_continued_run_resumes_exactly(work, char_data, source_run):
    args = ["--batch-size", "4", "--eval-every", "0", "--sample-tokens", "0", "--dropout", "0", "--seed", "3",
            "--warmup-steps", "1", "--lr-decay-steps", "4", "--checkpoint-every", "2"]  # 2 steps: those of 4
    straight, resumed = work / "straight", work / "resumed"
    assert main(["train", "--init-from", str(source_run), "--data", str(char_data), "--out", str(straight), *args,
                 "--max-steps", "4"]) == 0
    assert main(["train", "--init-from", str(source_run), "--data", str(char_data), "--out", str(resumed), *args,
                 "--max-steps", "2"]) == 0
    assert main(["train", "--data", str(char_data), "--out", str(resumed), "--resume", "--max-steps", "4"]) == 0
    for name, tensor in load_file(str(straight / "model.safetensors")).items():
        assert torch.equal(load_file(str(resumed / "model.safetensors"))[name], tensor), name
    assert json.loads((resumed / "config.json").read_text())["init_from"]["path"] == str(source_run.resolve())


def test_lora_on_a_continued_run_starts_at_the_source_loss(work, char_data, source_run, capsys):
    out = work / "lora"
    assert main(["train", "--init-from", str(source_run), "--data", str(char_data), "--out", str(out), *STEP0,
                 "--lora-rank", "2"]) == 0
    first = read_metrics(out / "metrics.jsonl")[0]  # B starts at zero: the adapted model is the source
    assert first["loss"] == pytest.approx(step0_loss(load_model(source_run), char_data, 32), abs=1e-5)
    saved = json.loads((out / "config.json").read_text())
    assert saved["lora"]["lora_rank"] == 2 and (out / saved["lora"]["adapter"]["file"]).is_file()
    assert main(["train", "--data", str(char_data), "--out", str(work / "lora-new"), "--n-layer", "1", "--n-head", "2",
                 "--n-embd", "16", "--block-size", "16", *STEP0, "--lora-rank", "2"]) == 2
    assert "--lora-rank adapts a trained model: pass --init-from" in capsys.readouterr().err


# --------------------------------------------------------------- hf: GPT-2 and OpenAI-GPT directories
def hf_dir(kind: str, tokenizer_dir: Path, out: Path) -> Path:
    """A tiny random transformers model of ``kind`` saved with the BPE tokenizer of ``tokenizer_dir``."""
    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"]
    torch.manual_seed(0)
    common = dict(n_layer=2, n_embd=48, n_head=2, n_positions=64, vocab_size=len(vocab) + 1)
    if kind == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(activation_function="gelu_new", **common))
    else:
        model = transformers.OpenAIGPTLMHeadModel(transformers.OpenAIGPTConfig(afn="gelu", **common))
    model.save_pretrained(out)
    (out / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    return out


@pytest.fixture(scope="module")
def bpe(work) -> Path:
    (work / "corpus.txt").write_text(TEXT, encoding="utf-8")
    assert main(["tokenizer", "train", "--input", str(work / "corpus.txt"), "--vocab-size", "300",
                 "--out", str(work / "bpe")]) == 0
    return work / "bpe"


@pytest.mark.parametrize("kind", ["gpt2", "openai-gpt"])
def test_hf_directory_continues_at_transformers_loss(work, bpe, kind):
    src = hf_dir(kind, bpe, work / f"hf-{kind}")
    data = prepare(TEXT, work / f"data-{kind}", tokenizer=str(src))
    out = work / f"from-{kind}"
    assert main(["train", "--init-from", f"hf:{src}", "--data", str(data), "--out", str(out), *STEP0,
                 "--block-size", "48"]) == 0
    hf = (transformers.GPT2LMHeadModel if kind == "gpt2" else transformers.OpenAIGPTLMHeadModel).from_pretrained(src)
    first = read_metrics(out / "metrics.jsonl")[0]
    assert first["loss"] == pytest.approx(step0_loss(hf.eval(), data, 48), abs=1e-4)
    saved = json.loads((out / "config.json").read_text())
    assert saved["init_from"]["path"] == f"hf:{src.resolve()}" and len(saved["init_from"]["weights_sha256"]) == 64
    assert saved["model"]["block_size"] == 48 and saved["model"]["norm_position"] == ("pre" if kind == "gpt2" else "post")


# --------------------------------------------------------------- the README's walk-through
def readme_commands(section: str) -> list[list[str]]:
    """The gptlab command lines of the first bash block under ``section`` in README.md."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = text.split(f"## {section}\n", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line.split("  #", 1)[0])[1:] for line in lines if line.startswith("gptlab ")]


def test_readme_walkthrough_on_a_tiny_gpt2(work, bpe, capsys):
    src = hf_dir("gpt2", bpe, work / "walk-hf")
    (work / "input.txt").write_text(TEXT, encoding="utf-8")
    places = {"path/to/gpt2": str(src), "input.txt": str(work / "input.txt"), "runs/": f"{work}/walk-runs/",
              "data/": f"{work}/walk-data/"}
    small = {"train": ["--block-size", "32", "--max-steps", "3", "--batch-size", "2", "--eval-every", "0",
                       "--sample-tokens", "0"], "generate": ["--max-new-tokens", "8", "--seed", "0"]}
    commands = readme_commands("Start from a pretrained model")
    assert [c[0] for c in commands] == ["convert", "prepare", "train", "generate"]
    for argv in commands:
        argv = [next((a.replace(k, v, 1) for k, v in places.items() if a.startswith(k)), a) for a in argv]
        capsys.readouterr()
        assert main(argv + small.get(argv[0], [])) == 0, argv
    assert capsys.readouterr().out.strip()  # generate printed a continuation
    saved = json.loads((work / "walk-runs" / "gpt2-mytext" / "config.json").read_text())
    assert saved["init_from"]["path"] == str((work / "walk-runs" / "gpt2").resolve())
