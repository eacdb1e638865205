"""The pipeline stages of DESIGN §2 as plain functions over the run store.

Each takes typed inputs, does its stage's job with the pure functions of tasks/, writes its
table to the run store and returns it. tasks/prefect_tasks.py wraps each thinly.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any

import polars as pl

from tasks.check import CheckResult, check_conversations, load_contract
from tasks.config import ConfigError, Settings, read_conf_yaml
from tasks.estimate import estimate, gate, overall, paired_delta
from tasks.judge import judge_trajectories
from tasks.load import dataset_hash, load_raw
from tasks.progress import report
from tasks.replay import baseline_trajectories, replay_sample
from tasks.sample import build_turns, sample_turns
from tasks.store import RunStore
from tasks.taxonomy import load_taxonomy


class ContractFailed(RuntimeError):
    """The share of bad rows passed the configured limit; the run stops before MLflow."""

    def __init__(self, result: CheckResult, limit: float) -> None:
        share = result.rows_quarantined / max(result.rows_in, 1)
        super().__init__(
            f"contract check {result.verdict}: {result.rows_quarantined} of {result.rows_in} rows "
            f"quarantined ({share:.1%}, limit {limit:.1%}); by rule: "
            + ", ".join(f"{k}={v}" for k, v in sorted(result.by_rule.items())))
        self.result = result


def stage_load(s: Settings, store: RunStore) -> tuple[pl.DataFrame, str]:
    raw = load_raw(s.run.data)
    report("load", raw.height, raw.height)
    return raw, dataset_hash(raw)


def stage_check(raw: pl.DataFrame, s: Settings, store: RunStore) -> CheckResult:
    result = check_conversations(raw, load_contract(s.contract.file), s.contract.warn_bad_share,
                                 s.contract.fail_bad_share)
    store.write("quarantine", result.quarantine)
    store.write_json("contract_check.json", {**result.summary(), "checks": result.checks})
    if result.gx_result is not None:
        store.write_json("gx_validation.json", result.gx_result)
    if result.gx_html:
        store.write_text("gx_validation.html", result.gx_html)
    report("check", raw.height, raw.height)
    if result.verdict in ("failed", "error"):
        raise ContractFailed(result, s.contract.fail_bad_share)
    return result


def stage_sample(valid: pl.DataFrame, s: Settings, store: RunStore) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    conversations = valid
    if s.run.production_models:
        conversations = valid.filter(pl.col("model").is_in(s.run.production_models))
    turns = build_turns(conversations)
    sample, strata = sample_turns(turns, s.sample.n, s.sample.strata, s.run.seed, s.sample.allocation,
                                  s.sample.turns, s.sample.turns_per_conversation)
    store.write("sample", sample)
    store.write("strata", strata)
    report("sample", sample.height, sample.height)
    return sample, strata, turns.height


def stage_replay(sample: pl.DataFrame, valid: pl.DataFrame, s: Settings, store: RunStore) -> tuple[pl.DataFrame, int]:
    """Replay in chunks (each written as it completes); returns trajectories and model calls."""
    frames, calls, done = [], 0, 0
    size = s.replay.chunk_size
    for i, start in enumerate(range(0, sample.height, size)):
        chunk = sample.slice(start, size)

        def tick(k: int, _base: int = done) -> None:
            nonlocal done
            done += k
            report("replay", done, sample.height)

        traj, n_calls = asyncio.run(replay_sample(chunk, valid, s.models.candidate, s.replay, s.run.seed, tick))
        store.write(f"trajectories_chunk_{i:05d}", traj)
        frames.append(traj)
        calls += n_calls
    traj = pl.concat(frames) if frames else pl.DataFrame()
    store.write("trajectories", traj)
    return traj, calls


def stage_judge(candidate: pl.DataFrame, sample: pl.DataFrame, valid: pl.DataFrame, s: Settings,
                store: RunStore) -> pl.DataFrame:
    baseline = baseline_trajectories(sample, valid)
    store.write("baseline_turns", baseline)
    taxonomy = load_taxonomy(s.judge.taxonomy)
    scores = judge_trajectories(pl.concat([candidate, baseline]), valid, sample, taxonomy)
    store.write("scores", scores)
    report("judge", candidate.height, candidate.height)
    return scores


def stage_estimate(scores: pl.DataFrame, sample: pl.DataFrame, s: Settings, store: RunStore) -> tuple[pl.DataFrame, pl.DataFrame, str]:
    est = estimate(scores, sample)
    deltas = paired_delta(scores, sample)
    gates = read_conf_yaml(s.gate.file)
    if "categories" not in gates and "default" not in gates:
        raise ConfigError(f"{s.gate.file}: expected 'default' and/or 'categories'")
    gated = gate(est, deltas, gates)
    store.write("estimates", est)
    store.write("gate", gated)
    return est, gated, overall(gated)


def replay_counts(traj: pl.DataFrame) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """(finish reasons, error reasons, tool-result sources) of the candidate trajectories."""
    finish = dict(Counter(traj["finish"].to_list()))
    errors = dict(Counter(e.split(":")[0] for e in traj["error"].drop_nulls().to_list()))
    sources: Counter[str] = Counter()
    for tr in traj["tool_results"].to_list():
        for r in json.loads(tr):
            sources[r["source"]] += 1
    return finish, errors, dict(sources)


def elapsed_since(t0: float) -> float:
    return round(time.perf_counter() - t0, 2)


def context_dict(**kwargs: Any) -> dict[str, Any]:
    return kwargs


def stage_report(ctx: dict[str, Any], store: RunStore) -> tuple[str, str]:
    from tasks.report import render

    page, md = render(ctx)
    store.write_text("report.md", md)
    return store.write_text("report.html", page), md


def stage_log(ctx: dict[str, Any], s: Settings, store: RunStore) -> tuple[str, str]:
    from tasks.tracking import default_tracking_uri, log_run, metrics_of

    store.write_json("config.json", s.public_dict())
    metrics = metrics_of(ctx["gated"], ctx["estimates"])
    check = ctx["check"]
    metrics.update({"contract.rows_in": check["rows_in"], "contract.rows_passed": check["rows_passed"],
                    "contract.rows_quarantined": check["rows_quarantined"],
                    **{f"contract.quarantined.{k}": v for k, v in check["by_rule"].items()},
                    **{f"contract.normalised.{k}": v for k, v in check["normalised"].items()},
                    "sample.turns": ctx["sampled_turns"], "population.turns": ctx["population_turns"],
                    "replay.model_calls": ctx["model_calls"],
                    "replay.errors": sum(v for k, v in ctx["finish_counts"].items() if k != "answered"),
                    **{f"replay.finish.{k}": v for k, v in ctx["finish_counts"].items()},
                    **{f"replay.error.{k}": v for k, v in ctx["error_counts"].items()},
                    **{f"tools.source.{k}": v for k, v in ctx["source_counts"].items()},
                    "replay.prompt_tokens": ctx["prompt_tokens"], "replay.completion_tokens": ctx["completion_tokens"],
                    "elapsed_s": ctx["elapsed_s"]})
    params = {"config": s.public_dict(), "dataset_hash": ctx["dataset_hash"], "sample_size": ctx["sampled_turns"],
              "roles": {r: getattr(s.models, r).model for r in ("candidate", "baseline", "simulator", "judge")}}
    tags = {"depsim.verdict": ctx["verdict"], "depsim.candidate": ctx["candidate"],
            "depsim.baseline": ctx["baseline"], "depsim.world": "synthetic" if ctx["synthetic"] else "real",
            "depsim.run_key": ctx["run_key"]}
    uri = s.run.tracking_uri or default_tracking_uri()
    return log_run(uri, s.run.experiment, ctx["run_key"], params, metrics, tags, store.local)
