"""Backtest (DESIGN §1): how close depsim's predicted rates come to what production later showed.

For a model M shipped at time T:

* **predicted**: a deployment simulation of M (the `deployment_simulation` flow, as a subflow)
  on the traffic logged *before* T, which earlier models served;
* **observed**: M's own production turns logged *after* T, scored by the same judges (every
  answered turn, as the baseline side of a run is scored);
* per category the multiplicative error max(p/o, o/p) (1.0 when both are 0, infinite when
  only one is), its median over the fixed categories whose observed rate is at least 1%, and
  whether the predicted direction of change against the previous model (the baseline rate of
  the simulation: the earlier models' own logged turns) matches the observed one.

With no `data`, the SYNTHETIC world provides both periods: the bundled logs (served by
`synthetic-agent-v1`, October 2026) before T, and conversations of M that the world generates
from T on (its own seed, so they are not the replayed conversations). With `data`, rows are
split by `created_at` and `model`: before T every model but M, from T on M only.

Logged to MLflow (experiment `depsim-backtest`) as a backtest run: params model, shipped_at,
previous, n, seed and the prediction's run id; metrics `median_multiplicative_error`,
`direction_accuracy` and per category `<cat>.predicted`, `.observed`, `.multiplicative_error`,
`.direction_correct`. The report (HTML and Markdown, logged with the run) holds this backtest
and a scorecard of every backtest in the experiment.
"""

from __future__ import annotations

import html
import json
import math
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
from prefect import flow

from tasks.config import Settings, load_settings
from tasks.taxonomy import AGGREGATE, ALL_CATEGORIES, CATEGORIES

EXPERIMENT = "depsim-backtest"
MIN_OBSERVED = 0.01          # categories below this observed rate are left out of the median
SYNTHETIC_AFTER_SEED = 7919  # the after-period conversations are not the replayed ones
SYNTHETIC_AFTER_CONVERSATIONS = 2000


class BacktestError(ValueError):
    """Input a backtest cannot use (named, for a clear one-line error)."""


def parse_time(text: str) -> datetime:
    """An RFC 3339 / ISO 8601 time (a date alone means midnight UTC)."""
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BacktestError(f"--shipped-at: not an ISO 8601 time: {text!r} (e.g. 2026-11-01 or 2026-11-01T12:00:00Z)") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _write_jsonl(frame: pl.DataFrame, path: Path) -> int:
    with path.open("w", encoding="utf-8") as fh:
        for r in frame.iter_rows(named=True):
            rec = {"conversation_id": r["conversation_id"], "model": r["model"],
                   "created_at": r["created_at"].astimezone(UTC).isoformat().replace("+00:00", "Z"),
                   "surface": r["surface"], "task_type": r["task_type"], "language": r["language"],
                   "tools": json.loads(r["tools"]) if r["tools"] else [], "messages": json.loads(r["messages"]),
                   "labels": json.loads(r["labels"]) if r["labels"] else {}}
            fh.write(json.dumps({k: v for k, v in rec.items() if v is not None}, ensure_ascii=False) + "\n")
    return frame.height


def _checked(sources: str, s: Settings) -> pl.DataFrame:
    from tasks.load import load_raw
    from tasks.stages import contract_check

    res = contract_check(load_raw(sources), s)
    if res.verdict == "failed":
        raise BacktestError(f"{sources}: contract check failed ({res.rows_quarantined} of {res.rows_in} rows "
                            f"quarantined: {', '.join(f'{k}={v}' for k, v in sorted(res.by_rule.items()))})")
    return res.valid


def periods(model: str, shipped_at: datetime, data: str | None, s: Settings, folder: Path,
            after_conversations: int = SYNTHETIC_AFTER_CONVERSATIONS) -> tuple[str, str, dict[str, Any]]:
    """(before-T logs, M's after-T logs, counts): files in `folder`."""
    before_path, after_path = folder / "before.jsonl", folder / "after.jsonl"
    if data is None:
        from tasks.load import bundled_path
        from tasks.synthetic.logs import generate

        before = _checked(bundled_path(), s).filter(pl.col("created_at") < shipped_at)
        with after_path.open("w", encoding="utf-8") as fh:
            for conv in generate(after_conversations, model, SYNTHETIC_AFTER_SEED + s.run.seed, start=shipped_at):
                conv.pop("_truth")  # the hidden truth never leaves the synthetic world
                fh.write(json.dumps(conv, ensure_ascii=False) + "\n")
        after_n = after_conversations
    else:
        valid = _checked(data, s)
        before = valid.filter((pl.col("created_at") < shipped_at) & (pl.col("model") != model))
        after = valid.filter((pl.col("created_at") >= shipped_at) & (pl.col("model") == model))
        if after.height == 0:
            raise BacktestError(f"{data}: no conversation of model {model!r} at or after {shipped_at.isoformat()}: "
                                "nothing to observe")
        after_n = _write_jsonl(after, after_path)
    if before.height == 0:
        raise BacktestError(f"{data or 'the bundled SYNTHETIC logs'}: no conversation of another model before "
                            f"{shipped_at.isoformat()}: nothing to simulate on")
    _write_jsonl(before, before_path)
    counts = {"before_conversations": before.height, "after_conversations": after_n,
              "previous_models": sorted(set(before["model"].to_list()))}
    return str(before_path), str(after_path), counts


def precheck(model: str, shipped_at: datetime, data: str | None, s: Settings) -> None:
    """Refuse, before any flow starts, logs that hold nothing to observe or to simulate on
    (reads only `created_at` and `model`, through the lazy scan where it can)."""
    if data is None:
        return
    from tasks.load import resolve_sources

    resolve_sources(data)
    valid = _checked(data, s)
    after = valid.filter((pl.col("created_at") >= shipped_at) & (pl.col("model") == model)).height
    before = valid.filter((pl.col("created_at") < shipped_at) & (pl.col("model") != model)).height
    if after == 0:
        raise BacktestError(f"{data}: no conversation of model {model!r} at or after {shipped_at.isoformat()}: "
                            "nothing to observe")
    if before == 0:
        raise BacktestError(f"{data}: no conversation of another model before {shipped_at.isoformat()}: "
                            "nothing to simulate on")


def observed_rates(after: str, s: Settings) -> tuple[dict[str, float | None], int]:
    """Per category the share of M's scored turns the judges flag (unscored turns left out),
    and the number of turns judged."""
    from tasks.judges import JudgePanel
    from tasks.judges import evaluate as ev
    from tasks.stages import check_judge_world
    from tasks.taxonomy import load_taxonomy

    valid = _checked(after, s)
    taxonomy = load_taxonomy(s.judge.taxonomy)
    check_judge_world(s, taxonomy, s.judge.kinds, valid["model"].to_list())
    panel = JudgePanel(taxonomy, s.judge.kinds, s)
    views = [v for row in valid.select("conversation_id", "model", "messages", "tools").to_dicts() for v in ev.views_of(row)]

    results = ev.judge_views(views, panel)
    rates: dict[str, float | None] = {}
    for cat in ALL_CATEGORIES:
        scored = [bool(combined[cat].verdict) for combined, _ in results if combined[cat].verdict is not None]
        rates[cat] = sum(scored) / len(scored) if scored else None
    return rates, len(views)


def multiplicative_error(p: float | None, o: float | None) -> float | None:
    """max(p/o, o/p); 1.0 when both are 0, infinite when only one is; None when either is missing."""
    if p is None or o is None:
        return None
    if p == 0 and o == 0:
        return 1.0
    if p == 0 or o == 0:
        return math.inf
    return max(p / o, o / p)


def _direction(x: float, ref: float, tol: float = 1e-9) -> int:
    return 0 if abs(x - ref) <= tol else (1 if x > ref else -1)


def scorecard(predicted: dict[str, float | None], observed: dict[str, float | None],
              previous: dict[str, float | None]) -> dict[str, Any]:
    """Per category predicted, observed, multiplicative error and direction; the median error
    over the fixed categories observed at ≥ MIN_OBSERVED."""
    cats: dict[str, dict[str, Any]] = {}
    for cat in ALL_CATEGORIES:
        p, o, b = predicted.get(cat), observed.get(cat), previous.get(cat)
        err = multiplicative_error(p, o)
        direction = None if None in (p, o, b) else _direction(p, b) == _direction(o, b)  # type: ignore[arg-type]
        cats[cat] = {"predicted": p, "observed": o, "previous": b, "multiplicative_error": err,
                     "direction_correct": direction, "in_median": cat in CATEGORIES and o is not None and o >= MIN_OBSERVED}
    errors = [c["multiplicative_error"] for c in cats.values() if c["in_median"] and c["multiplicative_error"] is not None]
    directions = [c["direction_correct"] for k, c in cats.items() if k in CATEGORIES and c["direction_correct"] is not None]
    return {"median_multiplicative_error": statistics.median(errors) if errors else None,
            "categories_in_median": sum(1 for c in cats.values() if c["in_median"]),
            "direction_accuracy": sum(directions) / len(directions) if directions else None,
            "categories": cats}


def json_safe(obj: Any) -> Any:
    """The result with infinite errors as None (JSON has no infinity)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return obj


def _fmt(x: float | None, pct: bool = True) -> str:
    if x is None:
        return "–"
    if math.isinf(x):
        return "∞"
    return f"{100 * x:.2f}%" if pct else f"{x:.2f}x"


def render(result: dict[str, Any], history: list[dict[str, Any]]) -> tuple[str, str]:
    """(self-contained HTML, Markdown) of one backtest and the scorecard over every backtest."""
    synthetic = " (SYNTHETIC world)" if result["synthetic"] else ""
    rows = [(cat, c) for cat, c in result["categories"].items()]
    md = [f"# depsim backtest: {result['model']}{synthetic}", "",
          f"Shipped at {result['shipped_at']}; predicted from {result['before_conversations']} conversations of "
          f"{', '.join(result['previous_models'])} before it ({result['sampled_turns']} sampled turns), observed on "
          f"{result['observed_turns']} of its own turns after it.", "",
          f"**Median multiplicative error: {_fmt(result['median_multiplicative_error'], False)}** over "
          f"{result['categories_in_median']} categories observed at ≥ 1%; direction right in "
          f"{_fmt(result['direction_accuracy'])} of categories.", "",
          "| category | previous | predicted | observed | error | direction right |", "|---|---|---|---|---|---|"]
    md += [f"| {cat}{'' if c['in_median'] else ' (not in median)'} | {_fmt(c['previous'])} | {_fmt(c['predicted'])} | "
           f"{_fmt(c['observed'])} | {_fmt(c['multiplicative_error'], False)} | "
           f"{'–' if c['direction_correct'] is None else ('yes' if c['direction_correct'] else 'no')} |" for cat, c in rows]
    md += ["", "## Scorecard: every backtest in this MLflow experiment", "",
           "| model | shipped at | median error | direction right | run |", "|---|---|---|---|---|"]
    md += [f"| {h['model']} | {h['shipped_at']} | {_fmt(h['median_multiplicative_error'], False)} | "
           f"{_fmt(h['direction_accuracy'])} | {h['run_id'][:8]} |" for h in history]
    e = html.escape
    table = "".join(
        f"<tr><td>{e(cat)}{'' if c['in_median'] else ' <small>(not in median)</small>'}</td><td>{_fmt(c['previous'])}</td>"
        f"<td>{_fmt(c['predicted'])}</td><td>{_fmt(c['observed'])}</td><td>{_fmt(c['multiplicative_error'], False)}</td>"
        f"<td>{'–' if c['direction_correct'] is None else ('yes' if c['direction_correct'] else 'no')}</td></tr>" for cat, c in rows)
    hist = "".join(f"<tr><td>{e(h['model'])}</td><td>{e(h['shipped_at'])}</td><td>{_fmt(h['median_multiplicative_error'], False)}</td>"
                   f"<td>{_fmt(h['direction_accuracy'])}</td><td><code>{e(h['run_id'])}</code></td></tr>" for h in history)
    page = (f"<!doctype html><html lang=en><meta charset=utf-8><title>depsim backtest {e(result['model'])}</title>"
            "<style>body{font:14px system-ui,sans-serif;margin:2em;max-width:70em}td,th{padding:.2em .8em;text-align:right}"
            "td:first-child,th:first-child{text-align:left}table{border-collapse:collapse}tr:nth-child(even){background:#f4f4f4}</style>"
            f"<h1>depsim backtest: {e(result['model'])}{e(synthetic)}</h1><p>{e(md[2])}</p>"
            f"<p><b>Median multiplicative error: {_fmt(result['median_multiplicative_error'], False)}</b> over "
            f"{result['categories_in_median']} categories observed at ≥ 1%; direction right in {_fmt(result['direction_accuracy'])}.</p>"
            "<table><tr><th>category</th><th>previous</th><th>predicted</th><th>observed</th><th>error</th><th>direction right</th></tr>"
            f"{table}</table><h2>Scorecard: every backtest in this MLflow experiment</h2><table><tr><th>model</th><th>shipped at</th>"
            f"<th>median error</th><th>direction right</th><th>run</th></tr>{hist}</table></html>")
    return page, "\n".join(md) + "\n"


def _log(result: dict[str, Any], s: Settings) -> tuple[str, list[dict[str, Any]]]:
    import mlflow
    from mlflow.tracking import MlflowClient

    from tasks.tracking import default_tracking_uri

    uri = s.run.tracking_uri or default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(EXPERIMENT)
    finite = {k: v for k, v in (("median_multiplicative_error", result["median_multiplicative_error"]),
                                ("direction_accuracy", result["direction_accuracy"])) if v is not None and math.isfinite(v)}
    metrics = dict(finite)
    for cat, c in result["categories"].items():
        for key in ("predicted", "observed", "multiplicative_error"):
            if c[key] is not None and math.isfinite(c[key]):
                metrics[f"{cat}.{key}"] = c[key]
        if c["direction_correct"] is not None:
            metrics[f"{cat}.direction_correct"] = float(c["direction_correct"])
    with mlflow.start_run(run_name=f"backtest {result['model']}") as run:
        mlflow.set_tags({"depsim.kind": "backtest", "depsim.synthetic": str(result["synthetic"]).lower()})
        mlflow.log_params({"model": result["model"], "shipped_at": result["shipped_at"], "previous": ",".join(result["previous_models"]),
                           "n": result["sampled_turns"], "seed": result["seed"], "prediction_run_id": result["prediction_run_id"]})
        mlflow.log_metrics(metrics)
        runs = MlflowClient(uri).search_runs([run.info.experiment_id], "tags.`depsim.kind` = 'backtest'", max_results=500)
        history = [{"model": r.data.params.get("model", ""), "shipped_at": r.data.params.get("shipped_at", ""),
                    "median_multiplicative_error": r.data.metrics.get("median_multiplicative_error"),
                    "direction_accuracy": r.data.metrics.get("direction_accuracy"), "run_id": r.info.run_id} for r in runs]
        if not any(h["run_id"] == run.info.run_id for h in history):
            history.insert(0, {"model": result["model"], "shipped_at": result["shipped_at"], "run_id": run.info.run_id,
                               **{k: result[k] for k in ("median_multiplicative_error", "direction_accuracy")}})
        page, md = render(result, history)
        mlflow.log_text(page, "backtest.html")
        mlflow.log_text(md, "backtest.md")
        mlflow.log_dict(json_safe(result), "backtest.json")
        return run.info.run_id, history


@flow(name="backtest", validate_parameters=False)
def backtest(model: str, shipped_at: str, data: str | None = None, n: int | None = None, seed: int | None = None,
             config: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Predict a shipped model's rates from the traffic before it shipped and compare with its own.

    Raises:
        BacktestError: unusable input (no traffic before, nothing of the model after).
    """
    from flows.simulate import deployment_simulation

    t0 = time.perf_counter()
    when = parse_time(shipped_at)
    base = load_settings(config, overrides)
    with tempfile.TemporaryDirectory(prefix="depsim-backtest-") as tmp:
        before, after, counts = periods(model, when, data, base, Path(tmp))
        run_over: dict[str, Any] = {**(overrides or {})}
        run_over["run"] = {**run_over.get("run", {}), "data": before}
        run_over["models"] = {**run_over.get("models", {}),
                              "candidate": {**(run_over.get("models", {}).get("candidate") or {}), "model": model}}
        if n is not None:
            run_over["sample"] = {**run_over.get("sample", {}), "n": n}
        if seed is not None:
            run_over["run"]["seed"] = seed
        s = load_settings(config, run_over)
        prediction = deployment_simulation(s.public_dict())
        observed, turns = observed_rates(after, s)
    predicted = {c: m["rate"] for c, m in prediction["metrics"].items()}
    previous = {c: (m["rate"] - m["delta"]) if m["delta"] is not None else None for c, m in prediction["metrics"].items()}
    card = scorecard(predicted, observed, previous)
    result = {"model": model, "shipped_at": when.isoformat().replace("+00:00", "Z"), "seed": s.run.seed,
              "synthetic": data is None, **counts, "sampled_turns": prediction["sampled_turns"], "observed_turns": turns,
              "prediction_run_id": prediction["run_id"], "prediction_verdict": prediction["verdict"], **card}
    run_id, history = _log(result, s)
    return {**result, "run_id": run_id, "experiment": EXPERIMENT, "scorecard": history,
            "tracking_uri": s.run.tracking_uri, "elapsed_s": round(time.perf_counter() - t0, 2)}


__all__ = ["AGGREGATE", "BacktestError", "backtest", "json_safe", "multiplicative_error", "periods", "precheck", "scorecard"]
