"""What turning replayed turns into MLflow traces costs, beside what replaying them costs.

Over the same N turns of SYNTHETIC production conversations (benchmarks/replay_bench.workload),
in one process, it measures:

    replay   tasks.replay.replay_sample against the in-process SYNTHETIC candidate
             (synthetic://, synthetic-agent-v2; default replay settings, cache off)
    judge    tasks.judge.judge_trajectories with the rules judge (candidate and baseline turns):
             the scores the traces carry as assessments
    traces   tasks.traces.log_turn_traces of the N candidate turns into a fresh SQLite store
             (spans, assessments, tags), then read back to check every turn has its trace
    fluent   (--fluent K, optional) for reference: K turns through MLflow's public span API
             (mlflow.start_span_no_context, exported span by span) and one mlflow.log_feedback
             per category, flushed with mlflow.flush_trace_async_logging: the path
             log_turn_traces does not take, and why

Prints a JSON summary with wall seconds and milliseconds per turn for each. Run from the
repository root:

    python benchmarks/trace_bench.py [--turns 1000] [--fluent 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import polars as pl  # noqa: E402

from benchmarks.replay_bench import workload  # noqa: E402
from tasks.config import Endpoint, ReplayCfg, load_settings  # noqa: E402
from tasks.judge import judge_trajectories  # noqa: E402
from tasks.replay import baseline_trajectories, replay_sample  # noqa: E402
from tasks.taxonomy import load_taxonomy  # noqa: E402


def _timed(label: str, runs: dict[str, Any], n: int, fn: Any) -> Any:
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    runs[label] = {"wall_s": round(wall, 2), "ms_per_turn": round(1000 * wall / max(n, 1), 2)}
    return out


def fluent_reference(uri: str, k: int, candidate: pl.DataFrame, scores: pl.DataFrame) -> dict[str, Any]:
    """K turns as traces through the public span API and log_feedback (a CHAT_MODEL span per
    answer, one feedback per category), for comparison only."""
    import mlflow
    from mlflow.entities import AssessmentError, AssessmentSource, SpanType

    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("fluent-reference")
    run = mlflow.MlflowClient().create_run(exp).info.run_id
    by_turn = {tid: rows for (tid,), rows in scores.filter(pl.col("side") == "candidate").group_by("turn_id")}
    t0 = time.perf_counter()
    ids = []
    for t in candidate.head(k).iter_rows(named=True):
        root = mlflow.start_span_no_context(t["turn_id"], span_type=SpanType.AGENT, experiment_id=exp,
                                            metadata={"mlflow.sourceRun": run}, inputs={"turn_id": t["turn_id"]})
        for m in json.loads(t["messages"]):
            if m.get("role") == "assistant":
                mlflow.start_span_no_context("model call", span_type=SpanType.CHAT_MODEL, parent_span=root,
                                             inputs={"messages": []}).end(outputs=m)
        root.end(outputs=t["finish"])
        ids.append((root.trace_id, t["turn_id"]))
    built = time.perf_counter()
    mlflow.flush_trace_async_logging()
    flushed = time.perf_counter()
    n_fb = 0
    for trace_id, turn_id in ids:
        for r in by_turn[turn_id].iter_rows(named=True):
            mlflow.log_feedback(trace_id=trace_id, name=r["category"], value=r["verdict"],
                                source=AssessmentSource(source_type="CODE", source_id=r["judge"] or "depsim"),
                                error=None if r["verdict"] is not None else AssessmentError("UNSCORED", "unscored"))
            n_fb += 1
    done = time.perf_counter()
    return {"turns": len(ids), "spans_s": round(flushed - t0, 2), "feedback_s": round(done - flushed, 2),
            "feedback": n_fb, "ms_per_turn_spans": round(1000 * (flushed - t0) / max(len(ids), 1), 1),
            "ms_per_feedback": round(1000 * (done - flushed) / max(n_fb, 1), 1),
            "build_s": round(built - t0, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=1000)
    parser.add_argument("--fluent", type=int, default=0, help="also time K turns through the public span API")
    args = parser.parse_args()

    load_before = round(os.getloadavg()[0], 2)
    s = load_settings()
    convs, turns = workload(args.turns)
    sample = turns.with_columns(stratum=pl.concat_str("surface", "task_type", pl.col("uses_tools").cast(pl.String),
                                                      separator="|"), weight=pl.lit(1.0))
    runs: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    endpoint = Endpoint(model="synthetic-agent-v2")
    cfg = ReplayCfg().model_copy(update={"cache_dir": None})
    candidate, _ = _timed("replay", runs, sample.height, lambda: asyncio.run(
        replay_sample(sample, convs, endpoint, cfg, s.run.seed, stats=stats)))
    both = pl.concat([candidate, baseline_trajectories(sample, convs)])
    scores, per_judge, info = _timed("judge", runs, sample.height, lambda: judge_trajectories(
        both, convs, sample, load_taxonomy(s.judge.taxonomy), ["rules"], s))

    import mlflow  # after the replay: its import is not the replay's cost
    from mlflow.tracking import MlflowClient

    from tasks.traces import log_turn_traces

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        client = MlflowClient(uri)
        exp = client.create_experiment("trace-bench")
        run_id = client.create_run(exp).info.run_id
        counts = _timed("traces", runs, sample.height, lambda: log_turn_traces(
            uri, exp, run_id, candidate, scores, sample, conversations=convs, model_calls=stats["calls"],
            judge_verdicts=per_judge, judges=info["provenance"]))
        runs["traces"].update(counts)
        found = 0
        token = None
        while True:
            page = client.search_traces(locations=[exp], run_id=run_id, include_spans=False, max_results=500,
                                        page_token=token)
            found += len(page)
            token = page.token
            if not token:
                break
        runs["traces"]["read_back"] = found
        if args.fluent:
            runs["fluent_reference"] = fluent_reference(uri, args.fluent, candidate, scores)
        client.set_terminated(run_id)
    _ = mlflow
    summary = {
        "machine": {"cpus": os.cpu_count(), "load_avg_1m_before": load_before,
                    "load_avg_1m_after": round(os.getloadavg()[0], 2)},
        "turns": sample.height, "model_calls": int(stats["model_calls"]),
        "tool_calls": sum(len(json.loads(r)) for r in candidate["tool_results"].to_list()),
        "runs": runs,
        "traces_vs_replay": round(runs["traces"]["wall_s"] / max(runs["replay"]["wall_s"], 1e-9), 2),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
