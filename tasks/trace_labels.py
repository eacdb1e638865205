"""Labels reviewers add to depsim's turn traces in the MLflow UI, read back: as rows
(`human_labels`) and as a labelled set in the conversation contract (`labelled_set`) that
`depsim judge-eval` measures the judges on. The traces themselves: tasks/traces.py."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import polars as pl

from tasks.taxonomy import ALL_CATEGORIES
from tasks.traces import _run_traces

log = logging.getLogger("depsim")

LABEL_SCHEMA: dict[str, Any] = {
    "conversation_id": pl.String, "turn_index": pl.Int64, "turn_id": pl.String, "category": pl.String,
    "label": pl.Boolean, "reviewer": pl.String, "rationale": pl.String, "trace_id": pl.String,
    "assessment_id": pl.String, "labelled_at_ms": pl.Int64,
}
_TRUE = {"true", "yes", "y", "1", "flagged", "unsafe", "pass_fail:fail"}
_FALSE = {"false", "no", "n", "0", "not_flagged", "safe", "ok", "pass_fail:pass"}


def _as_label(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return bool(value) if value in (0, 1) else None
    if isinstance(value, str):
        v = value.strip().lower()
        return True if v in _TRUE else False if v in _FALSE else None
    return None


def human_labels(tracking_uri: str, run_id: str) -> pl.DataFrame:
    """The labels reviewers added in the MLflow UI to the run's turn traces.

    An assessment counts when its source type is HUMAN, it is valid (not overridden), its name
    is a taxonomy category and its value reads as a flag (bool, 0/1, yes/no, true/false,
    flagged/safe); a reviewer's latest label per trace and category wins.

    Returns:
        One row per (turn, category, reviewer): LABEL_SCHEMA.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_run(run_id).info.experiment_id
    latest: dict[tuple[str, str, str], dict[str, Any]] = {}
    for tr in _run_traces(client, exp, run_id):
        tags = tr.info.tags
        if "depsim.turn_id" not in tags:
            continue
        for a in tr.info.assessments or []:
            if a.source.source_type != "HUMAN" or not a.valid or a.name not in ALL_CATEGORIES:
                continue
            label = _as_label(a.feedback.value if a.feedback is not None else
                              a.expectation.value if a.expectation is not None else None)
            if label is None:
                continue
            row = {"conversation_id": tags.get("depsim.conversation_id"),
                   "turn_index": int(tags["depsim.turn_index"]) if tags.get("depsim.turn_index", "").isdigit() else None,
                   "turn_id": tags["depsim.turn_id"], "category": a.name, "label": label,
                   "reviewer": a.source.source_id, "rationale": a.rationale, "trace_id": tr.info.trace_id,
                   "assessment_id": a.assessment_id, "labelled_at_ms": a.last_update_time_ms or a.create_time_ms}
            key = (tr.info.trace_id, a.name, str(a.source.source_id))
            if key not in latest or (row["labelled_at_ms"] or 0) >= (latest[key]["labelled_at_ms"] or 0):
                latest[key] = row
    return pl.DataFrame(list(latest.values()), schema=LABEL_SCHEMA).sort("turn_id", "category", "reviewer")


def labelled_set(tracking_uri: str, run_id: str, store_dir: str,
                 conversations: pl.DataFrame | None = None) -> list[dict[str, Any]]:
    """The human-labelled candidate turns as conversation-contract records for `depsim judge-eval`.

    Each record is the turn's prefix followed by the candidate's replayed turn, with `labels`
    the reviewers' majority per category (a tie leaves the category out). judge-eval judges every
    answered turn of a record and ORs them into one flag per record, so a record is exact only
    when its prefix holds no earlier answered turn: turns after an answered one would mix the
    production model's earlier turns into the label's unit, and are left out (counted in the log).
    Every record then has one judged turn, and judge-eval reports unit "turn".

    Args:
        tracking_uri: the MLflow store of the run.
        run_id: the run whose traces were labelled.
        store_dir: the run's folder in the run store (trajectories, sample, config.json).
        conversations: the run's valid conversations; default: loaded again from the run's data
            (config.json run.data) through the same contract check.

    Returns:
        JSON-ready records (created_at as RFC 3339 text), one per labelled turn kept.
    """
    store = Path(store_dir)
    labels = human_labels(tracking_uri, run_id)
    if labels.is_empty():
        return []
    votes = (labels.group_by("turn_id", "category")
             .agg(yes=pl.col("label").sum(), n=pl.len())
             .filter(pl.col("yes") * 2 != pl.col("n"))
             .with_columns(label=pl.col("yes") * 2 > pl.col("n")))
    traj = pl.read_parquet(store / "trajectories.parquet").filter(pl.col("side") == "candidate")
    sample = pl.read_parquet(store / "sample.parquet")
    if conversations is None:
        conversations = _reload_conversations(store)
    convs = {r["conversation_id"]: r for r in conversations.select(
        "conversation_id", "messages", "tools").iter_rows(named=True)}
    srow = {r["turn_id"]: r for r in sample.iter_rows(named=True)}
    by_turn: dict[str, dict[str, bool]] = defaultdict(dict)
    for r in votes.iter_rows(named=True):
        by_turn[r["turn_id"]][r["category"]] = bool(r["label"])
    out, later = [], 0
    for t in traj.filter(pl.col("turn_id").is_in(list(by_turn))).iter_rows(named=True):
        s, conv = srow[t["turn_id"]], convs.get(t["conversation_id"])
        if conv is None:
            continue
        msgs = json.loads(conv["messages"]) if isinstance(conv["messages"], str) else conv["messages"]
        prefix = msgs[: s["user_msg_index"] + 1]
        if any(m.get("role") == "assistant" for m in prefix):
            later += 1
            continue
        created = s.get("created_at")
        out.append({"conversation_id": t["turn_id"], "model": t["model"],
                    "created_at": created.isoformat().replace("+00:00", "Z") if created is not None else None,
                    "surface": s.get("surface"), "task_type": s.get("task_type"), "language": s.get("language"),
                    "tools": json.loads(conv["tools"]) if isinstance(conv["tools"], str) else (conv["tools"] or []),
                    "messages": prefix + json.loads(t["messages"]), "labels": by_turn[t["turn_id"]]})
    if later:
        log.warning("labelled_set: %d labelled turn(s) follow an answered turn in their conversation and were "
                    "left out (judge-eval would fold the earlier production turns into their label)", later)
    return out


def _reload_conversations(store: Path) -> pl.DataFrame:
    """The run's valid conversations again: its data through its contract check."""
    from tasks.config import settings_from_dict
    from tasks.load import load_raw
    from tasks.stages import contract_check

    s = settings_from_dict(json.loads((store / "config.json").read_text(encoding="utf-8")))
    return contract_check(load_raw(s.run.data), s).valid
