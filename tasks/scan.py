"""The turn population of Parquet logs, read lazily: only the columns sampling needs.

A 10M-turn log never enters memory whole. Each Parquet file is read row group by row group,
projecting the conversation-level columns (id, model, created_at, strata) and two leaves of the
nested messages (`role`, and one leaf under `tool_calls`), never message content. Turns are
computed with NumPy over the flattened messages of each row group (no Python loop over rows),
so memory holds the turn table (a few columns per turn) plus the row groups being read.

The turns are the same as tasks/sample.build_turns computes from whole conversations (same
columns except prefix_hash), so the same draw gives the same sample from either path.
Messages stored as JSON text (rather than nested Parquet) are supported, at the cost of
parsing the text.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.config import Settings
from tasks.load import InputError, _looks_binary, line_row, resolve_sources
from tasks.records import TURN_SCHEMA
from tasks.sample import (
    SampleError,
    filter_turns,
    prefix_bucket_expr,
    representativeness,
    sample_turns,
    unit_hash,
)

CONV_COLUMNS = ("conversation_id", "model", "created_at", "surface", "task_type", "language")
# What turns_of_batch adds to them.
TURN_COLUMNS = ("turn_index", "user_msg_index", "end_msg_index", "prefix_len", "uses_tools", "has_response")
_MSG_DTYPE = pl.List(pl.Struct({"role": pl.String, "tool_calls": pl.List(pl.Struct({"type": pl.String}))}))


@dataclass
class ScanResult:
    """The turn population and what was left out of it (every left-out row counted by rule)."""

    turns: pl.DataFrame
    rows_in: int = 0
    files: int = 0
    excluded: dict[str, int] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    # JSONL lines that are not conversations: (file, line, rule, reason), the first 100.
    bad_lines: list[dict[str, Any]] = field(default_factory=list)
    # created_at of the scanned conversations: first, last, and how many have none (or no valid one).
    time_range: dict[str, Any] = field(default_factory=dict)
    # Raw JSONL lines the draw is likely to pick, kept as the scan read them: (file index, line) -> bytes.
    kept: dict[tuple[int, int], bytes] = field(default_factory=dict)
    # Set when the result came from tasks/scan_cache: its key, when it was made, whether it had this draw's lines.
    cached: dict[str, Any] | None = None
    # The scan cache's write of this result, running in a thread (join() before relying on it).
    saving: Any = None
    # Its scan cache key (None when the cache is off or a file could not be fingerprinted).
    key: str | None = None


def _size(source: str) -> int:
    """Bytes of a file to read (decompressed size unknown: the compressed one, for progress)."""
    try:
        return 0 if source.startswith("s3://") else os.stat(source).st_size
    except OSError:
        return 0


def _open(source: str) -> pq.ParquetFile:
    try:
        if source.startswith("s3://"):
            from tasks.store import s3_filesystem

            fs, path = s3_filesystem(source)
            return pq.ParquetFile(fs.open_input_file(path))
        return pq.ParquetFile(source)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{source}: not a readable Parquet file: {exc}") from exc


def _leaf_paths(pf: pq.ParquetFile, source: str) -> tuple[list[str], str | None, str | None, bool]:
    """(conversation columns present, role leaf, a tool_calls leaf, messages is JSON text)."""
    names = pf.schema_arrow.names
    if "conversation_id" not in names or "messages" not in names:
        missing = [c for c in ("conversation_id", "messages") if c not in names]
        raise InputError(f"{source}: missing column(s) {', '.join(missing)} (conversation contract, DESIGN §3)")
    conv = [c for c in CONV_COLUMNS if c in names]
    mtype = pf.schema_arrow.field("messages").type
    if pa.types.is_string(mtype) or pa.types.is_large_string(mtype) or pa.types.is_dictionary(mtype):
        return conv, None, None, True
    paths = [pf.schema.column(i).path for i in range(len(pf.schema))]
    role = next((p for p in paths if p.startswith("messages.") and p.endswith(".role")), None)
    # One leaf under tool_calls is enough to count calls; prefer small (dictionary-friendly) ones.
    under = [p for p in paths if p.startswith("messages.") and ".tool_calls." in p]
    calls = next((p for end in (".type", ".name", "") for p in under if p.endswith(end)), None)
    if role is None:
        raise InputError(f"{source}: messages has no role field")
    return conv, role, calls, False


def _messages_array(tbl: pa.Table, as_text: bool) -> pa.Array:
    """The messages column as one Arrow list<struct{role, tool_calls?}> array."""
    col = tbl.column("messages")
    if as_text:
        decoded = pl.from_arrow(col).cast(pl.String).str.json_decode(_MSG_DTYPE)  # type: ignore[union-attr]
        return decoded.to_arrow()
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _role_flags(roles: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(is_user, is_assistant) per message, from a string or dictionary role array."""
    if pa.types.is_dictionary(roles.type):
        values = roles.dictionary.to_pylist()
        # Indices may be unsigned (Polars writes uint32 dictionaries): widen before marking nulls.
        codes = roles.indices.cast(pa.int64()).fill_null(-1).to_numpy(zero_copy_only=False)
        user = np.zeros(len(codes), dtype=bool)
        asst = np.zeros(len(codes), dtype=bool)
        for code, value in enumerate(values):  # a dictionary may hold a value more than once
            if value == "user":
                user |= codes == code
            elif value == "assistant":
                asst |= codes == code
        return user, asst
    return (pc.fill_null(pc.equal(roles, "user"), False).to_numpy(zero_copy_only=False),
            pc.fill_null(pc.equal(roles, "assistant"), False).to_numpy(zero_copy_only=False))


def _segment_any(flags: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """For each segment [lo, hi) of flags: does it hold a True? (segments are non-empty)"""
    if len(lo) == 0:
        return np.zeros(0, dtype=bool)
    padded = np.append(flags, False)  # hi may equal len(flags)
    bounds = np.empty(2 * len(lo), dtype=np.int64)
    bounds[0::2], bounds[1::2] = lo, hi
    return np.logical_or.reduceat(padded, bounds)[0::2]


def turns_of_batch(conv: pl.DataFrame, messages: pa.Array) -> pl.DataFrame:
    """The turns of a batch of conversations, vectorised over the flattened messages.

    A turn starts at each user message and ends before the next user message (or the end of
    the conversation); it uses tools when an assistant message in it has tool calls, and has a
    response when it holds any assistant message. Same definition as tasks/sample.turns_of.
    """
    offsets = messages.offsets.to_numpy()  # null lists have equal offsets: length 0
    starts = (offsets - offsets[0]).astype(np.int64)
    lens = np.diff(starts)
    flat = messages.flatten()
    user, asst = _role_flags(flat.field("role"))
    if "tool_calls" in [flat.type.field(i).name for i in range(flat.type.num_fields)]:
        tool = asst & (np.diff(flat.field("tool_calls").offsets.to_numpy()) > 0)
    else:
        tool = np.zeros(len(flat), dtype=bool)
    u = np.flatnonzero(user)
    c = np.repeat(np.arange(len(lens)), lens)[u]
    same = np.zeros(len(u), dtype=bool)
    same[:-1] = c[1:] == c[:-1]
    nxt = np.append(u[1:], len(flat)) if len(u) else u
    end = np.where(same, nxt, starts[c + 1])
    boundary = np.ones(len(u), dtype=bool)
    boundary[1:] = ~same[:-1]
    idx = np.arange(len(u))
    turns = pl.DataFrame({  # Int32 here (half the memory at 10M turns); Int64 in the sample
        "turn_index": (idx - np.maximum.accumulate(np.where(boundary, idx, 0))).astype(np.int32),
        "user_msg_index": (u - starts[c]).astype(np.int32),
        "end_msg_index": (end - starts[c]).astype(np.int32),
        "prefix_len": (u - starts[c] + 1).astype(np.int32),
        "uses_tools": _segment_any(tool, u, end),
        "has_response": _segment_any(asst, u, end),
    })
    return pl.concat([conv[c], turns], how="horizontal")


def _normalise_conv(conv: pl.DataFrame) -> pl.DataFrame:
    """CONV_COLUMNS as strings (or Categorical) and UTC datetimes; absent ones null."""
    # Strings stay as they come (Categorical when the file dictionary-encodes them: cheap to gather).
    cols = {c: (conv[c] if c == "created_at" or conv[c].dtype in (pl.String, pl.Categorical) else conv[c].cast(pl.String))
            for c in conv.columns}
    for c in CONV_COLUMNS:
        if c not in cols:
            cols[c] = pl.Series(c, [None] * conv.height, dtype=pl.String if c != "created_at" else pl.Datetime("us", "UTC"))
    # Model and strata as Categorical (a few values, repeated on every turn); files that store
    # them as plain strings or dictionaries then concatenate.
    frame = pl.DataFrame(cols).select(CONV_COLUMNS).with_columns(
        pl.col(c).cast(pl.Categorical) for c in CONV_COLUMNS if c not in ("conversation_id", "created_at"))
    ts = frame.schema["created_at"]
    if ts == pl.String:
        frame = frame.with_columns(pl.col("created_at").str.to_datetime(time_zone="UTC", strict=False))
    elif isinstance(ts, pl.Datetime):
        frame = frame.with_columns(pl.col("created_at").dt.cast_time_unit("us").dt.replace_time_zone("UTC")
                                   if ts.time_zone is None else pl.col("created_at").dt.convert_time_zone("UTC")
                                   .dt.cast_time_unit("us"))
    else:
        frame = frame.with_columns(created_at=pl.lit(None, pl.Datetime("us", "UTC")))
    return frame


def _row_group_turns(source: str, g: int) -> tuple[pl.DataFrame, int, dict[str, int]]:
    """Turns of one row group, its row count, and rows left out by reason.

    Opens its own reader: a ParquetFile must not be read from two threads at once.
    """
    pf = _open(source)
    conv_cols, role, calls, as_text = _leaf_paths(pf, source)
    leaves = [*conv_cols, *(["messages"] if as_text else [p for p in (role, calls) if p])]
    try:
        tbl = pf.read_row_group(g, columns=leaves)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{source}: row group {g}: cannot read: {exc}") from exc
    conv = pl.from_arrow(pa.table({c: tbl.column(c) for c in conv_cols}))
    assert isinstance(conv, pl.DataFrame)
    conv = _normalise_conv(conv)
    msgs = _messages_array(tbl, as_text)
    no_id = conv["conversation_id"].is_null().to_numpy()
    empty = np.diff(msgs.offsets.to_numpy()) == 0
    keep = ~no_id & ~empty
    if not keep.all():
        conv, msgs = conv.filter(pl.Series(keep)), msgs.filter(pa.array(keep))
    out = {"missing_conversation_id": int(no_id.sum()), "no_messages": int((empty & ~no_id).sum())}
    return turns_of_batch(conv, msgs), len(keep), out


JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".json")
BLOCK_BYTES = 8 << 20  # measured: 8 MB blocks scan as fast as 32 MB ones at half the peak memory
# Every COMPACT blocks, their turn frames become one: thousands of 3k-row frames hold more memory
# than their rows.
COMPACT = 64
try:  # glibc's malloc_trim: the scan's freed blocks go back to the OS before the draw
    import ctypes

    _LIBC: Any = ctypes.CDLL("libc.so.6")
    if not hasattr(_LIBC, "malloc_trim"):
        _LIBC = None
except OSError:
    _LIBC = None
# What the scan reads of a JSONL record (the rest of each line is tokenised, never converted).
_MSG_ARROW = pa.list_(pa.struct([("role", pa.string()), ("tool_calls", pa.list_(pa.struct([("type", pa.string())])))]))
_JSONL_SCHEMA = pa.schema([*((c, pa.string()) for c in CONV_COLUMNS), ("messages", _MSG_ARROW)])


def is_jsonl(source: str) -> bool:
    return source.endswith(JSONL_SUFFIXES)


class _Gzip:
    """A .gz stream inflated in large steps that release the GIL (the next block inflates while
    Arrow parses this one), by ISA-L (python-isal, about 1.7 times zlib's speed) or by zlib.
    Reads every gzip member of the file (as `cat a.gz b.gz` makes) and the zero padding some
    tools leave after the last; checks each member's CRC and length."""

    STEP = 4 << 20

    def __init__(self, raw: Any, zlib_module: Any) -> None:
        self._raw, self._zlib = raw, zlib_module
        self._d = zlib_module.decompressobj(31)
        self._pending = b""
        self._member = False  # inside a member: the file must not end here

    def tell(self) -> int:
        return int(self._raw.tell())

    def read(self, n: int) -> bytes:
        out: list[bytes] = []
        size = 0
        while size < n:
            chunk = self._d.unconsumed_tail or self._pending or self._raw.read(self.STEP)
            self._pending = b""
            if not chunk:
                if self._member:
                    raise EOFError("the file ends inside a gzip member")
                break
            if not self._member:  # zero padding between or after members (as gzip.decompress allows)
                chunk = chunk.lstrip(b"\x00")
                if not chunk:
                    continue
            self._member = True
            try:
                piece = self._d.decompress(chunk, n - size)
            except self._zlib.error as exc:
                raise OSError(str(exc)) from exc
            out.append(piece)
            size += len(piece)
            if self._d.eof:  # the next member, if any
                self._pending, self._member = self._d.unused_data, False
                self._d = self._zlib.decompressobj(31)
        return b"".join(out)

    def close(self) -> None:
        self._raw.close()


def _inflater() -> Any:
    """python-isal's zlib interface (a dependency), or the standard library's zlib when it is
    missing or DEPSIM_INFLATE=zlib (for side-by-side benchmarks)."""
    if os.environ.get("DEPSIM_INFLATE", "isal") != "zlib":
        with contextlib.suppress(ImportError):
            from isal import isal_zlib

            return isal_zlib
    import zlib

    return zlib


def _stream(source: str) -> tuple[Any, Any]:
    """(byte stream of a JSONL(.gz) file, local or s3://; the raw file under it, whose position
    is the compressed bytes read)."""
    try:
        if source.startswith("s3://"):
            from tasks.store import s3_filesystem

            fs, path = s3_filesystem(source)
            raw = fs.open_input_stream(path)
        else:
            raw = pa.OSFile(source)
        return (_Gzip(raw, _inflater()) if source.endswith(".gz") else raw), raw
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{source}: cannot read: {exc}") from exc


def _trim() -> None:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim; a no-op elsewhere)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def newlines(block: bytes) -> int:
    """The number of newlines in a block (NumPy: about 6x bytes.count, which goes byte by byte)."""
    return int(np.count_nonzero(np.frombuffer(block, dtype=np.uint8) == 10))


def line_count(block: bytes) -> int:
    """The lines of a block of whole lines (the last may lack its newline)."""
    return newlines(block) + (0 if not block or block.endswith(b"\n") else 1)


def _lines_and_braces(block: bytes) -> tuple[int, bool]:
    """(lines of a block of whole lines, whether every one of them starts with "{" and ends
    with "}" (before a "\r"): then no record spans two lines)."""
    a = np.frombuffer(block, dtype=np.uint8)
    nl = np.flatnonzero(a == 10)
    lines = len(nl) + (0 if not block or block.endswith(b"\n") else 1)
    if not len(a) or a[0] != 123:
        return lines, False
    after = nl[nl + 1 < len(a)] + 1
    last = (nl if block.endswith(b"\n") else np.append(nl, len(a))) - 1  # >= 1: a[0] is "{"
    last -= a[last] == 13
    return lines, bool((a[after] == 123).all() and (a[last] == 125).all())


def jsonl_blocks(source: str, block_bytes: int | None = None,
                 on_read: Callable[[int], None] | None = None) -> Iterator[tuple[int, bytes]]:
    """(number of the block's first line, block of whole lines) over a JSONL(.gz) file; the last
    line may lack its newline. Names the file when it is not gzip, binary or empty.
    `on_read(bytes)` is told how many bytes of the file (compressed) each read consumed."""
    stream, raw = _stream(source)
    line, rest, content, first, at = 1, b"", False, True, 0
    try:
        while True:
            try:
                chunk = stream.read(block_bytes or BLOCK_BYTES)
                if on_read is not None:
                    now = raw.tell()
                    on_read(now - at)
                    at = now
            except (OSError, EOFError, pa.ArrowException) as exc:
                kind = ("cannot read" if not source.endswith(".gz") else
                        "truncated gzip file" if isinstance(exc, EOFError) or "truncated" in str(exc).lower() else
                        "corrupt gzip file" if any(w in str(exc).lower() for w in ("checksum", "data check", "length check"))
                        else "not a gzip file")
                raise InputError(f"{source}: {kind}: {exc}") from exc
            if first:
                first = False
                if not chunk.lstrip().startswith((b"{", b"[", b"\n")) and _looks_binary(chunk[:4096]):
                    raise InputError(f"{source}: not a JSONL file (binary content)")
            if not chunk:
                break
            data = rest + chunk
            cut = data.rfind(b"\n") + 1
            block, rest = data[:cut], data[cut:]
            if block:
                content = content or bool(block.strip())
                yield line, block
                line += newlines(block)
        if rest:
            content = content or bool(rest.strip())
            yield line, rest
        if not content:
            raise InputError(f"{source}: file is empty")
    finally:
        stream.close()


def prefetched(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """The items of `items`, produced `depth` ahead in a thread (for work that releases the GIL,
    such as Arrow's decompression). An exception in the producer is raised here."""
    import queue
    import threading

    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("end", None))
        except BaseException as exc:  # handed to the consumer
            q.put(("error", exc))

    thread = threading.Thread(target=produce, name="depsim-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join(timeout=5)


def _line_projection(obj: Any) -> tuple[dict[str, Any] | None, str | None]:
    """The scan's fields of one parsed line, or (None, rule) when the line cannot be a conversation."""
    if not isinstance(obj, dict):
        return None, "json_parse"
    row: dict[str, Any] = {}
    for c in CONV_COLUMNS:
        v = obj.get(c)
        if v is not None and not isinstance(v, str):
            return None, "type"
        row[c] = v
    msgs = obj.get("messages")
    if msgs is not None and not isinstance(msgs, list):
        return None, "type"
    out = []
    for m in msgs or []:
        role = m.get("role") if isinstance(m, dict) else None
        calls = m.get("tool_calls") if isinstance(m, dict) else None
        out.append({"role": role if isinstance(role, str) else None,
                    "tool_calls": [{"type": None}] * len(calls) if isinstance(calls, list) else None})
    row["messages"] = out
    return row, None


def _block_table(source: str, first_line: int, block: bytes, n_lines: int, braces: bool,
                 bad: list[dict[str, Any]]) -> tuple[pa.Table, np.ndarray, dict[str, int]]:
    """A block's projected table, the line number of each row, and lines left out by rule.

    Arrow's JSON reader parses the block on every core. Its rows are records, not lines: they
    are the lines one to one only when every line starts with "{" (`braces`: no blank line)
    and there are as many rows as lines (no line with two records). Otherwise, or when it
    refuses the block (a broken line, a field of another type), the block is read line by line,
    and every line that is not a conversation is named in `bad` (file, line, rule, reason) and
    counted.
    """
    import io

    import pyarrow.json as pj

    if braces:
        try:
            tbl = pj.read_json(io.BytesIO(block), read_options=pj.ReadOptions(block_size=4 << 20),
                               parse_options=pj.ParseOptions(explicit_schema=_JSONL_SCHEMA,
                                                             unexpected_field_behavior="ignore"))
            if tbl.num_rows == n_lines:
                return tbl, np.arange(first_line, first_line + n_lines, dtype=np.int64), {}
        except (pa.ArrowException, OSError):
            pass
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    excluded: dict[str, int] = {}
    for k, raw in enumerate(block.split(b"\n")[:n_lines]):
        record, error, _, obj = line_row(raw)
        row, rule = _line_projection(obj) if record is not None else (None, "json_parse")
        if row is None:
            assert rule is not None
            excluded[rule] = excluded.get(rule, 0) + 1
            if len(bad) < 100:
                bad.append({"source_file": source, "source_line": first_line + k, "rule": rule,
                            "reason": error or ("a field of the wrong type" if rule == "type" else "not a JSON object")})
            continue
        rows.append(row)
        lines.append(first_line + k)
    return pa.Table.from_pylist(rows, schema=_JSONL_SCHEMA), np.array(lines, dtype=np.int64), excluded


def draw_units(turns: pl.DataFrame, s: Settings) -> pl.DataFrame:
    """The draw's units (turns after sample.turns) with their within-conversation probability
    `_within`, as tasks/sample.sample_turns forms them."""
    c = s.sample
    if c.turns == "last":
        return turns.filter(pl.col("turn_index") == pl.col("turn_index").max().over("conversation_id")) \
            .with_columns(_within=pl.lit(1.0))
    if c.turns == "random":
        k = c.turns_per_conversation
        return (turns.with_columns(_h=unit_hash(s.run.seed + 1), _nt=pl.len().over("conversation_id"))
                .filter(pl.col("_h").rank("ordinal").over("conversation_id") <= k)
                .with_columns(_within=pl.min_horizontal(pl.lit(float(k)), pl.col("_nt").cast(pl.Float64))
                              / pl.col("_nt")).drop("_h", "_nt"))
    return turns.with_columns(_within=pl.lit(1.0))


class Retention:
    """Keeps the raw JSONL lines the draw is likely to pick while the scan reads them, so the
    fetch does not read (and inflate) the files a second time.

    The draw takes, in each stratum, the n_h units with the smallest seeded hash
    (tasks/sample.unit_hash); under proportional allocation n_h is about n * N_h / N (at least
    one). A unit is kept when its hash, as a fraction of 2**64, is below
    FACTOR * n / N + MARGIN / N_h, with N and N_h the units seen so far, after the run's filters.
    Those counts only grow, so the thresholds only fall: a unit below its stratum's final
    threshold is kept when it is read and never pruned, and the final threshold leaves about
    FACTOR * n_h + MARGIN units per stratum for n_h draws and the replacements of quarantined
    ones. Memory stays near FACTOR * n + MARGIN * strata lines. A picked line that was not kept
    (rare; or any line under other allocations, where this is not used) is read in one more
    pass by tasks/fetch.py, so this changes how fast the fetch is, never what it returns.
    """

    FACTOR, MARGIN = 2.0, 16.0
    BUDGET = 256 << 20  # bytes of kept lines; past it nothing is kept and the fetch reads again

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.n = s.sample.n
        self.strata = list(s.sample.strata)
        self.seen = 0
        self.per_stratum: dict[int, int] = {}
        self.units = pl.DataFrame(schema={"_file": pl.UInt16, "_line": pl.UInt32, "_s": pl.UInt64, "_u": pl.Float64})
        self.lines: dict[tuple[int, int], bytes] = {}
        self.size = 0
        self.pruned = 0  # units held after the last prune
        self.off = False  # over BUDGET (a sample near the population's size)

    @classmethod
    def for_settings(cls, s: Settings | None) -> Retention | None:
        """A Retention when the allocation is proportional (the bound above holds), else None."""
        if s is None or s.sample.allocation != "proportional" or s.sample.oversample or s.sample.dedupe:
            return None
        if not set(s.sample.strata) <= {*CONV_COLUMNS, *TURN_COLUMNS, "prefix_bucket"}:
            return None  # a stratum the scan does not have: the draw names it (SampleError)
        return cls(s)

    def units_of(self, turns: pl.DataFrame) -> pl.DataFrame:
        """A block's draw units after the run's filters: _file, _line, stratum key _s, hash _u in
        [0, 1). Depends on nothing but the block (runs in the scan's worker threads)."""
        c = self.s.sample
        try:
            f = filter_turns(turns, self.s.run.production_models, c.created_after, c.created_before,
                             c.surfaces, c.task_types, c.languages, c.min_prefix_len, c.max_prefix_len)
        except SampleError:  # nothing of this block is in the population
            return self.units.clear()
        if "prefix_bucket" in self.strata:
            f = f.with_columns(prefix_bucket=prefix_bucket_expr())
        key = (pl.struct([pl.col(col).cast(pl.String) for col in self.strata]).hash(0) if self.strata
               else pl.lit(0, dtype=pl.UInt64))
        return draw_units(f, self.s).select(
            "_file", "_line", _s=key, _u=unit_hash(self.s.run.seed).cast(pl.Float64) / 2.0**64)

    def _limit(self) -> pl.Expr:
        """The keep bound of each unit's stratum: FACTOR * n / N + MARGIN / N_h, as seen so far."""
        return pl.lit(self.FACTOR * self.n / max(self.seen, 1)) + pl.lit(self.MARGIN) / pl.col("_s").replace_strict(
            self.per_stratum, default=1.0, return_dtype=pl.Float64)

    def add(self, units: pl.DataFrame, block: bytes, first_line: int) -> None:
        """Take a block's units (units_of) and bytes; blocks come in file order."""
        if self.off or units.height == 0:
            return
        self.seen += units.height
        for h, k in units.group_by("_s").len().iter_rows():
            self.per_stratum[h] = self.per_stratum.get(h, 0) + k
        limit = self._limit()
        new = units.filter(pl.col("_u") < limit)
        if new.height:
            self.units = pl.concat([self.units, new])
            here = sorted(set(new.select("_file", "_line").iter_rows()))  # all on this block
            for key, raw in zip(here, _lines_at(block, [ln - first_line for _, ln in here]), strict=True):
                if key not in self.lines:
                    self.lines[key] = raw
                    self.size += len(raw)
        if self.units.height > 2 * self.pruned + 1024:  # now and then: the bounds have fallen since
            self.units = self.units.filter(pl.col("_u") < limit)
            need = set(self.units.select("_file", "_line").iter_rows())
            self.lines = {k: v for k, v in self.lines.items() if k in need}
            self.size = sum(map(len, self.lines.values()))
            self.pruned = self.units.height
        if self.size > self.BUDGET:
            self.off, self.lines, self.units = True, {}, self.units.clear()

    def finish(self) -> dict[tuple[int, int], bytes]:
        """The kept lines (none when over BUDGET), pruned to the final bounds."""
        if self.off:
            return {}
        need = set(self.units.filter(pl.col("_u") < self._limit()).select("_file", "_line").iter_rows())
        return {k: v for k, v in self.lines.items() if k in need}


def _lines_at(block: bytes, wanted: list[int]) -> list[bytes]:
    """Lines number `wanted` (0-based, ascending) of a block, without their newline."""
    out: list[bytes] = []
    pos, k = 0, 0
    for w in wanted:
        while k < w:
            pos = block.index(b"\n", pos) + 1
            k += 1
        end = block.find(b"\n", pos)
        out.append(block[pos:end if end >= 0 else len(block)])
    return out


def _block_turns(source: str, file_idx: int, first_line: int, block: bytes,
                 retain: Retention | None) -> tuple[pl.DataFrame, int, dict[str, int], list[dict[str, Any]], pl.DataFrame | None]:
    """One block's turns (each with its file index and line), lines, lines left out by rule, the
    bad lines named and the retention's units. Runs in a worker thread: Arrow's parse and Polars
    release the GIL."""
    bad: list[dict[str, Any]] = []
    n_lines, braces = _lines_and_braces(block)
    tbl, lines, excluded = _block_table(source, first_line, block, n_lines, braces, bad)
    conv = pl.from_arrow(tbl.select(list(CONV_COLUMNS)))
    assert isinstance(conv, pl.DataFrame)
    conv = _normalise_conv(conv).with_columns(_file=pl.lit(file_idx, pl.UInt16), _line=pl.Series(lines, dtype=pl.UInt32))
    msgs = tbl.column("messages").combine_chunks()
    no_id = conv["conversation_id"].is_null().to_numpy()
    empty = np.diff(msgs.offsets.to_numpy()) == 0
    keep = ~no_id & ~empty
    if not keep.all():
        conv, msgs = conv.filter(pl.Series(keep)), msgs.filter(pa.array(keep))
    excluded["missing_conversation_id"] = int(no_id.sum())
    excluded["no_messages"] = int((empty & ~no_id).sum())
    turns = turns_of_batch(conv, msgs)
    return turns, n_lines, excluded, bad, retain.units_of(turns) if retain is not None else None


def _jsonl_turns(source: str, file_idx: int, progress: Callable[[int], None] | None,
                 bad: list[dict[str, Any]], retain: Retention | None = None,
                 threads: int = 2) -> tuple[list[pl.DataFrame], int, dict[str, int]]:
    """Turns of one JSONL(.gz) file, block by block, each carrying its file index and line.

    The file inflates in one thread, `threads` blocks are parsed at once in others, and the
    results are taken in file order (the retention and the bad lines see the blocks in order).
    """
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor

    frames: list[pl.DataFrame] = []
    rows_in = 0
    compacted = 0  # frames[:compacted] are each COMPACT blocks' turns in one chunk
    excluded: dict[str, int] = {}
    read = [0]

    def take(first_line: int, block: bytes, fut: Future[Any]) -> None:
        nonlocal rows_in, compacted
        turns, n_lines, out, named, units = fut.result()
        rows_in += n_lines
        for key, v in out.items():
            excluded[key] = excluded.get(key, 0) + v
        bad.extend(named[:max(0, 100 - len(bad))])
        frames.append(turns)
        if len(frames) - compacted >= COMPACT:
            frames[compacted:] = [pl.concat(frames[compacted:], how="diagonal", rechunk=True)]
            compacted += 1
            _trim()
        if retain is not None:
            retain.add(units, block, first_line)
        if progress:  # bytes of the file read so far (the decompression runs a block or two ahead)
            progress(read[0])
            read[0] = 0

    pending: deque[tuple[int, bytes, Future[Any]]] = deque()
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="depsim-scan") as pool:
        try:
            for first_line, block in prefetched(jsonl_blocks(source, on_read=lambda n: read.__setitem__(0, read[0] + n))):
                pending.append((first_line, block, pool.submit(_block_turns, source, file_idx, first_line, block, retain)))
                if len(pending) > threads:
                    take(*pending.popleft())
            while pending:
                take(*pending.popleft())
        finally:
            for *_, fut in pending:
                fut.cancel()
    return frames, rows_in, excluded


def scan_turns(data: str | None, progress: Callable[[int, int], None] | None = None, threads: int = 2,
               keep: Retention | None = None) -> ScanResult:
    """The turn population of Parquet logs (a file, folder, glob or s3:// prefix).

    Args:
        data: where the logs are.
        progress: called with (row groups done, row groups) as the scan goes.
        threads: row groups read at once (Arrow and NumPy release the GIL).
        keep: keeps the JSONL lines the draw is likely to pick (`kept` of the result).

    Rows without a conversation_id or with no messages have no turns; they are counted in
    `excluded` by reason, as are conversation ids seen more than once (all their turns are
    left out: which copy is right is unknowable here; the contract check names them).

    Raises:
        InputError: a non-Parquet source, an unreadable file, a missing required column.
    """
    from concurrent.futures import ThreadPoolExecutor

    with contextlib.suppress(NotImplementedError, pa.ArrowException):
        pa.set_memory_pool(pa.jemalloc_memory_pool())  # returns freed row groups to the OS sooner
    sources = resolve_sources(data)
    other = [s for s in sources if not s.endswith(".parquet") and not is_jsonl(s)]
    if other:
        raise InputError(f"{other[0]}: the lazy scan reads Parquet and JSONL(.gz) only")
    parquet = [s for s in sources if s.endswith(".parquet")]
    groups = [(s, g) for s in parquet for g in range(_open(s).metadata.num_row_groups)]
    jsonl = [(k, s) for k, s in enumerate(sources) if is_jsonl(s)]
    excluded = {"missing_conversation_id": 0, "no_messages": 0, "duplicate_conversation_id": 0}
    frames: list[pl.DataFrame] = []
    bad_lines: list[dict[str, Any]] = []
    rows_in = 0
    if groups:
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            for k, (frame, n, out) in enumerate(pool.map(lambda t: _row_group_turns(*t), groups)):
                frames.append(frame)
                rows_in += n
                for key, v in out.items():
                    excluded[key] += v
                if progress:
                    progress(k + 1, len(groups))
    total = sum(_size(s) for _, s in jsonl)
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, max(total, done))

    for k, source in jsonl:
        got, n, out = _jsonl_turns(source, k, tick, bad_lines, retain=keep, threads=threads)
        frames += got
        rows_in += n
        for key, v in out.items():
            excluded[key] = excluded.get(key, 0) + v
    _trim()  # the blocks' freed memory, before the draw's working memory comes on top of it
    if not frames:
        raise InputError(f"{data}: no rows")
    turns = pl.concat(frames, how="diagonal")  # Parquet turns have no _file/_line
    dup = _duplicate_ids(turns)
    if dup.height:
        excluded["duplicate_conversation_id"] = int(dup["count"].sum())
        turns = turns.filter(~pl.col("conversation_id").is_in(dup["conversation_id"].implode()))
    turns = turns.with_columns(prefix_bucket=prefix_bucket_expr().cast(pl.Categorical))  # 10M short strings: 160 MB
    firsts = turns.lazy().filter(pl.col("turn_index") == 0).select(
        first=pl.col("created_at").min(), last=pl.col("created_at").max(), missing=pl.col("created_at").null_count(),
        n=pl.len()).collect().row(0, named=True)
    span = {"first": None if firsts["missing"] == firsts["n"] else str(firsts["first"]),
            "last": None if firsts["missing"] == firsts["n"] else str(firsts["last"]),
            "conversations_without_time": int(firsts["missing"])}
    kept = keep.finish() if keep is not None else {}
    return ScanResult(turns, rows_in, len(sources), {k: v for k, v in excluded.items() if v}, sources, bad_lines, span,
                      kept)


def _duplicate_ids(turns: pl.DataFrame) -> pl.DataFrame:
    """Conversation ids seen on more than one line or row (conversation_id, count).

    Compares 64-bit hashes of the first turns' ids (sorted, 37 MB at 4.6M conversations) and
    only the ids whose hash repeats as strings: a copy of every id and a hash set of them cost
    0.27 GB and 2 s at 10M turns."""
    first = pl.col("turn_index") == 0
    h = np.sort(turns.lazy().filter(first).select(pl.col("conversation_id").hash(0)).collect().to_series().to_numpy())
    repeated = np.unique(h[1:][h[1:] == h[:-1]])
    if not len(repeated):
        return pl.DataFrame(schema={"conversation_id": pl.String, "count": pl.UInt32})
    ids = turns.lazy().filter(first & pl.col("conversation_id").hash(0).is_in(pl.Series(repeated).implode())) \
        .select("conversation_id").collect().to_series()
    return ids.value_counts().filter(pl.col("count") > 1)


def scan_eligible(s: Settings) -> bool:
    """Whether the logs are scanned lazily (sample.scan; no whole-conversation feature asked for)."""
    c = s.sample
    if c.scan == "off" or c.dedupe or (c.allocation == "neyman" and c.prior == "labels"):
        return False
    sources = resolve_sources(s.run.data)
    if not all(src.endswith(".parquet") or is_jsonl(src) for src in sources):
        return False
    jsonl = [src for src in sources if is_jsonl(src)]
    return c.scan == "on" or not jsonl or sum(_size(src) for src in jsonl) >= c.scan_jsonl_min_mb * 2**20


def draw_sample_scan(s: Settings, progress: Callable[[int, int], None] | None = None,
                     retain: bool = False) -> tuple[pl.DataFrame, pl.DataFrame, int, dict[str, Any], ScanResult]:
    """The sampling stage over a lazy scan of Parquet logs: the same draw as stages.draw_sample.
    With `retain`, the JSONL lines the draw is likely to pick are kept for the fetch (Retention).

    Returns (sample, strata table, population turns, representativeness, ScanResult).
    """
    c = s.sample
    known = [*CONV_COLUMNS, *TURN_SCHEMA, "has_response", "prefix_bucket"]
    unknown = [col for col in c.strata if col not in known]
    if unknown:
        raise SampleError(f"unknown stratum column(s): {', '.join(unknown)} (available: {', '.join(dict.fromkeys(known))})")
    scanned, key = None, None
    if c.scan_cache:
        from tasks import scan_cache

        key = scan_cache.log_key(s.run.data)  # None when a file cannot be read: the scan names it
        scanned = scan_cache.load(s, key) if key else None
    fresh = scanned is None
    if scanned is None:
        scanned = scan_turns(s.run.data, progress=progress, keep=Retention.for_settings(s) if retain else None)
    try:
        turns = filter_turns(scanned.turns, s.run.production_models, c.created_after, c.created_before,
                             c.surfaces, c.task_types, c.languages, c.min_prefix_len, c.max_prefix_len)
        priors = None
        if c.allocation == "neyman":
            from tasks.stages import load_priors  # imports the replay stack: only when needed

            priors = load_priors(c.prior, turns, pl.DataFrame(), c.strata)
        sample, strata = sample_turns(turns, c.n, c.strata, s.run.seed, c.allocation, c.turns,
                                      c.turns_per_conversation, priors, c.oversample or None, c.dedupe)
    finally:  # the population is cached even when the draw fails (a filter to fix, say)
        if fresh and key:
            from tasks import scan_cache

            # Written in a thread while the run goes on (finished before the process exits), and
            # only after the draw: its working memory and the write's do not add up at the peak.
            scanned.saving = scan_cache.save_in_background(s, key, scanned)
    scanned.key = key
    sample = (sample.with_columns(pl.col(col).cast(dtype) for col, dtype in TURN_SCHEMA.items())
              .drop("_file", "_line", strict=False)  # where a JSONL conversation is: for the fetch only
              .with_columns(pl.col("prefix_bucket").cast(pl.String)))
    scanned.turns = turns  # the population after filters: replacement draws come from it (tasks/fetch.py)
    return sample, strata, turns.height, representativeness(strata, sample), scanned
