"""MLflow logging: one run per simulation, written in one go at the end.

Writing at the end means a run that stops early (e.g. the contract check fails) leaves nothing
half-written; if logging itself fails midway, the partial run is deleted. The run still carries
the flow's own start and end times (`start_ms`), so its duration in the MLflow UI is the run's.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import subprocess
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class DatasetRef:
    """The sampled turns as an MLflow dataset input (the run's Datasets view)."""

    table: pl.DataFrame
    name: str
    source: str
    digest: str


@functools.cache
def code_revision() -> str:
    """The git commit of this checkout (with "+dirty" when it has changes), else the package version."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5)
        if head.returncode == 0 and head.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"depsim-{version('depsim')}"
    except PackageNotFoundError:
        return "unknown"


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of the resolved configuration (sorted JSON), the first 16 hex digits."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def default_tracking_uri() -> str:
    """Where runs go when run.tracking_uri is unset: MLFLOW_TRACKING_URI (a team's `mlflow
    server`), else the local SQLite store mlflow.db in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = str(v)[:6000]
    return out


def metrics_of(gated: pl.DataFrame, estimates: pl.DataFrame) -> dict[str, float]:
    m: dict[str, float] = {}
    for r in gated.iter_rows(named=True):
        c = r["category"]
        m.update({f"{c}.rate": r["rate"], f"{c}.lower": r["lower"], f"{c}.upper": r["upper"],
                  f"{c}.n_unscored": r["n_unscored"]})
        if r.get("delta") is not None:
            m.update({f"{c}.delta": r["delta"], f"{c}.delta_lower": r["delta_lower"],
                      f"{c}.delta_upper": r["delta_upper"]})
    for r in estimates.filter(pl.col("side") == "baseline").iter_rows(named=True):
        c = r["category"]
        m.update({f"{c}.baseline_rate": r["rate"], f"{c}.baseline_lower": r["lower"],
                  f"{c}.baseline_upper": r["upper"]})
    if "min_detectable_rate" in estimates.columns:  # the smallest rate this sample would show
        for r in estimates.filter(pl.col("side") == "candidate").iter_rows(named=True):
            m[f"{r['category']}.min_detectable_rate"] = r["min_detectable_rate"]
    return {k: float(v) for k, v in m.items() if v is not None and v == v}


def corrected_metrics_of(corrected: pl.DataFrame) -> dict[str, float]:
    """Corrected rates beside the raw ones: `<cat>.corrected_rate|lower|upper`, the calibration's
    `<cat>.sensitivity|specificity`, and the baseline's `<cat>.baseline_corrected_rate|lower|upper`
    (as `<cat>.baseline_rate` is the baseline's raw rate). No metric where there is no number."""
    m: dict[str, float | None] = {}
    for r in corrected.iter_rows(named=True):
        c = r["category"]
        if r["side"] == "candidate":
            m.update({f"{c}.corrected_rate": r["corrected_rate"], f"{c}.corrected_lower": r["corrected_lower"],
                      f"{c}.corrected_upper": r["corrected_upper"], f"{c}.sensitivity": r["sensitivity"],
                      f"{c}.specificity": r["specificity"]})
        elif r["side"] == "baseline":
            m.update({f"{c}.baseline_corrected_rate": r["corrected_rate"],
                      f"{c}.baseline_corrected_lower": r["corrected_lower"],
                      f"{c}.baseline_corrected_upper": r["corrected_upper"]})
    return {k: float(v) for k, v in m.items() if v is not None and v == v}


def judge_metrics_of(stats: dict[str, int]) -> dict[str, float]:
    """The judge panel's counters (`<judge>.<counter>`, e.g. llm.requests) as `judge.<judge>.<counter>`."""
    return {f"judge.{k}": float(v) for k, v in stats.items() if isinstance(v, int | float)}


def evaluation_metrics_of(judges: dict[str, Any]) -> dict[str, float]:
    """A calibration's `judges` entries as `<judge>.<category>.<metric>` (counts, precision,
    recall, f1, kappa, sensitivity and specificity with their Wilson bounds, ...)."""
    m: dict[str, float] = {}
    for judge, entry in judges.items():
        for cat, values in entry.get("categories", {}).items():
            for k, v in values.items():
                if isinstance(v, int | float) and not isinstance(v, bool) and v == v:
                    m[f"{judge}.{cat}.{k}"] = float(v)
    return m


def log_run(tracking_uri: str, experiment: str, run_name: str, params: dict[str, Any],
            metrics: dict[str, float], tags: dict[str, str], artifact_dir: Path,
            status: str = "FINISHED", start_ms: int | None = None, dataset: DatasetRef | None = None,
            before_end: Callable[[str, str], None] | None = None) -> tuple[str, str]:
    """Create the MLflow run with everything, ended with `status` (FINISHED, or FAILED for a run
    that is an error); returns (run id, experiment id).

    Args:
        start_ms: the flow's start (epoch ms); the run ends now, so its duration is the flow's.
        dataset: the sampled turns, logged as the run's dataset input.
        before_end: called with (run id, experiment id) while the run is still open, e.g. to log
            the per-turn traces; an error there deletes the run like any other.
    """
    from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run = client.create_run(exp_id, run_name=run_name, tags=tags, start_time=start_ms)
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        flat = _flatten(params)
        items = list(flat.items())
        for i in range(0, len(items), 100):
            client.log_batch(run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
        mitems = list(metrics.items())
        for i in range(0, len(mitems), 500):
            client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in mitems[i:i + 500]])
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        if dataset is not None:
            from mlflow.data.polars_dataset import from_polars

            with warnings.catch_warnings():  # "source can be interpreted in multiple ways": a path is a path
                warnings.simplefilter("ignore")
                ds = from_polars(dataset.table, source=dataset.source, name=dataset.name, digest=dataset.digest)
            client.log_inputs(run_id, datasets=[DatasetInput(ds._to_mlflow_entity(),
                                                             tags=[InputTag("mlflow.data.context", "eval")])])
        client.log_artifacts(run_id, str(artifact_dir))
        if before_end is not None:
            before_end(run_id, exp_id)
        client.set_terminated(run_id, status, end_time=int(time.time() * 1000))
    except BaseException:
        if before_end is not None:  # traces already written for this run go with it
            from tasks.traces import delete_turn_traces

            with contextlib.suppress(Exception):
                delete_turn_traces(tracking_uri, exp_id, run_id)
        client.delete_run(run_id)
        raise
    return run_id, exp_id
