"""``Guard``, the pure-ASGI middleware in front of every route: it counts requests for /metrics and answers, before
any route reads the body, 503 while the model loads, 401 for a missing or wrong API key, 413 for a body over the
limit, 429 when the generation queue is full, and 400 for text that is not valid Unicode."""

from __future__ import annotations

import hmac
import time

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..jsonsafe import BadJSON, parse_json
from .protocol import error_response
from .state import ServeState
from .web import PAGES

__all__ = ["Guard", "host_of"]

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
COUNTED_PATHS = (*GENERATION_PATHS, "/health", "/metrics", "/tokenize", "/detokenize", "/tokenizer_info", "/v1/models")


def _public(scope: Scope) -> bool:
    """The web pages and their static files: not secret, so a browser can load them without the key (the
    page then asks for it) and while the model loads (the page shows the 503 of the API it calls)."""
    path = scope.get("path", "")
    return scope.get("method") in ("GET", "HEAD") and (path in PAGES or path.startswith("/static/"))


def host_of(header: bytes) -> str:
    """The name in a ``Host`` header, without its port (``[::1]:8000`` -> ``::1``)."""
    host = header.decode("latin-1").strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Guard:
    """``allowed_hosts`` (None: any) are the names a ``Host`` header may carry: a server bound to this machine
    answers only to its own names, so a web page on another site cannot reach it by DNS rebinding."""

    def __init__(self, app: ASGIApp, *, state: ServeState, api_key: str | None, max_body_bytes: int,
                 max_queue: int, allowed_hosts: frozenset[str] | None = None):
        self.app, self.state, self.api_key = app, state, api_key
        self.max_body, self.max_queue, self.allowed_hosts = max_body_bytes, max_queue, allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        path = scope.get("path", "")
        generating = path in GENERATION_PATHS and scope.get("method") == "POST"
        m = self.state.metrics
        if generating:
            m.in_flight += 1
        try:
            if self.state.handler is None and path != "/metrics" and not _public(scope):
                await self._unavailable(path)(scope, receive, observed_send)
            elif generating and m.in_flight > self.max_queue:
                m.rejected += 1
                await error_response(429, f"server busy: {m.in_flight - 1} requests are running or queued "
                                          f"(--max-queue {self.max_queue}); retry later", type="rate_limit_error",
                                     code="queue_full")(scope, receive, observed_send)
            else:
                await self._checked(scope, receive, observed_send)
        finally:
            if generating:
                m.in_flight -= 1
            key = (path if path in COUNTED_PATHS else "other", status)
            m.requests[key] = m.requests.get(key, 0) + 1
            m.seconds_sum += time.perf_counter() - started
            m.seconds_count += 1

    def _unavailable(self, path: str) -> JSONResponse:
        error = self.state.load_error
        if path == "/health":
            return JSONResponse({"status": "error", "error": error} if error else {"status": "loading"},
                                status_code=503)
        message = (f"the model failed to load: {error}" if error
                   else "the model is still loading: retry when GET /health answers 200")
        return error_response(503, message, type="service_unavailable",
                              code="model_load_failed" if error else "model_loading")

    async def _checked(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers") or [])
        if self.allowed_hosts is not None and host_of(headers.get(b"host", b"")) not in self.allowed_hosts:
            host = headers.get(b"host", b"").decode("latin-1")
            await error_response(400, f"Host header {host!r} is not a name of this server: open it at one of "
                                      f"{', '.join(sorted(self.allowed_hosts))}, or start gptlab serve with "
                                      f"--allow-host {host_of(headers.get(b'host', b'')) or 'NAME'}",
                                 code="host_not_allowed")(scope, receive, send)
            return
        if self.api_key is not None and scope.get("path") != "/health" and not _public(scope):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + self.api_key.encode()):
                what = "missing" if not given else "incorrect"
                await error_response(401, f"{what} API key: send the header 'Authorization: Bearer KEY' with the "
                                          f"key the server was started with (--api-key)", code="invalid_api_key")(
                    scope, receive, send)
                return
        too_big = error_response(413, f"request body larger than {self.max_body} bytes (--max-body-bytes)",
                                 code="request_too_large")
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                await error_response(400, "invalid Content-Length header")(scope, receive, send)
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
        try:  # once here, before any route sees the text, rather than in every tokenizer and JSONL writer
            parse_json(bytes(body))
        except BadJSON as e:
            if not e.syntax:  # syntax errors: the route answers them, naming what it expected
                param = e.field.removeprefix("field ").split(".")[0].split("[")[0] if e.field else None
                await error_response(400, f"{e}: send JSON text that encodes as UTF-8", param=param)(
                    scope, receive, send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
