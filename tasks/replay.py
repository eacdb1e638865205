"""Replay: hold each sampled prefix fixed and let the candidate regenerate the turn.

The candidate runs through tool calls until it answers without one or reaches the step limit.
Every tool call is answered by the simulator (never executed). Every turn ends with a finish
reason: answered | step_limit | refused | error (with its reason). Turns in == turns out.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import openai
import polars as pl

from tasks.config import Endpoint, ReplayCfg
from tasks.models import ChatModel
from tasks.records import TRAJECTORY_SCHEMA
from tasks.toolsim import ToolSimulator


async def replay_one(model: ChatModel, messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                     user_idx: int, cfg: ReplayCfg) -> dict[str, Any]:
    """Regenerate the turn after messages[user_idx]; returns a trajectory record."""
    prefix = messages[: user_idx + 1]
    sim = ToolSimulator(messages, cfg.simulator_chain)
    new: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    rec = {"finish": "step_limit", "error": None, "steps": 0, "model_calls": 0,
           "prompt_tokens": 0, "completion_tokens": 0, "latency_s": 0.0}
    for _ in range(cfg.step_limit):
        try:
            out = await model.chat(prefix + new, tools, cfg.max_tokens)
        except openai.APIStatusError as exc:
            rec.update(finish="error", error=f"http_{exc.status_code}: {str(exc.message)[:200]}")
            break
        except openai.APITimeoutError:
            rec.update(finish="error", error="timeout")
            break
        except openai.APIConnectionError as exc:
            rec.update(finish="error", error=f"connection: {str(exc)[:200]}")
            break
        except (openai.APIResponseValidationError, json.JSONDecodeError, ValueError) as exc:
            rec.update(finish="error", error=f"malformed_response: {str(exc)[:200]}")
            break
        rec["steps"] += 1
        rec["model_calls"] += 1
        rec["prompt_tokens"] += out.prompt_tokens
        rec["completion_tokens"] += out.completion_tokens
        rec["latency_s"] += out.latency_s
        msg = out.message
        new.append(msg)
        if msg.get("refusal"):
            rec["finish"] = "refused"
            break
        calls = msg.get("tool_calls") or []
        if not calls:
            rec["finish"] = "answered" if out.finish_reason != "length" else "error"
            if out.finish_reason == "length":
                rec["error"] = "max_tokens"
            break
        for call in calls:
            fn = call["function"]
            res = sim.simulate(fn["name"], fn.get("arguments") or "")
            new.append({"role": "tool", "tool_call_id": call["id"], "name": fn["name"], "content": res.content})
            results.append({"call_id": call["id"], "name": fn["name"], "source": res.source,
                            "effects": res.effects, "error": res.is_error})
    rec["messages"] = json.dumps(new, ensure_ascii=False)
    rec["tool_results"] = json.dumps(results)
    return rec


async def replay_sample(sample: pl.DataFrame, conversations: pl.DataFrame, endpoint: Endpoint,
                        cfg: ReplayCfg, seed: int,
                        progress: Callable[[int], None] | None = None) -> tuple[pl.DataFrame, int]:
    """Replay every sampled turn through the candidate. Returns (trajectories, model calls)."""
    model = ChatModel(endpoint, seed)
    convs = {r["conversation_id"]: r for r in conversations.select("conversation_id", "messages", "tools").iter_rows(named=True)}

    async def one(row: dict[str, Any]) -> dict[str, Any]:
        conv = convs[row["conversation_id"]]
        messages = json.loads(conv["messages"])
        tools = json.loads(conv["tools"]) if conv["tools"] else []
        t0 = time.perf_counter()
        try:
            rec = await replay_one(model, messages, tools, row["user_msg_index"], cfg)
        except Exception as exc:  # an unexpected fault still yields a turn, with its reason
            rec = {"finish": "error", "error": f"internal: {type(exc).__name__}: {exc}"[:300], "steps": 0,
                   "model_calls": 0, "prompt_tokens": 0, "completion_tokens": 0,
                   "latency_s": time.perf_counter() - t0, "messages": "[]", "tool_results": "[]"}
        if progress:
            progress(1)
        return {"turn_id": row["turn_id"], "conversation_id": row["conversation_id"], "side": "candidate",
                "model": endpoint.model, **rec}

    try:
        rows = await asyncio.gather(*(one(r) for r in sample.iter_rows(named=True)))
    finally:
        await model.aclose()
    return pl.DataFrame(rows, schema=TRAJECTORY_SCHEMA), model.calls


def baseline_trajectories(sample: pl.DataFrame, conversations: pl.DataFrame) -> pl.DataFrame:
    """The production model's own logged turns, in the trajectory shape (no replay)."""
    convs = {r["conversation_id"]: r for r in conversations.select("conversation_id", "messages", "model").iter_rows(named=True)}
    rows = []
    for row in sample.iter_rows(named=True):
        conv = convs[row["conversation_id"]]
        messages = json.loads(conv["messages"])
        body = messages[row["user_msg_index"] + 1: row["end_msg_index"]]
        has = any(m.get("role") == "assistant" for m in body)
        rows.append({"turn_id": row["turn_id"], "conversation_id": row["conversation_id"], "side": "baseline",
                     "model": conv["model"], "messages": json.dumps(body, ensure_ascii=False),
                     "tool_results": "[]", "finish": "answered" if has else "error",
                     "error": None if has else "no logged response", "steps": sum(m.get("role") == "assistant" for m in body),
                     "model_calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "latency_s": 0.0})
    return pl.DataFrame(rows, schema=TRAJECTORY_SCHEMA)
