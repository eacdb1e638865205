"""Report sections built from the run's tables: the worst trajectories with their evidence,
latency and tokens, and the trend over earlier runs read from MLflow."""

from __future__ import annotations

import html
import json
import statistics
from typing import Any

import polars as pl

from tasks.taxonomy import AGGREGATE

_SEVERITY = {"critical": 4, "high": 3, "medium": 2, "low": 1}
MAX_CHARS = 1500


def worst_trajectories(scores: pl.DataFrame, candidate: pl.DataFrame, sample: pl.DataFrame,
                       k: int = 5) -> list[dict[str, Any]]:
    """The candidate's k flagged turns with the most severe verdicts (then the most categories),
    each with its replayed messages and where the evidence points (an index into the turn)."""
    flagged = scores.filter((pl.col("side") == "candidate") & pl.col("verdict").fill_null(False)
                            & (pl.col("category") != AGGREGATE))
    if flagged.height == 0:
        return []
    by_turn: dict[str, list[dict[str, Any]]] = {}
    for r in flagged.iter_rows(named=True):
        by_turn.setdefault(r["turn_id"], []).append(r)
    order = sorted(by_turn, key=lambda t: (-max(_SEVERITY.get(v["severity"] or "", 0) for v in by_turn[t]),
                                           -len(by_turn[t]), t))[:k]
    offset = dict(sample.select("turn_id", "user_msg_index").iter_rows())
    msgs = dict(candidate.filter(pl.col("turn_id").is_in(order)).select("turn_id", "messages").iter_rows())
    out = []
    for t in order:
        start = offset.get(t, -1) + 1
        out.append({"turn_id": t, "messages": json.loads(msgs.get(t) or "[]"),
                    "verdicts": [{"category": v["category"], "severity": v["severity"], "evidence": v["evidence"] or "",
                                  "at": None if v["evidence_msg"] is None else int(v["evidence_msg"]) - start}
                                 for v in by_turn[t]]})
    return out


def _message_html(i: int, m: dict[str, Any], marked: set[int]) -> str:
    text = m.get("content") if isinstance(m.get("content"), str) else json.dumps(m.get("content") or "")
    calls = "".join(f"<div class='call'>→ {html.escape(str(c.get('function', {}).get('name')))}("
                    f"{html.escape(str(c.get('function', {}).get('arguments'))[:MAX_CHARS])})</div>"
                    for c in m.get("tool_calls") or [])
    body = html.escape((text or "")[:MAX_CHARS]) + ("…" if text and len(text) > MAX_CHARS else "")
    cls = " class='ev'" if i in marked else ""
    return f"<tr{cls}><td>{i}</td><td>{html.escape(str(m.get('role')))}</td><td><pre>{body}</pre>{calls}</td></tr>"


def worst_section(worst: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    title = "Worst trajectories (candidate)"
    if not worst:
        return [f"<h2>{title}</h2>", "<p>No candidate turn was flagged.</p>"], [f"## {title}", "", "No candidate turn was flagged.", ""]
    h = [f"<h2>{title}</h2>", "<p class='muted'>The flagged replayed turns with the most severe verdicts. Highlighted rows are "
         "where a judge's evidence points; message numbers count from the first message of the replayed turn. Text from "
         "the logs and the model is escaped.</p>"]
    md = [f"## {title}", ""]
    for n, w in enumerate(worst):
        marked = {v["at"] for v in w["verdicts"] if v["at"] is not None}
        cats = ", ".join(f"{v['category']} ({v['severity']})" for v in w["verdicts"])
        ev = "".join(f"<li><b>{html.escape(v['category'])}</b>: {html.escape(v['evidence'][:400])}</li>" for v in w["verdicts"])
        rows = "".join(_message_html(i, m, marked) for i, m in enumerate(w["messages"]))
        h.append(f"<details{' open' if n == 0 else ''}><summary><code>{html.escape(w['turn_id'])}</code>: {html.escape(cats)}</summary>"
                 f"<ul>{ev}</ul><div class='scroll'><table class='traj'><tr><th>#</th><th>role</th><th>content</th></tr>{rows}</table></div></details>")
        md.append(f"- `{w['turn_id']}`: {cats}")
    return h, [*md, ""]


def latency_line(candidate: pl.DataFrame) -> str:
    """Per-turn latency of the candidate's replay (seconds, p50 / p95 / max)."""
    lat = sorted(x for x in candidate["latency_s"].to_list() if x is not None) if "latency_s" in candidate.columns else []
    if not lat:
        return "latency: –"
    p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))]
    return f"turn latency p50 {statistics.median(lat):.2f} s · p95 {p95:.2f} s · max {lat[-1]:.2f} s"


def cost_line(prompt_tokens: int, completion_tokens: int, price_prompt: float | None, price_completion: float | None) -> str:
    """The candidate's token cost, when the endpoint's prices are configured."""
    if price_prompt is None and price_completion is None:
        return "no price configured (models.candidate.price_prompt_per_1k, price_completion_per_1k)"
    cost = prompt_tokens / 1000 * (price_prompt or 0.0) + completion_tokens / 1000 * (price_completion or 0.0)
    return f"{cost:.4f} (at {price_prompt or 0} / {price_completion or 0} per 1k prompt / completion tokens)"


def fidelity_of(tracking_uri: str, data: str) -> dict[str, Any] | None:
    """The latest `depsim fidelity` run on the same logs (experiment depsim-fidelity), if any."""
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
        exp = client.get_experiment_by_name("depsim-fidelity")
        if exp is None:
            return None
        runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=50)
    except Exception:  # context for the report, never a reason to fail a run
        return None
    for r in runs:
        if r.data.params.get("data") == data:
            m = r.data.metrics
            return {"run_id": r.info.run_id, "chain": r.data.params.get("simulator_chain", "?"), "calls": m.get("fidelity.calls"),
                    **{k: m.get(f"fidelity.{k}_share") for k in ("exact", "structural", "different")}}
    return None


def trend_of(tracking_uri: str, experiment: str, limit: int = 10) -> list[dict[str, Any]]:
    """Earlier runs of the experiment, newest first (empty when MLflow can't be read)."""
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return []
        runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=limit)
    except Exception:  # the trend is context, never a reason to fail a run
        return []
    return [{"start": r.info.start_time, "run_id": r.info.run_id, "candidate": r.data.tags.get("depsim.candidate", "?"),
             "verdict": r.data.tags.get("depsim.verdict", "?"), "rate": r.data.metrics.get(f"{AGGREGATE}.rate"),
             "lower": r.data.metrics.get(f"{AGGREGATE}.lower"), "upper": r.data.metrics.get(f"{AGGREGATE}.upper")}
            for r in runs]


def trend_section(trend: list[dict[str, Any]], pct: Any) -> tuple[list[str], list[str]]:
    from datetime import UTC, datetime

    title = "Trend: earlier runs in this MLflow experiment"
    if not trend:
        return [f"<h2>{title}</h2>", "<p>No earlier run.</p>"], []
    rows = "".join(f"<tr><td>{datetime.fromtimestamp(t['start'] / 1000, UTC):%Y-%m-%d %H:%M}</td><td><code>{html.escape(t['candidate'])}</code></td>"
                   f"<td class='{html.escape(t['verdict'])}'>{html.escape(t['verdict'])}</td><td>{pct(t['rate'])}</td>"
                   f"<td>{pct(t['lower'])} – {pct(t['upper'])}</td><td><code>{html.escape(t['run_id'][:12])}</code></td></tr>" for t in trend)
    h = [f"<h2>{title}</h2>", "<table><tr><th>started (UTC)</th><th>candidate</th><th>verdict</th><th>unsafe_any</th>"
         f"<th>95% interval</th><th>run</th></tr>{rows}</table>"]
    md = [f"## {title}", "", "| candidate | verdict | unsafe_any |", "|---|---|---:|",
          *(f"| {t['candidate']} | {t['verdict']} | {pct(t['rate'])} |" for t in trend), ""]
    return h, md
