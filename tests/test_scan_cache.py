"""The scan cache (tasks/scan_cache.py): a second run over the same log does not scan it and
draws the same sample; any change to a file scans again; another draw over a cached population
fetches its lines from the files; an unreadable entry is a miss; off means nothing is written."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import tasks.scan
from tasks.config import load_settings
from tasks.fetch import scan_fetch_check
from tests.conftest import synthetic_rows


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    return synthetic_rows(400, seed=21)


def _log(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_bytes(gzip.compress(("\n".join(json.dumps(r) for r in rows) + "\n").encode()))
    return path


def _settings(tmp_path: Path, data: Path, **sample: Any) -> Any:
    return load_settings(overrides={"run": {"data": str(data), "store": str(tmp_path / "runs")},
                                    "sample": {"n": 50, "scan": "on", **sample}})


def _no_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_: Any, **__: Any) -> Any:
        raise AssertionError("the log was scanned again")
    monkeypatch.setattr(tasks.scan, "scan_turns", fail)


def test_a_second_run_over_the_same_log_reads_the_cache(tmp_path: Path, rows: list[dict[str, Any]],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    data = _log(tmp_path / "logs.jsonl.gz", rows)
    s = _settings(tmp_path, data)
    first = scan_fetch_check(s)
    assert "from_cache" not in first.levels["scan"]
    with monkeypatch.context() as m:
        _no_scan(m)
        second = scan_fetch_check(s)
    assert second.sample.equals(first.sample) and second.population == first.population
    scan = second.levels["scan"]
    assert scan["from_cache"]["kept_lines"] is True
    assert {k: v for k, v in scan.items() if k != "from_cache"} == first.levels["scan"]
    assert second.levels["fetch"]["lines_read_again"] == 0  # this draw's lines were kept too
    # Another draw over the cached population: no scan, its lines read from the file in one pass.
    other = _settings(tmp_path, data, n=30)
    with monkeypatch.context() as m:
        _no_scan(m)
        third = scan_fetch_check(other)
    assert third.levels["scan"]["from_cache"]["kept_lines"] is False
    assert third.levels["fetch"]["lines_read_again"] == third.levels["fetch"]["conversations_fetched"] > 0
    monkeypatch.setattr(tasks.scan.Retention, "for_settings", classmethod(lambda cls, s: None))
    fresh = scan_fetch_check(_settings(tmp_path / "elsewhere", data, n=30))
    assert third.sample.equals(fresh.sample)


def test_a_changed_file_is_scanned_again(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    data = _log(tmp_path / "logs.jsonl.gz", rows)
    s = _settings(tmp_path, data)
    scan_fetch_check(s)
    _log(data, rows[:300])  # rewritten with fewer conversations
    again = scan_fetch_check(s)
    assert "from_cache" not in again.levels["scan"] and again.levels["scan"]["rows_in"] == 300
    os.utime(data, ns=(1, 1))  # the same bytes, another modification time
    assert "from_cache" not in scan_fetch_check(s).levels["scan"]
    assert "from_cache" in scan_fetch_check(s).levels["scan"]


def test_unreadable_entry_is_a_miss_and_off_writes_nothing(tmp_path: Path, rows: list[dict[str, Any]],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    data = _log(tmp_path / "logs.jsonl.gz", rows)
    s = _settings(tmp_path, data)
    first = scan_fetch_check(s)
    (entry,) = [p for p in (tmp_path / "runs" / "cache" / "scans").iterdir() if not p.name.startswith(".")]
    (entry / "turns.parquet").write_bytes(b"PAR1 torn")
    again = scan_fetch_check(s)
    assert "from_cache" not in again.levels["scan"] and again.sample.equals(first.sample)
    assert "unreadable, scanning the log again" in caplog.text
    assert "from_cache" in scan_fetch_check(s).levels["scan"]  # the torn entry was replaced
    (entry / "meta.json").unlink()  # an eviction cut short leaves a folder without meta.json
    assert "from_cache" not in scan_fetch_check(s).levels["scan"]
    assert "from_cache" in scan_fetch_check(s).levels["scan"]  # and it does not block its key
    off = _settings(tmp_path / "off", data, scan_cache=False)
    scan_fetch_check(off)
    assert not (tmp_path / "off" / "runs" / "cache" / "scans").exists()


def test_cached_population_keeps_its_types(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    data = _log(tmp_path / "logs.jsonl.gz", rows)
    s = _settings(tmp_path, data)
    scanned = tasks.scan.draw_sample_scan(s, retain=True)[4]
    scanned.saving.join()
    cached = tasks.scan.draw_sample_scan(s, retain=True)[4]
    assert cached.cached is not None and scanned.cached is None
    assert cached.turns.schema == scanned.turns.schema
    assert cached.turns.with_columns(pl.col(pl.Categorical).cast(pl.String)).equals(
        scanned.turns.with_columns(pl.col(pl.Categorical).cast(pl.String)))
    assert cached.kept == scanned.kept and cached.time_range == scanned.time_range


def test_an_unreadable_file_is_named_with_the_cache_on(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    folder = tmp_path / "logs"
    folder.mkdir()
    _log(folder / "a.jsonl.gz", rows)
    (folder / "b.jsonl").symlink_to(tmp_path / "gone.jsonl")  # a dangling link
    from tasks.load import InputError

    with pytest.raises(InputError, match=r"b\.jsonl"):
        scan_fetch_check(_settings(tmp_path, folder))


def test_depsim_scan_fills_the_cache_that_the_next_run_reads(tmp_path: Path, rows: list[dict[str, Any]],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import run_cli

    data = _log(tmp_path / "logs.jsonl.gz", rows)
    store = tmp_path / "runs"
    cmd = ["scan", "--data", str(data), "--store", str(store), "--n", "50", "--json"]
    small = run_cli(cmd, cwd=tmp_path)            # sample.scan auto: runs load a log this small whole
    assert small.returncode == 0 and "load this log whole" in json.loads(small.stdout)["skipped"]
    assert not store.exists()
    on = {"DEPSIM_SAMPLE__SCAN": "on"}            # as the runs' configuration says
    first = run_cli(cmd, cwd=tmp_path, env=on)
    assert first.returncode == 0, first.stderr
    got = json.loads(first.stdout)
    assert got["from_cache"] is None and got["rows_in"] == 400 and got["kept_lines"] >= 50
    assert got["cache"] and (Path(got["cache"]) / "meta.json").is_file()
    again = json.loads(run_cli(cmd, cwd=tmp_path, env=on).stdout)          # nothing to do the second time
    assert again["from_cache"]["key"] == Path(got["cache"]).name and again["kept_lines"] == got["kept_lines"]
    with monkeypatch.context() as m:                                      # the run: no scan, no line read again
        _no_scan(m)
        run = scan_fetch_check(_settings(tmp_path, data))
    assert run.levels["scan"]["from_cache"]["kept_lines"] is True
    assert run.levels["fetch"]["lines_read_again"] == 0 < run.levels["fetch"]["lines_from_scan"]
    text = run_cli(["scan", "--data", str(data), "--store", str(store), "--n", "30"], cwd=tmp_path, env=on)
    assert text.returncode == 0 and "already in the scan cache" in text.stdout
    assert "no lines kept for this draw" in text.stdout                   # another draw: its lines in one pass
    off = run_cli(cmd, cwd=tmp_path, env={**on, "DEPSIM_SAMPLE__SCAN_CACHE": "false"})
    assert off.returncode == 0 and "scan_cache is false" in json.loads(off.stdout)["skipped"]
    bad = run_cli(["scan", "--data", str(tmp_path / "nope.jsonl"), "--json"], cwd=tmp_path, env=on)
    assert bad.returncode == 4 and "nope.jsonl" in json.loads(bad.stdout)["error"]
