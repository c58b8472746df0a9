"""An OpenAI-compatible HTTP API for gptlab models (``gptlab serve``): ``create_app`` builds it (app.py),
``run_server`` runs it under uvicorn (run.py)."""

from .app import create_app
from .run import run_server

__all__ = ["create_app", "run_server"]
