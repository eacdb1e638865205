"""Statistical acceptance of the Rogan–Gladen corrected rates against the SYNTHETIC world's truth.

A fixed population of ~20k logged turns with known behaviours (`_truth`) is judged once by an
imperfect judge with known per-category sensitivity and specificity (tasks.synthetic.judge:
deterministic per turn and category, as a real judge is). Each of 200 repetitions draws a fresh
stratified sample of 2,000 deployment turns, estimates the raw rates through the real estimator
(`estimate`, design-effective n), draws a fresh labelled calibration sample of 1,500 other turns
(turns not in that repetition's deployment sample), and corrects with `corrected`. The truth is
the population mean; the estimator and the correction never see it.

Why the calibration turns come from the same traffic (and not a second, separately generated
population): a 20k-turn population has only 100–1,000 positives per category, so one judge's
realised error rates on it differ from those on another small population by about as much as
a 1,500-turn calibration sample's own noise (e.g. sensitivity 0.81 vs 0.90 for
destructive_action with world seeds 31/32), a fixed bias repeated in all 200 repetitions. A
production population of millions of turns has no such gap; what the interval claims to cover
is the uncertainty of the two samples, so that is what the test measures. (A calibration set
that is not representative of the traffic is a bias no interval can cover.)

Acceptance (issue): pooled over the categories where correction is meaningful, the corrected 95%
intervals contain the true rate in 93–97% of repetitions; each such category ≥ 88%; the raw
intervals, biased by the judge's errors, cover clearly less (< 80% pooled), so the test is not
vacuous. Run with `-s` to print the figures.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import polars as pl
import pytest

from tasks.estimate import corrected, estimate
from tasks.judges.calibrate import Counts, judge_entry, validate
from tasks.records import conversations_frame
from tasks.sample import build_turns, sample_turns
from tasks.taxonomy import AGGREGATE, ALL_CATEGORIES, CATEGORIES, UNSAFE

pytestmark = pytest.mark.slow

MODEL = "synthetic-agent-v1"
N_CONV = 9000  # ≈ 19,700 turns
N_SAMPLE, N_CAL, REPS = 2000, 1500, 200
STRATA = ["surface", "task_type", "uses_tools"]
MAX_NONE_SHARE = 0.1  # a category is "meaningful" when corrected in ≥ 90% of repetitions

# The imperfect judge. Its behaviour on a turn is fixed (a hash of the turn and the category),
# as a real judge's is; unsafe_any is what a panel reports: any of the nine unsafe verdicts.
SENSITIVITY = {"destructive_action": 0.85, "secret_exposure": 0.9, "data_exfiltration": 0.8,
               "unauthorized_access": 0.75, "insecure_code": 0.7, "test_tampering": 0.85,
               "false_success_claim": 0.75, "prompt_injection_followed": 0.8, "harmful_content": 0.9,
               "over_refusal": 0.8}
SPECIFICITY = {"destructive_action": 0.98, "secret_exposure": 0.99, "data_exfiltration": 0.985,
               "unauthorized_access": 0.98, "insecure_code": 0.97, "test_tampering": 0.98,
               "false_success_claim": 0.95, "prompt_injection_followed": 0.98, "harmful_content": 0.995,
               "over_refusal": 0.97}


def _own_scripted_verdicts(truth: frozenset[str], turn_key: str, categories: list[str],
                           sens: Mapping[str, float], spec: Mapping[str, float]) -> dict[str, bool]:
    """Same contract as tasks.synthetic.judge.scripted_verdicts (used when that is absent)."""
    out = {}
    for c in categories:
        u = int.from_bytes(hashlib.sha256(f"{turn_key}|{c}".encode()).digest()[:8], "big") / 2**64
        out[c] = u < sens.get(c, 1.0) if c in truth else u >= spec.get(c, 1.0)
    return out


def _judge() -> tuple[Callable[..., dict[str, bool]], dict[str, float], dict[str, float], str]:
    """The synthetic world's scripted judge when there is one, else the equivalent above."""
    try:
        from tasks.synthetic.judge import SENSITIVITY as SE
        from tasks.synthetic.judge import SPECIFICITY as SP
        from tasks.synthetic.judge import scripted_verdicts
    except ImportError:
        return _own_scripted_verdicts, SENSITIVITY, SPECIFICITY, "test's own scripted judge"
    return scripted_verdicts, dict(SE), dict(SP), "tasks.synthetic.judge.scripted_verdicts"


def _truth_and_verdicts(truth_rows: list[dict[str, Any]], judge: Callable[..., dict[str, bool]],
                        sens: dict[str, float], spec: dict[str, float]) -> pl.DataFrame:
    """One row per turn: turn_id, truth `t_<category>` and verdict `v_<category>` columns."""
    base = list(CATEGORIES)
    rows = []
    for r in truth_rows:
        truth = {c: c in r["behaviours"] for c in base}
        truth[AGGREGATE] = any(truth[c] for c in UNSAFE)
        v = judge(frozenset(c for c in base if truth[c]), r["turn_id"], base, sens, spec)
        verdicts = {c: bool(v[c]) for c in base}
        verdicts[AGGREGATE] = any(verdicts[c] for c in UNSAFE)
        rows.append({"turn_id": r["turn_id"], **{f"t_{c}": truth[c] for c in ALL_CATEGORIES},
                     **{f"v_{c}": verdicts[c] for c in ALL_CATEGORIES}})
    return pl.DataFrame(rows)


def _generate(n: int, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from tasks.synthetic.logs import generate

    convs, truth = [], []
    for conv in generate(n, MODEL, seed):
        for k, t in enumerate(conv.pop("_truth")):
            truth.append({"turn_id": f"{conv['conversation_id']}#{k}", "behaviours": set(t["behaviours"])})
        convs.append(conv)
    return convs, truth


@pytest.fixture(scope="module")
def world() -> dict[str, Any]:
    judge, sens, spec, judge_name = _judge()
    convs, truth_rows = _generate(N_CONV, 31)
    turns = build_turns(conversations_frame(convs))
    judged = _truth_and_verdicts(truth_rows, judge, sens, spec)
    assert judged.height == turns.height
    return {"turns": turns, "judged": judged, "judge": judge_name,
            "row_of": {t: i for i, t in enumerate(judged["turn_id"].to_list())},
            "truth": {c: float(np.mean(judged[f"t_{c}"].to_numpy())) for c in ALL_CATEGORIES},
            "label": {c: judged[f"t_{c}"].to_numpy() for c in ALL_CATEGORIES},
            "verdict": {c: judged[f"v_{c}"].to_numpy() for c in ALL_CATEGORIES}}


def _calibration(world: dict[str, Any], sampled: pl.Series, rng: np.random.Generator) -> Any:
    """A labelled calibration set of N_CAL turns outside the deployment sample, as judge-eval writes it."""
    outside = np.ones(len(world["row_of"]), dtype=bool)
    outside[[world["row_of"][t] for t in sampled.to_list()]] = False
    others = np.flatnonzero(outside)
    idx = rng.choice(others, N_CAL, replace=False)
    counts = {}
    for c in ALL_CATEGORIES:
        y, v = world["label"][c][idx], world["verdict"][c][idx]
        counts[c] = Counts(tp=int((y & v).sum()), fp=int((~y & v).sum()), tn=int((~y & ~v).sum()),
                           fn=int((y & ~v).sum()))
    return validate({"version": 1, "created_at": "2026-11-01T00:00:00Z", "data": ["synthetic"], "data_hash": "x",
                     "unit": "turn", "turns_per_unit": 1, "panel": ["scripted"],
                     "judges": {"combined": judge_entry({"kind": "scripted"}, counts)}})


def _scores(sample: pl.DataFrame, judged: pl.DataFrame) -> pl.DataFrame:
    j = sample.select("turn_id", "conversation_id").join(judged.select("turn_id", pl.selectors.starts_with("v_")),
                                                          on="turn_id")
    long = j.unpivot(index=["turn_id", "conversation_id"], on=[f"v_{c}" for c in ALL_CATEGORIES],
                     variable_name="category", value_name="verdict")
    return long.with_columns(category=pl.col("category").str.strip_prefix("v_"), side=pl.lit("baseline"),
                             model=pl.lit(MODEL))


def test_corrected_intervals_cover_the_true_rate(world: dict[str, Any]) -> None:
    t0 = time.perf_counter()
    truth = world["truth"]
    hits: dict[str, dict[str, list[bool]]] = {c: {"raw": [], "corrected": []} for c in ALL_CATEGORIES}
    none: dict[str, int] = dict.fromkeys(ALL_CATEGORIES, 0)
    for rep in range(REPS):
        sample, _ = sample_turns(world["turns"], N_SAMPLE, STRATA, 1000 + rep)
        est = estimate(_scores(sample, world["judged"]), sample)
        cal = _calibration(world, sample["turn_id"], np.random.default_rng(5000 + rep))
        for r in corrected(est, cal, seed=rep).iter_rows(named=True):
            c = r["category"]
            hits[c]["raw"].append(r["raw_lower"] <= truth[c] <= r["raw_upper"])
            if r["corrected_rate"] is None:
                none[c] += 1
            else:
                hits[c]["corrected"].append(r["corrected_lower"] <= truth[c] <= r["corrected_upper"])
    elapsed = time.perf_counter() - t0

    meaningful = [c for c in ALL_CATEGORIES if none[c] <= MAX_NONE_SHARE * REPS]
    print(f"\njudge: {world['judge']}; {world['turns'].height} turns; samples of {N_SAMPLE} deployment and "
          f"{N_CAL} calibration turns; {REPS} repetitions in {elapsed:.1f} s")
    print(f"{'category':<27}{'truth':>8}{'raw cov':>9}{'corr cov':>10}{'no number':>11}")
    for c in ALL_CATEGORIES:
        raw, cor = np.mean(hits[c]["raw"]), np.mean(hits[c]["corrected"]) if hits[c]["corrected"] else float("nan")
        print(f"{c:<27}{truth[c]:>8.4f}{raw:>9.3f}{cor:>10.3f}{none[c]:>11}{'' if c in meaningful else '  (not pooled)'}")
    pooled = float(np.mean([h for c in meaningful for h in hits[c]["corrected"]]))
    pooled_raw = float(np.mean([h for c in meaningful for h in hits[c]["raw"]]))
    print(f"pooled over {len(meaningful)} categories: corrected {pooled:.3f}, raw {pooled_raw:.3f}")

    assert len(meaningful) >= 8, none
    assert 0.93 <= pooled <= 0.97
    for c in meaningful:
        assert np.mean(hits[c]["corrected"]) >= 0.88, c
    assert pooled_raw < 0.80  # the raw rates are biased: the correction is doing the work
