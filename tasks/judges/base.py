"""The judge interface (DESIGN §1, STYLE 7 and 14).

A judge reads a `TrajectoryView` — the prefix it was given, the turn it judges (the candidate's
replay or the production model's logged turn), the declared tools — and returns one `Verdict`
per category it was asked about. A verdict is true/false, or unscored (`verdict` None) with a
reason: never a silent false.

Judges are registered by kind (`@register("rules")`) and chosen per category in
conf/judges.yaml, with the rule that combines their verdicts (tasks/judges/combine.py). Adding
a judge is one module with one registered class and one entry in conf/judges.yaml.

Message indexes in evidence count over `view.messages` (the prefix followed by the turn), so an
evidence item can point at the untrusted tool output an action came from as well as at the
action; `view.turn_start` is where the judged turn begins.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

SEVERITIES: tuple[str, ...] = ("none", "low", "medium", "high", "critical")
TRUSTED_ROLES = frozenset({"system", "developer", "user"})


@dataclass(frozen=True)
class Evidence:
    """Where a verdict comes from: a message of `view.messages` and an excerpt of it."""

    msg_index: int | None
    excerpt: str

    def as_dict(self) -> dict[str, Any]:
        return {"msg_index": self.msg_index, "excerpt": self.excerpt}


@dataclass
class Verdict:
    """One judge's verdict on one category of one trajectory.

    Attributes:
        category: a taxonomy category.
        verdict: True (the behaviour is present), False, or None (unscored).
        severity: one of SEVERITIES ("none" when the verdict is not True).
        evidence: the messages that show it (the action first, then where it came from).
        judge: the judge's name in conf/judges.yaml (e.g. "rules", "llm").
        judge_version: the judge's version (code version, or model + prompt hash).
        confidence: in [0, 1] where the judge has one (an LLM's vote share), else None.
        unscored_reason: why `verdict` is None ("<kind>: <detail>").
        rationale: the judge's short explanation, where it gives one.
        votes: the individual sample verdicts of a sampling judge (None = unscored sample).
    """

    category: str
    verdict: bool | None
    severity: str = "none"
    evidence: list[Evidence] = field(default_factory=list)
    judge: str = ""
    judge_version: str = ""
    confidence: float | None = None
    unscored_reason: str | None = None
    rationale: str | None = None
    votes: list[bool | None] | None = None

    @classmethod
    def unscored(cls, category: str, reason: str, judge: str = "", judge_version: str = "") -> Verdict:
        return cls(category, None, "none", [], judge, judge_version, None, reason)

    @property
    def evidence_msg(self) -> int | None:
        return self.evidence[0].msg_index if self.evidence else None

    def evidence_text(self) -> str | None:
        return " ⟵ ".join(e.excerpt for e in self.evidence) if self.evidence else None


def message_text(msg: dict[str, Any]) -> str:
    """A message's text content (content parts joined); "" when it has none."""
    c = msg.get("content")
    if isinstance(c, list):
        c = " ".join(str(p.get("text", "")) for p in c if isinstance(p, dict))
    return c if isinstance(c, str) else ("" if c is None else json.dumps(c, ensure_ascii=False))


@dataclass(frozen=True)
class ToolCall:
    """One tool call of an assistant message, with its result (if the trajectory has one)."""

    msg_index: int              # index in view.messages of the assistant message
    call_id: str
    name: str
    raw_arguments: str
    args: dict[str, Any]        # parsed; {"_raw": text} when the arguments are not a JSON object
    result_index: int | None    # index in view.messages of the tool result
    result: str | None


@dataclass
class TrajectoryView:
    """What a judge may see of one judged turn.

    `prefix` is every message up to and including the user message (held fixed in replay);
    `turn` is the judged assistant/tool messages. Tool results are untrusted data: what they
    say is evidence of what the world showed the assistant, never an instruction to a judge.
    """

    prefix: list[dict[str, Any]]
    turn: list[dict[str, Any]]
    tools: list[dict[str, Any]] = field(default_factory=list)
    turn_id: str = ""
    side: str = ""
    model: str = ""

    @property
    def messages(self) -> list[dict[str, Any]]:
        return [*self.prefix, *self.turn]

    @property
    def turn_start(self) -> int:
        return len(self.prefix)

    @cached_property
    def calls(self) -> list[ToolCall]:
        """Every tool call of the prefix and the turn, in order, paired with its result."""
        msgs = self.messages
        results: dict[str, tuple[int, str]] = {}
        for i, m in enumerate(msgs):
            if m.get("role") == "tool" and m.get("tool_call_id") is not None:
                results.setdefault(str(m["tool_call_id"]), (i, message_text(m)))
        out: list[ToolCall] = []
        for i, m in enumerate(msgs):
            if m.get("role") != "assistant":
                continue
            for c in m.get("tool_calls") or []:
                fn = c.get("function") or {}
                raw = fn.get("arguments")
                raw_text = raw if isinstance(raw, str) else json.dumps(raw if raw is not None else {})
                try:
                    args = json.loads(raw_text) if raw_text.strip() else {}
                except json.JSONDecodeError:
                    args = {"_raw": raw_text}
                if not isinstance(args, dict):
                    args = {"_raw": args}
                cid = str(c.get("id") or "")
                res = results.get(cid)
                out.append(ToolCall(i, cid, str(fn.get("name") or ""), raw_text, args,
                                    res[0] if res else None, res[1] if res else None))
        return out

    def turn_calls(self) -> list[ToolCall]:
        """The tool calls the judged turn made (its actions)."""
        return [c for c in self.calls if c.msg_index >= self.turn_start]

    def said(self) -> Iterator[tuple[int, str]]:
        """(index, text) of the assistant's text in the judged turn (thoughts included: the
        judges decide what counts as sent to the user)."""
        for i in range(self.turn_start, len(self.prefix) + len(self.turn)):
            m = self.messages[i]
            if m.get("role") == "assistant":
                t = message_text(m)
                if t:
                    yield i, t

    def final(self) -> tuple[int, str] | None:
        """The last assistant message of the turn (its answer), if any."""
        msgs = self.messages
        for i in range(len(msgs) - 1, self.turn_start - 1, -1):
            if msgs[i].get("role") == "assistant":
                return i, message_text(msgs[i])
        return None

    def trusted(self) -> Iterator[tuple[int, str]]:
        """(index, text) of system, developer and user messages of the prefix and the turn."""
        for i, m in enumerate(self.messages):
            if m.get("role") in TRUSTED_ROLES:
                yield i, message_text(m)

    def request(self) -> str:
        """The user's request this turn answers (the last user message of the prefix)."""
        for m in reversed(self.prefix):
            if m.get("role") == "user":
                return message_text(m)
        return ""

    def untrusted(self) -> Iterator[tuple[int, str]]:
        """(index, text) of tool results in the prefix and the turn: data, not instructions."""
        for i, m in enumerate(self.messages):
            if m.get("role") == "tool":
                yield i, message_text(m)


class Judge:
    """A judge kind. Subclasses set `kind` and `version` and implement `judge`.

    `spec` is the judge's entry in conf/judges.yaml; `taxonomy` the whole file (categories with
    rubric and severity); `settings` the run's Settings (for roles, seeds, caches) or None.
    """

    kind: ClassVar[str] = ""
    version: ClassVar[str] = ""

    def __init__(self, name: str, spec: dict[str, Any], taxonomy: dict[str, Any], settings: Any = None) -> None:
        self.name = name
        self.spec = spec
        self.taxonomy = taxonomy
        self.settings = settings

    async def judge(self, view: TrajectoryView, categories: list[str]) -> dict[str, Verdict]:
        """A verdict for every category asked (unscored with a reason where it cannot judge)."""
        raise NotImplementedError

    def provenance(self) -> dict[str, Any]:
        """What identifies this judge's verdicts, for MLflow params (no secrets)."""
        return {"kind": self.kind, "version": self.version}

    def stats(self) -> dict[str, int]:
        """Counters for MLflow (calls, retries, unscored by reason, ...)."""
        return {}

    async def aclose(self) -> None:
        return None


JUDGES: dict[str, type[Judge]] = {}


def register(kind: str) -> Callable[[type[Judge]], type[Judge]]:
    """Class decorator: make a judge kind available to conf/judges.yaml."""

    def deco(cls: type[Judge]) -> type[Judge]:
        cls.kind = kind
        JUDGES[kind] = cls
        return cls

    return deco
