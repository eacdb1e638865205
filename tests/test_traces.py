"""Replayed turns as MLflow traces (tasks/traces.py), on real stores: a temporary SQLite store and,
end to end, `mlflow server` over HTTP. The tables come from the real stages (load, contract
check, sample, replay against the in-process SYNTHETIC world, rules judge) on the bundled logs."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import mlflow
import polars as pl
import pytest
from mlflow.entities import AssessmentSource
from mlflow.tracking import MlflowClient

from tasks.config import load_settings
from tasks.judge import judge_trajectories
from tasks.load import dataset_hash, load_raw
from tasks.replay import baseline_trajectories, replay_sample
from tasks.stages import contract_check, draw_sample, judge_eval
from tasks.taxonomy import AGGREGATE, ALL_CATEGORIES, load_taxonomy
from tasks.trace_labels import human_labels, labelled_set
from tasks.traces import REDACTED, delete_turn_traces, log_turn_traces, secret_values
from tests.conftest import free_port, write_jsonl

N = 20


@pytest.fixture(scope="module")
def world() -> dict[str, Any]:
    """A real replay of N sampled turns of the bundled SYNTHETIC logs, judged by the rules judge."""
    s = load_settings(overrides={"sample": {"n": N}})
    valid = contract_check(load_raw(s.run.data), s).valid
    sample, _, _, _ = draw_sample(valid, s)
    stats: dict[str, Any] = {}
    cfg = s.replay.model_copy(update={"cache": False, "cache_dir": None})
    candidate, _ = asyncio.run(replay_sample(sample, valid, s.models.candidate, cfg, s.run.seed, stats=stats,
                                            simulator=s.models.simulator))
    both = pl.concat([candidate, baseline_trajectories(sample, valid)])
    scores, per_judge, info = judge_trajectories(both, valid, sample, load_taxonomy(s.judge.taxonomy),
                                                 list(s.judge.kinds), s)
    return {"s": s, "valid": valid, "sample": sample, "candidate": candidate, "calls": stats["calls"],
            "scores": scores, "per_judge": per_judge, "judges": info["provenance"]}


def _run(uri: str) -> tuple[MlflowClient, str, str]:
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("depsim")
    return client, exp, client.create_run(exp, run_name="sim").info.run_id


def _log(uri: str, exp: str, run_id: str, w: dict[str, Any], **kw: Any) -> dict[str, int]:
    kw = {"conversations": w["valid"], "model_calls": w["calls"], "judge_verdicts": w["per_judge"],
          "judges": w["judges"], **kw}
    return log_turn_traces(uri, exp, run_id, kw.pop("candidate", w["candidate"]), kw.pop("scores", w["scores"]),
                           w["sample"], **kw)


def _traces(client: MlflowClient, exp: str, run_id: str, spans: bool = True) -> dict[str, Any]:
    found = client.search_traces(locations=[exp], run_id=run_id, include_spans=spans, max_results=500)
    return {t.info.tags["depsim.turn_id"]: t for t in found}


def _verdicts(scores: pl.DataFrame, side: str = "candidate") -> dict[str, dict[str, bool | None]]:
    out: dict[str, dict[str, bool | None]] = {}
    for r in scores.filter(pl.col("side") == side).iter_rows(named=True):
        out.setdefault(r["turn_id"], {})[r["category"]] = r["verdict"]
    return out


def test_each_turn_is_a_trace_with_model_calls_tools_and_judge_verdicts(world: dict[str, Any], tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client, exp, run_id = _run(uri)
    counts = _log(uri, exp, run_id, world)
    verdicts = _verdicts(world["scores"])
    flagged = {t for t, v in verdicts.items() if any(v.values())}
    assert counts["traces"] == N and counts["assessments"] == N * len(ALL_CATEGORIES)
    assert counts["flagged"] == len(flagged)

    traces = _traces(client, exp, run_id)  # linked to the run: found through run_id
    assert sorted(traces) == sorted(world["candidate"]["turn_id"].to_list())
    calls = {k: v.sort("step") for (k,), v in world["calls"].group_by("turn_id")}
    convs = {r["conversation_id"]: json.loads(r["messages"]) for r in world["valid"].iter_rows(named=True)}
    users = dict(world["sample"].select("turn_id", "user_msg_index").iter_rows())
    sources_seen: set[str] = set()
    for row in world["candidate"].iter_rows(named=True):
        tr = traces[row["turn_id"]]
        info, spans = tr.info, tr.data.spans
        assert info.trace_metadata["mlflow.sourceRun"] == run_id
        assert info.token_usage == {"input_tokens": row["prompt_tokens"], "output_tokens": row["completion_tokens"],
                                    "total_tokens": row["prompt_tokens"] + row["completion_tokens"]}
        root = next(s for s in spans if s.parent_id is None)
        assert root.span_type == "AGENT" and root.name == row["turn_id"]
        assert root.attributes["depsim.finish"] == row["finish"]
        assert root.attributes["depsim.conversation_id"] == row["conversation_id"]
        assert root.inputs["messages"][-1]["content"] == convs[row["conversation_id"]][users[row["turn_id"]]]["content"]
        answer = [m for m in json.loads(row["messages"]) if m["role"] == "assistant"][-1]
        assert root.outputs == (None if answer.get("tool_calls") else answer.get("content") or None)

        chat = sorted((s for s in spans if s.span_type == "CHAT_MODEL"), key=lambda s: s.start_time_ns)
        rows = list(calls[row["turn_id"]].iter_rows(named=True))
        assert len(chat) == len(rows) == row["steps"]
        for span, call in zip(chat, rows, strict=True):
            assert span.attributes["mlflow.chat.tokenUsage"]["input_tokens"] == call["prompt_tokens"]
            assert span.attributes["mlflow.chat.tokenUsage"]["output_tokens"] == call["completion_tokens"]
            assert abs((span.end_time_ns - span.start_time_ns) - call["latency_s"] * 1e9) < 1_000
        assert root.end_time_ns - root.start_time_ns >= sum(s.end_time_ns - s.start_time_ns for s in chat)

        results = json.loads(row["tool_results"])
        tools = sorted((s for s in spans if s.span_type == "TOOL"), key=lambda s: int(s.name.rsplit("[", 1)[1][:-1]))
        assert [s.attributes["depsim.tool.source"] for s in tools] == [r["source"] for r in results]
        assert [s.attributes["depsim.tool.call_id"] for s in tools] == [r["call_id"] for r in results]
        assert [s.attributes["depsim.tool.effects"] for s in tools] == [r["effects"] for r in results]
        assert all(isinstance(s.inputs, dict) and "content" in s.outputs for s in tools)
        sources_seen.update(r["source"] for r in results)
        assert {s.name for s in spans if s.span_type == "EVALUATOR"} >= {"judge rules"}

        got = {a.name: a for a in info.assessments}
        assert {k: a.value for k, a in got.items()} == verdicts[row["turn_id"]]
        assert all(a.source.source_type == "CODE" and a.source.source_id in ("rules", "aggregate")
                   for a in got.values())
        assert all(a.metadata["mlflow.assessment.sourceRunId"] == run_id for a in got.values())
        mine = [c for c in ALL_CATEGORIES if c != AGGREGATE and verdicts[row["turn_id"]][c]]
        assert info.tags["depsim.flagged"] == str(bool(mine)).lower()
        assert info.tags["depsim.categories"] == (",".join(mine) or "none")
        assert all(info.tags[f"depsim.flag.{c}"] == "true" for c in mine)
        assert info.tags["depsim.turn_index"] == str(int(row["turn_id"].rsplit("#", 1)[1]))
        for c in mine:
            assert got[c].rationale and got[c].rationale.startswith("evidence: ")
    assert sources_seen >= {"recorded", "rules"}  # the simulator chain answered from several sources

    hits = client.search_traces(locations=[exp], filter_string="tags.`depsim.flagged` = 'true'", max_results=500)
    assert {t.info.tags["depsim.turn_id"] for t in hits} == flagged
    one = next(iter(traces.values()))
    assert mlflow.MlflowClient(uri).get_trace(one.info.trace_id).info.trace_id == one.info.trace_id


def test_limit_logs_flagged_turns_first_a_rerun_adds_the_rest_delete_removes_all(world: dict[str, Any], tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client, exp, run_id = _run(uri)
    flagged = {t for t, v in _verdicts(world["scores"]).items() if any(v.values())}
    assert flagged, "the SYNTHETIC candidate should misbehave on some of the sampled turns"
    k = len(flagged) + 2
    assert _log(uri, exp, run_id, world, limit=k)["traces"] == k
    assert flagged <= set(_traces(client, exp, run_id, spans=False))
    again = _log(uri, exp, run_id, world)
    assert again["traces"] == N - k and again["skipped_existing"] == k
    assert len(_traces(client, exp, run_id, spans=False)) == N
    assert delete_turn_traces(uri, exp, run_id) == N
    assert _traces(client, exp, run_id, spans=False) == {}


def test_an_endpoint_error_is_an_error_trace_with_unscored_assessments(world: dict[str, Any], tmp_path: Path) -> None:
    s, first = world["s"], world["candidate"].row(0, named=True)
    broken = world["candidate"].with_columns(
        pl.when(pl.col("turn_id") == first["turn_id"]).then(pl.lit(v)).otherwise(pl.col(c)).alias(c)
        for c, v in (("messages", "[]"), ("tool_results", "[]"), ("finish", "error"), ("error", "timeout: 60 s")))
    both = pl.concat([broken, baseline_trajectories(world["sample"], world["valid"])])
    scores, per_judge, _ = judge_trajectories(both, world["valid"], world["sample"], load_taxonomy(s.judge.taxonomy),
                                              list(s.judge.kinds), s)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client, exp, run_id = _run(uri)
    calls = world["calls"].filter(pl.col("turn_id") != first["turn_id"])
    _log(uri, exp, run_id, world, candidate=broken, scores=scores, model_calls=calls, judge_verdicts=per_judge)
    tr = _traces(client, exp, run_id)[first["turn_id"]]
    assert tr.info.state == "ERROR" and tr.info.tags["depsim.finish"] == "error"
    assert {a.name for a in tr.info.assessments} == set(ALL_CATEGORIES)
    for a in tr.info.assessments:
        assert a.value is None and a.error is not None and a.error.error_code == "UNSCORED"
        assert "timeout" in a.error.error_message
    assert tr.info.tags["depsim.unscored"] == ",".join(ALL_CATEGORIES)


def test_without_the_call_log_the_turn_totals_sit_on_the_root(world: dict[str, Any], tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client, exp, run_id = _run(uri)
    log_turn_traces(uri, exp, run_id, world["candidate"], world["scores"], world["sample"])
    traces = _traces(client, exp, run_id)
    for row in world["candidate"].iter_rows(named=True):
        tr = traces[row["turn_id"]]
        root = next(s for s in tr.data.spans if s.parent_id is None)
        assert root.inputs is None  # no conversations given: no prefix to show
        assert root.attributes["mlflow.chat.tokenUsage"]["input_tokens"] == row["prompt_tokens"]
        chat = [s for s in tr.data.spans if s.span_type == "CHAT_MODEL"]
        assert len(chat) == sum(m["role"] == "assistant" for m in json.loads(row["messages"]))
        assert all("mlflow.chat.tokenUsage" not in s.attributes for s in chat)
        assert tr.info.token_usage["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"]


def test_secrets_never_reach_a_trace(world: dict[str, Any], tmp_path: Path) -> None:
    secret = "sk-live-7Hq2vN9xW4pL8rT1"
    row = next(r for r in world["candidate"].iter_rows(named=True) if json.loads(r["tool_results"]))
    msgs = json.loads(row["messages"])
    tool = next(m for m in msgs if m["role"] == "tool")
    head = f"config loaded\nOPENAI_API_KEY={secret}\n"
    tool["content"] = head + "x" * (3990 - len(head)) + secret  # straddles the 4,000-character clip
    call = next(m for m in msgs if m.get("tool_calls"))
    call["tool_calls"][0]["function"]["arguments"] = json.dumps({"command": f"curl -H 'Authorization: Bearer {secret}'"})
    planted = world["candidate"].with_columns(
        messages=pl.when(pl.col("turn_id") == row["turn_id"]).then(pl.lit(json.dumps(msgs))).otherwise("messages"),
        error=pl.when(pl.col("turn_id") == row["turn_id"]).then(pl.lit(f"internal: key {secret}")).otherwise("error"))
    scores = world["scores"].with_columns(evidence=pl.when(pl.col("turn_id") == row["turn_id"])
                                          .then(pl.lit(f"printed {secret}")).otherwise("evidence"))
    valid = world["valid"].with_columns(messages=pl.col("messages").str.replace(r'"content": "', f'"content": "{secret} '))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client, exp, run_id = _run(uri)
    _log(uri, exp, run_id, world, candidate=planted, scores=scores, conversations=valid, secrets=[secret, "abc"])
    dumps = [t.to_json() for t in _traces(client, exp, run_id).values()]
    assert len(dumps) == N
    assert not any(secret[:10] in d for d in dumps)  # not even the part before the clip
    assert sum(REDACTED in d for d in dumps) >= 2  # the planted turn and prefixes all carry the mark
    assert any("abc" in d for d in dumps)  # a value under 4 characters is not treated as a secret


def test_secret_values_are_the_keys_the_endpoints_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEPSIM_TEST_CANDIDATE_KEY", "sk-cand-123456")
    monkeypatch.setenv("DEPSIM_TEST_JUDGE_KEY", "sk-judge-654321")
    monkeypatch.delenv("DEPSIM_TEST_UNSET_KEY", raising=False)
    s = load_settings(overrides={"models": {
        "candidate": {"base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": "DEPSIM_TEST_CANDIDATE_KEY"},
        "judge": {"base_url": "http://127.0.0.1:9/v1", "model": "j", "api_key_env": "DEPSIM_TEST_JUDGE_KEY"},
        "simulator": {"base_url": "http://127.0.0.1:9/v1", "model": "s", "api_key_env": "DEPSIM_TEST_UNSET_KEY"}}})
    assert secret_values(s) == ["sk-cand-123456", "sk-judge-654321"]


def test_human_labels_added_in_the_ui_are_read_back(world: dict[str, Any], tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client, exp, run_id = _run(uri)
    _log(uri, exp, run_id, world, limit=3)
    traces = _traces(client, exp, run_id, spans=False)
    (a_id, a), (b_id, b) = list(traces.items())[:2]
    human = AssessmentSource(source_type="HUMAN", source_id="alice")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:  # what the UI's "add assessment" does: a feedback with a HUMAN source on the trace
        mlflow.log_feedback(trace_id=a.info.trace_id, name="secret_exposure", value=True, source=human,
                            rationale="prints the token")
        time.sleep(0.01)
        mlflow.log_feedback(trace_id=a.info.trace_id, name="secret_exposure", value=False, source=human,
                            rationale="on second look, a placeholder")  # alice's latest label wins
        mlflow.log_feedback(trace_id=a.info.trace_id, name="destructive_action", value="yes",
                            source=AssessmentSource(source_type="HUMAN", source_id="bob"))
        mlflow.log_feedback(trace_id=b.info.trace_id, name="unsafe_any", value=True, source=human)
        mlflow.log_feedback(trace_id=b.info.trace_id, name="tone", value=True, source=human)  # not a category
        mlflow.log_feedback(trace_id=b.info.trace_id, name="insecure_code", value=True,
                            source=AssessmentSource(source_type="CODE", source_id="other"))  # not a human
    finally:
        mlflow.set_tracking_uri(previous)
    labels = human_labels(uri, run_id)
    got = {(r["turn_id"], r["category"], r["reviewer"]): (r["label"], r["rationale"]) for r in labels.iter_rows(named=True)}
    assert got == {(a_id, "secret_exposure", "alice"): (False, "on second look, a placeholder"),
                   (a_id, "destructive_action", "bob"): (True, None),
                   (b_id, "unsafe_any", "alice"): (True, None)}
    row = labels.filter(pl.col("turn_id") == b_id).row(0, named=True)
    conv, index = b_id.rsplit("#", 1)
    assert (row["conversation_id"], row["turn_index"], row["trace_id"]) == (conv, int(index), b.info.trace_id)


def test_labelled_set_is_what_judge_eval_measures(world: dict[str, Any], tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client, exp, run_id = _run(uri)
    _log(uri, exp, run_id, world)
    store = tmp_path / "run"
    store.mkdir()
    world["candidate"].write_parquet(store / "trajectories.parquet")
    world["sample"].write_parquet(store / "sample.parquet")
    (store / "config.json").write_text(json.dumps(world["s"].public_dict()))
    traces = _traces(client, exp, run_id, spans=False)
    first = [t for t, i in world["sample"].select("turn_id", "turn_index").iter_rows() if i == 0]
    later = [t for t, i in world["sample"].select("turn_id", "turn_index").iter_rows() if i > 0]
    assert len(first) >= 4 and later
    verdicts = _verdicts(world["scores"])
    # The reviewer agrees with the judge on all but one first turn, and labels a later turn too.
    labels = {t: (not verdicts[t]["unsafe_any"]) if k == 0 else bool(verdicts[t]["unsafe_any"])
              for k, t in enumerate(first)}
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        for t, value in {**labels, later[0]: True}.items():
            for reviewer in ("alice", "bob"):
                mlflow.log_feedback(trace_id=traces[t].info.trace_id, name="unsafe_any", value=value,
                                    source=AssessmentSource(source_type="HUMAN", source_id=reviewer))
    finally:
        mlflow.set_tracking_uri(previous)
    records = labelled_set(uri, run_id, str(store))  # conversations loaded again from config.json
    assert sorted(r["conversation_id"] for r in records) == sorted(first)  # the later turn is left out
    assert all(r["labels"] == {"unsafe_any": labels[r["conversation_id"]]} for r in records)
    data = write_jsonl(tmp_path / "labelled.jsonl", records)
    # What `depsim judge-eval --data labelled.jsonl --judges rules` runs: load, contract check, measure.
    s = load_settings(overrides={"run": {"data": str(data)}, "judge": {"kinds": ["rules"]}})
    raw = load_raw(s.run.data)
    checked = contract_check(raw, s)
    assert checked.rows_quarantined == 0, checked.quarantine
    out, coverage, _ = judge_eval(checked.valid, s, ["rules"], [str(data)], dataset_hash(raw))
    assert out["unit"] == "turn" and coverage["labelled_conversations"] == len(first)
    m = out["judges"]["combined"]["categories"]["unsafe_any"]
    pairs = [(labels[t], bool(verdicts[t]["unsafe_any"])) for t in first]
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (sum(lab and v for lab, v in pairs),
                                                    sum(v and not lab for lab, v in pairs),
                                                    sum(not lab and not v for lab, v in pairs),
                                                    sum(lab and not v for lab, v in pairs))


@pytest.fixture()
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """`mlflow server` on a loopback port with a SQLite backend; stopped by pid."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                             "--default-artifact-root", str(tmp_path / "artifacts")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    try:
        while True:
            if proc.poll() is not None or time.time() > deadline:
                pytest.skip("mlflow server did not start")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.e2e
def test_traces_over_http_to_an_mlflow_server(world: dict[str, Any], mlflow_server: str) -> None:
    client, exp, run_id = _run(mlflow_server)
    counts = _log(mlflow_server, exp, run_id, world)
    assert counts["traces"] == N
    traces = _traces(client, exp, run_id)
    assert len(traces) == N
    verdicts = _verdicts(world["scores"])
    for turn_id, tr in traces.items():
        assert {a.name: a.value for a in tr.info.assessments} == verdicts[turn_id]
        assert {s.span_type for s in tr.data.spans} >= {"AGENT", "CHAT_MODEL", "EVALUATOR"}
    tid = next(iter(traces.values())).info.trace_id
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_server)
    try:
        mlflow.log_feedback(trace_id=tid, name="harmful_content", value=False,
                            source=AssessmentSource(source_type="HUMAN", source_id="carol"))
    finally:
        mlflow.set_tracking_uri(previous)
    labels = human_labels(mlflow_server, run_id)
    assert labels.select("category", "label", "reviewer").rows() == [("harmful_content", False, "carol")]
