"""A tiny progress hook: stages report, the CLI decides how (or whether) to show it."""

from __future__ import annotations

from collections.abc import Callable

_reporter: Callable[[str, int, int | None], None] | None = None


def set_reporter(fn: Callable[[str, int, int | None], None] | None) -> None:
    global _reporter
    _reporter = fn


def report(stage: str, done: int, total: int | None = None) -> None:
    if _reporter is not None:
        _reporter(stage, done, total)
