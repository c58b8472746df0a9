"""Real conversations into the SFT format: chitchat-dataset and chatterbot-corpus as installed, their errors
named by file and line (or conversation), the held-out split, and `gptlab chat-demo` end to end on a few
conversations and a small budget."""

from __future__ import annotations

import json

import pytest

from gptlab.align_data import load_sft
from gptlab.chat_demo import content_words, distinct_n, on_topic, run_chat_demo
from gptlab.conversations import (
    Conversation,
    held_out_conversation,
    read_chatterbot,
    read_chitchat,
    sft_rows,
)
from gptlab.errors import DataError
from gptlab.runs import load_run


def test_chitchat_reads_every_two_person_conversation(chitchat):
    # 7,168 entries; 3,150 of them hold one speaker's messages only, which are no conversation
    assert len(chitchat) == 4017
    first = next(c for c in chitchat if c.id == "a07edb12-6b91-4138-b11e-02421888d699")
    assert first.turns[:2] == ("Hello\nHow are you doing today?", "whats up MD\nim doing good\nhow are you doing?")
    assert all(len(c.turns) >= 2 and all(t.strip() for t in c.turns) for c in chitchat)
    roles = [m["role"] for m in first.messages()]
    assert roles[:4] == ["user", "assistant", "user", "assistant"]


def test_chatterbot_english_reads_past_the_package_s_malformed_dialogue(capsys):
    convs = read_chatterbot("english")  # make install installs chatterbot-corpus
    err = capsys.readouterr().err
    assert "left out 1 dialogue(s)" in err and "trivia.yml:35" in err
    assert len(convs) > 100 and all(len(c.turns) >= 2 for c in convs)


def test_chatterbot_chinese_dialogues():
    try:
        convs = read_chatterbot("chinese")
    except DataError as e:
        pytest.skip(str(e))
    greeting = next(c for c in convs if c.turns[0] == "早上好，你好吗?")
    assert greeting.turns[1] == "我挺好的，你呢" and greeting.source.endswith("conversations.yml:4")
    assert len(convs) > 100


def test_chitchat_errors_name_the_file_and_conversation(tmp_path):
    bad = tmp_path / "dataset.json"
    bad.write_text(json.dumps({"c1": {"messages": [[{"text": "hi", "sender": "a"}], "oops"]}}))
    with pytest.raises(DataError, match=r"dataset.json: conversation c1: turn 1 must be a non-empty list"):
        read_chitchat(bad)
    bad.write_text('{"c1": {"messages": [}')
    with pytest.raises(DataError, match=r"dataset.json: .*reinstall"):
        read_chitchat(bad)
    three = [[{"text": t, "sender": s}] for t, s in (("a", 1), ("b", 2), ("c", 3))]
    bad.write_text(json.dumps({"c2": {"messages": three}}))
    with pytest.raises(DataError, match="conversation c2: has 3 speakers"):
        read_chitchat(bad)


def test_chatterbot_errors_name_the_file_and_line(tmp_path):
    f = tmp_path / "talk.yml"
    f.write_text("conversations:\n- - hello\n  - hi\n- just a string\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"talk.yml:4: a dialogue is a list of turns"):
        read_chatterbot(paths=[f])
    f.write_text("conversations:\n- - hello\n  - ''\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"talk.yml:3: turn 1 is empty"):
        read_chatterbot(paths=[f])
    f.write_text("conversations:\n- - hello\n  - [unclosed\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"talk.yml:\d+: not YAML"):
        read_chatterbot(paths=[f])
    f.write_text("categories: [x]\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"talk.yml:1: needs a 'conversations:' list"):
        read_chatterbot(paths=[f])
    f.write_text("conversations:\n- - hello\n  - hi\n  - 1984\n", encoding="utf-8")
    assert read_chatterbot(paths=[f])[0].turns == ("hello", "hi", "1984")


def test_conversations_command_writes_sft_rows_with_held_out_conversations(tmp_path, capsys):
    from gptlab.cli import main

    try:
        read_chatterbot("chinese")
    except DataError as e:
        pytest.skip(str(e))
    assert main(["conversations", "--source", "chatterbot:chinese", "--out", str(tmp_path), "--val-fraction", "0.2"]) == 0
    train, val = (load_sft(tmp_path / f"{s}.jsonl") for s in ("train", "val"))
    convs = read_chatterbot("chinese")
    assert len(train) + len(val) == len(convs) and len(val) == sum(held_out_conversation(c, 0.2, 1337) for c in convs)
    assert [m.content for m in train[0].messages] == list(next(
        c for c in convs if not held_out_conversation(c, 0.2, 1337)).turns)
    assert main(["conversations", "--source", "irc", "--out", str(tmp_path / "x")]) == 2
    assert "choose chitchat or chatterbot" in capsys.readouterr().err


def test_sft_rows_keep_whole_exchanges_in_order(tmp_path):
    turns = tuple(f"turn {k} " + "x" * (k * 7 % 50) for k in range(13))
    conv = Conversation("c", turns, "test")
    whole = sft_rows([conv])
    assert [m["content"] for m in whole[0]["messages"]] == list(turns)
    pieces = sft_rows([conv], 120)
    seen = [m["content"] for row in pieces for m in row["messages"]]
    assert seen == list(turns[:len(seen)])  # consecutive, in order, never a turn twice
    for row in pieces:
        assert row["messages"][0]["role"] == "user" and sum(len(m["content"]) for m in row["messages"]) <= 120
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"] * (len(row["messages"]) // 2)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pieces))
    assert len(load_sft(path)) == len(pieces)  # the SFT stage reads them as they are
    held = [held_out_conversation(Conversation(str(i), turns, "t"), 0.2, 1) for i in range(500)]
    assert 60 < sum(held) < 140 and held == [held_out_conversation(Conversation(str(i), turns, "t"), 0.2, 1)
                                             for i in range(500)]


def test_reply_measures():
    assert distinct_n(["a b a b", "a b"], 1) == 2 / 6 and distinct_n(["a b c", "a b d"], 2) == 3 / 4
    assert content_words("I love my cats, don't you?") == {"love", "cat"}
    assert on_topic(["hi", "I have two cats"], "my cat is orange") and not on_topic(["I have cats"], "so what")


def test_chat_demo_end_to_end_on_a_small_budget(tmp_path, chitchat, capsys):
    out = tmp_path / "chat"
    report = run_chat_demo(out, minutes=0.25, conversations=chitchat[:160], progress=False)
    printed = capsys.readouterr().out
    assert f"gptlab chat --model {out}" in printed and f"gptlab serve --model {out}" in printed
    gpt, tok, config = load_run(out)  # the run serves as it is
    assert config["stage"] == "sft" and config.get("chat_format") and tok.special_tokens.get("<|user|>") is not None
    train = (out / "conversations" / "train.jsonl").read_text()
    assert report["conversations"]["held_out"] > 0 and report["conversations"]["measured"] > 0
    for ex in report["examples"]:
        assert json.dumps(ex["human"])[1:-1] not in train  # held-out replies never trained on
    replies = report["replies"]
    assert replies["human"]["on_topic"] > replies["human, shuffled"]["on_topic"]
    assert set(report["reply_perplexity"]) == {"base", "sft"} and all(p > 1 for p in report["reply_perplexity"].values())
    assert (out / "report.md").read_text().startswith("held-out human replies, perplexity")
