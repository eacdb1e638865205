"""Statistical acceptance: interval coverage against the SYNTHETIC world's known truth.

Candidate synthetic-agent-v2 replays 2,000 sampled turns of logs served by synthetic-agent-v1,
for 20 seeds, through the real pipeline functions (sample → replay over the openai client →
rules judges → estimate). The truth is computed here from the profiles; the judges and the
estimator never see it. Pooled over all categories, the 95% intervals must contain the truth
at least 90% of the time.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import polars as pl
import pytest

from tasks.taxonomy import ALL_CATEGORIES

pytestmark = pytest.mark.slow

N_CONVERSATIONS, N_SAMPLE, SEEDS = 3000, 2000, 20


def _one_seed(args: tuple[str, int]) -> list[tuple[str, str, float, float, float]]:
    from tasks.check import check_conversations, load_contract
    from tasks.config import Endpoint, ReplayCfg
    from tasks.estimate import estimate
    from tasks.judge import judge_trajectories
    from tasks.load import load_raw
    from tasks.replay import baseline_trajectories, replay_sample
    from tasks.sample import build_turns, sample_turns
    from tasks.taxonomy import load_taxonomy

    path, seed = args
    valid = check_conversations(load_raw(path), load_contract(), 0.01, 0.1).valid
    smp, _ = sample_turns(build_turns(valid), N_SAMPLE, ["surface", "task_type", "uses_tools"], seed)
    traj, _ = asyncio.run(replay_sample(smp, valid, Endpoint(model="synthetic-agent-v2"), ReplayCfg(), seed))
    scores = judge_trajectories(pl.concat([traj, baseline_trajectories(smp, valid)]), valid, smp, load_taxonomy())
    est = estimate(scores, smp)
    return [(r["side"], r["category"], r["rate"], r["lower"], r["upper"]) for r in est.iter_rows(named=True)]


def test_intervals_cover_the_true_rate(tmp_path: Path) -> None:
    from tasks.synthetic.logs import generate
    from tasks.synthetic.profiles import get_profile, turn_truth

    path = tmp_path / "population.jsonl"
    turn_facts = []
    with path.open("w") as fh:
        for conv in generate(N_CONVERSATIONS, "synthetic-agent-v1", 11):
            turn_facts += [(t["task_type"], t["injection_in_prefix"]) for t in conv.pop("_truth")]
            fh.write(json.dumps(conv) + "\n")
    truth = {}
    for side, name in (("candidate", "synthetic-agent-v2"), ("baseline", "synthetic-agent-v1")):
        profile = get_profile(name)
        assert profile is not None
        sums = dict.fromkeys(ALL_CATEGORIES, 0.0)
        for task_type, injected in turn_facts:
            for cat, p in turn_truth(profile, task_type, injected).items():
                sums[cat] += p
        truth[side] = {c: v / len(turn_facts) for c, v in sums.items()}

    # spawn, not fork: earlier tests leave threads (GX, Prefect) whose locks a fork would copy held.
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_one_seed, [(str(path), s) for s in range(SEEDS)]))

    covered = {"candidate": 0, "baseline": 0}
    misses = []
    for seed, rows in enumerate(results):
        assert {(side, cat) for side, cat, *_ in rows} == {(s, c) for s in covered for c in ALL_CATEGORIES}
        for side, cat, rate, lo, hi in rows:
            ok = lo <= truth[side][cat] <= hi
            covered[side] += ok
            if not ok:
                misses.append((seed, side, cat, round(truth[side][cat], 4), round(rate, 4), round(lo, 4), round(hi, 4)))
    total = SEEDS * len(ALL_CATEGORIES)
    coverage = covered["candidate"] / total
    print(f"candidate coverage {coverage:.3f}, baseline coverage {covered['baseline'] / total:.3f}, misses {misses}")
    assert coverage >= 0.90, misses
    # The intervals must not buy coverage by being uselessly wide.
    widths = [hi - lo for rows in results for side, cat, _r, lo, hi in rows if side == "candidate" and cat == "unsafe_any"]
    assert max(widths) < 0.04
