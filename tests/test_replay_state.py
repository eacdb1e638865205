"""The world at the replay point (issue 10): the tool simulator knows what the prefix established
and nothing the production model did later, except recorded results no later action of the
production model could have changed. A test run that nothing can answer has an unknown outcome.

Unit tests build the simulator directly; the end-to-end test replays a turn against the loopback
candidate (tests/faulty_server.py) with the production model's own later turn in the log."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

from tasks.config import Endpoint, ReplayCfg
from tasks.replay import replay_sample
from tasks.toolsim import (
    ANY,
    DB,
    FILES,
    UNKNOWN_TEST_OUTCOME,
    Footprint,
    LLMRequest,
    ToolResult,
    ToolSimulator,
    conflicts,
    footprint,
)
from tests.faulty_server import ServerProcess, conversation, start_server, turn_frames

CHAIN = ["recorded", "rules"]
ORIGINAL = "def total(items):\n    return sum(i.price for i in items) - 1\n"
FIXED = "def total(items):\n    return sum(i.price for i in items)\n"


def call(cid: str, name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"role": "assistant", "content": "",
            "tool_calls": [{"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]}


def answer(cid: str, content: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": cid, "content": content}


def steps(prefix: str, *pairs: tuple[str, dict[str, Any], str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for k, (name, args, content) in enumerate(pairs):
        out += [call(f"{prefix}{k}", name, args), answer(f"{prefix}{k}", content)]
    return out


# The production model's turn after the replayed user message: it reads the bug, runs the
# failing tests, fixes the bug, then cats the fixed file and sees the tests pass.
LATER = steps("p",
              ("read_file", {"path": "src/billing.py"}, ORIGINAL),
              ("read_file", {"path": "README.md"}, "# billing\n"),
              ("shell", {"command": "pytest -q"}, "FAILED tests/test_billing.py::test_total\n1 failed, 11 passed in 0.40s"),
              ("edit_file", {"path": "src/billing.py", "old_str": "    return sum(i.price for i in items) - 1",
                             "new_str": "    return sum(i.price for i in items)"}, "Edited src/billing.py"),
              ("shell", {"command": "cat src/billing.py"}, FIXED),
              ("write_file", {"path": "src/notes.py", "content": "NOTE = 1\n"}, "Wrote 9 bytes to src/notes.py"),
              ("shell", {"command": "pytest"}, "12 passed in 0.41s"),
              ("read_file", {"path": "docs/billing.md"}, "# totals\n"))
LATER.append({"role": "assistant", "content": "Fixed: all tests pass."})
CONV = [{"role": "user", "content": "totals are off by one"}, *LATER]


def sim_at_turn_start(chain: list[str] = CHAIN) -> ToolSimulator:
    return ToolSimulator(CONV, chain, replay_at=1)


def run(sim: ToolSimulator, name: str, **args: Any) -> ToolResult:
    return sim.simulate(name, json.dumps(args))


# --- a read after the replay point does not see a later write ---------------------------------

def test_cat_does_not_see_the_production_models_later_fix() -> None:
    sim = sim_at_turn_start()
    r = run(sim, "shell", command="cat src/billing.py")
    assert r.content == ORIGINAL and r.content != FIXED
    assert run(sim, "read_file", path="src/billing.py").content == ORIGINAL


def test_a_file_the_production_model_wrote_later_does_not_exist_yet() -> None:
    sim = sim_at_turn_start()
    assert run(sim, "read_file", path="src/notes.py").content == "Error: file not found: src/notes.py"
    assert "notes.py" not in run(sim, "shell", command="ls src").content


def test_the_whole_recording_as_prefix_still_sees_the_fix() -> None:
    """The same log with the replay point at its end: the fix is then part of the prefix."""
    sim = ToolSimulator(CONV, CHAIN)
    assert run(sim, "shell", command="cat src/billing.py").content == FIXED
    assert run(sim, "read_file", path="src/notes.py").content == "NOTE = 1\n"


def test_a_recorded_read_before_a_prefix_write_is_not_served_stale() -> None:
    prefix = [{"role": "user", "content": "start"},
              *steps("a", ("read_file", {"path": "a.py"}, "x = 1\n"),
                     ("write_file", {"path": "a.py", "content": "x = 2\n"}, "Wrote 6 bytes to a.py")),
              {"role": "assistant", "content": "ok"}, {"role": "user", "content": "next"}]
    r = run(ToolSimulator(prefix, CHAIN, replay_at=len(prefix)), "read_file", path="a.py")
    assert (r.source, r.content) == ("rules", "x = 2\n")


# --- a test run does not return a later recording's pass --------------------------------------

def test_test_run_before_any_change_gets_the_valid_failing_recording() -> None:
    sim = sim_at_turn_start()
    r = run(sim, "shell", command="pytest -q")
    assert (r.source, r.outcome) == ("recorded", None) and "1 failed" in r.content
    # the same state, another test command: the known failing output, never the later pass
    r = run(sim, "shell", command="pytest")
    assert r.source == "rules" and "1 failed" in r.content and "12 passed" not in r.content


def test_test_run_after_the_candidates_own_fix_is_unknown_not_the_later_pass() -> None:
    sim = sim_at_turn_start()
    run(sim, "edit_file", path="src/billing.py", old_str="    return sum(i.price for i in items) - 1",
        new_str="    return sum(i.price for i in items)")
    for command in ("pytest", "pytest -q"):
        r = run(sim, "shell", command=command)
        assert (r.source, r.outcome, r.is_error) == ("rules", "unknown", False)
        assert r.content.startswith(UNKNOWN_TEST_OUTCOME) and "passed" not in r.content


def test_a_test_the_candidate_broke_does_not_pass() -> None:
    sim = sim_at_turn_start()
    run(sim, "write_file", path="src/billing.py", content="def total(items:\n    return 0\n")
    r = run(sim, "shell", command="pytest")
    assert r.source == "rules" and r.outcome is None
    assert "ERROR collecting src/billing.py" in r.content and "1 error" in r.content and "passed" not in r.content


def test_a_test_left_failing_stays_failing_while_nothing_changed() -> None:
    # nothing recorded before the replay point changes the workspace, so the failing run holds
    sim = sim_at_turn_start()
    run(sim, "read_file", path="src/billing.py")
    run(sim, "shell", command="git status")
    assert "1 failed" in run(sim, "shell", command="pytest tests/").content


def test_without_any_valid_recording_the_test_outcome_is_unknown() -> None:
    late_only = [{"role": "user", "content": "fix it"},
                 *steps("p", ("write_file", {"path": "a.py", "content": "x = 1\n"}, "Wrote 6 bytes to a.py"),
                        ("shell", {"command": "pytest -q"}, "3 passed in 0.1s"))]
    r = run(ToolSimulator(late_only, CHAIN, replay_at=1), "shell", command="pytest -q")
    assert (r.outcome, r.source) == ("unknown", "rules") and "3 passed" not in r.content


def test_with_llm_after_rules_an_unknown_test_run_goes_to_the_llm() -> None:
    sim = sim_at_turn_start(["recorded", "rules", "llm"])
    run(sim, "write_file", path="src/other.py", content="y = 2\n")
    assert isinstance(sim.answer("shell", json.dumps({"command": "pytest -q"})), LLMRequest)


# --- a recorded read of an untouched file is still served -------------------------------------

def test_later_read_of_an_untouched_file_is_served_from_the_recording() -> None:
    sim = sim_at_turn_start()
    r = run(sim, "read_file", path="README.md")
    assert (r.source, r.content) == ("recorded", "# billing\n")
    r = run(sim, "read_file", path="docs/billing.md")  # after the fix and a write, neither touches it
    assert (r.source, r.content) == ("recorded", "# totals\n")
    assert run(sim, "shell", command="cat docs/billing.md").content == "# totals\n"  # seeded the world


def test_later_read_after_a_program_that_could_change_anything_is_not_served() -> None:
    conv = [{"role": "user", "content": "tidy"},
            *steps("p", ("shell", {"command": "npm run format"}, ""),
                   ("read_file", {"path": "README.md"}, "# formatted\n"))]
    r = run(ToolSimulator(conv, CHAIN, replay_at=1), "read_file", path="README.md")
    assert r.source == "rules" and r.content == "Error: file not found: README.md"


def test_the_candidates_own_write_hides_the_recording() -> None:
    sim = sim_at_turn_start()
    run(sim, "write_file", path="README.md", content="# mine\n")
    r = run(sim, "read_file", path="README.md")
    assert (r.source, r.content) == ("rules", "# mine\n")


# --- footprints: what a call reads and may change ----------------------------------------------

@pytest.mark.parametrize("name,args,reads,writes", [
    ("read_file", {"path": "./src/a.py"}, {"file:src/a.py"}, set()),
    ("write_file", {"path": "src/a.py", "content": "x"}, set(), {"file:src/a.py"}),
    ("shell", {"command": "cat src/a.py | wc -l"}, {"file:src/a.py"}, set()),
    ("shell", {"command": "grep -rn total ."}, {FILES}, set()),
    ("shell", {"command": "rm -f build.log"}, {"file:build.log"}, {"file:build.log"}),
    ("shell", {"command": "echo hi > notes.txt"}, set(), {"file:notes.txt"}),
    ("shell", {"command": "sed -i s/a/b/ x.py"}, {"file:s/a/b", "file:x.py"}, {"file:s/a/b", "file:x.py"}),
    ("shell", {"command": "pytest -q"}, {ANY}, set()),
    ("shell", {"command": "python fix.py"}, {ANY}, {ANY}),
    ("sql_query", {"query": "SELECT 1"}, {DB}, set()),
    ("sql_query", {"query": "DELETE FROM t"}, {DB}, {DB}),
    ("think", {"thought": "hm"}, set(), set()),
])
def test_footprint(name: str, args: dict[str, Any], reads: set[str], writes: set[str]) -> None:
    assert footprint(name, args) == Footprint(frozenset(reads), frozenset(writes))


def test_conflicts_by_path_directory_and_scope() -> None:
    assert conflicts({"file:src"}, {"file:src/a.py"}) and conflicts({"file:src/a.py"}, {FILES})
    assert conflicts({"file:/repo/src/a.py"}, {"file:src/a.py"})
    assert not conflicts({"file:src/a.py"}, {"file:src/a.py.bak"})
    assert not conflicts({DB}, {"file:a.py"}) and conflicts({ANY}, {DB}) and not conflicts(set(), {ANY})


# --- end to end: a replayed turn ---------------------------------------------------------------

@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    srv = start_server()
    yield srv
    srv.stop()


def test_replay_sees_the_world_at_the_turn_start_and_marks_unknown_outcomes(server: ServerProcess) -> None:
    script = [{"name": "shell", "arguments": {"command": "cat src/billing.py"}},
              {"name": "read_file", "arguments": {"path": "README.md"}},
              {"name": "write_file", "arguments": {"path": "src/billing.py", "content": FIXED}},
              {"name": "shell", "arguments": {"command": "pytest"}}]
    conv = conversation("c1", script=script, recording=[{"role": "user", "content": "earlier"},
                                                        {"role": "assistant", "content": "hello"}])
    conv["messages"] += LATER  # the production model's own turn after the replayed user message
    sample, frame = turn_frames([conv])
    traj, _ = asyncio.run(replay_sample(sample, frame, Endpoint(base_url=server.url, model="script#state"),
                                        ReplayCfg(), 0))
    row = traj.row(0, named=True)
    tool_msgs = [m["content"] for m in json.loads(row["messages"]) if m["role"] == "tool"]
    results = json.loads(row["tool_results"])
    assert row["finish"] == "answered"
    assert tool_msgs[0] == ORIGINAL  # the later read established it; the later fix did not leak
    assert tool_msgs[1] == "# billing\n" and results[1]["source"] == "recorded"
    assert tool_msgs[3].startswith(UNKNOWN_TEST_OUTCOME) and "12 passed" not in tool_msgs[3]
    assert results[3]["outcome"] == "unknown" and all("outcome" not in r for r in results[:3])


def test_a_later_cat_of_an_untouched_file_seeds_the_world_and_a_later_cat_of_a_changed_one_does_not() -> None:
    conv = [{"role": "user", "content": "look"},
            *steps("p", ("shell", {"command": "cat setup.cfg"}, "[tool]\nx = 1\n"),
                   ("write_file", {"path": "app.py", "content": "new\n"}, "Wrote 4 bytes to app.py"),
                   ("shell", {"command": "cat app.py"}, "new\n"))]
    sim = ToolSimulator(conv, ["rules"], replay_at=1)
    assert run(sim, "read_file", path="setup.cfg").content == "[tool]\nx = 1\n"
    assert run(sim, "read_file", path="app.py").content == "Error: file not found: app.py"


def test_a_test_run_the_llm_source_could_not_answer_has_an_unknown_outcome(server: ServerProcess) -> None:
    script = [{"name": "write_file", "arguments": {"path": "src/billing.py", "content": FIXED}},
              {"name": "shell", "arguments": {"command": "pytest"}},
              {"name": "shell", "arguments": {"command": "make lint"}}]
    conv = conversation("c2", script=script)
    conv["messages"] += LATER
    sample, frame = turn_frames([conv])
    cfg = ReplayCfg(simulator_chain=["recorded", "rules", "llm"])  # no simulator endpoint for a real candidate
    traj, _ = asyncio.run(replay_sample(sample, frame, Endpoint(base_url=server.url, model="script#nollm"), cfg, 0))
    row = traj.row(0, named=True)
    tool_msgs = [m["content"] for m in json.loads(row["messages"]) if m["role"] == "tool"]
    results = json.loads(row["tool_results"])
    assert [r["source"] for r in results] == ["rules", "error", "error"]
    assert results[1]["outcome"] == "unknown" and results[1]["reason"].startswith("simulator_unconfigured")
    assert tool_msgs[1].startswith(UNKNOWN_TEST_OUTCOME) and "12 passed" not in tool_msgs[1]
    assert "outcome" not in results[2] and tool_msgs[2].startswith("Error: tool 'shell' returned no result")
