"""Progress and stop requests: stages report, the CLI decides how (or whether) to show it.

`report()` is also where long work notices a stop request. The CLI calls `request_stop()` on
Ctrl-C or SIGTERM, and the flow calls it when such an interrupt reaches it while replay chunks
run in worker threads; the next `report()` in any thread then raises `Stopped`, so a chunk ends
at its next finished turn instead of replaying to its end while the process waits for it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_reporter: Callable[[str, int, int | None], None] | None = None
_stop = threading.Event()


class Stopped(KeyboardInterrupt):
    """Raised by `report()` once a stop was requested.

    A KeyboardInterrupt, so that nothing written to survive ordinary errors (a task retry, a
    turn's own error handling) swallows it.
    """


def set_reporter(fn: Callable[[str, int, int | None], None] | None) -> None:
    """Show progress with `fn(stage, done, total)`; None hides it."""
    global _reporter
    _reporter = fn


def request_stop() -> None:
    """Ask every stage to stop at its next progress report (thread-safe, idempotent)."""
    _stop.set()


def stop_requested() -> bool:
    return _stop.is_set()


def clear_stop() -> None:
    """Forget a stop request (a new run in the same process)."""
    _stop.clear()


@contextmanager
def stop_on_interrupt() -> Iterator[None]:
    """Request a stop when an interrupt passes through (KeyboardInterrupt, or Prefect's
    TerminationSignal for SIGTERM): work in other threads then ends at its next report."""
    try:
        yield
    except BaseException as exc:
        if not isinstance(exc, Exception):
            request_stop()
        raise


def report(stage: str, done: int, total: int | None = None) -> None:
    """Report progress of `stage`.

    Raises:
        Stopped: a stop was requested.
    """
    if _stop.is_set():
        raise Stopped(f"stopped during {stage}")
    if _reporter is not None:
        _reporter(stage, done, total)
