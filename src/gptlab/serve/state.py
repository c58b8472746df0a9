"""``ServeState``: what the app knows about its model between requests: the handler once it has loaded, the
load error, and the metrics. The middleware, the routes and the start-up announcement all read it."""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..errors import UserError
from .metrics import Metrics
from .openai import OpenAIHandler

__all__ = ["ServeState"]


class ServeState:
    def __init__(self) -> None:
        self.metrics = Metrics()
        self.handler: OpenAIHandler | None = None  # None while the model loads, or after it failed to
        self.load_error: str | None = None
        self.ready = threading.Event()  # set once the handler is there, or loading failed

    def attach(self, handler: OpenAIHandler) -> None:
        self.handler = handler
        self.ready.set()

    def load(self, build: Callable[[], OpenAIHandler]) -> None:
        """Attach what ``build()`` returns; a failure is kept in ``load_error`` (and /health reports it)."""
        try:
            self.attach(build())
        except Exception as e:  # noqa: BLE001 - reported by /health and by `gptlab serve`
            self.load_error = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            self.ready.set()

    @property
    def api(self) -> OpenAIHandler:
        """The handler, for routes: the middleware answers 503 until it is there, so they never see None."""
        if self.handler is None:
            raise RuntimeError("the model is not loaded")
        return self.handler
