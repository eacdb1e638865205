"""Design-based properties of the sample on the SYNTHETIC world (issue 3).

The population is a fixed set of ~6,400 logged turns. Every turn is judged once by the `rules`
judge panel (tasks.judges.JudgePanel, the run's default panel), then many samples are drawn
from it. What the estimator targets is the population rate of those *verdicts*: whether the
verdicts are right is the judges' business (tests/test_rules_judges.py, judge-eval, and the
Rogan–Gladen correction of tasks/judges/calibrate.py with tests/test_corrected_coverage.py).
So here the reference is the population mean of the same verdicts, computed once over all
turns; the estimator never sees it. Horvitz–Thompson estimates must be unbiased for it, their
intervals must cover it, and oversampling a risky stratum must narrow that category's interval
without biasing it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import polars as pl
import pytest

from tasks.estimate import rate_interval
from tasks.judges import JudgePanel
from tasks.judges.evaluate import views_of
from tasks.records import conversations_frame
from tasks.sample import build_turns, sample_turns
from tasks.taxonomy import ALL_CATEGORIES, load_taxonomy

STRATA = ["surface", "task_type", "uses_tools"]


def _judge_population(conversations: pl.DataFrame) -> pl.DataFrame:
    """One row per answered turn: turn_id and the rules panel's combined verdict per category.

    The 0/1 outcome is "flagged" (verdict True); an unscored verdict counts as not flagged.
    Any fixed 0/1 value per turn is a valid target for the design-based properties tested
    here, and the population mean and the estimates below read the very same values.
    """
    panel = JudgePanel(load_taxonomy(), ["rules"])
    views = [v for row in conversations.select("conversation_id", "model", "messages", "tools").iter_rows(named=True)
             for v in views_of(row)]

    async def go() -> list[Any]:
        try:
            return await panel.judge_all(views)
        finally:
            await panel.aclose()

    results = asyncio.run(go())
    return pl.DataFrame([{"turn_id": v.turn_id, **{c: combined[c].verdict is True for c in ALL_CATEGORIES}}
                         for v, (combined, _per_judge) in zip(views, results, strict=True)])


@pytest.fixture(scope="module")
def population() -> dict[str, Any]:
    from tasks.synthetic.logs import generate

    rows = []
    for conv in generate(3000, "synthetic-agent-v1", 21):
        conv.pop("_truth")
        rows.append(conv)
    conversations = conversations_frame(rows)
    turns = build_turns(conversations)
    verdicts = _judge_population(conversations)
    # every turn of the population is judged exactly once
    assert verdicts["turn_id"].is_unique().all() and set(verdicts["turn_id"]) == set(turns["turn_id"])
    rates = {c: float(verdicts[c].to_numpy().mean()) for c in ALL_CATEGORIES}
    print("population verdict rates:", {c: round(r, 4) for c, r in rates.items()})
    return {"turns": turns, "verdicts": verdicts, "rate": rates}


def _estimates(pop: dict[str, Any], seeds: range, n: int, **kw: Any) -> dict[str, np.ndarray]:
    """Per category an array of (estimate, lower, upper) over the seeds."""
    out: dict[str, list[tuple[float, float, float]]] = {c: [] for c in ALL_CATEGORIES}
    for seed in seeds:
        sample, _ = sample_turns(pop["turns"], n, STRATA, seed, **kw)
        j = sample.join(pop["verdicts"], on="turn_id")
        assert j.height == sample.height == n
        w, h, cl = j["weight"].to_numpy(), j["stratum"].to_numpy(), j["conversation_id"].to_numpy()
        assert w.sum() == pytest.approx(pop["turns"].height)  # weights sum to the population size
        for c in ALL_CATEGORIES:
            p, lo, hi, _ = rate_interval(j[c].cast(pl.Int8).to_numpy(), w, h, cl)
            out[c].append((p, lo, hi))
    return {c: np.array(v) for c, v in out.items()}


def _check_unbiased(est: dict[str, np.ndarray], rates: dict[str, float], label: str) -> None:
    """Mean estimate over the seeds vs the population rate, for every category with rate ≥ 1%.

    Tolerance: 2% of the rate, or 4 standard errors of the mean over the seeds where that is
    larger (a category of 1% at n = 3,000 has a relative standard error of the mean of ~1%,
    so a fixed 2% alone would fail a correct estimator by chance about once in twenty).
    A weighting error (e.g. ignoring the weights of an oversampled stratum) biases by far more.
    """
    checked = 0
    for c, rate in rates.items():
        if rate < 0.01:
            continue
        checked += 1
        p = est[c][:, 0]
        se = p.std(ddof=1) / np.sqrt(len(p))
        print(f"{label} {c}: population {rate:.5f}, mean estimate {p.mean():.5f}, "
              f"bias {(p.mean() - rate) / rate:+.2%}, se of the mean {se / rate:.2%}")
        assert abs(p.mean() - rate) < max(0.02 * rate, 4 * se), (label, c, rate, p.mean(), se)
    assert checked >= 5  # the test is about the common categories; it must not pass on none


def test_weighted_estimates_are_unbiased_over_200_seeds(population: dict[str, Any]) -> None:
    est = _estimates(population, range(200), 3000)
    _check_unbiased(est, population["rate"], "proportional")
    # The 95% intervals cover the population rate: the variance ignores the finite-population
    # correction (3,000 of ~6,400 turns), so they are conservative here (≥ 95% expected).
    covered = total = 0
    for c, rate in population["rate"].items():
        if rate >= 0.01:
            inside = (est[c][:, 1] <= rate) & (rate <= est[c][:, 2])
            print(f"interval coverage {c}: {inside.mean():.3f}")
            assert inside.mean() >= 0.90, (c, inside.mean())
            covered, total = covered + int(inside.sum()), total + len(inside)
    assert covered / total >= 0.95, covered / total


def test_oversampling_a_risky_stratum_narrows_without_bias(population: dict[str, Any]) -> None:
    seeds = range(100)
    cat = "destructive_action"  # concentrated in devops work in the synthetic profiles
    turns, verdicts = population["turns"], population["verdicts"]
    by_task = turns.select("turn_id", "task_type").join(verdicts.select("turn_id", cat), on="turn_id")
    devops = float(by_task.filter(pl.col("task_type") == "devops")[cat].to_numpy().mean())
    rest = float(by_task.filter(pl.col("task_type") != "devops")[cat].to_numpy().mean())
    # The premise: the verdicts, not only the true behaviours, concentrate in devops.
    assert devops >= 3 * rest, f"premise: {cat} verdicts are not concentrated in devops ({devops} vs {rest})"
    plain = _estimates(population, seeds, 1000)
    over = _estimates(population, seeds, 1000, oversample={"task_type=devops": 2.5})
    rate = population["rate"][cat]
    width_plain = (plain[cat][:, 2] - plain[cat][:, 1]).mean()
    width_over = (over[cat][:, 2] - over[cat][:, 1]).mean()
    print(f"{cat}: mean width plain {width_plain:.5f}, oversampled {width_over:.5f}")
    assert width_over < 0.97 * width_plain  # at least 3% narrower on average
    se = over[cat][:, 0].std(ddof=1) / np.sqrt(len(seeds))
    assert abs(over[cat][:, 0].mean() - rate) < 3 * se + 0.02 * rate
    # The oversampled design is unequally weighted: every common category stays unbiased.
    _check_unbiased(over, population["rate"], "oversampled")
    # the unweighted mix moves towards devops, the weighted mix does not
    sample, _ = sample_turns(turns, 1000, STRATA, 0, oversample={"task_type=devops": 2.5})
    pop_share = (turns["task_type"] == "devops").mean()
    assert (sample["task_type"] == "devops").mean() > 1.8 * pop_share
    assert sample.filter(pl.col("task_type") == "devops")["weight"].sum() / sample["weight"].sum() == pytest.approx(pop_share)
    # ... and the unweighted mean would be biased for the concentrated category: weights matter here.
    unweighted = np.mean([sample_turns(turns, 1000, STRATA, s, oversample={"task_type=devops": 2.5})[0]
                          .join(verdicts.select("turn_id", cat), on="turn_id")[cat].mean() for s in range(20)])
    assert unweighted > 1.3 * rate, (unweighted, rate)


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
