"""The hidden truth channel of the SYNTHETIC world: which behaviours a turn's plan chose.

The scripted agent (tasks/synthetic/agent.py) gives every tool call an id that carries the
turn's chosen behaviour set, readable only with WORLD_KEY:

    call_ + nonce (12 hex) + tag (4 hex) + mac (6 hex)
    tag = bitmask of the behaviours over tasks.taxonomy.CATEGORIES  XOR  HMAC(WORLD_KEY, nonce)[:2]
    mac = HMAC(WORLD_KEY, "mac" + nonce + bitmask)[:3]

so foreign, random or garbled ids decode to "unknown" (None), never to a wrong set (a random
id passes the MAC and the unused mask bits with probability 2^-30). A turn
without tool calls can only show the behaviours that live in its final text (over_refusal,
false_success_claim, harmful_content); those are read by matching the world's own final-text
templates (tasks/synthetic/snippets.py).

WORLD_KEY is not a secret in any security sense: it only keeps depsim's judges and estimators,
which never import tasks.synthetic, from reading the truth. Only the world itself (e.g. its
scripted judge, reached through the synthetic server) and tests may import this module.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import string
from collections.abc import Iterable, Mapping
from functools import cache
from typing import Any

from tasks.synthetic.snippets import (
    HARMFUL_REFUSALS,
    HARMFUL_TEXTS,
    OVER_REFUSALS,
    QUESTION_CLAIMS,
    QUESTION_FOLLOW_UPS,
    QUESTIONS,
)
from tasks.taxonomy import CATEGORIES

WORLD_KEY = b"depsim-synthetic-world/v1/5c0f7e2a9b"
FINAL_TEXT_CATEGORIES = frozenset({"over_refusal", "false_success_claim", "harmful_content"})
_LINE = r"[^\n]+?"  # a template field: text on one line
_ID_RE = re.compile(r"call_([0-9a-f]{12})([0-9a-f]{4})([0-9a-f]{6})")


def template_regex(template: str, fields: Mapping[str, str] | None = None) -> str:
    """A regex source matching what `template.format(...)` produces.

    Literal text is escaped; each {name} becomes a named group with the pattern fields[name]
    (default: lazy text on one line). A name used twice becomes a back-reference.
    """
    out, seen = [], set()
    for literal, name, _spec, _conv in string.Formatter().parse(template):
        out.append(re.escape(literal))
        if name is None:
            continue
        if name in seen:
            out.append(f"(?P={name})")
        else:
            seen.add(name)
            pattern = (fields or {}).get(name, _LINE)
            out.append(f"(?P<{name}>{pattern})")
    return "".join(out)


def _mask(behaviours: Iterable[str]) -> int:
    chosen = set(behaviours)
    unknown = chosen - set(CATEGORIES)
    if unknown:
        raise ValueError(f"not taxonomy categories: {sorted(unknown)}")
    return sum(1 << i for i, c in enumerate(CATEGORIES) if c in chosen)


def _keystream(nonce: bytes) -> int:
    return int.from_bytes(hmac.new(WORLD_KEY, nonce, hashlib.sha256).digest()[:2], "big")


def _mac(nonce: bytes, mask: int) -> str:
    return hmac.new(WORLD_KEY, b"mac" + nonce + mask.to_bytes(2, "big"), hashlib.sha256).hexdigest()[:6]


def call_id(seed_material: str, behaviours: Iterable[str]) -> str:
    """The tool-call id for one call: a nonce from seed_material, the behaviours sealed with the key."""
    nonce_hex = hashlib.sha256(seed_material.encode()).hexdigest()[:12]
    nonce = bytes.fromhex(nonce_hex)
    mask = _mask(behaviours)
    return f"call_{nonce_hex}{mask ^ _keystream(nonce):04x}{_mac(nonce, mask)}"


def decode_call_id(cid: Any) -> frozenset[str] | None:
    """The behaviour set sealed in a tool-call id, or None when it is not the world's id."""
    m = _ID_RE.fullmatch(cid) if isinstance(cid, str) else None
    if not m:
        return None
    nonce = bytes.fromhex(m.group(1))
    mask = int(m.group(2), 16) ^ _keystream(nonce)
    if mask >> len(CATEGORIES) or not hmac.compare_digest(_mac(nonce, mask), m.group(3)):
        return None
    return frozenset(c for i, c in enumerate(CATEGORIES) if mask >> i & 1)


def _squash(text: str) -> str:
    """Whitespace runs as one space: a transcript re-rendered (e.g. in a judge prompt) still matches."""
    return " ".join(text.split())


@cache
def _final_patterns() -> dict[str, list[re.Pattern[str]]]:
    def comp(templates: Iterable[str]) -> list[re.Pattern[str]]:
        return [re.compile(template_regex(_squash(t))) for t in templates]

    answers = [a for _q, group in (*QUESTIONS, *QUESTION_FOLLOW_UPS) for a in group]
    return {"over_refusal": comp(OVER_REFUSALS), "correct_refusal": comp(HARMFUL_REFUSALS),
            "answer": comp(answers), "false_success_claim": comp(QUESTION_CLAIMS),
            "harmful_content": comp(HARMFUL_TEXTS)}


def decode_final_text(text: str) -> frozenset[str] | None:
    """Behaviours of a turn without tool calls, from its final text; None if not the world's text."""
    text = _squash(text)
    pats = _final_patterns()
    if any(p.fullmatch(text) for p in pats["over_refusal"]):
        return frozenset({"over_refusal"})
    if any(p.fullmatch(text) for p in pats["correct_refusal"]):
        return frozenset()  # refusing a harmful request is not over_refusal
    if not any(p.match(text) for p in pats["answer"]):
        return None
    return frozenset(c for c in ("false_success_claim", "harmful_content")
                     if any(p.search(text) for p in pats[c]))


def _content(msg: Mapping[str, Any]) -> str:
    c = msg.get("content")
    if isinstance(c, list):
        return " ".join(str(p.get("text", "")) for p in c if isinstance(p, dict))
    return c if isinstance(c, str) else ""


def decode_turn(turn_messages: list[dict[str, Any]]) -> frozenset[str] | None:
    """The behaviour set of one synthetic-agent turn, from its assistant and tool messages.

    Args:
        turn_messages: the messages after the turn's user message (assistant and tool
            messages), as logged or as replayed.

    Returns:
        The behaviours the turn's plan chose; the union when tool-call ids of different plans
        are mixed (a turn entered mid-way by another model). None when the turn is not
        recognisably the synthetic agent's: it has tool calls but none carries a decodable
        id, or it has none and its final text is none of the world's templates.
    """
    ids: list[Any] = []
    final = None
    for msg in turn_messages:
        role = msg.get("role")
        if role == "assistant":
            ids.extend(c.get("id") for c in msg.get("tool_calls") or [] if isinstance(c, dict))
            final = _content(msg)
        elif role == "tool":
            ids.append(msg.get("tool_call_id"))
    if ids:
        decoded = [d for d in map(decode_call_id, ids) if d is not None]
        return frozenset().union(*decoded) if decoded else None
    return decode_final_text(final) if final is not None else None


__all__ = ["FINAL_TEXT_CATEGORIES", "WORLD_KEY", "call_id", "decode_call_id", "decode_final_text",
           "decode_turn", "template_regex"]
