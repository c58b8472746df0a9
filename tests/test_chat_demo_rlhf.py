"""`gptlab chat-demo --rlhf`: the labeler's data from training conversations only, and the whole chain
(labeler, rankings, reward model, PPO into OUT/rlhf) end to end on a few conversations and a small budget."""

from __future__ import annotations

import io
import json

from gptlab.align_data import load_rankings
from gptlab.chat_demo import VAL_FRACTION, exchanges, labeler_rows, on_topic, run_chat_demo
from gptlab.chat_repl import run_chat
from gptlab.cli import build_parser
from gptlab.conversations import Conversation, held_out_conversation
from gptlab.engine import Engine, SamplingParams
from gptlab.runs import load_run


def test_labeler_rows_are_people_s_replies_labelled_by_the_proxy_and_balanced():
    convs = [Conversation(str(i), (f"do you like {w}", f"{w} are great", f"what else", "nothing much", "bye"), "t")
             for i, w in enumerate(["cats", "dogs", "trains", "boats", "kites", "books"])]
    pairs = exchanges(convs, seed=3)
    assert sorted(pairs) == sorted((t, r) for c in convs for t, r in (c.turns[0:2], c.turns[2:4]))  # no reply-less turn
    assert pairs == exchanges(convs, seed=3) and pairs != exchanges(convs, seed=4)
    assert sorted(exchanges(convs, 3, fits=lambda turn: "like" in turn)) == sorted(p for p in pairs if "like" in p[0])
    rows = labeler_rows(pairs, seed=3)
    assert rows == labeler_rows(pairs, seed=3)
    on = [r for r in rows if r["label"] == "on topic"]
    assert len(on) == len(rows) / 2 == 6  # the six "do you like X" / "X are great" replies, as many off
    assert all(r["premise"].endswith(r["hypothesis"].split()[0]) for r in on)
    assert all(on_topic([r["premise"]], r["hypothesis"]) == (r["label"] == "on topic") for r in rows)
    assert {r["hypothesis"] for r in rows} <= {t for c in convs for t in c.turns}  # people's replies only


def test_chat_demo_rlhf_flag():
    assert build_parser().parse_args(["chat-demo", "--out", "x", "--rlhf"]).rlhf
    assert not build_parser().parse_args(["chat-demo", "--out", "x"]).rlhf


def test_chat_demo_with_rlhf_end_to_end_on_a_small_budget(tmp_path, chitchat, capsys):
    out = tmp_path / "chat"
    convs = chitchat[:160]
    report = run_chat_demo(out, minutes=0.25, conversations=convs, progress=False, rlhf=True)
    printed = capsys.readouterr().out
    assert f"gptlab chat --model {out / 'rlhf'}" in printed and f"gptlab serve --model {out / 'rlhf'}" in printed

    # the RLHF policy is a chat run of its own; OUT stays the SFT run
    assert load_run(out)[2]["stage"] == "sft"
    gpt, tok, config = load_run(out / "rlhf")
    assert config["stage"] == "ppo" and config.get("chat_format")
    said = ["hi, how was your weekend?"]

    def read(_: str) -> str:
        if not said:
            raise EOFError
        return said.pop()

    conv = run_chat(Engine(gpt, tok), SamplingParams(max_new_tokens=8, seed=0), read=read, out=io.StringIO())
    assert [m.role for m in conv.turns] == ["user", "assistant"]

    # what the labeler and the rankings saw: training conversations only
    trained = {t for c in convs if not held_out_conversation(c, VAL_FRACTION, 1337) for t in c.turns}
    for name in ("labeler-train.jsonl", "labeler-val.jsonl"):
        rows = [json.loads(line) for line in (out / name).read_text().splitlines()]
        assert rows and all({r["premise"], r["hypothesis"]} <= trained for r in rows)
        assert 0.3 < sum(r["label"] == "on topic" for r in rows) / len(rows) < 0.7  # a prefix of balanced rows
    rankings = load_rankings(out / "rankings.jsonl")
    assert rankings and all(2 <= len(r.responses) <= 4 and r.prompt in trained for r in rankings)
    assert report["rlhf"]["rankings"] == len(rankings)

    assert set(report["reply_perplexity"]) == {"base", "sft", "rlhf"}
    assert all(p > 1 for p in report["reply_perplexity"].values())
    assert set(report["replies"]) == {"human", "human, shuffled", "base", "sft", "rlhf"}
    assert all(0 <= m["labeler_p_on_topic"] <= 1 for m in report["replies"].values())
    rlhf = report["rlhf"]
    assert 0 <= rlhf["labeler_held_out_accuracy"] <= 1 and rlhf["kl_to_sft"] >= 0
    assert report["steps"]["ppo_iterations"] >= 1 and all(ex["rlhf"] is not None for ex in report["examples"])
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    md = (out / "report.md").read_text()
    assert "RLHF" in md and "| rlhf |" in md and "labeler P(on topic)" in md
