"""`gptlab chat-demo --rlhf`: the labeler's data from training conversations only, and the whole chain
(labeler, rankings, reward model, PPO into OUT/rlhf) end to end on a few conversations and a small budget."""

from __future__ import annotations

import io
import json

import pytest

from gptlab.align_data import load_rankings
from gptlab.chat_demo import VAL_FRACTION, labeler_rows, run_chat_demo
from gptlab.chat_repl import run_chat
from gptlab.cli import build_parser
from gptlab.conversations import Conversation, held_out_conversation, read_chitchat
from gptlab.engine import Engine, SamplingParams
from gptlab.errors import DataError
from gptlab.runs import load_run


@pytest.fixture(scope="module")
def chitchat() -> list[Conversation]:
    try:
        return read_chitchat()
    except DataError as e:
        pytest.skip(str(e))


def test_labeler_rows_pair_each_turn_with_its_reply_and_another_conversation_s():
    convs = [Conversation(str(i), (f"q{i}a", f"r{i}a", f"q{i}b", f"r{i}b"), "t") for i in range(5)]
    rows = labeler_rows(convs, seed=3)
    assert len(rows) == 2 * 2 * 5 and rows == labeler_rows(convs, seed=3)
    for real, other in zip(rows[::2], rows[1::2]):
        assert real["label"] == "real" and other["label"] == "other" and real["premise"] == other["premise"]
        conv = real["premise"][1]
        assert real["hypothesis"] == "r" + real["premise"][1:] and other["hypothesis"][1] != conv
    with pytest.raises(DataError, match="two conversations"):
        labeler_rows(convs[:1], seed=3)


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
    rankings = load_rankings(out / "rankings.jsonl")
    assert rankings and all(2 <= len(r.responses) <= 4 and r.prompt in trained for r in rankings)
    assert report["rlhf"]["rankings"] == len(rankings)

    assert set(report["reply_perplexity"]) == {"base", "sft", "rlhf"}
    assert all(p > 1 for p in report["reply_perplexity"].values())
    assert set(report["replies"]) == {"human", "human, shuffled", "base", "sft", "rlhf"}
    assert all(0 <= m["labeler_p_real"] <= 1 for m in report["replies"].values())
    rlhf = report["rlhf"]
    assert 0 <= rlhf["labeler_held_out_accuracy"] <= 1 and rlhf["kl_to_sft"] >= 0
    assert report["steps"]["ppo_iterations"] >= 1 and all(ex["rlhf"] is not None for ex in report["examples"])
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    md = (out / "report.md").read_text()
    assert "RLHF" in md and "| rlhf |" in md and "labeler P(real)" in md
