"""The scan of a log, kept beside the runs for the next run over the same log.

A run after every training checkpoint reads the same production log each time, and scanning a
10M-turn JSONL.gz log is most of such a run's time. The scan's result (the turn population, what
it excluded and why, the time range) is kept under <run.store>/cache/scans/<key>/, where the
key is a fingerprint of the log files (each file's name, size and modification time, plus
tasks/fetch.data_digest's content samples every 64 MB) and of the code that reads them
(tasks/scan.py, sample.py, load.py, check.py; the pyarrow and polars versions). A rewrite, an
append or a touch changes the key and the log is scanned again; a rewrite that keeps a file's
size and modification time (`cp -p`) and changes bytes only between the samples is not seen:
turn the cache off (`sample.scan_cache: false`) where logs are rewritten that way. The lines the scan kept for the fetch (tasks/scan.Retention) are kept too, under the
draw settings that chose them (seed, n, strata, allocation, turn choice, filters); another draw
over a cached population fetches its lines in one pass over the files.

`sample.scan_cache: false` turns it off. The newest KEEP entries are kept, the rest removed.
An unreadable entry is a miss (logged), never an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import polars as pl

from tasks.config import Settings
from tasks.load import resolve_sources

log = logging.getLogger("depsim.scan_cache")

FORMAT = 1  # bump when ScanResult or the turn table changes
KEEP = 4


def cache_root(s: Settings) -> Path:
    """<run.store>/cache/scans (a local folder beside the runs; .depsim/cache/scans for an S3 store)."""
    root = s.run.store if not s.run.store.startswith("s3://") else ".depsim"
    return Path(root) / "cache" / "scans"


def _file_stat(source: str) -> str:
    if source.startswith("s3://"):
        from tasks.store import s3_filesystem

        fs, path = s3_filesystem(source)
        info = fs.get_file_info(path)
        return f"{info.size}:{info.mtime_ns}"
    st = os.stat(source)
    return f"{st.st_size}:{st.st_mtime_ns}"


def log_key(data: str | None) -> str | None:
    """The log's fingerprint: file names, sizes, modification times and content samples; None
    when a file cannot be read (the scan then names it with its own error)."""
    import pyarrow as pa

    try:
        return _log_key(data)
    except (OSError, pa.ArrowException) as exc:
        log.info("scan cache: not used (%s)", exc)
        return None


def _log_key(data: str | None) -> str:
    import pyarrow

    import tasks.check
    import tasks.load
    import tasks.sample
    import tasks.scan
    from tasks.fetch import data_digest

    h = hashlib.sha256(f"depsim-scan-{FORMAT}-{pyarrow.__version__}-{pl.__version__}".encode())
    for module in (tasks.scan, tasks.sample, tasks.load, tasks.check):  # a change to the scan's code scans again
        h.update(Path(str(module.__file__)).read_bytes())
    for source in resolve_sources(data):
        h.update(f"{source}\0{_file_stat(source)}\0".encode())
    h.update(data_digest(data).encode())
    return h.hexdigest()[:24]


def draw_key(s: Settings) -> str:
    """What decides which lines the scan keeps for the fetch."""
    c = s.sample
    fields = {"seed": s.run.seed, "n": c.n, "strata": list(c.strata), "allocation": c.allocation,
              "turns": c.turns, "k": c.turns_per_conversation, "models": list(s.run.production_models),
              "after": str(c.created_after), "before": str(c.created_before), "surfaces": c.surfaces,
              "task_types": c.task_types, "languages": c.languages, "min": c.min_prefix_len, "max": c.max_prefix_len}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load(s: Settings, key: str) -> Any | None:
    """The cached ScanResult of this log, with the kept lines of this draw when there are any; None on a miss."""
    from tasks.scan import ScanResult

    entry = cache_root(s) / key
    meta_path = entry / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        turns = pl.read_parquet(entry / "turns.parquet")
        kept: dict[tuple[int, int], bytes] = {}
        kept_path = entry / f"kept-{draw_key(s)}.parquet"
        if kept_path.is_file():
            frame = pl.read_parquet(kept_path)
            kept = {(f, ln): raw for f, ln, raw in frame.iter_rows()}
    except (OSError, ValueError, KeyError, pl.exceptions.PolarsError) as exc:
        log.warning("scan cache %s: unreadable, scanning the log again: %s", entry, exc)
        _evict(entry)  # so that this run's scan replaces it
        return None
    with contextlib.suppress(OSError):  # most recently used (a read-only store still reads)
        os.utime(meta_path)
    result = ScanResult(turns, meta["rows_in"], meta["files"], meta["excluded"], meta["sources"],
                        meta["bad_lines"], meta["time_range"], kept)
    result.cached = {"key": key, "created_at": meta["created_at"], "kept_lines": bool(kept)}
    return result


def save(s: Settings, key: str, scanned: Any) -> None:
    """Write the entry (a new folder, renamed into place), or add this draw's kept lines to it."""
    root = cache_root(s)
    entry = root / key
    kept = pl.DataFrame({"_file": [f for f, _ in scanned.kept], "_line": [ln for _, ln in scanned.kept],
                         "raw": list(scanned.kept.values())},
                        schema={"_file": pl.UInt16, "_line": pl.UInt32, "raw": pl.Binary})
    try:
        if (entry / "meta.json").is_file():  # another draw over a cached population
            if kept.height:
                fd, tmp = tempfile.mkstemp(dir=entry, prefix=".kept-", suffix=".tmp")
                os.close(fd)
                kept.write_parquet(tmp)
                os.replace(tmp, entry / f"kept-{draw_key(s)}.parquet")
            return
        if entry.exists():  # a folder without meta.json: an eviction or write cut short
            _evict(entry)
        root.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}.", suffix=".tmp"))
        scanned.turns.write_parquet(tmp_dir / "turns.parquet")
        if kept.height:
            kept.write_parquet(tmp_dir / f"kept-{draw_key(s)}.parquet")
        meta = {"format": FORMAT, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "data": s.run.data, "rows_in": scanned.rows_in, "files": scanned.files,
                "excluded": scanned.excluded, "sources": scanned.sources, "bad_lines": scanned.bad_lines,
                "time_range": scanned.time_range}
        (tmp_dir / "meta.json").write_text(json.dumps(meta, default=str), encoding="utf-8")
        try:
            os.replace(tmp_dir, entry)
        except OSError:  # another run wrote it first
            shutil.rmtree(tmp_dir, ignore_errors=True)
        _prune(root)
    except OSError as exc:  # a cache that cannot be written costs the next run a scan, nothing else
        log.warning("scan cache %s: not written: %s", entry, exc)


def save_in_background(s: Settings, key: str, scanned: Any) -> threading.Thread:
    """save() in a thread (Parquet writes release the GIL): about 2 s at 10M turns that the run
    need not wait for. Not a daemon: the interpreter finishes the write before it exits."""
    from tasks.scan import ScanResult

    snapshot = ScanResult(scanned.turns, scanned.rows_in, scanned.files, dict(scanned.excluded), list(scanned.sources),
                          list(scanned.bad_lines), dict(scanned.time_range), dict(scanned.kept))
    thread = threading.Thread(target=save, args=(s, key, snapshot), name="depsim-scan-cache")
    thread.start()
    return thread


def _evict(entry: Path) -> None:
    """Remove an entry: renamed aside first, so a half-removed one never sits under its key."""
    trash = entry.with_name(f".{entry.name}.{os.getpid()}.{time.monotonic_ns()}.trash")
    try:
        os.replace(entry, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _prune(root: Path) -> None:
    entries: list[Path] = []
    broken: list[Path] = []
    for p in root.iterdir():
        if p.name.startswith("."):
            continue
        (entries if (p / "meta.json").is_file() else broken).append(p)
    entries.sort(key=lambda p: (p / "meta.json").stat().st_mtime, reverse=True)
    for old in entries[KEEP:] + broken:
        _evict(old)
    for torn in [*root.glob(".*.tmp"), *root.glob(".*.trash"), *root.glob("*/.kept-*.tmp")]:
        with contextlib.suppress(OSError):  # a writer killed mid-way, an hour ago or more
            if time.time() - torn.stat().st_mtime > 3600:
                shutil.rmtree(torn, ignore_errors=True) if torn.is_dir() else torn.unlink()
