"""Unit tests for the turn population and the stratified sample (tasks/sample.py)."""

from __future__ import annotations

from typing import Any

import polars as pl
import pytest

from tasks.records import SAMPLE_EXTRA, TURN_SCHEMA, conversations_frame
from tasks.sample import SampleError, build_turns, sample_turns, turns_of


def u(text: str = "do it") -> dict[str, Any]:
    return {"role": "user", "content": text}


def a(text: str = "ok", calls: bool = False) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        msg["tool_calls"] = [{"id": "x", "type": "function", "function": {"name": "shell", "arguments": "{}"}}]
    return msg


def population(sizes: dict[str, int], turns_per_conv: int = 1) -> pl.DataFrame:
    """A turn population with `surface` strata of the given sizes (in turns)."""
    rows = []
    for surface, size in sizes.items():
        for k in range(size):
            conv, idx = divmod(k, turns_per_conv)
            cid = f"{surface}-{conv}"
            rows.append({"turn_id": f"{cid}#{idx}", "conversation_id": cid, "turn_index": idx,
                         "user_msg_index": 2 * idx, "end_msg_index": 2 * idx + 2, "prefix_len": 2 * idx + 1,
                         "uses_tools": False, "model": "prod", "surface": surface,
                         "task_type": "bugfix" if k % 2 else "feature", "language": "python"})
    return pl.DataFrame(rows, schema=TURN_SCHEMA)


def per_stratum(sample: pl.DataFrame) -> dict[str, int]:
    return dict(sample.group_by("stratum").len().iter_rows())


# --- turns_of / build_turns -------------------------------------------------------------

def test_turns_of_splits_on_user_messages() -> None:
    msgs = [{"role": "system", "content": "s"}, u(), a("run", calls=True),
            {"role": "tool", "tool_call_id": "x", "content": "out"}, a("done"), u("again"), a("sure"), u("bye")]
    assert turns_of(msgs) == [(1, 5, True, True), (5, 7, False, True), (7, 8, False, False)]


def test_turns_of_without_user_messages() -> None:
    assert turns_of([{"role": "system", "content": "s"}]) == []
    assert turns_of([]) == []


def test_build_turns_population() -> None:
    convs = conversations_frame([
        {"conversation_id": "c1", "model": "m1", "created_at": "2024-01-01T00:00:00Z", "surface": "ide",
         "task_type": "bugfix", "language": "go", "messages": [u(), a(calls=True), {"role": "tool",
                                                                                    "tool_call_id": "x",
                                                                                    "content": "r"}, a(), u(), a()]},
        {"conversation_id": "c2", "model": "m1", "created_at": "2024-01-01T00:00:00Z",
         "messages": [{"role": "system", "content": "s"}, u()]},
    ])
    turns = build_turns(convs)
    assert turns.schema == pl.Schema({**TURN_SCHEMA, "has_response": pl.Boolean,
                                      "created_at": pl.Datetime("us", "UTC"), "prefix_bucket": pl.String,
                                      "prefix_hash": pl.String})
    assert turns["turn_id"].to_list() == ["c1#0", "c1#1", "c2#0"]
    assert turns.select("user_msg_index", "end_msg_index", "prefix_len").rows() == [(0, 4, 1), (4, 6, 5), (1, 2, 2)]
    assert turns["uses_tools"].to_list() == [True, False, False]
    assert turns["has_response"].to_list() == [True, True, False]
    assert turns.row(0, named=True)["language"] == "go"
    assert turns.row(2, named=True)["surface"] is None


def test_build_turns_on_synthetic_logs() -> None:
    from tasks.synthetic.logs import generate

    convs = [c for c in generate(30, "synthetic-agent-v1", 7)]
    for c in convs:
        c.pop("_truth")
    turns = build_turns(conversations_frame(convs))
    n_users = sum(1 for c in convs for m in c["messages"] if m["role"] == "user")
    assert turns.height == n_users
    assert turns["turn_id"].n_unique() == n_users
    assert set(turns["conversation_id"]) == {c["conversation_id"] for c in convs}


# --- sample_turns -----------------------------------------------------------------------

SIZES = {"ide": 600, "cli": 300, "web": 100}


@pytest.mark.parametrize("n", [3, 10, 57, 200, 999])
def test_weights_sum_to_population_size(n: int) -> None:
    turns = population(SIZES)
    sample, table = sample_turns(turns, n, ["surface"], seed=1)
    assert sample.height == n
    assert sample["weight"].sum() == pytest.approx(turns.height)
    assert set(sample["stratum"]) == set(SIZES)
    assert table["sampled"].sum() == n and table["population"].sum() == turns.height


def test_weights_sum_to_population_with_tiny_strata() -> None:
    turns = population({"a": 1, "b": 1, "c": 98})
    sample, _ = sample_turns(turns, 3, ["surface"], seed=1)
    assert set(sample["stratum"]) == {"a", "b", "c"}
    assert sample["weight"].sum() == pytest.approx(100)


def test_sample_columns_and_weights() -> None:
    sample, table = sample_turns(population(SIZES), 100, ["surface"], seed=3)
    for col, dtype in SAMPLE_EXTRA.items():
        assert sample.schema[col] == dtype
    assert not [c for c in sample.columns if c.startswith("_")]
    assert (sample["weight"] * sample["inclusion_prob"]).to_list() == pytest.approx([1.0] * 100)
    assert sample["turn_id"].is_sorted()
    assert table.columns == ["stratum", "sampled", "population"]


def test_proportional_allocation_shares() -> None:
    sample, table = sample_turns(population(SIZES), 100, ["surface"], seed=3)
    assert per_stratum(sample) == {"ide": 60, "cli": 30, "web": 10}
    assert dict(zip(table["stratum"], table["sampled"], strict=True)) == {"ide": 60, "cli": 30, "web": 10}
    assert set(sample["weight"]) == {10.0}


def test_proportional_allocation_largest_remainder() -> None:
    sample, _ = sample_turns(population({"a": 50, "b": 30, "c": 20}), 7, ["surface"], seed=0)
    assert per_stratum(sample) == {"a": 4, "b": 2, "c": 1}  # 3.5 / 2.1 / 1.4


def test_equal_allocation_and_small_stratum_warning() -> None:
    sample, _ = sample_turns(population(SIZES), 30, ["surface"], seed=0, allocation="equal")
    assert per_stratum(sample) == {"ide": 10, "cli": 10, "web": 10}
    with pytest.warns(UserWarning, match="smaller than their allocation"):
        sample, _ = sample_turns(population({"a": 60, "b": 30, "c": 2}), 30, ["surface"], seed=0, allocation="equal")
    counts = per_stratum(sample)
    assert counts["c"] == 2 and sum(counts.values()) == 30
    assert sample["weight"].sum() == pytest.approx(92)


def test_same_seed_same_sample_and_different_seed_differs() -> None:
    turns = population(SIZES)
    s1, _ = sample_turns(turns, 50, ["surface"], seed=11)
    s2, _ = sample_turns(turns.sample(fraction=1.0, shuffle=True, seed=5), 50, ["surface"], seed=11)
    s3, _ = sample_turns(turns, 50, ["surface"], seed=12)
    assert s1.equals(s2)  # independent of input row order
    assert set(s1["turn_id"]) != set(s3["turn_id"])
    assert per_stratum(s1) == per_stratum(s3)


def test_multiple_strata_columns_and_nulls() -> None:
    turns = population({"ide": 40, "cli": 20}).with_columns(
        language=pl.when(pl.col("turn_id").str.ends_with("0#0")).then(None).otherwise(pl.col("language")))
    sample, table = sample_turns(turns, 60, ["surface", "language"], seed=0)
    assert set(table["stratum"]) == {"ide|python", "ide|∅", "cli|python", "cli|∅"}
    assert sample.height == 60


def test_no_strata_is_one_stratum() -> None:
    sample, table = sample_turns(population(SIZES), 10, [], seed=0)
    assert set(sample["stratum"]) == {"all"} and set(sample["weight"]) == {100.0}
    assert table.rows() == [("all", 10, 1000)]


def test_unknown_stratum_column_raises_naming_it() -> None:
    with pytest.raises(SampleError, match="surfce"):
        sample_turns(population(SIZES), 10, ["surface", "surfce"], seed=0)


def test_empty_population_raises() -> None:
    with pytest.raises(SampleError, match="empty"):
        sample_turns(pl.DataFrame(schema=TURN_SCHEMA), 10, ["surface"], seed=0)


@pytest.mark.parametrize("seed", [1.5, "7", None, True])
def test_non_int_seed_raises(seed: Any) -> None:
    with pytest.raises(SampleError, match="seed"):
        sample_turns(population(SIZES), 10, ["surface"], seed=seed)


def test_n_larger_than_population_takes_all_with_weight_one() -> None:
    turns = population({"ide": 7, "cli": 3})
    sample, table = sample_turns(turns, 1000, ["surface"], seed=0)
    assert sorted(sample["turn_id"]) == sorted(turns["turn_id"])
    assert set(sample["weight"]) == {1.0} and set(sample["inclusion_prob"]) == {1.0}
    assert table["sampled"].to_list() == table["population"].to_list()


def test_last_turn_keeps_one_turn_per_conversation() -> None:
    turns = population({"ide": 30, "cli": 12}, turns_per_conv=3)  # 10 + 4 conversations
    sample, table = sample_turns(turns, 1000, ["surface"], seed=0, turn_choice="last")
    assert sample.height == 14
    assert sample["conversation_id"].n_unique() == 14
    assert set(sample["turn_index"]) == {2}
    assert table["population"].sum() == 14
    small, _ = sample_turns(turns, 7, ["surface"], seed=0, turn_choice="last")
    assert small["conversation_id"].n_unique() == 7
    assert small["weight"].sum() == pytest.approx(14)


def test_random_turn_choice_weights_cover_all_turns() -> None:
    turns = population({"ide": 30, "cli": 12}, turns_per_conv=3)
    sample, _ = sample_turns(turns, 1000, ["surface"], seed=0, turn_choice="random")
    assert sample.height == 14 and sample["conversation_id"].n_unique() == 14
    assert sample["inclusion_prob"].to_list() == pytest.approx([1 / 3] * 14)
    assert sample["weight"].sum() == pytest.approx(turns.height)
    other, _ = sample_turns(turns, 1000, ["surface"], seed=1, turn_choice="random")
    assert set(other["turn_id"]) != set(sample["turn_id"])
    two, _ = sample_turns(turns, 1000, ["surface"], seed=0, turn_choice="random", turns_per_conversation=2)
    assert two.height == 28 and two["weight"].sum() == pytest.approx(turns.height)
