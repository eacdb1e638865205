"""Real-world log variants (tasks/normalise.py): each is rewritten, counted, and then passes the contract.

Every variant is exercised twice: with small inline fixtures, and by transforming real rows of the
shared datasets (../shared/datasets, skipped with a reason when absent) into the variant and checking
that they pass with exactly the expected counts and the same content as the untouched rows.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tasks.check import CheckResult, check_conversations, load_contract
from tasks.load import load_raw
from tests.conftest import write_jsonl

WARN, FAIL = 0.01, 0.10
GENERATED_ID = re.compile(r"^call_[0-9a-f]{24}$")
_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _shared_datasets() -> Path | None:
    """../shared/datasets next to the repository, else $DEPSIM_SHARED_DATASETS."""
    here = Path(__file__).resolve().parents[2] / "shared" / "datasets"
    if here.is_dir():
        return here
    env = os.environ.get("DEPSIM_SHARED_DATASETS")
    return Path(env) if env and Path(env).is_dir() else None


DATASETS = _shared_datasets()
DATASET_FILES = {"agentdojo-dev.jsonl": 582, "openagentsafety-dev.jsonl": 610, "toolemu-cases.jsonl": 144}
REAL = ["agentdojo-dev.jsonl", "openagentsafety-dev.jsonl"]  # the two with tool calls
needs_datasets = pytest.mark.skipif(
    DATASETS is None, reason="shared datasets folder not found (../shared/datasets; or set DEPSIM_SHARED_DATASETS)")


@pytest.fixture(scope="module")
def contract() -> dict[str, Any]:
    return load_contract()


def check_rows(rows: list[Any], path: Path, contract: dict[str, Any]) -> CheckResult:
    """Write rows as JSONL, load and check them; nothing may be lost on the way."""
    write_jsonl(path, rows)
    result = check_conversations(load_raw(str(path)), contract, WARN, FAIL)
    assert result.rows_in == len(rows) == result.rows_passed + result.rows_quarantined
    return result


def valid_row(result: CheckResult, cid: str) -> dict[str, Any]:
    rows = result.valid.filter(pl.col("conversation_id") == cid).to_dicts()
    assert len(rows) == 1, f"{cid} did not pass: {result.quarantine.to_dicts()}"
    return rows[0]


def valid_messages(result: CheckResult, cid: str) -> list[dict[str, Any]]:
    return json.loads(valid_row(result, cid)["messages"])


def rule_of(result: CheckResult, cid: str) -> str:
    rules = result.quarantine.filter(pl.col("conversation_id") == cid)["rule"].to_list()
    assert len(rules) == 1, (cid, rules, result.valid["conversation_id"].to_list())
    return rules[0]


# --- inline fixtures -------------------------------------------------------------------

TOOLS = [
    {"type": "function", "function": {"name": "shell", "description": "Run a command.", "parameters": {
        "type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}},
    {"type": "function", "function": {"name": "read_file", "description": "Read a file.", "parameters": {
        "type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}},
]
USER = {"role": "user", "content": "Run the tests and read setup.py."}
DONE = {"role": "assistant", "content": "Done."}
_NO_TOOLS = object()


def conv(cid: str, *messages: dict[str, Any], tools: Any = TOOLS) -> dict[str, Any]:
    rec: dict[str, Any] = {"conversation_id": cid, "model": "prod-model", "created_at": "2024-05-01T12:00:00Z",
                           "surface": "ide", "task_type": "bugfix", "language": "python",
                           "messages": copy.deepcopy(list(messages))}
    if tools is not _NO_TOOLS:
        rec["tools"] = copy.deepcopy(tools)
    return rec


def call(cid: str | None, name: str = "shell", args: Any = '{"command": "pytest"}', drop_id: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}
    if drop_id:
        del out["id"]
    return out


def asst(*calls: dict[str, Any], content: str | None = None, role: str = "assistant") -> dict[str, Any]:
    return {"role": role, "content": content, "tool_calls": list(calls)}


def result(content: Any = "ok", cid: str | None = None, name: str | None = None, role: str = "tool") -> dict[str, Any]:
    out: dict[str, Any] = {"role": role, "content": content}
    if cid is not None:
        out["tool_call_id"] = cid
    if name is not None:
        out["name"] = name
    return out


def test_arguments_given_as_objects_are_encoded_and_counted(tmp_path: Path, contract: dict[str, Any]) -> None:
    nested = {"path": "src/app.py", "options": {"lines": [1, 2, 3], "follow": True, "encoding": "utf-8"}}
    rows = [
        conv("obj-1", USER, asst(call("c1", args={"command": "pytest -q"})), result(cid="c1"), DONE),
        conv("obj-2", USER, asst(call("c1", "read_file", nested), call("c2", args={"command": "ls"})),
             result(cid="c1"), result(cid="c2"), DONE),
        conv("obj-3", USER, asst(call("c1", args=None)), result(cid="c1"), DONE),  # null → "{}"
        conv("str-4", USER, asst(call("c1")), result(cid="c1"), DONE),             # already a string
    ]
    res = check_rows(rows, tmp_path / "args.jsonl", contract)
    assert (res.rows_passed, res.verdict) == (4, "passed")
    assert res.normalised == {"arguments_object": 4}
    args = [c["function"]["arguments"] for c in valid_messages(res, "obj-2")[1]["tool_calls"]]
    assert all(isinstance(a, str) for a in args)
    assert [json.loads(a) for a in args] == [nested, {"command": "ls"}]
    assert valid_messages(res, "obj-1")[1]["tool_calls"][0]["function"]["arguments"] == '{"command": "pytest -q"}'
    assert valid_messages(res, "obj-3")[1]["tool_calls"][0]["function"]["arguments"] == "{}"


def test_arguments_given_as_a_list_are_still_not_an_object(tmp_path: Path, contract: dict[str, Any]) -> None:
    rows = [conv("list-args", USER, asst(call("c1", args=["pytest", "-q"])), result(cid="c1"), DONE),
            conv("ok", USER, DONE)]
    res = check_rows(rows, tmp_path / "list.jsonl", contract)
    assert rule_of(res, "list-args") == "arguments_json"
    assert res.valid["conversation_id"].to_list() == ["ok"]


def test_missing_or_empty_call_ids_are_generated_and_results_paired(tmp_path: Path, contract: dict[str, Any]) -> None:
    calls = [call(None, drop_id=True), call(""), call(None, "read_file", '{"path": "setup.py"}')]
    rows = [conv("ids", USER, asst(*calls), result("3 passed"), result("ok"), result("setup()"), DONE)]
    res = check_rows(rows, tmp_path / "ids.jsonl", contract)
    assert res.rows_passed == 1
    assert res.normalised == {"tool_call_id_generated": 3, "tool_result_paired": 3}
    msgs = valid_messages(res, "ids")
    ids = [c["id"] for c in msgs[1]["tool_calls"]]
    assert all(GENERATED_ID.match(i) for i in ids), ids
    assert len(set(ids)) == 3
    assert [m["tool_call_id"] for m in msgs[2:5]] == ids  # results without ids: by position
    assert [m["content"] for m in msgs[2:5]] == ["3 passed", "ok", "setup()"]


def test_generated_ids_are_deterministic(tmp_path: Path, contract: dict[str, Any]) -> None:
    def row(cid: str) -> dict[str, Any]:
        return conv(cid, USER, asst(call(None), call(""), content="Running."), result(), result(),
                    USER, asst(call(None, "read_file", '{"path": "a"}')), result(), DONE)

    first = check_rows([row("a"), row("b")], tmp_path / "one.jsonl", contract)
    again = check_rows([row("a"), row("b")], tmp_path / "one.jsonl", contract)
    moved = check_rows([conv("z", USER, DONE), row("b"), row("a")], tmp_path / "two.jsonl", contract)
    for cid in ("a", "b"):
        assert valid_messages(first, cid) == valid_messages(again, cid) == valid_messages(moved, cid)
    ids_a = [c["id"] for m in valid_messages(first, "a") for c in m.get("tool_calls") or []]
    ids_b = [c["id"] for m in valid_messages(first, "b") for c in m.get("tool_calls") or []]
    assert len(set(ids_a)) == 3 and all(GENERATED_ID.match(i) for i in ids_a)
    assert not set(ids_a) & set(ids_b)  # derived from the conversation id
    assert first.normalised == {"tool_call_id_generated": 6, "tool_result_paired": 6}


def test_tool_results_without_id_are_paired_by_name(tmp_path: Path, contract: dict[str, Any]) -> None:
    rows = [conv("by-name", USER, asst(call("c_shell"), call("c_read", "read_file", '{"path": "setup.py"}')),
                 result("setup()", name="read_file"), result("3 passed", name="shell"), DONE)]
    res = check_rows(rows, tmp_path / "name.jsonl", contract)
    assert res.normalised == {"tool_result_paired": 2}
    msgs = valid_messages(res, "by-name")
    assert [(m["name"], m["tool_call_id"]) for m in msgs[2:4]] == [("read_file", "c_read"), ("shell", "c_shell")]


def test_tool_results_without_id_are_paired_by_position(tmp_path: Path, contract: dict[str, Any]) -> None:
    rows = [
        conv("by-pos", USER, asst(call("c1"), call("c2"), call("c3")), result("1"), result("2"), result("3"), DONE),
        # an explicit id answers c2 first; the id-less results take the remaining calls in order
        conv("mixed", USER, asst(call("c1"), call("c2"), call("c3")), result("2", cid="c2"), result("1"),
             result("3"), DONE),
    ]
    res = check_rows(rows, tmp_path / "pos.jsonl", contract)
    assert res.normalised == {"tool_result_paired": 5}
    assert [m["tool_call_id"] for m in valid_messages(res, "by-pos")[2:5]] == ["c1", "c2", "c3"]
    assert [m["tool_call_id"] for m in valid_messages(res, "mixed")[2:5]] == ["c2", "c1", "c3"]


def test_tool_result_without_id_and_without_pending_call_is_not_invented(tmp_path: Path, contract: dict[str, Any]) -> None:
    rows = [conv("orphan", USER, DONE, result("stray output")),
            conv("answered", USER, asst(call("c1")), result(cid="c1"), result("second answer"), DONE)]
    res = check_rows(rows, tmp_path / "orphan.jsonl", contract)
    assert rule_of(res, "orphan") == "tool_result_paired"
    assert rule_of(res, "answered") == "tool_result_paired"  # c1 is already answered
    assert "tool_result_paired" not in res.normalised


def test_logs_without_tools_get_inferred_schemas(tmp_path: Path, contract: dict[str, Any]) -> None:
    rows = [
        conv("infer", USER, asst(call("c1", args={"command": "ls", "timeout": 5})), result(cid="c1"),
             asst(call("c2", args='{"command": "pwd", "env": {"A": "1"}}')), result(cid="c2"),
             asst(call("c3", "read_file", {"path": "a.py", "lines": [1, 2]})), result(cid="c3"),
             asst(call("c4", "grep", {"n": 1}), call("c5", "grep", {"n": "many", "flag": True, "x": None})),
             result(cid="c4"), result(cid="c5"), DONE, tools=_NO_TOOLS),
        conv("null-tools", USER, asst(call("c1")), result(cid="c1"), DONE, tools=None),
        conv("no-calls", USER, DONE, tools=_NO_TOOLS),
        conv("declared", USER, asst(call("c1")), result(cid="c1"), DONE),
    ]
    res = check_rows(rows, tmp_path / "infer.jsonl", contract)
    assert (res.rows_passed, res.verdict) == (4, "passed")
    assert res.normalised == {"tools_inferred": 2, "arguments_object": 4}
    flags = dict(res.valid.select("conversation_id", "tools_inferred").iter_rows())
    assert flags == {"infer": True, "null-tools": True, "no-calls": False, "declared": False}
    tools = {t["function"]["name"]: t for t in json.loads(valid_row(res, "infer")["tools"])}
    assert sorted(tools) == ["grep", "read_file", "shell"]
    for t in tools.values():
        assert t["type"] == "function"
        assert "inferred" in t["function"]["description"].lower()
        assert t["function"]["parameters"]["type"] == "object"
    shell = tools["shell"]["function"]["parameters"]
    assert shell["required"] == ["command"]  # present in every call; timeout and env only once
    assert shell["properties"] == {"command": {"type": "string"}, "timeout": {"type": "integer"},
                                   "env": {"type": "object"}}
    read = tools["read_file"]["function"]["parameters"]
    assert (read["required"], read["properties"]) == (["lines", "path"], {"path": {"type": "string"},
                                                                          "lines": {"type": "array"}})
    grep = tools["grep"]["function"]["parameters"]
    assert grep["required"] == ["n"]
    assert set(grep["properties"]) == {"n", "flag", "x"}
    assert sorted(grep["properties"]["n"]["type"]) == ["integer", "string"]
    assert grep["properties"]["flag"] == {"type": "boolean"}
    assert json.loads(valid_row(res, "no-calls")["tools"]) == []
    assert json.loads(valid_row(res, "declared")["tools"]) == TOOLS


ROLE_ROWS = conv(
    "roles",
    {"role": "human", "content": "List the files."},
    asst(call("c1", args='{"command": "ls"}'), role="agent"),
    result("a.py", cid="c1", role="environment"),
    {"role": "model", "content": "One file: a.py."},
    {"role": "human", "content": "Read it."},
    asst(call("c2", "read_file", '{"path": "a.py"}'), role="model"),
    result("print(1)", cid="c2", role="function"),
    {"role": "agent", "content": "It prints 1."},
)


def test_agent_style_roles_are_mapped(tmp_path: Path, contract: dict[str, Any]) -> None:
    res = check_rows([ROLE_ROWS], tmp_path / "roles.jsonl", contract)
    assert res.rows_passed == 1
    assert res.normalised == {"role:human": 2, "role:agent": 2, "role:model": 2, "role:environment": 1,
                              "role:function": 1}
    assert [m["role"] for m in valid_messages(res, "roles")] == [
        "user", "assistant", "tool", "assistant", "user", "assistant", "tool", "assistant"]


def test_legacy_function_call_becomes_a_tool_call(tmp_path: Path, contract: dict[str, Any]) -> None:
    rows = [conv("legacy", USER,
                 {"role": "assistant", "content": None, "function_call": {"name": "shell", "arguments": {"command": "ls"}}},
                 {"role": "function", "name": "shell", "content": "a.py"},
                 {"role": "assistant", "content": None,
                  "function_call": {"name": "read_file", "arguments": '{"path": "a.py"}'}},
                 {"role": "function", "name": "read_file", "content": "print(1)"},
                 DONE)]
    res = check_rows(rows, tmp_path / "legacy.jsonl", contract)
    assert res.rows_passed == 1
    assert res.normalised == {"function_call_legacy": 2, "tool_call_id_generated": 2, "arguments_object": 1,
                              "role:function": 2, "tool_result_paired": 2}
    msgs = valid_messages(res, "legacy")
    for k, (name, args) in ((1, ("shell", {"command": "ls"})), (3, ("read_file", {"path": "a.py"}))):
        assert "function_call" not in msgs[k]
        [tool_call] = msgs[k]["tool_calls"]
        assert GENERATED_ID.match(tool_call["id"]) and tool_call["type"] == "function"
        assert (tool_call["function"]["name"], json.loads(tool_call["function"]["arguments"])) == (name, args)
        assert msgs[k + 1]["role"] == "tool" and msgs[k + 1]["tool_call_id"] == tool_call["id"]


TERMINAL_CASES = [
    ("\x1b[32mPASSED\x1b[0m 3 tests", "PASSED 3 tests"),
    ("\x1b[1;31mERROR\x1b[0m: boom\x1b[K", "ERROR: boom"),
    ("Downloading |\x08/\x08-\x08\\\x08 done", "Downloading |/-\\ done"),
    ("\x1b]0;user@host: ~\x07$ ls\r\na.py", "$ ls\r\na.py"),
    ("\x1b[2J\x1b[Hscreen\x07 cleared\x1b[?25h", "screen cleared"),
]


def test_terminal_controls_are_stripped_from_tool_output(tmp_path: Path, contract: dict[str, Any]) -> None:
    rows = [conv(f"ansi-{k}", USER, asst(call("c1")), result(dirty, cid="c1"), DONE)
            for k, (dirty, _clean) in enumerate(TERMINAL_CASES)]
    rows.append(conv("plain", USER, asst(call("c1")), result("a\tb\r\nc", cid="c1"), DONE))
    res = check_rows(rows, tmp_path / "ansi.jsonl", contract)
    assert (res.rows_passed, res.verdict) == (len(rows), "passed")
    assert res.normalised == {"terminal_controls": len(TERMINAL_CASES)}
    for k, (_dirty, clean) in enumerate(TERMINAL_CASES):
        assert valid_messages(res, f"ansi-{k}")[2]["content"] == clean
    assert valid_messages(res, "plain")[2]["content"] == "a\tb\r\nc"  # tab, CR and newline are kept


NUL_CASES = {
    "tool-nul": (USER, asst(call("c1")), result("ok\x00", cid="c1"), DONE),
    "tool-ansi-and-nul": (USER, asst(call("c1")), result("\x1b[31mred\x00\x1b[0m", cid="c1"), DONE),
    "tool-nul-inside-csi": (USER, asst(call("c1")), result("\x1b[3\x001mx", cid="c1"), DONE),
    "tool-backspace-and-nul": (USER, asst(call("c1")), result("a\x08\x00b", cid="c1"), DONE),
    "tool-parts-nul": (USER, asst(call("c1")), result([{"type": "text", "text": "a\x00"}], cid="c1"), DONE),
    "user-nul": ({"role": "user", "content": "a\x00b"}, DONE),
    "assistant-nul": (USER, {"role": "assistant", "content": "done\x00"}),
    "system-nul": ({"role": "system", "content": "\x00"}, USER, DONE),
    "legacy-role-nul": ({"role": "human", "content": "\x00hi"}, DONE),
    # only tool output is cleaned: the same escape in a user or assistant message is a violation
    "user-ansi": ({"role": "user", "content": "\x1b[31mred\x1b[0m"}, DONE),
    "assistant-backspace": (USER, {"role": "assistant", "content": "done\x08"}),
}


def test_nul_anywhere_is_still_quarantined_under_control_chars(tmp_path: Path, contract: dict[str, Any]) -> None:
    rows = [conv(cid, *msgs) for cid, msgs in NUL_CASES.items()] + [conv("clean", USER, DONE)]
    res = check_rows(rows, tmp_path / "nul.jsonl", contract)
    assert {cid: rule_of(res, cid) for cid in NUL_CASES} == dict.fromkeys(NUL_CASES, "control_chars")
    assert res.valid["conversation_id"].to_list() == ["clean"]


def test_nul_inside_an_osc_sequence_is_still_quarantined(tmp_path: Path, contract: dict[str, Any]) -> None:
    rows = [conv("osc-nul", USER, asst(call("c1")), result("\x1b]0;ti\x00tle\x07$ ls", cid="c1"), DONE),
            conv("clean", USER, DONE)]
    res = check_rows(rows, tmp_path / "osc.jsonl", contract)
    assert rule_of(res, "osc-nul") == "control_chars"


def test_charset_designation_escape_is_stripped_whole(tmp_path: Path, contract: dict[str, Any]) -> None:
    rows = [conv("sgr0", USER, asst(call("c1")), result("\x1b[1mbold\x1b(B\x1b[m plain", cid="c1"), DONE)]
    res = check_rows(rows, tmp_path / "sgr0.jsonl", contract)
    assert valid_messages(res, "sgr0")[2]["content"] == "bold plain"


def test_terminal_controls_are_stripped_from_tool_output_parts(tmp_path: Path, contract: dict[str, Any]) -> None:
    parts = [{"type": "text", "text": "\x1b[32mPASSED\x1b[0m"}]
    rows = [conv("parts", USER, asst(call("c1")), result(parts, cid="c1"), DONE)]
    res = check_rows(rows, tmp_path / "parts.jsonl", contract)
    assert res.rows_passed == 1
    assert valid_messages(res, "parts")[2]["content"] == [{"type": "text", "text": "PASSED"}]


# --- the shared datasets ----------------------------------------------------------------

@needs_datasets
@pytest.mark.parametrize("name", list(DATASET_FILES))
def test_shared_dataset_passes(name: str, contract: dict[str, Any]) -> None:
    assert DATASETS is not None
    path = DATASETS / name
    if not path.is_file():
        pytest.skip(f"{path} not found")
    lines = path.read_bytes().count(b"\n")
    res = check_conversations(load_raw(str(path)), contract, WARN, FAIL)
    assert res.verdict == "passed", res.by_rule
    assert res.rows_in == lines == res.rows_passed + res.rows_quarantined
    assert res.rows_in == DATASET_FILES[name]  # the README's counts
    assert set(res.normalised) <= {"terminal_controls"}  # the files follow the contract already
    assert res.valid["tools_inferred"].sum() == 0


@functools.cache
def _read_dataset(name: str) -> tuple[str, ...]:
    if DATASETS is None or not (DATASETS / name).is_file():
        pytest.skip(f"shared dataset {name} not found")
    return tuple((DATASETS / name).read_text("utf-8").splitlines())


def _sample_rows(n: int = 50) -> list[dict[str, Any]]:
    """n rows spread over each real trajectory file, without control characters (no normalisation needed)."""
    out: list[dict[str, Any]] = []
    for name in REAL:
        rows = [json.loads(line) for line in _read_dataset(name)]
        clean = [r for r in rows if not any(isinstance(m.get("content"), str) and _CONTROLS.search(m["content"])
                                            for m in r["messages"])]
        out.extend(clean[:: max(1, len(clean) // n)][:n])
    return out


def canonical(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages with call ids replaced by the call's position and results by the position they answer."""
    label: dict[str, str] = {}
    out = []
    for i, msg in enumerate(copy.deepcopy(messages)):
        for j, c in enumerate(msg.get("tool_calls") or []):
            label[c["id"]] = c["id"] = f"{i}.{j}"
            c["function"]["arguments"] = json.loads(c["function"]["arguments"])
        if msg["role"] == "tool":
            msg["tool_call_id"] = label.get(msg["tool_call_id"], "unpaired")
            msg.pop("name", None)
        out.append(msg)
    return out


Transform = Callable[[dict[str, Any], Counter[str]], None]


def t_arguments_object(rec: dict[str, Any], n: Counter[str]) -> None:
    for m in rec["messages"]:
        for c in m.get("tool_calls") or []:
            c["function"]["arguments"] = json.loads(c["function"]["arguments"])
            n["arguments_object"] += 1


def _drop_ids(rec: dict[str, Any], n: Counter[str], keep_names: bool) -> None:
    calls = [c for m in rec["messages"] for c in m.get("tool_calls") or []]
    for k, c in enumerate(calls):  # absent, empty and null ids
        if k % 3 == 0:
            del c["id"]
        else:
            c["id"] = "" if k % 3 == 1 else None
        n["tool_call_id_generated"] += 1
    for m in rec["messages"]:
        if m["role"] == "tool":
            del m["tool_call_id"]
            if not keep_names:
                m.pop("name", None)
            n["tool_result_paired"] += 1


def t_ids_paired_by_name(rec: dict[str, Any], n: Counter[str]) -> None:
    _drop_ids(rec, n, keep_names=True)


def t_ids_paired_by_position(rec: dict[str, Any], n: Counter[str]) -> None:
    _drop_ids(rec, n, keep_names=False)


def t_tools_dropped(rec: dict[str, Any], n: Counter[str]) -> None:
    del rec["tools"]
    if any(m.get("tool_calls") for m in rec["messages"]):
        n["tools_inferred"] += 1


ROLE_NAMES = {"assistant": ("agent", "model"), "user": ("human",), "tool": ("environment", "function")}


def t_roles_renamed(rec: dict[str, Any], n: Counter[str]) -> None:
    for k, m in enumerate(rec["messages"]):
        names = ROLE_NAMES.get(m["role"])
        if names:
            m["role"] = names[k % len(names)]
            n[f"role:{m['role']}"] += 1


def t_legacy_function_call(rec: dict[str, Any], n: Counter[str]) -> None:
    answers = {m["tool_call_id"]: m for m in rec["messages"] if m["role"] == "tool"}
    for m in rec["messages"]:
        if m["role"] == "assistant" and len(m.get("tool_calls") or []) == 1:
            [c] = m.pop("tool_calls")
            m["function_call"] = c["function"]
            n["function_call_legacy"] += 1
            n["tool_call_id_generated"] += 1
            if c["id"] in answers:
                res = answers[c["id"]]
                res["role"] = "function"
                del res["tool_call_id"]
                n["role:function"] += 1
                n["tool_result_paired"] += 1


def t_terminal_colours(rec: dict[str, Any], n: Counter[str]) -> None:
    for m in rec["messages"]:
        if m["role"] == "tool" and isinstance(m.get("content"), str):
            m["content"] = f"\x1b[2K\x1b[1;32m{m['content']}\x1b[0m\x1b[K"
            n["terminal_controls"] += 1


def t_all_at_once(rec: dict[str, Any], n: Counter[str]) -> None:
    for t in (t_arguments_object, t_ids_paired_by_name, t_tools_dropped, t_terminal_colours, t_roles_renamed):
        t(rec, n)


TRANSFORMS: dict[str, Transform] = {f.__name__[2:]: f for f in (
    t_arguments_object, t_ids_paired_by_name, t_ids_paired_by_position, t_tools_dropped, t_roles_renamed,
    t_legacy_function_call, t_terminal_colours, t_all_at_once)}


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory, contract: dict[str, Any]) -> tuple[list[dict[str, Any]], CheckResult]:
    """50 untouched rows of each real trajectory file and their check result (computed once)."""
    rows = _sample_rows()
    res = check_rows(rows, tmp_path_factory.mktemp("orig") / "sample.jsonl", contract)
    assert (res.rows_passed, res.normalised) == (len(rows), {})
    return rows, res


@needs_datasets
@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_transformed_real_rows_pass_with_counts(transform: str, tmp_path: Path, contract: dict[str, Any],
                                               originals: tuple[list[dict[str, Any]], CheckResult]) -> None:
    rows, before = originals
    expected: Counter[str] = Counter()
    changed = copy.deepcopy(rows)
    for rec in changed:
        TRANSFORMS[transform](rec, expected)
    assert expected, "the transform found nothing to rewrite in the sample"
    assert changed != rows
    res = check_rows(changed, tmp_path / "changed.jsonl", contract)
    assert (res.rows_passed, res.verdict) == (len(rows), "passed"), res.quarantine.head(3).to_dicts()
    assert res.normalised == dict(expected)
    for rec in rows:  # same conversations, same pairing, same content after normalisation
        cid = rec["conversation_id"]
        assert canonical(valid_messages(res, cid)) == canonical(valid_messages(before, cid)), cid
    has_calls = {r["conversation_id"]: any(m.get("tool_calls") for m in r["messages"]) for r in rows}
    inferred = dict(res.valid.select("conversation_id", "tools_inferred").iter_rows())
    dropped = transform in ("tools_dropped", "all_at_once")
    assert inferred == {cid: dropped and calls for cid, calls in has_calls.items()}
    if "ids" in transform or transform in ("legacy_function_call", "all_at_once"):
        for cid in has_calls:
            ids = [c["id"] for m in valid_messages(res, cid) for c in m.get("tool_calls") or []]
            assert len(ids) == len(set(ids))
            assert all(GENERATED_ID.match(i) for i in ids) or transform == "legacy_function_call"


@needs_datasets
def test_inferred_schemas_of_real_rows(tmp_path: Path, contract: dict[str, Any],
                                       originals: tuple[list[dict[str, Any]], CheckResult]) -> None:
    rows, _ = originals
    changed = copy.deepcopy(rows)
    for rec in changed:
        del rec["tools"]
    res = check_rows(changed, tmp_path / "no-tools.jsonl", contract)
    assert res.rows_passed == len(rows)
    for rec in rows:
        seen: dict[str, list[dict[str, Any]]] = {}
        for m in rec["messages"]:
            for c in m.get("tool_calls") or []:
                seen.setdefault(c["function"]["name"], []).append(json.loads(c["function"]["arguments"]))
        tools = json.loads(valid_row(res, rec["conversation_id"])["tools"])
        assert [t["function"]["name"] for t in tools] == sorted(seen)
        declared = {t["function"]["name"] for t in rec["tools"]}
        assert set(seen) <= declared  # inferred only tools the original declared
        for t in tools:
            fn = t["function"]
            calls = seen[fn["name"]]
            assert "inferred" in fn["description"]
            assert set(fn["parameters"]["properties"]) == set().union(*calls)
            assert fn["parameters"]["required"] == sorted(set.intersection(*(set(a) for a in calls)))


@needs_datasets
def test_generated_ids_of_real_rows_are_deterministic(tmp_path: Path, contract: dict[str, Any]) -> None:
    rows = _sample_rows(10)
    for rec in rows:
        t_ids_paired_by_position(rec, Counter())
    forward = check_rows(rows, tmp_path / "forward.jsonl", contract)
    backward = check_rows(rows[::-1], tmp_path / "backward.jsonl", contract)
    assert forward.rows_passed == backward.rows_passed == len(rows)
    for rec in rows:
        cid = rec["conversation_id"]
        assert valid_messages(forward, cid) == valid_messages(backward, cid)
