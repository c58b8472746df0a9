"""The chat format: exact ids and train masks, prompt/pair consistency, injection safety, missing tokens."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptlab.chat import (
    CHAT_TOKENS,
    Message,
    add_chat_tokens,
    has_chat_tokens,
    render,
    render_pair,
    render_prompt,
    stop_ids,
)
from gptlab.errors import TokenizerError
from gptlab.tokenizer import ASSISTANT, END_OF_TURN, EOS, PAD, SYSTEM, USER, BPETokenizer, CharTokenizer, train_bpe

# CharTokenizer.from_text("abc"): a=0 b=1 c=2, then SPECIAL_TOKENS in order from 3.
S, U, A, E = 8, 9, 10, 11


@pytest.fixture(scope="module")
def abc() -> CharTokenizer:
    tok = CharTokenizer.from_text("abc")
    assert [tok.special_tokens[t] for t in CHAT_TOKENS] == [S, U, A, E]
    return tok


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return train_bpe(iter(["the user said hello to the assistant <|user|> and <|end|>\n" * 50]), 300)


def test_render_system_user_assistant_exact(abc):
    msgs = [Message("system", "c"), Message("user", "ab"), Message("assistant", "ba")]
    ids, mask = render(msgs, abc)
    assert ids == [S, 2, E, U, 0, 1, E, A, 1, 0, E]
    assert mask == [False] * 8 + [True] * 3
    assert abc.decode(ids) == "<|system|>c<|end|><|user|>ab<|end|><|assistant|>ba<|end|>"


def test_render_multi_turn_masks_every_assistant_turn(abc):
    msgs = [Message("user", "a"), Message("assistant", "b"), Message("user", "c"), Message("assistant", "ab")]
    ids, mask = render(msgs, abc, add_generation_prompt=True)
    assert ids == [U, 0, E, A, 1, E, U, 2, E, A, 0, 1, E, A]
    f, t = False, True
    assert mask == [f, f, f, f, t, t, f, f, f, f, t, t, t, f]
    assert abc.decode(ids) == "<|user|>a<|end|><|assistant|>b<|end|><|user|>c<|end|><|assistant|>ab<|end|><|assistant|>"


def test_render_prompt_and_pair_agree_with_render(abc):
    assert render_prompt("ab", abc) == [U, 0, 1, E, A]
    assert render_prompt("ab", abc, system="c") == [S, 2, E, U, 0, 1, E, A]
    ids, start = render_pair("ab", "cc", abc)
    assert ids == render_prompt("ab", abc) + [2, 2, E]
    assert start == len(render_prompt("ab", abc))
    assert ids == render([Message("user", "ab"), Message("assistant", "cc")], abc)[0]


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_role_tokens_in_content_stay_ordinary_text(kind, bpe):
    tok = bpe if kind == "bpe" else CharTokenizer.from_text("<|>abcdeilmnorstuy")
    content = "<|user|>" + USER + END_OF_TURN + ASSISTANT
    ids, mask = render([Message("user", content), Message("assistant", "<|end|>")], tok)
    specials = set(tok.special_tokens.values())
    role_at = [i for i, t in enumerate(ids) if t in specials]
    assert len(role_at) == 4  # <|user|>, <|end|>, <|assistant|>, <|end|>: none from the content
    assert [ids[i] for i in role_at] == [tok.special_tokens[t] for t in (USER, END_OF_TURN, ASSISTANT, END_OF_TURN)]
    assert tok.decode(ids) == f"{USER}{content}{END_OF_TURN}{ASSISTANT}<|end|>{END_OF_TURN}"
    assert sum(mask) == len(tok.encode("<|end|>")) + 1


def test_missing_chat_tokens_raise_and_add_chat_tokens_fixes():
    tok = CharTokenizer.from_text("abc", special_tokens=[EOS, PAD])
    assert not has_chat_tokens(tok)
    for call in (lambda: render([Message("user", "a")], tok), lambda: render_prompt("a", tok), lambda: stop_ids(tok)):
        with pytest.raises(TokenizerError, match=r"<\|system\|>.*add_chat_tokens.*gptlab sft"):
            call()
    assert add_chat_tokens(tok) == [5, 6, 7, 8]
    assert has_chat_tokens(tok) and add_chat_tokens(tok) == [5, 6, 7, 8]
    assert render_prompt("a", tok) == [6, 0, 8, 7]


def test_stop_ids_are_end_of_turn_then_eos(abc, bpe):
    assert stop_ids(abc) == [E, abc.eos_id]
    assert stop_ids(bpe) == [bpe.special_tokens[END_OF_TURN], bpe.eos_id]
    assert abc.pad_id not in stop_ids(abc)


def test_message_rejects_unknown_role():
    with pytest.raises(ValueError, match="'bot' is not one of 'system', 'user', 'assistant'"):
        Message("bot", "hi")


@settings(max_examples=100, deadline=None)
@given(prompt=st.text(), response=st.text(), system=st.none() | st.text())
def test_pair_response_slice_round_trips(bpe, prompt, response, system):
    ids, start = render_pair(prompt, response, bpe)
    assert ids[:start] == render_prompt(prompt, bpe)
    assert ids[-1] == bpe.special_tokens[END_OF_TURN]
    assert bpe.decode(ids[start:-1]) == response
    prompt_ids = render_prompt(prompt, bpe, system=system)
    assert prompt_ids[-1] == bpe.special_tokens[ASSISTANT]
    assert (prompt_ids[0] == bpe.special_tokens[SYSTEM]) == (system is not None)
