"""End-to-end: the real CLI runs the Prefect flow and writes a real MLflow (SQLite) run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tasks.taxonomy import ALL_CATEGORIES
from tests.conftest import run_cli, synthetic_rows, write_jsonl

pytestmark = pytest.mark.e2e


def _runs(uri: str) -> list:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("depsim")
    return [] if exp is None else client.search_runs([exp.experiment_id])


def test_run_json_logs_everything_to_mlflow(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "logs.jsonl", synthetic_rows(300, seed=5))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli(["run", "--data", str(data), "--n", "300", "--seed", "3", "--store", str(tmp_path / "store"),
                    "--tracking-uri", uri, "--json"], cwd=tmp_path)
    assert proc.returncode in (0, 1, 3), proc.stderr
    out = json.loads(proc.stdout)  # exactly one JSON object on stdout
    assert {"run_id", "tracking_uri", "report", "verdict", "metrics", "model_calls", "elapsed_s"} <= set(out)
    assert proc.returncode == {"PASS": 0, "FAIL": 1, "INCONCLUSIVE": 3}[out["verdict"]]
    assert set(out["metrics"]) == set(ALL_CATEGORIES)
    for m in out["metrics"].values():
        assert 0 <= m["lower"] <= m["rate"] <= m["upper"] <= 1
    assert out["model_calls"] >= out["sampled_turns"] == 300

    run = MlflowClient(tracking_uri=uri).get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    for cat in ALL_CATEGORIES:
        assert run.data.metrics[f"{cat}.rate"] == pytest.approx(out["metrics"][cat]["rate"])
        assert f"{cat}.lower" in run.data.metrics and f"{cat}.upper" in run.data.metrics
        assert f"{cat}.delta" in run.data.metrics and f"{cat}.baseline_rate" in run.data.metrics
    assert run.data.metrics["contract.rows_quarantined"] == 0
    assert run.data.params["roles.candidate"] == "synthetic-agent-v2"
    assert run.data.tags["depsim.world"] == "synthetic"
    artifacts = {a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(out["run_id"])}
    assert {"report.html", "report.md", "sample.parquet", "scores.parquet", "estimates.parquet",
            "trajectories.parquet", "config.json"} <= artifacts

    page = Path(out["report"]).read_text()
    assert "<svg" in page and "SYNTHETIC" in page and "http" not in page.split("<body>")[0]
    for cat in ALL_CATEGORIES:
        assert cat in page


def test_malformed_lines_quarantined_under_limit(tmp_path: Path) -> None:
    rows: list = synthetic_rows(120, seed=8)
    rows.insert(10, "{not json")
    bad = dict(rows[20])
    bad["created_at"] = "last tuesday"
    rows.insert(30, bad)
    data = write_jsonl(tmp_path / "messy.jsonl", rows)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli(["run", "--data", str(data), "--n", "100", "--tracking-uri", uri,
                    "--store", str(tmp_path / "store")], cwd=tmp_path)
    assert proc.returncode in (0, 1, 3), proc.stderr
    assert f"{data}:11: json_parse" in proc.stderr
    assert f"{data}:31: created_at_format" in proc.stderr
    (run,) = _runs(uri)
    assert run.data.metrics["contract.rows_quarantined"] == 2
    assert run.data.metrics["contract.rows_in"] == 122


def test_malformed_over_limit_stops_without_mlflow_run(tmp_path: Path) -> None:
    rows: list = synthetic_rows(40, seed=9)
    rows += ["garbage line"] * 10  # 20% bad > 10% limit
    data = write_jsonl(tmp_path / "broken.jsonl", rows)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli(["run", "--data", str(data), "--tracking-uri", uri, "--store", str(tmp_path / "store"),
                    "--json"], cwd=tmp_path)
    assert proc.returncode == 4
    out = json.loads(proc.stdout)
    assert "contract check failed" in out["error"] and "json_parse=10" in out["error"]
    assert out["contract"]["rows_in"] == 50 and out["contract"]["rows_quarantined"] == 10
    assert "Traceback" not in proc.stderr
    assert _runs(uri) == []  # nothing half-written in MLflow


def test_user_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    proc = run_cli(["run", "--data", str(tmp_path / "missing.jsonl")], cwd=tmp_path)
    assert proc.returncode == 4
    assert "missing.jsonl: no such file or folder" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli(["run", "--seed", "abc"], cwd=tmp_path)
    assert proc.returncode == 2 and "--seed must be an integer" in proc.stderr


def test_secret_never_reaches_mlflow_or_report(tmp_path: Path, synthetic_server: str) -> None:
    secret = "sk-test-DO-NOT-LOG-0123456789abcdef"
    cfg = tmp_path / "real.yaml"
    cfg.write_text(f"models:\n  candidate:\n    base_url: {synthetic_server}\n    model: synthetic-agent-v2\n"
                   "    api_key_env: CANDIDATE_KEY_FOR_TEST\n")
    data = write_jsonl(tmp_path / "logs.jsonl", synthetic_rows(60, seed=2))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = tmp_path / "store"
    proc = run_cli(["run", "--config", str(cfg), "--data", str(data), "--n", "40", "--tracking-uri", uri,
                    "--store", str(store), "--json"], cwd=tmp_path, env={"CANDIDATE_KEY_FOR_TEST": secret})
    assert proc.returncode in (0, 1, 3), proc.stderr
    out = json.loads(proc.stdout)
    assert out["model_calls"] > 40  # the candidate really was called over HTTP
    run = MlflowClient(tracking_uri=uri).get_run(out["run_id"])
    assert run.data.params["config.models.candidate.api_key_env"] == "CANDIDATE_KEY_FOR_TEST"
    everything = json.dumps([run.data.params, run.data.tags]) + proc.stdout + proc.stderr
    for f in store.rglob("*"):
        if f.is_file():
            everything += f.read_bytes().decode("utf-8", "replace")
    for f in (tmp_path / "mlruns").rglob("*") if (tmp_path / "mlruns").exists() else []:
        if f.is_file():
            everything += f.read_bytes().decode("utf-8", "replace")
    assert secret not in everything
    proc = run_cli(["run", "--config", str(cfg), "--data", str(data), "--json"], cwd=tmp_path)
    assert proc.returncode == 4 and "CANDIDATE_KEY_FOR_TEST" in json.loads(proc.stdout)["error"]


def test_rerun_with_same_inputs_makes_no_model_call(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "logs.jsonl", synthetic_rows(80, seed=12))
    args = ["run", "--data", str(data), "--n", "60", "--store", str(tmp_path / "store"),
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--json"]
    first = json.loads(run_cli(args, cwd=tmp_path).stdout)
    second = json.loads(run_cli(args, cwd=tmp_path).stdout)
    assert first["model_calls"] > 60 and first["cache_hits"] == 0
    assert second["model_calls"] == 0 and second["cache_hits"] == first["model_calls"]
    assert second["metrics"] == first["metrics"]  # same answers, same estimates
    run = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(second["run_id"])
    assert run.data.metrics["replay.model_calls"] == 0
    assert run.data.metrics["replay.cache_hits"] == first["model_calls"]
