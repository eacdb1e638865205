"""The lazy scan of JSONL(.gz) logs (tasks/scan.py) and the fetch of sampled conversations from
them (tasks/fetch.py): the same population and sample as the full loader on clean logs; broken
lines, fields of another type and blank lines named (file, line, rule) and counted, never
dropped silently; a log whose schema changes between files; a conversation gone at fetch time."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import tasks.fetch
import tasks.scan
from tasks.config import load_settings
from tasks.fetch import scan_fetch_check
from tasks.load import InputError, load_raw
from tasks.scan import draw_sample_scan, scan_eligible, scan_turns
from tasks.stages import contract_check, draw_sample
from tests.conftest import synthetic_rows


def _jsonl(path: Path, lines: list[str]) -> Path:
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    return synthetic_rows(600, seed=8)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks.scan, "BLOCK_BYTES", 64 << 10)  # many blocks, lines cut across reads
    monkeypatch.setattr(tasks.scan, "COMPACT", 4)  # their frames compacted now and then


@pytest.mark.parametrize("name", ["logs.jsonl", "logs.jsonl.gz"])
def test_clean_jsonl_gives_the_full_loaders_population_and_sample(tmp_path: Path, rows: list[dict[str, Any]],
                                                                   name: str) -> None:
    path = _jsonl(tmp_path / name, [json.dumps(r) for r in rows])
    s = load_settings(overrides={"run": {"data": str(path)}, "sample": {"n": 120, "scan": "on"}})
    assert scan_eligible(s)
    full, _, population, _ = draw_sample(contract_check(load_raw(str(path)), s).valid, s)
    sample, _, scanned_population, _, scanned = draw_sample_scan(s)
    assert scanned_population == population and scanned.rows_in == 600 and not scanned.excluded
    times = sorted(r["created_at"] for r in rows)
    assert scanned.time_range["conversations_without_time"] == 0
    assert scanned.time_range["first"][:19] == times[0][:19].replace("T", " ")
    assert scanned.time_range["last"][:19] == times[-1][:19].replace("T", " ")
    assert sample["turn_id"].to_list() == full["turn_id"].to_list()
    assert sample["weight"].to_list() == pytest.approx(full["weight"].to_list())
    assert "_line" not in sample.columns                                   # where a line is stays internal
    run = scan_fetch_check(s)                                              # fetch: exactly the sampled ones
    assert run.sample["turn_id"].to_list() == full["turn_id"].to_list()
    assert run.checked.rows_in == run.levels["fetch"]["conversations_fetched"] == run.sample["conversation_id"].n_unique()
    fetched = run.checked.valid
    by_id = {r["conversation_id"]: r for r in rows}
    for cid, line in zip(fetched["conversation_id"], fetched["source_line"], strict=True):
        assert rows[line - 1]["conversation_id"] == cid and cid in by_id   # the right line of the file


def test_broken_lines_are_named_counted_and_the_rest_is_scanned(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    lines = [json.dumps(r) for r in rows[:300]]
    lines[40] = lines[40][: len(lines[40]) // 2]                           # breaks mid-line, mid-file
    lines[150] = json.dumps({**rows[150], "model": 7})                     # a field of another type
    lines[151] = ""                                                        # a blank line
    lines[220] = "[1, 2]"                                                  # not an object
    path = _jsonl(tmp_path / "broken.jsonl.gz", lines)
    scanned = scan_turns(str(path))
    assert scanned.rows_in == 300
    assert scanned.excluded == {"json_parse": 3, "type": 1}
    named = {(b["source_line"], b["rule"]) for b in scanned.bad_lines}
    assert named == {(41, "json_parse"), (151, "type"), (152, "json_parse"), (221, "json_parse")}
    assert all(b["source_file"] == str(path) and b["reason"] for b in scanned.bad_lines)
    good = [r for i, r in enumerate(rows[:300]) if i not in (40, 150, 151, 220)]
    assert scanned.turns["conversation_id"].n_unique() == len(good)       # every other line scanned
    s = load_settings(overrides={"run": {"data": str(path)}, "sample": {"n": 80, "scan": "on"}})
    run = scan_fetch_check(s)                                              # the run goes on, and says so
    assert run.levels["scan"]["excluded"] == {"json_parse": 3, "type": 1}
    assert len(run.levels["scan"]["bad_lines"]) == 4 and run.sample.height == 80


@pytest.mark.parametrize("blank", ["", "   ", "\r"])
def test_two_records_on_one_line_are_named_even_beside_a_blank_line(tmp_path: Path, rows: list[dict[str, Any]],
                                                                     blank: str) -> None:
    # Arrow's reader returns a row per record, not per line: a line holding two records and a
    # blank line in the same block give as many rows as lines, each after them one line off.
    lines = [json.dumps(r) for r in rows[:20]]
    lines[3] = json.dumps(rows[3]) + " " + json.dumps(rows[20])           # two records, one line
    lines[5] = blank                                                       # a blank (or white) line
    path = _jsonl(tmp_path / "two.jsonl", lines)
    scanned = scan_turns(str(path))
    assert scanned.rows_in == 20
    named = {(b["source_line"], b["rule"]) for b in scanned.bad_lines}
    assert named == {(4, "json_parse"), (6, "json_parse")}
    firsts = scanned.turns.filter(pl.col("turn_index") == 0).select("conversation_id", "_line").rows()
    assert sorted(firsts, key=lambda r: r[1]) == [(rows[i]["conversation_id"], i + 1) for i in range(20) if i not in (3, 5)]


def test_a_record_split_over_two_lines_is_named_beside_a_line_with_two(tmp_path: Path,
                                                                       rows: list[dict[str, Any]]) -> None:
    # Every line starts with "{", and Arrow reads the split record as one row: without the check
    # that each line also ends with "}", rows and lines are as many, each one line off.
    lines = [json.dumps(r) for r in rows[:10]]
    lines[2:4] = ['{"x":', '{"y": 1}}']                                    # one record, two lines
    lines[6] = json.dumps(rows[6]) + " " + json.dumps(rows[20])           # two records, one line
    path = _jsonl(tmp_path / "split.jsonl", lines)
    scanned = scan_turns(str(path))
    assert {(b["source_line"], b["rule"]) for b in scanned.bad_lines} == {(3, "json_parse"), (4, "json_parse"),
                                                                          (7, "json_parse")}
    firsts = scanned.turns.filter(pl.col("turn_index") == 0).select("conversation_id", "_line").rows()
    assert sorted(firsts, key=lambda r: r[1]) == [(rows[i]["conversation_id"], i + 1) for i in (0, 1, 4, 5, 7, 8, 9)]


def test_a_sampled_conversation_that_breaks_the_contract_or_is_gone_at_fetch_is_replaced(
        tmp_path: Path, rows: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    broken = [{**r, "created_at": "yesterday"} if i % 10 == 3 else r for i, r in enumerate(rows)]  # the scan can't tell
    path = _jsonl(tmp_path / "logs.jsonl", [json.dumps(r) for r in broken])
    real_draw = tasks.fetch.draw_sample_scan

    def draw_then_truncate(s: Any, progress: Any = None, retain: bool = False) -> Any:
        out = real_draw(s, progress=progress)  # nothing kept by the scan: the fetch reads the file again
        data = path.read_bytes().split(b"\n")
        path.write_bytes(b"\n".join(data[:500]) + b"\n")                   # the last 100 lines go away
        return out

    monkeypatch.setattr(tasks.fetch, "draw_sample_scan", draw_then_truncate)
    s = load_settings(overrides={"run": {"data": str(path)}, "sample": {"n": 150, "scan": "on"}})
    run = scan_fetch_check(s)
    fetch = run.levels["fetch"]
    assert fetch["missing_at_fetch"] > 0 and fetch["turns_replaced"] > 0
    gone = {r["conversation_id"] for r in rows[500:]} | {r["conversation_id"] for i, r in enumerate(rows) if i % 10 == 3}
    assert not set(run.sample["conversation_id"].to_list()) & gone
    assert run.sample["weight"].sum() == pytest.approx(run.population)      # still the scanned population
    assert run.checked.by_rule.get("created_at_format", 0) > 0


def test_schema_that_changes_between_files(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    """One folder: nested Parquet, Parquet with messages as JSON text and no strata columns, and
    JSONL: scanned together; a file without a required column is named."""
    d = tmp_path / "logs"
    d.mkdir()
    a, b, c = rows[:200], rows[200:400], rows[400:]
    pl.DataFrame([{**r, "tools": json.dumps(r.get("tools") or [])} for r in a], infer_schema_length=None) \
        .with_columns(pl.col("created_at").str.to_datetime(time_zone="UTC")).write_parquet(d / "a.parquet")
    pl.DataFrame([{"conversation_id": r["conversation_id"], "model": r["model"], "created_at": r["created_at"],
                   "messages": json.dumps(r["messages"])} for r in b]).write_parquet(d / "b.parquet")
    _jsonl(d / "c.jsonl", [json.dumps(r) for r in c])
    scanned = scan_turns(str(d))
    assert scanned.rows_in == 600 and scanned.files == 3
    assert scanned.turns["conversation_id"].n_unique() == 600
    b_ids = {r["conversation_id"] for r in b}
    assert scanned.turns.filter(pl.col("conversation_id").is_in(list(b_ids)))["surface"].null_count() > 0
    s = load_settings(overrides={"run": {"data": str(d)}, "sample": {"n": 90, "scan": "on"}})
    run = scan_fetch_check(s)
    files = set(run.checked.valid["source_file"].to_list())
    assert len(files) == 3 and run.sample.height == 90
    pl.DataFrame({"conversation_id": ["x"], "model": ["m"]}).write_parquet(d / "d.parquet")
    with pytest.raises(InputError, match=r"d\.parquet: missing column\(s\) messages"):
        scan_turns(str(d))


def test_auto_scans_jsonl_only_when_large(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    path = _jsonl(tmp_path / "logs.jsonl", [json.dumps(r) for r in rows[:50]])
    small = load_settings(overrides={"run": {"data": str(path)}})
    assert small.sample.scan == "auto" and not scan_eligible(small)
    assert scan_eligible(load_settings(overrides={"run": {"data": str(path)}, "sample": {"scan_jsonl_min_mb": 0}}))
    assert not scan_eligible(load_settings(overrides={"run": {"data": str(path)}, "sample": {"scan": "off"}}))


def test_too_many_unreadable_lines_stop_the_run_with_the_first_ones_named(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    lines = [json.dumps(r) for r in rows[:100]]
    for i in range(0, 100, 8):                                             # 13 of 100 lines broken
        lines[i] = lines[i][:30]
    path = _jsonl(tmp_path / "bad.jsonl", lines)
    s = load_settings(overrides={"run": {"data": str(path)}, "sample": {"n": 20, "scan": "on"},
                                 "contract": {"fail_bad_share": 0.1}})
    with pytest.raises(InputError, match=r"could not use 13 of 100 rows \(13\.0%, limit contract\.fail_bad_share "
                                         r"10\.0%\): json_parse=13; first: .*bad\.jsonl:1 json_parse \(invalid JSON"):
        scan_fetch_check(s)
    s = load_settings(overrides={"run": {"data": str(path)}, "sample": {"n": 20, "scan": "on"},
                                 "contract": {"fail_bad_share": 0.2}})
    assert scan_fetch_check(s).levels["scan"]["excluded"] == {"json_parse": 13}  # under the limit: goes on


@pytest.mark.parametrize("inflate", ["isal", "zlib"])
def test_gzip_members_padding_and_damage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inflate: str) -> None:
    """Both inflaters read every member of a multi-member .gz (as `cat a.gz b.gz` makes) and its
    zero padding; a truncated or corrupted file is named with what is wrong, never read short."""
    monkeypatch.setenv("DEPSIM_INFLATE", inflate)
    lines = [json.dumps({"conversation_id": f"c{i}", "pad": "x" * (i % 300)}) for i in range(20_000)]
    data = ("\n".join(lines) + "\n").encode()
    one, two = gzip.compress(data[: len(data) // 3]), gzip.compress(data[len(data) // 3:])
    (tmp_path / "multi.jsonl.gz").write_bytes(one + b"\x00" * 8 + two + b"\x00" * 64)  # zeros between members too
    got = b"".join(block for _, block in tasks.scan.jsonl_blocks(str(tmp_path / "multi.jsonl.gz")))
    assert got == data
    (tmp_path / "cut.jsonl.gz").write_bytes(one + two[: len(two) // 2])
    with pytest.raises(InputError, match=r"cut\.jsonl\.gz: (truncated gzip file|not a gzip file)"):
        list(tasks.scan.jsonl_blocks(str(tmp_path / "cut.jsonl.gz")))
    bad = bytearray(one)
    bad[-6] ^= 0xFF  # the member's CRC
    (tmp_path / "crc.jsonl.gz").write_bytes(bytes(bad))
    with pytest.raises(InputError, match=r"crc\.jsonl\.gz: (corrupt|not a) gzip file"):
        list(tasks.scan.jsonl_blocks(str(tmp_path / "crc.jsonl.gz")))


@pytest.mark.parametrize(("factor", "margin", "again"), [(2.0, 16.0, False), (0.2, 0.0, True)])
def test_lines_kept_by_the_scan_give_the_same_fetch_as_reading_again(
        tmp_path: Path, rows: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch,
        factor: float, margin: float, again: bool) -> None:
    """The scan keeps the lines the draw is likely to pick (tasks/scan.Retention); the run is the
    same as when the fetch reads every sampled line again: with the default bounds every picked
    line was kept (no second pass), with bounds too tight some are read again, with the same result."""
    broken = [{**r, "created_at": "yesterday"} if i % 10 == 3 else r for i, r in enumerate(rows)]  # replacements too
    path = _jsonl(tmp_path / "logs.jsonl.gz", [json.dumps(r) for r in broken])
    s = load_settings(overrides={"run": {"data": str(path)}, "sample": {"n": 60, "scan": "on", "scan_cache": False}})
    monkeypatch.setattr(tasks.scan.Retention, "FACTOR", factor)
    monkeypatch.setattr(tasks.scan.Retention, "MARGIN", margin)
    kept = scan_fetch_check(s)
    monkeypatch.setattr(tasks.scan.Retention, "for_settings", classmethod(lambda cls, s: None))
    read = scan_fetch_check(s)
    fetch = kept.levels["fetch"]
    assert fetch["turns_replaced"] > 0 and fetch["lines_from_scan"] > 0
    assert (fetch["lines_read_again"] > 0) == again
    assert read.levels["fetch"]["lines_from_scan"] == 0
    assert kept.sample.equals(read.sample)
    assert kept.checked.by_rule == read.checked.by_rule
    assert kept.checked.valid.sort("conversation_id").equals(read.checked.valid.sort("conversation_id"))


def test_retention_keeps_a_bounded_superset_of_what_the_draw_picks(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    """Over many blocks the kept lines hold every picked conversation's line and stay near
    FACTOR * n + MARGIN * strata lines, far fewer than the file's; other allocations keep nothing."""
    path = _jsonl(tmp_path / "logs.jsonl", [json.dumps(r) for r in rows])
    s = load_settings(overrides={"run": {"data": str(path)}, "sample": {"n": 40, "scan": "on", "strata": ["surface"]}})
    sample, _, _, _, scanned = draw_sample_scan(s, retain=True)
    picked = set(scanned.turns.filter(pl.col("conversation_id").is_in(sample["conversation_id"].implode()))
                 .select("_file", "_line").unique().iter_rows())
    assert picked <= set(scanned.kept)
    strata = scanned.turns.select(s.sample.strata).n_unique()
    assert len(scanned.kept) <= 2 * 40 + 16 * strata + 40 < len(rows) / 2
    equal = load_settings(overrides={"run": {"data": str(path)}, "sample": {"n": 40, "scan": "on", "allocation": "equal"}})
    assert draw_sample_scan(equal, retain=True)[4].kept == {}
    odd = load_settings(overrides={"run": {"data": str(path)}, "sample": {"scan": "on", "strata": ["turn_id"]}})
    assert tasks.scan.Retention.for_settings(odd) is None  # not a scan column: the draw names it
