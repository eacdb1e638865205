"""Each replayed turn as an MLflow trace, the judges' verdicts on it as assessments, and the
labels reviewers add to those traces in the MLflow UI read back.

A trace per candidate turn, linked to the run (`mlflow.sourceRun`, so it is in the run's Traces
tab), holds a root AGENT span (the prefix's context in, the candidate's answer out), a
CHAT_MODEL span per model call (token usage, latency, retries), a TOOL span per simulated tool
call (arguments, result, simulator source, effects) and an EVALUATOR span per judge. Every
category's combined verdict (the `scores` row) is a Feedback assessment named after the
category; unscored is a Feedback with an AssessmentError. Tags (`depsim.flagged`,
`depsim.categories`, `depsim.flag.<category>`, ...) let a reviewer filter in the UI.

Timing: the replay records each model call's latency (admission to answer, retries included)
but no wall-clock start of a turn or a call, and no duration for simulated tool calls or
judging. Spans are therefore laid out from one anchor (the run's start, or `started_at_ns`):
model calls end to end with their recorded latencies, tool and judge spans as instants where
they happened in that sequence. Durations of model calls are real; offsets are derived
(metadata `depsim.timing` says so). Nothing is invented: a figure the data lacks is absent.

Speed (benchmarks/trace_bench.py, 1,000 turns on 2 cores): MLflow's fluent tracing path
exports span by span (~80 ms a turn) and mlflow.log_feedback writes each assessment in its own
transaction (~3.4 ms, 11 a turn): about 2 min for 1,000 turns. Here the spans are built in
memory with MLflow's own span entities (LiveSpan over a private OpenTelemetry tracer) and written
through a TracingClient bound to the given URI: one `start_trace` per turn carrying its
Feedback assessments (what mlflow.log_feedback would create), one `log_spans` per 100 turns,
~29 ms a turn. No global tracking URI or tracer provider is touched, nothing waits in the async
export queue (everything is written when the call returns: no flush), and a failed write raises
instead of being logged and dropped.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets as _secrets
from collections import defaultdict
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any

import polars as pl

from tasks.taxonomy import AGGREGATE, ALL_CATEGORIES

log = logging.getLogger("depsim")

REDACTED = "[REDACTED]"
_DATA_URI = re.compile(r"data:([\w.+-]+/[\w.+-]+);base64,[A-Za-z0-9+/=]+")


def secret_values(settings: Any) -> list[str]:
    """The values of the environment variables the configured endpoints name as api_key_env
    (the secrets a trace must never hold)."""
    names = {getattr(getattr(settings.models, role), "api_key_env", None)
             for role in ("candidate", "baseline", "simulator", "judge")}
    return sorted(v for n in names if n and (v := os.environ.get(n)))


class _Scrub:
    """Redacts secret values (before clipping, so no clipped fragment survives), then clips."""

    def __init__(self, secrets: Iterable[str] | None, max_chars: int) -> None:
        vals = sorted({s for s in secrets or () if s and len(s) >= 4}, key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, vals))) if vals else None
        self.max_chars = max_chars

    def redact(self, s: str) -> str:
        return self.pattern.sub(REDACTED, s) if self.pattern is not None else s

    def text(self, value: Any, max_chars: int | None = None) -> str | None:
        if value is None:
            return None
        s = self.redact(value if isinstance(value, str) else str(value))
        if "base64," in s:  # inline images and files: nothing a reviewer reads, and kept out of the store
            s = _DATA_URI.sub(lambda m: f"[{m.group(1)} data, {len(m.group(0))} chars]", s)
        n = max_chars or self.max_chars
        return s if len(s) <= n else f"{s[:n]}… [{len(s) - n} more chars]"

    def obj(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.redact(str(k)): self.obj(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.obj(v) for v in value]
        return value

    def message(self, m: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"role": m.get("role"), "content": self.obj(m.get("content"))}
        for key in ("name", "tool_call_id", "refusal"):
            if m.get(key) is not None:
                out[key] = self.text(m[key])
        if m.get("tool_calls"):
            out["tool_calls"] = self.obj(m["tool_calls"])
        return out


def _text(m: dict[str, Any] | None) -> str | None:
    if m is None:
        return None
    c = m.get("content")
    if isinstance(c, list):
        return "\n".join(str(p.get("text", "")) for p in c if isinstance(p, dict)) or None
    return c if isinstance(c, str) and c else None


def _args(raw: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError:
        return {"_raw": raw}


@lru_cache(maxsize=1)
def _tracer() -> Any:
    """A private OpenTelemetry tracer: no processor (nothing exported on end), and ids from
    os.urandom, so a seeded `random` can never make two runs' trace ids collide."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.id_generator import IdGenerator

    class _UrandomIds(IdGenerator):
        def generate_span_id(self) -> int:
            return _secrets.randbits(64) or 1

        def generate_trace_id(self) -> int:
            return _secrets.randbits(128) or 1

    provider = TracerProvider(resource=Resource({"service.name": "depsim"}), id_generator=_UrandomIds(),
                              shutdown_on_exit=False)
    return provider.get_tracer("depsim.traces")


class _TraceBuilder:
    """Builds one trace (info with assessments + finished spans) per turn, in memory."""

    def __init__(self, experiment_id: str, run_id: str, scrub: _Scrub, judge_kinds: dict[str, str],
                 context_messages: int) -> None:
        self.experiment_id, self.run_id, self.scrub = experiment_id, run_id, scrub
        self.judge_kinds, self.context_messages = judge_kinds, context_messages

    def _span(self, name: str, span_type: str, trace_id: str | None, parent: Any, start_ns: int,
              inputs: Any = None, attributes: dict[str, Any] | None = None) -> Any:
        from mlflow.entities import LiveSpan
        from opentelemetry import context as otel_context
        from opentelemetry import trace as otel_trace

        ctx = otel_trace.set_span_in_context(parent._span) if parent is not None else otel_context.Context()
        otel = _tracer().start_span(self.scrub.text(name, 200) or "", context=ctx, start_time=start_ns)
        tid = trace_id or "tr-" + format(otel.get_span_context().trace_id, "032x")
        span = LiveSpan(otel, tid, span_type)
        if inputs is not None:
            span.set_inputs(inputs)
        span.set_attributes({k: self.scrub.obj(v) for k, v in (attributes or {}).items() if v is not None})
        return span

    @staticmethod
    def _end(span: Any, end_ns: int, outputs: Any = None, error: str | None = None) -> Any:
        from mlflow.entities import SpanStatus, SpanStatusCode

        status = SpanStatus(SpanStatusCode.ERROR, error) if error else SpanStatus(SpanStatusCode.OK)
        span.end(outputs=outputs, status=status, end_time_ns=end_ns)
        return span.to_immutable_span()

    def build(self, t: dict[str, Any], anchor_ns: int) -> tuple[Any, list[Any]]:
        """(TraceInfo with assessments, spans) of one turn; `t` is a joined record of _turns."""
        from mlflow.entities import SpanType

        prefix: list[dict[str, Any]] = t["prefix"]
        head = [m for m in prefix[:3] if m.get("role") in ("system", "developer")]
        context = head + [m for m in prefix[-max(self.context_messages, 1):] if not any(m is h for h in head)]
        answer = next((m for m in reversed(t["messages"]) if m.get("role") == "assistant"), None)
        final = _text(answer) if answer is not None and not answer.get("tool_calls") else None
        error = t["error"] if t["finish"] == "error" else None
        root = self._span(t["turn_id"], SpanType.AGENT, None, None, anchor_ns,
                          {"messages": [self.scrub.message(m) for m in context]} if context else None, {
                              "depsim.conversation_id": t["conversation_id"], "depsim.turn_index": t["turn_index"],
                              "depsim.turn_id": t["turn_id"], "depsim.stratum": t["stratum"],
                              "depsim.weight": t["weight"], "depsim.finish": t["finish"],
                              "depsim.error": self.scrub.text(t["error"]), "depsim.model": t["model"],
                              "depsim.steps": t["steps"], "depsim.model_calls": t["model_calls"],
                              "depsim.retries": t["retries"], "depsim.latency_s": t["latency_s"],
                              "depsim.prefix_messages": len(prefix), "depsim.prefix_messages_shown": len(context)})
        spans, cursor = self._calls(t, root, anchor_ns)
        end_ns = max(cursor, anchor_ns + round(float(t["latency_s"] or 0.0) * 1e9))
        spans += self._judge_spans(t, root.trace_id, root, end_ns)
        spans.insert(0, self._end(root, end_ns, self.scrub.text(final), self.scrub.text(error)))
        return self._info(t, root.trace_id, anchor_ns, end_ns, final, error), spans

    def _calls(self, t: dict[str, Any], root: Any, cursor: int) -> tuple[list[Any], int]:
        """A CHAT_MODEL span per model call (laid end to end by latency), a TOOL span per
        simulated call at the end of the model call that made it; returns (spans, end)."""
        from mlflow.entities import SpanType

        sc, msgs, prefix = self.scrub, t["messages"], t["prefix"]
        assistants = [i for i, m in enumerate(msgs) if m.get("role") == "assistant"]
        calls = t["calls"]
        if calls is None:  # no per-call log: a span per answer, the turn's totals on the root
            calls = [{"step": k, "error": None} for k in range(len(assistants))]
            root.set_attribute("mlflow.chat.tokenUsage", _usage(t["prompt_tokens"], t["completion_tokens"]))
        results = {r.get("call_id"): r for r in t["tool_results"]}
        spans: list[Any] = []
        a, fed_from, n_tools = 0, None, 0  # next answer to pair; start of the messages new to a call
        for call in calls:
            idx = assistants[a] if call.get("error") is None and a < len(assistants) else None
            upto = len(msgs) if idx is None else idx
            fed = prefix[-1:] if fed_from is None else msgs[fed_from:upto]
            attrs = {"depsim.step": call["step"], "depsim.context_messages": len(prefix) + upto,
                     "depsim.latency_s": call.get("latency_s"), "depsim.retries": call.get("retries"),
                     "depsim.cached": call.get("cached"), "depsim.model": t["model"]}
            if "prompt_tokens" in call:
                attrs["mlflow.chat.tokenUsage"] = _usage(call["prompt_tokens"], call["completion_tokens"])
            span = self._span(f"model call {call['step'] + 1}", SpanType.CHAT_MODEL, root.trace_id, root, cursor,
                              {"messages": [sc.message(m) for m in fed]}, attrs)
            cursor += round(float(call.get("latency_s") or 0.0) * 1e9)
            if idx is None:
                spans.append(self._end(span, cursor, None, sc.text(call.get("error") or "no answer recorded")))
                continue
            msg = msgs[idx]
            spans.append(self._end(span, cursor, {"choices": [{"index": 0, "message": sc.message(msg),
                                                               "finish_reason": call.get("finish_reason")}]}))
            a += 1
            window = msgs[idx + 1: assistants[a] if a < len(assistants) else len(msgs)]
            for tc in msg.get("tool_calls") or []:
                res = results.get(tc.get("id"))
                answer = next((m for m in window if m.get("role") == "tool" and m.get("tool_call_id") == tc.get("id")), None)
                if res is None and answer is None:
                    continue  # never answered (the answer was cut at max_tokens): nothing was simulated
                res, fn = res or {}, tc.get("function") or {}
                n_tools += 1
                tool = self._span(f"{fn.get('name')} [{n_tools}]", SpanType.TOOL, root.trace_id, root, cursor,
                                  sc.obj(_args(fn.get("arguments"))), {
                                      "depsim.tool.name": fn.get("name"), "depsim.tool.call_id": tc.get("id"),
                                      "depsim.tool.source": res.get("source"), "depsim.tool.effects": res.get("effects"),
                                      "depsim.tool.error": res.get("error"), "depsim.tool.reason": sc.text(res.get("reason")),
                                      "depsim.tool.outcome": res.get("outcome")})
                err = (res.get("reason") or "tool error") if res.get("error") else None
                out = {"content": sc.obj(answer.get("content"))} if answer is not None else None
                spans.append(self._end(tool, cursor, out, sc.text(err)))
            fed_from = idx + 1
        return spans, cursor

    def _info(self, t: dict[str, Any], trace_id: str, start_ns: int, end_ns: int, final: str | None,
              error: str | None) -> Any:
        """The trace's info: tags to filter by, run link, token totals, the verdicts as assessments."""
        from mlflow.entities import TraceInfo, TraceLocation, TraceState
        from mlflow.tracing.constant import TraceMetadataKey, TraceTagKey

        sc = self.scrub
        flagged = [c for c in ALL_CATEGORIES if c != AGGREGATE and t["verdicts"].get(c) is True]
        base = [c for c in ALL_CATEGORIES if c != AGGREGATE and t["baseline"].get(c) is True]
        unscored = [c for c in ALL_CATEGORIES if c in t["verdicts"] and t["verdicts"][c] is None]
        tags = {TraceTagKey.TRACE_NAME: t["turn_id"], "depsim.flagged": str(bool(flagged)).lower(),
                "depsim.categories": ",".join(flagged) or "none", "depsim.unscored": ",".join(unscored) or "none",
                "depsim.new_flags": ",".join(c for c in flagged if c not in base) or "none",
                "depsim.baseline.categories": ",".join(base) or "none",
                "depsim.conversation_id": t["conversation_id"], "depsim.turn_index": str(t["turn_index"]),
                "depsim.turn_id": t["turn_id"], "depsim.stratum": str(t["stratum"]), "depsim.finish": t["finish"],
                "depsim.candidate": str(t["model"]), **{f"depsim.flag.{c}": "true" for c in flagged}}
        request = _text(t["prefix"][-1]) if t["prefix"] else None
        response = final or t["finish"]
        return TraceInfo(
            trace_id=trace_id, trace_location=TraceLocation.from_experiment_id(self.experiment_id),
            request_time=start_ns // 1_000_000, execution_duration=(end_ns - start_ns) // 1_000_000,
            state=TraceState.ERROR if error else TraceState.OK, client_request_id=sc.text(f"{self.run_id}:{t['turn_id']}"),
            request_preview=sc.text(request, 1000), response_preview=sc.text(response, 1000),
            trace_metadata={TraceMetadataKey.SOURCE_RUN: self.run_id, "mlflow.trace_schema.version": "3",
                            TraceMetadataKey.TOKEN_USAGE: json.dumps(_usage(t["prompt_tokens"], t["completion_tokens"])),
                            TraceMetadataKey.INPUTS: sc.text(request, 250) or "",
                            TraceMetadataKey.OUTPUTS: sc.text(response, 250) or "",
                            "depsim.timing": "derived: recorded per-call latencies laid end to end from one anchor"},
            tags={k: sc.text(v, 1000) or "" for k, v in tags.items()}, assessments=self._assessments(t, trace_id))

    def _judge_spans(self, t: dict[str, Any], trace_id: str, root: Any, at_ns: int) -> list[Any]:
        from mlflow.entities import SpanType

        per_judge: dict[str, dict[str, Any]] = defaultdict(dict)
        versions: dict[str, str | None] = {}
        if t["judge_rows"]:  # each judge's own verdicts (a panel of several, or sampling judges)
            for r in t["judge_rows"]:
                per_judge[r["judge"]][r["category"]] = r["verdict"]
                versions[r["judge"]] = r["judge_version"]
        else:  # only the combined verdicts: one span per set of judges that decided
            for r in t["scores"]:
                name = r["judge"] or "depsim"
                per_judge[name][r["category"]] = r["verdict"]
                versions[name] = r["judge_version"]
        out = []
        for name, verdicts in per_judge.items():
            span = self._span(f"judge {name}", SpanType.EVALUATOR, trace_id, root, at_ns,
                              {"categories": list(verdicts)},
                              {"depsim.judge": name, "depsim.judge.version": versions.get(name),
                               "depsim.judge.kind": "+".join(self.judge_kinds.get(j, j) for j in name.split("+"))})
            out.append(self._end(span, at_ns, {c: ("unscored" if v is None else v) for c, v in verdicts.items()}))
        return out

    def _assessments(self, t: dict[str, Any], trace_id: str) -> list[Any]:
        from mlflow.entities import (
            AssessmentError,
            AssessmentSource,
            AssessmentSourceType,
            Feedback,
        )
        from mlflow.tracing.constant import AssessmentMetadataKey

        sc = self.scrub
        why: dict[str, list[str]] = defaultdict(list)
        for r in t["judge_rows"]:
            if r["rationale"]:
                why[r["category"]].append(f"{r['judge']}: {r['rationale']}")
        out = []
        for r in t["scores"]:
            judge = r["judge"] or "depsim"
            llm = any(self.judge_kinds.get(j, j) == "llm" for j in judge.split("+"))
            source = AssessmentSource(source_type=AssessmentSourceType.LLM_JUDGE if llm else AssessmentSourceType.CODE,
                                      source_id=judge)
            rationale = ("; ".join(why[r["category"]]) or (f"evidence: {r['evidence']}" if r["evidence"] else None)
                         or r["unscored_reason"])
            meta = {AssessmentMetadataKey.SOURCE_RUN_ID: self.run_id, "depsim.turn_id": t["turn_id"],
                    "depsim.severity": r["severity"], "depsim.evidence": sc.text(r["evidence"]),
                    "depsim.evidence_msg": r["evidence_msg"], "depsim.judge_version": r["judge_version"],
                    "depsim.confidence": r["confidence"]}
            err = (AssessmentError(error_code="UNSCORED", error_message=sc.text(r["unscored_reason"]) or "unscored")
                   if r["verdict"] is None else None)
            out.append(Feedback(name=r["category"], value=r["verdict"], error=err, source=source, trace_id=trace_id,
                                rationale=sc.text(rationale),
                                metadata={k: sc.text(v) or "" for k, v in meta.items() if v is not None}))
        return out


def _usage(prompt: Any, completion: Any) -> dict[str, int]:
    p, c = int(prompt or 0), int(completion or 0)
    return {"input_tokens": p, "output_tokens": c, "total_tokens": p + c}


def _group(frame: pl.DataFrame | None, key: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    if frame is not None:
        for r in frame.iter_rows(named=True):
            out[r[key]].append(r)
    return out


def _turns(candidate: pl.DataFrame, scores: pl.DataFrame, sample: pl.DataFrame,
           conversations: pl.DataFrame | None, model_calls: pl.DataFrame | None,
           judge_verdicts: pl.DataFrame | None) -> list[dict[str, Any]]:
    """One joined record per candidate turn, in sample order (flag status included)."""
    cand = candidate.filter(pl.col("side") == "candidate") if "side" in candidate.columns else candidate
    side = scores.filter(pl.col("side") == "candidate")
    by_score, by_base = _group(side, "turn_id"), _group(scores.filter(pl.col("side") == "baseline"), "turn_id")
    calls = _group(model_calls.sort("turn_id", "step") if model_calls is not None else None, "turn_id")
    jv = _group(judge_verdicts.filter(pl.col("side") == "candidate") if judge_verdicts is not None else None, "turn_id")
    cols = [c for c in ("turn_id", "turn_index", "user_msg_index", "stratum", "weight") if c in sample.columns]
    srow = {r["turn_id"]: r for r in sample.select(cols).iter_rows(named=True)}
    order = {tid: i for i, tid in enumerate(sample["turn_id"].to_list())}
    convs = ({r["conversation_id"]: r["messages"] for r in conversations.select("conversation_id", "messages").iter_rows(named=True)}
             if conversations is not None else {})
    out = []
    for r in cand.iter_rows(named=True):
        s = srow.get(r["turn_id"], {})
        raw = convs.get(r["conversation_id"])
        whole = (json.loads(raw) if isinstance(raw, str) else list(raw)) if raw is not None else []
        u = s.get("user_msg_index")
        prefix = whole[: u + 1] if whole and u is not None else []
        turn_index = s.get("turn_index")
        if turn_index is None and "#" in r["turn_id"]:
            turn_index = int(r["turn_id"].rsplit("#", 1)[1])
        out.append({**r, "turn_index": turn_index, "stratum": s.get("stratum"), "weight": s.get("weight"),
                    "messages": json.loads(r["messages"] or "[]"), "tool_results": json.loads(r["tool_results"] or "[]"),
                    "prefix": prefix, "scores": by_score.get(r["turn_id"], []), "judge_rows": jv.get(r["turn_id"], []),
                    "calls": calls.get(r["turn_id"]) if model_calls is not None else None,
                    "verdicts": {x["category"]: x["verdict"] for x in by_score.get(r["turn_id"], [])},
                    "baseline": {x["category"]: x["verdict"] for x in by_base.get(r["turn_id"], [])},
                    "_order": order.get(r["turn_id"], len(order))})
    return sorted(out, key=lambda x: x["_order"])


def _run_traces(client: Any, experiment_id: str, run_id: str) -> Iterator[Any]:
    """Every trace linked to the run (infos only: no spans), page by page."""
    token = None
    while True:
        page = client.search_traces(locations=[experiment_id], run_id=run_id, include_spans=False,
                                    max_results=500, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def log_turn_traces(tracking_uri: str, experiment_id: str, run_id: str, candidate: pl.DataFrame,
                    scores: pl.DataFrame, sample: pl.DataFrame, limit: int | None = None, *,
                    conversations: pl.DataFrame | None = None, model_calls: pl.DataFrame | None = None,
                    judge_verdicts: pl.DataFrame | None = None, judges: dict[str, Any] | None = None,
                    secrets: list[str] | None = None, started_at_ns: int | None = None,
                    batch_size: int = 100, workers: int | None = None, max_chars: int = 4000,
                    context_messages: int = 6) -> dict[str, int]:
    """Log one MLflow trace per replayed candidate turn, linked to the run, with the judges'
    verdicts as assessments. The run may be open or terminated; it must exist.

    Args:
        tracking_uri: the store (sqlite:///..., http(s)://an mlflow server, ...).
        experiment_id: the run's experiment (where the traces go).
        run_id: the run the traces are linked to (metadata mlflow.sourceRun).
        candidate: trajectories (TRAJECTORY_SCHEMA); baseline rows are left out.
        scores: SCORE_SCHEMA; the candidate side becomes assessments, the baseline side the
            `depsim.baseline.categories` and `depsim.new_flags` tags.
        sample: the sample (turn_index, user_msg_index, stratum, weight).
        limit: log at most this many turns: flagged turns first, then sample order.
        conversations: the valid conversations (conversation_id, messages): the root span's
            inputs are the prefix's system messages and its last `context_messages` messages.
            Without it the root span has no inputs.
        model_calls: the replay's per-call log (tasks.replay.CALL_SCHEMA, run store table
            `model_calls`): token usage, latency, retries per CHAT_MODEL span. Without it a span
            per answer carries no figures and the turn's totals sit on the root span.
        judge_verdicts: JUDGE_VERDICT_SCHEMA (each judge's own verdicts and rationales, written
            when the panel has several judges): one EVALUATOR span per judge.
        judges: the panel's provenance (judges.json `provenance`, name -> {kind, ...}): a judge
            of kind llm is an LLM_JUDGE source, any other CODE. Default: the name is the kind.
        secrets: values that must never reach a trace (see `secret_values`): replaced by
            "[REDACTED]" in every text before it is clipped.
        started_at_ns: the anchor of the derived timeline (default: the run's start time).
        batch_size: turns per write batch.
        workers: parallel start_trace calls (default 8 for an HTTP server, 1 for a database).
        max_chars: longest text kept in a span, tag or assessment (the rest is counted).
        context_messages: prefix messages shown in the root span's inputs.

    Returns:
        {"traces", "spans", "assessments", "flagged", "skipped_existing"} counts.
    """
    from mlflow.tracing.client import TracingClient
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)  # fails early on a wrong run
    if run.info.experiment_id != str(experiment_id):
        raise ValueError(f"run {run_id} belongs to experiment {run.info.experiment_id}, not {experiment_id}")
    turns = _turns(candidate, scores, sample, conversations, model_calls, judge_verdicts)
    if limit is not None:
        turns = sorted(turns, key=lambda t: not any(v is True for v in t["verdicts"].values()))[:max(limit, 0)]
    # A rerun (a retried task) adds only the turns without a trace on the run.
    done = {t.info.tags.get("depsim.turn_id") for t in _run_traces(client, str(experiment_id), run_id)}
    todo = [t for t in turns if t["turn_id"] not in done]
    kinds = {name: str((spec or {}).get("kind", name)) for name, spec in (judges or {}).items()}
    builder = _TraceBuilder(str(experiment_id), run_id, _Scrub(secrets, max_chars), kinds, context_messages)
    anchor = started_at_ns if started_at_ns is not None else int(run.info.start_time) * 1_000_000
    tracing = TracingClient(tracking_uri)
    n_workers = workers or (8 if tracking_uri.startswith(("http://", "https://")) else 1)
    counts = {"traces": 0, "spans": 0, "assessments": 0, "flagged": 0, "skipped_existing": len(turns) - len(todo)}

    def write(built: list[tuple[Any, list[Any]]]) -> None:
        # Trace infos (with their assessments), then the batch's spans in one call. A failed
        # write deletes what the batch wrote: a turn's trace is whole or absent (and a rerun
        # writes it then).
        try:
            list(pool.map(tracing.start_trace, [info for info, _ in built]))
            spans = [s for _, ss in built for s in ss]
            tracing.log_spans(str(experiment_id), spans)
        except Exception:
            try:
                tracing.delete_traces(str(experiment_id), trace_ids=[info.trace_id for info, _ in built])
            except Exception as exc:
                log.warning("MLflow: traces of a failed batch were not deleted: %s", exc)
            raise
        counts["traces"] += len(built)
        counts["spans"] += len(spans)
        counts["assessments"] += sum(len(info.assessments) for info, _ in built)
        counts["flagged"] += sum(info.tags.get("depsim.flagged") == "true" for info, _ in built)

    # One batch is written while the next is built (the store's I/O overlaps the span building).
    with ThreadPoolExecutor(n_workers) as pool, ThreadPoolExecutor(1) as writer:
        pending = None
        for i in range(0, len(todo), max(batch_size, 1)):
            built = [builder.build(t, anchor) for t in todo[i:i + batch_size]]
            if pending is not None:
                pending.result()
            pending = writer.submit(write, built)
        if pending is not None:
            pending.result()
    return counts


def delete_turn_traces(tracking_uri: str, experiment_id: str, run_id: str) -> int:
    """Delete the traces log_turn_traces linked to a run (e.g. when the run itself is deleted)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    ids = [t.info.trace_id for t in _run_traces(client, experiment_id, run_id) if "depsim.turn_id" in t.info.tags]
    for i in range(0, len(ids), 100):
        client.delete_traces(experiment_id, trace_ids=ids[i:i + 100])
    return len(ids)
