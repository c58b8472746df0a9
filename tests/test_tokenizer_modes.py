"""The Chinese tokenizer modes (char with <|unk|>, jieba words, byte-level BPE, BERT WordPiece): round trips
over CJK text, the unknown-character path through prepare, jieba's stability, and WordPiece against
transformers' BertTokenizer on the same vocab.txt."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptlab.cli import main
from gptlab.data import TokenData, prepare
from gptlab.errors import TokenizerError
from gptlab.tokenizer import (
    EOS,
    UNK,
    CharTokenizer,
    WordPieceTokenizer,
    WordTokenizer,
    load_tokenizer,
    segment,
    train_tokenizer,
)

HYP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

POEMS = (
    "《静夜思》\n床前明月光，疑是地上霜。\n举头望明月，低头思故乡。\n\n"
    "《登鹳雀楼》\n白日依山尽，黄河入海流。\n欲穷千里目，更上一层楼。\n\n"
    "《春晓》\n春眠不觉晓，处处闻啼鸟。\n夜来风雨声，花落知多少。\n\n"
    "《相思》\n红豆生南国，春来发几枝。\n愿君多采撷，此物最相思。\n\n"
    "我们在北京大学学习中文。今天天气很好，我们去公园散步。Hello world, 你好世界！\n"
)
CORPUS = POEMS * 3


@pytest.fixture(scope="module")
def toks() -> dict[str, object]:
    return {mode: train_tokenizer(mode, iter([CORPUS]), None if mode in ("char", "word") else 300)
            for mode in ("char", "word", "bpe", "wordpiece")}


ALPHABET = sorted(set(CORPUS) - {" "})
SEEN_TEXT = st.text(alphabet=ALPHABET, max_size=80)
CJK_SEEN = st.text(alphabet=[c for c in ALPHABET if "\u4e00" <= c <= "\u9fff" or c in "，。！《》\n"], max_size=80)
ANY_CJK = st.text(st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), max_size=40)


@HYP
@given(data=st.data())
def test_every_mode_round_trips_cjk_text(toks, data):
    """char and word: any text of seen characters; bpe: any text at all; wordpiece: Chinese text (BERT
    keeps no whitespace but newlines, so spaced Latin text is rebuilt by rule, not exactly)."""
    for mode, strategy in (("char", SEEN_TEXT), ("word", SEEN_TEXT), ("bpe", st.one_of(ANY_CJK, st.text())),
                           ("wordpiece", CJK_SEEN)):
        tok = toks[mode]
        text = data.draw(strategy, label=mode)
        ids = tok.encode(text)
        assert tok.decode(ids) == text, mode
        assert tok.unk_id not in ids or mode == "bpe"
        if mode != "wordpiece":  # token bytes are what streaming decode joins
            assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")


@HYP
@given(text=ANY_CJK)
def test_unseen_characters_become_unk_and_nothing_is_dropped(toks, text):
    for mode in ("char", "word", "wordpiece"):
        tok = toks[mode]
        ids = tok.encode(text)
        pieces = tok.decode_text(ids)
        unk = "[UNK]" if mode == "wordpiece" else UNK
        # each character is either itself or one unknown token in the readable text
        assert len(ids) == len(text) or mode == "word"
        assert pieces.replace(unk, "") == "".join(c for c in text if c in pieces)
        assert ids.count(tok.unk_id) == sum(c not in ALPHABET for c in text) or mode == "wordpiece"


def test_word_mode_uses_whole_words_and_spells_the_rest(toks):
    word = toks["word"]
    assert isinstance(word, WordTokenizer)
    assert "明月" in word._entries or "北京大学" in word._entries or "学习" in word._entries
    text = "我们在北京大学学习中文。"
    ids = word.encode(text)
    assert len(ids) < len(text)  # whole words, not characters
    assert word.decode(ids) == text and " " not in word.decode(ids)
    spelled = word.encode("学中")  # a word the vocabulary lacks is spelled by its characters
    assert word.decode(spelled) == "学中"


def test_jieba_segmentation_is_stable_across_runs():
    code = "import json,sys; from gptlab.tokenizer import segment; print(json.dumps(segment(sys.argv[1])))"
    runs = [subprocess.run([sys.executable, "-c", code, POEMS], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")]
    assert json.loads(runs[0]) == json.loads(runs[1]) == segment(POEMS)
    assert "".join(segment(POEMS)) == POEMS


def test_wordpiece_matches_transformers_bert_tokenizer(tmp_path, toks):
    """GPT2-Chinese's vocab.txt loading: ids equal BertTokenizer's (lower-cased, as bert-base-chinese)."""
    transformers = pytest.importorskip("transformers")
    toks["wordpiece"].save(tmp_path / "tok")
    vocab = tmp_path / "tok" / "vocab.txt"
    ours = load_tokenizer(vocab)
    assert isinstance(ours, WordPieceTokenizer) and ours.lowercase
    ref = transformers.BertTokenizer(str(vocab), do_lower_case=True)
    for text in ["床前明月光，疑是地上霜。", "hello world, 你好世界！", "HELLO 北京大学 unknownword 🙂", CORPUS[:200].replace("\n", "")]:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False), text
    assert ours.encode("床前\n明月") == ours.encode("床前") + [ours._sep] + ours.encode("明月")
    assert ours.decode(ours.encode("床前\n明月光")) == "床前\n明月光"
    assert ours.eos_id == len(vocab.read_text(encoding="utf-8").splitlines())  # gptlab's specials after the vocab


def test_wordpiece_vocab_errors_name_the_file(tmp_path):
    bad = tmp_path / "vocab.txt"
    bad.write_text("[PAD]\n[UNK]\n床\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"vocab.txt: has no \[SEP\]"):
        load_tokenizer(bad)
    bad.write_text("[UNK]\n[SEP]\n床\n床\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match="listed twice"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("mode", ["char", "word", "bpe", "wordpiece"])
def test_tokenizer_train_cli_saves_and_loads_every_mode(tmp_path, mode, capsys):
    src = tmp_path / "poems.txt"
    src.write_text(CORPUS, encoding="utf-8")
    assert main(["tokenizer", "train", "--mode", mode, "--input", str(src), "--vocab-size", "300",
                 "--out", str(tmp_path / "tok")]) == 0
    assert f"trained {mode} tokenizer" in capsys.readouterr().out
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.kind == mode and tok.vocab_size <= 300 + 10
    assert tok.decode(tok.encode(POEMS[:60])) == POEMS[:60]
    assert tok.encode(EOS, allow_special=True) == [tok.eos_id]


def test_bpe_and_wordpiece_need_a_vocab_size(tmp_path, capsys):
    src = tmp_path / "poems.txt"
    src.write_text(CORPUS, encoding="utf-8")
    assert main(["tokenizer", "train", "--mode", "wordpiece", "--input", str(src), "--out", str(tmp_path / "t")]) == 2
    assert "--vocab-size" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_prepare_counts_and_reports_unknown_characters(tmp_path, capsys):
    """A bounded char vocabulary: the rarest characters become <|unk|>, counted per split and printed."""
    src = tmp_path / "poems.txt"
    src.write_text(CORPUS, encoding="utf-8")
    assert main(["prepare", "--input", str(src), "--tokenizer", "char", "--vocab-size", "40",
                 "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    data = TokenData(tmp_path / "d")
    tok = data.tokenizer()
    assert isinstance(tok, CharTokenizer) and tok.vocab_size == 40 and data.meta["tokenizer"] == "char:40"
    splits = data.meta["splits"]
    ids = [int(i) for i in data.split("train")[:]] + [int(i) for i in data.split("val")[:]]
    assert splits["train"]["unk_tokens"] + splits["val"]["unk_tokens"] == ids.count(tok.unk_id) > 0
    assert splits["train"]["characters"] + splits["val"]["characters"] == len(CORPUS)
    assert f"train {splits['train']['unk_tokens']:,} of {splits['train']['characters']:,} characters" in out
    # an unbounded char vocabulary spells the whole corpus, val included: no <|unk|>
    meta = prepare([src], "word", tmp_path / "w", progress=False)
    assert meta["splits"]["val"]["characters"] > 0 and meta["tokenizer"].startswith("word:")
    meta = prepare([src], "char", tmp_path / "c", progress=False)
    assert meta["splits"]["train"]["unk_tokens"] == meta["splits"]["val"]["unk_tokens"] == 0


def test_sft_rm_and_dpo_count_the_characters_their_vocabulary_lacks(tmp_path, capsys):
    """Chat rows with characters a char vocabulary never saw train through <|unk|>: counted, said once and
    recorded in the run config, as prepare counts them."""
    import torch

    from gptlab.config import GPTConfig
    from gptlab.model import GPT
    from gptlab.runs import save_model
    from gptlab.stages.dpo import run_dpo
    from gptlab.stages.reward import run_rm
    from gptlab.stages.sft import run_sft
    from gptlab.train.config import TrainConfig

    tok = CharTokenizer.train(["床前明月光疑是地上霜举头望低思故乡"])
    torch.manual_seed(0)
    base = save_model(tmp_path / "base", GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16,
                                                        block_size=48)), tok)
    rows = [{"prompt": "床前明月光", "response": "疑是地上霜"}, {"prompt": "举头望明月", "response": "低头思故乡"},
            {"prompt": "春眠不觉晓", "response": "处处闻啼鸟"}]  # the last row: ten characters unseen
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                        encoding="utf-8")
    cfg = TrainConfig(max_steps=2, batch_size=2, eval_every=0, checkpoint_every=0, sample_every=0, device="cpu")
    run_sft(str(base), tmp_path / "sft.jsonl", tmp_path / "sft", cfg, sft={"val_fraction": 0.0}, progress=True)
    assert "sft.jsonl: 10 of 42 tokens stand for characters the vocabulary lacks" in capsys.readouterr().out
    assert json.loads((tmp_path / "sft" / "config.json").read_text())["data"]["unk_tokens"] == 10
    ranked = {"prompt": "床前明月光", "chosen": "疑是地上霜", "rejected": "处处闻啼鸟"}  # 5 unseen
    (tmp_path / "rank.jsonl").write_text(json.dumps(ranked, ensure_ascii=False) + "\n", encoding="utf-8")
    run_rm(str(tmp_path / "sft"), tmp_path / "rank.jsonl", tmp_path / "rm", cfg, {"val_fraction": 0.0},
           progress=False)
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["data"]["unk_tokens"] == 5
    # DPO: three responses make three pairs; the unseen response counts once, not once per pair it stands in
    ranked3 = {"prompt": "床前明月光", "responses": ["疑是地上霜", "处处闻啼鸟", "低头思故乡"], "ranking": [0, 2, 1]}
    (tmp_path / "rank3.jsonl").write_text(json.dumps(ranked3, ensure_ascii=False) + "\n", encoding="utf-8")
    run_dpo(str(tmp_path / "sft"), tmp_path / "rank3.jsonl", tmp_path / "dpo", cfg, {"val_fraction": 0.0},
            progress=False)
    assert json.loads((tmp_path / "dpo" / "config.json").read_text())["data"]["unk_tokens"] == 5
