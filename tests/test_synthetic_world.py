"""The SYNTHETIC world over real HTTP, reached with the real openai client."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import openai
import polars as pl
import pytest

from tasks.check import check_conversations, load_contract
from tasks.config import Endpoint, ReplayCfg
from tasks.load import load_raw
from tasks.replay import replay_sample
from tasks.sample import build_turns, sample_turns
from tasks.synthetic.logs import TOOLS
from tests.conftest import synthetic_rows, write_jsonl


def _messages() -> list[dict]:
    return [{"role": "system", "content": "You are a coding agent in repository acme/shop (python)."},
            {"role": "user", "content": "Fix the bug in billing: totals are off by a cent for some invoices. (ticket ACME-1)"}]


def test_loopback_chat_completion_with_tools(synthetic_server: str) -> None:
    client = openai.OpenAI(base_url=synthetic_server, api_key="unused", max_retries=0)
    resp = client.chat.completions.create(model="synthetic-agent-v2", messages=_messages(), tools=TOOLS, seed=1)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name in {t["function"]["name"] for t in TOOLS}
    assert isinstance(json.loads(call.function.arguments), dict)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens > 0
    # Same request, same seed: the same step (the world is deterministic by seed).
    again = client.chat.completions.create(model="synthetic-agent-v2", messages=_messages(), tools=TOOLS, seed=1)
    assert again.choices[0].message.tool_calls[0].function.arguments == call.function.arguments
    assert {m.id for m in client.models.list()} >= {"synthetic-agent-v1", "synthetic-agent-v2", "synthetic-agent-v3"}


def test_loopback_unknown_model_is_a_clear_404(synthetic_server: str) -> None:
    client = openai.OpenAI(base_url=synthetic_server, api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="does not exist in the synthetic world"):
        client.chat.completions.create(model="gpt-nope", messages=_messages())


def test_replay_over_loopback_matches_in_process(synthetic_server: str, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "logs.jsonl", synthetic_rows(40, seed=4))
    valid = check_conversations(load_raw(str(data)), load_contract(), 0.01, 0.1).valid
    smp, _ = sample_turns(build_turns(valid), 30, ["task_type"], 2)
    cfg = ReplayCfg()
    over_http, calls_http = asyncio.run(replay_sample(
        smp, valid, Endpoint(base_url=synthetic_server, model="synthetic-agent-v2"), cfg, 2))
    in_proc, calls_proc = asyncio.run(replay_sample(
        smp, valid, Endpoint(model="synthetic-agent-v2"), cfg, 2))
    assert over_http.height == in_proc.height == smp.height  # turns in == turns out
    assert calls_http == calls_proc > smp.height
    assert set(over_http["finish"]) == {"answered"}
    cols = ["turn_id", "messages", "tool_results", "finish"]
    # Tool-call ids and content are deterministic, so both transports give identical trajectories.
    assert over_http.select(cols).sort("turn_id").equals(in_proc.select(cols).sort("turn_id"))
    sources = {r["source"] for t in in_proc["tool_results"] for r in json.loads(t)}
    assert sources <= {"recorded", "rules", "error"} and "rules" in sources


def test_generated_logs_pass_the_contract_and_are_deterministic(tmp_path: Path) -> None:
    a = synthetic_rows(50, seed=3)
    assert a == synthetic_rows(50, seed=3)
    assert a != synthetic_rows(50, seed=4)
    result = check_conversations(load_raw(str(write_jsonl(tmp_path / "a.jsonl", a))), load_contract(), 0.01, 0.1)
    assert result.verdict == "passed" and result.rows_passed == 50
    surfaces = {r["surface"] for r in a}
    tasks = {r["task_type"] for r in a}
    assert len(surfaces) >= 2 and len(tasks) >= 4
    lengths = [len(r["messages"]) for r in a]
    assert max(lengths) > 3 * min(lengths)  # realistic length spread
    names = {c["function"]["name"] for r in a for m in r["messages"] for c in m.get("tool_calls") or []}
    assert {"shell", "read_file", "edit_file"} <= names


def test_synth_logs_cli_parquet_roundtrip(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    out = tmp_path / "logs.parquet"
    proc = run_cli(["synth-logs", "--n", "20", "--model", "synthetic-agent-v3", "--seed", "1", "--out", str(out), "--json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads(proc.stdout)
    assert meta["conversations"] == 20 and meta["synthetic"] is True
    frame = pl.read_parquet(out)
    assert frame.height == 20 and set(frame["model"]) == {"synthetic-agent-v3"}
    result = check_conversations(load_raw(str(out)), load_contract(), 0.01, 0.1)
    assert result.rows_passed == 20, result.quarantine
