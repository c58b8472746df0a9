"""User-facing errors: one clear line naming the problem and the fix.

The CLI prints these without a traceback and exits with code 2; anything else
is a bug and keeps its traceback.
"""


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
