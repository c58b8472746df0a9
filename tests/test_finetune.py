"""GPT-1 fine-tuning: input transformations token by token, the heads, L3 = L2 + lambda * L1, special-token
growth, a tiny model learning a separable task, every task type end to end, predictions, exact resume, errors.

Real tiny models (2 layers, 64 wide) over a character vocabulary; no mocks.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from gptlab.atomic import atomic_write_jsonl as write_jsonl
from gptlab.runs import load_run, save_model
from gptlab.cli import main
from gptlab.config import GPTConfig
from gptlab.errors import ConfigError, TokenizerError, UserError
from gptlab.model import GPT
from gptlab.stages import finetune as ft
from gptlab.heads import TaskModel, TaskModelConfig
from gptlab.stages.finetune import (Example, FinetuneConfig, FinetuneStage, add_finetune_tokens,
                                    classification_metrics, collate, load_finetuned, regression_metrics,
                                    run_finetune, transform)
from gptlab.tokenizer import DELIM, EOS, EXTRACT, START, CharTokenizer
from gptlab.train.checkpoints import checkpoint_dirs
from gptlab.train.metrics import read_metrics

ALPHABET = "abcdefghijxyz ."
SMALL = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 48}


def char_tok(specials: bool = True) -> CharTokenizer:
    """Characters first (ids 0..14), then the special tokens (all of them, or only EOS)."""
    return CharTokenizer.from_text(ALPHABET, **({} if specials else {"special_tokens": [EOS]}))


def text(rng: random.Random, lo: int = 4, hi: int = 10, chars: str = "abcde") -> str:
    return "".join(rng.choice(chars) for _ in range(rng.randint(lo, hi)))


def contains_x(n: int, seed: int) -> list[dict]:
    """Separable: "yes" exactly when the text holds an x."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        s = list(text(rng, 6, 14))
        yes = rng.random() < 0.5
        if yes:
            s[rng.randrange(len(s))] = "x"
        rows.append({"text": "".join(s), "label": "yes" if yes else "no"})
    return rows


def random_rows(task_type: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    if task_type == "entailment":
        return [{"premise": text(rng), "hypothesis": text(rng), "label": rng.choice(["e", "n", "c"])} for _ in range(n)]
    if task_type == "multiple_choice":
        rows = []
        for _ in range(n):
            k = rng.randint(2, 4)
            choices = [text(rng, 1, 5) for _ in range(k)]
            rows.append({"context": text(rng), "choices": choices, "label": rng.randrange(k)})
        return rows
    if task_type == "similarity":
        return [{"text_a": text(rng), "text_b": text(rng), "label": rng.randint(0, 1)} for _ in range(n)]
    assert task_type == "graded"
    return [{"text_a": text(rng), "text_b": text(rng), "label": round(rng.uniform(0, 5), 2)} for _ in range(n)]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("finetune")


@pytest.fixture(scope="module")
def base_run(work) -> Path:
    """A freshly initialised tiny model whose vocabulary lacks [start]/[delim]/[extract]."""
    tok = char_tok(specials=False)
    torch.manual_seed(0)
    return save_model(work / "base", GPT(GPTConfig(vocab_size=tok.vocab_size, **SMALL)), tok)


def cli_finetune(task: str, base: Path, train: Path, val: Path, out: Path, *extra: str) -> int:
    return main(["finetune", "--task", task, "--model", str(base), "--train", str(train), "--val", str(val),
                 "--out", str(out), "--device", "cpu", *extra])


# ------------------------------------------------------------ transformations
def test_transform_token_by_token():
    tok = char_tok()
    S, D, E = (tok.special_tokens[t] for t in (START, DELIM, EXTRACT))
    assert (S, D, E) == (17, 18, 19)  # 15 characters, then EOS and PAD
    c = {ch: i for i, ch in enumerate(sorted(ALPHABET))}
    a, b, d, e, f, g, h, i, j = (c[ch] for ch in "abdefghij")
    assert transform("classification", {"text": "abc", "label": "x"}, tok, 16) == [[S, a, b, c["c"], E]]
    assert transform("classification", {"text": "abcdef"}, tok, 4) == [[S, a, b, E]]  # the end is cut
    row = {"premise": "ab", "hypothesis": "de"}
    assert transform("entailment", row, tok, 16) == [[S, a, b, D, d, e, E]]
    long = {"premise": "abcdef", "hypothesis": "gh"}
    assert transform("entailment", long, tok, 7) == [[S, e, f, D, g, h, E]]  # premise loses its beginning
    assert transform("entailment", long, tok, 4) == [[S, D, g, E]]  # then the hypothesis its end
    pair = {"text_a": "ab", "text_b": "gh"}
    assert transform("similarity", pair, tok, 16) == [[S, a, b, D, g, h, E], [S, g, h, D, a, b, E]]
    # the longer text is cut first; the shorter keeps what fits in half the budget
    assert transform("similarity", {"text_a": "abde", "text_b": "gh"}, tok, 8) == [
        [S, a, b, d, D, g, h, E], [S, g, h, D, a, b, d, E]]
    assert transform("similarity", {"text_a": "abde", "text_b": "fghi"}, tok, 7) == [
        [S, a, b, D, f, g, E], [S, f, g, D, a, b, E]]
    mc = {"context": "abdef", "choices": ["g", "hij"], "label": 1}
    assert transform("multiple_choice", mc, tok, 16) == [[S, a, b, d, e, f, D, g, E], [S, a, b, d, e, f, D, h, i, j, E]]
    # one context length for every choice, cut from its beginning to fit the longest choice
    assert transform("multiple_choice", mc, tok, 8) == [[S, e, f, D, g, E], [S, e, f, D, h, i, j, E]]
    # a special token's name inside text stays plain characters
    tok = CharTokenizer.from_text(ALPHABET + "<|start>")
    seq = transform("classification", {"text": START}, tok, 16)[0]
    assert len(seq) == 2 + len(START) and seq.count(tok.special_tokens[START]) == 1


def test_transform_errors():
    with pytest.raises(TokenizerError, match="add_finetune_tokens"):
        transform("classification", {"text": "ab"}, char_tok(specials=False), 16)
    with pytest.raises(ConfigError, match="max_len=2"):
        transform("entailment", {"premise": "a", "hypothesis": "b"}, char_tok(), 2)
    with pytest.raises(UserError, match="completion"):
        transform("completion", {"prompt": "a", "answer": "b"}, char_tok(), 16)


def test_gpt2_vocabulary_gets_the_tokens_appended(gpt2_ranks_path, tmp_path):
    from gptlab.tokenizer import TiktokenTokenizer, load_tokenizer

    tok = TiktokenTokenizer.from_file(gpt2_ranks_path)
    torch.manual_seed(0)
    gpt = add_finetune_tokens(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)), tok)
    assert gpt.config.vocab_size == 50260 and gpt.lm_head.weight is gpt.wte.weight
    assert transform("classification", {"text": "Hello world"}, tok, 16) == [[50257, 15496, 995, 50259]]
    assert load_tokenizer(tok.save(tmp_path / "tok")).special_tokens[DELIM] == 50258  # saved with the run


def test_default_train_config(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg, coef = ft.FINETUNE_TRAIN.config(100), FinetuneConfig().lm_coef
    assert coef == 0.5
    assert (cfg.batch_size, cfg.lr, cfg.min_lr, cfg.weight_decay) == (16, 2.5e-4, 0.0, 0.01)
    assert (cfg.max_steps, cfg.warmup_steps, cfg.eval_every, cfg.checkpoint_every) == (19, 2, 2, 2)  # 3 epochs
    cfg = ft.FINETUNE_TRAIN.config(100, {"max_steps": 200, "lr": 1e-4, "seed": None})
    coef = FinetuneConfig(lm_coef=0.0).lm_coef
    assert (cfg.max_steps, cfg.warmup_steps, cfg.eval_every, cfg.lr, cfg.seed, coef) == (200, 20, 20, 1e-4, 1337, 0.0)


# --------------------------------------------------------------------- model
def tiny_model(task_type: str, n_classes: int, vocab: int | None = None, seed: int = 0) -> TaskModel:
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(vocab_size=vocab or char_tok().vocab_size, **SMALL))
    return TaskModel(TaskModelConfig(gpt.config, task_type, n_classes), gpt)


def test_special_tokens_grow_embedding_and_train(base_run):
    gpt, tok, _ = load_run(base_run)
    old_vocab = gpt.config.vocab_size
    assert old_vocab == 16 and START not in tok.special_tokens
    torch.manual_seed(0)
    grown = add_finetune_tokens(gpt, tok)
    assert tok.special_tokens[START] == 16 and tok.special_tokens[EXTRACT] == 18
    assert grown.config.vocab_size == 19 and grown.lm_head.weight is grown.wte.weight
    assert torch.equal(grown.wte.weight[:old_vocab], gpt.wte.weight)
    torch.manual_seed(0)
    assert torch.equal(grown.wte.weight[old_vocab:], torch.randn(3, 64) * 0.02)  # N(0, 0.02) rows
    assert add_finetune_tokens(grown, tok) is grown  # nothing to add a second time
    model = TaskModel(TaskModelConfig(grown.config, "entailment", 3), grown)
    ex = [Example(transform("entailment", {"premise": "abc", "hypothesis": "de"}, tok, 32), 2),
          Example(transform("entailment", {"premise": "x", "hypothesis": "yz."}, tok, 32), 0)]
    stage = FinetuneStage(ex, [], model.config, batch_size=2, seed=0)
    loss, _ = stage.loss(model, collate(ex, regression=False))
    loss.backward()
    rows = grown.wte.weight.grad[old_vocab:]
    assert all(rows[k].abs().sum() > 0 for k in range(3))  # [start], [delim], [extract] all learn
    assert model.head.weight.grad.abs().sum() > 0 and model.head.bias.grad.abs().sum() > 0


def test_loss_is_clf_plus_lambda_lm():
    tok = char_tok()
    model = tiny_model("classification", 3).eval()  # eval: no classifier dropout, so recomputable
    rows = [("abc", 0), ("hij x.", 2), ("de", 1), ("a b c d e f g", 2)]
    ex = [Example(transform("classification", {"text": t}, tok, 48), y) for t, y in rows]
    batch = collate(ex, regression=False)
    assert batch["idx"].shape == (4, 15) and batch["lengths"].tolist() == [5, 8, 4, 15]
    # independently: the GPT's own loss with padded and final positions ignored, the head on [extract]
    idx, lengths = batch["idx"], batch["lengths"]
    targets = torch.full_like(idx, -100)
    for r, n in enumerate(lengths.tolist()):
        targets[r, : n - 1] = idx[r, 1:n]
    _, l1 = model.gpt(idx, targets)
    hidden = model.gpt.hidden_states(idx)
    assert (idx[torch.arange(4), lengths - 1] == tok.special_tokens[EXTRACT]).all()
    l2 = F.cross_entropy(model.head(hidden[torch.arange(4), lengths - 1]), batch["labels"])
    for coef in (0.5, 2.0):
        stage = FinetuneStage(ex, [], model.config, batch_size=4, seed=0, lm_coef=coef)
        loss, metrics = stage.loss(model, batch)
        assert loss.item() == pytest.approx((l2 + coef * l1).item(), rel=1e-6)
        assert metrics["clf_loss"].item() == pytest.approx(l2.item(), rel=1e-6)
        assert metrics["lm_loss"].item() == pytest.approx(l1.item(), rel=1e-6)
    stage = FinetuneStage(ex, [], model.config, batch_size=4, seed=0, lm_coef=0.0)
    loss, metrics = stage.loss(model, batch)
    assert set(metrics) == {"clf_loss"} and loss.item() == pytest.approx(l2.item(), rel=1e-6)
    assert model(idx, lengths, batch["slot"])[1] is None  # no LM head computed at all


def test_similarity_adds_both_orders_and_choices_softmax():
    tok = char_tok()
    sim = tiny_model("similarity", 2).eval()
    seqs = transform("similarity", {"text_a": "abc", "text_b": "de"}, tok, 48)
    b = collate([Example(seqs, 1)], regression=False)
    assert b["slot"].tolist() == [[0, 1]]
    h = sim.gpt.hidden_states(b["idx"])[[0, 1], b["lengths"] - 1]
    out, _ = sim(b["idx"], b["lengths"], b["slot"])
    assert torch.allclose(out[0], sim.head(h[0] + h[1]), atol=1e-6)
    graded = tiny_model("similarity", 1).eval()
    assert graded.config.regression and graded(b["idx"], b["lengths"], b["slot"])[0].shape == (1,)
    mc = tiny_model("multiple_choice", 1).eval()
    ex = [Example(transform("multiple_choice", {"context": "ab", "choices": ["c", "de", "f"]}, tok, 48), 2),
          Example(transform("multiple_choice", {"context": "x", "choices": ["y", "z"]}, tok, 48), 0)]
    b = collate(ex, regression=False)
    assert b["slot"].tolist() == [[0, 1, 2], [3, 4, -1]]
    out, _ = mc(b["idx"], b["lengths"], b["slot"])
    scores = mc.head(mc.gpt.hidden_states(b["idx"])[torch.arange(5), b["lengths"] - 1]).squeeze(-1)
    assert torch.allclose(out[0], scores[:3], atol=1e-6) and torch.allclose(out[1, :2], scores[3:], atol=1e-6)
    assert out[1, 2] == float("-inf") and torch.softmax(out, -1)[1, 2] == 0
    assert F.cross_entropy(out, b["labels"]).isfinite()


def test_batches_are_stateless():
    tok = char_tok()
    ex = [Example(transform("classification", {"text": t}, tok, 48), k % 2) for k, t in enumerate(ALPHABET)]
    cfg = tiny_model("classification", 2).config
    a = FinetuneStage(ex, [], cfg, batch_size=4, seed=3)
    b = FinetuneStage(ex, [], cfg, batch_size=4, seed=3)
    b.batch(9, 0)
    assert all(torch.equal(a.batch(5, 1)[k], b.batch(5, 1)[k]) for k in a.batch(5, 1))
    assert not torch.equal(a.batch(5, 1)["idx"], a.batch(5, 0)["idx"])
    # two ranks take the two halves of one global batch
    r0, r1 = (FinetuneStage(ex, [], cfg, batch_size=2, seed=3, rank=r, world_size=2).batch(5, 1) for r in (0, 1))
    assert r0["lengths"].tolist() + r1["lengths"].tolist() == a.batch(5, 1)["lengths"].tolist()


def test_metrics_hand_values():
    m = classification_metrics([1, 1, 0, 0, 1], [1, 0, 0, 1, 1], 2)
    assert m == {"accuracy": 0.6, "f1": pytest.approx(2 / 3)}  # tp 2, fp 1, fn 1
    m = classification_metrics([0, 1, 2, 2], [0, 1, 1, 2], 3)
    assert m["accuracy"] == 0.75 and m["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert classification_metrics([0, 2], [0, 1], None) == {"accuracy": 0.5}
    r = regression_metrics([1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0])
    assert r["pearson"] == pytest.approx(1.0) and r["spearman"] == pytest.approx(1.0) and r["mse"] == 7.5
    r = regression_metrics([1.0, 1.0, 2.0, 3.0], [4.0, 3.0, 2.0, 1.0])  # a tie shares its mean rank
    assert r["spearman"] == pytest.approx(-0.9486832980505138)
    assert regression_metrics([2.0, 2.0, 2.0], [1.0, 2.0, 3.0])["pearson"] == 0.0


# ------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def xdata(work) -> tuple[Path, Path]:
    return (write_jsonl(work / "x-train.jsonl", contains_x(400, seed=1)),
            write_jsonl(work / "x-val.jsonl", contains_x(100, seed=2)))


def test_fits_separable_task_then_predicts(work, base_run, xdata, capsys):
    train, val = xdata
    out = work / "x-run"
    assert cli_finetune("classification", base_run, train, val, out, "--max-steps", "60", "--lr", "1e-3",
                        "--eval-every", "30", "--checkpoint-every", "0") == 0
    recs = read_metrics(out / "metrics.jsonl")
    evals = [r for r in recs if "val_accuracy" in r]
    assert [r["step"] for r in evals] == [30, 60]
    assert evals[-1]["val_accuracy"] >= 0.95 and evals[-1]["val_f1"] >= 0.95
    assert all({"clf_loss", "lm_loss", "loss"} <= set(r) for r in recs)
    assert (out / "loss.png").stat().st_size > 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["stage"] == "finetune" and cfg["train"]["lr"] == 1e-3 and cfg["train"]["warmup_steps"] == 6
    assert {k: cfg["finetune"][k] for k in ("task_type", "labels", "lm_coef", "n_classes")} == {
        "task_type": "classification", "labels": ["no", "yes"], "lm_coef": 0.5, "n_classes": 2}
    gpt, tok, _ = load_run(out)  # the backbone is an ordinary run, grown vocabulary included
    assert gpt.config.vocab_size == 19 and tok.special_tokens[EXTRACT] == 18

    capsys.readouterr()
    pred = work / "x-pred.jsonl"
    assert main(["predict", "--model", str(out), "--input", str(val), "--out", str(pred), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.strip()  # labelled rows: the metrics are printed too
    assert printed == f"wrote 100 predictions to {pred}; accuracy {evals[-1]['val_accuracy']:.4f}, " \
                      f"f1 {evals[-1]['val_f1']:.4f}"
    rows = [json.loads(line) for line in pred.read_text().splitlines()]
    source = [json.loads(line) for line in val.read_text().splitlines()]
    assert [{k: r[k] for k in ("text", "label")} for r in rows] == source
    assert all(set(r["probabilities"]) == {"no", "yes"} and sum(r["probabilities"].values()) == pytest.approx(1)
               and r["prediction"] == max(r["probabilities"], key=r["probabilities"].get) for r in rows)
    accuracy = sum(r["prediction"] == r["label"] for r in rows) / len(rows)
    assert accuracy == evals[-1]["val_accuracy"]  # predict reloads exactly what training evaluated
    unlabelled = work / "x-new.jsonl"
    unlabelled.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in source[:10]))
    assert main(["predict", "--model", str(out), "--input", str(unlabelled), "--out", str(pred)]) == 0
    new = [json.loads(line) for line in pred.read_text().splitlines()]
    assert [r["prediction"] for r in new] == [r["prediction"] for r in rows[:10]] and "label" not in new[0]
    model, _, info = load_finetuned(out)
    assert info["head"]["file"] == "head.safetensors" and not model.training


@pytest.mark.parametrize("kind", ["entailment", "multiple_choice", "similarity", "graded"])
def test_task_types_end_to_end(work, base_run, kind):
    task = "similarity" if kind == "graded" else kind
    train = write_jsonl(work / f"{kind}-train.jsonl", random_rows(kind, 24, seed=3))
    val = write_jsonl(work / f"{kind}-val.jsonl", random_rows(kind, 10, seed=4))
    out = work / f"{kind}-run"
    assert cli_finetune(task, base_run, train, val, out, "--max-steps", "4", "--batch-size", "4",
                        "--eval-every", "2", "--checkpoint-every", "0") == 0
    evals = [r for r in read_metrics(out / "metrics.jsonl") if any(k.startswith("val_") for k in r)]
    assert [r["step"] for r in evals] == [2, 4]
    keys = {"entailment": {"val_accuracy", "val_macro_f1"}, "multiple_choice": {"val_accuracy"},
            "similarity": {"val_accuracy", "val_f1"}, "graded": {"val_pearson", "val_spearman", "val_mse"}}[kind]
    assert {k for k in evals[-1] if k.startswith("val_")} == keys
    pred = work / f"{kind}-pred.jsonl"
    assert main(["predict", "--model", str(out), "--input", str(val), "--out", str(pred)]) == 0
    rows = [json.loads(line) for line in pred.read_text().splitlines()]
    assert len(rows) == 10
    for r in rows:
        if kind == "graded":
            assert r["prediction"] == r["score"] and isinstance(r["score"], float)
        elif kind == "multiple_choice":
            assert len(r["probabilities"]) == len(r["choices"]) and r["prediction"] in range(len(r["choices"]))
        else:
            assert str(r["prediction"]) in r["probabilities"] and sum(r["probabilities"].values()) == pytest.approx(1)
            assert type(r["prediction"]) is type(r["label"])  # a label as the file writes it: 1 stays 1


def test_resume_equals_uninterrupted(work, base_run, xdata):
    train, val = xdata
    args = ["--max-steps", "12", "--batch-size", "4", "--grad-accum", "2", "--dropout", "0.1", "--lr", "1e-3",
            "--eval-every", "4", "--checkpoint-every", "4", "--seed", "5"]
    ref = work / "resume-ref"
    assert cli_finetune("classification", base_run, train, val, ref, *args) == 0
    run = work / "resume-cut"
    orig = FinetuneStage.batch

    def batch(self, step, micro_step):
        if (step, micro_step) == (10, 1):
            raise KeyboardInterrupt
        return orig(self, step, micro_step)

    FinetuneStage.batch = batch
    try:
        assert cli_finetune("classification", base_run, train, val, run, *args) == 130
    finally:
        FinetuneStage.batch = orig
    assert checkpoint_dirs(run)[-1].name == "step-00000009"
    assert cli_finetune("classification", base_run, train, val, run, *args, "--resume") == 0
    def trajectory(path: Path) -> list[tuple]:
        return [(r["step"], r["loss"], r["clf_loss"], r["lm_loss"], r.get("val_accuracy"))
                for r in read_metrics(path / "metrics.jsonl")]

    assert trajectory(run) == trajectory(ref)  # bit for bit, dropout and accumulation included
    for name in ("head.safetensors", "model.safetensors"):
        got, want = load_file(str(run / name)), load_file(str(ref / name))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_resumed_run_restores_its_own_settings_from_python(work, base_run, xdata):
    """run_finetune(resume=True) without settings keeps the saved task and λ; different ones are a clear error."""
    train, val = xdata
    out = work / "resume-settings"
    cfg = {"max_steps": 2, "batch_size": 4, "checkpoint_every": 1, "eval_every": 0, "device": "cpu"}
    run_finetune(str(base_run), train, val, out, cfg, {"task_type": "classification", "lm_coef": 0.25},
                 progress=False)
    saved = json.loads((out / "config.json").read_text())
    with pytest.raises(ConfigError, match="resumed run keeps its finetune settings: lm_coef=0.25 was saved"):
        run_finetune(str(base_run), train, val, out, {**cfg, "max_steps": 4}, {"lm_coef": 0.0}, resume=True,
                     progress=False)
    with pytest.raises(ConfigError, match="task_type='classification' was saved, 'entailment' given"):
        run_finetune(str(base_run), train, val, out, cfg, {"task_type": "entailment"}, resume=True, progress=False)
    assert json.loads((out / "config.json").read_text()) == saved
    result = run_finetune(str(base_run), train, val, out, {**cfg, "max_steps": 4}, resume=True, progress=False)
    assert (result.step, result.steps_run) == (4, 2)
    config = json.loads((out / "config.json").read_text())
    assert config["finetune"]["lm_coef"] == 0.25 and config["finetune"]["task_type"] == "classification"
    assert {"clf_loss", "lm_loss"} <= set(read_metrics(out / "metrics.jsonl")[-1])  # λ > 0: the LM term ran


# -------------------------------------------------------------------- errors
def test_bad_input_is_one_line_exit_2(work, base_run, xdata, capsys):
    train, val = xdata

    def error(code: int) -> str:
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        return err

    completion = write_jsonl(work / "completion.jsonl", [{"prompt": "ab", "answer": "c"}])
    err = error(cli_finetune("completion", base_run, completion, completion, work / "bad1"))
    assert "completion" in err and "classification" in err
    bad_val = write_jsonl(work / "bad-val.jsonl", contains_x(3, seed=5) + [{"text": "abc", "label": "maybe"}])
    err = error(cli_finetune("classification", base_run, train, bad_val, work / "bad2"))
    assert f"{bad_val}:4" in err and "maybe" in err
    err = error(main(["predict", "--model", str(base_run), "--input", str(val), "--out", str(work / "p.jsonl")]))
    assert "not a fine-tuned run" in err
    unknown = write_jsonl(work / "unknown-char.jsonl", [{"text": "abc", "label": "no"}, {"text": "Q", "label": "yes"}])
    err = error(cli_finetune("classification", base_run, unknown, val, work / "bad3"))
    assert f"{unknown}:2" in err and "'Q'" in err
    assert not any((work / f"bad{k}").exists() for k in (1, 2, 3))
