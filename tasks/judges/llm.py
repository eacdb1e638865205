"""The `llm` judge (DESIGN §1): an LLM reads the transcript and a rubric per category.

One request per trajectory and category group (conf/judges.yaml `judges.llm.groups`; asked
categories in no group form one more group), `judge.llm_samples` samples each (sample j sends
seed + j), majority vote per category. The prompt is conf/judge_prompt.yaml; the answer is
constrained by a JSON schema and parsed strictly. A sample that cannot be used is unscored
with its reason (`judge_malformed`, `judge_refused`, `judge_unavailable`); a category with no
scored sample, or a tied vote, is unscored with the reasons: never false.

The transcript shows every message with its index into `view.messages`, marks where the judged
turn begins, and fences every tool result as `<untrusted_data id="m<i>">…</untrusted_data>`
with fence-like tags inside any message escaped, so content cannot close a fence or open one.
Message text lines after the first are indented, so no content can forge a message header or a
marker line (both start at column 0). A transcript longer than the prompt's limit is judged in
windows of whole messages (`windows`); a category is violated if any window says so.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from string import Template
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from tasks.cache import ModelCache
from tasks.config import ConfigError, Endpoint, read_conf_yaml
from tasks.judges.base import (
    SEVERITIES,
    Evidence,
    Judge,
    TrajectoryView,
    Verdict,
    message_text,
    register,
)
from tasks.models import ChatModel, ChatResult, ModelCallError
from tasks.simulator_llm import trim

PLACEHOLDERS = ("categories", "severity_scale", "tools", "transcript")
SCHEMA_NAME = "judge_verdicts"
INDENT = "    "
BEGIN_MARK = "=== transcript ==="
TURN_MARK = "=== judged turn begins at message {i} ==="
END_MARK = "=== end of transcript ==="
_TAG_LIKE = re.compile(r"<(\s*/?\s*untrusted[\s_-]*data)", re.I)
_CODE_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.S)
_ROLE = re.compile(r"[^\w-]")
_SAMPLE_SEED: contextvars.ContextVar[int | None] = contextvars.ContextVar("depsim_judge_sample_seed", default=None)


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
    digest = _sha({"system": system, "user": user, "response_format": style, "max_tokens": max_tokens,
                   "limits": raw, "transcript_format": [BEGIN_MARK, TURN_MARK, END_MARK, "fence-v1"]})
    return JudgePrompt(system, template, style, max_tokens, limits, digest)


def _sha(obj: Any) -> str:
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


# --- the answer --------------------------------------------------------------------------------

def answer_schema(categories: list[str], scale: list[str]) -> dict[str, Any]:
    """The JSON schema of an answer for a category group (OpenAI strict-mode rules)."""
    props: dict[str, Any] = {
        "category": {"type": "string", "enum": list(categories)},
        "rationale": {"type": "string"},
        "evidence_message_index": {"type": ["integer", "null"]},
        "evidence_excerpt": {"type": "string"},
        "violated": {"type": "boolean"},
        "severity": {"type": "string", "enum": list(scale)},
        "confidence": {"type": "number"},
    }
    item = {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}
    return {"type": "object", "properties": {"verdicts": {"type": "array", "items": item}},
            "required": ["verdicts"], "additionalProperties": False}


def response_format(schema: dict[str, Any], style: str) -> dict[str, Any]:
    """The request's `response_format` for a schema, in the endpoint's dialect."""
    if style == "json_object":
        return {"type": "json_object", "schema": schema}
    return {"type": "json_schema", "json_schema": {"name": SCHEMA_NAME, "schema": schema, "strict": True}}


@dataclass(frozen=True)
class Vote:
    """One sample's verdict on one category (`verdict` None: unscored, with `reason`)."""

    verdict: bool | None
    severity: str = "none"
    evidence: Evidence | None = None
    rationale: str = ""
    reason: str | None = None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _item_vote(item: dict[str, Any], scale: list[str], default_severity: str, n_messages: int) -> Vote:
    checks = [("violated", isinstance(item.get("violated"), bool)),
              ("severity", item.get("severity") in scale),
              ("evidence_message_index", item.get("evidence_message_index") is None
               or _is_int(item.get("evidence_message_index"))),
              ("evidence_excerpt", isinstance(item.get("evidence_excerpt"), str)),
              ("rationale", isinstance(item.get("rationale"), str)),
              ("confidence", isinstance(item.get("confidence"), int | float)
               and not isinstance(item.get("confidence"), bool))]
    bad = [k for k, ok in checks if not ok]
    if bad:
        return Vote(None, reason=f"judge_malformed: {item['category']}: bad or missing {', '.join(bad)}")
    if not item["violated"]:
        return Vote(False, rationale=item["rationale"])
    idx = item["evidence_message_index"]
    severity = item["severity"] if item["severity"] != "none" else default_severity
    evidence = Evidence(idx if idx is not None and 0 <= idx < n_messages else None,
                        trim(item["evidence_excerpt"], 300))
    return Vote(True, severity, evidence, item["rationale"])


def parse_answer(text: str, categories: list[str], scale: list[str], severities: dict[str, str],
                 n_messages: int) -> dict[str, Vote]:
    """One sample's votes per category; a category the answer does not give validly is unscored
    (`judge_malformed`), the others stand."""
    text = text.strip()
    fenced = _CODE_FENCE.match(text)
    if fenced:  # some servers wrap JSON-mode output in a code fence
        text = fenced.group(1).strip()
    try:
        value = json.loads(text)
    except ValueError:
        value = None
        problem = f"not JSON: {text[:80]!r}"
    else:
        problem = "" if isinstance(value, dict) and isinstance(value.get("verdicts"), list) else \
            "not an object with a `verdicts` list"
    if problem:
        return {c: Vote(None, reason=f"judge_malformed: {problem}") for c in categories}
    items: dict[str, list[dict[str, Any]]] = {}
    for item in value["verdicts"]:
        if isinstance(item, dict) and item.get("category") in categories:
            items.setdefault(item["category"], []).append(item)
    out: dict[str, Vote] = {}
    for c in categories:
        got = items.get(c, [])
        if not got:
            out[c] = Vote(None, reason=f"judge_malformed: no verdict for {c}")
        elif len(got) > 1 and len({json.dumps(g, sort_keys=True) for g in got}) > 1:
            out[c] = Vote(None, reason=f"judge_malformed: {len(got)} different verdicts for {c}")
        else:
            out[c] = _item_vote(got[0], scale, severities.get(c, "medium"), n_messages)
    return out


def _worst_first(severities: list[str], scale: list[str]) -> str:
    counts = Counter(severities)
    return max(counts, key=lambda s: (counts[s], scale.index(s) if s in scale else 0))


def majority(category: str, votes: list[Vote], scale: list[str], judge: str, version: str) -> Verdict:
    """The majority of the scored votes; unscored when none is scored or on a tie."""
    scored = [v for v in votes if v.verdict is not None]
    reasons = list(dict.fromkeys(v.reason for v in votes if v.reason))
    if not scored:
        v = Verdict.unscored(category, f"{'; '.join(reasons)} (all {len(votes)} samples)", judge, version)
        v.votes = [None] * len(votes)
        return v
    yes = sum(1 for v in scored if v.verdict)
    no = len(scored) - yes
    if yes == no:
        detail = f"tie: {yes} violated, {no} not violated, {len(votes) - len(scored)} unscored"
        v = Verdict.unscored(category, f"{detail} ({'; '.join(reasons)})" if reasons else detail, judge, version)
        v.votes = [x.verdict for x in votes]
        return v
    decided = yes > no
    agree = [v for v in scored if v.verdict == decided]
    lead = next((v for v in agree if v.evidence is not None), agree[0])
    return Verdict(category, decided, _worst_first([v.severity for v in agree], scale) if decided else "none",
                   [lead.evidence] if decided and lead.evidence else [], judge, version,
                   len(agree) / len(votes), None, lead.rationale or None, [v.verdict for v in votes])


def combine_windows(category: str, verdicts: list[Verdict]) -> Verdict:
    """Violated if any window says so; unscored if none does and any is unscored; else false."""
    if len(verdicts) == 1:
        return verdicts[0]
    n = len(verdicts)
    for w, v in enumerate(verdicts):
        if v.verdict:
            v.rationale = f"window {w + 1} of {n}: {v.rationale or ''}".strip()
            return v
    missing = [(w, v.unscored_reason or "unknown") for w, v in enumerate(verdicts) if v.verdict is None]
    if missing:
        detail = "; ".join(f"window {w + 1} of {n}: {r}" for w, r in missing)
        return Verdict.unscored(category, f"{missing[0][1].split(':', 1)[0]}: {detail}", verdicts[0].judge,
                                verdicts[0].judge_version)
    return min(verdicts, key=lambda v: v.confidence if v.confidence is not None else 1.0)


# --- the judge ---------------------------------------------------------------------------------

class _SampledChat(ChatModel):
    """A ChatModel whose request seed is set per call: sample j of k sends seed + j."""

    def request_body(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                     max_tokens: int, response_format: dict[str, Any] | None = None) -> dict[str, Any]:
        body = super().request_body(messages, tools, max_tokens, response_format)
        seed = _SAMPLE_SEED.get()
        if seed is not None:
            body["seed"] = seed
        return body

    async def sample(self, seed: int, messages: list[dict[str, Any]], max_tokens: int,
                     response_format: dict[str, Any]) -> ChatResult:
        token = _SAMPLE_SEED.set(seed)  # a context variable: concurrent samples never mix seeds
        try:
            return await self.chat(messages, None, max_tokens, response_format=response_format)
        finally:
            _SAMPLE_SEED.reset(token)


def _public_url(url: str) -> str:
    """The base URL without credentials or query (safe to log)."""
    parts = urlsplit(url)
    if not parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


@register("llm")
class LLMJudge(Judge):
    """An LLM judge over one endpoint (`models.<spec.role>`), k samples, majority vote.

    With `settings` None (tests), the spec may carry `endpoint` (an Endpoint or its fields),
    `samples`, `seed` and `cache_dir`.
    """

    version = "1"

    def __init__(self, name: str, spec: dict[str, Any], taxonomy: dict[str, Any], settings: Any = None) -> None:
        super().__init__(name, spec, taxonomy, settings)
        if settings is not None:
            endpoint = getattr(settings.models, str(spec.get("role", "judge")))
            self.samples = int(settings.judge.llm_samples)
            seed = int(settings.run.seed)
            cache_root = _cache_dir(settings) if settings.replay.cache else None
        else:
            raw = spec.get("endpoint")
            if raw is None:
                raise ConfigError(f"judges.{name}: no settings and no `endpoint` in the spec")
            endpoint = raw if isinstance(raw, Endpoint) else Endpoint.model_validate(raw)
            self.samples = int(spec.get("samples", 1))
            seed = int(spec.get("seed", 0))
            cache_root = spec.get("cache_dir")
        if self.samples < 1:
            raise ConfigError(f"judges.{name}: samples must be >= 1")
        endpoint.api_key()  # a missing key is a configuration error now, not a failed verdict later
        self.endpoint: Endpoint = endpoint
        self.seed = endpoint.seed if endpoint.seed is not None else seed
        self.cache = ModelCache(cache_root) if cache_root else None
        self.prompt = load_prompt(str(spec.get("prompt", "judge_prompt.yaml")))
        self.scale = [str(s) for s in taxonomy.get("severity_scale") or SEVERITIES]
        self.groups = {str(g): [str(c) for c in cats] for g, cats in (spec.get("groups") or {}).items()}
        cats = taxonomy["categories"]
        self.prompt_hash = _sha({"prompt": self.prompt.digest, "scale": self.scale, "groups": self.groups,
                                 "categories": {c: [cats[c].get("rubric"), cats[c].get("severity")]
                                                for c in sorted(cats)}})
        self.judge_version = f"{endpoint.model}@{self.prompt_hash[:12]}"
        self._model: _SampledChat | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done = {"calls": 0, "retries": 0, "cache_hits": 0}
        self.unscored: Counter[str] = Counter()
        self.unscored_samples: Counter[str] = Counter()

    def _chat(self) -> _SampledChat:
        """The model client of the running event loop (a client is bound to the loop it ran in)."""
        loop = asyncio.get_running_loop()
        if self._model is None or self._loop is not loop:
            if self._model is not None:
                for k in self._done:
                    self._done[k] += getattr(self._model, k)
            self._model, self._loop = _SampledChat(self.endpoint, self.seed, cache=self.cache), loop
        return self._model

    def group(self, categories: list[str]) -> list[list[str]]:
        """The asked categories by request: each configured group's, then the rest together."""
        out = [[c for c in cats if c in categories] for cats in self.groups.values()]
        grouped = {c for cats in self.groups.values() for c in cats}
        out.append([c for c in categories if c not in grouped])
        return [g for g in out if g]

    async def judge(self, view: TrajectoryView, categories: list[str]) -> dict[str, Verdict]:
        known = [c for c in categories if c in self.taxonomy["categories"]]
        out = {c: Verdict.unscored(c, "judge_config: not a category of the taxonomy", self.name, self.judge_version)
               for c in categories if c not in known}
        groups = self.group(known)
        wins = windows(view, self.prompt.limits)
        jobs = [(g, w, j) for g in range(len(groups)) for w in range(len(wins)) for j in range(self.samples)]
        answers = await asyncio.gather(*(self._sample(groups[g], wins[w], view, j) for g, w, j in jobs))
        votes: dict[tuple[str, int], list[Vote]] = {}
        for (g, w, _), answer in zip(jobs, answers, strict=True):
            for c in groups[g]:
                votes.setdefault((c, w), []).append(answer[c])
        for c in known:
            per_window = [majority(c, votes[(c, w)], self.scale, self.name, self.judge_version)
                          for w in range(len(wins))]
            out[c] = combine_windows(c, per_window)
        for v in out.values():
            if v.verdict is None:
                self.unscored[(v.unscored_reason or "unknown").split(":", 1)[0]] += 1
        return {c: out[c] for c in categories}

    def request(self, categories: list[str], window: Window, view: TrajectoryView) -> list[dict[str, Any]]:
        """The chat messages of one request."""
        user = self.prompt.user.substitute(
            categories=render_categories(categories, self.taxonomy),
            severity_scale=", ".join(self.scale),
            tools=render_tools(view.tools, self.prompt.limits.tools_chars),
            transcript=window.transcript)
        return [{"role": "system", "content": self.prompt.system}, {"role": "user", "content": user}]

    async def _sample(self, categories: list[str], window: Window, view: TrajectoryView, j: int) -> dict[str, Vote]:
        schema = answer_schema(categories, self.scale)
        try:
            out = await self._chat().sample(self.seed + j, self.request(categories, window, view),
                                            self.prompt.max_tokens, response_format(schema, self.prompt.response_format))
        except ModelCallError as exc:
            return self._failed(categories, f"judge_unavailable: {exc.reason}: {exc.detail}")
        if out.message.get("refusal") or out.finish_reason == "content_filter":
            return self._failed(categories, f"judge_refused: {out.message.get('refusal') or out.finish_reason}"[:300])
        if out.finish_reason == "length":
            return self._failed(categories, f"judge_malformed: answer cut at max_tokens={self.prompt.max_tokens}")
        severities = {c: str(self.taxonomy["categories"][c].get("severity", "medium")) for c in categories}
        votes = parse_answer(str(out.message.get("content") or ""), categories, self.scale, severities,
                             len(view.messages))
        for v in votes.values():
            if v.reason:
                self.unscored_samples[v.reason.split(":", 1)[0]] += 1
        return votes

    def _failed(self, categories: list[str], reason: str) -> dict[str, Vote]:
        self.unscored_samples[reason.split(":", 1)[0]] += len(categories)
        return {c: Vote(None, reason=reason) for c in categories}

    def provenance(self) -> dict[str, Any]:
        return {"kind": self.kind, "version": self.version, "model": self.endpoint.model,
                "base_url": _public_url(self.endpoint.base_url), "prompt_hash": self.prompt_hash,
                "temperature": self.endpoint.temperature, "samples": self.samples, "seed": self.seed}

    def stats(self) -> dict[str, int]:
        counts = dict(self._done)
        if self._model is not None:
            for k in counts:
                counts[k] += getattr(self._model, k)
        out = {"requests": counts["calls"], "cache_hits": counts["cache_hits"], "retries": counts["retries"]}
        out.update({f"unscored.{k}": n for k, n in sorted(self.unscored.items())})
        out.update({f"unscored_samples.{k}": n for k, n in sorted(self.unscored_samples.items())})
        return out

    async def aclose(self) -> None:
        if self._model is not None:
            for k in self._done:
                self._done[k] += getattr(self._model, k)
            model, self._model, self._loop = self._model, None, None
            await model.aclose()


def _cache_dir(settings: Any) -> str:
    from tasks.stages import cache_dir  # the one definition of the run's model-call cache folder

    return cache_dir(settings, None)  # type: ignore[arg-type]  # its store argument is unused
