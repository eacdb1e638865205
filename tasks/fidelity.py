"""Simulator fidelity: how close simulated tool results come to what production returned.

Every recorded call is answered again by the tool simulator, built from the same recording with
the replay point just before that call (its own result withheld, and nothing the production model
did after it in the world: tasks/toolsim.py), and the simulated result is compared with the
recorded one:

- ``exact``: the same text (surrounding whitespace aside);
- ``structural``: not the same text but the same shape: JSON with the same keys and value types,
  or text that is equal once case, whitespace and numbers are ignored, or both are errors;
- ``different``: anything else.

With `llm` in the chain, the calls that reach it are put to the simulator endpoint in batches
(one `asyncio.run` per batch, outside the no_execution guard); its failures count as error
results, as in a replay.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import polars as pl

from tasks.cache import ModelCache
from tasks.config import Endpoint
from tasks.models import ChatModel
from tasks.simulator_llm import LLMSimulator, SimulatorPrompt, failed, load_prompt, tool_schemas
from tasks.toolsim import LLMRequest, ToolResult, ToolSimulator

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


@dataclass
class _Pending:
    """A call waiting for the `llm` source: where its row is, and what the simulator needs."""

    row: dict[str, Any]
    recorded: str
    request: LLMRequest
    sim: ToolSimulator
    tool: dict[str, Any] | None
    trajectory: list[dict[str, Any]]


def _settle(row: dict[str, Any], recorded: str, result: ToolResult) -> None:
    row["source"] = result.source
    row["match"] = compare(recorded, result.content)


def fidelity(conversations: pl.DataFrame, chain: list[str], *, simulator: Endpoint | None = None,
             prompt: str = "simulator.yaml", seed: int = 0, cache: ModelCache | None = None,
             batch: int = 256) -> pl.DataFrame:
    """One row per recorded, answered call: its tool, the simulator's source and the match.

    Args:
        conversations: conversation_id, messages and (optionally) tools, as JSON text.
        chain: the simulator chain (replay.simulator_chain).
        simulator: the `llm` source's endpoint (models.simulator); needed only when the chain
            includes llm, else such calls are `simulator_unconfigured` errors.
        prompt: the simulator prompt file (replay.simulator_prompt).
        seed: the run seed (used when the endpoint sets none).
        cache: the model-call cache for simulator calls.
        batch: calls put to the simulator per `asyncio.run`.
    """
    loaded = load_prompt(prompt) if "llm" in chain and simulator is not None else None
    has_tools = "tools" in conversations.columns
    cols = ["conversation_id", "messages", *(["tools"] if has_tools else [])]
    rows: list[dict[str, Any]] = []
    pending: list[_Pending] = []
    for rec in conversations.select(cols).iter_rows(named=True):
        messages = json.loads(rec["messages"])
        tools = tool_schemas(json.loads(rec["tools"]) if has_tools and rec["tools"] else [])
        calls = {c.get("id"): c for m in messages if m.get("role") == "assistant" for c in m.get("tool_calls") or []}
        for k, msg in enumerate(messages):
            call = calls.get(msg.get("tool_call_id")) if msg.get("role") == "tool" else None
            if call is None:
                continue
            content = msg.get("content")
            recorded = content if isinstance(content, str) else json.dumps(content)
            fn = call.get("function") or {}
            name = str(fn.get("name", ""))
            sim = ToolSimulator(messages, chain, before_call=call.get("id"))
            row: dict[str, Any] = {"conversation_id": rec["conversation_id"], "call_id": call.get("id"),
                                   "tool": fn.get("name"), "source": None, "match": None}
            rows.append(row)
            result = sim.answer(name, str(fn.get("arguments") or ""))
            if isinstance(result, ToolResult):
                _settle(row, recorded, result)
                continue
            pending.append(_Pending(row, recorded, result, sim, tools.get(name), messages[:k]))
            if len(pending) >= batch:
                _answer_pending(pending, simulator, loaded, seed, cache)
                pending = []
    if pending:
        _answer_pending(pending, simulator, loaded, seed, cache)
    return pl.DataFrame(rows, schema=FIDELITY_SCHEMA)


def _answer_pending(pending: list[_Pending], endpoint: Endpoint | None, prompt: SimulatorPrompt | None, seed: int,
                    cache: ModelCache | None) -> None:
    """Answer a batch of `llm` requests (one event loop, one client) and settle their rows."""
    if endpoint is None or prompt is None:
        for p in pending:
            _settle(p.row, p.recorded, failed(p.request, "simulator_unconfigured",
                                              "the chain includes llm but no simulator endpoint was given"))
        return

    async def run() -> list[ToolResult]:
        llm = LLMSimulator(ChatModel(endpoint, seed, cache=cache), prompt)
        try:
            return list(await asyncio.gather(*(llm.answer(p.request, p.tool, p.trajectory, p.sim.state)
                                               for p in pending)))
        finally:
            await llm.aclose()

    for p, result in zip(pending, asyncio.run(run()), strict=True):
        _settle(p.row, p.recorded, result)


def summarise(table: pl.DataFrame) -> dict[str, Any]:
    """Per tool: calls, exact, structural, different, and the mix of simulator sources."""
    out: dict[str, Any] = {}
    for (tool,), grp in table.group_by("tool", maintain_order=True):
        counts = Counter(grp["match"].to_list())
        out[str(tool)] = {"calls": grp.height, "exact": counts["exact"], "structural": counts["structural"],
                          "different": counts["different"], "sources": dict(Counter(grp["source"].to_list()))}
    return dict(sorted(out.items()))
