"""Judge the logged turns of labelled conversations and compare with their labels (judge-eval).

Labels in the contract are per conversation (`labels`: category → bool, incidents observed in
production), verdicts per turn. A conversation counts as flagged for a category when any of
its turns is flagged; as not flagged when every turn is scored and none is flagged; and as
unscored otherwise. Conversations without a label for a category are left out of that
category. unsafe_any is compared as the panel computes it (any of the nine unsafe categories).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from tasks.judges import JudgePanel
from tasks.judges.base import TrajectoryView, Verdict
from tasks.sample import turns_of
from tasks.taxonomy import ALL_CATEGORIES


@dataclass
class ConversationFlags:
    """Per conversation: labels, and per judge (and 'combined') a flag per category."""

    conversation_id: str
    labels: dict[str, bool]
    turns: int
    flags: dict[str, dict[str, bool | None]] = field(default_factory=dict)
    evidence: dict[str, dict[str, str]] = field(default_factory=dict)


def _fold(current: bool | str | None, v: Verdict) -> bool | str | None:
    """Conversation flag so far ("start" before any turn) folded with one turn's verdict."""
    if current is True or v.verdict is True:
        return True
    if v.verdict is None or current is None:
        return None
    return False


def views_of(row: dict[str, Any]) -> list[TrajectoryView]:
    """One view per answered turn of a conversation row (messages and tools as JSON text)."""
    messages = json.loads(row["messages"]) if isinstance(row["messages"], str) else row["messages"]
    tools = json.loads(row["tools"]) if isinstance(row.get("tools"), str) else (row.get("tools") or [])
    out = []
    for k, (u, end, _uses, answered) in enumerate(turns_of(messages)):
        if answered:
            out.append(TrajectoryView(messages[: u + 1], messages[u + 1: end], tools,
                                      f"{row['conversation_id']}#{k}", "logged", row.get("model") or ""))
    return out


async def judge_conversations(conversations: pl.DataFrame, panel: JudgePanel, concurrency: int = 32,
                              tick: Callable[[int], None] | None = None) -> list[ConversationFlags]:
    """Judge every answered turn of every conversation; fold turns into conversation flags."""
    rows = conversations.select("conversation_id", "model", "messages", "tools", "labels").to_dicts()
    views: list[TrajectoryView] = []
    owner: list[int] = []
    for n, row in enumerate(rows):
        vs = views_of(row)
        views.extend(vs)
        owner.extend([n] * len(vs))
    results = await panel.judge_all(views, concurrency, tick)
    out = []
    for row in rows:
        labels = json.loads(row["labels"]) if isinstance(row["labels"], str) else (row["labels"] or {})
        out.append(ConversationFlags(row["conversation_id"], {k: bool(v) for k, v in labels.items()
                                                              if isinstance(v, bool)}, 0))
    state: dict[tuple[int, str, str], bool | str | None] = {}
    for n, (combined, per_judge) in zip(owner, results, strict=True):
        out[n].turns += 1
        sources = {"combined": combined, **per_judge}
        for judge, verdicts in sources.items():
            for cat, v in verdicts.items():
                key = (n, judge, cat)
                state[key] = _fold(state.get(key, "start"), v)
                if v.verdict and cat not in out[n].evidence.setdefault(judge, {}):
                    out[n].evidence[judge][cat] = v.evidence_text() or ""
    for (n, judge, cat), value in state.items():
        out[n].flags.setdefault(judge, {})[cat] = None if value == "start" else value  # type: ignore[assignment]
    return out


def pairs(flags: list[ConversationFlags], judge: str, category: str) -> list[tuple[bool, bool | None]]:
    """(label, flag) for every conversation labelled for the category."""
    return [(f.labels[category], f.flags.get(judge, {}).get(category)) for f in flags
            if category in f.labels and f.turns]


def run(conversations: pl.DataFrame, panel: JudgePanel, concurrency: int = 32,
        tick: Callable[[int], None] | None = None) -> list[ConversationFlags]:
    """judge_conversations from synchronous code (closes the panel's clients afterwards)."""
    async def go() -> list[ConversationFlags]:
        try:
            return await judge_conversations(conversations, panel, concurrency, tick)
        finally:
            await panel.aclose()

    return asyncio.run(go())


def judge_views(views: list[TrajectoryView], panel: JudgePanel, concurrency: int = 32
                ) -> list[tuple[dict[str, Verdict], dict[str, dict[str, Verdict]]]]:
    """The panel's (combined, per judge) verdicts per view, from synchronous code (closes the
    panel's clients afterwards)."""
    async def go() -> list[tuple[dict[str, Verdict], dict[str, dict[str, Verdict]]]]:
        try:
            return await panel.judge_all(views, concurrency)
        finally:
            await panel.aclose()

    return asyncio.run(go())


__all__ = ["ALL_CATEGORIES", "ConversationFlags", "judge_conversations", "judge_views", "pairs", "run", "views_of"]
