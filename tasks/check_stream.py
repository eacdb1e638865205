"""The standalone contract check, streamed: `depsim check` on logs of any size.

Lines are read in batches and each is parsed once (tasks.check.loads) and checked by the same
row rules as the flow's check (tasks.check.check_row), in worker processes when the input is
large; the parent keeps input order, conversation-id uniqueness, the quarantine, and only the
valid rows' projection (ids, model, time, strata, message counts: no conversation text), which
is what Great Expectations validates. Memory grows with that projection, not with the logs.

The result is the flow's check of the same input, row for row (tested), except that
`CheckResult.valid` holds the projection columns only.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tasks.check import CheckResult, ContractCheck, check_row
from tasks.load import line_row, load_raw, local_lines, resolve_sources

BATCH_LINES = 2000
POOL_MIN_BYTES = 64 * 1024 * 1024  # below this, worker start-up (~1 s each) costs more than it saves

# (source_file, line, kind, payload): kind "line" carries the raw bytes of a JSONL line, kind
# "raw" a (record, parse_error, excerpt) row of tasks.load (Parquet, s3://).
Item = tuple[str, int, str, Any]
Outcome = tuple[dict[str, Any] | None, dict[str, Any] | None, list[dict[str, Any]]]

_contract: dict[str, Any] = {}


def _init(contract: dict[str, Any]) -> None:
    global _contract
    _contract = contract


def check_batch(items: list[Item], contract: dict[str, Any] | None = None) -> tuple[list[Outcome], Counter[str]]:
    """Check a batch of lines or raw rows (in a worker process, or inline)."""
    contract = contract or _contract
    normalised: Counter[str] = Counter()
    out: list[Outcome] = []
    for source, line_no, kind, payload in items:
        if kind == "line":
            record, error, excerpt, parsed = line_row(payload)
            typed, rejected, flags = check_row(source, line_no, record, error, excerpt, contract, normalised,
                                               keep_text=False, parsed=parsed)
        else:
            record, error, excerpt = payload
            typed, rejected, flags = check_row(source, line_no, record, error, excerpt, contract, normalised,
                                               keep_text=False)
        if typed is not None and record is not None:
            typed["_record"] = record[:2000]  # for the quarantine row should the id be a duplicate
        out.append((typed, rejected, flags))
    return out, normalised


def _items(sources: list[str]) -> Iterator[Item]:
    for source in sources:
        if source.startswith("s3://") or source.endswith(".parquet"):
            raw = load_raw(source)  # one file at a time
            for f, line, record, error, excerpt in raw.iter_rows():
                yield f, line, "raw", (record, error, excerpt)
        else:
            yield from ((source, n, "line", line) for n, line in local_lines(source))


def _batches(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _input_bytes(sources: list[str]) -> int:
    total = 0
    for source in sources:
        if not source.startswith("s3://"):
            with contextlib.suppress(OSError):
                total += Path(source).stat().st_size * (6 if source.endswith(".gz") else 1)
    return total


def stream_check(data: str | None, contract: dict[str, Any], warn_share: float, fail_share: float,
                 workers: int | None = None, batch_lines: int = BATCH_LINES,
                 progress: Callable[[int], None] | None = None) -> CheckResult:
    """Check every line of the sources against the contract without holding the logs in memory.

    workers: processes that parse and check (None: every core when the input is large, else
    inline). Raises InputError for a missing, binary or empty file, as `depsim check` always did.
    """
    sources = resolve_sources(data)
    if workers is None:
        workers = (os.cpu_count() or 1) if _input_bytes(sources) >= POOL_MIN_BYTES else 1
    check = ContractCheck(contract, warn_share, fail_share, keep_text=False)

    def merge(result: tuple[list[Outcome], Counter[str]]) -> None:
        outcomes, normalised = result
        check.normalised.update(normalised)
        for typed, rejected, flags in outcomes:
            check.add(typed, rejected, flags)
        if progress is not None:
            progress(check.rows_in)

    batches = _batches(_items(sources), batch_lines)
    if workers <= 1:
        for batch in batches:
            merge(check_batch(batch, contract))
        return check.finish()
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init, initargs=(contract,))
    pending: deque[Future[tuple[list[Outcome], Counter[str]]]] = deque()
    try:
        for batch in batches:
            pending.append(pool.submit(check_batch, batch))
            while len(pending) > 2 * workers:  # a bounded number of batches in flight: bounded memory
                merge(pending.popleft().result())
        while pending:
            merge(pending.popleft().result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return check.finish()
