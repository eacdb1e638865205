"""MLflow logging: one run per simulation, written in one go at the end.

Writing at the end means a run that stops early (e.g. the contract check fails) leaves nothing
half-written; if logging itself fails midway, the partial run is deleted.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import polars as pl


def default_tracking_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


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
            status: str = "FINISHED") -> tuple[str, str]:
    """Create the MLflow run with everything, ended with `status` (FINISHED, or FAILED for a run
    that is an error); returns (run id, experiment id)."""
    import mlflow
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
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
        client.log_artifacts(run_id, str(artifact_dir))
        client.set_terminated(run_id, status)
    except BaseException:
        client.delete_run(run_id)
        raise
    _ = mlflow  # imported for its side effect of registering stores
    return run_id, exp_id
