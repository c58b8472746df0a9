"""The Chinese poetry corpora (npm's chinese-poetry, Debian's fortunes-zh), the classical-form check, and
`gptlab demo --corpus zh-poems|zh-tang300` end to end on a small budget."""

from __future__ import annotations

import json

import pytest

from gptlab.cli import main
from gptlab.demo import ZH_CORPORA
from gptlab.errors import DataError
from gptlab.runs import load_run
from gptlab.tokenizer import CharTokenizer
from gptlab.zh_poems import form_shares, load_poems, load_tang_poems, poem_form, read_fortunes


def test_the_tang_300_parse_into_titled_poems(fortunes_zh):
    assert all("\x1b" not in e for e in read_fortunes(fortunes_zh / "tang300"))  # colour codes gone
    poems = load_poems(fortunes_zh)
    tang = poems[:313]
    assert len(read_fortunes(fortunes_zh / "tang300")) == 313 and len(poems) > 400
    assert tang[0].title == "感遇・其一" and tang[0].author == "张九龄"
    assert tang[0].lines[0] == "兰叶春葳蕤，桂华秋皎洁。" and len(tang[0].lines) == 4
    shares = form_shares(p.text for p in tang)
    assert shares["poems"] == 313 and 0.75 < shares["classical_form"] < shares["classical_lines"] < 0.95


def test_classical_form():
    jueju = "《静夜思》\n床前明月光，疑是地上霜。\n举头望明月，低头思故乡。\n"
    assert poem_form(jueju).verse_lengths == (5, 5, 5, 5) and poem_form(jueju).classical
    lvshi7 = "《x》\n" + "一二三四五六七，一二三四五六七。\n" * 4
    assert poem_form(lvshi7).classical
    six = "《x》\n" + "一二三四五，一二三四五。\n" * 3
    assert poem_form(six).classical_lines and not poem_form(six).classical
    mixed = "《x》\n一二三四五，一二三四五六七。\n一二三四五，一二三四五。\n"
    assert not poem_form(mixed).classical_lines
    assert form_shares([jueju, six, mixed]) == {"poems": 3, "classical_lines": 2 / 3, "classical_form": 1 / 3}


def test_the_complete_tang_poems_parse_clean(tang_poems):
    poems = load_tang_poems(tang_poems)
    assert len(poems) == 54024  # of 57,607: those with lost characters or stray marks left out
    assert poems[0].title == "帝京篇十首 一" and poems[0].author == "太宗皇帝"
    assert poems[0].lines[0] == "秦川雄帝宅，函谷壯皇居。"
    assert all("□" not in p.text and "（" not in p.text for p in poems)
    shares = form_shares(p.text for p in poems)
    assert round(shares["classical_lines"], 2) == 0.90 and round(shares["classical_form"], 2) == 0.70


def test_tang_records_lose_their_notes_and_damaged_poems(tmp_path):
    records = [
        {"title": "春曉（一作春眠）", "author": "孟浩然", "paragraphs": ["春眠不覺曉，處處聞啼鳥。", "夜來風雨聲，花落知多少（一作幾多）。"]},
        {"title": "殘", "author": "x", "paragraphs": ["□□不覺曉，處處聞啼鳥。"]},  # lost characters
        {"title": "空", "author": "x", "paragraphs": []},
        ["not", "a", "record"],
    ]
    (tmp_path / "poet.tang.0.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "poet.tang.1000.json").write_text(json.dumps(records[:1], ensure_ascii=False), encoding="utf-8")
    poems = load_tang_poems(tmp_path)
    assert len(poems) == 2 and poems[0].title == "春曉"
    assert poems[0].text == "《春曉》\n春眠不覺曉，處處聞啼鳥。\n夜來風雨聲，花落知多少。\n"
    assert poem_form(poems[0].text).classical
    (tmp_path / "poet.tang.1000.json").write_text("[{", encoding="utf-8")
    with pytest.raises(DataError, match=r"poet\.tang\.1000\.json: not chinese-poetry's JSON"):
        load_tang_poems(tmp_path)
    with pytest.raises(DataError, match="no poems found"):
        load_tang_poems(tmp_path / "missing")


def _demo(out, corpus, capsys) -> str:  # the demo's code path is the same for every corpus name
    assert main(["demo", "--corpus", corpus, "--minutes", "0.2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "form check (16 poems): classical lines" in printed and "copied verbatim" in printed
    model, tok, _ = load_run(out)
    assert isinstance(tok, CharTokenizer) and tok.unk_id is not None
    meta = json.loads((out / "data" / "meta.json").read_text())
    assert meta["splits"]["val"]["documents"] > 5  # whole poems held out
    return printed


def _first_record(out, corpus) -> str:
    with open(out / "corpus" / f"{corpus}.jsonl", encoding="utf-8") as f:
        return json.loads(f.readline())["text"]


def test_zh_poems_demo_end_to_end(tmp_path, tang_poems, capsys):
    printed = _demo(tmp_path / "tang", "zh-poems", capsys)
    assert "54,024 poems of the Complete Tang Poems" in printed and "the corpus: 90% and 70%" in printed
    assert _first_record(tmp_path / "tang", "zh-poems").startswith("《帝京篇十首 一》\n秦川雄帝宅")
    assert load_run(tmp_path / "tang")[1].vocab_size == 6000


def test_zh_tang300_names_the_small_corpus(fortunes_zh):
    read, what = ZH_CORPORA["zh-tang300"]
    assert read() == load_poems(fortunes_zh) and "fortunes-zh" in what
    assert ZH_CORPORA["zh-poems"][0] is load_tang_poems
