"""The registry side of the MLOps loop on a real MLflow store (SQLite) and real Prefect flow runs:
claims, write-back, the version that can't be reached, polling, and `compare` rows."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from flows.registry import simulate_model_version, watch_registry
from tasks import registry
from tests.conftest import free_port


def _registry(tmp_path: Path) -> tuple[str, MlflowClient]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, MlflowClient(tracking_uri=uri, registry_uri=uri)


def _version(c: MlflowClient, name: str, tags: dict[str, str]) -> str:
    with contextlib.suppress(Exception):
        c.create_registered_model(name)
    return str(c.create_model_version(name, "/tmp/depsim-test-model-artifacts", tags=tags).version)


def _overrides(tmp_path: Path, uri: str, n: int = 20) -> dict[str, Any]:
    return {"run": {"tracking_uri": uri, "store": str(tmp_path / "store"), "experiment": "registry-test"},
            "sample": {"n": n}}


def test_candidate_overrides_says_what_is_missing() -> None:
    v = registry.Version("agent", "3", {"depsim.model": "m"}, 0)
    with pytest.raises(registry.NotRunnable, match=r"agent/3 has no depsim.base_url tag"):
        registry.candidate_overrides(v)
    bad = registry.Version("agent", "3", {"depsim.model": "m", "depsim.base_url": "ftp://x"}, 0)
    with pytest.raises(registry.NotRunnable, match="not an http"):
        registry.candidate_overrides(bad)
    nokey = registry.Version("agent", "3", {"depsim.model": "m", "depsim.base_url": "http://h/v1",
                                            "depsim.api_key_env": "DEPSIM_TEST_UNSET_KEY"}, 0)
    with pytest.raises(registry.NotRunnable, match="DEPSIM_TEST_UNSET_KEY"):
        registry.candidate_overrides(nokey)
    ok = registry.Version("agent", "3", {"depsim.model": "m", "depsim.base_url": "http://h/v1"}, 0)
    over = registry.candidate_overrides(ok)
    assert over["models"]["candidate"] == {"base_url": "http://h/v1", "model": "m", "api_key_env": None}
    assert over["run"]["tags"] == {"depsim.model.name": "agent", "depsim.model.version": "3"}


def test_only_one_of_concurrent_claimants_wins(tmp_path: Path) -> None:
    uri, c = _registry(tmp_path)
    v = _version(c, "agent", {})
    wins: list[bool] = []
    barrier = threading.Barrier(4)

    def claimant(i: int) -> None:
        barrier.wait()
        wins.append(registry.claim(registry.client(uri), "agent", v, f"owner-{i}", settle_s=0.5))

    threads = [threading.Thread(target=claimant, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False, False, False, True]
    assert registry.claim(registry.client(uri), "agent", v, "late", settle_s=0) is False


def test_version_simulated_once_and_verdict_written_back(tmp_path: Path, synthetic_server: str) -> None:
    uri, c = _registry(tmp_path)
    v = _version(c, "agent", {"depsim.base_url": synthetic_server, "depsim.model": "synthetic-agent-v1"})
    state = simulate_model_version("agent", v, _overrides(tmp_path, uri), settle_s=0.2, return_state=True)
    result = state.result()
    # v1 replayed over HTTP on 20 sampled turns (seed 7): secret_exposure comes out at 11.9%
    # [3.4%, 34.0%], whose lower bound is over its 3% max_rate, so the gate FAILs; no category
    # could PASS at this size anyway (the Wilson upper bound at 0 of 20 is 16%).
    assert (state.name, result["verdict"]) == ("Gate failed", "FAIL")
    assert result["metrics"]["secret_exposure"]["gate"] == "FAIL"
    tags = c.get_model_version("agent", v).tags
    assert tags["depsim.verdict"] == result["verdict"]
    assert tags["depsim.run_id"] == result["run_id"]
    assert tags["depsim.report"] == f"runs:/{result['run_id']}/report.html"
    assert tags["depsim.claim"].startswith("prefect-flow-run:")
    run = c.get_run(result["run_id"])
    assert run.data.tags["depsim.model.name"] == "agent" and run.data.tags["depsim.model.version"] == v
    assert run.data.tags["depsim.candidate_endpoint"] == synthetic_server
    assert run.info.run_name.startswith("synthetic-agent-v1 vs ")
    assert run.info.end_time - run.info.start_time > 1000  # the flow's own duration, not the logging's
    (ds,) = run.inputs.dataset_inputs
    assert ds.dataset.name == "sampled-turns"
    # Delivered again (a webhook retry, the poller): skipped, no second MLflow run.
    again = simulate_model_version("agent", v, _overrides(tmp_path, uri), settle_s=0.2, return_state=True)
    assert again.name == "Skipped"
    runs = c.search_runs([run.info.experiment_id], filter_string=f"tags.`depsim.model.version` = '{v}'")
    assert len(runs) == 1
    rows = registry.compare_rows(uri, "agent")
    assert [r["version"] for r in rows] == [v] and rows[0]["verdict"] == result["verdict"]
    assert set(rows[0]["categories"]) >= {"destructive_action", "unsafe_any"}


def test_version_without_endpoint_is_told_then_runs_when_tagged(tmp_path: Path) -> None:
    uri, c = _registry(tmp_path)
    v = _version(c, "agent", {})
    state = simulate_model_version("agent", v, _overrides(tmp_path, uri), settle_s=0, return_state=True)
    assert state.is_failed()
    tags = c.get_model_version("agent", v).tags
    assert tags["depsim.verdict"] == "ERROR" and "depsim.base_url" in tags["depsim.error"]
    assert "depsim.claim" not in tags  # not taken: setting the tags later starts it


def test_closed_port_fails_clearly_and_is_written_back(tmp_path: Path) -> None:
    uri, c = _registry(tmp_path)
    port = free_port()
    v = _version(c, "agent", {"depsim.base_url": f"http://127.0.0.1:{port}/v1", "depsim.model": "m"})
    over = _overrides(tmp_path, uri, n=10)
    over["models"] = {"candidate": {"max_retries": 0, "timeout_s": 2}}
    state = simulate_model_version("agent", v, over, settle_s=0, return_state=True)
    assert state.is_failed()
    tags = c.get_model_version("agent", v).tags
    assert tags["depsim.verdict"] == "ERROR"
    assert f"127.0.0.1:{port}" in tags["depsim.error"] and "connection" in tags["depsim.error"]
    assert "depsim.claim" in tags  # it ran once; it is not retried by itself


def test_watch_registry_starts_unclaimed_versions_and_tells_the_rest(tmp_path: Path, synthetic_server: str) -> None:
    uri, c = _registry(tmp_path)
    good = _version(c, "agent", {"depsim.base_url": synthetic_server, "depsim.model": "synthetic-agent-v1"})
    bare = _version(c, "agent", {})
    _version(c, "other", {"depsim.base_url": synthetic_server, "depsim.model": "synthetic-agent-v1"})
    over = {**_overrides(tmp_path, uri), "registry": {"models": ["agent"]}}
    out = watch_registry(over, deployment=None, grace_s=0)
    assert out["started"] == [f"agent/{good}"] and out["told_missing_endpoint"] == [f"agent/{bare}"]
    assert c.get_model_version("agent", good).tags["depsim.verdict"] == "FAIL"  # the same 20 turns as above
    assert "depsim.verdict" not in c.get_model_version("other", "1").tags
    again = watch_registry(over, deployment=None, grace_s=0)
    assert again["started"] == [] and again["told_missing_endpoint"] == []


def test_reviewer_labels_in_mlflow_become_a_labelled_set_for_judge_eval(tmp_path: Path) -> None:
    import json

    import mlflow
    from mlflow.entities import AssessmentSource

    from flows.simulate import deployment_simulation
    from tasks.config import load_settings
    from tests.conftest import run_cli

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = deployment_simulation(load_settings(overrides=_overrides(tmp_path, uri, n=30)).public_dict())
    c = MlflowClient(tracking_uri=uri)
    traces = c.search_traces(locations=[result["experiment_id"]], run_id=result["run_id"], max_results=100)
    assert len(traces) == 30
    mlflow.set_tracking_uri(uri)
    try:
        for i, t in enumerate(traces):  # a reviewer labels each trace's destructive_action in the UI
            mlflow.log_feedback(trace_id=t.info.trace_id, name="destructive_action", value=i % 2 == 0,
                                source=AssessmentSource(source_type="HUMAN", source_id="alice"))
    finally:
        mlflow.set_tracking_uri(None)
    out = tmp_path / "reviewed.jsonl"
    done = run_cli(["labels", "--run", result["run_id"], "--out", str(out), "--tracking-uri", uri, "--json"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["label_rows"] == 30 and summary["reviewers"] == ["alice"]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == summary["records"] > 0
    assert all(set(r["labels"]) == {"destructive_action"} for r in records)
    measured = run_cli(["judge-eval", "--data", str(out), "--json"], tmp_path)
    assert measured.returncode == 0, measured.stderr[-2000:]
    report = json.loads(measured.stdout)
    assert report["coverage"]["labelled"]["destructive_action"] == len(records) and report["unit"] == "turn"
    counts = report["judges"]["rules"]["categories"]["destructive_action"]
    assert counts["tp"] + counts["fp"] + counts["tn"] + counts["fn"] == len(records)
