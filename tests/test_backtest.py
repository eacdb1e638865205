"""Backtest (issue 10): predicted against observed rates, the scorecard maths, and the CLI end
to end on the SYNTHETIC world (its logs provide both periods) with a real MLflow store."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.backtest import BacktestError, json_safe, multiplicative_error, parse_time, scorecard
from tasks.synthetic.logs import write_logs
from tasks.taxonomy import ALL_CATEGORIES, CATEGORIES
from tests.conftest import run_cli


def test_multiplicative_error() -> None:
    assert multiplicative_error(0.02, 0.01) == pytest.approx(2.0)
    assert multiplicative_error(0.01, 0.02) == pytest.approx(2.0)
    assert multiplicative_error(0.0, 0.0) == 1.0
    assert math.isinf(multiplicative_error(0.0, 0.01) or 0.0)
    assert multiplicative_error(None, 0.01) is None


def test_scorecard_median_only_over_categories_observed_at_one_percent() -> None:
    predicted = dict.fromkeys(ALL_CATEGORIES, 0.02)
    observed = dict.fromkeys(ALL_CATEGORIES, 0.02)
    previous = dict.fromkeys(ALL_CATEGORIES, 0.01)
    observed["destructive_action"] = 0.04            # error 2.0, direction right (both up)
    observed["secret_exposure"] = 0.005              # below 1%: out of the median; direction wrong
    predicted["harmful_content"] = 0.0               # infinite error, counts in the median
    card = scorecard(predicted, observed, previous)
    cats = card["categories"]
    assert not cats["secret_exposure"]["in_median"] and cats["destructive_action"]["in_median"]
    assert not cats["unsafe_any"]["in_median"]  # the aggregate is not one of the fixed categories
    assert card["categories_in_median"] == len(CATEGORIES) - 1
    errors = sorted([2.0, math.inf] + [1.0] * (len(CATEGORIES) - 3))
    assert card["median_multiplicative_error"] == pytest.approx(errors[len(errors) // 2] if len(errors) % 2
                                                                 else (errors[len(errors) // 2 - 1] + errors[len(errors) // 2]) / 2)
    assert cats["secret_exposure"]["direction_correct"] is False
    assert cats["harmful_content"]["direction_correct"] is False   # predicted down, observed up
    assert card["direction_accuracy"] == pytest.approx((len(CATEGORIES) - 2) / len(CATEGORIES))
    assert json_safe(card)["categories"]["harmful_content"]["multiplicative_error"] is None


def test_shipped_at_must_be_a_time() -> None:
    assert parse_time("2026-11-01") == datetime(2026, 11, 1, tzinfo=UTC)
    assert parse_time("2026-11-01T12:00:00Z").hour == 12
    with pytest.raises(BacktestError, match="--shipped-at"):
        parse_time("last tuesday")


def test_no_traffic_of_the_model_after_is_a_clear_error(tmp_path: Path) -> None:
    logs = tmp_path / "logs.jsonl"
    write_logs(logs, 20, model="synthetic-agent-v1")
    proc = run_cli(["backtest", "--model", "synthetic-agent-v3", "--shipped-at", "2026-10-15", "--data", str(logs),
                    "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--json"], cwd=tmp_path, timeout=300)
    assert proc.returncode == 4, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert "no conversation of model 'synthetic-agent-v3'" in out["error"] and str(logs) in out["error"]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.e2e
def test_backtest_on_the_synthetic_world_meets_its_target(tmp_path: Path) -> None:
    """synthetic-agent-v3 shipped after the bundled (v1) logs: predicted from 2,000 replayed
    turns, observed on v3's own generated turns. Target: median multiplicative error ≤ 1.25x."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    proc = run_cli(["backtest", "--model", "synthetic-agent-v3", "--shipped-at", "2026-11-01", "--n", "2000",
                    "--seed", "1", "--store", str(tmp_path / "st"), "--tracking-uri", uri, "--json"],
                   cwd=tmp_path, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["synthetic"] and out["sampled_turns"] == 2000 and out["observed_turns"] > 2000
    assert out["previous_models"] == ["synthetic-agent-v1"]
    assert set(out["categories"]) == set(ALL_CATEGORIES)
    for c in out["categories"].values():
        assert set(c) >= {"predicted", "observed", "multiplicative_error", "direction_correct"}
    assert out["median_multiplicative_error"] <= 1.25, out["categories"]
    # v3 regresses test_tampering and false_success_claim: the prediction must see both go up
    for cat in ("test_tampering", "false_success_claim"):
        c = out["categories"][cat]
        assert c["predicted"] > c["previous"] and c["direction_correct"], (cat, c)
    client = MlflowClient(uri)
    run = client.get_run(out["run_id"])
    assert run.data.metrics["median_multiplicative_error"] == pytest.approx(out["median_multiplicative_error"])
    assert run.data.params["model"] == "synthetic-agent-v3"
    assert run.data.tags["depsim.kind"] == "backtest"
    assert client.get_run(out["prediction_run_id"]).data.params  # the prediction is a run of its own
    arts = {a.path for a in client.list_artifacts(out["run_id"])}
    assert {"backtest.html", "backtest.md", "backtest.json"} <= arts
    assert any(h["run_id"] == out["run_id"] for h in out["scorecard"])
