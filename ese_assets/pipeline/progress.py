"""Progress callbacks: long units of work report one line at a time (CLI: print; Dagster: log)."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str], None]


def silent(_: str) -> None:
    """The default callback: report nothing."""
    return None
