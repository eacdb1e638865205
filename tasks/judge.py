"""Judge stage: score candidate and baseline trajectories with the same judges.

The judges conf/judges.yaml names for each category (tasks/judges/) read a `TrajectoryView` of
each turn: the fixed prefix, the turn (the candidate's replay or the production model's logged
turn) and the declared tools. A trajectory that cannot be judged (no answer, a replay error
before any answer) is `unscored` with its reason: it stays in the denominator accounting and is
never counted as 0.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import polars as pl

from tasks.judges import JudgePanel, TrajectoryView, Verdict
from tasks.records import JUDGE_VERDICT_SCHEMA, SCORE_SCHEMA
from tasks.taxonomy import AGGREGATE, CATEGORIES


def _score_row(base: dict[str, Any], v: Verdict) -> dict[str, Any]:
    return {**base, "category": v.category, "verdict": v.verdict,
            "severity": v.severity if v.verdict else ("none" if v.verdict is False else None),
            "evidence": v.evidence_text(), "evidence_msg": v.evidence_msg, "judge": v.judge or None,
            "judge_version": v.judge_version or None, "confidence": v.confidence,
            "unscored_reason": v.unscored_reason}


def _judge_row(turn_id: str, side: str, v: Verdict) -> dict[str, Any]:
    return {"turn_id": turn_id, "side": side, "category": v.category, "judge": v.judge,
            "judge_version": v.judge_version, "verdict": v.verdict, "confidence": v.confidence,
            "votes": json.dumps(v.votes) if v.votes is not None else None, "evidence": v.evidence_text(),
            "evidence_msg": v.evidence_msg, "rationale": v.rationale, "unscored_reason": v.unscored_reason}


def views(trajectories: pl.DataFrame, conversations: pl.DataFrame,
          sample: pl.DataFrame) -> tuple[list[TrajectoryView], list[dict[str, Any]]]:
    """(a view per answered trajectory, unscored score rows for the others)."""
    convs = {r["conversation_id"]: r for r in conversations.select("conversation_id", "messages", "tools").iter_rows(named=True)}
    user_idx = dict(sample.select("turn_id", "user_msg_index").iter_rows())
    out: list[TrajectoryView] = []
    unscored: list[dict[str, Any]] = []
    for t in trajectories.iter_rows(named=True):
        turn = json.loads(t["messages"])
        if not any(m.get("role") == "assistant" for m in turn):
            base = {"turn_id": t["turn_id"], "conversation_id": t["conversation_id"], "side": t["side"],
                    "model": t["model"]}
            reason = f"no answer: {t['error'] or t['finish']}"
            unscored.extend(_score_row(base, Verdict.unscored(c, reason)) for c in (*CATEGORIES, AGGREGATE))
            continue
        conv = convs[t["conversation_id"]]
        msgs = json.loads(conv["messages"]) if isinstance(conv["messages"], str) else conv["messages"]
        tools = json.loads(conv["tools"]) if isinstance(conv["tools"], str) else (conv["tools"] or [])
        out.append(TrajectoryView(msgs[: user_idx[t["turn_id"]] + 1], turn, tools, t["turn_id"], t["side"],
                                  t["model"] or ""))
    return out, unscored


def judge_trajectories(trajectories: pl.DataFrame, conversations: pl.DataFrame, sample: pl.DataFrame,
                       taxonomy: dict[str, Any], kinds: list[str] | None = None, settings: Any = None,
                       tick: Callable[[int], None] | None = None) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, Any]]:
    """Scores for every trajectory × category (SCORE_SCHEMA), every judge's own verdicts
    (JUDGE_VERDICT_SCHEMA) and the panel's provenance and counters.

    Raises:
        ConfigError: judges.yaml names an unknown judge or leaves a category without one.
    """
    panel = JudgePanel(taxonomy, kinds or ["rules"], settings)
    vs, rows = views(trajectories, conversations, sample)
    conv_of = dict(trajectories.select("turn_id", "conversation_id").iter_rows())

    async def go() -> list[tuple[dict[str, Verdict], dict[str, dict[str, Verdict]]]]:
        try:
            return await panel.judge_all(vs, tick=tick)
        finally:
            await panel.aclose()

    results = asyncio.run(go()) if vs else []
    per_judge_rows: list[dict[str, Any]] = []
    for view, (combined, per_judge) in zip(vs, results, strict=True):
        base = {"turn_id": view.turn_id, "conversation_id": conv_of[view.turn_id], "side": view.side,
                "model": view.model}
        rows.extend(_score_row(base, combined[c]) for c in (*CATEGORIES, AGGREGATE))
        if len(per_judge) > 1 or any(v.votes for vs_ in per_judge.values() for v in vs_.values()):
            per_judge_rows.extend(_judge_row(view.turn_id, view.side, v)
                                  for j in per_judge.values() for v in j.values())
    info = {"provenance": panel.provenance(), "stats": panel.stats()}
    return (pl.DataFrame(rows, schema=SCORE_SCHEMA),
            pl.DataFrame(per_judge_rows, schema=JUDGE_VERDICT_SCHEMA), info)


def disagreements(judge_rows: pl.DataFrame, limit: int = 50) -> pl.DataFrame:
    """Trajectory × category where the judges (or one judge's samples) did not agree."""
    if judge_rows.is_empty():
        return judge_rows
    split = judge_rows.with_columns(
        split=pl.col("votes").map_elements(lambda v: len({x for x in json.loads(v) if x is not None}) > 1,
                                           return_dtype=pl.Boolean).fill_null(False))
    by = split.group_by("turn_id", "side", "category").agg(
        n=pl.col("verdict").drop_nulls().n_unique(), split=pl.col("split").any(),
        judges=pl.concat_str(pl.col("judge"), pl.lit("="), pl.col("verdict").cast(pl.String).fill_null("unscored")).str.join(", "),
        evidence=pl.col("evidence").drop_nulls().first(), rationale=pl.col("rationale").drop_nulls().first())
    return by.filter((pl.col("n") > 1) | pl.col("split")).drop("n").sort("category", "side", "turn_id").head(limit)
