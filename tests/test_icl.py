"""In-context evaluation: Engine.score against model(idx), demonstration draws, truncation, accuracies, CLI."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch
from PIL import Image

from gptlab import GPT, GPTConfig
from gptlab.hf import export_hf
from gptlab.runs import load_model, save_model
from gptlab.cli import main
from gptlab.engine import Engine
from gptlab.errors import UserError
from gptlab.icl import evaluate_icl, sample_demos
from gptlab.tasks import load_task
from gptlab.tokenizer import CharTokenizer, load_tokenizer

ALPHABET = string.ascii_letters + string.digits + " .,:;?!'-\n"


@pytest.fixture(scope="module")
def tok() -> CharTokenizer:
    return CharTokenizer.from_text(ALPHABET)


def tiny(preset: str = "tiny", block: int = 256, vocab: int = 96, seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_preset(preset, n_layer=2, n_embd=64, n_head=4, vocab_size=vocab,
                                     block_size=block, attn_window=8, **overrides)).eval()


def ref_score(model: GPT, context: list[int], continuation: list[int]) -> tuple[float, int, bool]:
    """By hand: one unpadded model(idx) over the left-truncated sequence, log_softmax, gather, argmax."""
    ids = (context + continuation)[-(model.config.block_size + 1):]
    n = len(continuation)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0, -n:].float(), -1)
    target = torch.tensor(ids[-n:])
    return logprobs.gather(-1, target[:, None]).sum().item(), n, bool((logprobs.argmax(-1) == target).all())


def write_task(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------ score
@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt1", "tiny-gpt3"])
def test_score_batched_equals_one_by_one_and_hand_computation(preset):
    model = tiny(preset, block=24)
    g = torch.Generator().manual_seed(1)
    # (context, continuation) lengths: (30, 5) is truncated from the left, (7, 24) fills the window.
    requests = [(torch.randint(0, 96, (c,), generator=g).tolist(), torch.randint(0, 96, (n,), generator=g).tolist())
                for c, n in [(3, 1), (20, 4), (1, 2), (30, 5), (7, 24), (10, 3), (2, 1)]]
    greedy = [5, 6, 7]
    with torch.no_grad():
        for _ in range(4):
            greedy.append(int(model(torch.tensor([greedy]))[0, -1].argmax()))
    requests.append((greedy[:3], greedy[3:]))
    engine = Engine(model)
    batched = engine.score(requests, batch_size=3)
    for got, request in zip(batched, requests):
        alone = engine.score([request], batch_size=1)[0]
        ref = ref_score(model, *request)
        assert got[1] == alone[1] == ref[1] == len(request[1])
        assert abs(got[0] - alone[0]) <= 1e-4 and abs(got[0] - ref[0]) <= 1e-4
        assert got[2] == alone[2] == ref[2]
    assert batched[-1][2] and not batched[0][2]


def test_score_rejects_what_cannot_be_scored():
    engine = Engine(tiny(block=8))
    with pytest.raises(UserError, match="continuation of 9 tokens does not fit the model's context of 8"):
        engine.score([([1], list(range(9)))])
    with pytest.raises(UserError, match="empty continuation"):
        engine.score([([1], [])])
    with pytest.raises(UserError, match="empty context"):
        engine.score([([], [1])])


# ----------------------------------------------------------- demonstrations
def test_demonstrations_are_seeded_per_example_nested_over_k_and_exclude_the_example():
    for i in range(10):
        d = sample_demos(i, 10, 9, seed=3, exclude_example=True)
        assert sorted(d) == [j for j in range(10) if j != i]  # all 9 others: a permutation without i
        assert d == sample_demos(i, 10, 9, seed=3, exclude_example=True)
        assert sample_demos(i, 10, 4, seed=3, exclude_example=True) == d[:4]
    assert sample_demos(0, 10, 9, seed=3, exclude_example=True) != sample_demos(0, 10, 9, seed=4, exclude_example=True)
    assert sorted(sample_demos(2, 5, 5, seed=0, exclude_example=False)) == [0, 1, 2, 3, 4]  # a separate train pool
    first = [sample_demos(i, 5, 1, seed=0, exclude_example=False)[0] for i in range(2000)]
    assert all(300 < first.count(j) < 500 for j in range(5))  # uniform over the pool


def test_truncation_drops_whole_demonstrations_and_skips_examples_that_cannot_fit(tmp_path, tok, monkeypatch):
    rows = [{"text": t, "label": lab} for t, lab in [
        ("good film", "pos"), ("bad plot", "neg"), ("fine acting", "pos"), ("dull", "neg"),
        ("a long review that goes on and on and on about everything", "pos"), ("loved it", "pos"),
        ("hated it", "neg")]]
    task = load_task(write_task(tmp_path / "sst.jsonl", rows))
    model = tiny(block=48)
    seen: list[tuple[list[int], list[int]]] = []
    score = Engine.score

    def spy(self, requests, batch_size=16):
        seen.extend(requests)
        return score(self, requests, batch_size)

    monkeypatch.setattr(Engine, "score", spy)
    with pytest.warns(UserWarning, match="1 of 7 examples do not fit the model's context of 48 tokens"):
        result = evaluate_icl(model, tok, task, [3], seed=5)
    r = result["results"]["3"]
    assert (r["n"], r["skipped"]) == (6, 1)
    room = 48 + 1
    labels = len(task.labels)
    truncated = kept_some = kept_total = 0
    examples = [i for i in range(7) if i != 4]
    for e, i in enumerate(examples):
        prompt = tok.decode(seen[e * labels][0])
        context = f"{rows[i]['text']}\nLabel:"
        draw = [f"{rows[j]['text']}\nLabel: {rows[j]['label']}" for j in sample_demos(i, 7, 3, 5, True)]
        kept = prompt.split("\n\n")[:-1]
        assert prompt.endswith("\n\n" + context if kept else context)  # the example itself is never cut
        assert kept == draw[len(draw) - len(kept):]  # whole demonstrations, the farthest dropped first
        assert len(prompt) + 4 <= room
        kept_some += bool(kept)
        kept_total += len(kept)
        if len(kept) < 3:
            truncated += 1
            assert len("\n\n".join(draw[len(draw) - len(kept) - 1:] + [context])) + 4 > room
    assert r["truncated"] == truncated > 0 and kept_some > 0
    assert r["demos"] == kept_total / 6 < 3  # how many demonstrations the examples really saw


# ---------------------------------------------------------------- accuracy
def test_acc_and_acc_norm_differ_when_choice_lengths_differ(tmp_path, tok):
    """Hand-checked: a short unlikely choice wins on summed log-prob, a long likely one per token."""
    model = tiny(vocab=tok.vocab_size)
    context = "Pick one:"
    ids = tok.encode(context + " ")
    with torch.no_grad():
        letters = torch.tensor(tok.encode(string.ascii_lowercase))
        short = tok.decode([int(letters[model(torch.tensor([ids]))[0, -1, letters].argmin()])])
        long = []
        for _ in range(8):
            long.append(int(letters[model(torch.tensor([ids + long]))[0, -1, letters].argmax()]))
    long_text = tok.decode(long)
    s_short = ref_score(model, tok.encode(context), tok.encode(" " + short))
    s_long = ref_score(model, tok.encode(context), tok.encode(" " + long_text))
    assert s_short[0] > s_long[0] and s_short[0] / s_short[1] < s_long[0] / s_long[1]
    rows = [{"context": context, "choices": [short, long_text], "label": 1},
            {"context": "Other:", "choices": ["a", "b"], "label": 0}]
    result = evaluate_icl(model, tok, load_task(write_task(tmp_path / "mc.jsonl", rows)), [0], max_examples=1)
    assert result["results"]["0"] == {"acc": 0.0, "acc_norm": 1.0, "acc_norm_chars": 1.0, "chance": 0.5, "n": 1,
                                      "skipped": 0, "truncated": 0, "demos": 0.0}  # per char = per token here
    assert result["type"] == "multiple_choice"


TASKS = {
    "classification": (
        [{"text": t, "label": lab} for t, lab in [("good film", "pos"), ("bad plot", "neg"), ("fine acting", "pos"),
                                                 ("dull", "neg"), ("loved it", "pos"), ("hated it", "neg")]],
        lambda r: f"{r['text']}\nLabel:", lambda r, labels: (labels, labels.index(r["label"]))),
    "entailment": (
        [{"premise": p, "hypothesis": h, "label": lab} for p, h, lab in [
            ("A man sleeps.", "A person rests.", "entailment"), ("A dog runs.", "A cat sits.", "contradiction"),
            ("Kids play.", "It is sunny.", "neutral"), ("She sings.", "She is silent.", "contradiction"),
            ("He eats.", "He has food.", "entailment")]],
        lambda r: f"{r['premise']}\nHypothesis: {r['hypothesis']}\nLabel:",
        lambda r, labels: (labels, labels.index(r["label"]))),
    "similarity": (
        [{"text_a": a, "text_b": b, "label": lab} for a, b, lab in [
            ("A cat.", "A kitten.", 1), ("Rain today.", "Dry today.", 0), ("He ran.", "He jogged.", 1),
            ("Big house.", "Small car.", 0), ("I agree.", "I concur.", 1)]],
        lambda r: f"Sentence 1: {r['text_a']}\nSentence 2: {r['text_b']}\n"
                  f"Question: Do both sentences mean the same thing?\nAnswer:",
        lambda r, labels: (["no", "yes"], r["label"])),
    "multiple_choice": (
        [{"context": c, "choices": ch, "label": lab} for c, ch, lab in [
            ("The sky is", ["blue", "loud", "a fish"], 0), ("Two plus two is", ["four", "green"], 0),
            ("Birds can", ["swim upward", "fly"], 1), ("Ice is", ["hot", "cold", "sour", "loud"], 1),
            ("Fire is", ["cold", "hot"], 1)]],
        lambda r: r["context"], lambda r, labels: (r["choices"], r["label"])),
    "completion": (
        [{"prompt": p, "answer": a} for p, a in [
            ("The cat sat on the ", "mat"), ("She opened the", "door"), ("He drank a cup of", "tea"),
            ("They walked to the", "park"), ("We ate", "bread")]],
        lambda r: r["prompt"], lambda r, labels: ([r["answer"]], 0)),
}


def space(context: str) -> str:
    """The separator before an answer: one space, none after a context that ends in whitespace."""
    return "" if context[-1].isspace() else " "


@pytest.mark.parametrize("kind", list(TASKS))
def test_accuracies_equal_a_brute_force_computation_with_model_idx(tmp_path, tok, kind):
    rows, context, choices = TASKS[kind]
    labels = sorted({r["label"] for r in rows}) if kind in ("classification", "entailment") else None
    # Untied: a tied random model just repeats its last token, so greedy answers would be trivial.
    model = tiny(vocab=tok.vocab_size, block=512, tie_embeddings=False)
    if kind == "completion":  # one answer is the model's own greedy continuation, so acc is not trivially 0
        rows = [dict(r) for r in rows]
        ids = tok.encode(rows[0]["prompt"])
        with torch.no_grad():
            for _ in range(3):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        rows[0]["answer"] = tok.decode(ids[-3:])
        assert rows[0]["answer"][0] not in string.whitespace and rows[0]["answer"][-1] != " "
    task = load_task(write_task(tmp_path / f"{kind}.jsonl", rows))
    assert task.type == kind
    result = evaluate_icl(model, tok, task, [0, 2], seed=7, model_name="m")
    assert result["model"] == "m" and result["task"] == str(task.path)
    for k in (0, 2):
        hits = hits_norm = 0
        for i, row in enumerate(rows):
            demos = []
            for j in sample_demos(i, len(rows), k, 7, exclude_example=True):
                cs, gold = choices(rows[j], labels)
                demos.append(context(rows[j]) + space(context(rows[j])) + cs[gold])
            prompt = tok.encode("\n\n".join(demos + [context(row)]))
            cs, gold = choices(row, labels)
            scores = [ref_score(model, prompt, tok.encode(space(context(row)) + c)) for c in cs]
            best = max(range(len(cs)), key=lambda c: scores[c][0])
            best_norm = max(range(len(cs)), key=lambda c: scores[c][0] / scores[c][1])
            hits += scores[0][2] if kind == "completion" else best == gold
            hits_norm += best_norm == gold
        r = result["results"][str(k)]
        assert (r["n"], r["skipped"], r["truncated"]) == (len(rows), 0, 0)
        assert r["acc"] == hits / len(rows)
        assert r["acc_norm"] == (None if kind == "completion" else hits_norm / len(rows))


def test_three_normalisations_against_a_brute_force_with_bpe(tmp_path, gpt2_ranks_path):
    """With GPT-2's BPE, tokens and characters differ: acc sums log-probs, acc_norm divides by tokens (GPT-3),
    acc_norm_chars by characters (lm-evaluation-harness's acc_norm); chance is the mean of 1/choices."""
    bpe = load_tokenizer(str(gpt2_ranks_path))
    rows = [{"context": c, "choices": ch, "label": lab} for c, ch, lab in [
        ("The river is", ["Mississippi", "wet", "a photosynthesising organism"], 0),
        ("Two plus two is", ["four", "quadrilateralisation", "5"], 0),
        ("Birds can", ["swim", "fly over antidisestablishmentarianism"], 1),
        ("Ice is", ["hot", "cold", "sour", "ultramicroscopically loud"], 1)]]
    model = tiny(vocab=bpe.vocab_size, block=128, tie_embeddings=False, seed=3)
    result = evaluate_icl(model, bpe, load_task(write_task(tmp_path / "mc.jsonl", rows)), [0])["results"]["0"]
    picks = {"acc": 0, "acc_norm": 0, "acc_norm_chars": 0}
    for row in rows:
        conts = [" " + c for c in row["choices"]]
        scores = [ref_score(model, bpe.encode(row["context"]), bpe.encode(c)) for c in conts]
        by = {"acc": lambda c: scores[c][0], "acc_norm": lambda c: scores[c][0] / scores[c][1],
              "acc_norm_chars": lambda c: scores[c][0] / len(conts[c])}
        for name, key in by.items():
            picks[name] += max(range(len(conts)), key=key) == row["label"]
    assert {k: result[k] for k in picks} == {k: v / len(rows) for k, v in picks.items()}
    assert result["chance"] == pytest.approx((1 / 3 + 1 / 3 + 1 / 2 + 1 / 4) / 4)
    assert any(len(bpe.encode(" " + c)) != len(" " + c) for r in rows for c in r["choices"])


# --------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def runs(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("icl")
    save_model(root / "a", tiny(vocab=tok.vocab_size, seed=0), tok)
    save_model(root / "b", tiny(vocab=tok.vocab_size, seed=1), tok)
    export_hf(tiny(vocab=tok.vocab_size), root / "hf-no-tok")  # a transformers directory without a tokenizer
    rows, _, _ = TASKS["multiple_choice"]
    write_task(root / "mc.jsonl", rows)
    write_task(root / "graded.jsonl", [{"text_a": "a", "text_b": "b", "label": 0.5},
                                       {"text_a": "c", "text_b": "d", "label": 3.2}])
    return root


def test_cli_writes_json_markdown_and_plot(runs, tmp_path, capsys):
    a, b = str(runs / "a"), str(runs / "b")
    assert main(["eval", "icl", "--model", a, "--model", b, "--task", str(runs / "mc.jsonl"),
                 "--shots", "0,1,2", "--out", str(tmp_path / "out"), "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["type"] == "multiple_choice" and results["shots"] == [0, 1, 2]
    assert list(results["models"]) == [a, b] and list(results["models"][a]) == ["0", "1", "2"]
    assert set(results["models"][a]["1"]) == {"acc", "acc_norm", "acc_norm_chars", "chance", "n", "skipped",
                                              "truncated", "demos"}
    md = (tmp_path / "out" / "results.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 2 * 3 and table[0].startswith("| model | shots | acc | acc_norm |")
    assert "\n".join(table) in out
    acc = results["models"][b]["2"]["acc"]
    assert f"| {b} | 2 | {acc:.4f} |" in md
    png = tmp_path / "out" / "accuracy_vs_shots.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    with Image.open(png) as im:
        assert im.size == (770, 462)


def test_cli_template_as_typed_in_a_shell(runs, tmp_path, capsys):
    argv = ["eval", "icl", "--model", str(runs / "a"), "--task", str(runs / "mc.jsonl"), "--shots", "0,1",
            "--out", str(tmp_path / "out"), "--template", "Q: {context}\\nA:"]
    assert main(argv) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["template"] == "Q: {context}\nA:"
    model = load_model(str(runs / "a"))
    direct = evaluate_icl(model, load_tokenizer(str(runs / "a" / "tokenizer")), load_task(runs / "mc.jsonl"), [0, 1], template="Q: {context}\nA:")
    assert results["models"][str(runs / "a")] == direct["results"]
    capsys.readouterr()


@pytest.mark.parametrize("extra,needle", [
    (["--template", "{question}", "--shots", "0"], "does not fit the rows of"),
    (["--shots", "0,x"], "comma-separated counts"),
    (["--shots", "0,5"], "5 shots need 5 demonstrations but"),
    (["--task", "{root}/graded.jsonl"], "graded similarity"),
    (["--model", "hf:{root}/hf-no-tok"], "has no tokenizer"),
])
def test_cli_errors_are_one_line_exit_2(runs, tmp_path, capsys, extra, needle):
    argv = ["eval", "icl", "--task", str(runs / "mc.jsonl"), "--out", str(tmp_path / "o"), *extra]
    if "--model" not in extra:
        argv += ["--model", str(runs / "a")]
    assert main([a.replace("{root}", str(runs)) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
