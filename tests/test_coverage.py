"""Statistical acceptance: interval coverage against the SYNTHETIC world's known truth.

Candidate synthetic-agent-v2 replays 2,000 sampled turns of logs served by synthetic-agent-v1,
for 20 seeds, through the real pipeline functions (sample → replay over the openai client →
judge_trajectories with a JudgePanel → estimate). Pooled over all categories, the 95% intervals
must contain the true rate at least 90% of the time, on each side.

Which verdicts. The estimator estimates the rate of the *judges' verdicts*; the judges are
imperfect on the varied world by design (their errors are measured by judge-eval and undone
by the Rogan–Gladen correction, tests/test_corrected_coverage.py). Interval coverage of the
*true* rate can only be asked of verdicts whose expectation is the true rate, so the panel
here has one judge: a test-only oracle (`_TruthOracle`, below) that reads the world's hidden
truth channel, `tasks.synthetic.truth.decode_turn`, on the judged turn. This tests the
sampling, replay, panel plumbing and estimator, not the judges. The oracle lives in this test
module only and is registered in the judge registry only inside the worker processes of this
test, for the duration of one seed; depsim's own judges and estimators never read the truth
channel (tests/test_synthetic_truth.py::test_nothing_outside_the_world_reads_the_truth).
Why not the scripted `synthetic-judge-oracle` through the `llm` judge: it gives the same
verdicts from the same channel, server-side, but at three chat requests per trajectory (one per
category group, one sample) on 80,000 trajectories it adds more in-process model requests than
the replays themselves make, roughly doubling a test that already takes 9–17 minutes on 2 CPUs.

What truth. Candidate: the v2 profile's exact per-turn probability (`turn_truth`, with the
turn's task type, whether an injection is in its prefix and whether it answers a harmful
request, as the planner sees them) averaged over the sampling frame; each seed replays afresh,
so the candidate verdicts' expectation is exactly that. Baseline: the logged v1 turns are fixed,
so what the sample estimates is the frame's realised rate of v1's behaviours (`_truth`), and
that is its truth; it is itself checked against the v1 profile's expectation.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tasks.judges.base import Judge, TrajectoryView, Verdict
from tasks.taxonomy import ALL_CATEGORIES, CATEGORIES, UNSAFE

pytestmark = pytest.mark.slow

N_CONVERSATIONS, N_SAMPLE, SEEDS = 3000, 2000, 20
ORACLE_KIND = "test-truth-oracle"  # registered only inside _one_seed


class _TruthOracle(Judge):
    """Test instrument: the world's own truth for a synthetic-agent turn, unscored otherwise."""

    kind = ORACLE_KIND
    version = "test"

    async def judge(self, view: TrajectoryView, categories: list[str]) -> dict[str, Verdict]:
        from tasks.synthetic.truth import decode_turn

        truth = decode_turn(view.turn)
        if truth is None:
            return {c: Verdict.unscored(c, "oracle: not a synthetic agent's turn", self.name, self.version)
                    for c in categories}
        severity = {c: self.taxonomy["categories"][c]["severity"] for c in categories}
        return {c: Verdict(c, c in truth, severity[c] if c in truth else "none", [], self.name, self.version)
                for c in categories}


def _oracle_taxonomy() -> dict[str, Any]:
    """conf/judges.yaml with one judge, the oracle, for every category."""
    from tasks.taxonomy import load_taxonomy

    taxonomy = copy.deepcopy(load_taxonomy())
    taxonomy["judges"] = {"oracle": {"kind": ORACLE_KIND}}
    for cat in CATEGORIES:
        taxonomy["categories"][cat].update(judges=["oracle"], combine="any")
    return taxonomy


def _one_seed(args: tuple[str, int]) -> list[tuple[str, str, float, float, float, int]]:
    from tasks.check import check_conversations, load_contract
    from tasks.config import Endpoint, ReplayCfg
    from tasks.estimate import estimate
    from tasks.judge import judge_trajectories
    from tasks.judges.base import JUDGES
    from tasks.load import load_raw
    from tasks.replay import baseline_trajectories, replay_sample
    from tasks.sample import build_turns, sample_turns

    path, seed = args
    valid = check_conversations(load_raw(path), load_contract(), 0.01, 0.1).valid
    smp, _ = sample_turns(build_turns(valid), N_SAMPLE, ["surface", "task_type", "uses_tools"], seed)
    traj, _ = asyncio.run(replay_sample(smp, valid, Endpoint(model="synthetic-agent-v2"), ReplayCfg(), seed))
    JUDGES[ORACLE_KIND] = _TruthOracle
    try:
        scores, _per_judge, info = judge_trajectories(pl.concat([traj, baseline_trajectories(smp, valid)]), valid,
                                                      smp, _oracle_taxonomy(), kinds=["oracle"])
    finally:
        del JUDGES[ORACLE_KIND]
    assert info["provenance"] == {"oracle": {"kind": ORACLE_KIND, "version": "test"}}
    est = estimate(scores, smp)
    return [(r["side"], r["category"], r["rate"], r["lower"], r["upper"], r["n_unscored"])
            for r in est.iter_rows(named=True)]


def _truth(path: Path) -> tuple[dict[str, dict[str, float]], dict[str, float], int]:
    """(the truth per side and category over the sampling frame, v1's expected rates on it,
    the frame's size in turns)."""
    from tasks.check import check_conversations, load_contract
    from tasks.load import load_raw
    from tasks.sample import build_turns
    from tasks.synthetic.profiles import get_profile, turn_truth

    facts = {}
    with path.with_suffix(".truth.jsonl").open() as fh:
        for line in fh:
            facts.update(json.loads(line))
    valid = check_conversations(load_raw(str(path)), load_contract(), 0.01, 0.1).valid
    frame = build_turns(valid)["turn_id"].to_list()
    assert len(frame) > 6000 and set(frame) <= set(facts)
    expected: dict[str, dict[str, float]] = {}
    for name in ("synthetic-agent-v2", "synthetic-agent-v1"):
        profile = get_profile(name)
        assert profile is not None
        sums = dict.fromkeys(ALL_CATEGORIES, 0.0)
        for turn_id in frame:
            t = facts[turn_id]
            for cat, p in turn_truth(profile, t["task_type"], t["injection_in_prefix"],
                                     harmful_request=t["harmful_request"]).items():
                sums[cat] += p
        expected[name] = {c: v / len(frame) for c, v in sums.items()}
    realised = dict.fromkeys(ALL_CATEGORIES, 0.0)
    for turn_id in frame:
        shown = set(facts[turn_id]["behaviours"])
        for cat in CATEGORIES:
            realised[cat] += cat in shown
        realised["unsafe_any"] += bool(shown & set(UNSAFE))
    truth = {"candidate": expected["synthetic-agent-v2"],
             "baseline": {c: v / len(frame) for c, v in realised.items()}}
    return truth, expected["synthetic-agent-v1"], len(frame)


def test_intervals_cover_the_true_rate(tmp_path: Path) -> None:
    from tasks.synthetic.logs import generate

    path = tmp_path / "population.jsonl"
    with path.open("w") as fh, path.with_suffix(".truth.jsonl").open("w") as th:
        for conv in generate(N_CONVERSATIONS, "synthetic-agent-v1", 11):
            records = conv.pop("_truth")
            th.write(json.dumps({f"{conv['conversation_id']}#{k}": t for k, t in enumerate(records)}) + "\n")
            fh.write(json.dumps(conv) + "\n")
    truth, v1_expected, n_frame = _truth(path)
    # The logged population is a draw from the v1 profile: its realised rates agree with the
    # profile's expectation (4 binomial standard errors over ~6,400 turns; deterministic here).
    for cat, q in v1_expected.items():
        assert abs(truth["baseline"][cat] - q) <= 4 * math.sqrt(q * (1 - q) / n_frame) + 1e-9, (cat, truth["baseline"][cat], q)
    # v2 is the safer profile on every unsafe category (the truth is not the same on both sides)
    assert all(truth["candidate"][c] < truth["baseline"][c] for c in UNSAFE if truth["baseline"][c] > 0.005)

    # spawn, not fork: earlier tests leave threads (GX, Prefect) whose locks a fork would copy held.
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_one_seed, [(str(path), s) for s in range(SEEDS)]))

    covered = {"candidate": 0, "baseline": 0}
    misses = []
    for seed, rows in enumerate(results):
        assert {(side, cat) for side, cat, *_ in rows} == {(s, c) for s in covered for c in ALL_CATEGORIES}
        # the oracle scores every answered turn: nothing is left to the unscored bounds
        assert sum(r[5] for r in rows) == 0, [r for r in rows if r[5]]
        for side, cat, rate, lo, hi, _n_unscored in rows:
            ok = lo <= truth[side][cat] <= hi
            covered[side] += ok
            if not ok:
                misses.append((seed, side, cat, round(truth[side][cat], 4), round(rate, 4), round(lo, 4), round(hi, 4)))
    total = SEEDS * len(ALL_CATEGORIES)
    coverage = {side: n / total for side, n in covered.items()}
    print(f"candidate coverage {coverage['candidate']:.3f}, baseline coverage {coverage['baseline']:.3f} "
          f"({total} intervals per side), misses {misses}")
    assert coverage["candidate"] >= 0.90, misses
    assert coverage["baseline"] >= 0.90, misses
    # Nor by being too wide: a 95% interval misses the candidate's truth about 11 times in 220
    # (the baseline's are conservative: the variance has no finite-population correction, and
    # 2,000 of ~6,500 logged turns is a third of the frame).
    assert coverage["candidate"] <= 0.99, misses
    # The intervals must not buy coverage by being uselessly wide.
    widths = [hi - lo for rows in results for side, cat, _r, lo, hi, _u in rows if side == "candidate" and cat == "unsafe_any"]
    assert max(widths) < 0.04
