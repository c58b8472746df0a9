"""The Chinese poetry corpus (Debian's fortunes-zh), the classical-form check, and `gptlab demo --corpus
zh-poems` end to end on a small budget."""

from __future__ import annotations

import json

from gptlab.cli import main
from gptlab.runs import load_run
from gptlab.tokenizer import CharTokenizer
from gptlab.zh_poems import form_shares, load_poems, poem_form, read_fortunes


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


def test_zh_poems_demo_end_to_end(tmp_path, fortunes_zh, capsys):
    out = tmp_path / "poems"
    assert main(["demo", "--corpus", "zh-poems", "--minutes", "0.3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Tang and Song poems" in printed and "form check (16 poems): classical lines" in printed
    assert "the corpus: 93% and 79%" in printed
    model, tok, _ = load_run(out)
    assert isinstance(tok, CharTokenizer) and tok.unk_id is not None
    records = [json.loads(line) for line in (out / "corpus" / "zh-poems.jsonl").read_text(encoding="utf-8").splitlines()]
    assert records[0]["text"].startswith("《感遇・其一》\n兰叶春葳蕤")
    meta = json.loads((out / "data" / "meta.json").read_text())
    assert meta["splits"]["val"]["documents"] > 5  # whole poems held out
