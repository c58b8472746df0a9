"""Opt-in: the web chat holding a real exchange with the model `gptlab chat-demo` made, for the docs.

``GPTLAB_CHAT_DEMO_RUN=DIR pytest tests/test_web_chat_demo.py`` serves the run DIR as ``gptlab serve --model
DIR`` does, types two user turns of a held-out conversation (from DIR/report.json) into the chat page in
headless Chromium, and writes docs/img/web-chat-demo.png."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("httpx")

from gptlab.runs import load_run  # noqa: E402
from gptlab.serve import create_app  # noqa: E402
from serving import RunningApp  # noqa: E402
from test_web import browser  # noqa: E402,F401  (the Chromium fixture)

ROOT = Path(__file__).resolve().parents[1]
RUN = os.environ.get("GPTLAB_CHAT_DEMO_RUN")


@pytest.mark.skipif(not RUN, reason="opt-in: GPTLAB_CHAT_DEMO_RUN=DIR writes docs/img/web-chat-demo.png")
def test_web_chat_with_the_chat_demo_model(browser):  # noqa: F811
    run = Path(str(RUN))
    model, tok, config = load_run(run)
    example = json.loads((run / "report.json").read_text())["examples"][0]
    turns = [t for k, t in enumerate(example["context"]) if (len(example["context"]) - k) % 2 == 1][-2:]
    app = RunningApp(create_app(model, tok, config, model_name=run.name))
    context = browser.new_context(viewport={"width": 1280, "height": 800}, device_scale_factor=1)
    context.set_default_timeout(60_000)
    tab = context.new_page()
    try:
        tab.goto(app.url + "/")
        tab.fill("#temperature", "0.7")
        for k, text in enumerate(turns or ["hi, how are you doing today?"]):
            tab.fill("#input", text)
            tab.press("#input", "Enter")
            tab.wait_for_function("n => document.querySelectorAll('.msg.assistant').length === n", arg=k + 1)
            tab.locator(".msg.assistant .regenerate").last.wait_for()  # the reply has finished streaming
        replies = tab.locator(".msg.assistant .body").all_inner_texts()
        assert all(r.strip() for r in replies)
        tab.screenshot(path=str(ROOT / "docs/img/web-chat-demo.png"))
    finally:
        context.close()
        app.stop()
