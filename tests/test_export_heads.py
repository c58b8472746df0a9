"""`gptlab convert --to-hf` of fine-tuned and reward-model runs: transformers loads each with its head and
predicts what `gptlab predict` (or the reward model's score) says on the same rows.

GPT-2-style (pre-LN) and GPT-1-style (post-LN) tiny models over a character vocabulary; nothing is downloaded.

    .venv/bin/pytest -q tests/test_export_heads.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from gptlab.atomic import atomic_write_jsonl as write_jsonl
from gptlab.cli import main
from gptlab.config import GPTConfig
from gptlab.model import GPT
from gptlab.runs import save_model
from gptlab.stages import finetune as ft
from gptlab.stages.common import chat_pad_id, pad_right
from gptlab.stages.reward import load_reward_model
from gptlab.tokenizer import CharTokenizer

transformers = pytest.importorskip("transformers")

ARCH = {"gpt2": {"norm_position": "pre"}, "openai-gpt": {"norm_position": "post", "activation": "gelu_tanh"}}
CLASSES = {("gpt2", "sequence"): "GPT2ForSequenceClassification",
           ("openai-gpt", "sequence"): "OpenAIGPTForSequenceClassification",
           ("gpt2", "choice"): "GPT2DoubleHeadsModel", ("openai-gpt", "choice"): "OpenAIGPTDoubleHeadsModel"}


def rows(task_type: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)

    def text() -> str:
        return "".join(rng.choice("abcdex") for _ in range(rng.randint(3, 9)))

    if task_type == "classification":
        return [{"text": text(), "label": rng.choice(["yes", "no", "maybe"])} for _ in range(n)]
    if task_type == "entailment":
        return [{"premise": text(), "hypothesis": text(), "label": rng.choice(["e", "n", "c"])} for _ in range(n)]
    if task_type == "multiple_choice":
        return [{"context": text(), "choices": [text() for _ in range(3)], "label": rng.randrange(3)} for _ in range(n)]
    if task_type == "similarity":
        return [{"text_a": text(), "text_b": text(), "label": rng.randint(0, 1)} for _ in range(n)]
    return [{"text_a": text(), "text_b": text(), "label": round(rng.uniform(0, 5), 2)} for _ in range(n)]  # graded


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module", params=list(ARCH))
def base(request, work) -> tuple[str, Path]:
    tok = CharTokenizer.from_text("abcdex .")
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=48, **ARCH[request.param]))
    return request.param, save_model(work / f"base-{request.param}", gpt, tok)


def hf_logits(model, seqs: list[list[int]], pad: int) -> torch.Tensor:
    """transformers' sequence-classification logits of right-padded rows (one forward for all)."""
    idx, _ = pad_right(seqs, pad)
    with torch.no_grad():
        return model(input_ids=idx).logits


@pytest.mark.parametrize("task_type", ["classification", "entailment", "similarity", "graded", "multiple_choice"])
def test_finetuned_run_exports_with_its_head(work, base, task_type, capsys):
    kind, base_run = base
    name = f"{kind}-{task_type}"
    train = write_jsonl(work / f"{name}-train.jsonl", rows(task_type, 24, 1))
    test = write_jsonl(work / f"{name}-test.jsonl", rows(task_type, 8, 2))
    run = work / f"ft-{name}"
    assert main(["finetune", "--task", "similarity" if task_type == "graded" else task_type, "--model", str(base_run),
                 "--train", str(train), "--val", str(train), "--out", str(run), "--max-steps", "6", "--batch-size", "4",
                 "--lr", "1e-2", "--device", "cpu", "--eval-every", "0", "--checkpoint-every", "0"]) == 0
    assert main(["predict", "--model", str(run), "--input", str(test), "--out", str(work / f"{name}-pred.jsonl")]) == 0
    preds = [json.loads(line) for line in (work / f"{name}-pred.jsonl").read_text().splitlines()]
    capsys.readouterr()
    assert main(["convert", "--to-hf", str(run), "--out", str(work / f"hf-{name}")]) == 0
    head_kind = "choice" if task_type == "multiple_choice" else "sequence"
    arch = CLASSES[kind, head_kind]
    assert arch in capsys.readouterr().out
    hf = getattr(transformers, arch).from_pretrained(work / f"hf-{name}").eval()
    _, tokenizer, settings = ft.load_finetuned(run)
    start = ft.special_ids(tokenizer)[0]
    assert hf.config.pad_token_id == (start if head_kind == "sequence" else None)
    test_rows = [json.loads(line) for line in test.read_text().splitlines()]
    seqs = [ft.transform(settings["task_type"], row, tokenizer, settings["max_len"]) for row in test_rows]
    if task_type in ("classification", "entailment"):  # all rows in one batch, right-padded with [start]
        logits = hf_logits(hf, [s[0] for s in seqs], start)
    elif task_type in ("similarity", "graded"):  # both orders, their logits added
        logits = hf_logits(hf, [s[0] for s in seqs], start) + hf_logits(hf, [s[1] for s in seqs], start)
    else:
        width = max(len(c) for s in seqs for c in s)
        idx = torch.stack([pad_right([*s, [start] * width], start)[0][:-1] for s in seqs])  # (rows, choices, T)
        with torch.no_grad():
            logits = hf(input_ids=idx, mc_token_ids=torch.tensor([[len(c) - 1 for c in s] for s in seqs])).mc_logits
    for pred, out in zip(preds, logits):
        if task_type == "graded":
            assert float(out.squeeze()) == pytest.approx(pred["score"], abs=1e-4)
            continue
        probs = torch.softmax(out, -1).tolist()
        theirs = probs if task_type == "multiple_choice" else dict(zip(map(str, settings["labels"]), probs))  # JSON keys
        assert pred["probabilities"] == pytest.approx(theirs, abs=1e-5)
        best = int(out.argmax())
        assert pred["prediction"] == (best if task_type == "multiple_choice" else settings["labels"][best])


def test_reward_model_exports_as_one_label_classifier(work, base, capsys):
    kind, base_run = base
    rankings = write_jsonl(work / f"rm-{kind}.jsonl", [{"prompt": p, "chosen": "aaa", "rejected": "bxb"}
                                                        for p in ("ab", "ba", "cd", "dc", "ea", "ae")])
    run = work / f"rm-{kind}"
    assert main(["rm", "--model", str(base_run), "--data", str(rankings), "--out", str(run), "--max-steps", "3",
                 "--batch-size", "2", "--device", "cpu", "--norm-tokens", "4", "--eval-every", "0"]) == 0
    assert main(["convert", "--to-hf", str(run), "--out", str(work / f"hf-rm-{kind}")]) == 0
    assert CLASSES[kind, "sequence"] in capsys.readouterr().out
    hf = getattr(transformers, CLASSES[kind, "sequence"]).from_pretrained(work / f"hf-rm-{kind}").eval()
    assert hf.config.num_labels == 1
    model, tokenizer, _ = load_reward_model(run)
    seqs = [tokenizer.encode(t) for t in ("abc", "dd", "aaaaxe", "e")]
    idx, lengths = pad_right(seqs, chat_pad_id(tokenizer))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=idx).logits.squeeze(-1), model.score(idx, lengths), atol=1e-5,
                                   rtol=1e-4)


def test_lora_finetuned_run_merges_and_exports_with_its_head(work, base):
    kind, base_run = base
    train = write_jsonl(work / f"lora-{kind}-train.jsonl", rows("classification", 24, 1))
    test = write_jsonl(work / f"lora-{kind}-test.jsonl", rows("classification", 8, 2))
    run, merged = work / f"ft-lora-{kind}", work / f"ft-lora-merged-{kind}"
    assert main(["finetune", "--task", "classification", "--model", str(base_run), "--train", str(train), "--val",
                 str(train), "--out", str(run), "--max-steps", "4", "--batch-size", "4", "--lr", "1e-2", "--device",
                 "cpu", "--eval-every", "0", "--checkpoint-every", "0", "--lora-rank", "2"]) == 0
    assert main(["lora", "merge", "--model", str(run), "--out", str(merged)]) == 0
    for source in (run, merged):  # predict reads a run with adapters merged, and the merged run with its head
        assert main(["predict", "--model", str(source), "--input", str(test), "--out", str(source / "p.jsonl")]) == 0
    assert (run / "p.jsonl").read_text() == (merged / "p.jsonl").read_text()
    assert main(["convert", "--to-hf", str(run), "--out", str(work / f"hf-lora-{kind}")]) == 0
    hf = getattr(transformers, CLASSES[kind, "sequence"]).from_pretrained(work / f"hf-lora-{kind}").eval()
    _, tokenizer, settings = ft.load_finetuned(run)
    start = ft.special_ids(tokenizer)[0]
    seqs = [ft.transform("classification", json.loads(line), tokenizer, settings["max_len"])[0]
            for line in test.read_text().splitlines()]
    preds = [json.loads(line) for line in (run / "p.jsonl").read_text().splitlines()]
    for pred, out in zip(preds, hf_logits(hf, seqs, start)):
        assert pred["probabilities"] == pytest.approx(dict(zip(settings["labels"], torch.softmax(out, -1).tolist())),
                                                      abs=1e-5)
