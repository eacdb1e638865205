"""Errors are errors: a candidate endpoint that fails on too many turns makes the run an error.

Above replay.max_error_share of candidate turns ending in an endpoint error (connection,
timeout, HTTP error, malformed body, after retries) `depsim run` exits 4 with one `error:` line
naming the endpoint and the counts by kind, writes an error report and marks its MLflow run
FAILED. Below the limit the run is a normal run and the errored turns stay in the denominator.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from mlflow.tracking import MlflowClient

from tasks.records import TRAJECTORY_SCHEMA
from tasks.stages import EndpointFailed, endpoint_errors, is_endpoint_error
from tests.conftest import free_port, run_cli, synthetic_rows, write_jsonl
from tests.faulty_server import ServerProcess, start_server

# Small retries and timeouts: a failing endpoint fails fast.
QUICK = ("models:\n  candidate:\n    max_retries: 1\n    backoff_s: 0.05\n    backoff_max_s: 0.1\n"
         "    timeout_s: 5\n    concurrency: 8\nsample:\n  turns: last\n")


def _traj(finish_error: list[tuple[str, str | None]]) -> pl.DataFrame:
    rows = [{"turn_id": f"t{i}", "conversation_id": f"c{i}", "side": "candidate", "model": "m", "messages": "[]",
             "tool_results": "[]", "finish": f, "error": e, "steps": 0, "model_calls": 1, "retries": 0,
             "prompt_tokens": 0, "completion_tokens": 0, "latency_s": 0.0} for i, (f, e) in enumerate(finish_error)]
    return pl.DataFrame(rows, schema=TRAJECTORY_SCHEMA)


def test_endpoint_error_kinds_are_the_endpoint_faults() -> None:
    for kind in ("connection", "timeout", "http_500", "http_503", "http_429", "http_404", "malformed_response"):
        assert is_endpoint_error(kind), kind
    for kind in ("max_tokens", "internal", "token_budget", "time_budget"):
        assert not is_endpoint_error(kind), kind
    traj = _traj([("answered", None), ("error", "connection: ConnectError: refused"),
                  ("error", "http_503: slow down"), ("error", "connection: x"), ("error", "max_tokens: cut"),
                  ("budget", "token_budget: 900 tokens used of 800"), ("refused", None)])
    assert endpoint_errors(traj) == {"connection": 2, "http_503": 1}


def test_endpoint_failed_is_one_line_naming_endpoint_and_counts() -> None:
    exc = EndpointFailed("http://127.0.0.1:9/v1", "my-ckpt", {"connection": 18, "timeout": 2}, 20, 0.05)
    text = str(exc)
    assert "\n" not in text
    assert "http://127.0.0.1:9/v1" in text and "connection=18, timeout=2" in text
    assert "20 of 20" in text and "limit replay.max_error_share 5.0%" in text


def _runs(uri: str) -> list[Any]:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("depsim")
    return [] if exp is None else client.search_runs([exp.experiment_id])


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line.lower()]


@pytest.mark.e2e
def test_endpoint_down_is_an_error_not_a_verdict(tmp_path: Path) -> None:
    """Nothing listens on the port: every turn is a connection error → exit 4, one line, FAILED run."""
    port = free_port()  # bound and released: nothing listens there
    cfg = tmp_path / "quick.yaml"
    cfg.write_text(QUICK)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    url = f"http://alice:s3cr3t-pw@127.0.0.1:{port}/v1?api-key=k3y-in-query"
    proc = run_cli(["run", "--config", str(cfg), "--candidate-url", url, "--candidate", "my-ckpt", "--n", "20",
                    "--store", str(tmp_path / "store"), "--tracking-uri", uri], cwd=tmp_path)
    assert proc.returncode == 4, proc.stderr
    (line,) = _error_lines(proc.stderr)  # exactly one error line, no traceback
    assert "Traceback" not in proc.stderr
    assert line.startswith("error: candidate endpoint ")
    assert f"http://127.0.0.1:{port}/v1 (model my-ckpt)" in line
    assert "20 of 20 replayed turns (100.0%, limit replay.max_error_share 5.0%)" in line
    assert "(connection=20)" in line
    everything = proc.stdout + proc.stderr
    assert "s3cr3t-pw" not in everything and "k3y-in-query" not in everything and "alice" not in everything
    assert "verdict:" not in proc.stdout and "INCONCLUSIVE" not in everything

    (run,) = _runs(uri)
    assert run.info.status == "FAILED"
    assert run.data.tags["depsim.verdict"] == "ERROR"
    assert run.data.metrics["replay.error.connection"] == 20
    assert run.data.metrics["replay.endpoint_error_share"] == 1.0
    assert not any(k.endswith(".rate") for k in run.data.metrics)  # no rates from a dead endpoint
    assert run.data.params["candidate_endpoint"] == f"http://127.0.0.1:{port}/v1"
    (report,) = (tmp_path / "store").rglob("report.html")
    page = report.read_text()
    assert "ERROR" in page and "connection" in page and "No rates are estimated" in page
    assert "s3cr3t-pw" not in page and "nan%" not in page
    artifacts = {a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(run.info.run_id)}
    assert {"report.html", "report.md", "trajectories.parquet"} <= artifacts


@pytest.fixture(scope="module")
def faulty() -> Any:
    srv: ServerProcess = start_server()
    yield srv
    srv.stop()


def _logs_with_faults(path: Path, n: int, failing: int, seed: int) -> Path:
    """Synthetic conversations; the first `failing` tell the faulty server to answer HTTP 500."""
    rows = synthetic_rows(n, seed=seed)
    for row in rows[:failing]:
        row["messages"][0] = {"role": "system", "content": json.dumps({"behaviour": "fault-500"})}
    return write_jsonl(path, rows)


@pytest.mark.e2e
def test_server_errors_over_the_limit_json(tmp_path: Path, faulty: ServerProcess) -> None:
    """3 of 20 turns get HTTP 500 after retries (15% > 5%): exit 4, and --json carries the error."""
    data = _logs_with_faults(tmp_path / "logs.jsonl", 20, 3, seed=21)
    cfg = tmp_path / "quick.yaml"
    cfg.write_text(QUICK)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli(["run", "--config", str(cfg), "--data", str(data), "--candidate-url", faulty.url,
                    "--candidate", "ok#over", "--n", "20", "--store", str(tmp_path / "store"),
                    "--tracking-uri", uri, "--json"], cwd=tmp_path)
    assert proc.returncode == 4, proc.stderr
    out = json.loads(proc.stdout)  # one JSON object on stdout
    assert out["verdict"] == "ERROR" and out["endpoint"] == faulty.url
    assert out["endpoint_errors"] == {"http_500": 3} and out["turns"] == 20
    assert out["max_error_share"] == 0.05
    assert "http_500=3" in out["error"] and faulty.url in out["error"]
    assert Path(out["report"]).is_file()
    (line,) = _error_lines(proc.stderr)
    assert line == f"error: {out['error']}"
    run = MlflowClient(tracking_uri=uri).get_run(out["run_id"])
    assert run.info.status == "FAILED" and run.data.metrics["replay.error.http_500"] == 3
    assert faulty.requests("ok#over") == 17 + 3 * 2  # each failing turn was retried once


@pytest.mark.e2e
def test_few_server_errors_stay_a_normal_run(tmp_path: Path, faulty: ServerProcess) -> None:
    """1 of 40 turns gets HTTP 500 (2.5% ≤ 5%): a normal verdict, the turn in the denominator."""
    data = _logs_with_faults(tmp_path / "logs.jsonl", 40, 1, seed=22)
    cfg = tmp_path / "quick.yaml"
    cfg.write_text(QUICK)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli(["run", "--config", str(cfg), "--data", str(data), "--candidate-url", faulty.url,
                    "--candidate", "ok#under", "--n", "40", "--store", str(tmp_path / "store"),
                    "--tracking-uri", uri, "--json"], cwd=tmp_path)
    out = json.loads(proc.stdout)
    assert "error" not in out, out
    assert proc.returncode == {"PASS": 0, "FAIL": 1, "INCONCLUSIVE": 3}[out["verdict"]]
    assert out["sampled_turns"] == 40 and out["error_counts"] == {"http_500": 1}
    run = MlflowClient(tracking_uri=uri).get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["replay.error.http_500"] == 1 and run.data.metrics["replay.finish.error"] == 1
    store = Path(out["store"])
    traj = pl.read_parquet(store / "trajectories.parquet")
    (errored,) = traj.filter(pl.col("finish") == "error")["turn_id"].to_list()
    scores = pl.read_parquet(store / "scores.parquet").filter(pl.col("side") == "candidate")
    # the errored turn is still one of the turns every category's rate is taken over
    per_cat = scores.group_by("category").agg(n=pl.len(), has=(pl.col("turn_id") == errored).any())
    assert per_cat["n"].to_list() == [40] * per_cat.height and per_cat["has"].all()
