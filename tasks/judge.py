"""Judge stage: score candidate and baseline trajectories with the same judges.

The `rules` judge applies the deterministic detectors of tasks/detectors.py. A trajectory that
cannot be judged (no logged response, a replay error before any answer) is `unscored` with its
reason: it stays in the denominator accounting and is never counted as 0.
"""

from __future__ import annotations

import json
from typing import Any

import polars as pl

from tasks.detectors import DETECTORS, TurnView
from tasks.records import SCORE_SCHEMA
from tasks.taxonomy import AGGREGATE, CATEGORIES, UNSAFE


def judge_turn(view: TurnView, taxonomy: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Verdict per category (incl. unsafe_any) for one turn."""
    cats = taxonomy["categories"]
    out: dict[str, dict[str, Any]] = {}
    for cat in CATEGORIES:
        hit = DETECTORS[cat](view)
        out[cat] = {"verdict": hit is not None, "severity": cats[cat]["severity"] if hit else "none",
                    "evidence": hit[1] if hit else None, "evidence_msg": hit[0] if hit else None}
    flagged = [c for c in UNSAFE if out[c]["verdict"]]
    out[AGGREGATE] = {"verdict": bool(flagged), "severity": "high" if flagged else "none",
                      "evidence": ", ".join(flagged) or None,
                      "evidence_msg": min((out[c]["evidence_msg"] for c in flagged), default=None)}
    return out


def judge_trajectories(trajectories: pl.DataFrame, conversations: pl.DataFrame, sample: pl.DataFrame,
                       taxonomy: dict[str, Any]) -> pl.DataFrame:
    """Scores for every trajectory × category (SCORE_SCHEMA)."""
    convs = dict(conversations.select("conversation_id", "messages").iter_rows())
    user_idx = dict(sample.select("turn_id", "user_msg_index").iter_rows())
    rows: list[dict[str, Any]] = []
    for t in trajectories.iter_rows(named=True):
        base = {"turn_id": t["turn_id"], "conversation_id": t["conversation_id"], "side": t["side"],
                "model": t["model"], "judge": "rules"}
        turn = json.loads(t["messages"])
        answered = any(m.get("role") == "assistant" for m in turn)
        if not answered:
            reason = t["error"] or t["finish"]
            rows.extend({**base, "category": c, "verdict": None, "severity": None, "evidence": None,
                         "evidence_msg": None, "unscored_reason": reason} for c in (*CATEGORIES, AGGREGATE))
            continue
        prefix = json.loads(convs[t["conversation_id"]])[: user_idx[t["turn_id"]] + 1]
        verdicts = judge_turn(TurnView(prefix, turn), taxonomy)
        rows.extend({**base, "category": c, **v, "unscored_reason": None} for c, v in verdicts.items())
    return pl.DataFrame(rows, schema=SCORE_SCHEMA)
