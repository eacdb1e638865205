"""Typed tables that cross stage boundaries (Polars schemas), versioned when saved.

Nested conversation content (messages, tools, labels, trajectories) travels as JSON text
columns: it is heterogeneous by nature and Parquet keeps it compact.
"""

from __future__ import annotations

import json
from typing import Any

import polars as pl
from polars._typing import PolarsDataType

SCHEMA_VERSION = 1

RAW_SCHEMA: dict[str, PolarsDataType] = {
    "source_file": pl.String,
    "source_line": pl.Int64,
    "record": pl.String,        # the row as JSON text (null when it could not be parsed)
    "parse_error": pl.String,   # why the line could not be read as a JSON object
    "excerpt": pl.String,       # the start of an unreadable line, for the quarantine
}

CONVERSATION_SCHEMA: dict[str, PolarsDataType] = {
    "conversation_id": pl.String,
    "model": pl.String,
    "created_at": pl.Datetime("us", "UTC"),
    "surface": pl.String,
    "task_type": pl.String,
    "language": pl.String,
    "tools": pl.String,
    "messages": pl.String,
    "labels": pl.String,
    "n_messages": pl.Int64,
    "tools_inferred": pl.Boolean,   # tools were absent and inferred from the calls
    "source_file": pl.String,
    "source_line": pl.Int64,
}

QUARANTINE_SCHEMA: dict[str, PolarsDataType] = {
    "source_file": pl.String,
    "source_line": pl.Int64,
    "conversation_id": pl.String,
    "rule": pl.String,
    "field": pl.String,
    "reason": pl.String,
    "record": pl.String,
}

TURN_SCHEMA: dict[str, PolarsDataType] = {
    "turn_id": pl.String,           # conversation_id#turn_index
    "conversation_id": pl.String,
    "turn_index": pl.Int64,         # 0-based index of the user message among user messages
    "user_msg_index": pl.Int64,     # index of that user message in messages
    "end_msg_index": pl.Int64,      # exclusive end of the logged turn
    "prefix_len": pl.Int64,
    "uses_tools": pl.Boolean,
    "model": pl.String,
    "surface": pl.String,
    "task_type": pl.String,
    "language": pl.String,
}

SAMPLE_EXTRA: dict[str, PolarsDataType] = {
    "stratum": pl.String,
    "weight": pl.Float64,           # 1 / inclusion probability
    "inclusion_prob": pl.Float64,
}

TRAJECTORY_SCHEMA: dict[str, PolarsDataType] = {
    "turn_id": pl.String,
    "conversation_id": pl.String,
    "side": pl.String,              # candidate | baseline
    "model": pl.String,
    "messages": pl.String,          # JSON: the turn's assistant/tool messages
    "tool_results": pl.String,      # JSON: [{call_id, name, source, effects, error[, reason]}]
    "finish": pl.String,            # answered | step_limit | budget | refused | error
    "error": pl.String,
    "steps": pl.Int64,
    "model_calls": pl.Int64,
    "retries": pl.Int64,            # retries spent by the turn's model calls (0 for baseline turns)
    "prompt_tokens": pl.Int64,
    "completion_tokens": pl.Int64,
    "latency_s": pl.Float64,
}

SCORE_SCHEMA: dict[str, PolarsDataType] = {
    "turn_id": pl.String,
    "conversation_id": pl.String,
    "side": pl.String,
    "model": pl.String,
    "category": pl.String,
    "verdict": pl.Boolean,          # null = unscored
    "severity": pl.String,
    "evidence": pl.String,
    "evidence_msg": pl.Int64,
    "judge": pl.String,             # the judges that decided, "+"-joined (combined verdict)
    "judge_version": pl.String,
    "confidence": pl.Float64,
    "unscored_reason": pl.String,
}

# One row per judge × trajectory × category: what each judge said before combining, so that
# disagreements (rules vs llm, split LLM samples) can be listed for human review.
JUDGE_VERDICT_SCHEMA: dict[str, PolarsDataType] = {
    "turn_id": pl.String,
    "side": pl.String,
    "category": pl.String,
    "judge": pl.String,
    "judge_version": pl.String,
    "verdict": pl.Boolean,
    "confidence": pl.Float64,
    "votes": pl.String,             # JSON list of sample verdicts (sampling judges), else null
    "evidence": pl.String,
    "evidence_msg": pl.Int64,
    "rationale": pl.String,
    "unscored_reason": pl.String,
}

ESTIMATE_SCHEMA: dict[str, PolarsDataType] = {
    "category": pl.String,
    "side": pl.String,
    "model": pl.String,
    "n": pl.Int64,
    "n_unscored": pl.Int64,
    "positives": pl.Int64,
    "rate": pl.Float64,
    "lower": pl.Float64,
    "upper": pl.Float64,
    "n_eff": pl.Float64,
    "method": pl.String,
    "unit": pl.String,
}


def empty(schema: dict[str, Any]) -> pl.DataFrame:
    return pl.DataFrame(schema=schema)


def conversations_frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    """Contract-shaped dicts → a frame with nested fields as JSON text (for Parquet output)."""
    return pl.DataFrame(
        {
            "conversation_id": [r["conversation_id"] for r in rows],
            "model": [r["model"] for r in rows],
            "created_at": [r["created_at"] for r in rows],
            "surface": [r.get("surface") for r in rows],
            "task_type": [r.get("task_type") for r in rows],
            "language": [r.get("language") for r in rows],
            "tools": [json.dumps(r.get("tools") or []) for r in rows],
            "messages": [json.dumps(r["messages"], ensure_ascii=False) for r in rows],
            "labels": [json.dumps(r.get("labels") or {}) for r in rows],
        },
        schema_overrides={k: pl.String for k in ("surface", "task_type", "language")},
    )
