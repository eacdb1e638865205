"""Simulator fidelity: how close simulated tool results come to what production returned.

Every recorded call is answered again by the tool simulator, built from the same recording with
that call's own result withheld, and the simulated result is compared with the recorded one:

- ``exact``: the same text (surrounding whitespace aside);
- ``structural``: not the same text but the same shape: JSON with the same keys and value types,
  or text that is equal once case, whitespace and numbers are ignored, or both are errors;
- ``different``: anything else.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

import polars as pl

from tasks.toolsim import ToolSimulator

_NUMBER = re.compile(r"\d+(\.\d+)?")
_ERROR = re.compile(r"^(error|\w+: .*(no such file|not found|command not found))", re.I)
FIDELITY_SCHEMA = {"conversation_id": pl.String, "call_id": pl.String, "tool": pl.String,
                   "source": pl.String, "match": pl.String}


def _shape(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [_shape(v) for v in value[:1]]
    return type(value).__name__


def compare(recorded: str, simulated: str) -> str:
    """exact | structural | different."""
    a, b = recorded.strip(), simulated.strip()
    if a == b:
        return "exact"
    try:
        ja, jb = json.loads(a), json.loads(b)
        if isinstance(ja, dict | list) and _shape(ja) == _shape(jb):
            return "structural"
    except (json.JSONDecodeError, ValueError):
        pass
    norm_a = _NUMBER.sub("0", " ".join(a.lower().split()))
    norm_b = _NUMBER.sub("0", " ".join(b.lower().split()))
    if norm_a == norm_b or (bool(_ERROR.match(a)) and bool(_ERROR.match(b))):
        return "structural"
    return "different"


def fidelity(conversations: pl.DataFrame, chain: list[str]) -> pl.DataFrame:
    """One row per recorded, answered call: its tool, the simulator's source and the match."""
    rows: list[dict[str, Any]] = []
    for conv_id, raw in conversations.select("conversation_id", "messages").iter_rows():
        messages = json.loads(raw)
        calls = {c.get("id"): c for m in messages if m.get("role") == "assistant" for c in m.get("tool_calls") or []}
        for k, msg in enumerate(messages):
            call = calls.get(msg.get("tool_call_id")) if msg.get("role") == "tool" else None
            if call is None:
                continue
            content = msg.get("content")
            recorded = content if isinstance(content, str) else json.dumps(content)
            withheld = messages[:k] + messages[k + 1:]
            fn = call.get("function") or {}
            result = ToolSimulator(withheld, chain).simulate(str(fn.get("name", "")), str(fn.get("arguments") or ""))
            rows.append({"conversation_id": conv_id, "call_id": call.get("id"), "tool": fn.get("name"),
                         "source": result.source, "match": compare(recorded, result.content)})
    return pl.DataFrame(rows, schema=FIDELITY_SCHEMA)


def summarise(table: pl.DataFrame) -> dict[str, Any]:
    """Per tool: calls, exact, structural, different, and the mix of simulator sources."""
    out: dict[str, Any] = {}
    for (tool,), grp in table.group_by("tool", maintain_order=True):
        counts = Counter(grp["match"].to_list())
        out[str(tool)] = {"calls": grp.height, "exact": counts["exact"], "structural": counts["structural"],
                          "different": counts["different"], "sources": dict(Counter(grp["source"].to_list()))}
    return dict(sorted(out.items()))
