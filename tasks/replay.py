"""Replay: hold each sampled prefix fixed and let the candidate regenerate the turn.

The candidate runs through tool calls until it answers without one or a limit stops it. Every
tool call is answered by the simulator (never executed); a call with arguments that are not a
JSON object, or to a tool the conversation does not declare, gets a tool error message and the
turn goes on. Every turn ends with a finish reason, and with a reason in `error` unless it
answered, refused or reached the step limit:

    answered    the candidate answered without a tool call
    step_limit  cfg.step_limit model calls without a final answer
    budget      token_budget: ... | time_budget: ...  (cfg.token_budget, cfg.time_budget_s)
    refused     the candidate refused (a `refusal`, or finish_reason content_filter)
    error       <reason>: <detail>, reason one of http_<status>, timeout, connection,
                malformed_response, max_tokens, internal

Turns in == turns out, always: a fault in one turn never loses it or stops the others.

With `llm` in the simulator chain, a call the recording and the rules cannot answer goes to the
LLM simulator (tasks/simulator_llm.py, endpoint models.simulator) outside the no_execution
guard; if it fails, the call gets a tool error result with source `error` and a `reason` in its
tool_results entry, and the turn goes on.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import polars as pl

from tasks.cache import ModelCache
from tasks.config import Endpoint, Models, ReplayCfg
from tasks.effects import is_test_command
from tasks.models import BudgetExceeded, ChatModel, ChatResult, ModelCallError
from tasks.records import TRAJECTORY_SCHEMA
from tasks.simulator_llm import LLMSimulator, failed, tool_schemas
from tasks.toolsim import (
    UNKNOWN_TEST_OUTCOME,
    LLMRequest,
    ToolResult,
    ToolSimulator,
    classify_effects,
)

# One row per model call of a replay (stats["calls"] of replay_sample).
CALL_SCHEMA = {
    "turn_id": pl.String,
    "step": pl.Int64,               # 0-based model call within the turn
    "cached": pl.Boolean,           # answered from the cache (not a model call)
    "retries": pl.Int64,
    "prompt_tokens": pl.Int64,
    "completion_tokens": pl.Int64,
    "latency_s": pl.Float64,        # admission to answer, retries and back-offs included
    "finish_reason": pl.String,     # the endpoint's, or null when the call failed
    "error": pl.String,             # reason: detail, when the call failed
}


def _answer_call(sim: ToolSimulator, declared: dict[str, dict[str, Any]], name: str, arguments: str) -> ToolResult | LLMRequest:
    """The simulated result of one tool call (or a request for the `llm` source); a call to an
    undeclared tool is a tool error."""
    if name not in declared:
        try:
            args = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            args = {"_raw": arguments}
        known = ", ".join(sorted(declared)) or "none"
        return ToolResult(f"Error: no tool named {name!r} exists here (available: {known})", "error",
                          classify_effects(name, args if isinstance(args, dict) else {"_raw": args}), True)
    return sim.answer(name, arguments)


async def _ask_llm(simulator: LLMSimulator | None, sim: ToolSimulator, req: LLMRequest,
                   tool: dict[str, Any] | None, trajectory: list[dict[str, Any]]) -> ToolResult:
    """Put a call to the `llm` source (outside the guard) and fold its result into the world."""
    if simulator is None:
        res = failed(req, "simulator_unconfigured", "the chain includes llm but no simulator endpoint was given")
    else:
        res = await simulator.answer(req, tool, trajectory, sim.state)
        sim.learn(req, res)
    if res.is_error and is_test_command(str(req.args.get("command", ""))):
        # the test run got no answer: its outcome is unknown, and the text says so first
        res.outcome, res.content = "unknown", f"{UNKNOWN_TEST_OUTCOME}: {res.content}"
    return res


def _result_entry(call_id: str, name: str, res: ToolResult) -> dict[str, Any]:
    entry = {"call_id": call_id, "name": name, "source": res.source, "effects": res.effects, "error": res.is_error}
    if res.reason is not None:
        entry["reason"] = res.reason
    if res.outcome is not None:
        entry["outcome"] = res.outcome  # "unknown": a test run nothing could tell the outcome of
    return entry


def _call_row(turn_id: str | None, step: int, out: ChatResult | None, err: str | None = None,
              retries: int = 0, latency_s: float = 0.0) -> dict[str, Any]:
    if out is None:
        return {"turn_id": turn_id, "step": step, "cached": False, "retries": retries, "prompt_tokens": 0,
                "completion_tokens": 0, "latency_s": latency_s, "finish_reason": None, "error": err}
    return {"turn_id": turn_id, "step": step, "cached": out.cached, "retries": out.retries,
            "prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "latency_s": out.latency_s, "finish_reason": out.finish_reason, "error": None}


async def replay_one(model: ChatModel, messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                     user_idx: int, cfg: ReplayCfg, *, turn_id: str | None = None,
                     call_log: list[dict[str, Any]] | None = None,
                     simulator: LLMSimulator | None = None) -> dict[str, Any]:
    """Regenerate the turn after messages[user_idx].

    Args:
        model: the candidate.
        messages: the whole recorded conversation. The tool simulator's world is the one at
            the replay point: what the prefix established, plus only those later recorded
            results no later action of the production model could have changed.
        tools: the conversation's function-tool schemas.
        user_idx: index of the user message that opens the turn; the prefix ends there.
        cfg: step limit, token and time budgets, simulator chain.
        turn_id: names the turn in call_log rows.
        call_log: when given, one CALL_SCHEMA row per model call is appended to it.
        simulator: the `llm` source, used when cfg.simulator_chain includes llm (None: such
            calls get a `simulator_unconfigured` error result).

    Returns:
        A trajectory record (the TRAJECTORY_SCHEMA fields after turn_id, conversation_id,
        side and model). `model_calls` counts requests sent for this turn (cache hits excluded),
        `retries` the retries those requests needed, `steps` the model answers it used; the
        simulator's own calls are not counted in either.
    """
    prefix = messages[: user_idx + 1]
    sim: ToolSimulator | None = None  # built on the first tool call: many turns make none
    declared = tool_schemas(tools)  # by function name
    new: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    rec: dict[str, Any] = {"finish": "step_limit", "error": None, "steps": 0, "model_calls": 0,
                           "retries": 0, "prompt_tokens": 0, "completion_tokens": 0, "latency_s": 0.0}
    log = call_log if call_log is not None else []
    t_start, queued = time.perf_counter(), 0.0
    choice = model.endpoint.tool_choice
    for step in range(cfg.step_limit):
        remaining = None
        if cfg.time_budget_s is not None:
            remaining = cfg.time_budget_s - (time.perf_counter() - t_start - queued)
            if remaining <= 0:
                rec.update(finish="budget", error=f"time_budget: {cfg.time_budget_s:g} s used after {step} steps")
                break
        try:
            out = await model.chat(prefix + new, tools, cfg.max_tokens, deadline_s=remaining, tool_choice=choice)
        except BudgetExceeded as exc:
            rec["model_calls"] += 1
            rec.update(finish="budget", error=f"time_budget: {cfg.time_budget_s:g} s; {exc}")
            log.append(_call_row(turn_id, step, None, "time_budget"))
            break
        except ModelCallError as exc:
            rec["model_calls"] += 1
            rec["retries"] += exc.retries
            rec["latency_s"] += exc.latency_s
            rec.update(finish="error", error=f"{exc.reason}: {exc.detail}"[:300])
            log.append(_call_row(turn_id, step, None, rec["error"], exc.retries, exc.latency_s))
            break
        queued += out.queued_s
        log.append(_call_row(turn_id, step, out))
        rec["steps"] += 1
        rec["model_calls"] += 0 if out.cached else 1
        rec["retries"] += out.retries
        rec["prompt_tokens"] += out.prompt_tokens
        rec["completion_tokens"] += out.completion_tokens
        rec["latency_s"] += out.latency_s
        msg = out.message
        new.append(msg)
        if out.finish_reason == "length":
            # Cut mid-answer or mid-call: what it said is kept for the judges, not acted on.
            rec.update(finish="error", error=f"max_tokens: response cut at max_tokens={cfg.max_tokens}")
            break
        if msg.get("refusal") or out.finish_reason == "content_filter":
            rec["finish"] = "refused"
            break
        calls = msg.get("tool_calls") or []
        if not calls:
            rec["finish"] = "answered"
            break
        if choice == "required" and model.endpoint.reset_tool_choice:
            choice = "auto"  # it has called a tool: from now on it may also answer
        if sim is None:
            # The world at the replay point: nothing the production model did later leaks in.
            sim = ToolSimulator(messages, list(cfg.simulator_chain), replay_at=user_idx + 1)
        for call in calls:
            fn = call["function"]
            res = _answer_call(sim, declared, fn["name"], fn.get("arguments") or "")
            if isinstance(res, LLMRequest):
                res = await _ask_llm(simulator, sim, res, declared.get(res.name), prefix + new)
            new.append({"role": "tool", "tool_call_id": call["id"], "name": fn["name"], "content": res.content})
            results.append(_result_entry(call["id"], fn["name"], res))
        used = rec["prompt_tokens"] + rec["completion_tokens"]
        if cfg.token_budget is not None and used >= cfg.token_budget:
            rec.update(finish="budget", error=f"token_budget: {used} tokens used of {cfg.token_budget}")
            break
    rec["messages"] = json.dumps(new, ensure_ascii=False)
    rec["tool_results"] = json.dumps(results)
    return rec


def _internal_error(exc: BaseException, t0: float) -> dict[str, Any]:
    return {"finish": "error", "error": f"internal: {type(exc).__name__}: {exc}"[:300], "steps": 0,
            "model_calls": 0, "retries": 0, "prompt_tokens": 0, "completion_tokens": 0,
            "latency_s": time.perf_counter() - t0, "messages": "[]", "tool_results": "[]"}


async def replay_sample(sample: pl.DataFrame, conversations: pl.DataFrame, endpoint: Endpoint,
                        cfg: ReplayCfg, seed: int,
                        progress: Callable[[int], None] | None = None, *,
                        cache: ModelCache | None = None,
                        stats: dict[str, Any] | None = None,
                        simulator: Endpoint | None = None) -> tuple[pl.DataFrame, int]:
    """Replay every sampled turn through the candidate.

    Args:
        sample: sampled turns (turn_id, conversation_id, user_msg_index).
        conversations: conversation_id, messages and tools (JSON text) of every sampled turn.
        endpoint: the candidate.
        cfg: replay settings; `cfg.cache_dir` opens a cache when `cache` is None.
        seed: the run seed (used when the endpoint sets none).
        progress: called with 1 after each turn.
        cache: the model-call cache; a hit is not a model call.
        stats: when given, receives `model_calls`, `cache_hits`, `retries`, `turns` and `calls`
            (one CALL_SCHEMA row per model call, a DataFrame), all of the candidate; with `llm`
            in the chain also `simulator_calls`, `simulator_cache_hits`, `simulator_retries`
            and `simulator_failures` (by reason kind).
        simulator: the `llm` source's endpoint (models.simulator), used when the chain includes
            llm. None with a synthetic:// candidate means the default synthetic simulator; None
            with any other candidate leaves such calls unanswered (`simulator_unconfigured`).

    Returns:
        (trajectories, model calls): one trajectory per sampled turn, in sample order, and the
        number of requests sent (cache hits and retries not included).
    """
    if cache is None and cfg.cache_dir:
        cache = ModelCache(cfg.cache_dir)
    llm = _open_simulator(cfg, endpoint, simulator, seed, cache)  # reads its prompt: fails early
    model = ChatModel(endpoint, seed, cache=cache)
    convs = {r["conversation_id"]: r for r in
             conversations.select("conversation_id", "messages", "tools").iter_rows(named=True)}
    rows = list(sample.select("turn_id", "conversation_id", "user_msg_index").iter_rows(named=True))
    out: list[dict[str, Any] | None] = [None] * len(rows)
    call_log: list[dict[str, Any]] = []
    todo = iter(range(len(rows)))

    async def one(row: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            conv = convs[row["conversation_id"]]
            messages = json.loads(conv["messages"])
            tools = json.loads(conv["tools"]) if conv["tools"] else []
            rec = await replay_one(model, messages, tools, row["user_msg_index"], cfg,
                                   turn_id=row["turn_id"], call_log=call_log, simulator=llm)
        except Exception as exc:  # an unexpected fault still yields the turn, with its reason
            rec = _internal_error(exc, t0)
        return {"turn_id": row["turn_id"], "conversation_id": row["conversation_id"], "side": "candidate",
                "model": endpoint.model, **rec}

    async def worker() -> None:
        # A bounded pool keeps memory flat on big chunks: each worker parses one turn at a time.
        for i in todo:
            out[i] = await one(rows[i])
            if progress:
                progress(1)

    try:
        # A local llama.cpp server answers one request at a time and reuses the evaluated start
        # of the previous prompt: its turns go one after another, so each step extends the last.
        n_workers = min(len(rows), endpoint.concurrency if endpoint.local else 2 * endpoint.concurrency + 8)
        await asyncio.gather(*(worker() for _ in range(n_workers)))
    finally:
        await model.aclose()
        if llm is not None:
            await llm.aclose()
    if stats is not None:
        stats.update(model_calls=model.calls, cache_hits=model.cache_hits, retries=model.retries,
                     turns=len(rows), calls=pl.DataFrame(call_log, schema=CALL_SCHEMA))
        if llm is not None:
            stats.update(llm.stats())
    return pl.DataFrame(out, schema=TRAJECTORY_SCHEMA), model.calls


def _open_simulator(cfg: ReplayCfg, candidate: Endpoint, simulator: Endpoint | None, seed: int,
                    cache: ModelCache | None) -> LLMSimulator | None:
    """The `llm` source for a replay, or None when the chain has no llm or no endpoint for it.

    A synthetic candidate without an explicit simulator gets the synthetic world's own
    (Models().simulator): never a real endpoint by default, and no synthetic answers in a run
    against a real candidate.
    """
    if "llm" not in cfg.simulator_chain:
        return None
    if simulator is None and candidate.synthetic:
        simulator = Models().simulator
    if simulator is None:
        return None
    return LLMSimulator.open(simulator, seed, cfg.simulator_prompt, cache)


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
                     "model_calls": 0, "retries": 0, "prompt_tokens": 0, "completion_tokens": 0, "latency_s": 0.0})
    return pl.DataFrame(rows, schema=TRAJECTORY_SCHEMA)
