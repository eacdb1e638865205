"""Normalisation of real-world log variants before the contract check (each one counted).

Production logs rarely match the OpenAI chat format exactly. These rewrites are unambiguous and
lossless; every application is counted by kind and reported, so the check's verdict and the
normalisations that made it possible are both visible:

- ``arguments_object``: tool-call ``arguments`` given as an object → JSON string;
- ``function_call_legacy``: an assistant's legacy ``function_call`` → ``tool_calls``;
- ``tool_call_id_generated``: a missing/empty call id → deterministic id from the conversation;
- ``tool_result_paired``: a tool result without ``tool_call_id`` → the pending call it answers
  (by name when given, else by position);
- ``tools_inferred``: no ``tools`` but tool calls present → schemas inferred from the calls
  (flagged in the row's ``tools_inferred`` column and in each schema's description);
- ``role:<from>``: roles such as ``agent``, ``human``, ``environment``, ``function`` mapped to the
  contract's roles;
- ``terminal_controls``: ANSI escape sequences and terminal control characters (spinners,
  colours, backspaces) stripped from *tool* output; NUL is never stripped and stays a violation.

Anything that does not have an unambiguous rewrite is left alone for the row rules to reject.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from typing import Any

ROLE_MAP = {
    "agent": "assistant", "bot": "assistant", "model": "assistant", "ai": "assistant",
    "human": "user", "customer": "user",
    "environment": "tool", "observation": "tool", "function": "tool", "ipython": "tool",
}
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b\x00]*(\x07|\x1b\\)|\x1b[()*+][0-9A-Za-z]|\x1b[@-Z\\-_]")
_TERMINAL_CONTROLS = re.compile(r"[\x01-\x08\x0b\x0c\x0e-\x1f\x7f]")
_JSON_TYPES = {str: "string", bool: "boolean", int: "integer", float: "number", list: "array",
               dict: "object", type(None): "null"}


def _clean_terminal(text: str) -> str:
    """Drop ANSI sequences and terminal controls (never NUL, which stays a violation)."""
    if "\x1b" not in text and not _TERMINAL_CONTROLS.search(text):
        return text
    return _TERMINAL_CONTROLS.sub("", _ANSI.sub("", text))


def _call_id(conversation_id: str, msg_index: int, call_index: int) -> str:
    digest = hashlib.sha256(f"{conversation_id}|{msg_index}|{call_index}".encode()).hexdigest()
    return f"call_{digest[:24]}"


def _normalise_calls(conv_id: str, i: int, msg: dict[str, Any], counts: Counter[str]) -> None:
    if msg.get("function_call") and not msg.get("tool_calls") and isinstance(msg["function_call"], dict):
        msg["tool_calls"] = [{"id": "", "type": "function", "function": msg.pop("function_call")}]
        counts["function_call_legacy"] += 1
    calls = msg.get("tool_calls")
    if not isinstance(calls, list):
        return
    for j, call in enumerate(calls):
        if not isinstance(call, dict):
            continue
        if call.get("id") in (None, ""):
            call["id"] = _call_id(conv_id, i, j)
            counts["tool_call_id_generated"] += 1
        call.setdefault("type", "function")
        fn = call.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("arguments"), dict | list):
            fn["arguments"] = json.dumps(fn["arguments"], ensure_ascii=False)
            counts["arguments_object"] += 1
        if isinstance(fn, dict) and fn.get("arguments") is None and "arguments" in fn:
            fn["arguments"] = "{}"
            counts["arguments_object"] += 1


def _infer_tools(messages: list[Any]) -> list[dict[str, Any]]:
    """One schema per called tool: observed argument names and JSON types; required = always present."""
    seen: dict[str, list[dict[str, Any]]] = {}
    for msg in messages:
        if not isinstance(msg, dict):
            continue
        for call in msg.get("tool_calls") or []:
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                continue
            try:
                args = json.loads(fn.get("arguments") or "{}")
            except (json.JSONDecodeError, TypeError, RecursionError):
                args = {}
            seen.setdefault(fn["name"], []).append(args if isinstance(args, dict) else {})
    tools = []
    for name, calls in sorted(seen.items()):
        props: dict[str, Any] = {}
        for args in calls:
            for key, value in args.items():
                kinds = props.setdefault(key, set())
                kinds.add(_JSON_TYPES.get(type(value), "string"))
        required = sorted(k for k in props if all(k in a for a in calls))
        tools.append({"type": "function", "function": {
            "name": name,
            "description": f"Schema inferred by depsim from {len(calls)} recorded call(s).",
            "parameters": {"type": "object", "required": required, "properties": {
                k: {"type": sorted(v)[0] if len(v) == 1 else sorted(v)} for k, v in sorted(props.items())}},
        }})
    return tools


def normalise_record(rec: dict[str, Any], counts: Counter[str]) -> tuple[dict[str, Any], bool]:
    """Rewrite known variants in place; returns (record, tools_inferred)."""
    messages = rec.get("messages")
    if not isinstance(messages, list):
        return rec, False
    conv_id = str(rec.get("conversation_id", ""))
    pending: list[tuple[str, str]] = []  # (call id, tool name) awaiting a result
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            continue
        role = msg.get("role")
        if isinstance(role, str) and role.lower() in ROLE_MAP and role not in ("assistant", "user", "tool"):
            msg["role"] = ROLE_MAP[role.lower()]
            counts[f"role:{role}"] += 1
            role = msg["role"]
        if role == "assistant":
            _normalise_calls(conv_id, i, msg, counts)
            pending = [(c["id"], (c.get("function") or {}).get("name", "")) for c in msg.get("tool_calls") or []
                       if isinstance(c, dict) and isinstance(c.get("id"), str)]
        elif role == "tool":
            if msg.get("tool_call_id") in (None, "") and pending:
                name = msg.get("name")
                k = next((n for n, (_cid, nm) in enumerate(pending) if name and nm == name), 0)
                msg["tool_call_id"] = pending[k][0]
                counts["tool_result_paired"] += 1
            pending = [p for p in pending if p[0] != msg.get("tool_call_id")]
            content = msg.get("content")
            if isinstance(content, str):
                cleaned = _clean_terminal(content)
                if cleaned != content:
                    msg["content"] = cleaned
                    counts["terminal_controls"] += 1
            elif isinstance(content, list):  # content parts
                changed = False
                for part in content:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        cleaned = _clean_terminal(part["text"])
                        changed |= cleaned != part["text"]
                        part["text"] = cleaned
                if changed:
                    counts["terminal_controls"] += 1
        elif role == "user":
            pending = []
    inferred = False
    if rec.get("tools") in (None, []) and any(isinstance(m, dict) and m.get("tool_calls") for m in messages):
        rec["tools"] = _infer_tools(messages)
        inferred = True
        counts["tools_inferred"] += 1
    return rec, inferred
