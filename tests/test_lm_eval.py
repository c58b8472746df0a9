"""EleutherAI's lm-evaluation-harness (the pinned `lm-eval` of the dev extra), unchanged, against `gptlab serve`.

The harness's `local-completions` model with its remote tokenizer (it asks the server to tokenize, reads the
end-of-text token from /tokenizer_info) scores a local multiple-choice task and a rolling log-likelihood
(perplexity) task. Its per-item log-likelihoods must be gptlab's own scores, and its acc / acc_norm those of
`gptlab eval icl` (acc / acc_norm_chars).
"""

from __future__ import annotations

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="the dev extra pins lm-eval[api]; `make test` installs it")
pytest.importorskip("tenacity", reason="lm-eval's API models need lm-eval[api]")

from lm_eval.tasks import TaskManager  # noqa: E402

from gptlab import GPT, GPTConfig  # noqa: E402
from gptlab.cli import main  # noqa: E402
from gptlab.engine import Engine  # noqa: E402
from gptlab.runs import save_model  # noqa: E402
from gptlab.serve import create_app  # noqa: E402
from gptlab.tokenizer import load_tokenizer  # noqa: E402
from serving import RunningApp  # noqa: E402

ROWS = [{"context": c, "choices": ch, "label": lab} for c, ch, lab in [
    ("The river is", ["Mississippi", "wet", "a photosynthesising organism"], 0),
    ("Two plus two is", ["four", "quadrilateralisation", "5"], 0),
    ("Birds can", ["swim", "fly over antidisestablishmentarianism"], 1),
    ("Ice is", ["hot", "cold", "sour", "ultramicroscopically loud"], 1),
    ("The king said", ["nothing", "a great many things about the sea"], 1)]]
TEXTS = ["The river is wet.", "Two plus two is four, said the king to the fool."]


def _task_files(root, rows_path, texts_path) -> None:
    (root / "mc.yaml").write_text(f"""task: gptlab_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {rows_path}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    (root / "roll.yaml").write_text(f"""task: gptlab_roll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {texts_path}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: bits_per_byte
""")


def test_the_harness_gets_gptlabs_log_likelihoods_item_by_item(tmp_path, monkeypatch, gpt2_ranks_path, capsys):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # the json loader reads the local files; nothing is fetched
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    tok = load_tokenizer(str(gpt2_ranks_path))
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=128, vocab_size=tok.vocab_size)).eval()
    rows_path, texts_path = tmp_path / "mc.jsonl", tmp_path / "text.jsonl"
    rows_path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    texts_path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (tmp_path / "tasks").mkdir()
    _task_files(tmp_path / "tasks", rows_path, texts_path)

    running = RunningApp(create_app(model, tok, {}, model_name="tiny"))
    try:
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={"base_url": f"{running.url}/v1/completions", "model": "tiny", "tokenizer_backend": "remote",
                        "tokenized_requests": True, "num_concurrent": 1, "max_retries": 1},
            tasks=["gptlab_mc", "gptlab_roll"], task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
            num_fewshot=0, log_samples=True)
    finally:
        running.stop()

    engine = Engine(model, tok)
    samples = sorted(out["samples"]["gptlab_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(ROWS)
    for row, sample in zip(ROWS, samples):
        pairs = [(context, continuation) for context, continuation in sample["arguments"]]
        assert pairs == [(row["context"], " " + c) for c in row["choices"]]
        ours = engine.score([(tok.encode(c), tok.encode(x)) for c, x in pairs])
        theirs = [ll for ll, _ in sample["filtered_resps"]]
        assert theirs == pytest.approx([s[0] for s in ours], abs=2e-5)
        assert [greedy for _, greedy in sample["filtered_resps"]] == [s[2] for s in ours]
        best = max(range(len(pairs)), key=lambda i: ours[i][0])
        best_chars = max(range(len(pairs)), key=lambda i: ours[i][0] / len(pairs[i][1]))
        assert (sample["acc"], sample["acc_norm"]) == (float(best == row["label"]), float(best_chars == row["label"]))

    # the rolling (perplexity) request starts from the end-of-text token the harness read from the server
    for sample in sorted(out["samples"]["gptlab_roll"], key=lambda s: s["doc_id"]):
        text = sample["arguments"][0][0]
        (ll, _, _), = engine.score([([tok.eos_id], tok.encode(text))])
        assert sample["filtered_resps"][0] == pytest.approx(ll, abs=2e-5)

    # and the same task through `gptlab eval icl`: acc is acc, the harness's acc_norm is acc_norm_chars
    save_model(tmp_path / "run", model, tok)
    assert main(["eval", "icl", "--model", str(tmp_path / "run"), "--task", str(rows_path), "--shots", "0",
                 "--out", str(tmp_path / "icl")]) == 0
    ours = json.loads((tmp_path / "icl" / "results.json").read_text())["models"][str(tmp_path / "run")]["0"]
    harness = out["results"]["gptlab_mc"]
    assert (ours["acc"], ours["acc_norm_chars"]) == (harness["acc,none"], harness["acc_norm,none"])
    capsys.readouterr()
