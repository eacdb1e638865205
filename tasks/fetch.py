"""Scan → sample → fetch → check: a run over Parquet logs costs about what its sample costs.

The population is scanned lazily (tasks/scan.py: ids, strata and message roles, never message
content); the sample is drawn from it; only the sampled conversations are then fetched (row
groups without one are not decoded) and contract-checked. What needs every row is checked on
the scan (missing ids, empty conversations, duplicate ids: counted and left out of the
population); what needs a whole record (the contract's field rules, Great Expectations) on the
fetched conversations.

A sampled conversation that fails the contract (or is no longer there at fetch time) is
replaced by the next turn in the draw order of its stratum: the turns of that stratum ranked by
the same seeded hash as the draw (tasks/sample.unit_hash), skipping every turn already sampled
or of a quarantined conversation. The stratum keeps its n_h sampled turns, each with the same
weight as before (N_h / n_h, divided by the within-conversation probability for
`turns: random`), so the weights still sum to the scanned population: the quarantined turns are
treated like nonrespondents, represented by the valid turns of their stratum (missing at random
within a stratum). A stratum that runs out of candidates keeps fewer turns, and their weights
grow by n_h / kept so the stratum's total stays N_h. Every replacement is counted and reported.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from tasks.check import CheckResult
from tasks.config import Settings
from tasks.load import InputError, line_row, parquet_records, resolve_sources
from tasks.records import RAW_SCHEMA
from tasks.sample import representativeness, stratum_key, unit_hash
from tasks.scan import (
    ScanResult,
    _lines_at,
    _open,
    draw_sample_scan,
    draw_units,
    is_jsonl,
    jsonl_blocks,
    line_count,
)

MAX_ROUNDS = 20


@dataclass
class ScanRun:
    """What the scan path hands to the rest of the run."""

    sample: pl.DataFrame
    strata: pl.DataFrame
    population: int
    represent: dict[str, Any]
    checked: CheckResult
    data_hash: str
    levels: dict[str, Any] = field(default_factory=dict)  # what was checked where, for report and MLflow


def data_digest(data: str | None) -> str:
    """A fingerprint of the log files, without loading their rows: a Parquet file's footer
    (row-group and column-chunk sizes and offsets), a JSONL file's size and a 64 KiB sample
    every 64 MiB (its first and last bytes included)."""
    h = hashlib.sha256()
    for source in resolve_sources(data):
        h.update(source.rsplit("/", 1)[-1].encode())
        if is_jsonl(source):
            _jsonl_fingerprint(source, h)
            continue
        pf = _open(source)
        h.update(pf.metadata.serialized_size.to_bytes(8, "little"))
        h.update(str(pf.metadata.num_rows).encode())
        for g in range(pf.metadata.num_row_groups):  # column chunk statistics and sizes: the footer
            rg = pf.metadata.row_group(g)
            h.update(f"{rg.num_rows}:{rg.total_byte_size}".encode())
            for c in range(rg.num_columns):
                col = rg.column(c)
                h.update(f"{col.path_in_schema}:{col.total_compressed_size}:{col.data_page_offset}".encode())
    return h.hexdigest()[:16]


def _jsonl_fingerprint(source: str, h: Any) -> None:
    step, sample = 64 << 20, 64 << 10
    if source.startswith("s3://"):
        from tasks.store import s3_filesystem

        fs, path = s3_filesystem(source)
        f = fs.open_input_file(path)
    else:
        f = pa.OSFile(source)
    with f:
        size = f.size()
        h.update(str(size).encode())
        for at in [*range(0, size, step), max(0, size - sample)]:
            f.seek(at)
            h.update(f.read(sample))


def fetch_raw(data: str | None, ids: set[str], progress: Callable[[int, int], None] | None = None,
              turns: pl.DataFrame | None = None, kept: dict[tuple[int, int], bytes] | None = None,
              counts: dict[str, int] | None = None) -> pl.DataFrame:
    """The raw rows (RAW_SCHEMA) of the conversations with these ids.

    Parquet: each row group's ids are read first; the rest of a row group only when it holds
    one. JSONL(.gz): the lines the scan found them on (`turns`' `_file`, `_line`): those the
    scan kept (`kept`, see tasks/scan.Retention) as it read them, the others in one more pass
    over their file that parses only those lines. `counts` gets lines_from_scan and
    lines_read_again.
    """
    rows: list[dict[str, Any]] = []
    wanted = pa.array(sorted(ids), type=pa.string())
    sources = resolve_sources(data)
    parquet = [s for s in sources if not is_jsonl(s)]
    groups = [(s, g) for s in parquet for g in range(_open(s).metadata.num_row_groups)]
    done = 0
    for source in parquet:
        pf = _open(source)
        offset = 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            got = pf.read_row_group(g, columns=["conversation_id"]).column(0)
            mask = pc.fill_null(pc.is_in(pc.cast(got, pa.string()), value_set=wanted), False)
            idx = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
            base = 0
            # Batch by batch: a whole decoded row group (content included) can be a GB.
            for batch in (pf.iter_batches(batch_size=8192, row_groups=[g]) if len(idx) else ()):
                sel = idx[(idx >= base) & (idx < base + batch.num_rows)] - base
                if len(sel):
                    frame = pl.from_arrow(pa.Table.from_batches([batch]).take(pa.array(sel)))
                    assert isinstance(frame, pl.DataFrame)
                    rows += parquet_records(source, frame, (offset + base + sel + 1).tolist())
                base += batch.num_rows
            offset += n
            done += 1
            if progress:
                progress(done, len(groups))
    frame = pl.DataFrame(rows, schema=RAW_SCHEMA)
    jsonl = [(k, s) for k, s in enumerate(sources) if is_jsonl(s)]
    if jsonl:
        if turns is None or "_line" not in turns.columns:
            raise ValueError("fetching from JSONL logs needs the scan's turns (their _file and _line)")
        where = (turns.filter(pl.col("conversation_id").is_in(wanted.to_pylist()))
                 .select("_file", "_line").unique())
        frames = [frame]
        kept = kept or {}
        for k, source in jsonl:
            lines = where.filter(pl.col("_file") == k)["_line"].to_list()
            held = sorted(ln for ln in lines if (k, ln) in kept)
            again = set(lines) - set(held)
            if held:
                frames.append(_rows(source, held, [kept[(k, ln)] for ln in held]))
            if again:
                frames.append(_fetch_lines(source, again))
            if counts is not None:
                counts["lines_from_scan"] = counts.get("lines_from_scan", 0) + len(held)
                counts["lines_read_again"] = counts.get("lines_read_again", 0) + len(again)
        frame = pl.concat(frames)
    return frame


def _rows(source: str, lines: list[int], raws: list[bytes]) -> pl.DataFrame:
    """RAW_SCHEMA rows of raw JSONL lines."""
    out: dict[str, list[Any]] = {c: [] for c in RAW_SCHEMA}
    for line, raw in zip(lines, raws, strict=True):
        for c, v in zip(RAW_SCHEMA, (source, line, *line_row(raw)[:3]), strict=True):
            out[c].append(v)
    return pl.DataFrame(out, schema=RAW_SCHEMA)


def _fetch_lines(source: str, lines: set[int]) -> pl.DataFrame:
    """The raw rows of these line numbers of a JSONL(.gz) file (one pass; only they are parsed).
    A line the file no longer has is simply absent (the caller counts it missing at fetch)."""
    ordered = sorted(lines)
    found: list[int] = []
    raws: list[bytes] = []
    for first, block in jsonl_blocks(source):
        if len(found) == len(ordered):
            break
        n = line_count(block)
        here = [ln for ln in ordered[len(found):] if ln < first + n]
        raws += _lines_at(block, [ln - first for ln in here])
        found += here
    return _rows(source, found, raws)


def replace_quarantined(sample: pl.DataFrame, turns: pl.DataFrame, table: pl.DataFrame, bad: set[str],
                        s: Settings) -> tuple[pl.DataFrame, int, dict[str, int]]:
    """The sample with every turn of a `bad` conversation replaced by the next in its stratum's
    draw order (see the module docstring for the weights).

    Returns:
        (sample, turns replaced, turns lost per stratum that ran out of candidates).
    """
    gone = sample.filter(pl.col("conversation_id").is_in(list(bad)))
    if gone.height == 0:
        return sample, 0, {}
    kept = sample.filter(~pl.col("conversation_id").is_in(list(bad)))
    need = dict(gone.group_by("stratum").len().iter_rows())
    strata = s.sample.strata
    cand = (draw_units(turns, s).with_columns(stratum=stratum_key(strata))
            .filter(pl.col("stratum").is_in(list(need)) & ~pl.col("conversation_id").is_in(list(bad)))
            .with_columns(turn_id=pl.format("{}#{}", "conversation_id", "turn_index"))
            .filter(~pl.col("turn_id").is_in(sample["turn_id"].implode()))
            .with_columns(_k=unit_hash(s.run.seed))
            .with_columns(_r=pl.col("_k").rank("ordinal").over("stratum"))
            .filter(pl.col("_r") <= pl.col("stratum").replace_strict(need, return_dtype=pl.Int64)))
    # Without near-duplicate collapsing a turn's inclusion probability is (n_h / N_h) x within
    # and its weight the inverse (tasks/sample._draw): the replacement gets its own.
    p_h = dict(table.select("stratum", pl.col("sampled") / pl.col("population")).iter_rows())
    new = cand.with_columns(inclusion_prob=pl.col("stratum").replace_strict(p_h, return_dtype=pl.Float64) * pl.col("_within"),
                            dup_count=pl.lit(1, dtype=pl.UInt32)).with_columns(weight=1.0 / pl.col("inclusion_prob"))
    cols = sample.columns
    new = new.select([pl.col(c).cast(sample.schema[c]) if c in new.columns else pl.lit(None, dtype=sample.schema[c]).alias(c)
                      for c in cols])
    out = pl.concat([kept, new]).sort("turn_id")
    got = dict(new.group_by("stratum").len().iter_rows())
    lost = {h: k - got.get(h, 0) for h, k in need.items() if got.get(h, 0) < k}
    if lost:  # the stratum ran out: its remaining turns carry its whole population
        have = dict(out.filter(pl.col("stratum").is_in(list(lost))).group_by("stratum").len().iter_rows())
        scale = {h: (have.get(h, 0) + lost[h]) / have[h] for h in lost if have.get(h)}
        out = out.with_columns(weight=pl.col("weight") * pl.col("stratum").replace_strict(
            scale, default=1.0, return_dtype=pl.Float64))
    return out, gone.height, lost


def scan_fetch_check(s: Settings, progress: Callable[[str, int, int | None], None] | None = None) -> ScanRun:
    """Scan the Parquet logs, draw the sample, fetch and contract-check only the sampled
    conversations, replacing quarantined ones (see the module docstring)."""
    from tasks.stages import contract_check

    tick = (lambda stage: (lambda done, total: progress(stage, done, total))) if progress else (lambda stage: None)
    sample, strata, population, _, scanned = draw_sample_scan(s, progress=tick("scan (Parquet row groups, JSONL bytes)"),
                                                              retain=True)
    _scan_limit(scanned, s)
    turns = scanned.turns
    raws: list[pl.DataFrame] = []
    fetched: set[str] = set()
    bad: set[str] = set()
    replaced, missing = 0, 0
    lost: dict[str, int] = {}
    lines: dict[str, int] = {}
    checked = contract_check(pl.DataFrame(schema=RAW_SCHEMA), s)
    for _ in range(MAX_ROUNDS):
        want = set(sample["conversation_id"].to_list()) - fetched
        if not want:
            break
        raw = fetch_raw(s.run.data, want, progress=tick("fetch sampled conversations"), turns=turns,
                        kept=scanned.kept, counts=lines)
        fetched |= want
        raws.append(raw)
        found = {r["conversation_id"] for r in _ids(raw)}
        gone = want - found   # there at scan time, not at fetch time
        missing += len(gone)
        checked = contract_check(raw, s)
        bad |= gone | set(checked.quarantine["conversation_id"].drop_nulls().to_list())
        sample, n, out = replace_quarantined(sample, turns, strata, bad, s)
        replaced += n
        for h, k in out.items():
            lost[h] = lost.get(h, 0) + k
    if len(raws) > 1:  # one check of everything fetched, for the report (the first is reused otherwise)
        checked = contract_check(pl.concat(raws), s)
    table = strata.with_columns(sampled=pl.col("stratum").replace_strict(  # strata that ran out keep fewer
        dict(sample.group_by("stratum").len().iter_rows()), default=0, return_dtype=pl.Int64))
    levels = {"scan": {"rows_in": scanned.rows_in, "files": scanned.files, "excluded": scanned.excluded,
                       "population_turns": population, "time_range": scanned.time_range,
                       "bad_lines": scanned.bad_lines[:20],
                       **({"from_cache": scanned.cached} if scanned.cached else {})},
              "fetch": {"conversations_fetched": len(fetched), "missing_at_fetch": missing,
                        "quarantined": len(bad), "turns_replaced": replaced, "turns_lost": sum(lost.values()),
                        **lines}}
    checked.levels = levels
    if scanned.saving is not None:  # the scan cache's write overlapped the fetch and check
        scanned.saving.join()
    return ScanRun(sample, table, population, representativeness(table, sample), checked,
                   data_digest(s.run.data), levels)


def _scan_limit(scanned: ScanResult, s: Settings) -> None:
    """Stop when the rows the scan could not use are more than contract.fail_bad_share of the log.

    Raises:
        InputError: naming the share, the rules and the first lines (file, line, rule, reason).
    """
    bad = sum(scanned.excluded.values())
    limit = s.contract.fail_bad_share
    if not scanned.rows_in or bad / scanned.rows_in <= limit:
        return
    rules = ", ".join(f"{k}={v}" for k, v in sorted(scanned.excluded.items()))
    first = "; ".join(f"{b['source_file']}:{b['source_line']} {b['rule']} ({b['reason']})" for b in scanned.bad_lines[:3])
    raise InputError(f"the scan could not use {bad:,} of {scanned.rows_in:,} rows ({bad / scanned.rows_in:.1%}, "
                     f"limit contract.fail_bad_share {limit:.1%}): {rules}" + (f"; first: {first}" if first else ""))


def _ids(raw: pl.DataFrame) -> list[dict[str, str]]:
    """conversation_id of each parsed raw row."""
    import json

    out = []
    for rec in raw["record"].to_list():
        try:
            cid = json.loads(rec).get("conversation_id") if rec else None
        except ValueError:
            cid = None
        if isinstance(cid, str):
            out.append({"conversation_id": cid})
    return out
