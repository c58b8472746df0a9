"""User-facing errors: one clear line naming the problem and the fix.

The CLI prints these without a traceback and exits with code 2; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (library errors can run to pages), or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class UserError(Exception):
    """A problem the user can fix (bad input, bad flag, missing file)."""

    exit_code = 2


class ConfigError(UserError):
    """A configuration field is unknown, mistyped or contradicts another."""


class TokenizerError(UserError):
    """A tokenizer spec, vocabulary file or special token is unusable."""


class CheckpointError(UserError):
    """A run directory or checkpoint is missing, truncated or incompatible."""


class DataError(UserError):
    """An input or data directory is empty, malformed or incompatible.

    ``field`` names the row's field at fault when there is one (the web pages answer it as ``param``).
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class TrainingDiverged(UserError):
    """The loss, gradient norm or a stage's own measure became NaN/inf or too large; the last good checkpoint is kept."""


@contextlib.contextmanager
def naming(where: str) -> Iterator[None]:
    """Re-raise a ``TokenizerError`` from inside as a ``DataError`` that names ``where`` (a file's line)."""
    try:
        yield
    except TokenizerError as exc:
        raise DataError(f"{where}: {exc}") from None
