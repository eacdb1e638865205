"""Replay under injected faults, against a real loopback endpoint (tests/faulty_server.py).

Each fault either heals on retry (the turn is answered, the retry counted) or ends the turn as
`error` with a countable reason; either way every turn comes out, and counts by finish and by
error reason are read straight from the trajectory table.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import polars as pl
import pytest

from tasks.config import Endpoint, ReplayCfg
from tasks.replay import replay_sample
from tests.faulty_server import ServerProcess, conversation, start_server, turn_frames

# Short timeouts and back-offs keep the suite fast; the policy is the production one.
FAST = {"timeout_s": 0.4, "max_retries": 2, "backoff_s": 0.02, "backoff_max_s": 0.1}


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    srv = start_server()
    yield srv
    srv.stop()


def replay(server: ServerProcess, convs: list[dict[str, Any]], model: str,
           **endpoint: Any) -> tuple[pl.DataFrame, dict[str, Any]]:
    sample, frame = turn_frames(convs)
    stats: dict[str, Any] = {}
    traj, _ = asyncio.run(replay_sample(sample, frame, Endpoint(base_url=server.url, model=model, **{**FAST, **endpoint}),
                                        ReplayCfg(), 0, stats=stats))
    assert traj["turn_id"].to_list() == sample["turn_id"].to_list()  # turns in == turns out, in order
    return traj, stats


def reason(error: str | None) -> str | None:
    return None if error is None else error.split(":")[0]


# (behaviour, finish, error reason, retries, requests the endpoint received)
HEALS = [
    ("fault-429-then-ok", "answered", None, 1, 2),
    ("fault-503-then-ok", "answered", None, 1, 2),
    ("fault-500-then-ok", "answered", None, 1, 2),
    ("fault-drop-then-ok", "answered", None, 1, 2),
    ("fault-hang-then-ok", "answered", None, 1, 2),
    ("fault-malformed-then-ok", "answered", None, 1, 2),
]
FAILS = [
    ("fault-500", "error", "http_500", 2, 3),
    ("fault-drop", "error", "connection", 2, 3),
    ("fault-hang", "error", "timeout", 2, 3),
    ("fault-malformed", "error", "malformed_response", 2, 3),
    ("fault-badshape", "error", "malformed_response", 2, 3),
    ("fault-400", "error", "http_400", 0, 1),           # a client error is not retried
    ("length", "error", "max_tokens", 0, 1),
]


@pytest.mark.parametrize(("behaviour", "finish", "why", "retries", "requests"), HEALS + FAILS,
                         ids=[c[0] for c in HEALS + FAILS])
def test_each_fault_heals_or_ends_the_turn_with_its_reason(server: ServerProcess, behaviour: str, finish: str,
                                                           why: str | None, retries: int, requests: int) -> None:
    model = f"{behaviour}#single"
    traj, stats = replay(server, [conversation("c1")], model)
    row = traj.row(0, named=True)
    assert (row["finish"], reason(row["error"])) == (finish, why), row["error"]
    assert stats["retries"] == retries and stats["calls"]["retries"].to_list() == [retries]
    assert server.requests(model) == requests
    assert stats["model_calls"] == row["model_calls"] == 1


@pytest.mark.parametrize("status", ["429", "503"])
def test_retry_after_is_honoured(server: ServerProcess, status: str) -> None:
    model = f"fault-{status}-then-ok#wait"
    traj, _ = replay(server, [conversation("c1")], model, backoff_s=5.0, backoff_max_s=5.0)  # not a back-off
    assert traj["finish"][0] == "answered"
    first, second = (e for e in server.log() if e["model"] == model)
    assert (first["attempt"], second["attempt"]) == (1, 2)
    assert 1.0 <= second["t"] - first["t"] < 1.5   # waited as told (Retry-After: 1), not more


def test_retry_after_beyond_the_limit_fails_without_retrying(server: ServerProcess) -> None:
    model = "fault-429-then-ok#toolong"
    traj, stats = replay(server, [conversation("c1")], model, retry_after_max_s=0.5)
    assert traj["finish"][0] == "error" and traj["error"][0].startswith("http_429: Retry-After 1 s exceeds")
    assert stats["retries"] == 0 and server.requests(model) == 1


def test_mixed_faults_in_one_run_every_turn_comes_out_with_countable_reasons(server: ServerProcess) -> None:
    bad_args = [{"name": "read_file", "arguments": '{"path": '}, {"name": "nuke_repo", "arguments": "{}"}]
    plan = {  # conversation behaviour -> (finish, error reason)
        "ok": ("answered", None), "fault-429-then-ok": ("answered", None), "fault-500-then-ok": ("answered", None),
        "fault-drop-then-ok": ("answered", None), "fault-malformed-then-ok": ("answered", None),
        "fault-500": ("error", "http_500"), "fault-drop": ("error", "connection"),
        "fault-hang": ("error", "timeout"), "fault-malformed": ("error", "malformed_response"),
        "fault-400": ("error", "http_400"), "length": ("error", "max_tokens"), "refuse": ("refused", None),
        "script": ("answered", None),
    }
    convs = [conversation(f"t{i:02d}-{b}", behaviour=b, script=bad_args if b == "script" else None)
             for i, b in enumerate(list(plan) * 2)]
    traj, stats = replay(server, convs, "ok#mixed", concurrency=8)
    assert traj.height == len(convs) == 26
    for row in traj.iter_rows(named=True):
        want = plan[row["conversation_id"].split("-", 1)[1]]
        assert (row["finish"], reason(row["error"])) == want, row
    # Counts by finish and by error reason, straight from the trajectory table:
    assert Counter(traj["finish"]) == {"answered": 12, "error": 12, "refused": 2}
    assert Counter(reason(e) for e in traj["error"].drop_nulls()) == {
        "http_500": 2, "connection": 2, "timeout": 2, "malformed_response": 2, "http_400": 2, "max_tokens": 2}
    assert stats["retries"] == 2 * (4 + 4 * 2)   # 4 healed once, 4 retried to the limit, per copy
    scripted = traj.filter(pl.col("conversation_id").str.ends_with("-script"))
    for t in scripted["tool_results"]:
        assert [(r["source"], r["error"]) for r in json.loads(t)] == [("error", True), ("error", True)]
