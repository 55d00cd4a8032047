"""The base class of every "this input cannot be used" error (images, catalogs, ...)."""

from __future__ import annotations


class InputError(ValueError):
    """An input file that cannot be used, and why: ``str(err) == f"{path}: {reason}"``.

    ``path`` names the file and ``reason`` the problem in one line, so the sensor, the CLI and the
    ``images.reason`` column can report it without a stack trace. A ValueError, so callers that
    treat bad values alike keep working.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self):  # pickling (multiprocessing, Dagster) keeps path and reason
        return (type(self), (self.path, self.reason))
