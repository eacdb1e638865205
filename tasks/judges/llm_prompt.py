"""What the `llm` judge (tasks/judges/llm.py) is shown: the prompt file and the transcript.

The transcript shows every message with its index into `view.messages`, marks where the judged
turn begins, and fences every tool result as `<untrusted_data id="m<i>">…</untrusted_data>`
with fence-like tags inside any message escaped, so content cannot close a fence or open one.
Message text lines after the first are indented, so no content can forge a message header or a
marker line (both start at column 0). A transcript longer than the prompt's limit is judged in
windows of whole messages (`windows`); a category is violated if any window says so.
"""


import hashlib
import json
import re
from dataclasses import dataclass, field
from string import Template
from typing import Any, Literal

from tasks.config import ConfigError, read_conf_yaml
from tasks.judges.base import (
    TrajectoryView,
    message_text,
)
from tasks.simulator_llm import trim

PLACEHOLDERS = ("categories", "severity_scale", "tools", "transcript")
INDENT = "    "
BEGIN_MARK = "=== transcript ==="
TURN_MARK = "=== judged turn begins at message {i} ==="
END_MARK = "=== end of transcript ==="
_TAG_LIKE = re.compile(r"<(\s*/?\s*untrusted[\s_-]*data)", re.I)
_ROLE = re.compile(r"[^\w-]")



# --- the prompt file -------------------------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    """Characters kept of each part of a request (conf/judge_prompt.yaml `limits`)."""

    transcript_chars: int = 24000
    message_chars: int = 6000
    context_chars: int = 6000
    note_chars: int = 1500
    tools_chars: int = 1500


@dataclass(frozen=True)
class JudgePrompt:
    """The judge's prompt and output settings, as read from conf; `digest` hashes all of it."""

    system: str
    user: Template
    response_format: Literal["json_schema", "json_object"] = "json_schema"
    max_tokens: int = 1500
    limits: Limits = field(default_factory=Limits)
    digest: str = ""
    # per_category: one object per category (violated, severity, evidence, rationale,
    # confidence). flags: {"<category>": true|false, ...} only; a violated category gets its
    # default severity and no evidence. A few tokens instead of hundreds, for small local judges
    # (conf/judge_prompt_local.yaml).
    answer: Literal["per_category", "flags"] = "per_category"


def load_prompt(name: str = "judge_prompt.yaml") -> JudgePrompt:
    """Read and check a judge prompt file (a name in conf/ or a path).

    Raises:
        ConfigError: a missing or malformed file, key, limit or placeholder.
    """
    data = read_conf_yaml(name)
    system, user = data.get("system"), data.get("user")
    if not isinstance(system, str) or not isinstance(user, str):
        raise ConfigError(f"{name}: `system` and `user` must be strings")
    style = data.get("response_format", "json_schema")
    if style not in ("json_schema", "json_object"):
        raise ConfigError(f"{name}: response_format must be json_schema or json_object, got {style!r}")
    max_tokens = data.get("max_tokens", 1500)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 64:
        raise ConfigError(f"{name}: max_tokens must be an integer >= 64, got {max_tokens!r}")
    template = Template(user)
    if not template.is_valid():
        raise ConfigError(f"{name}: `user` is not a valid template (write $$ for a literal $)")
    used = set(template.get_identifiers())
    if used - set(PLACEHOLDERS):
        raise ConfigError(f"{name}: unknown placeholders {sorted(used - set(PLACEHOLDERS))} "
                          f"(available: {', '.join(PLACEHOLDERS)})")
    if not {"categories", "transcript"} <= used:
        raise ConfigError(f"{name}: `user` must use $categories and $transcript")
    raw = data.get("limits") or {}
    keys = tuple(Limits.__dataclass_fields__)
    if not (isinstance(raw, dict) and set(raw) <= set(keys) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 200 for v in raw.values())):
        raise ConfigError(f"{name}: limits must map {', '.join(keys)} to integers >= 200, got {raw!r}")
    limits = Limits(**raw)
    answer = data.get("answer", "per_category")
    if answer not in ("per_category", "flags"):
        raise ConfigError(f"{name}: answer must be per_category or flags, got {answer!r}")
    hashed: dict[str, Any] = {"system": system, "user": user, "response_format": style, "max_tokens": max_tokens,
                              "limits": raw, "transcript_format": [BEGIN_MARK, TURN_MARK, END_MARK, "fence-v1"]}
    if answer != "per_category":  # the default stays out, so earlier prompts keep their digests
        hashed["answer"] = answer
    return JudgePrompt(system, template, style, max_tokens, limits, digest(hashed), answer)


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


# --- the transcript --------------------------------------------------------------------------

def neutralise(text: str) -> str:
    """Escape anything that looks like a fence tag, so content can neither close nor open one."""
    return _TAG_LIKE.sub(r"&lt;\1", text)


def _block(head: str, text: str) -> str:
    """A head line carrying the text's first line, then its other lines indented."""
    first, *rest = text.split("\n")
    return "\n".join([f"{head} {first}" if first else head, *(INDENT + line for line in rest)])


def _arguments(raw: Any) -> str:
    """Call arguments as one line of JSON when they parse, else as sent."""
    text = raw if isinstance(raw, str) else json.dumps(raw if raw is not None else {}, ensure_ascii=False)
    try:
        return json.dumps(json.loads(text), ensure_ascii=False)
    except ValueError:
        return text


def call_names(messages: list[dict[str, Any]]) -> dict[str, str]:
    """Tool name of every call id in the messages."""
    return {str(c.get("id")): str((c.get("function") or {}).get("name") or "?")
            for m in messages if m.get("role") == "assistant" for c in m.get("tool_calls") or []}


def render_message(i: int, msg: dict[str, Any], names: dict[str, str], limit: int) -> str:
    """One message as transcript lines: `[i] role: text`, `[i] assistant → call <id> name(args)`,
    `[i] tool result for call <id> (name):` with the result fenced as untrusted data."""
    role = _ROLE.sub("_", str(msg.get("role") or "unknown"))
    text = neutralise(trim(message_text(msg), limit, head_share=0.5))
    if role == "tool":
        cid = str(msg.get("tool_call_id") or "-")
        fenced = f'<untrusted_data id="m{i}">\n{text}\n</untrusted_data>'
        return "\n".join([f"[{i}] tool result for call {cid} ({names.get(cid) or msg.get('name') or '?'}):",
                          *(INDENT + line for line in fenced.split("\n"))])
    calls = (msg.get("tool_calls") or []) if role == "assistant" else []
    lines = [_block(f"[{i}] {role}:", text)] if text or not calls else []
    for c in calls:
        fn = c.get("function") or {}
        args = neutralise(trim(_arguments(fn.get("arguments")), limit, head_share=0.5))
        lines.append(_block(f"[{i}] assistant → call {c.get('id') or '-'}", f"{fn.get('name') or '?'}({args})"))
    return "\n".join(lines)


@dataclass(frozen=True)
class Window:
    """One request's transcript: the messages it shows, and those only named in a note."""

    transcript: str
    shown: tuple[int, ...]
    omitted: tuple[int, ...] = ()


def _span(idx: list[int]) -> str:
    return f"{idx[0]}–{idx[-1]}" if len(idx) > 1 else str(idx[0])


def _context(view: TrajectoryView, names: dict[str, str], limits: Limits) -> tuple[list[str], list[int]]:
    """The conversation before the judged turn, for a windowed request: its system and developer
    messages and the request (the last user message), trimmed, then as many of its latest other
    messages as `limits.context_chars` allows; the gaps are named, never silent."""
    prefix = view.prefix
    last_user = max((i for i, m in enumerate(prefix) if m.get("role") == "user"), default=None)
    kept = [i for i, m in enumerate(prefix) if m.get("role") in ("system", "developer") or i == last_user]
    share = max(200, limits.context_chars // (2 * max(1, len(kept))))
    parts = {i: render_message(i, prefix[i], names, share) for i in kept}
    used = sum(len(p) + 1 for p in parts.values())
    for i in range(len(prefix) - 1, -1, -1):
        if i in parts:
            continue
        p = render_message(i, prefix[i], names, min(limits.message_chars, limits.context_chars // 4))
        if used + len(p) + 1 > limits.context_chars:
            break
        parts[i] = p
        used += len(p) + 1
    lines: list[str] = []
    gap: list[int] = []
    for i in range(len(prefix) + 1):
        if i < len(prefix) and i not in parts:
            gap.append(i)
            continue
        if gap:
            lines.append(f"(messages {_span(gap)} omitted here: earlier context, not judged)")
            gap = []
        if i < len(prefix):
            lines.append(parts[i])
    return lines, sorted(parts)


def _note(view: TrajectoryView, before: list[int], limits: Limits) -> str:
    """What the judged turn did before a window: its calls, one short item each, on one line."""
    calls = [f"[{c.msg_index}] {c.name}({trim(c.raw_arguments, 100)})"
             for c in view.turn_calls() if c.msg_index in before]
    text = (f"(earlier in the judged turn, messages {_span(before)} were judged in earlier windows; "
            f"the assistant's calls there: {'; '.join(calls) or 'none'})")
    return neutralise(trim(text, limits.note_chars - 60, head_share=0.3)).replace("\n", " ")


def _fit(i: int, msg: dict[str, Any], names: dict[str, str], limit: int, budget: int) -> str:
    """A message rendered within `budget` characters (its text trimmed further if need be)."""
    part = render_message(i, msg, names, limit)
    while len(part) > budget and limit > 50:
        limit = max(50, limit * budget // len(part) - 100)
        part = render_message(i, msg, names, limit)
    return part


def windows(view: TrajectoryView, limits: Limits) -> list[Window]:
    """The transcript of `view` in one window, or, when longer than `limits.transcript_chars`,
    the judged turn split into windows of whole messages that fit, each after the context."""
    msgs = view.messages
    start = view.turn_start
    names = call_names(msgs)
    mark = TURN_MARK.format(i=start)
    rendered = [render_message(i, m, names, limits.message_chars) for i, m in enumerate(msgs)]
    whole = "\n".join([BEGIN_MARK, *rendered[:start], mark, *rendered[start:], END_MARK])
    if len(whole) <= limits.transcript_chars or len(msgs) == start:
        return [Window(whole, tuple(range(len(msgs))))]
    context, shown_prefix = _context(view, names, limits)
    fixed = sum(len(c) + 1 for c in context) + limits.note_chars + 300  # + markers and window line
    budget = max(limits.transcript_chars - fixed, 1000)
    groups: list[list[tuple[int, str]]] = [[]]
    size = 0
    for i in range(start, len(msgs)):
        part = _fit(i, msgs[i], names, min(limits.message_chars, budget), budget)
        if groups[-1] and size + len(part) + 1 > budget:
            groups.append([])
            size = 0
        groups[-1].append((i, part))
        size += len(part) + 1
    omitted = tuple(i for i in range(start) if i not in shown_prefix)
    out: list[Window] = []
    for w, group in enumerate(groups):
        idx = [i for i, _ in group]
        head = [BEGIN_MARK, *context, mark,
                f"=== window {w + 1} of {len(groups)}: messages {_span(idx)} of the judged turn ==="]
        if idx[0] > start:
            head.append(_note(view, list(range(start, idx[0])), limits))
        out.append(Window("\n".join([*head, *(p for _, p in group), END_MARK]),
                          (*shown_prefix, *idx), omitted))
    return out


def render_tools(tools: list[dict[str, Any]], limit: int) -> str:
    """The declared tools, one line each (name: description)."""
    lines = []
    for t in tools:
        fn = t.get("function") if isinstance(t, dict) else None
        if isinstance(fn, dict) and fn.get("name"):
            desc = " ".join(str(fn.get("description") or "").split())
            lines.append(f"- {fn['name']}: {trim(desc, 160)}" if desc else f"- {fn['name']}")
    return neutralise(trim("\n".join(lines), limit, head_share=0.7)) or "(none)"


def render_categories(categories: list[str], taxonomy: dict[str, Any]) -> str:
    """Each category with its typical severity and its rubric (conf/judges.yaml)."""
    out = []
    for c in categories:
        entry = taxonomy["categories"][c]
        rubric = " ".join(str(entry.get("rubric") or "(no rubric)").split())
        out.append(f"### {c}\nTypical severity when violated: {entry.get('severity', 'medium')}\nRubric: {rubric}")
    return "\n\n".join(out)
