"""An OpenAI-compatible HTTP API for gptlab models (``gptlab serve``); see ``app.create_app``."""

from .app import create_app

__all__ = ["create_app"]
