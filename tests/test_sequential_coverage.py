"""Adaptive stopping keeps its intervals honest: coverage at the look where the run stopped.

The population of tests/test_delta_coverage.py (known candidate, baseline and delta truths,
clustered, stratified with unequal weights). Each of 200 repetitions draws a 2,000-turn budget,
puts it in look order and goes through 4 looks of 500 turns (tasks/sequential.py) with the real
`estimate`, `paired_delta` and `gate` at z for 1 − 0.05/4, stopping at the first look whose
overall gate is PASS or FAIL. The gates are set near the truths, so runs stop at different looks
(checked). At the stopping look every interval must hold its truth in at least 93% of
repetitions, pooled per kind (Bonferroni over the looks is conservative, so above 97% is
expected and fine here: validity under optional stopping is the requirement).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import pytest

from tasks.estimate import estimate, gate, overall, paired_delta
from tasks.sequential import at_look, look_order, look_sizes, look_z
from tests.test_delta_coverage import CATEGORIES, N_SAMPLE, _one_sample, _population

pytestmark = pytest.mark.slow

REPS, LOOKS, CHUNK = 200, 4, 250


def _gates(truth: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Limits near the truths: test_tampering regresses by ~5 points against a 4-point limit
    (FAIL, decided at a look that varies), the others far inside theirs."""
    cats = {c: {"max_rate": 0.5, "max_regression": 0.5} for c in CATEGORIES}
    cats["test_tampering"]["max_regression"] = truth["test_tampering"]["delta"] - 0.012
    return {"default": {"max_rate": 0.5, "max_regression": 0.5}, "categories": cats}


def _run(pop: dict[str, Any], z: float, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    gates = _gates(pop["truth"])
    hits: dict[str, list[bool]] = {"candidate": [], "baseline": [], "delta": []}
    stops: list[int] = []
    sizes = look_sizes(N_SAMPLE, LOOKS, CHUNK)
    for rep in range(REPS):
        scores, sample = _one_sample(pop, rng)
        ordered = look_order(sample, rep)
        for k, size in enumerate(sizes, start=1):
            used = at_look(ordered, size)
            sc = scores.filter(scores["turn_id"].is_in(used["turn_id"].implode()))
            est, deltas = estimate(sc, used, z), paired_delta(sc, used, z)
            if overall(gate(est, deltas, gates)) != "INCONCLUSIVE" or k == len(sizes):
                break
        stops.append(k)
        for r in est.iter_rows(named=True):
            hits[r["side"]].append(r["lower"] <= pop["truth"][r["category"]][r["side"]] <= r["upper"])
        for r in deltas.iter_rows(named=True):
            hits["delta"].append(r["delta_lower"] <= pop["truth"][r["category"]]["delta"] <= r["delta_upper"])
    return {"hits": hits, "stops": stops}


@pytest.fixture(scope="module")
def runs() -> dict[str, Any]:
    pop = _population()
    return {"bonferroni": _run(pop, look_z(LOOKS), 11)}


def test_looks_keep_the_design() -> None:
    pop = _population()
    _, sample = _one_sample(pop, np.random.default_rng(1))
    ordered = look_order(sample, 3)
    assert look_sizes(N_SAMPLE, LOOKS, CHUNK) == [500, 1000, 1500, 2000]
    assert look_sizes(N_SAMPLE, 1, CHUNK) == [N_SAMPLE] and look_sizes(600, 4, 250) == [250, 500, 600]
    full = dict(sample.group_by("stratum").agg(w=pl.col("weight").sum()).iter_rows())
    for size in (500, 1000):
        look = at_look(ordered, size)
        assert look.height == size
        got = dict(look.group_by("stratum").agg(w=pl.col("weight").sum()).iter_rows())
        assert got.keys() == full.keys() and all(abs(got[h] - full[h]) < 1e-6 * full[h] for h in full)
        share = dict(look.group_by("stratum").len().iter_rows())
        for h, n_h in share.items():  # each stratum in its sampled share, within one turn
            assert abs(n_h - size / len(full)) <= 1, (size, h, n_h)


def test_runs_stop_at_different_looks(runs: dict[str, Any]) -> None:
    stops = runs["bonferroni"]["stops"]
    assert len(set(stops)) >= 2, stops
    assert 1 in stops or 2 in stops  # some runs save turns


@pytest.mark.parametrize("kind", ["candidate", "baseline", "delta"])
def test_coverage_holds_at_the_stopping_look(runs: dict[str, Any], kind: str) -> None:
    hits = runs["bonferroni"]["hits"][kind]
    assert len(hits) == REPS * len(CATEGORIES)
    assert float(np.mean(hits)) >= 0.93, f"{kind} coverage {np.mean(hits):.3f}"
