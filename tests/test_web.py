"""The web pages of `gptlab serve` (chat, explorer, 3-D view, labeler) end to end in headless Chromium, and their
endpoints.

The browser tests need Chromium at /usr/bin/chromium and the playwright package (no browser download);
without them they skip with the reason, while the endpoint tests still run. Screenshots for the docs:
``GPTLAB_WEB_SCREENSHOTS=CHAT_RUN[,BASE_RUN] pytest tests/test_web.py -k screenshots`` writes docs/img/web-*.png;
``GPTLAB_VIZ_SCREENSHOTS=RUN,RUN,RUN[,RUN] pytest tests/test_web.py -k visualize_screenshots`` writes
docs/img/visualize-*.png; ``GPTLAB_VIZ_MOE_SCREENSHOT=FILE.png pytest tests/test_web.py -k modern_blocks`` the
modern MoE view (docs/img/visualize-modern-moe.png, quantised to 256 colours).
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import math
import os
import re
import threading
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import torch
from PIL import Image

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from gptlab import GPT, GPTConfig  # noqa: E402
from gptlab.align_data import load_rankings  # noqa: E402
from gptlab.chat import Message, add_chat_tokens, render, stop_ids  # noqa: E402
from gptlab.config import MODERN  # noqa: E402
from gptlab.engine import Engine, SamplingParams  # noqa: E402
from gptlab.serve import create_app  # noqa: E402
from gptlab.serve.web import WebData  # noqa: E402
from gptlab.atomic import append_jsonl  # noqa: E402
from gptlab.tokenizer import CharTokenizer  # noqa: E402
from gptlab.serve.offline import standalone_page  # noqa: E402
from gptlab.visualize import ModelView, ViewConfig  # noqa: E402
from gptlab.stages.vision_chat import chat_tokenizer  # noqa: E402
from gptlab.vision import VisionConfig, VisionEncoder, read_image, render_images  # noqa: E402
from serving import RunningApp  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-web"
BLOCK = 64
LETTERS = "abcdefghijklmnopqrstuvwxyz .!?"
SCREENSHOT_CHAT = ("Is the king well?", "Good morrow, my lord. What news from the court?")


def _browser_missing() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is not installed (apt-get install chromium): the pages are tested in it"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install -e '.[dev]')"
    return None


def _model(tok: CharTokenizer, seed: int, **sizes) -> GPT:
    """A random model that writes text: special tokens (left out of replies) never win a greedy step."""
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_head=2, n_embd=32, block_size=BLOCK, vocab_size=tok.vocab_size) | sizes
    model = GPT(GPTConfig(**cfg)).eval()
    with torch.no_grad():
        model.lm_head.weight[list(tok.special_tokens.values())] = 0
    return model


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A chat model with a data dir, a base model without one, and a chat model behind an API key."""
    data = tmp_path_factory.mktemp("data")
    tok = CharTokenizer.from_text(LETTERS)
    add_chat_tokens(tok)
    model = _model(tok, 0)
    chat = RunningApp(create_app(model, tok, {"chat_format": "gptlab-chat-v1"}, model_name="tiny", data=WebData(data),
                               max_n=4))
    base_tok = CharTokenizer.from_text(LETTERS)
    base = RunningApp(create_app(_model(base_tok, 1), base_tok, {}, model_name="base"))
    keyed = RunningApp(create_app(model, tok, {"chat_format": "gptlab-chat-v1"}, model_name="tiny", api_key=KEY))
    yield {"url": chat.url, "base_url": base.url, "keyed_url": keyed.url, "data": data, "tok": tok, "model": model,
           "engine": Engine(model, tok)}
    for running in (chat, base, keyed):
        running.stop()


@pytest.fixture(scope="module")
def browser():
    reason = _browser_missing()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    """A fresh browser context (its own localStorage) that fails the test on any script error."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(20_000)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda e: errors.append(str(e)))
    yield tab
    context.close()
    assert not errors, errors


def _greedy_reply(served, text: str, max_tokens: int) -> str:
    ids = render([Message("user", text)], served["tok"], add_generation_prompt=True)[0]
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0, stop_token_ids=stop_ids(served["tok"]))
    return served["engine"].generate_ids([ids], params)[0].text


def _words(text: str) -> str:
    return " ".join(text.split())


def _chat_settings(page, max_tokens: int) -> None:
    page.fill("#temperature", "0")
    page.fill("#max-tokens", str(max_tokens))


# ------------------------------------------------------------------ chat
def test_chat_streams_regenerates_edits_and_keeps_the_conversation(served, page):
    page.goto(served["url"] + "/")
    _chat_settings(page, 20)
    sent = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    page.fill("#input", "hello there")
    page.press("#input", "Enter")
    answer = page.locator(".msg.assistant").last
    answer.locator(".regenerate").wait_for()
    reference = _greedy_reply(served, "hello there", 20)
    assert reference.strip(), "the fixture model must say something greedily"
    assert _words(answer.locator(".body").inner_text()) == _words(reference)
    assert re.fullmatch(r"\d+ tokens · [\d.]+ tokens/s · [\d.]+ s", answer.locator(".stats").inner_text())
    assert sent[0]["stream"] is True and sent[0]["messages"] == [{"role": "user", "content": "hello there"}]
    assert sent[0]["temperature"] == 0 and sent[0]["max_tokens"] == 20

    answer.locator(".regenerate").click()
    page.locator(".msg.assistant .regenerate").wait_for()
    assert page.locator(".msg").count() == 2 and len(sent) == 2
    assert _words(page.locator(".msg.assistant .body").inner_text()) == _words(reference)

    page.click(".msg.user .edit")
    page.fill(".msg.user textarea", "good day")
    page.click(".msg.user .resend")
    page.locator(".msg.assistant .regenerate").wait_for()
    assert page.locator(".msg.user .body").inner_text() == "good day" and page.locator(".msg").count() == 2
    assert _words(page.locator(".msg.assistant .body").inner_text()) == _words(_greedy_reply(served, "good day", 20))
    assert sent[-1]["messages"] == [{"role": "user", "content": "good day"}]

    page.reload()  # conversations and settings live in localStorage
    page.locator(".msg.assistant .regenerate").wait_for()
    assert page.locator("#conversations li").all_inner_texts()[0].startswith("hello there")
    assert page.input_value("#max-tokens") == "20"
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    page.click("#conversations .open")
    assert page.locator(".msg.user .body").inner_text() == "good day"


def test_stop_aborts_a_streaming_answer(served, page):
    tok = served["tok"]
    model = _model(tok, 3, n_layer=4, n_embd=128, block_size=1024)
    with torch.no_grad():  # logit 0 for the stop ids (tied embeddings): greedy decoding never ends by itself
        model.wte.weight[stop_ids(tok)] = 0
    slow = RunningApp(create_app(model, tok, {"chat_format": "gptlab-chat-v1"}, model_name="slow"))
    try:
        page.goto(slow.url + "/")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "1000")
        page.fill("#input", "tell me a long story")
        page.press("#input", "Enter")
        page.locator(".msg.assistant.streaming .stats").filter(has_text=re.compile(r"^[1-9]\d* tokens")).wait_for()
        page.click("#stop")
        page.locator(".msg.assistant .note").filter(has_text="stopped").wait_for()
        tokens = int(page.locator(".msg.assistant .stats").inner_text().split()[0])
        assert 0 < tokens < 1000 and page.locator("#send").is_visible()
    finally:
        slow.stop()


def test_thumbs_up_appends_one_feedback_line(served, page):
    page.goto(served["url"] + "/")
    _chat_settings(page, 12)
    page.fill("#system", "be kind")
    page.fill("#input", "hi")
    page.press("#input", "Enter")
    page.click(".msg.assistant .thumb-up")
    page.locator(".msg.assistant .feedback").wait_for()
    assert page.get_attribute(".thumb-up", "aria-pressed") == "true"
    rows = [json.loads(line) for line in (served["data"] / "feedback.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    row = rows[0]
    assert row["rating"] == "up" and row["model"] == "tiny" and re.match(r"\d{4}-\d\d-\d\dT", row["time"])
    assert row["messages"] == [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}]
    assert _words(row["answer"]) == _words(page.locator(".msg.assistant .body").inner_text()) != ""


def test_chat_image_button_sends_the_image_and_shows_its_thumbnail(served, page, tmp_path):
    """An image-input model's page: the Image button attaches a PNG, the message carries it as an image_url
    part, the conversation shows its thumbnail, and the reply is the engine's own for that image."""
    tok = chat_tokenizer([str(i) for i in range(10)])
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=BLOCK, vocab_size=tok.vocab_size)).eval()
    vision = VisionEncoder(VisionConfig(image_size=8, channels=1, patch=2, width=16), 32).eval()
    with torch.no_grad():  # replies of letters: the special tokens never win a greedy step
        model.lm_head.weight[list(tok.special_tokens.values())] = 0
    png = tmp_path / "seven.png"
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[4:8, 6:26] = 255
    pixels[8:28, 18:22] = 255
    Image.fromarray(pixels).save(png)
    running = RunningApp(create_app(model, tok, {"chat_format": "gptlab-chat-v1"}, model_name="vchat", vision=vision))
    try:
        page.goto(running.url + "/")
        _chat_settings(page, 12)
        sent = []
        page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
        page.locator("#image-button").wait_for()
        page.set_input_files("#image-file", str(png))
        page.locator("#attachment-thumb").wait_for()
        page.fill("#input", "What digit is this?")
        page.press("#input", "Enter")
        page.locator(".msg.assistant .regenerate").wait_for()
        parts = sent[0]["messages"][0]["content"]
        assert parts[0] == {"type": "text", "text": "What digit is this?"} and parts[1]["type"] == "image_url"
        assert parts[1]["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
        assert page.locator(".msg.user img.thumb").count() == 1 and page.locator("#attachment").is_hidden()
        prompt, _ = render_images([Message("user", "What digit is this?")], [1], tok, 16, add_generation_prompt=True)
        params = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=stop_ids(tok))
        engine = Engine(model, tok, vision=vision)
        reply = engine.generate_ids([prompt], params, images=[read_image(png, vision.cfg)[None]])[0].text
        assert _words(page.locator(".msg.assistant .body").inner_text()) == _words(reply)
    finally:
        running.stop()
    page.goto(served["url"] + "/")  # a text model's page has no image button
    page.locator("#send").wait_for()
    assert page.locator("#image-button").is_hidden()


def test_chat_page_of_a_base_model_points_to_the_explorer(served, page):
    page.goto(served["base_url"] + "/")
    notice = page.locator("#notice")
    notice.filter(has_text="base model").wait_for()
    assert notice.locator("a[href='/explore']").count() == 1
    assert page.locator("#input").is_disabled() and page.locator("#send").is_disabled()


def test_markdown_is_escaped_before_it_is_formatted(served, page):
    page.goto(served["url"] + "/")

    def md(source: str) -> str:
        return page.evaluate("s => renderMarkdown(s)", source)

    assert md("<img src=x onerror=alert(1)> & co") == "<p>&lt;img src=x onerror=alert(1)&gt; &amp; co</p>"
    assert md("[x](javascript:alert(1))") == "<p>[x](javascript:alert(1))</p>"
    assert md("[docs](https://example.org/?a=1&b=2)") == (
        '<p><a href="https://example.org/?a=1&amp;b=2" target="_blank" rel="noopener noreferrer">docs</a></p>')
    assert md("**bold**, *it* and `a**b**`") == "<p><strong>bold</strong>, <em>it</em> and <code>a**b**</code></p>"
    assert md("```py\nx = '<b>'\n```\n- one\n- two\n\n1. a") == (
        '<pre><code class="language-py">x = &#39;&lt;b&gt;&#39;</code></pre>\n<ul><li>one</li><li>two</li></ul>\n'
        "<ol><li>a</li></ol>")
    assert md("```\nstill streaming <i>") == "<pre><code>still streaming &lt;i&gt;</code></pre>"


# ------------------------------------------------------------------ explorer
def _next_probs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(model(torch.tensor([ids]))[0, -1], -1)


def test_explorer_appends_a_clicked_token_and_shows_the_attention(served, page):
    tok, model = served["tok"], served["model"]
    page.goto(served["url"] + "/explore")
    page.fill("#text", "hello")
    page.locator("#top li").nth(9).wait_for()
    first = page.locator("#top .cand").first
    chosen = int(first.get_attribute("data-id"))
    probs = _next_probs(model, tok.encode("hello"))
    assert chosen == int(probs.argmax())
    assert float(first.locator(".p").inner_text().rstrip("%")) == pytest.approx(100 * probs[chosen].item(), abs=0.051)
    first.click()
    grown = "hello" + tok.decode([chosen])
    page.wait_for_function("t => document.querySelector('#text').value === t", arg=grown)
    page.wait_for_function("() => document.querySelectorAll('#tokens .tok').length === 6")
    ids = tok.encode("hello") + [chosen]  # the tokens and the new top ten are drawn together
    assert page.locator("#top .cand").first.get_attribute("data-id") == str(int(_next_probs(model, ids).argmax()))

    page.check("#heat")
    page.locator("#grid .cell").nth(3).wait_for()
    assert page.locator("#grid .cell").count() == 2 * 2
    page.click("#grid .cell[data-layer='1'][data-head='0']")
    assert page.get_attribute("#grid .cell[data-layer='1'][data-head='0']", "aria-pressed") == "true"
    shown = [float(t.split()[1]) for t in page.locator("#tokens .tok").evaluate_all("els => els.map(e => e.title)")]
    expected = model.attention_weights(torch.tensor([ids]), queries=1)[0, 1, 0, 0].tolist()
    assert shown == pytest.approx(expected, abs=1e-3)
    colours = page.locator("#tokens .tok").evaluate_all("els => els.map(e => e.style.backgroundColor)")
    assert all(c.startswith("rgba") for c in colours)
    page.uncheck("#heat")
    assert page.locator("#heat-panel").is_hidden()


# ------------------------------------------------------------------ 3-D view
VIZ_TEXT = "the king is dead. long live the king!"  # 37 tokens: the view draws the last 32
VIZ_MODELS = {  # a GPT-2-style block (pre-LN, dense), GPT-1's (post-LN) and GPT-3's (dense, then banded)
    "gpt2": {}, "gpt1": {"norm_position": "post"}, "gpt3": {"attention_pattern": "DL", "attn_window": 4},
}


@pytest.fixture(scope="module")
def viz():
    tok = CharTokenizer.from_text(LETTERS)
    apps = {}
    for kind, fields in VIZ_MODELS.items():
        model = _model(tok, 5, **fields)
        apps[kind] = (RunningApp(create_app(model, tok, {}, model_name=f"tiny-{kind}")), model)
    yield tok, apps
    for running, _ in apps.values():
        running.stop()


def _drawn(page, selector: str = "#scene") -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(page.locator(selector).screenshot())).convert("RGB"), dtype=float)


def _open_view(page, url: str) -> None:
    page.goto(url)
    page.wait_for_function("() => document.body.dataset.ready === 'true'")


def _click_part(page, step: str, head: int = 0, yaw: float = 0) -> None:
    """Turn the camera to face ``step`` (from behind with ``yaw`` π, where a stack's last head is in front) and
    click its slab (head ``head`` of a stack) in the canvas."""
    drawn = page.evaluate("() => gptlabView.frames")
    page.evaluate("([id, yaw]) => gptlabView.lookAt(id, yaw)", [step, yaw])
    page.wait_for_function("n => gptlabView.frames > n", arg=drawn)
    x, y = page.evaluate("([id, head]) => gptlabView.screenPoint(id, head)", [step, head])
    page.mouse.click(x, y)
    page.wait_for_function("([id, head]) => document.querySelector('#info').dataset.part === id", arg=[step, head])


def _table(page, attr: str) -> dict[str, float]:
    rows = page.locator(f"#info-table tr[{attr}]")
    return dict(zip(rows.evaluate_all(f"rs => rs.map(r => r.getAttribute('{attr}'))"),
                    (float(t) for t in rows.locator("td").all_inner_texts())))


def _fc_of_layer_1(model: GPT, ids: list[int]) -> torch.Tensor:
    """Block 1's MLP hidden layer, run module by module from the embeddings (T, 4C)."""
    idx, T = torch.tensor([ids]), len(ids)
    with torch.no_grad():
        x = model.wte(idx) + model.wpe(torch.arange(T))
        masks = model._context(T, None, None, torch.arange(T))
        x = model.h[0](x, None, masks)
        block = model.h[1]
        summed = x + block.attn(block.attn_input(x), None, masks)
        mlp_in = block.ln_2(summed) if block.pre_norm else block.ln_1(summed)
        return block.mlp.c_fc(mlp_in)[0]


@pytest.mark.parametrize("kind", list(VIZ_MODELS))
def test_visualize_draws_the_served_models_own_forward_pass(viz, page, kind):
    tok, apps = viz
    app, model = apps[kind]
    ids = tok.encode(VIZ_TEXT)
    T, rows = len(ids), list(range(len(ids) - 32, len(ids)))
    _open_view(page, app.url + "/visualize?text=" + quote(VIZ_TEXT))
    pixels = _drawn(page)  # the canvas holds a drawing, not a blank
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500

    # Each kind of model looks like itself: its steps in its order, its blocks' kinds in the row labels.
    trace = model.trace(torch.tensor([ids]), rows)
    labels = page.locator("#steps .step").all_inner_texts()
    assert len(labels) == len(trace.steps)
    assert labels[3] == ("block 0 · queries" if kind == "gpt1" else "block 0 · LayerNorm 1")  # GPT-1: no norm first
    row_labels = page.locator("#labels .row-label").evaluate_all("els => els.map(e => e.textContent)")
    assert ("block 0 · attention · dense · post-LN" in row_labels) == (kind == "gpt1")
    assert ("block 1 · attention · banded (w=4)" in row_labels) == (kind == "gpt3")
    assert ("final LayerNorm" in labels) == (kind != "gpt1")

    # A click on block 1's MLP hidden layer shows its real shape and the followed (last) token's values.
    _click_part(page, "1.fc")
    assert page.get_attribute("#info-shape", "data-shape") == f"{T},128"
    assert page.locator("#info-shape").inner_text() == f"({T} tokens, 128 channels)"
    fc = _fc_of_layer_1(model, ids)
    shown = _table(page, "data-col")
    assert list(shown) == [str(c) for c in range(0, 128, 2)]  # 64 strided columns
    np.testing.assert_allclose(list(shown.values()), fc[-1, ::2].numpy(), rtol=3e-3, atol=1e-3)
    stats = page.locator("#info-stats")
    assert float(stats.get_attribute("data-mean")) == pytest.approx(float(fc[rows].mean()), rel=1e-4, abs=1e-6)
    assert float(stats.get_attribute("data-max")) == pytest.approx(float(fc[rows].max()), rel=1e-6)

    # Attention: head 1 of block 1, the followed token's row over the keys (masked keys show 0).
    _click_part(page, "1.attn", head=1, yaw=math.pi)  # seen from behind, head 1 of 2 is the nearest
    assert page.get_attribute("#info", "data-head") == "1"
    weights = model.attention_weights(torch.tensor([ids]))[0, 1, 1, -1]
    shown = _table(page, "data-key")
    assert shown.pop("earlier") == pytest.approx(float(weights[:rows[0]].sum()), abs=1e-3)
    np.testing.assert_allclose([shown[str(p)] for p in rows], weights[rows].numpy(), atol=1e-3)
    if kind == "gpt3":
        assert all(shown[str(p)] == 0 for p in rows if p <= T - 1 - 4) and shown[str(T - 1)] > 0

    # The distribution at the end is /explore's.
    explore = httpx.post(app.url + "/web/next", json={"text": VIZ_TEXT, "top": 10}).json()["top"]
    cands = page.locator("#top .cand")
    assert cands.evaluate_all("els => els.map(e => Number(e.dataset.id))") == [t["id"] for t in explore]
    np.testing.assert_allclose(cands.evaluate_all("els => els.map(e => Number(e.dataset.prob))"),
                               [t["prob"] for t in explore], atol=2e-6)


def test_visualize_draws_modern_blocks_and_experts(page):
    """A modern block (rotary: no wpe, RMSNorm, QK-norm, ReLU², untied head, softcap) with an MoE block: the
    page names them, draws the router and gates, and shows which experts the followed token went to."""
    tok = CharTokenizer.from_text(LETTERS)
    model = _model(tok, 6, **{**MODERN, "zero_init_proj": False}, ffn="moe", n_experts=4, top_k=2, moe_every=2)
    app = RunningApp(create_app(model, tok, {}, model_name="tiny-modern-moe"))
    try:
        ids = tok.encode(VIZ_TEXT)
        _open_view(page, app.url + "/visualize?text=" + quote(VIZ_TEXT))
        pixels = _drawn(page)
        assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500
        labels = page.locator("#steps .step").all_inner_texts()
        assert labels[:3] == ["token embedding", "embedding sum", "block 0 · RMSNorm 1"]
        assert "block 1 · router probabilities" in labels and "block 0 · ReLU²" in labels
        row_labels = page.locator("#labels .row-label").evaluate_all("els => els.map(e => e.textContent)")
        assert "block 1 · MoE · 4 experts" in row_labels and "block 0 · MLP" in row_labels
        line = page.locator("#model").inner_text()
        assert "rotary · QK-norm · ReLU² · softcap 15" in line and "MoE 4 experts, top 2" in line
        _click_part(page, "1.gates")
        with torch.no_grad():
            r = model.h[1].mlp.route(_mlp_input_of_layer_1(model, ids))
        want = torch.zeros(4).scatter(0, r.experts[-1], r.gates[-1])  # the followed (last) token's gates
        shown = _table(page, "data-col")
        assert list(shown) == ["0", "1", "2", "3"]
        np.testing.assert_allclose(list(shown.values()), want.numpy(), atol=2e-3)
        assert sum(v > 0 for v in shown.values()) == 2
        assert page.locator("#info-table tr[data-col] th, #info-table tr[data-col] td").first.inner_text() == "expert 0"
        if os.environ.get("GPTLAB_VIZ_MOE_SCREENSHOT"):
            page.screenshot(path=os.environ["GPTLAB_VIZ_MOE_SCREENSHOT"])
    finally:
        app.stop()


def _mlp_input_of_layer_1(model: GPT, ids: list[int]) -> torch.Tensor:
    """What block 1's feed-forward reads, run module by module from the embeddings (1, T, C)."""
    idx, T = torch.tensor([ids]), len(ids)
    with torch.no_grad():
        ctx = model._context(T, None, None, torch.arange(T))
        x = model.h[0](model.wte(idx), None, ctx)
        block = model.h[1]
        return block.ln_2(x + block.attn(block.ln_1(x), None, ctx))


def test_visualize_steps_through_the_layers_and_follows_a_token(viz, page):
    tok, apps = viz
    app, model = apps["gpt3"]
    ids = tok.encode(VIZ_TEXT)
    _open_view(page, app.url + "/visualize?text=" + quote(VIZ_TEXT))
    before = _drawn(page)
    page.uncheck("#follow-camera")  # the camera stays put: a software renderer draws its glides slowly
    n = page.locator("#steps .step").count()
    seen = []
    for _ in range(n):
        page.click("#next")
        status = page.locator("#step-status")
        seen.append((status.get_attribute("data-step"), status.get_attribute("data-layer")))
    trace = model.trace(torch.tensor([ids]), [len(ids) - 1])
    assert [s for s, _ in seen] == [s.name if s.layer is None else f"{s.layer}.{s.name}" for s in trace.steps]
    layers = [int(layer) for _, layer in seen if layer]
    assert layers == sorted(layers) and layers[0] == 0 and layers[-1] == 1  # in order, through every block
    assert page.locator("#step-status").inner_text() == f"Step {n} of {n}: logits" and page.is_disabled("#next")
    page.click("#prev")
    assert page.get_attribute("#step-status", "data-step") == ("ln_f" if model.ln_f is not None else "1.ln_2")
    for _ in range(n - 3):
        page.click("#prev")
    assert page.get_attribute("#step-status", "data-step") == "wpe"  # the first steps light up, the rest are ghosts
    page.wait_for_timeout(700)
    assert np.abs(_drawn(page) - before).mean() > 1

    page.click("#play")  # play mode advances by itself, token by token, step by step
    page.wait_for_function("() => document.querySelector('#step-status').dataset.step === '0.ln_1'", timeout=15_000)
    page.click("#play")
    assert page.get_attribute("#play", "aria-pressed") == "false"

    chip = page.locator("#tokens .tok").nth(4)  # follow another token: its next-token distribution
    position = int(chip.get_attribute("data-pos"))
    chip.click()
    assert chip.get_attribute("aria-pressed") == "true"
    assert page.locator("#next-title").inner_text() == f"Next token after position {position}"
    probs = _next_probs(model, ids[:position + 1])
    ids_shown = page.locator("#top .cand").evaluate_all("els => els.map(e => Number(e.dataset.id))")
    assert ids_shown == torch.topk(probs, 10).indices.tolist()


def test_visualize_file_opens_without_a_server(viz, browser, tmp_path):
    tok, apps = viz
    _, model = apps["gpt1"]
    path = tmp_path / "view.html"
    data = ModelView(model, tok, name="tiny-gpt1").view(tok.encode(VIZ_TEXT))
    path.write_text(standalone_page("visualize.html", data))
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    requests: list[str] = []
    try:
        tab = context.new_page()
        tab.on("request", lambda r: requests.append(r.url))
        _open_view(tab, path.as_uri())
        assert _drawn(tab).std() > 20 and tab.locator("#model").inner_text().startswith("tiny-gpt1: 2 blocks")
        assert tab.is_hidden("#run") and tab.input_value("#text") == VIZ_TEXT
        tab.click("#next")
        assert tab.get_attribute("#step-status", "data-step") == "wte"
    finally:
        context.close()
    assert requests == [path.as_uri()]  # nothing else is loaded, from anywhere


def test_view_endpoint(viz):
    tok, apps = viz
    app, model = apps["gpt2"]
    url = app.url + "/web/view"
    out = httpx.post(url, json={"text": VIZ_TEXT})
    assert out.status_code == 200 and len(out.content) < 200_000
    data = out.json()
    assert data["ids"] == tok.encode(VIZ_TEXT) and data["text"] == VIZ_TEXT and data["truncated"] == 0
    assert data["model"]["name"] == "tiny-gpt2" and data["model"]["n_layer"] == 2 and len(data["rows"]) == 32
    long = httpx.post(url, json={"text": "ab" * BLOCK}).json()
    assert long["truncated"] == BLOCK and len(long["ids"]) == BLOCK
    assert _error(httpx.post(url, json={"text": ""}), 400)["param"] == "text"
    assert _error(httpx.post(url, json={"ids": [10_000]}), 400)["param"] == "ids"
    assert _error(httpx.post(url, json={"text": "a", "top": 3}), 400)["param"] == "top"


# ------------------------------------------------------------------ labeler
def _order(page) -> list[int]:
    """The responses' indices (in the order they were sampled) as the page lists them."""
    return [int(i) for i in page.locator("#responses li").evaluate_all("els => els.map(e => e.dataset.index)")]


def test_rank_page_samples_reorders_and_saves_a_ranking_rm_can_read(served, page):
    page.goto(served["url"] + "/rank")
    page.fill("#prompt", "say something nice")
    page.select_option("#k", "3")
    page.fill("#max-tokens", "12")
    page.click("#sample")
    page.locator("#responses li").nth(2).wait_for()
    assert _order(page) == [0, 1, 2]

    page.click("#responses li:nth-child(1) .down")  # [b, a, c]
    page.focus("#responses li:nth-child(3)")
    page.keyboard.press("Alt+ArrowUp")  # [b, c, a]
    assert page.evaluate("document.activeElement.dataset.index") == "2"
    page.keyboard.press("ArrowUp")  # focus only
    assert page.evaluate("document.activeElement.dataset.index") == "1"
    page.drag_and_drop("#responses li:nth-child(1)", "#responses li:nth-child(3)")  # [c, a, b]
    assert _order(page) == [2, 0, 1]
    page.click("#submit")
    page.locator("#submit-status").filter(has_text="Saved to rankings.jsonl").wait_for()

    path = served["data"] / "rankings.jsonl"
    row = json.loads(path.read_text().splitlines()[-1])
    sampled = row["responses"]
    assert len(set(sampled)) == 3 and all(t.strip() for t in sampled) and row["model"] == "tiny"
    assert _words(page.locator("#responses li[data-index='0'] .text").inner_text()) == _words(sampled[0])
    ranking = load_rankings(path)[-1]
    assert ranking.prompt == "say something nice" and ranking.responses == [sampled[2], sampled[0], sampled[1]]


# ------------------------------------------------------------------ endpoints
def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize("body,param", [
    ({"prompt": "p", "responses": ["a"], "ranking": [0]}, "responses"),
    ({"prompt": "p", "responses": [str(i) for i in range(10)], "ranking": list(range(10))}, "responses"),
    ({"prompt": "p", "responses": ["a", " "], "ranking": [0, 1]}, "responses[1]"),
    ({"prompt": "p", "responses": ["a", "b", "a"], "ranking": [0, 1, 2]}, "responses[2]"),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}, "ranking"),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [1, 0, 2]}, "ranking"),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [1]}, "ranking"),
    ({"prompt": "  ", "responses": ["a", "b"], "ranking": [0, 1]}, "prompt"),
    ({"prompt": "p", "responses": ["a", "b"]}, "ranking"),
])
def test_rankings_are_validated_like_load_rankings(served, body, param):
    before = (served["data"] / "rankings.jsonl").read_text() if (served["data"] / "rankings.jsonl").exists() else ""
    error = _error(httpx.post(served["url"] + "/web/rankings", json=body), 400)
    assert error["param"] == param
    after = (served["data"] / "rankings.jsonl").read_text() if (served["data"] / "rankings.jsonl").exists() else ""
    assert after == before


def test_without_a_data_dir_feedback_and_rankings_are_refused(served):
    ranking = {"prompt": "p", "responses": ["a", "b"], "ranking": [1, 0]}
    feedback = {"messages": [{"role": "user", "content": "hi"}], "answer": "yo", "rating": "down"}
    for path, body in (("/web/rankings", ranking), ("/web/feedback", feedback)):
        error = _error(httpx.post(served["base_url"] + path, json=body), 409)
        assert error["code"] == "no_data_dir" and "--data-dir" in error["message"]
    assert _error(httpx.get(served["base_url"] + "/web/prompt"), 409)["code"] == "no_data_dir"


def test_each_record_and_each_file_is_capped(served, tmp_path):
    """Without a key any local client may post: one record is at most max_record_bytes (413), a file grows to
    at most max_file_bytes (429); nothing past either is written."""
    running = RunningApp(create_app(served["model"], served["tok"], {"chat_format": "gptlab-chat-v1"},
                                    model_name="tiny", data=WebData(tmp_path, max_record_bytes=1000,
                                                                    max_file_bytes=3000)))
    try:
        url = running.url + "/web/feedback"
        feedback = {"messages": [{"role": "user", "content": "hi"}], "answer": "yo", "rating": "up"}
        big = _error(httpx.post(url, json={**feedback, "answer": "y" * 2000}), 413)
        assert big["code"] == "record_too_large" and "--max-record-bytes" in big["message"]
        assert not (tmp_path / "feedback.jsonl").exists()
        codes = [httpx.post(url, json={**feedback, "answer": "y" * 800}).status_code for _ in range(6)]
        assert codes[:3] == [200, 200, 200] and set(codes[3:]) == {429}
        assert len((tmp_path / "feedback.jsonl").read_text().splitlines()) == 3
        assert httpx.post(url, json=feedback).status_code == 200  # a small record still fits
        size = (tmp_path / "feedback.jsonl").stat().st_size
        assert size <= 3000 and len((tmp_path / "feedback.jsonl").read_text().splitlines()) == 4
        full = _error(httpx.post(url, json={**feedback, "answer": "y" * 800}), 429)
        assert full["code"] == "data_file_full" and "--max-data-bytes" in full["message"]
        assert (tmp_path / "feedback.jsonl").stat().st_size == size
    finally:
        running.stop()


def test_feedback_is_validated(served):
    url = served["url"] + "/web/feedback"
    assert _error(httpx.post(url, json={"messages": [], "answer": "a", "rating": "meh"}), 400)["param"] == "rating"
    bad_role = {"messages": [{"role": "wizard", "content": "hi"}], "answer": "a", "rating": "up"}
    assert _error(httpx.post(url, json=bad_role), 400)["param"] == "messages[0].role"


def test_explore_endpoint_tokens_top_and_attention(served):
    tok, model, url = served["tok"], served["model"], served["url"] + "/web/next"
    out = httpx.post(url, json={"text": "the cat", "top": 5, "attention": True}).json()
    ids = tok.encode("the cat")
    assert out["ids"] == ids and "".join(out["tokens"]) == "the cat" == out["text"] and out["truncated"] == 0
    probs = _next_probs(model, ids)
    assert [t["id"] for t in out["top"]] == torch.topk(probs, 5).indices.tolist()
    assert [t["prob"] for t in out["top"]] == pytest.approx(torch.topk(probs, 5).values.tolist(), abs=1e-5)
    attention = torch.tensor(out["attention"])
    assert attention.shape == (2, 2, len(ids))
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 2), atol=1e-3, rtol=0)
    assert httpx.post(url, json={"ids": ids}).json()["attention"] is None
    long = httpx.post(url, json={"text": "ab" * BLOCK}).json()
    assert long["truncated"] == BLOCK and len(long["ids"]) == BLOCK
    assert _error(httpx.post(url, json={"text": ""}), 400)["param"] == "text"
    assert _error(httpx.post(url, json={"text": "ABC"}), 400)["param"] == "text"
    assert _error(httpx.post(url, json={"ids": [10_000]}), 400)["param"] == "ids"
    assert _error(httpx.post(url, json={"text": "a", "top": 0}), 400)["param"] == "top"


def test_prompt_endpoint_prefers_prompts_not_ranked_yet(served):
    prompts = served["data"] / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("already ranked", "a fresh one")))
    done = {"prompt": "already ranked", "responses": ["yes", "no"], "ranking": [1, 0]}
    assert httpx.post(served["url"] + "/web/rankings", json=done).status_code == 200
    try:
        assert httpx.get(served["url"] + "/web/info").json()["prompts"] is True
        assert {httpx.get(served["url"] + "/web/prompt").json()["prompt"] for _ in range(5)} == {"a fresh one"}
    finally:
        prompts.unlink()
    assert _error(httpx.get(served["url"] + "/web/prompt"), 404)["code"] == "no_prompts"


def test_pages_and_static_files_are_served(served):
    for path, title in (("/", "chat"), ("/explore", "explorer"), ("/visualize", "3-D view"), ("/rank", "labeler")):
        r = httpx.get(served["url"] + path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert f"gptlab · {title}" in r.text and "script-src 'self'" in r.headers["content-security-policy"]
        assert not re.search(r'(src|href)="(https?:)?//', r.text)  # nothing is loaded from elsewhere
    assert httpx.get(served["url"] + "/static/chat.js").status_code == 200
    assert _error(httpx.get(served["url"] + "/static/nothing.js"), 404)


def test_pages_load_without_the_key_and_the_api_asks_for_it(served, browser):
    url = served["keyed_url"]
    for path in ("/", "/explore", "/visualize", "/rank", "/static/common.js"):
        assert httpx.get(url + path).status_code == 200
    assert _error(httpx.get(url + "/web/info"), 401)["code"] == "invalid_api_key"
    assert _error(httpx.post(url + "/web/view", json={"text": "a"}), 401)["code"] == "invalid_api_key"
    context = browser.new_context()
    try:
        tab = context.new_page()
        tab.goto(url + "/explore")
        tab.fill("#api-key", KEY)
        tab.click("#keybar .primary")
        tab.locator("#model").filter(has_text="model: tiny").wait_for()
        tab.fill("#text", "hello")
        tab.locator("#top li").nth(9).wait_for()
    finally:
        context.close()


# ------------------------------------------------------------------ appends
def test_append_jsonl_cuts_a_torn_line_and_never_interleaves(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"n": -1}\n{"n": -2, "torn')  # a crash in the middle of a write
    append_jsonl(path, {"n": 0})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"n": -1}, {"n": 0}]
    big = "x" * 200_000  # far beyond one pipe/page buffer

    def writer(t: int) -> None:
        for i in range(20):
            append_jsonl(path, {"t": t, "i": i, "pad": big if i % 5 == 0 else ""})

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 2 + 6 * 20
    assert sorted((r["t"], r["i"]) for r in rows[2:]) == [(t, i) for t in range(6) for i in range(20)]


# ------------------------------------------------------------------ screenshots (opt-in)
@pytest.mark.skipif(not os.environ.get("GPTLAB_WEB_SCREENSHOTS"),
                    reason="opt-in: GPTLAB_WEB_SCREENSHOTS=CHAT_RUN[,BASE_RUN] writes docs/img/web-*.png")
def test_screenshots_for_the_docs(browser, tmp_path):
    from gptlab.runs import load_model
    from gptlab.tokenizer import load_tokenizer

    runs = os.environ["GPTLAB_WEB_SCREENSHOTS"].split(",")

    def serve(run: str) -> RunningApp:
        config = json.loads((Path(run) / "config.json").read_text())
        return RunningApp(create_app(load_model(run), load_tokenizer(str(Path(run) / "tokenizer")), config,
                                   model_name=Path(run).name, data=WebData(tmp_path), max_n=9))

    chat = serve(runs[0])
    base = serve(runs[-1]) if len(runs) > 1 else chat
    context = browser.new_context(viewport={"width": 1280, "height": 800}, device_scale_factor=1)
    context.set_default_timeout(60_000)
    tab = context.new_page()
    try:
        tab.goto(chat.url + "/")
        tab.fill("#temperature", "0.3")
        for text in SCREENSHOT_CHAT:  # one conversation each: the model was tuned on single exchanges
            tab.click("#new-chat")
            tab.fill("#input", text)
            tab.press("#input", "Enter")
            tab.locator(".msg.assistant .regenerate").wait_for()
        tab.click(".msg.assistant .thumb-up")
        tab.locator(".msg.assistant .feedback").wait_for()
        tab.screenshot(path=str(ROOT / "docs/img/web-chat.png"))

        tab.goto(base.url + "/explore")
        tab.fill("#text", "ROMEO.\nBut soft, what light through yonder window")
        tab.locator("#top li").nth(9).wait_for()
        tab.click("#top .cand >> nth=0")
        tab.locator("#top li").nth(9).wait_for()
        tab.check("#heat")
        tab.locator("#grid .cell").first.wait_for()
        tab.click("#grid .cell[data-layer='3'][data-head='1']")
        tab.screenshot(path=str(ROOT / "docs/img/web-explore.png"), full_page=True)

        tab.goto(chat.url + "/rank")
        tab.fill("#prompt", "What say you to this marriage?")
        tab.fill("#max-tokens", "40")
        tab.click("#sample")
        tab.locator("#responses li").nth(3).wait_for()
        tab.click("#responses li:nth-child(3) .up")
        tab.screenshot(path=str(ROOT / "docs/img/web-rank.png"), full_page=True)
    finally:
        context.close()
        chat.stop()
        if base is not chat:
            base.stop()


VIZ_SHOT_TEXT = ("ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. "
                 "Arise, fair sun, and kill the envious moon.")


@pytest.mark.skipif(not os.environ.get("GPTLAB_VIZ_SCREENSHOTS"),
                    reason="opt-in: GPTLAB_VIZ_SCREENSHOTS=GPT2_RUN,GPT1_RUN,GPT3_RUN[,GPT2_SMALL_RUN] writes "
                           "docs/img/visualize-*.png")
def test_visualize_screenshots_for_the_docs(browser, tmp_path):
    """The 3-D view of a GPT-2-style, a GPT-1-style and a banded GPT-3-style run (and GPT-2 small's shape), from
    several angles and steps; PNGs cut to 256 colours to keep the repository small."""
    from gptlab.runs import load_run

    runs = os.environ["GPTLAB_VIZ_SCREENSHOTS"].split(",")
    context = browser.new_context(viewport={"width": 1280, "height": 800}, device_scale_factor=1)
    context.set_default_timeout(120_000)
    tab = context.new_page()

    def shot(name: str) -> None:
        tab.wait_for_timeout(900)  # the camera's glide and the reveal are over
        png = Image.open(io.BytesIO(tab.screenshot())).convert("RGB").quantize(256)
        png.save(ROOT / "docs" / "img" / f"visualize-{name}.png", optimize=True)

    def turn(yaw: float, pitch: float, farther: float = 1, right: float = 0) -> None:
        tab.evaluate("([yaw, pitch, farther, right]) => { const c = gptlabView.camera; c.yaw = yaw; "
                     "c.pitch = pitch; c.distance *= farther; c.target[0] += right; gptlabView.redraw(); }",
                     [yaw, pitch, farther, right])

    def open_run(run: str) -> RunningApp:
        model, tok, config = load_run(run)
        app = RunningApp(create_app(model, tok, config, model_name=Path(run).name))
        tab.goto(app.url + "/visualize?text=" + quote(VIZ_SHOT_TEXT))
        tab.wait_for_function("() => document.body.dataset.ready === 'true'")
        return app

    try:
        app = open_run(runs[0])  # GPT-2-style: the overview, a step of attention, the MLP from another angle
        shot("gpt2-overview")
        tab.evaluate("() => gptlabView.goTo('1.attn')")
        shot("gpt2-attention-step")
        tab.evaluate("() => gptlabView.goTo(null)")
        _click_part(tab, "2.act")
        turn(yaw=0.7, pitch=0.55, farther=1.6)
        shot("gpt2-mlp-angle")
        app.stop()
        app = open_run(runs[1])  # GPT-1: LayerNorm on the stream after each sum
        tab.evaluate("() => gptlabView.goTo('1.ln_1')")
        tab.wait_for_timeout(900)  # the camera's glide to the step is over
        turn(yaw=-0.55, pitch=0.2, farther=4, right=60)
        shot("gpt1-post-ln")
        app.stop()
        # GPT-3: a file from `gptlab visualize --positions 64`, so that a band of 32 shows inside the drawn keys
        model, tok, _ = load_run(runs[2])
        text = VIZ_SHOT_TEXT + " Be not her maid, since she is envious; her vestal livery is but sick and green."
        page_file = tmp_path / "visualize-gpt3.html"
        data = ModelView(model, tok, ViewConfig(positions=64), name=Path(runs[2]).name).view(tok.encode(text))
        page_file.write_text(standalone_page("visualize.html", data))
        tab.goto(page_file.as_uri())
        tab.wait_for_function("() => document.body.dataset.ready === 'true'")
        _click_part(tab, "1.attn", head=1, yaw=math.pi)
        turn(yaw=-0.6, pitch=0.25)
        shot("gpt3-band")
        if len(runs) > 3:  # GPT-2 small's shape: twelve blocks, twelve heads, 768 wide
            app = open_run(runs[3])
            shot("gpt2-small-overview")
            app.stop()
    finally:
        context.close()
