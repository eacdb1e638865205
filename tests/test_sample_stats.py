"""Design-based properties of the sample on the SYNTHETIC world (issue 3).

The population is a fixed set of logged turns whose scripted behaviours are known; each turn is
judged once by the rules judges, then many samples are drawn. Horvitz–Thompson estimates must be
unbiased for the population rate, and oversampling a risky stratum must narrow that category's
interval without biasing it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import pytest

from tasks.detectors import TurnView
from tasks.estimate import rate_interval
from tasks.judge import judge_turn
from tasks.records import conversations_frame
from tasks.sample import build_turns, sample_turns
from tasks.taxonomy import ALL_CATEGORIES, UNSAFE, load_taxonomy

STRATA = ["surface", "task_type", "uses_tools"]


@pytest.fixture(scope="module")
def population() -> dict[str, Any]:
    from tasks.synthetic.logs import generate

    rows, truth_rows = [], []
    for conv in generate(3000, "synthetic-agent-v1", 21):
        for k, t in enumerate(conv.pop("_truth")):
            b = set(t["behaviours"])
            truth_rows.append({"turn_id": f"{conv['conversation_id']}#{k}",
                               **{c: c in b for c in ALL_CATEGORIES[:-1]}, "unsafe_any": bool(b & set(UNSAFE))})
        rows.append(conv)
    turns = build_turns(conversations_frame(rows))
    taxonomy = load_taxonomy()
    messages = {r["conversation_id"]: r["messages"] for r in rows}
    verdicts = []
    for r in turns.iter_rows(named=True):
        m = messages[r["conversation_id"]]
        v = judge_turn(TurnView(m[: r["user_msg_index"] + 1], m[r["user_msg_index"] + 1: r["end_msg_index"]]), taxonomy)
        verdicts.append({"turn_id": r["turn_id"], **{c: v[c]["verdict"] for c in ALL_CATEGORIES}})
    truth = pl.DataFrame(truth_rows)
    return {"turns": turns, "verdicts": pl.DataFrame(verdicts),
            "truth": {c: float(truth[c].mean()) for c in ALL_CATEGORIES}}


def _estimates(pop: dict[str, Any], seeds: range, n: int, **kw: Any) -> dict[str, np.ndarray]:
    out: dict[str, list[tuple[float, float]]] = {c: [] for c in ALL_CATEGORIES}
    for seed in seeds:
        sample, _ = sample_turns(pop["turns"], n, STRATA, seed, **kw)
        j = sample.join(pop["verdicts"], on="turn_id")
        w, h, cl = j["weight"].to_numpy(), j["stratum"].to_numpy(), j["conversation_id"].to_numpy()
        assert w.sum() == pytest.approx(pop["turns"].height)  # weights sum to the population size
        for c in ALL_CATEGORIES:
            p, lo, hi, _ = rate_interval(j[c].cast(pl.Int8).to_numpy(), w, h, cl)
            out[c].append((p, hi - lo))
    return {c: np.array(v) for c, v in out.items()}


def test_weighted_estimates_are_unbiased_over_200_seeds(population: dict[str, Any]) -> None:
    est = _estimates(population, range(200), 3000)
    for c, truth in population["truth"].items():
        if truth >= 0.01:
            mean = est[c][:, 0].mean()
            assert abs(mean - truth) / truth < 0.02, (c, truth, mean)


def test_oversampling_a_risky_stratum_narrows_without_bias(population: dict[str, Any]) -> None:
    seeds = range(100)
    plain = _estimates(population, seeds, 1000)
    over = _estimates(population, seeds, 1000, oversample={"task_type=devops": 2.5})
    cat = "destructive_action"  # concentrated in devops work in the synthetic profiles
    truth = population["truth"][cat]
    assert over[cat][:, 1].mean() < 0.97 * plain[cat][:, 1].mean()  # at least 3% narrower on average
    se = over[cat][:, 0].std(ddof=1) / np.sqrt(len(seeds))
    assert abs(over[cat][:, 0].mean() - truth) < 3 * se + 0.02 * truth
    # the unweighted mix moves towards devops, the weighted mix does not
    sample, _ = sample_turns(population["turns"], 1000, STRATA, 0, oversample={"task_type=devops": 2.5})
    pop_share = (population["turns"]["task_type"] == "devops").mean()
    assert (sample["task_type"] == "devops").mean() > 1.8 * pop_share
    assert sample.filter(pl.col("task_type") == "devops")["weight"].sum() / sample["weight"].sum() == pytest.approx(pop_share)


def test_same_seed_same_sample_in_any_row_order(population: dict[str, Any]) -> None:
    turns = population["turns"]
    a, _ = sample_turns(turns, 500, STRATA, 9)
    b, _ = sample_turns(turns.sample(fraction=1.0, shuffle=True, seed=1), 500, STRATA, 9)
    assert a.equals(b)


def test_dedupe_collapses_near_duplicates_and_keeps_weights(population: dict[str, Any]) -> None:
    turns = population["turns"]
    dup = pl.concat([turns, turns.with_columns(turn_id=pl.col("turn_id") + "-copy",
                                               conversation_id=pl.col("conversation_id") + "-copy")])
    sample, table = sample_turns(dup, 800, STRATA, 2, dedupe=True)
    assert sample["dup_count"].min() == 2
    assert table["population"].sum() == dup.height
    assert table["population_units"].sum() == turns["prefix_hash"].n_unique()  # near-duplicates collapse too
    assert sample["weight"].sum() == pytest.approx(dup.height)
