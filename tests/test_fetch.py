"""Scan → sample → fetch → check over Parquet logs (tasks/fetch.py, issue 13): the same sample as the
full loader on clean logs; quarantined sampled conversations replaced by the next turns in their
stratum's draw order, with weights that still sum to the scanned population."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tasks.config import load_settings
from tasks.fetch import fetch_raw, scan_fetch_check
from tasks.load import load_raw
from tasks.sample import stratum_key, unit_hash
from tasks.scan import draw_units, scan_turns
from tasks.stages import contract_check, draw_sample
from tests.conftest import synthetic_rows


def _write(path: Path, rows: list[dict[str, Any]], group: int = 200) -> Path:
    """Rows as a Parquet log with nested messages (as `depsim synth-logs` writes), several row groups."""
    frame = pl.DataFrame([{**r, "tools": json.dumps(r.get("tools") or [])} for r in rows], infer_schema_length=None)
    frame = frame.with_columns(pl.col("created_at").str.to_datetime(time_zone="UTC"))
    frame.write_parquet(path, row_group_size=group)
    return path


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    rows = synthetic_rows(900, seed=4)
    d = tmp_path_factory.mktemp("fetch")
    bad_ids = {r["conversation_id"] for i, r in enumerate(rows) if i % 9 == 4}
    broken = [{**r, "model": ""} if r["conversation_id"] in bad_ids else r for r in rows]
    return {"clean": _write(d / "clean.parquet", rows), "broken": _write(d / "broken.parquet", broken), "bad_ids": bad_ids}


def test_clean_logs_give_the_full_loaders_sample(logs: dict[str, Any]) -> None:
    s = load_settings(overrides={"run": {"data": str(logs["clean"])}, "sample": {"n": 150}})
    run = scan_fetch_check(s)
    full, _, population, _ = draw_sample(contract_check(load_raw(s.run.data), s).valid, s)
    assert run.sample["turn_id"].to_list() == full["turn_id"].to_list()
    assert run.population == population and run.levels["fetch"]["turns_replaced"] == 0
    assert run.sample["weight"].sum() == pytest.approx(population)
    assert run.checked.rows_in == run.levels["fetch"]["conversations_fetched"] == run.sample["conversation_id"].n_unique()
    assert run.checked.summary()["levels"]["scan"]["rows_in"] == 900          # the report says which level


def test_fetch_reads_exactly_the_asked_conversations_with_their_row_numbers(logs: dict[str, Any]) -> None:
    everything = load_raw(str(logs["clean"]))
    ids = {json.loads(r)["conversation_id"]: i for i, r in enumerate(everything["record"].to_list())}
    want = set(list(ids)[5:12]) | set(list(ids)[650:655]) | {"not-there"}
    got = fetch_raw(str(logs["clean"]), want)
    found = {json.loads(r)["conversation_id"]: line for r, line in zip(got["record"], got["source_line"], strict=True)}
    assert set(found) == want - {"not-there"}
    for cid, line in found.items():
        assert line == ids[cid] + 1 and got.filter(pl.col("source_line") == line)["record"][0] == everything["record"][ids[cid]]


@pytest.mark.parametrize("turns", ["all", "random"])
def test_quarantined_conversations_are_replaced_in_draw_order(logs: dict[str, Any], turns: str) -> None:
    s = load_settings(overrides={"run": {"data": str(logs["broken"])},
                                 "sample": {"n": 200, "turns": turns, "turns_per_conversation": 1}})
    run = scan_fetch_check(s)
    bad = logs["bad_ids"]
    sample = run.sample
    assert not set(sample["conversation_id"].to_list()) & bad                   # none left in
    lost = run.levels["fetch"]["turns_lost"]                                   # a stratum with no valid turn left
    assert sample.height == 200 - lost and sample["turn_id"].n_unique() == sample.height and lost <= 2
    assert run.levels["fetch"]["turns_replaced"] > 0 and run.levels["fetch"]["quarantined"] >= 1
    assert run.checked.rows_quarantined == run.levels["fetch"]["quarantined"]
    if turns == "all":
        assert sample["weight"].sum() == pytest.approx(run.population)         # still the scanned population
    else:  # one random turn per conversation: the weights estimate the turn count (no exact total)
        assert sample["weight"].sum() == pytest.approx(run.population, rel=0.15)
    # Per stratum: the n_h valid turns that come first in the draw order, none skipped.

    units = (draw_units(scan_turns(s.run.data or "").turns, s).with_columns(stratum=stratum_key(s.sample.strata))
             .filter(~pl.col("conversation_id").is_in(list(bad)))
             .with_columns(turn_id=pl.format("{}#{}", "conversation_id", "turn_index"), _k=unit_hash(s.run.seed)))
    for stratum, got in sample.group_by("stratum"):
        first = units.filter(pl.col("stratum") == stratum[0]).sort("_k").head(got.height)["turn_id"]
        assert sorted(first.to_list()) == sorted(got["turn_id"].to_list()), stratum
    if not lost:
        probs = sample["inclusion_prob"] * sample["weight"]
        assert probs.min() == pytest.approx(1.0) and probs.max() == pytest.approx(1.0)


def test_a_log_rewritten_by_polars_scans_the_same(tmp_path: Path) -> None:
    """Polars writes dictionary columns with unsigned indices (and struct fields for labels): the
    scan and the fetch read such a file like the original."""
    import subprocess
    import sys


    original = tmp_path / "synth.parquet"
    subprocess.run([sys.executable, "-m", "flows.cli", "synth-logs", "--out", str(original), "--n", "200"],
                   check=True, capture_output=True)
    rewritten = tmp_path / "rewritten.parquet"
    pl.read_parquet(original).write_parquet(rewritten)
    assert scan_turns(str(rewritten)).turns.height == scan_turns(str(original)).turns.height > 200
    s = load_settings(overrides={"run": {"data": str(rewritten)}, "sample": {"n": 60}})
    run = scan_fetch_check(s)
    assert run.checked.rows_quarantined == 0 and run.sample.height == 60
