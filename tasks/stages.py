"""The pipeline stages of DESIGN §2 as plain functions over the run store.

Each takes typed inputs, does its stage's job with the pure functions of tasks/, writes its
table to the run store and returns it. tasks/prefect_tasks.py wraps each thinly.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import socket
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import polars as pl

from tasks.cache import ModelCache
from tasks.check import CheckResult, check_conversations, load_contract
from tasks.config import ConfigError, Settings, read_conf_yaml
from tasks.estimate import estimate, gate, overall, paired_delta
from tasks.judge import judge_trajectories
from tasks.load import dataset_hash, load_raw
from tasks.progress import report
from tasks.replay import baseline_trajectories, replay_sample
from tasks.sample import SampleError, build_turns, filter_turns, representativeness, sample_turns
from tasks.sequential import look_z
from tasks.store import RunStore
from tasks.taxonomy import AGGREGATE, ALL_CATEGORIES, load_taxonomy

log = logging.getLogger("depsim")


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


def contract_check(raw: pl.DataFrame, s: Settings) -> CheckResult:
    """The contract check with the configured contract and limits (no I/O; also used by the CLI)."""
    return check_conversations(raw, load_contract(s.contract.file), s.contract.warn_bad_share,
                               s.contract.fail_bad_share)


def stage_check(raw: pl.DataFrame, s: Settings, store: RunStore) -> CheckResult:
    return _checked(contract_check(raw, s), s, store)


def _checked(result: CheckResult, s: Settings, store: RunStore) -> CheckResult:
    """Write a contract check's results to the run store; stop the run when it failed.

    Raises:
        ContractFailed: the bad share is over contract.fail_bad_share (or GX failed).
    """
    store.write("quarantine", result.quarantine)
    store.write_json("contract_check.json", {**result.summary(), "checks": result.checks})
    if result.gx_result is not None:
        store.write_json("gx_validation.json", result.gx_result)
    if result.gx_html:
        store.write_text("gx_validation.html", result.gx_html)
    report("check", result.rows_in, result.rows_in)
    if result.verdict in ("failed", "error"):
        raise ContractFailed(result, s.contract.fail_bad_share)
    return result


def _write_sample(sample: pl.DataFrame, rep: dict[str, Any], store: RunStore) -> None:
    store.write("sample", sample)
    store.write("strata", pl.DataFrame(rep["strata"]))
    store.write_json("representativeness.json", {k: v for k, v in rep.items() if k != "strata"})
    report("sample", sample.height, sample.height)


def stage_scan_sample(s: Settings, store: RunStore) -> tuple[CheckResult, str, pl.DataFrame, pl.DataFrame, int, dict[str, Any]]:
    """Parquet logs: scan → sample → fetch → check (tasks/fetch.py). Writes what stage_check
    and stage_sample write; the contract check covers the fetched sampled conversations.

    Raises:
        ContractFailed: too many of the fetched conversations fail the contract.
    """
    from tasks.fetch import scan_fetch_check

    run = scan_fetch_check(s, progress=report)
    checked = _checked(run.checked, s, store)
    _write_sample(run.sample, run.represent, store)
    return checked, run.data_hash, run.sample, run.strata, run.population, run.represent


def stage_sample(valid: pl.DataFrame, s: Settings, store: RunStore) -> tuple[pl.DataFrame, pl.DataFrame, int, dict[str, Any]]:
    """Population of turns after filters → stratified sample, strata table, representativeness."""
    sample, strata, population, rep = draw_sample(valid, s)
    _write_sample(sample, rep, store)
    return sample, strata, population, rep


def draw_sample(valid: pl.DataFrame, s: Settings) -> tuple[pl.DataFrame, pl.DataFrame, int, dict[str, Any]]:
    """The sampling stage without I/O (also used by `depsim sample`)."""
    c = s.sample
    turns = filter_turns(build_turns(valid), s.run.production_models, c.created_after, c.created_before,
                         c.surfaces, c.task_types, c.languages, c.min_prefix_len, c.max_prefix_len)
    priors = load_priors(c.prior, turns, valid, c.strata) if c.allocation == "neyman" else None
    sample, strata = sample_turns(turns, c.n, c.strata, s.run.seed, c.allocation, c.turns,
                                  c.turns_per_conversation, priors, c.oversample or None, c.dedupe)
    return sample, strata, turns.height, representativeness(strata, sample)


def load_priors(prior: str | None, turns: pl.DataFrame, valid: pl.DataFrame, strata: list[str]) -> dict[str, float]:
    """Prior per-stratum rates for Neyman allocation: from labels or an earlier run's table."""
    if prior is None:
        raise SampleError("sample.allocation neyman needs sample.prior: \"labels\" or a stratum_rates.parquet path")
    if prior == "labels":
        labelled = valid.select("conversation_id", pl.col("labels").str.json_path_match("$.unsafe_any").alias("y"))
        t = turns.join(labelled, on="conversation_id").filter(pl.col("y").is_not_null())
        if t.height == 0:
            raise SampleError("sample.prior labels: no conversation has an unsafe_any label")
        key = pl.concat_str([pl.col(c).cast(pl.String).fill_null("∅") for c in strata], separator="|") if strata else pl.lit("all")
        t = t.with_columns(stratum=key, y=(pl.col("y") == "true").cast(pl.Float64))
        return dict(t.group_by("stratum").agg(pl.col("y").mean()).iter_rows())
    try:
        table = pl.read_parquet(prior)
        return dict(table.select("stratum", "rate").iter_rows())
    except Exception as exc:
        raise SampleError(f"sample.prior {prior}: cannot read a (stratum, rate) Parquet table: {exc}") from exc


def stage_replay(sample: pl.DataFrame, valid: pl.DataFrame, s: Settings, store: RunStore) -> tuple[pl.DataFrame, dict[str, int]]:
    """Replay chunk by chunk in this process (the flow maps `replay_chunk` as tasks instead).

    Returns the trajectories and counts: model_calls (requests sent), cache_hits, retries.
    """
    chunks = plan_chunks(sample, valid, s.replay.chunk_size)
    return combine_chunks([replay_chunk(c, s, store) for c in chunks], store)


def cache_dir(s: Settings, store: RunStore) -> str:
    """replay.cache_dir, else <run.store>/cache/models (a local folder beside the runs)."""
    if s.replay.cache_dir:
        return s.replay.cache_dir
    root = s.run.store if not s.run.store.startswith("s3://") else ".depsim"
    return str(Path(root) / "cache" / "models")


@dataclass(frozen=True)
class ReplayChunk:
    """One chunk of the sample and only the conversations its turns need (what a worker gets)."""

    index: int
    start: int                     # position of the chunk's first turn in the sample
    total: int                     # turns in the whole sample (for progress)
    sample: pl.DataFrame
    conversations: pl.DataFrame


@dataclass(frozen=True)
class ChunkOutcome:
    """What a replayed chunk returns; its tables are in the run store (`chunk_table_names`)."""

    index: int
    turns: int
    counts: dict[str, int]         # replay_sample's integer stats: model_calls, cache_hits, retries, ...
    worker: str                    # host:pid of the process that replayed it
    resumed: bool = False          # found complete in the store: nothing replayed this time


class ReplayChunksFailed(RuntimeError):
    """Some replay chunks failed; the others are in the run store and the model-call cache."""

    def __init__(self, failures: dict[int, BaseException], n_chunks: int, store_uri: str) -> None:
        first = next(iter(failures.values()))
        super().__init__(
            f"replay: {len(failures)} of {n_chunks} chunks failed (chunk "
            f"{', '.join(str(i) for i in sorted(failures))}): {type(first).__name__}: {first}; "
            f"the completed chunks are in {store_uri} and their model calls in the cache, so a "
            "rerun repeats only the failed chunks' calls")
        self.failures = failures


def deid_applies(s: Settings, sample: pl.DataFrame) -> tuple[bool, str]:
    """Whether the run de-identifies its sampled conversations, and why (run.deid)."""
    if s.run.deid is not True and s.run.deid is not False:  # auto
        from tasks.synthetic.profiles import PROFILE_NAMES

        if s.run.data is None:
            return False, "auto: the bundled SYNTHETIC logs"
        if sample.height and set(sample["model"].to_list()) <= set(PROFILE_NAMES):
            return False, "auto: SYNTHETIC logs (every logged model is a scripted profile)"
        return True, "auto: real data"
    return bool(s.run.deid), f"run.deid: {str(s.run.deid).lower()}"


def stage_deid(sample: pl.DataFrame, valid: pl.DataFrame, s: Settings,
               store: RunStore) -> tuple[pl.DataFrame, dict[str, Any]]:
    """The sampled conversations, de-identified (run.deid) before any model sees them.

    Everything downstream (replay, simulator, judges, traces, the stored `conversations`) reads
    these; the mapping from values to placeholders is dropped with each conversation's
    Deidentifier. Writes deid.json: whether it applied, why, and counts per kind.
    """
    from tasks.deid import deid_frame

    convs = valid.join(sample.select("conversation_id").unique(), on="conversation_id", how="semi")
    applied, why = deid_applies(s, sample)
    info: dict[str, Any] = {"applied": applied, "why": why, "conversations": convs.height}
    if applied:
        report("de-identify", 0, convs.height)
        convs, counts = deid_frame(convs)
        info.update(counts)
        report("de-identify", convs.height, convs.height)
    store.write_json("deid.json", info)
    return convs, info


def plan_chunks(sample: pl.DataFrame, valid: pl.DataFrame, size: int) -> list[ReplayChunk]:
    """Cut the sample into chunks of `size` turns, each with the conversations it replays.

    An empty sample is one empty chunk, so the combined tables always have their schemas.
    """
    keys = (sample.select("conversation_id", chunk=pl.int_range(pl.len()) // size)
            .unique(["conversation_id", "chunk"]))
    convs = valid.join(keys, on="conversation_id").partition_by("chunk", as_dict=True, include_key=False)
    n_chunks = max(1, -(-sample.height // size))
    return [ReplayChunk(i, i * size, sample.height, sample.slice(i * size, size),
                        convs.get((i,), valid.clear()))
            for i in range(n_chunks)]


def chunk_table_names(index: int) -> tuple[str, str, str]:
    """(trajectories, model-call log, manifest) names of a chunk in the run store."""
    return (f"trajectories_chunk_{index:05d}", f"model_calls_chunk_{index:05d}",
            f"replay_chunk_{index:05d}.json")


def replay_chunk(chunk: ReplayChunk, s: Settings, store: RunStore) -> ChunkOutcome:
    """Replay one chunk through the model-call cache and write its tables to the run store.

    The manifest is written last, so a chunk whose manifest names its turns is complete: run
    again under the same run key (a task retry, a rescheduled Dask task) it is not replayed.
    """
    done = _completed_chunk(chunk, store)
    if done is not None:
        report("replay", chunk.start + done.turns, chunk.total)
        return done
    cache = ModelCache(cache_dir(s, store)) if s.replay.cache else None
    cfg = s.replay if s.replay.cache else s.replay.model_copy(update={"cache_dir": None})
    ticked = 0

    def tick(k: int) -> None:
        nonlocal ticked
        ticked += k
        report("replay", chunk.start + ticked, chunk.total)

    stats: dict[str, Any] = {}
    traj, _ = asyncio.run(replay_sample(chunk.sample, chunk.conversations, s.models.candidate, cfg,
                                        s.run.seed, tick, cache=cache, stats=stats,
                                        simulator=s.models.simulator))
    if traj.height != chunk.sample.height:
        raise RuntimeError(f"replay chunk {chunk.index}: {chunk.sample.height} turns in, {traj.height} out")
    traj_name, calls_name, manifest = chunk_table_names(chunk.index)
    store.write(traj_name, traj)
    store.write(calls_name, stats["calls"])
    counts = {k: v for k, v in stats.items() if type(v) is int and k != "turns"}
    outcome = ChunkOutcome(chunk.index, traj.height, counts, f"{socket.gethostname()}:{os.getpid()}")
    store.write_json(manifest, {**asdict(outcome), "turn_ids": chunk.sample["turn_id"].to_list()})
    return outcome


def _completed_chunk(chunk: ReplayChunk, store: RunStore) -> ChunkOutcome | None:
    """The outcome of this chunk already in the store's local folder, if complete."""
    traj_name, calls_name, manifest = chunk_table_names(chunk.index)
    try:
        data = json.loads((store.local / manifest).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    tables = all((store.local / f"{name}.parquet").is_file() for name in (traj_name, calls_name))
    if not tables or data.get("turn_ids") != chunk.sample["turn_id"].to_list():
        return None
    return ChunkOutcome(data["index"], data["turns"], data["counts"], data["worker"], resumed=True)


def combine_chunks(outcomes: list[ChunkOutcome], store: RunStore) -> tuple[pl.DataFrame, dict[str, int]]:
    """Concatenate the chunk tables (in chunk order) into `trajectories` and `model_calls`.

    Returns the trajectories and the chunks' counts summed (model_calls, cache_hits, retries, ...).
    """
    ordered = sorted(outcomes, key=lambda o: o.index)
    names = [chunk_table_names(o.index) for o in ordered]
    traj = pl.concat([store.read(t) for t, _, _ in names])
    if traj.height != sum(o.turns for o in ordered):
        raise RuntimeError(f"replay: the chunk tables hold {traj.height} turns, the chunks replayed "
                           f"{sum(o.turns for o in ordered)}")
    store.write("trajectories", traj)
    store.write("model_calls", pl.concat([store.read(c) for _, c, _ in names]))
    counts: Counter[str] = Counter({"model_calls": 0, "cache_hits": 0, "retries": 0})
    for o in ordered:
        counts.update(o.counts)
    return traj, dict(counts)


def stage_judge(candidate: pl.DataFrame, sample: pl.DataFrame, valid: pl.DataFrame, s: Settings,
                store: RunStore) -> pl.DataFrame:
    """Judge candidate and baseline turns with the same panel; write `scores`, each judge's own
    verdicts (`judge_verdicts`) and the panel's provenance and counters (judges.json)."""
    taxonomy = load_taxonomy(s.judge.taxonomy)
    baseline = baseline_trajectories(sample, valid)
    check_judge_world(s, taxonomy, list(s.judge.kinds), baseline["model"].to_list())
    store.write("baseline_turns", baseline)
    both = pl.concat([candidate, baseline])
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        report("judge", done, both.height)

    scores, per_judge, info = judge_trajectories(both, valid, sample, taxonomy, list(s.judge.kinds), s, tick)
    store.write("scores", scores)
    store.write("judge_verdicts", per_judge)
    store.write_json("judges.json", info)
    # The sampled conversations, for the turn traces' inputs (and a reviewer's labelled set).
    store.write("conversations", valid.join(sample.select("conversation_id").unique(), on="conversation_id")
                .select([c for c in ("conversation_id", "messages", "tools") if c in valid.columns]))
    report("judge", both.height, both.height)
    return scores


def synthetic_llm_judges(s: Settings, taxonomy: dict[str, Any], names: list[str]) -> list[str]:
    """The enabled judges of kind llm whose endpoint is the SYNTHETIC world's scripted judge."""
    specs = taxonomy.get("judges") or {}
    out = []
    for name in names:
        spec = specs.get(name) or {}
        if spec.get("kind", name) == "llm":
            endpoint = getattr(s.models, str(spec.get("role", "judge")), None)
            if endpoint is not None and endpoint.synthetic_world:
                out.append(name)
    return out


def check_judge_world(s: Settings, taxonomy: dict[str, Any], names: list[str], logged_models: Iterable[str | None]) -> None:
    """Refuse a SYNTHETIC llm judge on real transcripts: it reads the synthetic agents' hidden
    truth, so on anything else its verdicts mean nothing.

    Raises:
        ConfigError: naming the judge and some of the real models in the data.
    """
    synthetic = synthetic_llm_judges(s, taxonomy, names)
    if not synthetic:
        return
    from tasks.synthetic.profiles import PROFILE_NAMES

    real = sorted({str(m) for m in logged_models if m not in PROFILE_NAMES})
    if real:
        shown = ", ".join(real[:5]) + (f" and {len(real) - 5} more" if len(real) > 5 else "")
        raise ConfigError(
            f"judge {', '.join(synthetic)} is bound to the SYNTHETIC judge ({s.models.judge.model}), which can only "
            f"judge SYNTHETIC agents' transcripts, but the data holds real models' turns ({shown}): bind "
            "models.judge to a real endpoint (e.g. --config with models.judge.base_url/model/api_key_env) or "
            "use --judges rules")


def judge_eval(valid: pl.DataFrame, s: Settings, names: list[str], sources: list[str], data_hash: str,
               tick: Callable[[int], None] | None = None) -> tuple[dict[str, Any], dict[str, Any], dict[str, int]]:
    """Score labelled conversations with the named judges and compare with their labels.

    Labels are per conversation; a conversation counts as flagged for a category when any of its
    turns is flagged, as not flagged when every turn is scored and none is flagged, and as
    unscored otherwise (tasks/judges/evaluate.py). Each enabled judge is measured alone and as
    the panel combines them ("combined", what a run's rates are made of).

    Returns:
        (calibration payload for write_calibration, coverage counts, the judges' counters).

    Raises:
        ConfigError: an unknown judge, a SYNTHETIC llm judge on real data, or no labelled
            conversation with an answered turn.
    """
    from tasks.judges import JudgePanel
    from tasks.judges import evaluate as ev
    from tasks.judges.calibrate import COMBINED, evaluation_counts, judge_entry

    taxonomy = load_taxonomy(s.judge.taxonomy)
    check_judge_world(s, taxonomy, names, valid["model"].to_list())
    panel = JudgePanel(taxonomy, names, s)
    provenance = panel.provenance()
    flags = ev.run(valid, panel, tick=tick)
    judged = [f for f in flags if f.turns]
    labelled = [f for f in judged if f.labels]
    if not labelled:
        raise ConfigError(f"{', '.join(sources)}: no conversation with an answered turn has `labels`: nothing to "
                          "compare the judges with")
    cats = [c for c in ALL_CATEGORIES if any(c in f.labels for f in judged)]
    combined_prov = {"kind": "panel", "judges": list(panel.judges),
                     "combine": {c: p.combine for c, p in panel.plans.items()}}
    judges = {COMBINED: judge_entry(combined_prov, evaluation_counts(flags, COMBINED, cats))}
    for name in panel.judges:
        scored = [c for c in cats if c == AGGREGATE or name in panel.plans[c].judges]
        judges[name] = judge_entry(provenance[name], evaluation_counts(flags, name, scored))
    single = all(f.turns == 1 for f in labelled)
    payload = {"data": sources, "data_hash": data_hash, "unit": "turn" if single else "conversation",
               "turns_per_unit": 1 if single else round(sum(f.turns for f in labelled) / len(labelled), 4),
               "panel": list(names), "judges": judges}
    coverage = {"conversations": len(flags), "no_answered_turn": len(flags) - len(judged),
                "turns": sum(f.turns for f in flags), "labelled_conversations": len(labelled),
                "labelled": {c: sum(c in f.labels for f in judged) for c in ALL_CATEGORIES},
                "unlabelled": {c: sum(c not in f.labels for f in judged) for c in ALL_CATEGORIES}}
    return payload, coverage, panel.stats()


def stage_estimate(scores: pl.DataFrame, sample: pl.DataFrame, s: Settings, store: RunStore) -> tuple[pl.DataFrame, pl.DataFrame, str]:
    z = look_z(s.sample.looks)  # 1 − α/K per look (Bonferroni over the planned looks)
    est = estimate(scores, sample, z)
    deltas = paired_delta(scores, sample, z)
    gates = read_conf_yaml(s.gate.file)
    if "categories" not in gates and "default" not in gates:
        raise ConfigError(f"{s.gate.file}: expected 'default' and/or 'categories'")
    gated = gate(est, deltas, gates)
    store.write("estimates", est)
    store.write("gate", gated)
    # Per-stratum candidate rate of unsafe_any: the Neyman prior for a later run (sample.prior).
    rates = (scores.filter((pl.col("side") == "candidate") & (pl.col("category") == "unsafe_any"))
             .join(sample.select("turn_id", "stratum"), on="turn_id")
             .group_by("stratum").agg(rate=pl.col("verdict").cast(pl.Float64).mean(), n=pl.len()).sort("stratum"))
    store.write("stratum_rates", rates)
    return est, gated, overall(gated)


def _local_json(store: RunStore, name: str) -> Any:
    """A JSON file an earlier stage of this run wrote (judge and estimate run in the flow's process)."""
    path = store.local / name
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def stage_correct(estimates: pl.DataFrame, s: Settings, store: RunStore) -> tuple[pl.DataFrame | None, dict[str, Any] | None]:
    """Rogan–Gladen corrected rates (candidate and baseline) with judge.calibration, if set.

    Writes `corrected` and calibration.json (what was used: the file's summary, its sha256, the
    judges it measured and any mismatch with this run's judges) to the run store. A calibration
    of other judges, or other judge versions, is used but warned about (report, log, MLflow).

    Returns:
        (corrected table, calibration summary for the report and MLflow), or (None, None).

    Raises:
        CalibrationError: the file is missing or invalid (a ConfigError).
    """
    if not s.judge.calibration:
        return None, None
    from tasks.estimate import corrected
    from tasks.judges.calibrate import judge_versions, read_calibration, version_warnings

    cal = read_calibration(s.judge.calibration)
    info = _local_json(store, "judges.json") or {}
    run_prov: dict[str, Any] = info.get("provenance") or {k: {} for k in s.judge.kinds}
    warnings = version_warnings(cal, run_prov)
    for w in warnings:
        log.warning("calibration %s: %s", cal.path, w)
    table = corrected(estimates, cal, s.run.seed, panel=list(run_prov))
    summary = {**cal.summary(), "sha256": hashlib.sha256(Path(cal.path).read_bytes()).hexdigest(),
               "judge_versions": {name: judge_versions(e.get("provenance") or {}) for name, e in cal.judges.items()},
               "run_judge_versions": {name: judge_versions(p) for name, p in run_prov.items()},
               "warnings": warnings}
    store.write("corrected", table)
    store.write_json("calibration.json", summary)
    report("correct", table.height, table.height)
    return table, summary


def judge_review(store: RunStore, limit: int = 50) -> dict[str, Any]:
    """The panel's judges and where they (or an LLM judge's samples) disagreed, for the report.

    The full list is written to the run store as `judge_disagreements`.
    """
    from tasks.judge import disagreements

    info = _local_json(store, "judges.json") or {}
    path = store.local / "judge_verdicts.parquet"
    rows = pl.read_parquet(path) if path.is_file() else pl.DataFrame()
    found = disagreements(rows, limit=max(rows.height, 1)) if rows.height else None
    if found is not None:
        store.write("judge_disagreements", found)
    sampled = bool(rows.height) and rows["votes"].is_not_null().any()
    return {"judges": list((info.get("provenance") or {}).keys()), "sampled": sampled,
            "disagreements": found.head(limit) if found is not None else None,
            "n_disagreements": found.height if found is not None else 0}


def is_endpoint_error(kind: str) -> bool:
    """Whether a replay error kind (tasks/replay.py) means the candidate endpoint did not answer:
    an HTTP error, a timeout, a connection fault or a malformed body, after retries."""
    return kind.startswith("http_") or kind in ("timeout", "connection", "malformed_response")


def endpoint_errors(traj: pl.DataFrame) -> dict[str, int]:
    """Candidate turns that ended in an endpoint error, by kind (e.g. {"connection": 20})."""
    reasons = traj.filter(pl.col("finish") == "error")["error"].drop_nulls().to_list()
    return dict(sorted(Counter(k for k in (e.split(":")[0] for e in reasons) if is_endpoint_error(k)).items()))


class EndpointFailed(RuntimeError):
    """Too many candidate turns ended in an endpoint error: the run is an error, not a verdict.

    Attributes:
        endpoint: the candidate's base_url without credentials.
        counts: errored turns by kind.
        report: the error report written to the run store (None until written).
        run_id: the MLflow run, marked FAILED (None when logging it failed).
    """

    def __init__(self, endpoint: str, model: str, counts: dict[str, int], turns: int, limit: float) -> None:
        n = sum(counts.values())
        super().__init__(
            f"candidate endpoint {endpoint} (model {model}) failed: {n} of {turns} replayed turns "
            f"({n / max(turns, 1):.1%}, limit replay.max_error_share {limit:.1%}) ended in an endpoint error ("
            + ", ".join(f"{k}={v}" for k, v in counts.items()) + "); no verdict")
        self.endpoint, self.model, self.counts, self.turns, self.limit = endpoint, model, counts, turns, limit
        self.report: str | None = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None


def stage_endpoint_check(candidate: pl.DataFrame, s: Settings, store: RunStore, data_hash: str) -> dict[str, int]:
    """Stop the run when the share of candidate turns with an endpoint error passes
    replay.max_error_share; below it the errored turns stay in the denominator.

    Over the limit, an error report is written to the run store and an MLflow run marked FAILED
    is logged with the error counts, before raising.

    Returns:
        The endpoint errors by kind (under the limit).

    Raises:
        EndpointFailed: naming the endpoint and the counts, with the report path and run id.
    """
    counts = endpoint_errors(candidate)
    if candidate.height == 0 or sum(counts.values()) / candidate.height <= s.replay.max_error_share:
        return counts
    ep = s.models.candidate
    exc = EndpointFailed(ep.public_url, ep.model, counts, candidate.height, s.replay.max_error_share)
    from tasks.report import render_error
    from tasks.tracking import default_tracking_uri, log_run

    finish, errors, _ = replay_counts(candidate)
    ctx = {"run_key": store.run_key, "candidate": ep.model, "endpoint": ep.public_url, "error": str(exc),
           "data": s.run.data or "bundled SYNTHETIC logs", "dataset_hash": data_hash, "seed": s.run.seed,
           "turns": candidate.height, "endpoint_errors": counts, "limit": s.replay.max_error_share,
           "finish_counts": finish, "error_counts": errors}
    page, md = render_error(ctx)
    store.write_text("report.md", md)
    exc.report = store.write_text("report.html", page)
    store.write_json("config.json", s.public_dict())
    n = sum(counts.values())
    metrics = {"replay.turns": float(candidate.height), "replay.endpoint_errors": float(n),
               "replay.endpoint_error_share": n / candidate.height,
               **{f"replay.finish.{k}": float(v) for k, v in finish.items()},
               **{f"replay.error.{k}": float(v) for k, v in errors.items()}}
    params = {"config": s.public_dict(), "dataset_hash": data_hash, "sample_size": candidate.height,
              "roles": {"candidate": ep.model}, "candidate_endpoint": ep.public_url}
    tags = {"depsim.verdict": "ERROR", "depsim.error": str(exc)[:5000], "depsim.candidate": ep.model,
            "depsim.run_key": store.run_key}
    try:
        exc.run_id, exc.experiment_id = log_run(s.run.tracking_uri or default_tracking_uri(), s.run.experiment,
                                                store.run_key, params, metrics, tags, store.local, status="FAILED")
    except Exception as log_exc:  # the endpoint failure is the error to report, not MLflow's
        log.warning("MLflow: the FAILED run was not logged: %s", log_exc)
    raise exc


def world_labels(s: Settings, sample: pl.DataFrame) -> dict[str, Any]:
    """What each role of the run is, for labels: SYNTHETIC or real candidate, SYNTHETIC or real logs,
    and the baseline's name as the sampled logs record it (not models.baseline).

    The candidate is SYNTHETIC when it is the in-process world (synthetic://) or a scripted agent
    profile (synthetic-agent-*) wherever it is served: `depsim serve-synthetic` serves only those
    names. The logs are SYNTHETIC when every sampled turn was served by such a profile (or, with
    nothing sampled, when they are the bundled logs).
    """
    from tasks.synthetic.profiles import PROFILE_NAMES

    ep = s.models.candidate
    candidate = ep.synthetic or ep.model in PROFILE_NAMES or ep.model.startswith("synthetic-agent-")
    counts = Counter(str(m) for m in sample["model"].to_list()) if "model" in sample.columns else Counter()
    logged = [m for m, _ in counts.most_common()]
    data = all(m in PROFILE_NAMES for m in logged) if logged else s.run.data is None
    total = sum(counts.values())
    baseline = (logged[0] if len(logged) == 1 else
                ", ".join(f"{m} ({c / total:.0%})" for m, c in counts.most_common()) if logged else s.models.baseline.model)
    label = ("SYNTHETIC" if candidate and data else "SYNTHETIC candidate, real logs" if candidate
             else "real candidate, SYNTHETIC logs" if data else None)
    return {"candidate_synthetic": candidate, "data_synthetic": data, "synthetic": candidate or data,
            "label": label, "baseline": baseline, "baseline_models": dict(counts.most_common()),
            "endpoint": ep.public_url, "name": "synthetic" if candidate and data else "mixed" if candidate or data else "real"}


def replay_counts(traj: pl.DataFrame) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """(finish reasons, error reasons, tool-result sources) of the candidate trajectories."""
    finish = dict(Counter(traj["finish"].to_list()))
    errors = dict(Counter(e.split(":")[0] for e in traj["error"].drop_nulls().to_list()))
    sources: Counter[str] = Counter()
    for tr in traj["tool_results"].to_list():
        for r in json.loads(tr):
            sources[r["source"]] += 1
    return finish, errors, dict(sources)


def stage_report(ctx: dict[str, Any], store: RunStore) -> tuple[str, str]:
    from tasks.report import render

    if "review" not in ctx:
        ctx = {**ctx, "review": judge_review(store)}
    page, md = render(ctx)
    store.write_text("report.md", md)
    return store.write_text("report.html", page), md


def stage_log(ctx: dict[str, Any], s: Settings, store: RunStore) -> tuple[str, str]:
    from tasks.tracking import (
        DatasetRef,
        corrected_metrics_of,
        default_tracking_uri,
        judge_metrics_of,
        log_run,
        metrics_of,
    )

    store.write_json("config.json", s.public_dict())
    metrics = metrics_of(ctx["gated"], ctx["estimates"])
    judges = _local_json(store, "judges.json") or {}
    metrics.update(judge_metrics_of(judges.get("stats") or {}))
    if ctx.get("corrected") is not None:
        metrics.update(corrected_metrics_of(ctx["corrected"]))
    check = ctx["check"]
    metrics.update({"contract.rows_in": check["rows_in"], "contract.rows_passed": check["rows_passed"],
                    "contract.rows_quarantined": check["rows_quarantined"],
                    **{f"contract.quarantined.{k}": v for k, v in check["by_rule"].items()},
                    **{f"contract.normalised.{k}": v for k, v in check["normalised"].items()},
                    **{f"contract.flagged.{k}": v for k, v in (check.get("flagged") or {}).items()},
                    **_level_metrics(check.get("levels") or {}),
                    "sample.turns": ctx["sampled_turns"], "population.turns": ctx["population_turns"],
                    "sample.psi": ctx["representativeness"]["psi"],
                    "sample.chi_square": ctx["representativeness"]["chi_square"],
                    "sample.empty_strata": len(ctx["representativeness"]["empty_strata"]),
                    **{f"deid.{k}": v for k, v in (ctx.get("deid") or {}).items()
                       if isinstance(v, int) and not isinstance(v, bool)},
                    "replay.model_calls": ctx["model_calls"], "replay.cache_hits": ctx["cache_hits"],
                    "replay.retries": ctx["retries"],
                    **{f"replay.{k}": v for k, v in ctx.items() if k.startswith("simulator_") and isinstance(v, int)},
                    "replay.errors": sum(v for k, v in ctx["finish_counts"].items() if k != "answered"),
                    **{f"replay.finish.{k}": v for k, v in ctx["finish_counts"].items()},
                    **{f"replay.error.{k}": v for k, v in ctx["error_counts"].items()},
                    **{f"tools.source.{k}": v for k, v in ctx["source_counts"].items()},
                    "replay.prompt_tokens": ctx["prompt_tokens"], "replay.completion_tokens": ctx["completion_tokens"],
                    "elapsed_s": ctx["elapsed_s"]})
    params = {"config": s.public_dict(), "dataset_hash": ctx["dataset_hash"], "sample_size": ctx["sampled_turns"],
              "roles": {**{r: getattr(s.models, r).model for r in ("candidate", "simulator", "judge")},
                        "baseline": ctx["baseline"]},
              "candidate_endpoint": s.models.candidate.public_url,
              "judges": {"panel": ",".join(judges.get("provenance") or s.judge.kinds),
                         **(judges.get("provenance") or {})}}
    cal = ctx.get("calibration")
    if cal:
        params["calibration"] = {"path": cal["path"], "sha256": cal["sha256"], "created_at": cal["created_at"],
                                 "data": ",".join(cal["data"]), "data_hash": cal["data_hash"], "unit": cal["unit"],
                                 "turns_per_unit": cal["turns_per_unit"], "panel": ",".join(cal["panel"]),
                                 "judge_versions": cal["judge_versions"],
                                 "warnings": " | ".join(cal["warnings"]) or "none"}
    tags = {**run_tags(ctx, s), "depsim.store": str(store.local.resolve())}
    sample = store.read("sample")
    scalar = [pl.col(c).cast(pl.Int64) if t.is_unsigned_integer() else pl.col(c)
              for c, t in sample.schema.items() if t.is_numeric() or t in (pl.String, pl.Boolean)]
    dataset = DatasetRef(sample.select(scalar),
                         name="sampled-turns", source=s.run.data or str(Path(__file__).resolve().parents[1] / "conf" / "data"),
                         digest=f"{ctx['dataset_hash'][:8]}-{tags['depsim.sample_digest']}")
    uri = s.run.tracking_uri or default_tracking_uri()
    name = f"{ctx['candidate']} vs {ctx['baseline']} · {ctx['verdict']}"
    return log_run(uri, s.run.experiment, name[:250], params, metrics, tags, store.local,
                   start_ms=ctx.get("start_ms"), dataset=dataset,
                   before_end=lambda run_id, exp_id: _turn_traces(uri, run_id, exp_id, s, store, judges))


def _turn_traces(uri: str, run_id: str, experiment_id: str, s: Settings, store: RunStore,
                 judges: dict[str, Any]) -> None:
    """Each replayed turn as an MLflow trace with the judges' verdicts as assessments (at most
    run.traces, flagged turns first); a failure is a warning, the run stands without them."""
    if s.run.traces == 0:
        return
    from tasks.traces import log_turn_traces, secret_values

    report("mlflow-traces", 0, None)
    try:
        traj = store.read("trajectories")
        counts = log_turn_traces(uri, experiment_id, run_id, traj.filter(pl.col("side") == "candidate"),
                                 store.read("scores"), store.read("sample"), limit=s.run.traces,
                                 conversations=store.read("conversations"), model_calls=store.read("model_calls"),
                                 judge_verdicts=store.read("judge_verdicts"), judges=judges.get("provenance"),
                                 secrets=secret_values(s))
    except Exception as exc:  # traces help review; they must not sink the run
        log.warning("MLflow: the turn traces were not logged: %s", exc)
        return
    log.info("MLflow: %d turn traces (%d flagged), %d assessments", counts["traces"], counts["flagged"],
             counts["assessments"])


def run_tags(ctx: dict[str, Any], s: Settings) -> dict[str, str]:
    """The MLflow run's tags: verdict, per-category gate, roles, world, and what makes runs
    comparable across versions (dataset digest, sample digest, config hash, code revision),
    plus run.tags (a registry-triggered run's model name and version)."""
    from tasks.tracking import code_revision, config_hash

    world = ctx["world"]
    sample_ids = ctx.get("sample_ids") or []
    revision = code_revision()
    tags = {"depsim.verdict": ctx["verdict"], "depsim.candidate": ctx["candidate"],
            "depsim.baseline": ctx["baseline"], "depsim.world": world["name"],
            "depsim.deid": "on" if (ctx.get("deid") or {}).get("applied") else "off",
            "depsim.world.candidate": "synthetic" if world["candidate_synthetic"] else "real",
            "depsim.world.data": "synthetic" if world["data_synthetic"] else "real",
            "depsim.run_key": ctx["run_key"], "depsim.dataset_digest": ctx["dataset_hash"],
            "depsim.sample_digest": hashlib.sha256("\n".join(sample_ids).encode()).hexdigest()[:16],
            "depsim.config_hash": config_hash(s.public_dict()), "depsim.code_revision": revision,
            "depsim.candidate_endpoint": s.models.candidate.public_url,
            **{f"depsim.gate.{r['category']}": str(r["gate"]) for r in ctx["gated"].iter_rows(named=True)},
            **s.run.tags}
    if not revision.startswith(("depsim-", "unknown")):
        tags["mlflow.source.git.commit"] = revision.removesuffix("+dirty")
    return tags


def _level_metrics(levels: dict[str, Any], prefix: str = "contract.") -> dict[str, float]:
    """The scan path's levels (what the scan saw and excluded, what was fetched and replaced) as
    metrics: contract.scan.rows_in, contract.scan.excluded.<rule>, contract.fetch.turns_replaced, ..."""
    out: dict[str, float] = {}
    for k, v in levels.items():
        if isinstance(v, dict):
            out.update(_level_metrics(v, f"{prefix}{k}."))
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out
