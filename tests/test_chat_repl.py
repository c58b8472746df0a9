"""`gptlab chat`: the conversation fits the context, commands work, replies stream what the engine generates."""

from __future__ import annotations

import io
import json

import pytest
import torch

from gptlab import GPT, GPTConfig
from gptlab.chat import Message, render, stop_ids
from gptlab.chat_repl import Conversation, run_chat
from gptlab.runs import save_model
from gptlab.cli import main
from gptlab.engine import Engine, SamplingParams
from gptlab.errors import UserError
from gptlab.tokenizer import CharTokenizer


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    tok = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz .!?")
    return Engine(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=tok.vocab_size)), tok)


def scripted(lines):
    it = iter(lines)

    def read(prompt: str) -> str:
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None
    return read


def test_conversation_drops_oldest_exchanges_and_keeps_the_system_prompt(engine):
    conv = Conversation(engine.tokenizer, block_size=64, reply_tokens=16, system="be kind")
    for i in range(4):
        conv.turns += [Message("user", f"question {'x' * i}"), Message("assistant", "an answer")]
    conv.turns.append(Message("user", "last one"))
    original = list(conv.turns)
    ids, dropped = conv.prompt_ids()
    assert len(ids) <= 64 - 16 and dropped >= 1
    assert conv.turns == original[2 * dropped:]  # whole exchanges, oldest first; the newest question stays
    assert conv.messages()[0] == Message("system", "be kind")
    assert ids == render(conv.messages(), engine.tokenizer, add_generation_prompt=True)[0]
    one_less = [Message("system", "be kind"), *original[2 * (dropped - 1):]]
    assert len(render(one_less, engine.tokenizer, add_generation_prompt=True)[0]) > 48  # no more dropped than needed
    conv.turns = [Message("user", "z" * 60)]
    with pytest.raises(UserError, match="shorten it"):
        conv.prompt_ids()


def test_repl_streams_replies_and_runs_commands(engine, tmp_path):
    out = io.StringIO()
    params = SamplingParams(max_new_tokens=8, temperature=0)
    save = tmp_path / "conv.json"
    conv = run_chat(engine, params, read=scripted(["/system be brief", "hello there", f"/save {save}", "/reset",
                                                   "again"]), out=out)
    text = out.getvalue()
    assert "(system prompt set)" in text and "(conversation cleared)" in text
    saved = json.loads(save.read_text())["messages"]
    assert [m["role"] for m in saved] == ["system", "user", "assistant"] and saved[1]["content"] == "hello there"
    # the streamed reply is the engine's greedy completion of the rendered conversation
    ids = render([Message("system", "be brief"), Message("user", "hello there")], engine.tokenizer,
                 add_generation_prompt=True)[0]
    expected = engine.generate_ids([ids], SamplingParams(max_new_tokens=8, temperature=0,
                                                         stop_token_ids=stop_ids(engine.tokenizer)))[0].text
    assert saved[2]["content"] == expected.strip() and f"assistant> {expected}\n" in text
    assert [m.role for m in conv.messages()] == ["system", "user", "assistant"]  # after /reset: one exchange


def test_repl_reports_a_message_too_long_and_goes_on(engine):
    out = io.StringIO()
    conv = run_chat(engine, SamplingParams(max_new_tokens=8, temperature=0), read=scripted(["q" * 80, "hi"]), out=out)
    assert "(error: the message needs" in out.getvalue()
    assert [m.content for m in conv.turns if m.role == "user"] == ["hi"]


def test_chat_command_refuses_a_model_without_chat_format(engine, tmp_path, capsys):
    save_model(tmp_path / "base", engine.model, engine.tokenizer)
    assert main(["chat", "--model", str(tmp_path / "base")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no chat format" in err and "gptlab sft" in err and len(err.splitlines()) == 1


def test_a_failed_save_keeps_the_session(engine, tmp_path):
    out = io.StringIO()
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    good = tmp_path / "conv.json"
    conv = run_chat(engine, SamplingParams(max_new_tokens=4, temperature=0),
                    read=scripted(["hello", f"/save {tmp_path}", f"/save {blocker}/conv.json", "again",
                                   f"/save {good}"]), out=out)
    text = out.getvalue()
    assert f"(could not save to {tmp_path}: " in text and f"(could not save to {blocker}/conv.json: " in text
    assert text.count("the conversation is kept)") == 2
    saved = json.loads(good.read_text())["messages"]
    assert [m["content"] for m in saved if m["role"] == "user"] == ["hello", "again"]
    assert len(conv.turns) == 4 and sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "conv.json"]


def test_the_reply_budget_is_clamped_to_the_context_once(engine):
    """The default 128 new tokens on a 64-token model: every message is answered, the clamp said once."""
    out = io.StringIO()
    conv = run_chat(engine, SamplingParams(max_new_tokens=128, temperature=0),
                    read=scripted(["hello", "and again"]), out=out)
    text = out.getvalue()
    assert text.count("(the model's context is 64 tokens: the conversation keeps 32 of them, and replies longer "
                      "than 32 tokens slide the window)") == 1
    assert "error" not in text and [m.role for m in conv.turns] == ["user", "assistant"] * 2
