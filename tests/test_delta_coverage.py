"""Coverage of the candidate, baseline and paired-delta intervals over 200 repeated samples.

A simulated deployment whose truths are known exactly, run through the real `estimate` and
`paired_delta` on real Polars tables of the shapes the pipeline passes them (scores, sample).

The population is fixed (one seed): conversations of one to five turns in six strata of
unequal size and risk, a conversation-level random effect per category (turns of one
conversation are correlated), and a logged (baseline) 0/1 outcome per turn and category drawn
once. The candidate replays each sampled turn afresh: it repeats a logged positive with
probability `KEEP` and otherwise shows the behaviour with the turn's own candidate propensity,
so the two sides are positively correlated within a pair, as a replay of the same prefix is.
What each interval estimates is then known exactly:

* baseline: the population mean of the logged outcomes (fixed values, sampling is the only
  randomness);
* candidate: the population mean of each turn's candidate probability;
* delta: their difference.

Each repetition draws a stratified sample of turns (equal allocation over strata, so weights
are unequal; several turns of one conversation may be drawn, so conversations are clusters),
replays the candidate, and asks whether each 95% interval holds its truth. Rates span 0.5% to
10% (the rare outcomes the gate cares about), with deltas from −2 to +4 points and zero.
Coverage is pooled over categories, 200 × 6 intervals per kind, and must lie in 93–97%:
below, the intervals are too narrow to trust; above, they waste turns.

The sampling fraction stays under 6% in every stratum: the estimator, like the pipeline's
design, has no finite-population correction, so a large fraction would over-cover by design.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import pytest

from tasks.estimate import estimate, paired_delta

pytestmark = pytest.mark.slow

REPS, N_SAMPLE, N_CONVERSATIONS = 200, 2000, 26_000
KEEP = 0.4  # P(the candidate repeats a logged positive of the same turn)
# category: (baseline base rate, candidate propensity base rate) before stratum multipliers
CATEGORIES: dict[str, tuple[float, float]] = {
    "destructive_action": (0.005, 0.003),
    "secret_exposure": (0.010, 0.010),
    "insecure_code": (0.020, 0.015),
    "test_tampering": (0.020, 0.075),
    "false_success_claim": (0.050, 0.060),
    "over_refusal": (0.100, 0.060),
}
STRATUM_SHARE = np.array([0.30, 0.22, 0.16, 0.12, 0.10, 0.10])
STRATUM_RISK = np.array([0.5, 0.8, 1.0, 1.5, 2.5, 4.0])


def _population(seed: int = 7) -> dict[str, Any]:
    """The fixed population: per turn its stratum, conversation, logged outcomes and candidate probabilities."""
    rng = np.random.default_rng(seed)
    conv_stratum = rng.choice(len(STRATUM_SHARE), size=N_CONVERSATIONS, p=STRATUM_SHARE)
    turns_per = rng.integers(1, 6, size=N_CONVERSATIONS)
    conv = np.repeat(np.arange(N_CONVERSATIONS), turns_per)
    stratum = conv_stratum[conv]
    n_turns = len(conv)
    yb: dict[str, np.ndarray] = {}
    pc: dict[str, np.ndarray] = {}
    for cat, (base_b, base_c) in CATEGORIES.items():
        # Conversation effect (log-normal, mean 1): turns of one conversation share their risk.
        u = np.exp(rng.normal(-0.5 * 0.6**2, 0.6, size=N_CONVERSATIONS))[conv]
        risk = STRATUM_RISK[stratum] * u / STRATUM_RISK[conv_stratum].mean()
        p_b = np.clip(base_b * risk, 0, 1)
        yb[cat] = rng.random(n_turns) < p_b
        # Without the logged positive, the candidate's own propensity; scaled so that the
        # population candidate rate is near base_c whatever KEEP does.
        own = np.clip(base_c * risk, 0, 1)
        pc[cat] = np.where(yb[cat], KEEP + (1 - KEEP) * own, (1 - KEEP) * own)
    truth = {cat: {"candidate": float(pc[cat].mean()), "baseline": float(yb[cat].mean())} for cat in CATEGORIES}
    for t in truth.values():
        t["delta"] = t["candidate"] - t["baseline"]
    return {"conv": conv, "stratum": stratum, "yb": yb, "pc": pc, "truth": truth}


def _one_sample(pop: dict[str, Any], rng: np.random.Generator) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(scores, sample) for one stratified sample of turns and one replay of the candidate."""
    stratum = pop["stratum"]
    n_h = N_SAMPLE // len(STRATUM_SHARE)
    picked, weights = [], []
    for h in range(len(STRATUM_SHARE)):
        members = np.flatnonzero(stratum == h)
        take = rng.choice(members, size=n_h, replace=False)
        picked.append(take)
        weights.append(np.full(n_h, len(members) / n_h))
    idx = np.concatenate(picked)
    turn_id = np.array([f"t{i}" for i in idx])
    conv_id = np.array([f"c{c}" for c in pop["conv"][idx]])
    sample = pl.DataFrame({"turn_id": turn_id, "conversation_id": conv_id, "weight": np.concatenate(weights),
                           "stratum": np.array([f"s{h}" for h in stratum[idx]])})
    frames = []
    for cat in CATEGORIES:
        yc = rng.random(len(idx)) < pop["pc"][cat][idx]
        for side, verdict in (("candidate", yc), ("baseline", pop["yb"][cat][idx])):
            frames.append(pl.DataFrame({"turn_id": turn_id, "conversation_id": conv_id,
                                        "side": side, "model": f"{side}-model", "category": cat,
                                        "verdict": verdict}))
    return pl.concat(frames), sample


@pytest.fixture(scope="module")
def coverage() -> dict[str, Any]:
    pop = _population()
    rng = np.random.default_rng(2026)
    hits: dict[str, list[bool]] = {"candidate": [], "baseline": [], "delta": []}
    per_cat: dict[tuple[str, str], list[bool]] = {}
    for _ in range(REPS):
        scores, sample = _one_sample(pop, rng)
        est = estimate(scores, sample)
        deltas = paired_delta(scores, sample)
        for r in est.iter_rows(named=True):
            t = pop["truth"][r["category"]][r["side"]]
            hit = r["lower"] <= t <= r["upper"]
            hits[r["side"]].append(hit)
            per_cat.setdefault((r["category"], r["side"]), []).append(hit)
        for r in deltas.iter_rows(named=True):
            t = pop["truth"][r["category"]]["delta"]
            hit = r["delta_lower"] <= t <= r["delta_upper"]
            hits["delta"].append(hit)
            per_cat.setdefault((r["category"], "delta"), []).append(hit)
    return {"pop": pop, "hits": hits, "per_cat": per_cat}


def test_population_spans_rare_rates_and_deltas(coverage: dict[str, Any]) -> None:
    truth = coverage["pop"]["truth"]
    rates = [t[side] for t in truth.values() for side in ("candidate", "baseline")]
    assert 0.003 <= min(rates) <= 0.006 and 0.08 <= max(rates) <= 0.12
    deltas = sorted(t["delta"] for t in truth.values())
    assert deltas[0] < -0.01 and deltas[-1] > 0.02 and any(abs(d) < 0.002 for d in deltas)
    pop = coverage["pop"]
    fractions = [N_SAMPLE / len(STRATUM_SHARE) / np.sum(pop["stratum"] == h) for h in range(len(STRATUM_SHARE))]
    assert max(fractions) < 0.06


@pytest.mark.parametrize("kind", ["candidate", "baseline", "delta"])
def test_interval_coverage_is_nominal(coverage: dict[str, Any], kind: str) -> None:
    hits = coverage["hits"][kind]
    assert len(hits) == REPS * len(CATEGORIES)
    rate = float(np.mean(hits))
    per_cat = {cat: float(np.mean(h)) for (cat, k), h in coverage["per_cat"].items() if k == kind}
    assert 0.93 <= rate <= 0.97, f"{kind} coverage {rate:.3f}; per category {per_cat}"
    # No category hides a failure behind the pooled figure (200 draws: ±3 SE around 95%).
    assert min(per_cat.values()) >= 0.90, per_cat
