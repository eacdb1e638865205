"""The `llm` judge (DESIGN §1): an LLM reads the transcript and a rubric per category.

One request per trajectory and category group (conf/judges.yaml `judges.llm.groups`; asked
categories in no group form one more group), `judge.llm_samples` samples each (sample j sends
seed + j), majority vote per category. The prompt and the transcript it shows are built in
tasks/judges/llm_prompt.py; the answer is constrained by a JSON schema and parsed strictly
here. A sample that cannot be used is unscored with its reason (`judge_malformed`,
`judge_refused`, `judge_unavailable`); a category with no scored sample, or a tied vote, is
unscored with the reasons: never false.
"""


import asyncio
import contextvars
import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tasks.cache import ModelCache
from tasks.config import ConfigError, Endpoint
from tasks.judges.base import (
    SEVERITIES,
    Evidence,
    Judge,
    TrajectoryView,
    Verdict,
    register,
)
from tasks.judges.llm_prompt import (
    Window,
    digest,
    load_prompt,
    render_categories,
    render_tools,
    windows,
)
from tasks.models import ChatModel, ChatResult, ModelCallError
from tasks.simulator_llm import trim

_SAMPLE_SEED: contextvars.ContextVar[int | None] = contextvars.ContextVar("depsim_judge_sample_seed", default=None)
SCHEMA_NAME = "judge_verdicts"
_CODE_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.S)

# --- the answer --------------------------------------------------------------------------------

def answer_schema(categories: list[str], scale: list[str], answer: str = "per_category") -> dict[str, Any]:
    """The JSON schema of an answer for a category group (OpenAI strict-mode rules)."""
    if answer == "flags":
        return {"type": "object", "properties": {c: {"type": "boolean"} for c in categories},
                "required": list(categories), "additionalProperties": False}
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
                 n_messages: int, answer: str = "per_category") -> dict[str, Vote]:
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
        if answer == "flags":
            return _flag_votes(value, categories, severities)
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


def _flag_votes(value: Any, categories: list[str], severities: dict[str, str]) -> dict[str, Vote]:
    """Votes from a `flags` answer ({category: violated}); a category without a boolean is
    unscored, the others stand."""
    if not isinstance(value, dict):
        return {c: Vote(None, reason="judge_malformed: not an object of category flags") for c in categories}
    out: dict[str, Vote] = {}
    for c in categories:
        flag = value.get(c)
        if not isinstance(flag, bool):
            out[c] = Vote(None, reason=f"judge_malformed: no true/false for {c}")
        else:
            out[c] = Vote(True, severities.get(c, "medium")) if flag else Vote(False)
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
                     max_tokens: int, response_format: dict[str, Any] | None = None,
                     tool_choice: str | None = None) -> dict[str, Any]:
        body = super().request_body(messages, tools, max_tokens, response_format, tool_choice)
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
        chosen = getattr(settings.judge, "prompt", None) if settings is not None else None
        self.prompt = load_prompt(str(chosen or spec.get("prompt", "judge_prompt.yaml")))
        self.scale = [str(s) for s in taxonomy.get("severity_scale") or SEVERITIES]
        self.groups = {str(g): [str(c) for c in cats] for g, cats in (spec.get("groups") or {}).items()}
        cats = taxonomy["categories"]
        self.prompt_hash = digest({"prompt": self.prompt.digest, "scale": self.scale, "groups": self.groups,
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
        schema = answer_schema(categories, self.scale, self.prompt.answer)
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
                             len(view.messages), self.prompt.answer)
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
