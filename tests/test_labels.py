"""Honest labels: each role is named for what it is (SYNTHETIC world, real endpoint, real logs)
and the baseline is the model the logs name, not models.baseline."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from mlflow.tracking import MlflowClient

from tasks.config import load_settings
from tasks.stages import world_labels
from tests.conftest import run_cli, synthetic_rows, write_jsonl


def _sample(models: list[str]) -> pl.DataFrame:
    return pl.DataFrame({"turn_id": [f"t{i}" for i in range(len(models))], "model": models})


def test_real_logs_with_the_default_synthetic_candidate() -> None:
    s = load_settings(overrides={"run": {"data": "real.jsonl"}})
    w = world_labels(s, _sample(["acme-prod-7"] * 5))
    assert w["baseline"] == "acme-prod-7"  # not models.baseline (synthetic-agent-v1)
    assert w["candidate_synthetic"] and not w["data_synthetic"]
    assert w["label"] == "SYNTHETIC candidate, real logs" and w["name"] == "mixed"


def test_synthetic_world_over_http_is_still_synthetic() -> None:
    s = load_settings(overrides={"models": {"candidate": {"base_url": "http://127.0.0.1:8089/v1",
                                                          "model": "synthetic-agent-v3"}}})
    w = world_labels(s, _sample(["synthetic-agent-v1"] * 3))
    assert w["candidate_synthetic"] and w["data_synthetic"] and w["label"] == "SYNTHETIC"
    assert w["endpoint"] == "http://127.0.0.1:8089/v1"


def test_real_candidate_on_real_logs_has_no_synthetic_label() -> None:
    s = load_settings(overrides={"run": {"data": "real.jsonl"},
                                 "models": {"candidate": {"base_url": "http://u:p@10.0.0.1/v1", "model": "my-ckpt"}}})
    w = world_labels(s, _sample(["prod-a", "prod-b", "prod-a", "prod-a"]))
    assert not w["synthetic"] and w["label"] is None and w["name"] == "real"
    assert w["baseline"] == "prod-a (75%), prod-b (25%)"  # most common first
    assert w["endpoint"] == "http://10.0.0.1/v1"
    w = world_labels(s, _sample(["synthetic-agent-v1"]))
    assert w["label"] == "real candidate, SYNTHETIC logs"


def _title(page: str) -> str:
    return page.split("<h1>", 1)[1].split("</h1>", 1)[0]


@pytest.mark.e2e
def test_real_logs_run_names_the_logged_baseline(tmp_path: Path) -> None:
    rows = synthetic_rows(60, seed=31)
    for row in rows:
        row["model"] = "acme-prod-7"  # logs of a real production model
    data = write_jsonl(tmp_path / "real.jsonl", rows)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli(["run", "--data", str(data), "--n", "40", "--store", str(tmp_path / "store"),
                    "--tracking-uri", uri, "--json"], cwd=tmp_path)
    out = json.loads(proc.stdout)
    assert proc.returncode == {"PASS": 0, "FAIL": 1, "INCONCLUSIVE": 3}[out["verdict"]], proc.stderr
    assert out["baseline"] == "acme-prod-7"
    assert out["world"] == {"candidate_synthetic": True, "data_synthetic": False,
                            "label": "SYNTHETIC candidate, real logs"}
    page = Path(out["report"]).read_text()
    assert _title(page) == "depsim deployment simulation (SYNTHETIC candidate, real logs)"
    assert "synthetic-agent-v1" not in page and "acme-prod-7 (as logged) — real logs" in page
    md = (Path(out["report"]).parent / "report.md").read_text()
    assert "(SYNTHETIC)" not in md and "vs baseline `acme-prod-7`" in md
    run = MlflowClient(tracking_uri=uri).get_run(out["run_id"])
    assert run.data.params["roles.baseline"] == "acme-prod-7" and run.data.tags["depsim.baseline"] == "acme-prod-7"
    assert run.data.tags["depsim.world"] == "mixed"
    assert run.data.tags["depsim.world.candidate"] == "synthetic" and run.data.tags["depsim.world.data"] == "real"


@pytest.mark.e2e
def test_synthetic_world_over_http_keeps_its_label(tmp_path: Path, synthetic_server: str) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli(["run", "--candidate-url", synthetic_server, "--candidate", "synthetic-agent-v2", "--n", "30",
                    "--store", str(tmp_path / "store"), "--tracking-uri", uri], cwd=tmp_path)
    assert proc.returncode in (0, 1, 3), proc.stderr
    assert "SYNTHETIC world (scripted agent profile)" in proc.stdout
    assert "baseline synthetic-agent-v1 (as logged): SYNTHETIC logs" in proc.stdout
    (report,) = (tmp_path / "store").rglob("report.html")
    page = report.read_text()
    assert _title(page) == "depsim deployment simulation (SYNTHETIC)"
    assert f"served at {synthetic_server}" in page
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("depsim").experiment_id])
    assert run.data.tags["depsim.world"] == "synthetic" and run.info.status == "FINISHED"
