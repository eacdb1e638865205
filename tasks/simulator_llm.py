"""The `llm` tool-simulator source (DESIGN §1): an LLM writes the result of a tool call.

`models.simulator` is given the tool's schema, the call, the per-replay world state and the
trajectory (prompt: conf/simulator.yaml, or the file named by `replay.simulator_prompt`) and
answers with JSON constrained by a schema:

- the tool's declared *output* schema, when it has one. OpenAI function-tool schemas have no
  standard field for it; depsim reads `function.output_schema`, else a top-level
  `output_schema` on the tool object. The result's content is that JSON value, as text;
- otherwise {"content": string, "is_error": boolean}.

The answer must parse as JSON of the schema's top-level shape (its type, its required keys and
their declared types); anything else is an error result with reason `simulator_malformed`. An
endpoint that fails for good (after its retries) gives `simulator_unavailable`, a refusal
`simulator_refused`. Either way the candidate gets a tool error message and the turn goes on.

Nothing here executes a tool: the only side effect is the HTTP request to the simulator
endpoint, which is why this runs outside tasks.toolsim's `no_execution` guard.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from string import Template
from typing import Any, Literal

from tasks.cache import ModelCache
from tasks.config import ConfigError, Endpoint, read_conf_yaml
from tasks.models import ChatModel, ModelCallError
from tasks.toolsim import LLMRequest, ToolResult, WorldState

DEFAULT_OUTPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"content": {"type": "string"}, "is_error": {"type": "boolean"}},
    "required": ["content", "is_error"],
    "additionalProperties": False,  # OpenAI's strict mode requires it
}
PLACEHOLDERS = ("tool_name", "tool_schema", "arguments", "world_state", "trajectory")
SCHEMA_NAME = "tool_result"
_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.S)
_PY_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list,), "string": (str,), "integer": (int,),
    "number": (int, float), "boolean": (bool,), "null": (type(None),),
}


class MalformedAnswer(ValueError):
    """The simulator's answer is not JSON of the requested schema's top-level shape."""


@dataclass(frozen=True)
class Limits:
    """Characters kept of each part of the prompt (conf/simulator.yaml `limits`)."""

    trajectory_chars: int = 6000
    message_chars: int = 600
    state_chars: int = 3000
    file_chars: int = 1200


@dataclass(frozen=True)
class SimulatorPrompt:
    """The simulator's prompt and output settings, as read from conf."""

    system: str
    user: Template
    response_format: Literal["json_schema", "json_object"] = "json_schema"
    max_tokens: int = 768
    limits: Limits = field(default_factory=Limits)


def load_prompt(name: str) -> SimulatorPrompt:
    """Read and check a simulator prompt file (a name in conf/ or a path).

    Raises:
        ConfigError: a missing or malformed file, key or placeholder.
    """
    data = read_conf_yaml(name)
    system, user = data.get("system"), data.get("user")
    if not isinstance(system, str) or not isinstance(user, str):
        raise ConfigError(f"{name}: `system` and `user` must be strings")
    style = data.get("response_format", "json_schema")
    if style not in ("json_schema", "json_object"):
        raise ConfigError(f"{name}: response_format must be json_schema or json_object, got {style!r}")
    max_tokens = data.get("max_tokens", 768)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 16:
        raise ConfigError(f"{name}: max_tokens must be an integer >= 16, got {max_tokens!r}")
    template = Template(user)
    if not template.is_valid():
        raise ConfigError(f"{name}: `user` is not a valid template (write $$ for a literal $)")
    used = set(template.get_identifiers())
    if used - set(PLACEHOLDERS):
        raise ConfigError(f"{name}: unknown placeholders {sorted(used - set(PLACEHOLDERS))} "
                          f"(available: {', '.join(PLACEHOLDERS)})")
    if not {"tool_name", "arguments"} <= used:
        raise ConfigError(f"{name}: `user` must use $tool_name and $arguments")
    return SimulatorPrompt(system, template, style, max_tokens, _limits(name, data.get("limits") or {}))


def _limits(name: str, raw: Any) -> Limits:
    keys = tuple(Limits.__dataclass_fields__)
    ok = isinstance(raw, dict) and set(raw) <= set(keys) and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in raw.values())
    if not ok:
        raise ConfigError(f"{name}: limits must map {', '.join(keys)} to positive integers, got {raw!r}")
    return Limits(**raw)


# --- schema --------------------------------------------------------------------------------

def output_schema(tool: dict[str, Any] | None) -> tuple[dict[str, Any], bool]:
    """(schema, declared): the tool's declared output schema, else the default one."""
    if isinstance(tool, dict):
        fn = tool.get("function")
        for schema in ((fn or {}).get("output_schema") if isinstance(fn, dict) else None,
                       tool.get("output_schema")):
            if isinstance(schema, dict) and schema:
                return schema, True
    return DEFAULT_OUTPUT_SCHEMA, False


def response_format(schema: dict[str, Any], style: str) -> dict[str, Any]:
    """The request's `response_format` for a schema, in the endpoint's dialect."""
    if style == "json_object":
        return {"type": "json_object", "schema": schema}
    return {"type": "json_schema", "json_schema": {"name": SCHEMA_NAME, "schema": schema, "strict": True}}


def _is_type(value: Any, types: Any) -> bool:
    """Whether value has one of the JSON-schema types (a name or a list; none = any)."""
    names = [types] if isinstance(types, str) else list(types or [])
    if not names:
        return True
    for name in names:
        py = _PY_TYPES.get(str(name))
        if py is None:
            return True  # a type this check does not know is not held against the answer
        if isinstance(value, bool) and name != "boolean":
            continue  # JSON booleans are not numbers
        if isinstance(value, py):
            return True
    return False


def check_shape(value: Any, schema: dict[str, Any]) -> None:
    """Check the top-level shape: type, required keys, and the declared types of those keys.

    Raises:
        MalformedAnswer: with what is wrong.
    """
    if not _is_type(value, schema.get("type")):
        raise MalformedAnswer(f"expected JSON of type {schema.get('type')}, got {type(value).__name__}")
    if not isinstance(value, dict):
        return
    missing = [k for k in schema.get("required") or [] if k not in value]
    if missing:
        raise MalformedAnswer(f"missing required keys {missing}")
    props = schema.get("properties") or {}
    for key, sub in props.items():
        if key in value and isinstance(sub, dict) and not _is_type(value[key], sub.get("type")):
            raise MalformedAnswer(f"{key!r} should be {sub.get('type')}, got {type(value[key]).__name__}")


def parse_answer(text: str, schema: dict[str, Any], declared: bool) -> tuple[str, bool]:
    """(content, is_error) of a simulator answer.

    Raises:
        MalformedAnswer: not JSON, or not of the schema's top-level shape.
    """
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:  # some servers wrap JSON mode output in a code fence
        text = fenced.group(1).strip()
    try:
        value = json.loads(text)
    except ValueError:
        raise MalformedAnswer(f"not JSON: {text[:80]!r}") from None
    check_shape(value, schema)
    if not declared:
        return value["content"], value["is_error"]
    is_error = isinstance(value, dict) and value.get("is_error") is True
    return json.dumps(value, ensure_ascii=False), is_error


# --- prompt rendering ----------------------------------------------------------------------

def trim(text: str, limit: int, head_share: float = 0.3) -> str:
    """Text cut to about `limit` characters, keeping its start and its end."""
    if len(text) <= limit:
        return text
    head = int(limit * head_share)
    tail = max(0, limit - head)
    return f"{text[:head]}\n… [{len(text) - head - tail} characters elided] …\n{text[len(text) - tail:]}"


def _text(content: Any) -> str:
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)


def render_trajectory(messages: list[dict[str, Any]], limits: Limits) -> str:
    """One line per message (tool calls as `→ name(arguments)`), trimmed."""
    lines: list[str] = []
    names: dict[str, str] = {}
    for m in messages:
        role = str(m.get("role", "?"))
        text = _text(m.get("content") or "")
        if role == "tool":
            label = names.get(str(m.get("tool_call_id")), str(m.get("name") or "tool"))
            lines.append(f"[tool {label}] {trim(text, limits.message_chars)}")
            continue
        if text:
            lines.append(f"[{role}] {trim(text, limits.message_chars)}")
        for c in m.get("tool_calls") or []:
            fn = c.get("function") or {}
            names[str(c.get("id"))] = str(fn.get("name", ""))
            lines.append(f"[{role} → {fn.get('name', '')}] {trim(str(fn.get('arguments', '')), limits.message_chars)}")
    return trim("\n".join(lines), limits.trajectory_chars) or "(empty)"


def render_state(state: WorldState, args: dict[str, Any], limits: Limits) -> str:
    """Files known (changed / deleted marked), files the call names, last test output; trimmed."""
    files = sorted(set(state.files) | state.deleted)
    tags = {p: ", ".join(t for t, on in (("changed", p in state.changed), ("deleted", p in state.deleted)) if on)
            for p in files}
    listed = [f"{p} ({tags[p]})" if tags[p] else p for p in files[:60]]
    parts = [f"Files known ({len(files)}): " + (", ".join(listed) if listed else "none")]
    text = " ".join(str(v) for v in args.values())
    named = [p for p in files if p and p in text and p in state.files and p not in state.deleted][:3]
    for p in named:
        parts.append(f"--- {p} ---\n{trim(state.files[p], limits.file_chars)}")
    if state.last_test_output is not None:
        parts.append(f"Last test output:\n{trim(state.last_test_output, limits.file_chars)}")
    return trim("\n".join(parts), limits.state_chars, head_share=0.7)


def build_messages(prompt: SimulatorPrompt, req: LLMRequest, tool: dict[str, Any] | None,
                   trajectory: list[dict[str, Any]], state: WorldState) -> list[dict[str, Any]]:
    """The simulator's chat messages for one call."""
    user = prompt.user.substitute(
        tool_name=req.name,
        tool_schema=json.dumps(tool if tool is not None else {"name": req.name}, ensure_ascii=False, sort_keys=True),
        arguments=json.dumps(req.args, ensure_ascii=False, sort_keys=True),
        world_state=render_state(state, req.args, prompt.limits),
        trajectory=render_trajectory(trajectory, prompt.limits),
    )
    return [{"role": "system", "content": prompt.system}, {"role": "user", "content": user}]


# --- the source ----------------------------------------------------------------------------

def failed(req: LLMRequest, kind: str, detail: str) -> ToolResult:
    """The error result of a call the simulator could not answer; the turn goes on."""
    return ToolResult(f"Error: tool {req.name!r} returned no result ({kind})", "error", req.effects, True,
                      reason=f"{kind}: {detail}"[:300])


class LLMSimulator:
    """The `llm` source over one simulator endpoint (cached, retried, rate-limited like any role).

    Counters: `failures` by reason kind; the model's `calls`, `retries`, `cache_hits`.
    """

    def __init__(self, model: ChatModel, prompt: SimulatorPrompt) -> None:
        self.model = model
        self.prompt = prompt
        self.failures: Counter[str] = Counter()

    @classmethod
    def open(cls, endpoint: Endpoint, seed: int, prompt: str, cache: ModelCache | None = None) -> LLMSimulator:
        """A simulator for an endpoint and a prompt file (read now, outside any guard)."""
        return cls(ChatModel(endpoint, seed, cache=cache), load_prompt(prompt))

    async def answer(self, req: LLMRequest, tool: dict[str, Any] | None, trajectory: list[dict[str, Any]],
                     state: WorldState) -> ToolResult:
        """The simulated result of one call (source `llm`), or an error result with its reason."""
        schema, declared = output_schema(tool)
        try:
            out = await self.model.chat(build_messages(self.prompt, req, tool, trajectory, state), None,
                                        self.prompt.max_tokens,
                                        response_format=response_format(schema, self.prompt.response_format))
        except ModelCallError as exc:
            return self._failed(req, "simulator_unavailable", f"{exc.reason}: {exc.detail}")
        if out.message.get("refusal") or out.finish_reason == "content_filter":
            return self._failed(req, "simulator_refused", str(out.message.get("refusal") or out.finish_reason))
        if out.finish_reason == "length":
            return self._failed(req, "simulator_malformed", f"answer cut at max_tokens={self.prompt.max_tokens}")
        try:
            content, is_error = parse_answer(str(out.message.get("content") or ""), schema, declared)
        except MalformedAnswer as exc:
            return self._failed(req, "simulator_malformed", str(exc))
        return ToolResult(content, "llm", req.effects, is_error)

    def _failed(self, req: LLMRequest, kind: str, detail: str) -> ToolResult:
        self.failures[kind] += 1
        return failed(req, kind, detail)

    def stats(self) -> dict[str, Any]:
        """Counters for replay stats: simulator calls, cache hits, retries, failures by kind."""
        return {"simulator_calls": self.model.calls, "simulator_cache_hits": self.model.cache_hits,
                "simulator_retries": self.model.retries, "simulator_failures": dict(self.failures)}

    async def aclose(self) -> None:
        await self.model.aclose()


def tool_schemas(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Declared tools by function name."""
    return {t["function"]["name"]: t for t in tools
            if isinstance(t, dict) and isinstance(t.get("function"), dict) and "name" in t["function"]}
