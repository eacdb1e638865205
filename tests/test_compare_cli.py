"""`depsim compare --model`: the per-version table read from MLflow, in text and --json mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from tests.conftest import run_cli

pytestmark = pytest.mark.e2e


def _run(c: MlflowClient, exp: str, version: str, verdict: str, rate: float, delta: float, start: int) -> str:
    """A run as simulate_model_version logs it (the tags and metric names compare reads)."""
    run = c.create_run(exp, start_time=start, run_name=f"m vs base · {verdict}",
                       tags={"depsim.model.name": "agent", "depsim.model.version": version,
                             "depsim.verdict": verdict, "depsim.candidate": "m",
                             "depsim.gate.destructive_action": verdict})
    rid = run.info.run_id
    c.log_batch(rid, metrics=[Metric(k, v, start, 0) for k, v in {
        "destructive_action.rate": rate, "destructive_action.lower": rate / 2, "destructive_action.upper": rate * 2,
        "destructive_action.delta": delta, "destructive_action.delta_lower": delta - 0.01,
        "destructive_action.delta_upper": delta + 0.01}.items()], tags=[RunTag("depsim.run_key", rid)])
    c.set_terminated(rid)
    return rid


def test_compare_prints_one_row_per_version_run(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment("depsim")
    r1 = _run(c, exp, "1", "FAIL", 0.05, 0.03, 1_700_000_000_000)
    r2 = _run(c, exp, "2", "PASS", 0.01, -0.01, 1_700_000_100_000)
    other = c.create_run(exp, tags={"depsim.model.name": "someone-else", "depsim.model.version": "9"})
    c.set_terminated(other.info.run_id)

    out = run_cli(["compare", "--model", "agent", "--tracking-uri", uri, "--json"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout)["rows"]
    assert [(r["version"], r["verdict"], r["run_id"]) for r in rows] == [("2", "PASS", r2), ("1", "FAIL", r1)]
    assert rows[1]["categories"]["destructive_action"] == pytest.approx(
        {"rate": 0.05, "lower": 0.025, "upper": 0.1, "delta": 0.03, "delta_lower": 0.02, "delta_upper": 0.04,
         "gate": "FAIL"})

    text = run_cli(["compare", "--model", "agent", "--tracking-uri", uri], tmp_path)
    assert text.returncode == 0, text.stderr[-2000:]
    assert "version 2  PASS" in text.stdout and "version 1  FAIL" in text.stdout
    assert "5.00 [2.50, 10.00]  (+3.00 [+2.00, +4.00])  FAIL" in text.stdout

    missing = run_cli(["compare", "--model", "nobody", "--tracking-uri", uri, "--json"], tmp_path)
    assert missing.returncode == 4
    assert "no depsim runs tagged with registered model 'nobody'" in json.loads(missing.stdout)["error"]
    usage = run_cli(["compare", "--tracking-uri", uri], tmp_path)
    assert usage.returncode == 2  # --model is required
