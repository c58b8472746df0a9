"""GPT-1's tokenizer: lower-cased BPE with `</w>` word ends (vocab.json + merges.txt), ids identical to
transformers' OpenAIGPTTokenizer (its BasicTokenizer path: no ftfy, no spaCy), and an imported OpenAI-GPT
directory that generates.

The vocabulary is learned here, in that format, from a small text; nothing is downloaded.

    .venv/bin/pytest -q tests/test_gpt1_tokenizer.py
"""

from __future__ import annotations

import collections
import json
import unicodedata
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gptlab.cli import main
from gptlab.hf import import_hf
from gptlab.runs import load_run
from gptlab.tokenizer import EOS, load_tokenizer

transformers = pytest.importorskip("transformers")

CORPUS = ("The quick brown fox jumps over the lazy dog. Où est la bibliothèque? I can't, won't -- and didn't!\n"
          "Numbers: 3.14, 42 and 1,000,000; e-mail me@example.com (maybe). Naïve café, résumé, São Paulo.\n"
          "中文字符 and 日本語 mixed in; tabs\tand  double  spaces. THE END... \"quoted\" text's last word.\n") * 3
VARIED = ("Hello, World! The LAZY dog's café -- naïve résumé at 3.14pm; 中文 text\twith tabs,\n"
          "newlines\r\n and ZZZ unseen-words like qwxz & ∑ symbols, ſ, ﬁ ligature, Ångström, ÉCOLE.")


def words(text: str) -> list[str]:
    """Pieces as BERT's BasicTokenizer gives them (lower-cased, accents off, punctuation and CJK alone)."""
    text = "".join(c for c in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(c) != "Mn")
    out, word = [], ""
    for c in text:
        if c.isspace() or unicodedata.category(c).startswith("P") or 0x4E00 <= ord(c) <= 0x9FFF or \
                (c in "$+<=>^`|~" or unicodedata.category(c).startswith("S")):
            out += [word] if word else []
            word = ""
            if not c.isspace():
                out.append(c)
        else:
            word += c
    return out + ([word] if word else [])


def learn_gpt1_vocab(text: str, merges: int, out: Path) -> Path:
    """A GPT-1 style vocabulary: characters, the same with ``</w>``, and ``merges`` most frequent pair merges."""
    counts = collections.Counter(words(text))
    split = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in counts}
    symbols = {s for w in split.values() for s in w} | {c for w in counts for c in w}
    learned: list[tuple[str, str]] = []
    for _ in range(merges):
        pairs: collections.Counter = collections.Counter()
        for w, parts in split.items():
            for a, b in zip(parts, parts[1:]):
                pairs[a, b] += counts[w]
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        learned.append((a, b))
        symbols.add(a + b)
        for w, parts in split.items():
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == (a, b):
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            split[w] = tuple(merged)
    vocab = {"<unk>": 0, **{s: i + 1 for i, s in enumerate(sorted(symbols))}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in learned), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory) -> Path:
    return learn_gpt1_vocab(CORPUS, 150, tmp_path_factory.mktemp("gpt1") / "tok")


@pytest.fixture(scope="module")
def pair(vocab_dir):
    theirs = transformers.OpenAIGPTTokenizer.from_pretrained(str(vocab_dir))
    return load_tokenizer(vocab_dir), theirs


def test_ids_equal_transformers_on_a_varied_text(pair):
    ours, theirs = pair
    expected = theirs(VARIED, add_special_tokens=False)["input_ids"]
    assert ours.encode(VARIED) == expected
    assert len(set(expected)) > 30 and 0 in expected  # many pieces, and <unk> for the characters it never saw
    assert ours.encode(CORPUS) == theirs(CORPUS, add_special_tokens=False)["input_ids"]
    assert ours.decode(ours.encode("The lazy dog's café.")).strip() == "the lazy dog ' s cafe ."
    assert ours.special_tokens == {EOS: ours.vocab_size - 1}  # GPT-1 had none; gptlab adds end-of-text after it


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("aeiouthnrsdlcwfgybpmkvxzAEIOUTHNRS éèàüïç.,;:'!?-()\"$&\n\t中文日本0123")),
               max_size=60))
def test_ids_equal_transformers_on_any_text(pair, text):
    ours, theirs = pair
    assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]


def test_saved_and_reloaded_tokenizer_keeps_the_ids(pair, tmp_path):
    ours, _ = pair
    ours.save(tmp_path / "saved")
    assert load_tokenizer(tmp_path / "saved").encode(VARIED) == ours.encode(VARIED)


def test_imported_openai_gpt_generates(vocab_dir, tmp_path, capsys):
    n_vocab = len(json.loads((vocab_dir / "vocab.json").read_text(encoding="utf-8")))
    torch.manual_seed(0)
    hf = transformers.OpenAIGPTLMHeadModel(transformers.OpenAIGPTConfig(
        n_layer=2, n_embd=32, n_head=2, n_positions=32, vocab_size=n_vocab, afn="gelu")).eval()
    hf.save_pretrained(tmp_path / "hf")
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "hf" / name).write_bytes((vocab_dir / name).read_bytes())
    model, tok = import_hf(tmp_path / "hf")
    assert tok is not None and model.config.vocab_size == n_vocab + 1  # one (zero) row for <|endoftext|>
    idx = torch.tensor([tok.encode("the quick brown fox")])
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[..., :n_vocab], hf(idx).logits, atol=1e-4, rtol=1e-4)
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    assert "tokenizer: gpt1-bpe" in capsys.readouterr().out
    assert main(["generate", "--model", str(tmp_path / "run"), "--prompt", "The quick", "--max-new-tokens", "5",
                 "--seed", "0"]) == 0
    assert capsys.readouterr().out.strip()
    assert load_run(tmp_path / "run")[1].encode(VARIED) == tok.encode(VARIED)
    # and back: transformers reads the exported tokenizer (gptlab's <|endoftext|> included) with the same ids
    assert main(["convert", "--to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "export")]) == 0
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    assert type(theirs).__name__ == "OpenAIGPTTokenizer"
    assert theirs(VARIED + EOS, add_special_tokens=False)["input_ids"] == tok.encode(VARIED + EOS, allow_special=True)
    exported = transformers.OpenAIGPTLMHeadModel.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(idx).logits, model(idx), atol=1e-4, rtol=1e-4)
