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


def _jsonl_rows(source: str, data: bytes) -> list[dict[str, Any]]:
    if source.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except OSError as exc:
            raise InputError(f"{source}: not a gzip file: {exc}") from exc
    if not data.lstrip().startswith((b"{", b"[", b"\n")) and _looks_binary(data[:4096]):
        raise InputError(f"{source}: not a JSONL file (binary content)")
    rows: list[dict[str, Any]] = []
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for lineno, raw in enumerate(lines, start=1):
        excerpt = raw[:500].decode("utf-8", "replace")
        if not raw.strip():
            rows.append({"source_file": source, "source_line": lineno, "record": None,
                         "parse_error": "empty line", "excerpt": excerpt})
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            rows.append({"source_file": source, "source_line": lineno, "record": None,
                         "parse_error": f"invalid UTF-8 at byte {exc.start}", "excerpt": excerpt})
            continue
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, or e.g. a 5,000-digit integer
            rows.append({"source_file": source, "source_line": lineno, "record": None,
                         "parse_error": f"invalid JSON: {getattr(exc, 'msg', exc)} at column {getattr(exc, 'colno', '?')}",
                         "excerpt": excerpt})
            continue
        if not isinstance(obj, dict):
            rows.append({"source_file": source, "source_line": lineno, "record": None,
                         "parse_error": f"expected a JSON object, got {type(obj).__name__}", "excerpt": excerpt})
            continue
        rows.append({"source_file": source, "source_line": lineno, "record": text, "parse_error": None,
                     "excerpt": None})
    if not rows:
        raise InputError(f"{source}: file is empty")
    return rows


def _parquet_rows(source: str, data: bytes) -> list[dict[str, Any]]:
    import io

    try:
        frame = pl.read_parquet(io.BytesIO(data))
    except Exception as exc:
        raise InputError(f"{source}: not a readable Parquet file: {exc}") from exc
    if frame.height == 0:
        raise InputError(f"{source}: file is empty")
    rows = []
    for i, rec in enumerate(frame.iter_rows(named=True), start=1):
        for key in ("tools", "messages", "labels"):
            value = rec.get(key)
            if isinstance(value, str):  # nested fields stored as JSON text
                with contextlib.suppress(json.JSONDecodeError):
                    rec[key] = json.loads(value)
        rows.append({"source_file": source, "source_line": i,
                     "record": json.dumps(rec, default=str, ensure_ascii=False), "parse_error": None,
                     "excerpt": None})
    return rows


def load_raw(data: str | None) -> pl.DataFrame:
    """Read every line/row of the sources into the raw table (RAW_SCHEMA)."""
    rows: list[dict[str, Any]] = []
    for source in resolve_sources(data):
        blob = _read_bytes(source)
        if source.endswith(".parquet"):
            rows.extend(_parquet_rows(source, blob))
        else:
            if not blob.strip():
                raise InputError(f"{source}: file is empty")
            rows.extend(_jsonl_rows(source, blob))
    return pl.DataFrame(rows, schema=RAW_SCHEMA)


def dataset_hash(raw: pl.DataFrame) -> str:
    """Content hash of the loaded data (order-sensitive), for MLflow params and caching."""
    h = hashlib.sha256()
    for rec, err in zip(raw["record"].to_list(), raw["parse_error"].to_list(), strict=True):
        h.update((rec or f"!{err}").encode("utf-8", "replace"))
        h.update(b"\n")
    return h.hexdigest()[:16]
