"""The web pages served beside the API: ``/`` (chat), ``/explore`` (next-token explorer), ``/rank`` (labeler)."""

from __future__ import annotations

from typing import Any


def add_web_routes(app: Any, server: Any) -> None:
    """Register the pages and their JSON endpoints on ``app``."""
