"""Data tests for the contract check (tasks/check.py) and the loader (tasks/load.py).

Each row rule of data_contracts/conversation.yaml gets one bad record in a small JSONL file; the
quarantine must name the rule, the file and the line, and no row may be lost.
"""

from __future__ import annotations

import copy
import gzip
import json
import re
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tasks.check import CheckResult, check_conversations, load_contract
from tasks.load import InputError, load_raw, resolve_sources
from tasks.records import CONVERSATION_SCHEMA, QUARANTINE_SCHEMA, RAW_SCHEMA

WARN, FAIL = 0.01, 0.10


@pytest.fixture(scope="module")
def contract() -> dict[str, Any]:
    return load_contract()


def conv(cid: str = "conv-1", **overrides: Any) -> dict[str, Any]:
    """A minimal valid conversation in the contract, with a tool round-trip."""
    rec: dict[str, Any] = {
        "conversation_id": cid, "model": "prod-model", "created_at": "2024-05-01T12:00:00Z",
        "surface": "ide", "task_type": "bugfix", "language": "python",
        "tools": [{"type": "function", "function": {"name": "shell", "parameters": {"type": "object"}}}],
        "messages": [
            {"role": "system", "content": "You are a coding agent."},
            {"role": "user", "content": "Run the tests."},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "shell", "arguments": '{"command": "pytest"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "3 passed"},
            {"role": "assistant", "content": "All 3 tests pass."},
        ],
        "labels": {"destructive_action": False},
    }
    rec.update(overrides)
    return rec


def with_messages(cid: str, *messages: Any, **overrides: Any) -> dict[str, Any]:
    return conv(cid, messages=list(messages), **overrides)


USER = {"role": "user", "content": "hi"}
ANSWER = {"role": "assistant", "content": "hello"}


def tc(cid: str, name: str = "shell", args: Any = "{}") -> dict[str, Any]:
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}


def asst_call(*calls: dict[str, Any]) -> dict[str, Any]:
    return {"role": "assistant", "content": "", "tool_calls": list(calls)}


def tool(cid: str, content: str = "ok") -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": cid, "content": content}


def _without(rec: dict[str, Any], key: str) -> dict[str, Any]:
    out = copy.deepcopy(rec)
    del out[key]
    return out


# rule -> (JSONL line text, expected field, expected conversation_id in quarantine)
BAD: dict[str, tuple[str, str, str | None]] = {
    "json_parse": ('{"conversation_id": "bad-json", "model": ', "", None),
    "required": (json.dumps(_without(conv("bad-required"), "model")), "model", "bad-required"),
    "type": (json.dumps(conv("bad-type", model=42)), "model", "bad-type"),
    "created_at_format": (json.dumps(conv("bad-created", created_at="01/05/2024 12:00")), "created_at", "bad-created"),
    "message_shape": (json.dumps(with_messages("bad-shape", USER, {"role": "robot", "content": "beep"})),
                      "messages[1]", "bad-shape"),
    "has_user_message": (json.dumps(with_messages("bad-nouser", {"role": "system", "content": "s"})),
                         "messages", "bad-nouser"),
    "role_order": (json.dumps(with_messages("bad-order", ANSWER, USER, ANSWER)), "messages[0]", "bad-order"),
    "tool_result_paired": (json.dumps(with_messages("bad-paired", USER, ANSWER, tool("call_x"))),
                           "messages[2]", "bad-paired"),
    "tool_call_answered": (json.dumps(with_messages("bad-answered", USER, asst_call(tc("call_1")), USER, ANSWER)),
                           "messages[2]", "bad-answered"),
    "tool_call_id_unique": (json.dumps(with_messages("bad-dupcall", USER, asst_call(tc("call_1")), tool("call_1"),
                                                     asst_call(tc("call_1")), tool("call_1"), ANSWER)),
                            "messages[3].tool_calls[0].id", "bad-dupcall"),
    "arguments_json": (json.dumps(with_messages("bad-args", USER, asst_call(tc("call_1", args="{command: ls")),
                                                tool("call_1"), ANSWER)),
                       "messages[1].tool_calls[0].function.arguments", "bad-args"),
    "content_size": (json.dumps(with_messages("bad-size", {"role": "user", "content": "x" * 200_001}, ANSWER)),
                     "messages[0].content", "bad-size"),
    "control_chars": (json.dumps(with_messages("bad-control", {"role": "user", "content": "a\x00b"}, ANSWER)),
                      "messages[0].content", "bad-control"),
    "labels_bool": (json.dumps(conv("bad-labels", labels={"destructive_action": "yes"})),
                    "labels.destructive_action", "bad-labels"),
    "unique_id": (json.dumps(conv("good-1")), "conversation_id", "good-1"),
    # json.dumps escapes the lone surrogate as \ud800: valid JSON, not valid Unicode text
    "text_encoding": (json.dumps(with_messages("bad-surrogate", {"role": "user", "content": "a\ud800b"}, ANSWER)),
                      "", "bad-surrogate"),
}
GOOD = [conv("good-1"), conv("good-2", tools=[], labels=None, surface=None),
        with_messages("good-3", USER, {"role": "assistant", "content": [{"type": "text", "text": "parts"}]})]


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory, contract: dict[str, Any]) -> tuple[CheckResult, str, dict[str, int]]:
    """One file: the good records first, then one bad record per rule; checked once for the module."""
    path = tmp_path_factory.mktemp("logs") / "mixed.jsonl"
    lines = [json.dumps(r) for r in GOOD]
    line_of: dict[str, int] = {}
    for rule, (text, _field, _cid) in BAD.items():
        lines.append(text)
        line_of[rule] = len(lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    raw = load_raw(str(path))
    return check_conversations(raw, contract, WARN, FAIL), str(path), line_of


def test_every_contract_row_rule_is_covered(contract: dict[str, Any]) -> None:
    assert set(BAD) == set(contract["row_rules"])


@pytest.mark.parametrize("rule", list(BAD))
def test_bad_record_is_quarantined_with_rule_file_and_line(checked: tuple[CheckResult, str, dict[str, int]],
                                                            rule: str) -> None:
    result, path, line_of = checked
    rows = result.quarantine.filter(pl.col("source_line") == line_of[rule]).to_dicts()
    assert len(rows) == 1, rows
    row = rows[0]
    text, field, cid = BAD[rule]
    assert row["rule"] == rule, row["reason"]
    assert row["source_file"] == path
    assert row["field"] == field
    assert row["conversation_id"] == cid
    assert row["reason"]
    if rule != "json_parse":  # an unparseable line has no record text, only its file and line
        assert row["record"] == text[:2000]  # the offending line, capped


def test_mixed_file_accounting(checked: tuple[CheckResult, str, dict[str, int]], contract: dict[str, Any]) -> None:
    result, _path, _ = checked
    assert result.rows_in == len(GOOD) + len(BAD)
    assert result.rows_in == result.rows_passed + result.rows_quarantined
    assert result.valid["conversation_id"].to_list() == ["good-1", "good-2", "good-3"]
    assert result.valid["source_line"].to_list() == [1, 2, 3]
    assert result.by_rule == {rule: 1 for rule in BAD}
    assert result.summary()["rows_quarantined"] == len(BAD)
    assert dict(result.quarantine.schema) == QUARANTINE_SCHEMA
    assert dict(result.valid.schema) == CONVERSATION_SCHEMA
    rule_checks = {c["check"]: c["verdict"] for c in result.checks if c["engine"] == "depsim"}
    assert rule_checks == {**{f"row_rule:{r}": "failed" for r in contract["row_rules"]},
                           **{f"flag_rule:{r}": "passed" for r in contract["flag_rules"]}}
    assert any(c["engine"] == "great_expectations" for c in result.checks)
    assert result.gx_result is not None
    assert result.verdict == "failed"  # 17 bad rows of 20


def test_unique_id_reason_points_at_the_first_occurrence(checked: tuple[CheckResult, str, dict[str, int]]) -> None:
    result, path, _line_of = checked
    row = result.quarantine.filter(pl.col("rule") == "unique_id").row(0, named=True)
    assert f"{path}:1" in row["reason"]


def test_valid_row_is_typed(checked: tuple[CheckResult, str, dict[str, int]]) -> None:
    result, _, _ = checked
    row = result.valid.row(0, named=True)
    assert row["created_at"].isoformat() == "2024-05-01T12:00:00+00:00"
    assert row["n_messages"] == 5
    assert json.loads(row["messages"]) == conv("good-1")["messages"]
    assert json.loads(row["labels"]) == {"destructive_action": False}
    second = result.valid.row(1, named=True)
    assert (json.loads(second["labels"]), second["surface"]) == ({}, None)
    # No `tools` but a tool call: schemas are inferred from the calls and flagged (issue 4).
    assert second["tools_inferred"] is True and not row["tools_inferred"]
    assert [t["function"]["name"] for t in json.loads(second["tools"])] == ["shell"]


def raw_frame(records: list[dict[str, Any] | None], source: str = "mem.jsonl") -> pl.DataFrame:
    """RAW_SCHEMA rows; None stands for an unreadable line."""
    return pl.DataFrame([{"source_file": source, "source_line": i, "record": json.dumps(r) if r else None,
                          "parse_error": None if r else "invalid JSON"} for i, r in enumerate(records, start=1)],
                        schema=RAW_SCHEMA)


def run_check(records: list[dict[str, Any] | None], contract: dict[str, Any]) -> CheckResult:
    result = check_conversations(raw_frame(records), contract, WARN, FAIL)
    assert result.rows_in == len(records) == result.rows_passed + result.rows_quarantined
    return result


def test_trailing_unanswered_tool_calls_are_allowed(contract: dict[str, Any]) -> None:
    trailing = with_messages("t1", USER, {"role": "assistant", "content": "Finishing.",
                                          "tool_calls": [tc("call_1"), tc("call_2")]})
    half = with_messages("t2", USER, asst_call(tc("call_1"), tc("call_2")), tool("call_2"))
    result = run_check([trailing, half], contract)
    assert result.rows_quarantined == 0 and result.verdict == "passed"


def test_unanswered_call_before_next_assistant_is_rejected(contract: dict[str, Any]) -> None:
    rec = with_messages("t3", USER, asst_call(tc("call_1")), ANSWER)
    result = run_check([rec, conv("ok")], contract)
    assert result.quarantine.row(0, named=True)["rule"] == "tool_call_answered"


MORE_CASES: list[tuple[dict[str, Any], str]] = [
    (conv("x", created_at="2024-02-30T00:00:00Z"), "created_at_format"),  # shape ok, date impossible
    (conv("x", messages=[]), "type"),
    (conv("x", messages="hello"), "type"),
    (conv("x", conversation_id=" "), "type"),
    (conv("x", tools=[{"type": "function"}]), "type"),
    (with_messages("x", {"role": "user", "content": {"text": "hi"}}, ANSWER), "type"),
    # (arguments given as an object are normalised to a JSON string: see tests/test_normalise.py)
    (with_messages("x", USER, asst_call(tc("call_1", args=42)), tool("call_1"), ANSWER), "arguments_json"),
    (with_messages("x", USER, asst_call(tc("call_1", args="[1, 2]")), tool("call_1"), ANSWER), "arguments_json"),
    # (a missing call id is generated by the normaliser; a call without a function name is not repairable)
    (with_messages("x", USER, {"role": "assistant", "content": "x", "tool_calls": [{"id": "c1", "function": {"arguments": "{}"}}]}),
     "message_shape"),
    (with_messages("x", {"role": "tool", "tool_call_id": "a", "content": "x"}, USER, ANSWER), "role_order"),
    (with_messages("x", "not a message", USER), "message_shape"),
]


@pytest.fixture(scope="module")
def more_checked(contract: dict[str, Any]) -> CheckResult:
    """All MORE_CASES in one frame (record k on line k+1), checked once."""
    return run_check([rec for rec, _ in MORE_CASES], contract)


@pytest.mark.parametrize("case", range(len(MORE_CASES)), ids=[f"{k}-{r}" for k, (_, r) in enumerate(MORE_CASES)])
def test_more_row_rule_cases(case: int, more_checked: CheckResult) -> None:
    rows = more_checked.quarantine.filter(pl.col("source_line") == case + 1)
    assert rows["rule"].to_list() == [MORE_CASES[case][1]]


FLAGGED: dict[str, tuple[dict[str, Any], str]] = {
    "tool_declared": (with_messages("made-up-tool", USER, asst_call(tc("call_1", name="rm_everything")), tool("call_1"),
                                    ANSWER), "messages[1].tool_calls[0].function.name"),
    "empty_assistant": (with_messages("empty-reply", USER, {"role": "assistant", "content": "  "}), "messages[1]"),
}


def test_every_flag_rule_is_covered(contract: dict[str, Any]) -> None:
    assert set(FLAGGED) == set(contract["flag_rules"])
    assert not set(FLAGGED) & set(contract["row_rules"])


def test_real_model_behaviour_is_flagged_not_quarantined(contract: dict[str, Any]) -> None:
    """A made-up tool call and an empty reply are what a model did: kept, counted, located."""
    recs = [rec for rec, _ in FLAGGED.values()] + [conv("plain")]
    res = run_check(recs, contract)
    assert (res.rows_passed, res.rows_quarantined, res.verdict) == (3, 0, "passed")
    got = {(f["rule"], f["source_line"], f["field"], f["conversation_id"]) for f in res.flagged}
    assert got == {(rule, k + 1, fld, rec["conversation_id"]) for k, (rule, (rec, fld)) in enumerate(FLAGGED.items())}
    assert all(f["reason"] and f["source_file"].endswith(".jsonl") for f in res.flagged)
    assert res.summary()["flagged"] == {"empty_assistant": 1, "tool_declared": 1}
    checks = {c["check"]: c for c in res.checks if c["check"].startswith("flag_rule:")}
    assert {k: (c["verdict"], c["flagged"]) for k, c in checks.items()} == {
        "flag_rule:tool_declared": ("passed", 1), "flag_rule:empty_assistant": ("passed", 1)}


def test_undeclared_tool_is_fine_when_no_tools_are_declared(contract: dict[str, Any]) -> None:
    rec = with_messages("x", USER, asst_call(tc("call_1", name="anything")), tool("call_1"), ANSWER, tools=[])
    assert run_check([rec], contract).rows_passed == 1


def test_non_utc_offset_is_converted_to_utc(contract: dict[str, Any]) -> None:
    result = run_check([conv("x", created_at="2024-05-01T14:00:00+02:00")], contract)
    assert result.valid.row(0, named=True)["created_at"].isoformat() == "2024-05-01T12:00:00+00:00"


def test_synthetic_logs_pass_the_contract(tmp_path: Path, contract: dict[str, Any]) -> None:
    from tasks.synthetic.logs import generate

    path = tmp_path / "synthetic.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        for rec in generate(25, "synthetic-agent-v2", 5):
            rec.pop("_truth")
            fh.write(json.dumps(rec) + "\n")
    result = check_conversations(load_raw(str(path)), contract, WARN, FAIL)
    assert (result.rows_in, result.rows_passed, result.rows_quarantined) == (25, 25, 0)
    assert result.verdict == "passed"


# --- verdict thresholds -----------------------------------------------------------------

@pytest.mark.parametrize("n_good,n_bad,verdict", [
    (20, 0, "passed"),
    (199, 1, "passed"),    # 0.5% bad: under the warning share
    (19, 1, "warning"),    # 5%
    (18, 2, "warning"),    # 10%: at the failure share, not past it
    (17, 3, "failed"),     # 15%
    (0, 3, "failed"),      # nothing valid
    (0, 0, "failed"),      # nothing at all
])
def test_verdict_thresholds(n_good: int, n_bad: int, verdict: str, contract: dict[str, Any]) -> None:
    records: list[dict[str, Any] | None] = [conv(f"c{k}") for k in range(n_good)] + [None] * n_bad
    result = run_check(records, contract)
    assert result.rows_quarantined == n_bad
    assert result.verdict == verdict
    if n_bad:
        assert set(result.quarantine["rule"]) == {"json_parse"}


# --- load -------------------------------------------------------------------------------

def test_load_empty_file_raises_with_name(tmp_path: Path) -> None:
    for name, body in (("empty.jsonl", b""), ("blank.jsonl", b"\n  \n")):
        path = tmp_path / name
        path.write_bytes(body)
        with pytest.raises(InputError, match=re.escape(name)):
            load_raw(str(path))


def test_load_binary_file_raises_with_name(tmp_path: Path) -> None:
    path = tmp_path / "image.jsonl"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00" + bytes(range(256)))
    with pytest.raises(InputError, match=re.escape("image.jsonl")):
        load_raw(str(path))


def test_load_gzip_and_bad_gzip(tmp_path: Path) -> None:
    good = tmp_path / "logs.jsonl.gz"
    good.write_bytes(gzip.compress((json.dumps(conv("g")) + "\n").encode()))
    raw = load_raw(str(good))
    assert raw.height == 1 and json.loads(raw["record"][0])["conversation_id"] == "g"
    bad = tmp_path / "fake.jsonl.gz"
    bad.write_bytes(b'{"not": "gzip"}\n')
    with pytest.raises(InputError, match=re.escape("fake.jsonl.gz")):
        load_raw(str(bad))


def test_load_missing_path_raises(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=re.escape("nowhere.jsonl")):
        load_raw(str(tmp_path / "nowhere.jsonl"))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("x")
    with pytest.raises(InputError, match=re.escape("no .jsonl")):
        load_raw(str(tmp_path / "docs"))


def test_load_lines_keep_file_and_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "lines.jsonl"
    path.write_bytes(b"\n".join([json.dumps(conv("a")).encode(), b"", b"[1, 2]", b"{oops", b"\xff\xfe{}",
                                 json.dumps(conv("b")).encode()]) + b"\n")
    raw = load_raw(str(path))
    assert raw.schema == pl.Schema(RAW_SCHEMA)
    assert raw["source_line"].to_list() == [1, 2, 3, 4, 5, 6]
    assert set(raw["source_file"]) == {str(path)}
    errors = raw["parse_error"].to_list()
    assert errors[0] is None and errors[5] is None
    assert errors[1] == "empty line"
    assert "expected a JSON object" in errors[2]
    assert errors[3].startswith("invalid JSON")
    assert "UTF-8" in errors[4]
    assert raw["record"].null_count() == 4


def _write_logs(folder: Path) -> None:
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jsonl").write_text(json.dumps(conv("a")) + "\n")
    (folder / "sub" / "b.jsonl").write_text(json.dumps(conv("b")) + "\n" + json.dumps(conv("c")) + "\n")
    (folder / "c.jsonl").write_text(json.dumps(conv("d")) + "\n")
    (folder / "readme.txt").write_text("not logs")


def test_load_folder_is_expanded_recursively(tmp_path: Path) -> None:
    _write_logs(tmp_path)
    assert resolve_sources(str(tmp_path)) == [str(tmp_path / "a.jsonl"), str(tmp_path / "c.jsonl"),
                                              str(tmp_path / "sub" / "b.jsonl")]
    raw = load_raw(str(tmp_path))
    assert raw.height == 4
    assert raw.select("source_file", "source_line").rows() == [
        (str(tmp_path / "a.jsonl"), 1), (str(tmp_path / "c.jsonl"), 1),
        (str(tmp_path / "sub" / "b.jsonl"), 1), (str(tmp_path / "sub" / "b.jsonl"), 2)]


def test_load_glob_is_expanded(tmp_path: Path) -> None:
    _write_logs(tmp_path)
    assert resolve_sources(str(tmp_path / "*.jsonl")) == [str(tmp_path / "a.jsonl"), str(tmp_path / "c.jsonl")]
    assert resolve_sources(str(tmp_path / "**" / "b.jsonl")) == [str(tmp_path / "sub" / "b.jsonl")]
    assert load_raw(str(tmp_path / "*.jsonl")).height == 2
    with pytest.raises(InputError):
        resolve_sources(str(tmp_path / "*.parquet"))


def test_load_parquet_rows(tmp_path: Path, contract: dict[str, Any]) -> None:
    path = tmp_path / "logs.parquet"
    pl.DataFrame({"conversation_id": ["p1", "p2"], "model": ["m", "m"],
                  "created_at": ["2024-05-01T12:00:00Z"] * 2,
                  "messages": [json.dumps([USER, ANSWER])] * 2}).write_parquet(path)
    raw = load_raw(str(path))
    assert raw["source_line"].to_list() == [1, 2]
    result = check_conversations(raw, contract, WARN, FAIL)
    assert result.rows_passed == 2
