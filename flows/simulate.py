"""The main Prefect flow: load → check → sample → replay → judge → estimate + gate → report → MLflow."""

from __future__ import annotations

import hashlib
import json
import time
from datetime import UTC, datetime
from typing import Any

from prefect import flow, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from tasks import local_llm
from tasks.check import summary_markdown
from tasks.config import Settings, load_settings, settings_from_dict
from tasks.events import emit_verdict, verdict_state
from tasks.prefect_tasks import (
    check_task,
    chunk_task_runner,
    combine_task,
    correct_task,
    dask_scope,
    deid_task,
    endpoint_check_task,
    estimate_task,
    judge_task,
    load_task,
    log_task,
    replay_chunk_task,
    report_task,
    sample_task,
    scan_sample_task,
)
from tasks.progress import report, stop_on_interrupt
from tasks.report_sections import cost_line, fidelity_of, latency_line, trend_of, worst_trajectories
from tasks.scan import scan_eligible
from tasks.sequential import at_look, look_order, look_sizes, look_z, undecided
from tasks.stages import (
    ChunkOutcome,
    ReplayChunk,
    ReplayChunksFailed,
    plan_chunks,
    replay_counts,
    world_labels,
)
from tasks.store import RunStore
from tasks.tracking import default_tracking_uri


def _run_key(config: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
    return f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}-{digest}"


def _map_chunks(chunks: list[ReplayChunk], s: Settings, store: RunStore,
                report_chunks: bool) -> list[ChunkOutcome]:
    """Replay chunks as mapped tasks on the current task runner; every chunk runs to its end.

    Raises:
        ReplayChunksFailed: naming the chunks that failed, once all have finished.
    """
    futures = replay_chunk_task.map(chunks, unmapped(s), unmapped(store))
    chunk_of = dict(zip(futures, chunks, strict=True))
    outcomes: list[ChunkOutcome] = []
    failures: dict[int, BaseException] = {}
    for future in as_completed(futures):
        try:
            outcomes.append(future.result())
        except Exception as exc:
            failures[chunk_of[future].index] = exc
            continue
        if report_chunks:  # chunks in other processes cannot tick per turn here
            report("replay", sum(o.turns for o in outcomes), chunks[0].total)
    if failures:
        raise ReplayChunksFailed(failures, len(chunks), store.uri)
    return outcomes


@flow(name="replay-chunks", validate_parameters=False)
def replay_chunks(chunks: list[ReplayChunk], s: Settings, store: RunStore) -> list[ChunkOutcome]:
    """The replay chunks as a subflow, run on the task runner replay.task_runner names."""
    return _map_chunks(chunks, s, store, report_chunks=True)


def _replay(chunks: list[ReplayChunk], s: Settings, store: RunStore,
            runner: TaskRunner[Any] | None) -> list[ChunkOutcome]:
    if runner is None:  # local: this flow's runner, one chunk at a time, ticking per turn
        return _map_chunks(chunks, s, store, report_chunks=False)
    with dask_scope():
        return replay_chunks.with_options(task_runner=runner)(chunks, s, store)


# One chunk at a time locally: the candidate endpoint's concurrency and rpm hold for the run,
# as they do per worker on Dask; replay is concurrent inside a chunk.
_ONE_CHUNK_AT_A_TIME: TaskRunner[Any] = ThreadPoolTaskRunner(max_workers=1)


@flow(name="deployment_simulation", task_runner=_ONE_CHUNK_AT_A_TIME)
def deployment_simulation(config: dict[str, Any] | None = None,
                          overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one deployment simulation.

    Args:
        config: a resolved Settings dump (what the CLI passes); None resolves conf/default.yaml,
            DEPSIM_* environment and `overrides` here (what deployments pass).
        overrides: nested settings layered on top, e.g. {"models": {"candidate": {"model": "x"}}}.
    """
    t0, start_ms = time.perf_counter(), int(time.time() * 1000)
    s = settings_from_dict(config) if config is not None else load_settings(overrides=overrides)
    config = s.public_dict()
    store = RunStore(s.run.store, _run_key(config))
    try:
        with local_llm.serving(s):  # the llama.cpp server of roles bound to local-llm://, if any
            result = _simulate(s, store, t0, start_ms)
    except Exception as exc:
        emit_verdict("ERROR", store.run_key, s.run.tags,
                     {"error": str(exc)[:2000], "store": store.uri, "run_id": getattr(exc, "run_id", None),
                      "flow_run_id": str(flow_run.id) if flow_run.id else None})
        raise
    emit_verdict(result["verdict"], store.run_key, s.run.tags,
                 {k: result[k] for k in ("run_id", "experiment_id", "tracking_uri", "report", "store", "flow_run_id")})
    return verdict_state(result["verdict"], result)  # type: ignore[return-value]  # the flow call returns its data


def _simulate(s: Settings, store: RunStore, t0: float, start_ms: int) -> dict[str, Any]:
    runner = chunk_task_runner(s.replay)  # a missing prefect-dask fails here, before any work
    if scan_eligible(s):  # Parquet logs: scan -> sample -> fetch -> check only the sample
        checked, data_hash, sample, strata, population, represent = scan_sample_task(s, store)
    else:
        raw, data_hash = load_task(s, store)
        checked = check_task(raw, s, store)
        sample, strata, population, represent = sample_task(checked.valid, s, store)
    create_markdown_artifact(summary_markdown(checked), key="depsim-contract", description="contract check")
    # From here on only the sampled conversations, de-identified for real data (run.deid).
    convs, deid = deid_task(sample, checked.valid, s, store)
    sizes = look_sizes(sample.height, s.sample.looks, s.replay.chunk_size)
    if len(sizes) > 1:
        sample = look_order(sample, s.run.seed)
    chunks = plan_chunks(sample, convs, s.replay.chunk_size)
    outcomes: list[ChunkOutcome] = []
    looks: list[dict[str, Any]] = []
    for k, size in enumerate(sizes, start=1):
        # One look: replay the chunks it adds, judge and estimate on everything so far.
        start = sizes[k - 2] if k > 1 else 0
        with stop_on_interrupt():  # Ctrl-C/SIGTERM here: chunks in worker threads stop at their next turn
            outcomes += _replay([c for c in chunks if start <= c.start < size], s, store, runner)
        candidate, calls = combine_task(outcomes, store)
        endpoint_check_task(candidate, s, store, data_hash)  # too many endpoint errors: no verdict
        used = at_look(sample, size) if len(sizes) > 1 else sample
        scores = judge_task(candidate, used, convs, s, store)
        estimates, gated, verdict = estimate_task(scores, used, s, store)
        looks.append({"look": k, "turns": size, "verdict": verdict, "undecided": undecided(gated)})
        if verdict != "INCONCLUSIVE":
            break  # decided: every gate PASSes, or one FAILs (at a look the error budget covers)
    sequential = {"looks_planned": len(sizes), "looks_used": len(looks), "budget": sample.height,
                  "turns_used": looks[-1]["turns"], "turns_saved": sample.height - looks[-1]["turns"],
                  "z": look_z(s.sample.looks), "per_look": looks}
    if len(sizes) > 1:
        sample = used
        store.write("sample", sample)
        store.write_json("looks.json", sequential)
    corrected, calibration = correct_task(estimates, s, store)
    finish, errors, sources = replay_counts(candidate)
    world = world_labels(s, sample)
    ctx = {
        "run_key": store.run_key, "candidate": s.models.candidate.model, "baseline": world["baseline"],
        "synthetic": world["synthetic"], "world": world, "data": s.run.data or "bundled SYNTHETIC logs",
        "dataset_hash": data_hash, "seed": s.run.seed, "verdict": verdict, "gated": gated, "estimates": estimates,
        "deid": deid, "check": checked.summary(), "checks": checked.checks, "quarantine": checked.quarantine, "strata": strata,
        "representativeness": represent,
        "sampled_turns": sample.height, "population_turns": population, "weight_sum": float(sample["weight"].sum()),
        "finish_counts": finish, "error_counts": errors, "source_counts": sources, **calls,
        "prompt_tokens": int(candidate["prompt_tokens"].sum()), "completion_tokens": int(candidate["completion_tokens"].sum()),
        "corrected": corrected, "calibration": calibration, "elapsed_s": 0.0, "start_ms": start_ms,
        "sample_ids": sorted(sample["turn_id"].to_list()),
        "worst": worst_trajectories(scores, candidate, sample), "latency": latency_line(candidate),
        "trend": trend_of(s.run.tracking_uri or default_tracking_uri(), s.run.experiment),
        "sequential": sequential,
        "cost": cost_line(int(candidate["prompt_tokens"].sum()), int(candidate["completion_tokens"].sum()),
                          s.models.candidate.price_prompt_per_1k, s.models.candidate.price_completion_per_1k),
        "fidelity": fidelity_of(s.run.tracking_uri or default_tracking_uri(), s.run.data or "bundled SYNTHETIC logs"),
    }
    report_path, report_md = report_task(ctx, store)
    create_markdown_artifact(report_md, key="depsim-report", description="depsim gate and rates")
    create_table_artifact(gated.select("category", "rate", "lower", "upper", "delta", "gate").to_dicts(),
                          key="depsim-gate", description=f"gate verdict {verdict}")
    ctx["elapsed_s"] = round(time.perf_counter() - t0, 2)
    run_id, experiment_id = log_task(ctx, s, store)
    return {
        "run_id": run_id, "run_key": store.run_key, "flow_run_id": str(flow_run.id) if flow_run.id else None,
        "tracking_uri": s.run.tracking_uri or default_tracking_uri(),
        "experiment": s.run.experiment, "experiment_id": experiment_id, "report": report_path, "store": store.uri, "verdict": verdict,
        "metrics": {r["category"]: {"rate": r["rate"], "lower": r["lower"], "upper": r["upper"],
                                    "delta": r["delta"], "delta_lower": r["delta_lower"],
                                    "delta_upper": r["delta_upper"], "gate": r["gate"]}
                    for r in gated.iter_rows(named=True)},
        "corrected": ({r["category"]: {k: r[k] for k in ("corrected_rate", "corrected_lower", "corrected_upper", "note")}
                       for r in corrected.filter(corrected["side"] == "candidate").iter_rows(named=True)}
                      if corrected is not None else None),
        "calibration_warnings": calibration["warnings"] if calibration else [],
        "contract": ctx["check"], "deid": ctx["deid"],
        "quarantined": [{k: r[k] for k in ("source_file", "source_line", "rule", "reason")}
                        for r in checked.quarantine.head(100).iter_rows(named=True)],
        "model_calls": calls["model_calls"], "cache_hits": calls["cache_hits"], "retries": calls["retries"],
        "sampled_turns": sample.height, "population_turns": population,
        "sample": {k: represent[k] for k in ("psi", "chi_square", "chi_square_p", "empty_strata")},
        "synthetic": ctx["synthetic"], "world": {k: world[k] for k in ("candidate_synthetic", "data_synthetic", "label")},
        "candidate": ctx["candidate"], "candidate_endpoint": world["endpoint"], "baseline": world["baseline"],
        "error_counts": errors, "sequential": sequential, "elapsed_s": round(time.perf_counter() - t0, 2),
    }
