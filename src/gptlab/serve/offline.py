"""A page of ``static/`` as one self-contained HTML file: its styles, its scripts and a JSON document inline, so
it opens from ``file://`` with no server (``gptlab visualize --out view.html``). The served pages' CSP does not
apply to a file; nothing in it refers to another file or host."""

from __future__ import annotations

import json
import re
from typing import Any

from .web import STATIC

__all__ = ["standalone_page", "DATA_ID"]

DATA_ID = "view-data"  # the page's script reads its data from <script type="application/json" id="view-data">
_STYLE = re.compile(r'<link rel="stylesheet" href="/static/([\w.-]+\.css)">')
_SCRIPT = re.compile(r'\s*<script src="/static/([\w.-]+\.js)" defer></script>')


def _inline(name: str) -> str:
    text = (STATIC / name).read_text(encoding="utf-8")
    if "</script" in text.lower() or "</style" in text.lower():  # would end the inline element early
        raise ValueError(f"static/{name} contains a closing tag and cannot be inlined")
    return text


def standalone_page(page: str, data: Any) -> str:
    """``static/page`` with its stylesheets and scripts inline and ``data`` as its JSON document; the scripts
    move to the end of the body (inline scripts run as they are parsed, the served ones are deferred)."""
    html = (STATIC / page).read_text(encoding="utf-8")
    scripts = _SCRIPT.findall(html)
    if not scripts:
        raise ValueError(f"static/{page} loads no script from /static/")
    html = _STYLE.sub(lambda m: f"<style>\n{_inline(m.group(1))}</style>", _SCRIPT.sub("", html))
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    tail = (f'<script type="application/json" id="{DATA_ID}">{payload}</script>\n'
            + "".join(f"<script>\n{_inline(name)}</script>\n" for name in scripts))
    return html.replace("</body>", tail + "</body>", 1)
