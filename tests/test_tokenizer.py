"""Tokenizers against independent references: tiktoken's own loader and Hugging Face's BPE."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptlab.errors import TokenizerError
from gptlab.tokenizer import (
    ASSISTANT,
    DELIM,
    EOS,
    EXTRACT,
    PAD,
    SPECIAL_TOKENS,
    START,
    BPETokenizer,
    CharTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    load_gpt2_pair,
    load_ranks,
    load_tokenizer,
    save_gpt2_pair,
    save_ranks,
    train_bpe,
    train_tokenizer_files,
)

HYP = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Text strategies: all of Unicode (surrogates cannot be UTF-8), plus the places byte-level BPE breaks first.
FULL = st.text()
CJK = st.text(st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), min_size=1)
EMOJI = st.text(
    st.one_of(st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF), st.sampled_from(["\u200d", "\ufe0f", "\U0001f3fd"])),
    min_size=1,
)
CONTROL = st.text(st.characters(categories=["Cc", "Cf"]), min_size=1)
WS_RUNS = st.lists(
    st.one_of(
        st.text(st.sampled_from(" \t\n\r\x0b\x0c\x85\xa0\u2028\u3000"), min_size=1, max_size=12),
        st.sampled_from(["word", "'s", "'ll", "42", "!?", "中文", "é"]),
    ),
    max_size=20,
).map("".join)
ANY_TEXT = st.one_of(FULL, CJK, EMOJI, CONTROL, WS_RUNS, st.lists(st.one_of(FULL, CJK, EMOJI, WS_RUNS), max_size=5).map("".join))

CHINESE = "床前明月光，疑是地上霜。举头望明月，低头思故乡。\n白日依山尽，黄河入海流。欲穷千里目，更上一层楼。\n"


def _chunks(text: str, size: int = 1 << 16) -> list[str]:
    """Cut at line ends so every chunk is the same input for both encoders."""
    out, cur, n = [], [], 0
    for line in text.splitlines(keepends=True):
        cur.append(line)
        n += len(line)
        if n >= size:
            out.append("".join(cur))
            cur, n = [], 0
    if cur:
        out.append("".join(cur))
    return out


@pytest.fixture(scope="module")
def gpt2(gpt2_ranks_path) -> TiktokenTokenizer:
    return TiktokenTokenizer.from_file(gpt2_ranks_path)


@pytest.fixture(scope="module")
def reference(gpt2_ranks_path):
    """tiktoken's own loader and GPT-2 regex, as tiktoken.get_encoding('gpt2') builds it."""
    import tiktoken
    import tiktoken.load
    from tiktoken_ext import openai_public

    return tiktoken.Encoding(
        name="gpt2-reference",
        pat_str=openai_public.r50k_pat_str,
        mergeable_ranks=tiktoken.load.load_tiktoken_bpe(str(gpt2_ranks_path)),
        special_tokens={EOS: 50256},
    )


@pytest.fixture(scope="module")
def classic(gpt2_ranks_path):
    """The same ranks under the regex exactly as written in OpenAI's GPT-2 encoder.py (backtracking form)."""
    import tiktoken
    import tiktoken.load

    return tiktoken.Encoding(
        name="gpt2-encoder-py",
        pat_str=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks=tiktoken.load.load_tiktoken_bpe(str(gpt2_ranks_path)),
        special_tokens={EOS: 50256},
    )


@pytest.fixture(scope="module")
def pair_dir(gpt2, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("gpt2pair")
    save_gpt2_pair(gpt2.ranks, d)
    return d


@pytest.fixture(scope="module")
def hf_oracle(pair_dir):
    """Hugging Face's own byte-level BPE on the converted pair: a second, independent BPE implementation."""
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers

    hf = HF(models.BPE.from_file(str(pair_dir / "encoder.json"), str(pair_dir / "vocab.bpe")))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return hf


@pytest.fixture(scope="module")
def small_bpe(shakespeare_text) -> BPETokenizer:
    return train_bpe(iter([shakespeare_text[:300_000], CHINESE * 20, "emoji 🙂👍🏽 ok\n" * 20]), 1000)


@pytest.fixture(scope="module")
def shakespeare_char(shakespeare_text) -> CharTokenizer:
    return CharTokenizer.from_text(shakespeare_text)


# --------------------------------------------------------------------------- GPT-2 through tiktoken


def test_gpt2_basics(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.vocab_size == 50257
    assert gpt2.eos_id == 50256
    assert gpt2.pad_id is None
    assert gpt2.special_tokens == {EOS: 50256}
    assert gpt2.kind == "tiktoken" and gpt2.spec == "gpt2"
    assert gpt2.decode([15496, 995]) == "Hello world"
    assert gpt2.token_bytes(995) == b" world"
    assert gpt2.token_bytes(50256) == EOS.encode()


def test_gpt2_matches_tiktoken_on_shakespeare(gpt2, reference, classic, shakespeare_text):
    ids = gpt2.encode(shakespeare_text)
    assert ids == reference.encode_ordinary(shakespeare_text)
    assert ids == classic.encode_ordinary(shakespeare_text)
    assert len(ids) > 1_000_000
    chunks = _chunks(shakespeare_text)
    assert gpt2.encode_batch(chunks) == reference.encode_ordinary_batch(chunks)
    assert gpt2.decode(ids) == shakespeare_text


@HYP
@given(ANY_TEXT)
def test_gpt2_matches_tiktoken_on_unicode(gpt2, reference, classic, s):
    ids = gpt2.encode(s)
    assert ids == reference.encode_ordinary(s) == classic.encode_ordinary(s)


@HYP
@given(ANY_TEXT)
def test_gpt2_round_trip(gpt2, s):
    ids = gpt2.encode(s)
    assert gpt2.decode(ids) == s
    assert b"".join(gpt2.token_bytes(i) for i in ids) == s.encode("utf-8")


# --------------------------------------------------------------------------- the independent oracle


def test_pair_round_trips_to_the_same_ranks(gpt2, pair_dir):
    assert (pair_dir / "encoder.json").is_file() and (pair_dir / "vocab.bpe").is_file()
    merges = (pair_dir / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and len(merges) == 1 + 50000
    assert merges[1] == "Ġ t"  # GPT-2's first merge
    encoder = json.loads((pair_dir / "encoder.json").read_text(encoding="utf-8"))
    assert encoder[EOS] == 50256 and encoder["Hello"] == 15496 and encoder["Ġworld"] == 995
    assert load_gpt2_pair(pair_dir) == gpt2.ranks
    assert load_gpt2_pair((pair_dir / "encoder.json", pair_dir / "vocab.bpe")) == gpt2.ranks


def test_hf_oracle_matches_tiktoken_on_shakespeare(hf_oracle, reference, shakespeare_text):
    chunks = _chunks(shakespeare_text)
    theirs = [e.ids for e in hf_oracle.encode_batch_fast(chunks, add_special_tokens=False)]
    assert theirs == reference.encode_ordinary_batch(chunks)


@HYP
@given(ANY_TEXT)
def test_hf_oracle_matches_tiktoken_on_unicode(hf_oracle, gpt2, s):
    assert hf_oracle.encode(s, add_special_tokens=False).ids == gpt2.encode(s)


@pytest.mark.parametrize("naming", [("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")])
def test_load_tokenizer_on_a_gpt2_pair(naming, pair_dir, gpt2, tmp_path, shakespeare_text):
    for src, dst in zip(("encoder.json", "vocab.bpe"), naming):
        (tmp_path / dst).write_bytes((pair_dir / src).read_bytes())
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, BPETokenizer)
    assert tok.vocab_size == 50257 and tok.eos_id == 50256 and tok.special_tokens == {EOS: 50256}
    sample = _chunks(shakespeare_text)[:10]
    assert tok.encode_batch(sample) == gpt2.encode_batch(sample)
    s = f"Hi{EOS}there"
    assert tok.encode(s) == gpt2.encode(s) and 50256 not in tok.encode(s)
    assert tok.encode(s, allow_special=True) == gpt2.encode(s, allow_special=True) == [17250, 50256, 8117]
    assert [tok.token_bytes(i) for i in range(0, 50257, 997)] == [gpt2.token_bytes(i) for i in range(0, 50257, 997)]


def test_transformers_directory(pair_dir, gpt2, tmp_path):
    """A directory saved by transformers has its own tokenizer_config.json (no 'kind'): use its tokenizer.json."""
    transformers = pytest.importorskip("transformers")
    src = tmp_path / "src"
    src.mkdir()
    (src / "vocab.json").write_bytes((pair_dir / "encoder.json").read_bytes())
    (src / "merges.txt").write_bytes((pair_dir / "vocab.bpe").read_bytes())
    transformers.GPT2Tokenizer.from_pretrained(str(src)).save_pretrained(str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    tok = load_tokenizer(tmp_path / "hf")
    s = "Hello world, 中文 🙂 <|endoftext|>"
    assert tok.encode(s) == gpt2.encode(s)
    assert tok.encode(s, allow_special=True)[-1] == 50256 == tok.eos_id


# --------------------------------------------------------------------------- trained BPE


def test_trained_bpe_has_all_special_tokens(small_bpe):
    assert small_bpe.special_tokens == {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    assert small_bpe.eos_id == 0 and small_bpe.pad_id == 1
    assert small_bpe.vocab_size == 1000 and small_bpe.spec == "bpe:1000" and small_bpe.kind == "bpe"
    assert len(small_bpe.encode("the king")) < len("the king")  # it learned merges


@HYP
@given(ANY_TEXT)
def test_trained_bpe_round_trip(small_bpe, s):
    ids = small_bpe.encode(s)
    assert small_bpe.decode(ids) == s
    assert b"".join(small_bpe.token_bytes(i) for i in ids) == s.encode("utf-8")
    assert all(i >= len(SPECIAL_TOKENS) for i in ids)  # no special ids from user text


def test_train_bpe_from_files_matches_iterator_on_same_text(tmp_path, shakespeare_files):
    text = Path(shakespeare_files[0]).read_text(encoding="utf-8")
    f = tmp_path / "a.txt"
    f.write_text(text, encoding="utf-8", newline="")
    from_files = train_bpe([f], 600)
    from_iter = train_bpe(iter([text]), 600)
    assert from_files.encode(text[:5000]) == from_iter.encode(text[:5000])


def test_train_bpe_rejects_too_small_vocab_and_empty_stream():
    with pytest.raises(TokenizerError, match="at least 265"):
        train_bpe(iter(["abc"]), 100)
    with pytest.raises(TokenizerError, match="empty"):
        train_bpe(iter(["", "  \n"]), 300)


# --------------------------------------------------------------------------- characters


def test_char_shakespeare_vocab(shakespeare_text, shakespeare_char):
    chars = sorted(set(shakespeare_text))
    n = len(chars)
    assert shakespeare_char.chars == chars
    assert shakespeare_char.encode(chars[0] + chars[-1]) == [0, n - 1]
    assert shakespeare_char.special_tokens == {t: n + i for i, t in enumerate(SPECIAL_TOKENS)}
    assert shakespeare_char.eos_id == n and shakespeare_char.vocab_size == n + len(SPECIAL_TOKENS)
    assert shakespeare_char.decode(shakespeare_char.encode(shakespeare_text)) == shakespeare_text


def test_char_nanogpt_order():
    tok = CharTokenizer.from_text("hello world\n")
    assert tok.chars == ["\n", " ", "d", "e", "h", "l", "o", "r", "w"]
    assert tok.encode("hello") == [4, 3, 5, 5, 6]
    assert tok.eos_id == 9


ZH_CHAR = CharTokenizer.from_text(CHINESE)
ZH_TEXT = st.text(alphabet=ZH_CHAR.chars)


@HYP
@given(st.data())
def test_char_round_trip(shakespeare_char, data):
    s = data.draw(st.text(alphabet=shakespeare_char.chars))
    assert shakespeare_char.decode(shakespeare_char.encode(s)) == s
    zh = ZH_CHAR
    t = data.draw(ZH_TEXT)
    ids = zh.encode(t)
    assert len(ids) == len(t) and zh.decode(ids) == t
    assert b"".join(zh.token_bytes(i) for i in ids) == t.encode("utf-8")


def test_char_unknown_character_names_it():
    tok = CharTokenizer.from_text(CHINESE)
    with pytest.raises(TokenizerError, match=r"'x' \(U\+0078\).*from_text"):
        tok.encode("床x")
    with pytest.raises(TokenizerError, match=r"U\+1F642"):
        tok.encode("🙂")


def test_char_spec_cannot_be_loaded_by_name():
    with pytest.raises(TokenizerError, match="from_text"):
        load_tokenizer("char")


# --------------------------------------------------------------------------- shared behaviour of all kinds


@pytest.fixture(params=["gpt2", "bpe", "char"])
def any_tok(request, gpt2_ranks_path, shakespeare_text, small_bpe) -> Tokenizer:
    # Fresh objects: these tests add special tokens.
    if request.param == "gpt2":
        return TiktokenTokenizer.from_file(gpt2_ranks_path)
    if request.param == "bpe":
        return BPETokenizer.from_file(_saved(small_bpe, request) / "tokenizer.json")
    return CharTokenizer.from_text(shakespeare_text + "<>|")


def _saved(tok: Tokenizer, request) -> Path:
    d = Path(request.getfixturevalue("tmp_path")) / "orig"
    tok.save(d)
    return d


def test_allow_special(any_tok):
    s = f"To be{EOS}or not"
    plain = any_tok.encode(s)
    assert any_tok.eos_id not in plain
    assert any_tok.decode(plain) == s
    parsed = any_tok.encode(s, allow_special=True)
    assert parsed.count(any_tok.eos_id) == 1
    assert parsed == any_tok.encode("To be") + [any_tok.eos_id] + any_tok.encode("or not")
    assert any_tok.decode(parsed) == s
    assert any_tok.encode_batch([s, "x"]) == [plain, any_tok.encode("x")]
    assert any_tok.encode_batch([s], allow_special=True) == [parsed]


def test_add_special_tokens(any_tok, tmp_path):
    n = any_tok.vocab_size
    wanted = [START, DELIM, EXTRACT, PAD, EOS]
    ids = any_tok.add_special_tokens(wanted)
    if any_tok.kind == "tiktoken":  # GPT-2 has only EOS: the GPT-1 fine-tuning tokens go after it
        assert ids == [n, n + 1, n + 2, n + 3, 50256] and any_tok.vocab_size == n + 4
        assert any_tok.pad_id == n + 3
    else:  # trained/char vocabularies got every SPECIAL_TOKENS entry when built
        assert any_tok.vocab_size == n
        assert ids == [any_tok.special_tokens[t] for t in wanted]
    assert any_tok.add_special_tokens(wanted) == ids  # idempotent
    s = f"{START}Premise{DELIM}Hypothesis{EXTRACT}"
    enc = any_tok.encode(s, allow_special=True)
    assert enc[0] == ids[0] and enc[-1] == ids[2] and ids[1] in enc
    assert any_tok.decode(enc) == s
    assert any_tok.token_bytes(ids[0]) == START.encode()
    # A token nobody has yet is appended after the current vocabulary.
    m = any_tok.vocab_size
    assert any_tok.add_special_tokens(["<|sep2|>"]) == [m] and any_tok.vocab_size == m + 1
    assert any_tok.encode("a<|sep2|>", allow_special=True)[-1] == m
    again = load_tokenizer(any_tok.save(tmp_path / "saved"))
    assert again.special_tokens == any_tok.special_tokens
    assert again.encode(s, allow_special=True) == enc


def test_save_load_round_trip(any_tok, tmp_path, shakespeare_text):
    d = any_tok.save(tmp_path / "tok")
    cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["kind"] == any_tok.kind and cfg["special_tokens"] == any_tok.special_tokens
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]  # atomic writes leave no temp files
    again = load_tokenizer(d)
    assert type(again) is type(any_tok)
    assert (again.vocab_size, again.eos_id, again.pad_id, again.spec) == (any_tok.vocab_size, any_tok.eos_id, any_tok.pad_id, any_tok.spec)
    text = shakespeare_text[:200_000] + EOS
    assert again.encode(text) == any_tok.encode(text)
    assert again.encode(text, allow_special=True) == any_tok.encode(text, allow_special=True)
    # Self-contained: still loads after the directory moves.
    moved = tmp_path / "moved"
    os.rename(d, moved)
    assert load_tokenizer(str(moved)).encode("Hello") == any_tok.encode("Hello")


def test_decode_partial_utf8_and_bad_ids(any_tok):
    import numpy as np
    import torch

    ids = any_tok.encode("The king")
    assert any_tok.decode(np.array(ids)) == any_tok.decode(torch.tensor(ids)) == "The king"
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        any_tok.decode([any_tok.vocab_size + 5])
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        any_tok.token_bytes(-1)
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        any_tok.decode([-1])


def test_partial_tokens_decode_with_replacement(gpt2):
    ids = gpt2.encode("🙂")
    assert len(ids) > 1  # one emoji is several byte tokens in GPT-2
    assert "\ufffd" in gpt2.decode(ids[:1])
    assert gpt2.decode(ids) == "🙂"


# --------------------------------------------------------------------------- ranks files and specs


BAD_LINES = [
    (b"IQ== 0\nIg== x\n", 2, "rank"),  # non-integer rank
    (b"IQ== 0\nIg==\n", 2, "expected"),  # one field
    (b"IQ== 0\n!!! 1\n", 2, "base64"),  # not base64
    (b"IQ== 0\nIQ== 1\n", 2, "twice"),  # duplicate token
    (b"IQ== 0\nIg== 0\n", 2, "twice"),  # duplicate rank
    (b"IQ== 0\n\nIg== 1 extra\n", 3, "expected"),  # three fields, after a blank line
]


@pytest.mark.parametrize("content,line,what", BAD_LINES)
def test_bad_ranks_line(tmp_path, content, line, what):
    p = tmp_path / "broken.tiktoken"
    p.write_bytes(content)
    with pytest.raises(TokenizerError, match=f"broken.tiktoken line {line}: .*{what}") as e:
        load_tokenizer(p)
    assert "\n" not in str(e.value)


def test_bad_line_in_genuine_file(gpt2_ranks_path, tmp_path):
    lines = gpt2_ranks_path.read_bytes().splitlines()
    lines[1234] = b"this-is-not-base64 1234"
    p = tmp_path / "gpt2.tiktoken"
    p.write_bytes(b"\n".join(lines))
    with pytest.raises(TokenizerError, match=r"gpt2.tiktoken line 1235: "):
        load_ranks(p)


def test_ranks_missing_bytes_and_empty(tmp_path):
    p = tmp_path / "few.tiktoken"
    save_ranks({b"a": 0, b"b": 1}, p)
    with pytest.raises(TokenizerError, match="single-byte tokens are missing"):
        load_ranks(p)
    p.write_bytes(b"")
    with pytest.raises(TokenizerError, match="empty"):
        load_ranks(p)
    with pytest.raises(TokenizerError, match="not found"):
        load_ranks(tmp_path / "nope.tiktoken")


def test_save_ranks_round_trip(gpt2, tmp_path):
    p = save_ranks(gpt2.ranks, tmp_path / "copy.tiktoken")
    assert load_ranks(p) == gpt2.ranks


def test_ranks_from_a_tiny_bpe_pair(tmp_path):
    """save_gpt2_pair/load_gpt2_pair on a hand-made vocabulary with known merges."""
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({b"ab": 256, b"abc": 257, b"cc": 258, b"abcc": 259})
    save_gpt2_pair(ranks, tmp_path)
    assert (tmp_path / "vocab.bpe").read_text().splitlines()[1:] == ["a b", "ab c", "c c", "abc c"]  # abcc = abc + c: abc ranks below cc
    assert load_gpt2_pair(tmp_path) == ranks
    tok = TiktokenTokenizer(ranks)
    assert tok.eos_id == 260 and tok.encode("abcc") == [259]
    assert load_tokenizer(tmp_path).encode("abccab") == tok.encode("abccab") == [259, 256]


def test_gpt2_spec_from_env(gpt2_ranks_path, monkeypatch):
    monkeypatch.setenv("GPTLAB_GPT2_TIKTOKEN", str(gpt2_ranks_path))
    tok = load_tokenizer("gpt2")
    assert isinstance(tok, TiktokenTokenizer) and tok.spec == "gpt2"
    assert tok.encode("Hello world") == [15496, 995]
    monkeypatch.setenv("GPTLAB_GPT2_TIKTOKEN", str(gpt2_ranks_path.parent / "missing.tiktoken"))
    with pytest.raises(TokenizerError, match="GPTLAB_GPT2_TIKTOKEN"):
        load_tokenizer("gpt2")


def test_load_tiktoken_path(gpt2_ranks_path):
    tok = load_tokenizer(gpt2_ranks_path)
    assert tok.spec == "gpt2" and tok.encode("Hello world") == [15496, 995]


@pytest.mark.parametrize("spec", ["gpt3", "bpe:32000", "nonexistent/dir", "vocab.txt"])
def test_unknown_spec(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TokenizerError, match="unknown tokenizer spec .*expected gpt2, char, a directory or a .tiktoken file"):
        load_tokenizer(spec)


def test_directory_without_tokenizer(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(TokenizerError, match="no tokenizer_config.json"):
        load_tokenizer(tmp_path)


def test_saved_config_names_missing_file(small_bpe, tmp_path):
    d = small_bpe.save(tmp_path / "t")
    (d / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="tokenizer.json.*missing"):
        load_tokenizer(d)


# --------------------------------------------------------------------------- train_tokenizer_files


def test_train_tokenizer_files(tmp_path, shakespeare_files):
    out = tmp_path / "out"
    tok = train_tokenizer_files(shakespeare_files[:2], 800, out)
    assert tok.vocab_size == 800
    again = load_tokenizer(out)
    assert again.special_tokens == {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    s = f"Enter {ASSISTANT} and {EOS}"
    assert again.encode(s, allow_special=True) == tok.encode(s, allow_special=True)


@pytest.mark.parametrize(
    "content,match",
    [
        (b"", "empty"),
        (b"  \n\n\t", "empty"),
        (b"abc\x00def", "binary"),
        (b"caf\xe9 au lait", "not UTF-8"),
    ],
)
def test_train_tokenizer_files_bad_input(tmp_path, content, match):
    good = tmp_path / "good.txt"
    good.write_text("some text\n")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    with pytest.raises(TokenizerError, match=f"bad.txt: .*{match}"):
        train_tokenizer_files([good, bad], 300, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_train_tokenizer_files_missing_or_directory(tmp_path):
    with pytest.raises(TokenizerError, match="missing.txt: input file not found"):
        train_tokenizer_files([tmp_path / "missing.txt"], 300, tmp_path / "out")
    with pytest.raises(TokenizerError, match="is a directory"):
        train_tokenizer_files([tmp_path], 300, tmp_path / "out")
    with pytest.raises(TokenizerError, match="no input files"):
        train_tokenizer_files([], 300, tmp_path / "out")
