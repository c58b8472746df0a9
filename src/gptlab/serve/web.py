"""The web pages served beside the API: ``/`` (chat), ``/explore`` (next-token explorer), ``/visualize`` (the
model in 3-D on a text's forward pass), ``/rank`` (labeler).

The pages are static HTML/JS/CSS from ``static/`` (no build step, nothing fetched from elsewhere); they
talk to the OpenAI routes (``/v1/chat/completions``, ``/v1/completions``) and to the JSON endpoints here:

* ``GET /web/info``: what the pages need to know about the model (chat format or not, context, sizes).
* ``POST /web/next``: the explorer's step: the text's tokens (``readable_tokens``: a token holding part of
  a character shows that character, marked ``partial``), the top next tokens, optionally the last
  token's attention in every layer and head.
* ``POST /web/view``: the 3-D view's data for a text (``visualize.ModelView``: every step of the forward
  pass, sampled and capped; the model's weights are sampled once, on the first request).
* ``POST /web/feedback``: a thumbs up/down on a chat answer, appended to ``data_dir/feedback.jsonl``.
* ``GET /web/prompt``: a prompt to label from ``data_dir/prompts.jsonl`` (one not yet ranked first).
* ``POST /web/rankings``: a labeler's ranking, appended to ``data_dir/rankings.jsonl`` in the form
  ``gptlab rm`` reads (``align_data.load_rankings``).

The pages and ``/static/`` hold nothing secret, so they are meant to be reachable without the API key; the
JSON endpoints are guarded like the API and the pages send the key they keep in the browser.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from ..align_data import load_prompts, ranking_of
from ..atomic import FileFull, append_jsonl
from ..chat import ROLES
from ..errors import DataError, UserError
from ..tokenizer import readable_tokens
from ..visualize import ModelView
from .openai import OpenAIHandler
from .protocol import APIError
from .state import ServeState

__all__ = ["add_web_routes", "WebData", "PAGES", "STATIC"]

STATIC = Path(__file__).with_name("static")
PAGES = {"/": "chat.html", "/explore": "explore.html", "/visualize": "visualize.html", "/rank": "rank.html"}
FEEDBACK, RANKINGS, PROMPTS = "feedback.jsonl", "rankings.jsonl", "prompts.jsonl"
MAX_TOP = 50
# The pages load only their own files and talk only to this server.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


# ------------------------------------------------------------------ schemas
class NextRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    text: str | None = None
    ids: list[int] | None = None
    top: int = 10
    attention: bool = False


class ViewRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    text: str | None = None
    ids: list[int] | None = None


class Turn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: str
    content: str


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    messages: list[Turn]
    answer: str
    rating: Literal["up", "down"]


class RankingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str
    responses: list[str]
    ranking: list[int]


# ------------------------------------------------------------------ data
@dataclass(frozen=True)
class WebData:
    """Where the pages keep what people send (feedback, rankings), and how much: nothing is written unless
    the user named a directory, one record is at most ``max_record_bytes``, a file at most ``max_file_bytes``."""

    directory: Path | None = None
    max_record_bytes: int = 64 * 1024
    max_file_bytes: int = 100 * 1024 * 1024

    def file(self, name: str) -> Path:
        if self.directory is None:
            raise APIError(409, f"the server was started without a data directory, so it keeps no {name}: "
                                "restart gptlab serve with --data-dir DIR", code="no_data_dir")
        return self.directory / name

    async def append(self, name: str, row: dict[str, Any]) -> None:
        path = self.file(name)
        size = len(json.dumps(row, ensure_ascii=False).encode()) + 1
        if size > self.max_record_bytes:
            raise APIError(413, f"the record is {size} bytes, more than the {self.max_record_bytes} one record may "
                                "hold (--max-record-bytes)", code="record_too_large")
        try:
            await run_in_threadpool(append_jsonl, path, row, self.max_file_bytes)
        except FileFull:
            raise APIError(429, f"{name} reached its limit of {self.max_file_bytes} bytes (--max-data-bytes): move "
                                "it away or raise the limit", type="rate_limit_error", code="data_file_full") from None


def _stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ------------------------------------------------------------------ explorer
def _context(api: OpenAIHandler, req: NextRequest | ViewRequest) -> tuple[list[int], int]:
    """The explorer's and the 3-D view's token ids (ids win over text) cut to the model's context, and how
    many were cut."""
    if req.ids is not None:
        ids = list(req.ids)
        if any(not 0 <= i < api.tok.vocab_size for i in ids):
            raise APIError(400, f"ids must be token ids 0..{api.tok.vocab_size - 1}", param="ids")
    else:
        try:
            ids = api.tok.encode(req.text or "")
        except UserError as e:
            raise APIError(400, f"the text cannot be tokenized: {e}", param="text") from None
    if not ids:
        raise APIError(400, "type some text first: the explorer predicts the token after it", param="text")
    cut = max(0, len(ids) - api.block)
    return ids[cut:], cut


def _explore(api: OpenAIHandler, ids: list[int], top: int, attention: bool) -> dict[str, Any]:
    """One forward pass on the worker thread: next-token probabilities, and the last row of attention."""
    model = api.gpt
    idx = torch.tensor([ids], dtype=torch.long, device=api.engine.device)
    with torch.inference_mode():
        probs = torch.softmax(model(idx)[0, -1].float(), -1)
        best = torch.topk(probs, min(top, probs.numel()))
        weights = model.attention_weights(idx, queries=1)[0, :, :, 0] if attention else None
    tail = ids[-3:]  # a character is at most 4 bytes: the tokens a candidate may complete one with
    tops = [{"id": i, "token": token, "partial": partial, "prob": round(p, 6)}
            for i, p in zip(best.indices.tolist(), best.values.tolist())
            for token, partial in [readable_tokens(api.tok, [*tail, i])[-1]]]
    rows = None if weights is None else [[[round(w, 5) for w in head] for head in layer]
                                         for layer in weights.float().cpu().tolist()]
    return {"top": tops, "attention": rows}


# ------------------------------------------------------------------ rankings
def _check_ranking(req: RankingRequest) -> None:
    """``align_data.ranking_of``, the rules ``gptlab rm`` reads rankings by, answered as a 400 naming the field."""
    try:
        ranking_of(req.model_dump(include={"prompt", "responses", "ranking"}), "the ranking")
    except DataError as e:
        raise APIError(400, str(e), param=e.field) from None


def _next_prompt(path: Path) -> str | None:
    """A random prompt of ``path`` (prompts.jsonl), preferring those rankings.jsonl beside it does not hold yet."""
    if not path.exists():
        return None
    prompts = load_prompts(path)
    ranked = path.with_name(RANKINGS)
    done = set(load_prompts(ranked)) if ranked.exists() else set()
    fresh = [p for p in prompts if p not in done]
    return random.choice(fresh or prompts)


# ------------------------------------------------------------------ routes
def _page(name: str) -> Callable[[], Awaitable[FileResponse]]:
    async def page() -> FileResponse:
        return FileResponse(STATIC / name, media_type="text/html",
                            headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})
    return page


def add_web_routes(app: FastAPI, state: ServeState, data: WebData) -> None:
    """Register the pages, their static files and their JSON endpoints on ``app``."""
    data_dir = data.directory
    for path, name in PAGES.items():
        app.add_api_route(path, _page(name), methods=["GET", "HEAD"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    views: dict[int, ModelView] = {}  # id(handler) -> the view of its model, built by the first request

    def view_of(api: OpenAIHandler, ids: list[int], cut: int) -> dict[str, Any]:
        if id(api) not in views:
            views[id(api)] = ModelView(api.gpt, api.tok, name=api.model_name)
        return views[id(api)].view(ids, cut)

    @app.get("/web/info")
    async def info() -> dict[str, Any]:
        api = state.api
        cfg = api.gpt.config
        prompts = data_dir is not None and (data_dir / PROMPTS).exists()
        return {"model": api.model_name, "chat": api.chat_ok, "context": api.block,
                "max_tokens": api.max_tokens_limit, "max_n": api.max_n, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
                "data_dir": data_dir is not None, "prompts": prompts, "images": api.engine.vision is not None}

    @app.post("/web/next")
    async def explore_next(req: NextRequest) -> dict[str, Any]:
        if not 1 <= req.top <= MAX_TOP:
            raise APIError(400, f"top={req.top} must be between 1 and {MAX_TOP}", param="top")
        api = state.api
        ids, cut = _context(api, req)
        result = await api.run(lambda: _explore(api, ids, req.top, req.attention))
        shown = readable_tokens(api.tok, ids)
        return {"ids": ids, "tokens": [t for t, _ in shown], "partial": [p for _, p in shown],
                "text": api.tok.decode(ids), "truncated": cut, **result}

    @app.post("/web/view")
    async def visualize(req: ViewRequest) -> dict[str, Any]:
        api = state.api
        ids, cut = _context(api, req)
        return await api.run(lambda: view_of(api, ids, cut))

    @app.post("/web/feedback")
    async def feedback(req: FeedbackRequest) -> dict[str, Any]:
        for i, turn in enumerate(req.messages):
            if turn.role not in ROLES:
                raise APIError(400, f"messages[{i}].role '{turn.role}' is not one of {', '.join(ROLES)}",
                               param=f"messages[{i}].role")
        row = {"time": _stamp(), "model": state.api.model_name, "rating": req.rating,
               "messages": [t.model_dump() for t in req.messages], "answer": req.answer}
        await data.append(FEEDBACK, row)
        return {"saved": FEEDBACK}

    @app.get("/web/prompt")
    async def prompt() -> dict[str, Any]:
        path = data.file(PROMPTS)
        try:
            text = await run_in_threadpool(_next_prompt, path)
        except DataError as e:
            raise APIError(400, str(e)) from None
        if text is None:
            raise APIError(404, f"no {PROMPTS} in the data directory: write one {{\"prompt\": ...}} per line "
                                "there, or type a prompt", code="no_prompts")
        return {"prompt": text}

    @app.post("/web/rankings")
    async def rankings(req: RankingRequest) -> dict[str, Any]:
        _check_ranking(req)
        row = {"prompt": req.prompt, "responses": req.responses, "ranking": req.ranking,
               "model": state.api.model_name, "time": _stamp()}
        await data.append(RANKINGS, row)
        return {"saved": RANKINGS}
