"""`depsim fidelity`: recorded calls replayed through the simulator with their own result withheld."""

from __future__ import annotations

import json
from pathlib import Path

from mlflow.tracking import MlflowClient

from tasks.fidelity import compare, fidelity
from tasks.records import conversations_frame
from tests.conftest import run_cli, synthetic_rows, write_jsonl


def test_compare_levels() -> None:
    assert compare("  12 passed in 0.4s\n", "12 passed in 0.4s") == "exact"
    assert compare("12 passed in 0.41s", "7 passed in 0.09s") == "structural"
    assert compare('{"status": 200, "body": "ok"}', '{"body": "hello", "status": 201}') == "structural"
    assert compare("Error: file not found: a.py", "Error: tool 'x' is not available") == "structural"
    assert compare("def f():\n    return 1\n", "Wrote 20 bytes to f.py") == "different"


def test_own_result_is_withheld() -> None:
    conv = {"conversation_id": "c", "model": "m", "created_at": "2026-01-01T00:00:00Z", "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "1", "content": "sunny"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "2", "type": "function", "function": {"name": "read_file", "arguments": '{"path": "a"}'}},
            {"id": "3", "type": "function", "function": {"name": "read_file", "arguments": '{"path": "a"}'}}]},
        {"role": "tool", "tool_call_id": "2", "content": "A"},
        {"role": "tool", "tool_call_id": "3", "content": "A"},
        {"role": "assistant", "content": "done"}]}
    table = fidelity(conversations_frame([conv]), ["recorded", "rules"])
    rows = {r["call_id"]: r for r in table.iter_rows(named=True)}
    # no other recording of `weather` and no emulator for it: the withheld result is not leaked
    assert rows["1"]["source"] == "error" and rows["1"]["match"] == "different"
    # the twin call's recording answers each read of `a` exactly
    assert rows["2"]["source"] == rows["3"]["source"] == "recorded" and rows["2"]["match"] == "exact"


def test_cli_counts_add_up_and_go_to_mlflow(tmp_path: Path) -> None:
    rows = synthetic_rows(30, seed=3)
    data = write_jsonl(tmp_path / "logs.jsonl", rows)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli(["fidelity", "--data", str(data), "--tracking-uri", uri, "--json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    answered = sum(1 for r in rows for m in r["messages"] if m["role"] == "tool")
    assert out["calls"] == answered == out["exact"] + out["structural"] + out["different"]
    for tool, c in out["tools"].items():
        assert c["calls"] == c["exact"] + c["structural"] + c["different"] == sum(c["sources"].values()), tool
    run = MlflowClient(tracking_uri=uri).get_run(out["run_id"])
    assert run.data.metrics["fidelity.calls"] == answered
    assert run.data.metrics["fidelity.shell.calls"] == out["tools"]["shell"]["calls"]


def test_a_call_is_answered_from_the_world_before_it_not_from_later_recordings() -> None:
    def step(cid: str, name: str, args: dict[str, str], content: str) -> list[dict[str, object]]:
        return [{"role": "assistant", "content": "", "tool_calls": [
                    {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]},
                {"role": "tool", "tool_call_id": cid, "content": content}]

    conv = {"conversation_id": "c", "model": "m", "created_at": "2026-01-01T00:00:00Z", "messages": [
        {"role": "user", "content": "fix it"},
        *step("1", "read_file", {"path": "a.py"}, "x = 1\n"),
        *step("2", "shell", {"command": "pytest -q"}, "1 failed, 2 passed in 0.1s"),
        *step("3", "edit_file", {"path": "a.py", "old_str": "x = 1", "new_str": "x = 2"}, "Edited a.py"),
        *step("4", "read_file", {"path": "a.py"}, "x = 2\n"),
        *step("5", "shell", {"command": "pytest -q"}, "3 passed in 0.1s"),
        {"role": "assistant", "content": "done"}]}
    rows = {r["call_id"]: r for r in fidelity(conversations_frame([conv]), ["recorded", "rules"]).iter_rows(named=True)}
    # the first read is not answered by the later read of the edited file (nothing else knows a.py)
    assert (rows["1"]["source"], rows["1"]["match"]) == ("rules", "different")
    # the second read is answered from the world the earlier read and edit established
    assert (rows["4"]["source"], rows["4"]["match"]) == ("rules", "exact")
    # neither test run gets the other's recording: a change lies between them
    assert rows["2"]["source"] == rows["5"]["source"] == "rules"
    assert rows["2"]["match"] == rows["5"]["match"] == "different"
