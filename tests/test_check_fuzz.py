"""Hostile input for the contract gate: a property-based test (hypothesis) and the CLI on unusable files.

Each hypothesis example writes one JSONL file of raw bytes that mixes valid conversations (including
the real-world variants the normaliser rewrites) with known-bad lines: wrong types for every field,
broken call/result pairing, duplicate ids, content beyond limits.max_content_chars, binary bytes,
invalid UTF-8, NUL/control characters, 10,000-level nesting, non-object JSON, empty and truncated
lines. The gate must never raise, must account for every physical line, must quarantine every bad
line under a rule named in the contract (or a GX expectation), and must pass every valid line.
Many records go into one file per example because the GX step costs ~0.3 s per call.
"""

from __future__ import annotations

import copy
import json
import re
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tasks.check import PROJECTION, check_conversations, load_contract
from tasks.check_stream import stream_check
from tasks.load import InputError, load_raw
from tasks.normalise import ROLE_MAP
from tests.conftest import run_cli, write_jsonl

WARN, FAIL = 0.01, 0.10
CONTRACT = load_contract()
ROW_RULES = set(CONTRACT["row_rules"])
ROLES = set(CONTRACT["roles"])
LIMIT = CONTRACT["limits"]["max_content_chars"]


# --- building blocks --------------------------------------------------------------------

SAFE_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=24)
WORD = st.text("abcdefghijklmnopqrstuvwxyz0123456789_", min_size=1, max_size=10)
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                   st.floats(allow_nan=False, allow_infinity=False), SAFE_TEXT)
ARGS = st.dictionaries(WORD, SCALAR | st.lists(SCALAR, max_size=3), max_size=4)
CONTROL = st.sampled_from([chr(c) for c in (*range(1, 9), 0x0B, 0x0C, *range(0x0E, 0x20))])
OFFSETS = st.sampled_from([0, 0, 60, 120, -300, 330, 765])


@st.composite
def timestamps(draw: st.DrawFn) -> str:
    dt = draw(st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2099, 12, 30), timezones=st.just(UTC)))
    if not draw(st.booleans()):
        dt = dt.replace(microsecond=0)
    offset = draw(OFFSETS)
    text = dt.astimezone(timezone(timedelta(minutes=offset))).isoformat()
    return text.replace("+00:00", "Z") if offset == 0 and draw(st.booleans()) else text


@st.composite
def valid_records(draw: st.DrawFn) -> dict[str, Any]:
    """A conversation that passes the contract, possibly after normalisation of real-world variants."""
    names = draw(st.lists(WORD, min_size=1, max_size=3, unique=True))
    args_object, drop_ids, drop_tools, ansi, legacy = (draw(st.booleans()) for _ in range(5))
    user_role = draw(st.sampled_from(["user", "human"]))
    asst_role = draw(st.sampled_from(["assistant", "agent", "model"]))
    tool_role = draw(st.sampled_from(["tool", "environment", "function"]))
    msgs: list[dict[str, Any]] = []
    if draw(st.booleans()):
        msgs.append({"role": draw(st.sampled_from(["system", "developer"])), "content": draw(SAFE_TEXT)})
    for t in range(draw(st.integers(1, 3))):
        msgs.append({"role": user_role, "content": "u" + draw(SAFE_TEXT)})
        for r in range(draw(st.integers(0, 2))):
            calls = []
            for j in range(1 if legacy else draw(st.integers(1, 3))):
                args = draw(ARGS)
                calls.append({"id": f"call-{t}-{r}-{j}", "type": "function", "function": {
                    "name": draw(st.sampled_from(names)), "arguments": args if args_object else json.dumps(args)}})
            if legacy:
                msgs.append({"role": asst_role, "content": None, "function_call": calls[0]["function"]})
            else:
                msgs.append({"role": asst_role, "content": draw(st.none() | SAFE_TEXT), "tool_calls": calls})
            for c in calls:
                out = draw(SAFE_TEXT)
                res: dict[str, Any] = {"role": tool_role, "content": f"\x1b[1;31m{out}\x1b[0m" if ansi else out,
                                       "name": c["function"]["name"]}
                if legacy:
                    res["role"] = "function"
                elif not drop_ids:
                    res["tool_call_id"] = c["id"]
                msgs.append(res)
            if drop_ids:
                for c in calls:
                    c["id"] = ""
        msgs.append({"role": asst_role, "content": "a" + draw(SAFE_TEXT)})
    rec: dict[str, Any] = {"conversation_id": "?", "model": "m" + draw(SAFE_TEXT), "created_at": draw(timestamps()),
                           "messages": msgs}
    for key in ("surface", "task_type", "language"):
        if draw(st.booleans()):
            rec[key] = draw(st.none() | SAFE_TEXT)
    if not drop_tools:
        rec["tools"] = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in names]
    if draw(st.booleans()):
        rec["labels"] = draw(st.dictionaries(WORD, st.booleans(), max_size=3))
    return rec


TEMPLATE: dict[str, Any] = {
    "conversation_id": "?", "model": "prod-model", "created_at": "2024-05-01T12:00:00Z",
    "surface": "ide", "task_type": "bugfix", "language": "en",
    "tools": [{"type": "function", "function": {"name": "shell", "parameters": {"type": "object"}}}],
    "messages": [
        {"role": "system", "content": "You are an agent."},
        {"role": "user", "content": "Run the tests."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "shell", "arguments": '{"cmd": "pytest"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "3 passed"},
        {"role": "assistant", "content": "All tests pass."},
    ],
    "labels": {"destructive_action": False},
}
SYSTEM, USER, CALL, RESULT, ANSWER = range(5)  # message positions in TEMPLATE


@dataclass
class Line:
    """One physical line of the generated file and what the gate must do with it."""

    label: str
    rule: str | None = None             # expected rule; None = any named rule (or valid)
    valid: bool = False
    rec: dict[str, Any] | None = None   # rendered as JSON with a fresh conversation_id ...
    raw: bytes | None = None            # ... or these exact bytes
    keep_id: bool = False               # the record's own conversation_id is part of the test
    cut: int | None = None              # truncate the rendered JSON to this many characters
    duplicate: bool = False             # reuse the conversation_id of line 1

    def render(self, cid: str, first_cid: str) -> bytes:
        if self.raw is not None:
            return self.raw
        assert self.rec is not None
        rec = copy.copy(self.rec)
        if self.duplicate:
            rec["conversation_id"] = first_cid
        elif not self.keep_id:
            rec["conversation_id"] = cid
        text = json.dumps(rec, ensure_ascii=False)
        return text[: self.cut].encode() if self.cut is not None else text.encode()

    def __repr__(self) -> str:  # short, so failing examples stay readable
        body = repr(self.raw[:80]) if self.raw is not None else json.dumps(self.rec, ensure_ascii=False)[:200]
        return f"Line({self.label!r}, rule={self.rule!r}, {body})"


_DELETE = object()


def mutated(label: str, rule: str | None, path: tuple[Any, ...], value: Any, keep_id: bool = False) -> Line:
    """TEMPLATE with the value at path replaced (or deleted, for _DELETE)."""
    rec = copy.deepcopy(TEMPLATE)
    target: Any = rec
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return Line(label, rule, rec=rec, keep_id=keep_id)


NON_STRING = st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(),
                       st.lists(st.integers(), max_size=2), st.dictionaries(WORD, st.integers(), max_size=2))
NON_LIST = st.one_of(st.integers(), st.booleans(), SAFE_TEXT, st.dictionaries(WORD, st.integers(), max_size=2))
NON_OBJECT = st.one_of(st.integers(), st.booleans(), SAFE_TEXT, st.lists(st.integers(), max_size=2))
# Falsy wrong types of `tools` and of call ids are treated as missing by the normaliser (see
# test_falsy_wrong_types_are_not_treated_as_missing); the property draws truthy ones.
TRUTHY_NON_LIST = st.one_of(st.integers(1, 10**9), st.just(True), SAFE_TEXT.filter(bool),
                            st.fixed_dictionaries({"a": st.integers()}))
TRUTHY_NON_STRING = st.one_of(st.integers(1, 10**9), st.floats(0.5, 1e9), st.just(True), st.just([1, "x"]),
                              st.fixed_dictionaries({"a": st.integers()}))
WRONG_TYPE = {"string": NON_STRING, "datetime": NON_STRING, "list": NON_LIST, "object": NON_OBJECT}


def wrong_field_types() -> list[st.SearchStrategy[Line]]:
    out = []
    for name, spec in CONTRACT["fields"].items():
        values = TRUTHY_NON_LIST if name == "tools" else WRONG_TYPE[spec["type"]]
        out.append(values.map(lambda v, n=name: mutated(f"wrong type {n}", "type", (n,), v, keep_id=n == "conversation_id")))
        if spec.get("required"):
            out.append(st.sampled_from([None, _DELETE]).map(
                lambda v, n=name: mutated(f"missing {n}", "required", (n,), v, keep_id=n == "conversation_id")))
    return out


def _not_a_role(value: Any) -> bool:
    return not (isinstance(value, str) and (value in ROLES or value.lower() in ROLE_MAP))


def _deep(depth: int, kind: str) -> str:
    if kind == "array":
        return "[" * depth + "]" * depth
    if kind == "object":
        return '{"a": ' * depth + "1" + "}" * depth
    return "[" * depth  # unclosed


def _with_messages(label: str, rule: str | None, msgs: list[Any]) -> Line:
    rec = copy.deepcopy(TEMPLATE)
    rec["messages"] = msgs
    return Line(label, rule, rec=rec)


M = TEMPLATE["messages"]
EXTRA_CALL = {"role": "assistant", "content": "again", "tool_calls": [
    {"id": "c1", "type": "function", "function": {"name": "shell", "arguments": "{}"}}]}
EXTRA_RESULT = {"role": "tool", "tool_call_id": "c1", "content": "ok"}
BAD_CREATED = ["yesterday", "2024-05-01", "2024-13-01T00:00:00Z", "2024-02-30T00:00:00Z", "01/05/2024 12:00",
               "", "2024-05-01T12:00:00", "2024-05-01T25:00:00Z"]

BAD_RECORDS: list[st.SearchStrategy[Line]] = [
    *wrong_field_types(),
    # values out of the declared ranges
    st.sampled_from(["", " ", "\t", 257]).map(
        lambda v: mutated("bad id", "type", ("conversation_id",), "x" * v if isinstance(v, int) else v, keep_id=True)),
    st.sampled_from(["", "  ", 257]).map(lambda v: mutated("bad model", "type", ("model",), "m" * v if isinstance(v, int) else v)),
    st.integers(129, 200).map(lambda n: mutated("long surface", "type", ("surface",), "s" * n)),
    st.sampled_from(BAD_CREATED).map(lambda v: mutated("bad created_at", "created_at_format", ("created_at",), v)),
    st.just(mutated("no messages", "type", ("messages",), [])),
    st.integers(1, 50).map(  # more than max_items (5000) messages
        lambda n: _with_messages("too many messages", "type", [M[USER], M[ANSWER]] * 2500 + [M[USER]] * n)),
    st.one_of(st.integers(), st.floats(allow_nan=False), SAFE_TEXT, st.none(), st.lists(st.booleans(), max_size=2)).map(
        lambda v: mutated("label not a boolean", "labels_bool", ("labels", "destructive_action"), v)),
    # message shapes
    st.one_of(st.integers(), st.none(), WORD).filter(_not_a_role).map(
        lambda v: mutated("bad role", "message_shape", ("messages", USER, "role"), v)),
    st.one_of(SCALAR, st.lists(SCALAR, max_size=2)).map(
        lambda v: mutated("message not an object", "message_shape", ("messages", USER), v)),
    st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.dictionaries(WORD, st.integers(), max_size=2)).map(
        lambda v: mutated("content wrong type", "type", ("messages", USER, "content"), v)),
    TRUTHY_NON_LIST.map(lambda v: mutated("tool_calls not a list", None, ("messages", CALL, "tool_calls"), v)),
    st.one_of(SCALAR, st.lists(SCALAR, max_size=2)).map(
        lambda v: mutated("call not an object", "message_shape", ("messages", CALL, "tool_calls", 0), v)),
    st.one_of(SCALAR, st.lists(SCALAR, max_size=2)).map(
        lambda v: mutated("function not an object", "message_shape", ("messages", CALL, "tool_calls", 0, "function"), v)),
    st.one_of(st.integers(), st.none(), st.booleans(), st.lists(st.integers(), max_size=2)).map(
        lambda v: mutated("function name not a string", "message_shape",
                          ("messages", CALL, "tool_calls", 0, "function", "name"), v)),
    TRUTHY_NON_STRING.map(lambda v: mutated("call id not a string", "message_shape", ("messages", CALL, "tool_calls", 0, "id"), v)),
    st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans()).map(
        lambda v: mutated("arguments wrong type", "arguments_json", ("messages", CALL, "tool_calls", 0, "function", "arguments"), v)),
    st.sampled_from(["not json", "{cmd: ls", "[1, 2]", "1", '"ls"', "null", "{", "deep"]).map(
        lambda v: _deep(10_000, "object") if v == "deep" else v).map(
        lambda v: mutated("arguments not a JSON object", "arguments_json",
                          ("messages", CALL, "tool_calls", 0, "function", "arguments"), v)),
    TRUTHY_NON_STRING.map(lambda v: mutated("tool_call_id wrong type", None, ("messages", RESULT, "tool_call_id"), v)),
    # pairing and order
    WORD.map(lambda v: mutated("result answers no call", "tool_result_paired", ("messages", RESULT, "tool_call_id"), "x-" + v)),
    st.just(_with_messages("call unanswered", "tool_call_answered", [M[USER], M[CALL], M[ANSWER]])),
    st.just(_with_messages("result twice", "tool_result_paired", [M[USER], M[CALL], M[RESULT], M[RESULT], M[ANSWER]])),
    st.just(_with_messages("tool before user", "role_order", [M[RESULT], M[USER], M[ANSWER]])),
    st.just(_with_messages("assistant before user", "role_order", [M[SYSTEM], M[ANSWER], M[USER], M[ANSWER]])),
    st.just(_with_messages("no user", "has_user_message", [M[SYSTEM]])),
    st.just(_with_messages("duplicate call id", "tool_call_id_unique", [*M, EXTRA_CALL, EXTRA_RESULT, M[ANSWER]])),
    # size and control characters
    st.tuples(st.sampled_from([SYSTEM, USER, RESULT, ANSWER]), st.integers(1, 500)).map(
        lambda a: mutated("content too long", "content_size", ("messages", a[0], "content"), "x" * (LIMIT + a[1]))),
    st.integers(1, 500).map(lambda n: mutated("content parts too long", "content_size", ("messages", USER, "content"),
                                              [{"type": "text", "text": "y" * (LIMIT // 2)}, {"type": "text", "text": "y" * (LIMIT // 2 + n)}])),
    st.tuples(st.sampled_from([SYSTEM, USER, RESULT, ANSWER]), SAFE_TEXT, SAFE_TEXT).map(
        lambda a: mutated("NUL in content", "control_chars", ("messages", a[0], "content"), f"{a[1]}\x00{a[2]}")),
    st.tuples(st.sampled_from([SYSTEM, USER, ANSWER]), CONTROL, SAFE_TEXT).map(
        lambda a: mutated("control char outside tool output", "control_chars", ("messages", a[0], "content"),
                          f"{a[2]}{a[1]}x")),
    SAFE_TEXT.map(lambda v: mutated("NUL in content parts", "control_chars", ("messages", RESULT, "content"),
                                    [{"type": "text", "text": v}, {"type": "text", "text": "\x00"}])),
    st.integers(100, 3000).map(lambda d: Line("deep labels", None, raw=(
        json.dumps({**TEMPLATE, "conversation_id": "deep"})[:-1] + ', "labels": {"k": ' + _deep(d, "array") + "}}").encode())),
]

RAW_LINES: list[st.SearchStrategy[Line]] = [
    st.binary(min_size=1, max_size=300).map(lambda b: b.replace(b"\n", b"")).filter(bool).map(
        lambda b: Line("binary bytes", None, raw=b)),
    st.tuples(st.sampled_from([b"\xff", b"\xc0\x80", b"\x80", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xe2\x82"]),
              st.booleans()).map(lambda a: Line("invalid UTF-8", "json_parse", raw=(
                  b'{"conversation_id": "utf8", "model": "m' + a[0] + b'"}' if a[1] else a[0] + b"{}"))),
    st.just(Line("raw NUL byte", "json_parse", raw=json.dumps(TEMPLATE).replace("Run the tests.", "Run\x00").encode())),
    st.tuples(st.integers(10_000, 20_000), st.sampled_from(["array", "object", "unclosed"])).map(
        lambda a: Line(f"nested {a[1]} x{a[0]}", "json_parse", raw=_deep(*a).encode())),
    st.integers(10_000, 12_000).map(lambda d: Line("nested messages", "json_parse", raw=(
        '{"conversation_id": "deep", "model": "m", "created_at": "2024-05-01T12:00:00Z", "messages": '
        + _deep(d, "array") + "}").encode())),
    st.one_of(SCALAR, st.lists(SCALAR, max_size=3), st.just(float("nan"))).map(
        lambda v: Line("non-object JSON", "json_parse", raw=json.dumps(v).encode())),
    st.sampled_from([b"", b" ", b"\t", b"\r", b"  \t \r"]).map(lambda b: Line("empty line", "json_parse", raw=b)),
    st.floats(0.0, 0.999).map(lambda f: Line("truncated", "json_parse", rec=copy.deepcopy(TEMPLATE),
                                             cut=max(1, int(f * len(json.dumps(TEMPLATE)))))),
    st.just(Line("duplicate conversation_id", "unique_id", rec=copy.deepcopy(TEMPLATE), duplicate=True)),
]

# Real model behaviour (a flag rule of the contract) is kept, not quarantined.
_flagged_lines = st.one_of(
    st.sampled_from([None, "", "   ", []]).map(lambda v: Line("empty assistant (flagged, kept)", valid=True, rec={
        **copy.deepcopy(TEMPLATE), "messages": [M[USER], {"role": "assistant", "content": v}]})),
    WORD.map(lambda v: Line("made-up tool (flagged, kept)", valid=True, rec=mutated(
        "", None, ("messages", CALL, "tool_calls", 0, "function", "name"), "x_" + v).rec)))
valid_lines = st.one_of(valid_records().map(lambda r: Line("valid", valid=True, rec=r)), _flagged_lines)


@settings(max_examples=60, deadline=None, database=None,
          phases=[Phase.explicit, Phase.generate],  # each call costs ~0.3 s (GX): report, don't shrink
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(first=valid_records(), bad=st.tuples(*BAD_RECORDS, *RAW_LINES), more=st.lists(valid_lines, max_size=8),
       order=st.randoms())
def test_gate_accounts_for_every_line_and_quarantines_every_bad_one(first: dict[str, Any], bad: tuple[Line, ...],
                                                                    more: list[Line], order: Any) -> None:
    """Every example holds one line of each bad kind (values drawn by hypothesis) and 1-9 valid lines,
    shuffled. Line 1 is valid: a file whose first non-blank byte is not "{" and that has a NUL in its
    first 4 KiB is refused whole as binary by the loader (covered by the CLI tests below)."""
    rest = [*bad, *more]
    order.shuffle(rest)
    lines = [Line("valid", valid=True, rec=first), *rest]
    first_cid = "ok-1"
    blobs = [line.render(f"{'ok' if line.valid else 'bad'}-{n}", first_cid) for n, line in enumerate(lines, start=1)]
    assert not any(b"\n" in b for b in blobs)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.jsonl"
        path.write_bytes(b"\n".join(blobs) + b"\n")
        result = check_conversations(load_raw(str(path)), CONTRACT, WARN, FAIL)
        streamed = stream_check(str(path), CONTRACT, WARN, FAIL, workers=1, batch_lines=4)
    # `depsim check` (each line parsed once, in batches) decides exactly as the flow's check does
    assert streamed.summary() == result.summary()
    assert streamed.quarantine.to_dicts() == result.quarantine.to_dicts()
    assert streamed.flagged == result.flagged
    assert streamed.valid.to_dicts() == result.valid.select(PROJECTION).to_dicts()

    assert result.verdict in ("passed", "warning", "failed")  # never "error": no engine failure
    assert result.rows_in == len(lines) == result.rows_passed + result.rows_quarantined
    assert sum(result.by_rule.values()) == result.rows_quarantined
    q = {row["source_line"]: row for row in result.quarantine.iter_rows(named=True)}
    assert len(q) == result.rows_quarantined  # no line quarantined twice
    passed = result.valid["source_line"].to_list()
    assert not set(passed) & set(q)
    assert set(passed) | set(q) == set(range(1, len(lines) + 1))
    assert set(result.quarantine["source_file"]) <= {str(path)}
    for n, line in enumerate(lines, start=1):
        if line.valid:
            assert n in passed, (line, q.get(n))
            continue
        assert n in q, f"bad line {n} passed: {line}"
        row = q[n]
        assert row["rule"] in ROW_RULES or row["rule"].startswith("gx:"), row
        assert row["reason"]
        if line.rule is not None:
            assert row["rule"] == line.rule, (line, row["reason"])
    valid_ids = result.valid.filter(pl.col("source_line").is_in([n for n, ln in enumerate(lines, 1) if ln.valid]))
    assert valid_ids["conversation_id"].to_list() == [f"ok-{n}" for n, ln in enumerate(lines, 1) if ln.valid]
    result.summary()  # renders


# --- known bugs: hostile input that still breaks the gate --------------------------------

def _check_file(tmp_path: Path, lines: list[str]) -> Any:
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    result = check_conversations(load_raw(str(path)), CONTRACT, WARN, FAIL)
    assert result.rows_in == len(lines) == result.rows_passed + result.rows_quarantined
    return result


def _good(cid: str) -> str:
    return json.dumps({**TEMPLATE, "conversation_id": cid})


@pytest.mark.parametrize("where", ["content", "conversation_id", "id of a quarantined row"])
def test_lone_surrogate_escape_is_quarantined(tmp_path: Path, where: str) -> None:
    rec = copy.deepcopy(TEMPLATE)
    if where == "content":
        rec["conversation_id"] = "surrogate"
        rec["messages"][USER]["content"] = "bad \udc00 text"
    else:
        rec["conversation_id"] = "sur\ud800"
        if where != "conversation_id":
            del rec["model"]
    result = _check_file(tmp_path, [_good("ok"), json.dumps(rec)])
    assert result.valid["conversation_id"].to_list() == ["ok"]
    assert result.quarantine.height == 1 and result.quarantine["rule"][0] in ROW_RULES


def test_huge_integer_literal_is_quarantined(tmp_path: Path) -> None:
    result = _check_file(tmp_path, [_good("ok"), '{"conversation_id": "big", "n": ' + "9" * 5000 + "}"])
    assert result.valid["conversation_id"].to_list() == ["ok"]
    assert result.quarantine["rule"].to_list() == ["json_parse"]


@pytest.mark.parametrize("changes", [
    {("tools",): 0},
    {("tools",): False},
    {("messages", RESULT, "tool_call_id"): 0},
    {("messages", CALL, "tool_calls", 0, "id"): 0, ("messages", RESULT, "tool_call_id"): 0},
], ids=["tools=0", "tools=false", "tool_call_id=0", "numeric ids 0"])
def test_falsy_wrong_types_are_not_treated_as_missing(tmp_path: Path, changes: dict[tuple[Any, ...], Any]) -> None:
    rec = copy.deepcopy(TEMPLATE)
    rec["conversation_id"] = "falsy"
    for path, value in changes.items():
        target: Any = rec
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    result = _check_file(tmp_path, [_good("ok"), json.dumps(rec)])
    assert result.valid["conversation_id"].to_list() == ["ok"]
    assert result.quarantine["rule"][0] in ROW_RULES


# --- the CLI on files that are not JSONL at all ------------------------------------------

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00\x00\x00\x01\x00\x08\x06\x00\x00\x00" + bytes(range(256)) * 8
UNUSABLE = {
    "image.jsonl": (PNG, "binary"),
    "archive.jsonl": (b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(range(256)) * 4, "binary"),
    "empty.jsonl": (b"", "empty"),
    "blank.jsonl": (b"\n  \n\t\n", "empty"),
}


def _assert_one_line_error(proc: Any, path: Path, as_json: bool, word: str) -> None:
    assert proc.returncode == 4, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    if as_json:
        out = proc.stdout.strip().splitlines()
        assert len(out) == 1, proc.stdout
        error = json.loads(out[0])["error"]
    else:
        err = proc.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), proc.stderr
        error = err[0]
    assert str(path) in error and word in error, error


@pytest.mark.parametrize("name,as_json", [(name, True) for name in UNUSABLE] + [("image.jsonl", False), ("empty.jsonl", False)],
                         ids=[*(f"{n}-json" for n in UNUSABLE), "image.jsonl-text", "empty.jsonl-text"])
def test_cli_check_on_unusable_file_is_a_one_line_error(tmp_path: Path, name: str, as_json: bool) -> None:
    body, word = UNUSABLE[name]
    path = tmp_path / name
    path.write_bytes(body)
    proc = run_cli(["check", "--data", str(path), *(["--json"] if as_json else [])], cwd=tmp_path, timeout=120)
    _assert_one_line_error(proc, path, as_json, word)


def test_binary_file_without_nul_is_refused_as_not_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "noise.jsonl"
    path.write_bytes(bytes(range(0x80, 0x100)) * 16 + b"\n" + bytes(range(0xFF, 0x7F, -1)) * 16 + b"\n")
    with pytest.raises(InputError, match=re.escape(str(path))):
        load_raw(str(path))


def test_cli_check_survives_a_huge_integer_literal(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "big.jsonl", [_good("ok"), '{"n": ' + "9" * 5000 + "}"])
    proc = run_cli(["check", "--data", str(path), "--json"], cwd=tmp_path, timeout=300)
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 4  # 1 bad row of 2: the check fails, as a verdict
    out = json.loads(proc.stdout)
    assert (out["rows_in"], out["rows_passed"], out["by_rule"]) == (2, 1, {"json_parse": 1})
