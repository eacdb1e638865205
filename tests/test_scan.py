"""The lazy Parquet scan (tasks/scan.py) and `depsim sample` on Parquet.

The scan must see exactly the population the full loader sees (build_turns after the contract
check), draw exactly the same sample, be independent of how the log is split into files and row
groups, count every row it leaves out, and fail with one clear line on bad input.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.config import load_settings
from tasks.load import InputError, load_raw
from tasks.records import conversations_frame
from tasks.sample import build_turns, sample_turns
from tasks.scan import draw_sample_scan, scan_turns
from tasks.stages import contract_check, draw_sample
from tasks.synthetic.scale import conversations_table, write_scaled_parquet
from tests.conftest import run_cli, synthetic_rows

COLS = ["conversation_id", "turn_index", "user_msg_index", "end_msg_index", "prefix_len", "uses_tools",
        "has_response", "model", "surface", "task_type", "language", "created_at", "prefix_bucket"]


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    return synthetic_rows(400, seed=11)


@pytest.fixture(scope="module")
def nested(tmp_path_factory: pytest.TempPathFactory, rows: list[dict[str, Any]]) -> Path:
    path = tmp_path_factory.mktemp("scan") / "nested.parquet"
    pq.write_table(conversations_table(rows), path, row_group_size=70)
    return path


def _eager_turns(data: Path) -> pl.DataFrame:
    valid = contract_check(load_raw(str(data)), load_settings()).valid
    return build_turns(valid).select(COLS).sort("conversation_id", "turn_index")


def _scanned(data: Path) -> pl.DataFrame:
    turns = scan_turns(str(data)).turns
    return turns.select(COLS).with_columns(pl.col(pl.Categorical).cast(pl.String),
                                           pl.col(pl.Int32).cast(pl.Int64)).sort("conversation_id", "turn_index")


def test_nested_parquet_scan_equals_full_loader_turns(nested: Path) -> None:
    eager = _eager_turns(nested)
    assert eager.height > 400
    assert _scanned(nested).equals(eager)


def test_json_text_messages_scan_equals_full_loader_turns(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    path = tmp_path / "text.parquet"
    conversations_frame(rows).write_parquet(path, row_group_size=90)  # messages as JSON text
    assert _scanned(path).equals(_eager_turns(path))


def test_same_sample_from_scan_and_full_loader(nested: Path) -> None:
    filters = {"surfaces": ["ide", "cli"], "languages": ["python"], "min_prefix_len": 3,
               "created_after": "2026-10-05T00:00:00Z", "turns": "random", "turns_per_conversation": 1}
    for allocation, strata, extra in (("proportional", ["surface", "task_type", "uses_tools"], {}),
                                      ("equal", ["task_type", "prefix_bucket"], {}),
                                      ("proportional", ["surface", "language"], filters)):
        s = load_settings(overrides={"run": {"data": str(nested), "seed": 5,
                                             "production_models": ["synthetic-agent-v1"]},
                                     "sample": {"n": 120, "allocation": allocation, "strata": strata, **extra}})
        lazy, lazy_table, pop, _, _ = draw_sample_scan(s)
        full, full_table, pop_full, _ = draw_sample(contract_check(load_raw(str(nested)), s).valid, s)
        assert pop == pop_full
        assert lazy_table.equals(full_table)
        common = [c for c in full.columns if c in lazy.columns]
        assert set(common) >= {"turn_id", "stratum", "weight", "inclusion_prob", "uses_tools", "model"}
        assert lazy.select(common).equals(full.select(common))


def test_sample_independent_of_files_and_row_groups(tmp_path: Path, rows: list[dict[str, Any]], nested: Path) -> None:
    table = conversations_table(rows)
    split = tmp_path / "split"
    split.mkdir()
    order = list(range(len(rows)))[::-1]  # other row order too
    shuffled = table.take(pa.array(order))
    for i, (lo, hi) in enumerate(((0, 150), (150, 151), (151, 400))):
        pq.write_table(shuffled.slice(lo, hi - lo), split / f"part-{i}.parquet", row_group_size=33 + i)
    one = sample_turns(scan_turns(str(nested)).turns, 100, ["surface", "uses_tools"], seed=9)[0]
    many = sample_turns(scan_turns(str(split)).turns, 100, ["surface", "uses_tools"], seed=9)[0]
    assert one.equals(many)
    other_seed = sample_turns(scan_turns(str(split)).turns, 100, ["surface", "uses_tools"], seed=10)[0]
    assert not other_seed["turn_id"].equals(one["turn_id"])


def test_left_out_rows_are_counted(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    bad = [dict(r) for r in rows[:10]]
    bad[0]["conversation_id"] = None
    bad[1]["messages"] = []
    bad[2]["conversation_id"] = bad[3]["conversation_id"]  # duplicated id: both copies left out
    path = tmp_path / "bad.parquet"
    pq.write_table(conversations_table(bad), path)
    res = scan_turns(str(path))
    assert res.rows_in == 10
    assert res.excluded == {"missing_conversation_id": 1, "no_messages": 1, "duplicate_conversation_id": 2}
    kept = {r["conversation_id"] for r in bad[4:]}
    assert set(res.turns["conversation_id"].unique().to_list()) == kept


def test_scale_mode_writes_exact_turn_count_in_contract(tmp_path: Path) -> None:
    path = tmp_path / "scale.parquet"
    info = write_scaled_parquet(path, 5000, seed=3, pool=60, batch=700)
    assert info["turns"] == 5000
    res = scan_turns(str(path))
    assert res.turns.height == 5000 and res.rows_in == info["conversations"]
    assert res.turns["conversation_id"].n_unique() == info["conversations"]
    check = contract_check(load_raw(str(path)), load_settings())
    assert check.rows_quarantined == 0, check.by_rule


def test_sample_cli_on_parquet_scans_and_prints_contract_fields(tmp_path: Path, nested: Path) -> None:
    out = tmp_path / "s.parquet"
    r = run_cli(["sample", "--data", str(nested), "--n", "80", "--out", str(out), "--json"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["scan"] is True and res["rows_excluded"] == {} and res["rows_in"] == 400
    assert res["sampled_turns"] == 80 and res["weight_sum"] == pytest.approx(res["population_turns"])
    assert sum(v["population"] for v in res["strata"].values()) == res["population_turns"]
    frame = pl.read_parquet(out)
    assert frame.height == 80 and frame["weight"].sum() == pytest.approx(res["population_turns"])
    assert frame.schema["turn_index"] == pl.Int64 and frame.schema["surface"] == pl.String
    assert res["from_cache"] is None
    again = run_cli(["sample", "--data", str(nested), "--n", "80", "--out", str(tmp_path / "t.parquet")], cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "population from the scan cache" in again.stdout  # the first run's scan, kept in ./depsim-runs
    assert pl.read_parquet(tmp_path / "t.parquet").equals(frame)


@pytest.mark.parametrize(("args", "message"), [
    (["--strata", "surface,region"], "unknown stratum column(s): region"),
    (["--seed", "1.5"], "seed must be an integer"),
    (["--config", "{cfg}"], "population is empty after filters"),
])
def test_sample_cli_bad_input_one_line_nothing_written(tmp_path: Path, nested: Path, args: list[str], message: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sample:\n  task_types: [no-such-task]\n")
    out = tmp_path / "s.parquet"
    r = run_cli(["sample", "--data", str(nested), "--n", "50", "--out", str(out),
                 *[a.format(cfg=cfg) for a in args]], cwd=tmp_path)
    assert r.returncode != 0
    assert message in r.stderr and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.strip().splitlines() if not line.startswith("[")]  # not progress lines
    assert len(errors) == 1 and errors[0].startswith("error: ")
    assert not out.exists() and not list(tmp_path.glob(".s.*"))


def test_unreadable_parquet_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(InputError, match=r"broken\.parquet: not a readable Parquet file"):
        scan_turns(str(path))
    r = run_cli(["sample", "--data", str(path), "--n", "5", "--out", str(tmp_path / "o.parquet"), "--json"], cwd=tmp_path)
    assert r.returncode == 4 and "not a readable Parquet file" in json.loads(r.stdout)["error"]


def test_missing_columns_named(tmp_path: Path) -> None:
    path = tmp_path / "nomsg.parquet"
    pl.DataFrame({"conversation_id": ["a"], "model": ["m"]}).write_parquet(path)
    with pytest.raises(InputError, match=r"missing column.*messages"):
        scan_turns(str(path))
