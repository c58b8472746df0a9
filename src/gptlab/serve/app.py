"""The OpenAI-compatible HTTP API: ``create_app(model, tokenizer, config, model_name=...)`` -> FastAPI.

Routes: ``GET /health``, ``GET /metrics`` (Prometheus text: requests, latency, tokens, queue depth), ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``,
``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info`` (the lm-evaluation-harness probes).

Requests are decoded together: a ``Batcher`` (batcher.py) runs one batch on a
worker thread and new sequences join it between decode steps, each with its own
sampling settings and seed, so a seeded request gets the same text alone or in a
crowd. The ``n`` choices of a request are sequences of the batch (choice ``j``
uses ``seed + j``, streamed or not). A client that disconnects frees its slots.

Errors always come in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``:
400 for bad input (validation, malformed JSON, prompts beyond the context), 401 for a
missing or wrong API key, 404 for an unknown model or route, 413 for a body over
``max_body_bytes``, 429 when more than ``max_queue`` generation requests are running
or waiting, 503 while the model loads. A ``max_tokens`` that does not fit after the
prompt is cut at the context (``finish_reason: "length"``) rather than refused.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat import ROLES, Message, has_chat_tokens, render, stop_ids
from ..batcher import Batcher, Piece
from ..engine import Completion, Engine, SamplingParams
from ..errors import UserError
from .web import PAGES, add_web_routes

__all__ = ["create_app", "APIError"]

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 5  # legacy completions
MAX_TOP_LOGPROBS = 20  # chat
MAX_SEQUENCES = 256  # prompts x n in one request: bounds its memory and how long it holds the batch
DISCONNECT_POLL_SECONDS = 0.5  # how often a waiting non-streamed request checks its client is still there


class APIError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return _error(self.status, self.message, type=self.type, param=self.param, code=self.code)


def _error(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status)


# ------------------------------------------------------------------ schemas
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool | None = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # ignored extras (user, metadata, ...); no coercion
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(_Request):
    messages: list[ChatMessage]
    logprobs: bool | None = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    prompt: str


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    tokens: list[int]


# ------------------------------------------------------------- middleware
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


def _public(scope: dict) -> bool:
    """The web pages and their static files: not secret, so a browser can load them without the key (the
    page then asks for it) and while the model loads (the page shows the 503 of the API it calls)."""
    path = scope.get("path", "")
    return scope.get("method") in ("GET", "HEAD") and (path in PAGES or path.startswith("/static/"))


class _Metrics:
    """Counters for ``GET /metrics`` (Prometheus text format). Updated on the event loop's thread only."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.seconds_sum = 0.0
        self.seconds_count = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.in_flight = 0  # generation requests running or waiting for the model
        self.rejected = 0
        self.batcher: Batcher | None = None  # set once the model is loaded

    def text(self) -> str:
        lines = ["# HELP gptlab_requests_total HTTP requests by path and status.",
                 "# TYPE gptlab_requests_total counter"]
        lines += [f'gptlab_requests_total{{path="{path}",status="{status}"}} {n}'
                  for (path, status), n in sorted(self.requests.items())]
        lines += ["# HELP gptlab_request_seconds Time from request to the last byte of the response.",
                  "# TYPE gptlab_request_seconds summary",
                  f"gptlab_request_seconds_sum {self.seconds_sum:.6f}", f"gptlab_request_seconds_count {self.seconds_count}",
                  "# HELP gptlab_tokens_total Tokens in prompts and generated completions.",
                  "# TYPE gptlab_tokens_total counter",
                  f'gptlab_tokens_total{{kind="prompt"}} {self.prompt_tokens}',
                  f'gptlab_tokens_total{{kind="completion"}} {self.completion_tokens}',
                  "# HELP gptlab_queue_depth Generation requests running or waiting for the model.",
                  "# TYPE gptlab_queue_depth gauge", f"gptlab_queue_depth {self.in_flight}",
                  "# HELP gptlab_rejected_total Generation requests refused with 429 (queue full).",
                  "# TYPE gptlab_rejected_total counter", f"gptlab_rejected_total {self.rejected}"]
        if self.batcher is not None:
            b = self.batcher
            lines += ["# HELP gptlab_batch_sequences Sequences decoding in the batch now, and waiting to join it.",
                      "# TYPE gptlab_batch_sequences gauge", f'gptlab_batch_sequences{{state="running"}} {b.running}',
                      f'gptlab_batch_sequences{{state="waiting"}} {b.queued}',
                      "# HELP gptlab_decode_steps_total Batched decode steps run.",
                      "# TYPE gptlab_decode_steps_total counter", f"gptlab_decode_steps_total {b.steps}"]
        return "\n".join(lines) + "\n"


class _Guard:
    """Pure ASGI middleware: metrics, 503 while loading, API key (401), body size (413) and queue limit
    (429), before any route reads the body."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int, server: "_Server", max_queue: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body_bytes
        self.server, self.metrics, self.max_queue = server, server.metrics, max_queue

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def observed_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        path = scope.get("path", "")
        generating = path in GENERATION_PATHS and scope.get("method") == "POST"
        m = self.metrics
        if generating:
            m.in_flight += 1
        try:
            if not self.server.loaded and path != "/metrics" and not _public(scope):
                await self._unavailable(path)(scope, receive, observed_send)
            elif generating and m.in_flight > self.max_queue:
                m.rejected += 1
                await _error(429, f"server busy: {m.in_flight - 1} requests are running or queued "
                                  f"(--max-queue {self.max_queue}); retry later", type="rate_limit_error",
                             code="queue_full")(scope, receive, observed_send)
            else:
                await self._checked(scope, receive, observed_send)
        finally:
            if generating:
                m.in_flight -= 1
            key = (path if path in (*GENERATION_PATHS, "/health", "/metrics", "/tokenize", "/detokenize",
                                    "/tokenizer_info", "/v1/models") else "other", status)
            m.requests[key] = m.requests.get(key, 0) + 1
            m.seconds_sum += time.perf_counter() - started
            m.seconds_count += 1

    def _unavailable(self, path: str) -> JSONResponse:
        error = self.server.load_error
        if path == "/health":
            return JSONResponse({"status": "error", "error": error} if error else {"status": "loading"}, status_code=503)
        message = f"the model failed to load: {error}" if error else "the model is still loading: retry when GET /health answers 200"
        return _error(503, message, type="service_unavailable", code="model_load_failed" if error else "model_loading")

    async def _checked(self, scope: dict, receive: Callable, send: Callable) -> None:
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and scope.get("path") != "/health" and not _public(scope):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + self.api_key.encode()):
                what = "missing" if not given else "incorrect"
                await _error(401, f"{what} API key: send the header 'Authorization: Bearer KEY' with the key "
                                  f"the server was started with (--api-key)", code="invalid_api_key")(
                    scope, receive, send)
                return
        too_big = _error(413, f"request body larger than {self.max_body} bytes (--max-body-bytes)",
                         code="request_too_large")
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                await _error(400, "invalid Content-Length header")(scope, receive, send)
                return
            if n > self.max_body:
                await too_big(scope, receive, send)
                return
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                await too_big(scope, receive, send)
                return
        where = _lone_surrogate(bytes(body))
        if where is not None:
            await _error(400, f"{where} is not valid Unicode (a lone UTF-16 surrogate such as \\ud800): "
                              "send text that encodes as UTF-8", param=where.split(".")[0].split("[")[0])(
                scope, receive, send)
            return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _lone_surrogate(body: bytes) -> str | None:
    """Where a JSON body holds a string Python cannot encode as UTF-8 (``"\\ud800"`` is valid JSON), or None.

    Checked once here, before any route sees the text, rather than in every tokenizer and JSONL writer.
    """
    if b"\\ud" not in body.lower():
        return None
    try:
        value = json.loads(body)
    except ValueError:
        return None  # not JSON: the route answers that

    def walk(v: Any, path: str) -> str | None:
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return path or "body"
        elif isinstance(v, dict):
            for k, item in v.items():
                found = walk(k, path) or walk(item, f"{path}.{k}" if path else str(k))
                if found:
                    return found
        elif isinstance(v, list):
            for i, item in enumerate(v):
                found = walk(item, f"{path}[{i}]")
                if found:
                    return found
        return None

    return walk(value, "")


# ------------------------------------------------------------------ server
def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Server:
    """The model behind the routes. Until ``attach`` has run (the model is loading) the middleware
    answers 503, so the routes may use the model's attributes freely."""

    def __init__(self, *, model_name: str, max_tokens_limit: int | None, max_n: int, max_batch: int,
                 data_dir: Path | None):
        self.model_name, self.max_tokens_limit, self.max_n = model_name, max_tokens_limit, max_n
        self.max_batch, self.data_dir = max_batch, data_dir
        self.metrics = _Metrics()
        self.created = int(time.time())
        self.ready = threading.Event()  # set once the model is attached, or loading failed
        self.load_error: str | None = None
        self.batcher: Batcher | None = None

    def attach(self, model: Any, tokenizer: Any, config: dict[str, Any]) -> None:
        if tokenizer is None:
            raise UserError("the server needs a tokenizer: serve a run directory saved with one, or hf:DIR")
        self.engine = Engine(model, tokenizer)
        self.model, self.tok, self.config = self.engine.model, tokenizer, config
        self.block = self.engine.config.block_size
        self.max_tokens_limit = self.max_tokens_limit or self.block
        self.chat_ok = bool(config.get("chat_format")) and has_chat_tokens(tokenizer)
        self.batcher = Batcher(self.engine, self.max_batch)
        self.metrics.batcher = self.batcher
        self.ready.set()

    def load(self, loader: Callable[[], tuple[Any, Any, dict[str, Any]]]) -> None:
        """Attach what ``loader()`` returns; a failure is kept in ``load_error`` (and /health reports it)."""
        try:
            self.attach(*loader())
        except Exception as e:  # noqa: BLE001 - reported by /health and by `gptlab serve`
            self.load_error = f"{type(e).__name__}: {e}" if not isinstance(e, UserError) else str(e)
            self.ready.set()

    @property
    def loaded(self) -> bool:
        return self.ready.is_set() and self.load_error is None

    # -------------------------------------------------------- validation
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model '{name}' does not exist: this server serves '{self.model_name}' "
                                "(see GET /v1/models)", param="model", code="model_not_found")

    def check_ids(self, ids: Sequence[int], param: str) -> list[int]:
        vocab = self.tok.vocab_size
        for i in ids:
            if not 0 <= i < vocab:
                raise APIError(400, f"token id {i} is not in the vocabulary (ids 0..{vocab - 1})", param=param)
        return list(ids)

    def encode(self, text: str) -> list[int]:
        try:
            return self.tok.encode(text)
        except UserError as e:
            raise APIError(400, f"the text cannot be tokenized: {e}", param="prompt") from None

    def check_length(self, ids: list[int], max_tokens: int, param: str) -> None:
        if not ids:
            raise APIError(400, "empty prompt: give at least one token", param=param)
        if len(ids) > self.block or (max_tokens > 0 and len(ids) >= self.block):
            room = "" if max_tokens == 0 else " with room for at least one new token"
            raise APIError(400, f"the prompt has {len(ids)} tokens, which does not fit the model's context of "
                                f"{self.block} tokens{room}: shorten it", param=param, code="context_length_exceeded")

    def params(self, req: _Request, max_tokens: int | None, default_max: int, logprobs: int,
               stop_token_ids: Sequence[int] = ()) -> SamplingParams:
        if max_tokens is None:
            max_tokens = default_max
        if not 0 <= max_tokens <= self.max_tokens_limit:
            raise APIError(400, f"max_tokens={max_tokens} must be between 0 and {self.max_tokens_limit}",
                           param="max_tokens")
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
            value = getattr(req, name)
            if value is not None and not math.isfinite(value):
                raise APIError(400, f"{name} must be a finite number", param=name)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(req, name)
            if value is not None and not -2 <= value <= 2:
                raise APIError(400, f"{name}={value} must be between -2 and 2", param=name)
        temperature = 1.0 if req.temperature is None else req.temperature
        if not 0 <= temperature <= 100:
            raise APIError(400, f"temperature={temperature} must be between 0 and 100 (0 = greedy)",
                           param="temperature")
        top_p = req.top_p
        if top_p is not None and not 0 < top_p <= 1:
            raise APIError(400, f"top_p={top_p} must be in (0, 1]", param="top_p")
        if req.top_k is not None and req.top_k < -1:
            raise APIError(400, f"top_k={req.top_k} must be >= 1 (or -1/0 for no limit)", param="top_k")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
            raise APIError(400, f"stop must be up to {MAX_STOP_STRINGS} non-empty strings", param="stop")
        seed = req.seed
        if seed is not None and not -(2 ** 63) <= seed < 2 ** 64:
            raise APIError(400, "seed must fit in 64 bits", param="seed")
        return SamplingParams(max_new_tokens=max_tokens, temperature=temperature,
                              top_k=req.top_k if req.top_k and req.top_k > 0 else None,
                              top_p=None if top_p is None or top_p >= 1 else top_p, stop=stop,
                              seed=None if seed is None else seed % 2 ** 63, logprobs=logprobs,
                              stop_token_ids=list(stop_token_ids), presence_penalty=req.presence_penalty or 0.0,
                              frequency_penalty=req.frequency_penalty or 0.0)

    def n(self, n: int | None) -> int:
        n = 1 if n is None else n
        if not 1 <= n <= self.max_n:
            raise APIError(400, f"n={n} must be between 1 and {self.max_n}", param="n")
        return n

    # ------------------------------------------------------------ compute
    async def run(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` on the batcher's thread between two decode steps (model work that must not race it)."""
        return await asyncio.wrap_future(self.batcher.call(fn))

    async def decode(self, jobs: Sequence[tuple[list[int], SamplingParams]], stream: bool
                     ) -> AsyncIterator[tuple[int, Piece]]:
        """Submit every job to the batcher and yield ``(job index, Piece)`` as they come, interleaved;
        leaving early (a client that went away) cancels the jobs, which frees their batch slots."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Piece | BaseException]] = asyncio.Queue()

        def emitter(i: int) -> Callable[[Piece | BaseException], None]:
            def emit(item: Piece | BaseException) -> None:
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, (i, item))
                except RuntimeError:  # the event loop is gone: nobody is listening
                    pass
            return emit

        tickets = [self.batcher.submit(ids, params, emitter(i), stream) for i, (ids, params) in enumerate(jobs)]
        left = len(tickets)
        try:
            while left:
                i, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield i, item
                left -= item.completion is not None
        finally:
            for t in tickets:
                t.cancel()

    async def complete(self, jobs: Sequence[tuple[list[int], SamplingParams]], request: Request
                       ) -> list[Completion]:
        """Every job's Completion; gives up (cancelling the jobs) when the client disconnects."""
        out: list[Completion | None] = [None] * len(jobs)

        async def collect() -> None:
            async for i, piece in self.decode(jobs, stream=False):
                out[i] = piece.completion

        task = asyncio.ensure_future(collect())
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                raise APIError(499, "the client closed the request", code="client_closed_request")
        task.result()
        return [c for c in out if c is not None]

    @staticmethod
    def choices(prompts: list[list[int]], n: int, params: SamplingParams) -> list[tuple[list[int], SamplingParams]]:
        """n samples of each prompt; sample ``j`` uses ``seed + j``, streamed or not."""
        def seeded(j: int) -> SamplingParams:
            return replace(params, seed=None if params.seed is None else params.seed + j)
        return [(p, seeded(j)) for p in prompts for j in range(n)]

    @torch.inference_mode()
    def prompt_logprobs(self, ids: list[int],
                        k: int) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
        """Log-prob of every prompt token given those before it (the first: None), one forward pass."""
        idx = torch.tensor([ids], dtype=torch.long, device=self.engine.device)
        hidden = self.model.hidden_states(idx)[0, :-1]
        logprobs = torch.log_softmax(self.model.lm_head(hidden).float(), -1)
        target = torch.tensor(ids[1:], dtype=torch.long, device=logprobs.device)
        chosen = logprobs.gather(-1, target[:, None]).squeeze(-1).tolist()
        tops: list[list[tuple[int, float]] | None] = [None]
        if k:
            top = torch.topk(logprobs, k, dim=-1)
            tops += [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
        else:
            tops += [[] for _ in chosen]
        return [None, *chosen], tops

    # ----------------------------------------------------------- shaping
    def token_str(self, i: int) -> str:
        raw = self.tok.token_bytes(i)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def legacy_logprobs(self, ids: Sequence[int], lps: Sequence[float | None],
                        tops: Sequence[Sequence[tuple[int, float]] | None], start: int = 0) -> dict[str, Any]:
        """The completions API's logprobs; ``start``: characters of text before these tokens (streaming)."""
        text, offsets = b"", []
        for i in ids:
            offsets.append(start + len(text.decode("utf-8", errors="replace")))
            text += self.tok.token_bytes(i)
        top_dicts = [None if t is None else {self.token_str(j): v for j, v in t} for t in tops]
        return {"tokens": [self.token_str(i) for i in ids], "token_logprobs": list(lps),
                "top_logprobs": top_dicts, "text_offset": offsets}

    def chat_logprobs(self, ids: Sequence[int], lps: Sequence[float],
                      tops: Sequence[Sequence[tuple[int, float]]]) -> dict[str, Any]:
        def entry(i: int, lp: float) -> dict[str, Any]:
            return {"token": self.token_str(i), "logprob": lp, "bytes": list(self.tok.token_bytes(i))}
        tops = tops or [[] for _ in ids]
        return {"content": [{**entry(i, lp), "top_logprobs": [entry(j, v) for j, v in top]}
                            for i, lp, top in zip(ids, lps, tops)], "refusal": None}

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        """The response's usage; called once per response, so it also feeds /metrics."""
        self.metrics.prompt_tokens += prompt_tokens
        self.metrics.completion_tokens += completion_tokens
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    @staticmethod
    def generated(c: Completion) -> int:
        return len(c.token_ids) + (c.stop_token is not None)

    # ------------------------------------------------------- completions
    def prompts(self, prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str):
            return [self.encode(prompt)]
        if not prompt:
            raise APIError(400, "prompt must not be an empty list", param="prompt")
        if all(isinstance(p, str) for p in prompt):
            return [self.encode(p) for p in prompt]
        if all(isinstance(p, int) for p in prompt):
            return [self.check_ids(prompt, "prompt")]
        return [self.check_ids(p, "prompt") for p in prompt]

    async def completions(self, req: CompletionRequest, request: Request) -> Any:
        self.check_model(req.model)
        k = req.logprobs
        if k is not None and not 0 <= k <= MAX_LOGPROBS:
            raise APIError(400, f"logprobs={k} must be between 0 and {MAX_LOGPROBS}", param="logprobs")
        n = self.n(req.n)
        params = self.params(req, req.max_tokens, 16, k or 0)
        prompts = self.prompts(req.prompt)
        if len(prompts) * n > MAX_SEQUENCES:
            raise APIError(400, f"{len(prompts)} prompts x n={n} is more than the {MAX_SEQUENCES} sequences one "
                                "request may ask for: split it into several requests", param="prompt")
        for p in prompts:
            self.check_length(p, params.max_new_tokens, "prompt")
        jobs = self.choices(prompts, n, params)
        if req.stream:
            return self.stream_completions(req, jobs, k, sum(map(len, prompts)))
        comps = await self.complete(jobs, request)
        plps = []
        if req.echo and k is not None:
            plps = await self.run(lambda: [self.prompt_logprobs(p, k) for p in prompts])
        choices = []
        for i, c in enumerate(comps):
            p = prompts[i // n]
            text = (self.tok.decode(p) if req.echo else "") + (c.text or "")
            logprobs = None
            if k is not None:
                tops = c.top_logprobs or [[] for _ in c.token_ids]
                ids, lps, top = list(c.token_ids), list(c.logprobs), list(tops)
                if req.echo:
                    ids, lps, top = p + ids, plps[i // n][0] + lps, plps[i // n][1] + top
                logprobs = self.legacy_logprobs(ids, lps, top)
            choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason})
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "system_fingerprint": None, "choices": choices,
                "usage": self.usage(sum(map(len, prompts)), sum(map(self.generated, comps)))}

    def stream_completions(self, req: CompletionRequest, jobs: list[tuple[list[int], SamplingParams]],
                           k: int | None, prompt_tokens: int) -> StreamingResponse:
        echo = (lambda p: {"text": self.tok.decode(p)}) if req.echo else (lambda p: None)

        def logprobs(piece: Piece, shown: int) -> dict[str, Any] | None:
            if k is None:
                return None
            return self.legacy_logprobs(piece.token_ids, piece.logprobs,
                                        piece.top_logprobs or [[] for _ in piece.token_ids], start=shown)

        return self.stream(f"cmpl-{uuid.uuid4().hex}", "text_completion", {}, jobs, req, prompt_tokens,
                           opening=echo, piece=lambda text: {"text": text or ""}, logprobs=logprobs)

    def stream(self, rid: str, obj: str, extra: dict[str, Any], jobs: Sequence[tuple[list[int], SamplingParams]],
               req: _Request, prompt_tokens: int, *,
               opening: Callable[[list[int]], dict[str, Any] | None],
               piece: Callable[[str | None], dict[str, Any]],
               logprobs: Callable[[Piece, int], dict[str, Any] | None]) -> StreamingResponse:
        """SSE for completions and chat alike: choice ``i`` generates ``jobs[i]``, all choices in the batch at
        once, their chunks interleaved. ``opening`` gives a choice's first chunk (echo, the assistant role) or
        None; ``piece`` the fields of a text piece (None: the empty piece that carries the finish reason);
        ``logprobs`` a piece's log-probs (given the characters already sent) or None."""
        head = {"id": rid, "object": obj, "created": int(time.time()), "model": self.model_name, **extra}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(index: int, fields: dict[str, Any], finish: str | None, lps: dict[str, Any] | None = None) -> str:
            body = {**head, "choices": [{"index": index, **fields, "logprobs": lps, "finish_reason": finish}]}
            if include_usage:
                body["usage"] = None
            return _sse(body)

        async def events() -> AsyncIterator[str]:
            completion_tokens, shown = 0, [0] * len(jobs)
            try:
                for index, (ids, _) in enumerate(jobs):
                    first = opening(ids)
                    if first is not None:
                        yield chunk(index, first, None)
                async for index, p in self.decode(jobs, stream=True):
                    lps = logprobs(p, shown[index]) if p.token_ids else None
                    if p.text or lps is not None:
                        yield chunk(index, piece(p.text), None, lps)
                        shown[index] += len(p.text)
                    if p.completion is not None:
                        completion_tokens += self.generated(p.completion)
                        yield chunk(index, piece(None), p.completion.finish_reason)
                usage = self.usage(prompt_tokens, completion_tokens)
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": usage})
            except Exception as e:  # noqa: BLE001 - the status line is sent: report in the stream
                yield _sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    # -------------------------------------------------------------- chat
    def chat_ids(self, messages: list[ChatMessage]) -> list[int]:
        if not self.chat_ok:
            raise APIError(400, f"the model '{self.model_name}' has no chat format (it was not trained with "
                                "gptlab sft, ppo or dpo): use /v1/completions, or fine-tune it with gptlab sft",
                           param="messages", code="no_chat_format")
        if not messages:
            raise APIError(400, "messages must not be empty", param="messages")
        turns = []
        for i, m in enumerate(messages):
            role = "system" if m.role == "developer" else m.role
            if role not in ROLES:
                raise APIError(400, f"messages[{i}].role '{m.role}' is not one of 'system', 'developer', "
                                    "'user', 'assistant'", param=f"messages[{i}].role")
            content = m.content
            if isinstance(content, list):
                if any(part.type != "text" or part.text is None for part in content):
                    raise APIError(400, f"messages[{i}].content: only text parts are supported",
                                   param=f"messages[{i}].content")
                content = "".join(part.text or "" for part in content)
            turns.append(Message(role, content or ""))
        try:
            return render(turns, self.tok, add_generation_prompt=True)[0]
        except UserError as e:
            raise APIError(400, f"the messages cannot be tokenized: {e}", param="messages") from None

    async def chat(self, req: ChatRequest, request: Request) -> Any:
        self.check_model(req.model)
        k = req.top_logprobs
        if k is not None and not 0 <= k <= MAX_TOP_LOGPROBS:
            raise APIError(400, f"top_logprobs={k} must be between 0 and {MAX_TOP_LOGPROBS}", param="top_logprobs")
        if k and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        n = self.n(req.n)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        ids = self.chat_ids(req.messages)
        params = self.params(req, max_tokens, self.max_tokens_limit, k or 0, stop_ids(self.tok))
        self.check_length(ids, params.max_new_tokens, "messages")
        params.max_new_tokens = min(params.max_new_tokens, self.block - len(ids))
        jobs = self.choices([ids], n, params)
        if req.stream:
            return self.stream(
                f"chatcmpl-{uuid.uuid4().hex}", "chat.completion.chunk", {"system_fingerprint": None}, jobs, req,
                len(ids), opening=lambda _: {"delta": {"role": "assistant", "content": ""}},
                piece=lambda text: {"delta": {} if text is None else {"content": text}},
                logprobs=lambda p, _: self.chat_logprobs(p.token_ids, p.logprobs, p.top_logprobs)
                if req.logprobs else None)
        comps = await self.complete(jobs, request)
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text or "", "refusal": None},
                    "logprobs": self.chat_logprobs(c.token_ids, c.logprobs, c.top_logprobs) if req.logprobs else None,
                    "finish_reason": c.finish_reason}
                   for i, c in enumerate(comps)]
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name, "system_fingerprint": None, "choices": choices,
                "usage": self.usage(len(ids), sum(map(self.generated, comps)))}

    # --------------------------------------------------------- tokenizer
    def special_name(self, i: int | None) -> str | None:
        return next((name for name, j in self.tok.special_tokens.items() if j == i), None)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if loc and loc[0] == "prompt" and len(errors) > 1 and all(e.get("loc", ())[1:2] == ("prompt",) for e in errors):
        return ("prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids",
                "prompt")
    where = ".".join(loc) or "body"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg', 'invalid value')}{more}", (loc[0] if loc else None)


STREAMED: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {"schema": {  # each event: data is a JSON chunk, or [DONE]
        "type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}}},
          "description": "JSON, or with stream=true Server-Sent Events ending in data: [DONE]"}}
ERRORS = {"400": "invalid request", "401": "missing or wrong API key", "404": "unknown model or route",
          "413": "body too large", "429": "queue full", "503": "model loading"}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema with the errors this server really answers (OpenAI's shape) instead of its 422."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        error = {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["message", "type", "param", "code"],
            "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                           "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
        schema.setdefault("components", {}).setdefault("schemas", {})["Error"] = error
        for item in schema["paths"].values():
            for operation in item.values():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                for status, text in ERRORS.items():
                    responses.setdefault(status, {"description": text, "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(model: Any = None, tokenizer: Any = None, config: dict[str, Any] | None = None, *, model_name: str,
               load: Callable[[], tuple[Any, Any, dict[str, Any]]] | None = None, api_key: str | None = None,
               max_body_bytes: int = 1_000_000, max_tokens_limit: int | None = None, max_n: int = 8,
               max_queue: int = 64, max_batch: int = 16, data_dir: str | Path | None = None) -> FastAPI:
    """The FastAPI app serving a model under ``model_name``.

    Give the model (``model, tokenizer, config``), or ``load`` returning them:
    then the app starts answering at once and loads in a thread, with 503 on
    every route (``/health`` included) until the model is there. Requests are
    decoded together by a ``Batcher`` of up to ``max_batch`` sequences.
    ``api_key`` set: every route but ``/health`` needs ``Authorization: Bearer
    KEY``. ``max_tokens_limit`` defaults to the model's context length; more than
    ``max_queue`` generation requests running or waiting get 429. ``data_dir``
    receives what the web pages collect (feedback.jsonl, rankings.jsonl); None
    disables those writes.
    """
    if (model is None) == (load is None):
        raise UserError("create_app: give either the model (model, tokenizer, config) or load, not both")
    if max_queue < 1:
        raise UserError(f"max_queue={max_queue} must be >= 1")
    server = _Server(model_name=model_name, max_tokens_limit=max_tokens_limit, max_n=max_n, max_batch=max_batch,
                     data_dir=Path(data_dir) if data_dir is not None else None)
    if model is not None:
        server.attach(model, tokenizer, config or {})

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if load is not None:
            threading.Thread(target=server.load, args=(load,), name="gptlab-load", daemon=True).start()
        yield
        if server.batcher is not None:
            server.batcher.close()

    app = FastAPI(title="gptlab", description="OpenAI-compatible API for a gptlab model", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request: Any, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(UserError)
    async def _user_error(request: Any, exc: UserError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Any, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _error(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Any, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"unknown route: {request.method} {request.url.path}"
        else:
            message = str(exc.detail)
        return _error(exc.status_code, message, code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _bug(request: Any, exc: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}  # while loading (or after a failed load) the middleware answers 503

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(server.metrics.text(), media_type="text/plain; version=0.0.4")

    def model_card() -> dict[str, Any]:
        return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "gptlab",
                "max_model_len": server.block}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str) -> dict[str, Any]:
        server.check_model(name)
        return model_card()

    @app.post("/v1/completions", responses=STREAMED)
    async def completions(req: CompletionRequest, request: Request) -> Any:
        return await server.completions(req, request)

    @app.post("/v1/chat/completions", responses=STREAMED)
    async def chat_completions(req: ChatRequest, request: Request) -> Any:
        return await server.chat(req, request)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        ids = server.encode(req.prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": server.block}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict[str, Any]:
        return {"prompt": server.tok.decode(server.check_ids(req.tokens, "tokens"))}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        return {"eos_token": server.special_name(server.tok.eos_id), "eos_token_id": server.tok.eos_id,
                "pad_token": server.special_name(server.tok.pad_id), "pad_token_id": server.tok.pad_id,
                "vocab_size": server.tok.vocab_size, "chat_format": server.config.get("chat_format"),
                "max_model_len": server.block}

    add_web_routes(app, server)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes, server=server, max_queue=max_queue)
    return app
