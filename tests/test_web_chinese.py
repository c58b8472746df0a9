"""Chinese on the web pages: a byte-level BPE splits characters across tokens, and the explorer shows each
such token as the character it belongs to (never U+FFFD); the chat stream never sends half a character.
The browser test needs Chromium (as tests/test_web.py) and a CJK font (fonts-noto-cjk, installed by
.ci/run): it checks that two different characters draw differently (a missing font draws both as the same
box) and leaves its screenshot at docs/img/web-explore-zh.png when GPTLAB_WEB_SCREENSHOTS is set."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("httpx")

from gptlab import GPT, GPTConfig  # noqa: E402
from gptlab.engine import _Row  # noqa: E402
from gptlab.serve import create_app  # noqa: E402
from gptlab.tokenizer import readable_tokens, train_bpe  # noqa: E402
from serving import RunningApp  # noqa: E402
from test_web import browser, page  # noqa: E402,F401  (the Chromium fixtures)

ROOT = Path(__file__).resolve().parents[1]
POEM = "床前明月光，疑是地上霜。举头望明月，低头思故乡。\n白日依山尽，黄河入海流。欲穷千里目，更上一层楼。\n"
TEXT = "床前明月光，疑是地上霜。举头"


@pytest.fixture(scope="module")
def zh():
    tok = train_bpe(iter([POEM * 4]), 300)  # few merges: most characters stay split into their bytes
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=tok.vocab_size)).eval()
    app = RunningApp(create_app(model, tok, {}, model_name="zh-bpe"))
    yield {"url": app.url, "tok": tok, "model": model}
    app.stop()


def test_readable_tokens_show_whole_characters(zh):
    tok = zh["tok"]
    ids = tok.encode(TEXT)
    shown = readable_tokens(tok, ids)
    assert len(ids) > len(TEXT)  # characters really are split
    assert all("\ufffd" not in text for text, _ in shown)
    assert any(part for _, part in shown) and not all(part for _, part in shown)
    for i, (text, part) in zip(ids, shown):
        assert text and text in TEXT  # each shows whole characters of the text, in order
        assert part or text == tok.token_bytes(i).decode("utf-8")
    assert set("".join(text for text, _ in shown)) == set(TEXT)
    assert readable_tokens(tok, ids[:1]) == [("\\" + "\\".join(f"x{b:02x}" for b in tok.token_bytes(ids[0])), True)]


def test_chat_stream_never_sends_half_a_character(zh):
    """The text the engine and the server's batcher stream, fed Chinese token by token: each piece is whole
    characters, though most tokens end inside one."""
    tok = zh["tok"]
    row = _Row(prompt_len=0)
    pieces = []
    for i in tok.encode(TEXT):
        row.accept(i, 0.0, None, set(), [], tok)
        pieces.append(row.fresh_text([]))
    assert "".join(pieces) == TEXT and all("\ufffd" not in p for p in pieces)
    assert sum(not p for p in pieces) > 5  # held back while a character was incomplete


def _cjk_font() -> bool:
    fc = shutil.which("fc-list")
    return bool(fc and subprocess.run([fc, ":lang=zh"], capture_output=True, text=True).stdout.strip())


def test_explorer_shows_a_chinese_session(zh, page):  # noqa: F811
    if not _cjk_font():
        pytest.skip("no CJK font (apt-get install fonts-noto-cjk; .ci/run does): the characters would draw as boxes")
    tok = zh["tok"]
    page.goto(zh["url"] + "/explore")
    page.fill("#text", TEXT)
    page.locator("#top li").nth(9).wait_for()
    ids = tok.encode(TEXT)
    page.wait_for_function("n => document.querySelectorAll('#tokens .tok').length === n", arg=len(ids))
    chips = page.locator("#tokens .tok")
    texts = chips.evaluate_all("els => els.map(e => e.textContent)")
    parts = chips.evaluate_all("els => els.map(e => e.classList.contains('part'))")
    assert list(zip(texts, parts)) == readable_tokens(tok, ids)
    cands = page.locator("#top .cand .t").evaluate_all("els => els.map(e => e.textContent)")
    assert all("\ufffd" not in t for t in texts + cands)
    # two different characters draw differently: a page without a CJK font draws both as the same box
    first, second = (np.asarray(Image.open(io.BytesIO(chips.nth(k).screenshot())).convert("L"), dtype=float)
                     for k in (0, next(k for k, t in enumerate(texts) if len(t) == 1 and t not in (texts[0], "，"))))
    assert first.shape != second.shape or np.abs(first - second).mean() > 5
    if os.environ.get("GPTLAB_WEB_SCREENSHOTS"):
        page.screenshot(path=str(ROOT / "docs/img/web-explore-zh.png"), full_page=True)
