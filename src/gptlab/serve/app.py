"""``create_app(model, tokenizer, config, model_name=...)`` -> the FastAPI app of the OpenAI-compatible API.

Routes: ``GET /health``, ``GET /metrics`` (Prometheus text: requests, latency, tokens, queue depth), ``GET /v1/models``,
``POST /v1/completions``, ``POST /v1/chat/completions``, ``POST /tokenize``, ``POST /detokenize``,
``GET /tokenizer_info`` (the lm-evaluation-harness probes), and the web pages (web.py). Each route fetches the
``OpenAIHandler`` (openai.py) from the app's ``ServeState`` and answers what it returns as JSON or as a stream.

Errors always come in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``:
400 for bad input (validation, malformed JSON, prompts beyond the context), 401 for a
missing or wrong API key, 404 for an unknown model or route, 413 for a body over
``max_body_bytes``, 429 when more than ``max_queue`` generation requests are running
or waiting, 503 while the model loads (the last four from the middleware, middleware.py).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import UserError
from ..model import GPT
from ..tokenizer import Tokenizer
from ..vision import VisionEncoder
from .middleware import Guard
from .openai import Answer, OpenAIHandler
from .protocol import (ERROR_SCHEMA, ERRORS, STREAMED, APIError, ChatRequest, CompletionRequest, DetokenizeRequest,
                       TokenizeRequest, error_response)
from .state import ServeState
from .web import WebData, add_web_routes

__all__ = ["create_app", "Loader"]

# runs.load_run's (model, tokenizer, config), or vision.load_vision_run's (..., the vision encoder or None)
Loader = Callable[[], tuple[GPT, Tokenizer | None, dict[str, Any]]
                  | tuple[GPT, Tokenizer | None, dict[str, Any], VisionEncoder | None]]


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


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema with the errors this server really answers (OpenAI's shape) instead of its 422."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schema.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
        for item in schema["paths"].values():
            for operation in item.values():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                for status, text in ERRORS.items():
                    responses.setdefault(status, {"description": text, "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
        app.openapi_schema = schema
    return app.openapi_schema


def _respond(answer: Answer) -> dict[str, Any] | StreamingResponse:
    return answer if isinstance(answer, dict) else StreamingResponse(answer, media_type="text/event-stream")


def create_app(model: GPT | None = None, tokenizer: Tokenizer | None = None, config: dict[str, Any] | None = None,
               *, model_name: str, load: Loader | None = None, api_key: str | None = None,
               max_body_bytes: int = 1_000_000, max_tokens_limit: int | None = None, max_n: int = 8,
               max_queue: int = 64, max_batch: int = 16, data: WebData = WebData(),
               allowed_hosts: Iterable[str] | None = None, vision: VisionEncoder | None = None) -> FastAPI:
    """The FastAPI app serving a model under ``model_name``; its ``ServeState`` is ``app.state.serve``.

    Give the model (``model, tokenizer, config``, and the ``vision`` encoder of an image-input model), or
    ``load`` returning them:
    then the app starts answering at once and loads in a thread, with 503 on
    every route (``/health`` included) until the model is there. Requests are
    decoded together by a ``Batcher`` of up to ``max_batch`` sequences.
    ``api_key`` set: every route but ``/health`` needs ``Authorization: Bearer
    KEY``. ``max_tokens_limit`` defaults to the model's context length; more than
    ``max_queue`` generation requests running or waiting get 429. ``data`` says
    where and how much the web pages keep of what they collect (feedback.jsonl,
    rankings.jsonl; nothing by default). ``allowed_hosts`` (None: any) are the names
    a request's ``Host`` header may carry.
    """
    if (model is None) == (load is None):
        raise UserError("create_app: give either the model (model, tokenizer, config) or load, not both")
    if max_queue < 1:
        raise UserError(f"max_queue={max_queue} must be >= 1")
    state = ServeState()

    def open_handler(model: GPT, tokenizer: Tokenizer | None, config: dict[str, Any],
                     vision: VisionEncoder | None = None) -> OpenAIHandler:
        return OpenAIHandler(model, tokenizer, config, model_name=model_name, max_tokens_limit=max_tokens_limit,
                             max_n=max_n, max_batch=max_batch, metrics=state.metrics, vision=vision)

    if model is not None:
        state.attach(open_handler(model, tokenizer, config or {}, vision))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if load is not None:
            threading.Thread(target=state.load, args=(lambda: open_handler(*load()),), name="gptlab-load",
                             daemon=True).start()
        yield
        if state.handler is not None:
            state.handler.close()

    app = FastAPI(title="gptlab", description="OpenAI-compatible API for a gptlab model", lifespan=lifespan)
    app.state.serve = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError) -> JSONResponse:
        return error_response(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"unknown route: {request.method} {request.url.path}"
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message, code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}  # while loading (or after a failed load) the middleware answers 503

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        batcher = state.handler.batcher if state.handler is not None else None
        return PlainTextResponse(state.metrics.text(batcher), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return state.api.models()

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str) -> dict[str, Any]:
        return state.api.model(name)

    # The two generation routes keep ``-> Any``: FastAPI documents the return annotation as the 200's JSON
    # schema, and the body's shape depends on the request (JSON, or the stream STREAMED documents).
    @app.post("/v1/completions", responses=STREAMED)
    async def completions(req: CompletionRequest, request: Request) -> Any:
        return _respond(await state.api.completions(req, request.is_disconnected))

    @app.post("/v1/chat/completions", responses=STREAMED)
    async def chat_completions(req: ChatRequest, request: Request) -> Any:
        return _respond(await state.api.chat(req, request.is_disconnected))

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        return state.api.tokenize(req)

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict[str, Any]:
        return state.api.detokenize(req)

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        return state.api.tokenizer_info()

    add_web_routes(app, state, data)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    app.add_middleware(Guard, state=state, api_key=api_key, max_body_bytes=max_body_bytes, max_queue=max_queue,
                       allowed_hosts=None if allowed_hosts is None else frozenset(h.lower() for h in allowed_hosts))
    return app
