"""The one exception type users see: a one-line message saying which file, what, and what to do."""

from __future__ import annotations

from pathlib import Path


class LiversegError(Exception):
    """An error caused by the user's input or setup, shown as one line without a traceback.

    The message should name the file (if any), say what is wrong and what to do about it.
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = str(path) if path is not None else None
        text = f"{self.path}: {message}" if self.path else message
        super().__init__(" ".join(text.split()))  # always one line
