"""Load conversation logs (JSONL or Parquet; files, folders, globs; local or s3://).

Every physical line (JSONL) or row (Parquet) becomes one raw row, remembered with its file and
line number, so that the contract check can name them and nothing is dropped silently.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import json
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import polars as pl

from tasks.records import RAW_SCHEMA


class InputError(ValueError):
    """Input the user can fix (missing file, unreadable format); printed without a traceback."""


BUNDLED = "synthetic-prod-logs.jsonl.gz"


def bundled_path() -> str:
    """The SYNTHETIC production logs shipped with depsim."""
    return str(resources.files("conf").joinpath("data", BUNDLED))


def resolve_sources(data: str | None) -> list[str]:
    """Expand a path, folder or glob (local), or an s3:// URI, into a sorted list of files."""
    if data is None:
        return [bundled_path()]
    if data.startswith("s3://"):
        from tasks.store import s3_list

        files = s3_list(data)
        if not files:
            raise InputError(f"{data}: no .jsonl/.parquet objects found")
        return files
    path = Path(data)
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if _supported(p.name))
    elif any(ch in data for ch in "*?["):
        files = sorted(p for p in glob.glob(data, recursive=True) if _supported(p))
    elif path.is_file():
        files = [str(path)]
    else:
        raise InputError(f"{data}: no such file or folder")
    if not files:
        raise InputError(f"{data}: no .jsonl/.jsonl.gz/.parquet files found")
    return files


def _supported(name: str) -> bool:
    return name.endswith((".jsonl", ".jsonl.gz", ".ndjson", ".json", ".parquet"))


def _read_bytes(source: str) -> bytes:
    if source.startswith("s3://"):
        from tasks.store import s3_read_bytes

        return s3_read_bytes(source)
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise InputError(f"{source}: cannot read: {exc.strerror or exc}") from exc


def _looks_binary(head: bytes) -> bool:
    """NUL bytes, or a first line that is not UTF-8 text."""
    if b"\x00" in head:
        return True
    first = head.split(b"\n", 1)[0]
    try:
        first.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start < len(first) - 3  # a character cut by the 4 KiB window is not evidence
    return False


def line_row(line: bytes) -> tuple[str | None, str | None, str | None, Any]:
    """One JSONL line as the loader reads it: (record text, parse error, excerpt, parsed object);
    the record is None and the error says why when the line is not a JSON object."""
    from tasks.check import loads

    raw = line[:-1] if line.endswith(b"\n") else line
    if not raw.strip():
        return None, "empty line", raw[:500].decode("utf-8", "replace"), None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"invalid UTF-8 at byte {exc.start}", raw[:500].decode("utf-8", "replace"), None
    try:
        obj = loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, or e.g. a 5,000-digit integer
        return (None, f"invalid JSON: {getattr(exc, 'msg', exc)} at column {getattr(exc, 'colno', '?')}",
                raw[:500].decode("utf-8", "replace"), None)
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}", raw[:500].decode("utf-8", "replace"), None
    return text, None, None, obj


class _Columns:
    """Raw-table columns built row by row (cheaper than a list of dicts)."""

    def __init__(self) -> None:
        self.source_file: list[str] = []
        self.source_line: list[int] = []
        self.record: list[str | None] = []
        self.parse_error: list[str | None] = []
        self.excerpt: list[str | None] = []

    def add(self, source: str, line: int, raw: bytes) -> None:
        record, error, excerpt, _ = line_row(raw)
        self.source_file.append(source)
        self.source_line.append(line)
        self.record.append(record)
        self.parse_error.append(error)
        self.excerpt.append(excerpt)

    def frame(self) -> pl.DataFrame:
        return pl.DataFrame({"source_file": self.source_file, "source_line": self.source_line,
                             "record": self.record, "parse_error": self.parse_error, "excerpt": self.excerpt},
                            schema=RAW_SCHEMA)


def checked_lines(source: str, head: bytes, lines: Iterator[bytes]) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of a JSONL file; InputError when its start is binary, or, once read,
    when it held nothing but blank lines."""
    if not head.lstrip().startswith((b"{", b"[", b"\n")) and _looks_binary(head):
        raise InputError(f"{source}: not a JSONL file (binary content)")
    content = False
    for lineno, line in enumerate(lines, start=1):
        content = content or bool(line.strip())
        yield lineno, line
    if not content:
        raise InputError(f"{source}: file is empty")


def local_lines(source: str) -> Iterator[tuple[int, bytes]]:
    """checked_lines() of a local JSONL(.gz) file, streamed: memory does not grow with the file."""
    opener: Any = gzip.open if source.endswith(".gz") else open
    try:
        with opener(source, "rb") as fh:
            head = fh.read(4096)
            fh.seek(0)
            yield from checked_lines(source, head, fh)
    except InputError:
        raise
    except OSError as exc:
        kind = "not a gzip file" if source.endswith(".gz") else "cannot read"
        raise InputError(f"{source}: {kind}: {exc}") from exc


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _parquet_rows(source: str, data: bytes) -> list[dict[str, Any]]:
    import io

    try:
        frame = pl.read_parquet(io.BytesIO(data))
    except Exception as exc:
        raise InputError(f"{source}: not a readable Parquet file: {exc}") from exc
    if frame.height == 0:
        raise InputError(f"{source}: file is empty")
    return parquet_records(source, frame, range(1, frame.height + 1))


def parquet_records(source: str, frame: pl.DataFrame, lines: Iterable[int]) -> list[dict[str, Any]]:
    """Raw rows (RAW_SCHEMA) of Parquet rows: each row as the JSON record the contract checks,
    `source_line` its 1-based row number in the file."""
    rows = []
    for i, rec in zip(lines, frame.iter_rows(named=True), strict=True):
        for key in ("tools", "messages", "labels"):
            value = rec.get(key)
            if isinstance(value, str):  # nested fields stored as JSON text
                with contextlib.suppress(json.JSONDecodeError):
                    rec[key] = json.loads(value)
        if isinstance(rec.get("messages"), list):  # nested Parquet: a null struct field is an absent key
            rec["messages"] = [_drop_nulls(m) for m in rec["messages"]]
        if isinstance(rec.get("labels"), dict):    # the same for a labels struct (one field per category)
            rec["labels"] = _drop_nulls(rec["labels"])
        if isinstance(rec.get("created_at"), datetime):
            rec["created_at"] = rec["created_at"].astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        rows.append({"source_file": source, "source_line": int(i),
                     "record": json.dumps(rec, default=str, ensure_ascii=False), "parse_error": None,
                     "excerpt": None})
    return rows


def load_raw(data: str | None) -> pl.DataFrame:
    """Read every line/row of the sources into the raw table (RAW_SCHEMA)."""
    cols = _Columns()
    frames: list[pl.DataFrame] = []
    for source in resolve_sources(data):
        if source.endswith(".parquet"):
            if cols.record:  # rows stay in file order
                frames.append(cols.frame())
                cols = _Columns()
            frames.append(pl.DataFrame(_parquet_rows(source, _read_bytes(source)), schema=RAW_SCHEMA))
        elif source.startswith("s3://"):
            blob = _read_bytes(source)
            if source.endswith(".gz"):
                try:
                    blob = gzip.decompress(blob)
                except OSError as exc:
                    raise InputError(f"{source}: not a gzip file: {exc}") from exc
            lines = blob.split(b"\n")
            if lines and lines[-1] == b"":
                lines.pop()
            for lineno, line in checked_lines(source, blob[:4096], iter(lines)):
                cols.add(source, lineno, line)
        else:
            for lineno, line in local_lines(source):
                cols.add(source, lineno, line)
    frames.append(cols.frame())
    return pl.concat(frames) if len(frames) > 1 else frames[0]


def dataset_hash(raw: pl.DataFrame) -> str:
    """Content hash of the loaded data (order-sensitive), for MLflow params and caching."""
    h = hashlib.sha256()
    for rec, err in zip(raw["record"].to_list(), raw["parse_error"].to_list(), strict=True):
        h.update((rec or f"!{err}").encode("utf-8", "replace"))
        h.update(b"\n")
    return h.hexdigest()[:16]
