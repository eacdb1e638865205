"""A run with a judge calibration: the correct stage (tasks.stages.stage_correct), the judges'
disagreements for review, their report sections and MLflow metrics; and, end to end, `depsim
judge-eval --out` feeding `depsim run --calibration` through the real CLI and Prefect flow."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from mlflow.tracking import MlflowClient

from tasks.config import ConfigError, load_settings
from tasks.estimate import corrected
from tasks.judges.calibrate import validate, write_calibration
from tasks.records import JUDGE_VERDICT_SCHEMA
from tasks.report import render
from tasks.stages import judge_review, stage_correct
from tasks.store import RunStore
from tasks.tracking import corrected_metrics_of, judge_metrics_of
from tests.conftest import run_cli, synthetic_rows, write_jsonl
from tests.test_calibrate import _estimates, payload
from tests.test_report import _ctx


def _store(tmp_path: Path, provenance: dict[str, Any] | None = None) -> RunStore:
    store = RunStore(str(tmp_path / "store"), "run-1")
    if provenance is not None:
        store.write_json("judges.json", {"provenance": provenance, "stats": {}})
    return store


def _settings(calibration: Path | None) -> Any:
    return load_settings(overrides={"judge": {"calibration": str(calibration) if calibration else None}})


# --- the correct stage ------------------------------------------------------------------------

def test_no_calibration_no_correction(tmp_path: Path) -> None:
    store = _store(tmp_path, {"rules": {"kind": "rules", "version": "3"}})
    assert stage_correct(_estimates(), _settings(None), store) == (None, None)
    assert not (store.local / "corrected.parquet").exists()


def test_corrects_both_sides_and_records_what_it_used(tmp_path: Path) -> None:
    cal_path = tmp_path / "cal.json"
    write_calibration(cal_path, payload())
    store = _store(tmp_path, {"rules": {"kind": "rules", "version": "3"}})
    s = _settings(cal_path)
    table, summary = stage_correct(_estimates(), s, store)
    assert table is not None and summary is not None
    expected = corrected(_estimates(), validate(json.loads(cal_path.read_text()), str(cal_path)), s.run.seed,
                         panel=["rules"])
    assert table.equals(expected)
    assert set(table["side"]) == {"candidate", "baseline"}
    assert pl.read_parquet(store.local / "corrected.parquet").equals(table)
    assert summary["sha256"] == hashlib.sha256(cal_path.read_bytes()).hexdigest()
    assert summary["warnings"] == [] and summary["judge_versions"]["rules"] == "rules 3"
    assert json.loads((store.local / "calibration.json").read_text())["sha256"] == summary["sha256"]

    m = corrected_metrics_of(table)
    da = table.filter((pl.col("category") == "destructive_action") & (pl.col("side") == "candidate")).row(0, named=True)
    db = table.filter((pl.col("category") == "destructive_action") & (pl.col("side") == "baseline")).row(0, named=True)
    assert m["destructive_action.corrected_rate"] == pytest.approx(da["corrected_rate"])
    assert m["destructive_action.corrected_lower"] == pytest.approx(da["corrected_lower"])
    assert m["destructive_action.sensitivity"] == pytest.approx(0.8)
    assert m["destructive_action.specificity"] == pytest.approx(940 / 950)
    assert m["destructive_action.baseline_corrected_rate"] == pytest.approx(db["corrected_rate"])
    assert "harmful_content.corrected_rate" not in m  # no number where there is no calibration
    assert judge_metrics_of({"llm.requests": 12, "llm.unscored.timeout": 1}) == {
        "judge.llm.requests": 12.0, "judge.llm.unscored.timeout": 1.0}


def test_other_judge_versions_are_corrected_but_warned_about(tmp_path: Path) -> None:
    cal_path = tmp_path / "cal.json"
    write_calibration(cal_path, payload())
    store = _store(tmp_path, {"rules": {"kind": "rules", "version": "4"}})
    table, summary = stage_correct(_estimates(), _settings(cal_path), store)
    assert table is not None and summary is not None
    assert summary["warnings"] == ["judge 'rules' changed since the calibration: version '3' → '4'"]
    assert table["corrected_rate"].null_count() < table.height  # still corrected
    ctx = {**_ctx("cand"), "corrected": table, "calibration": summary}
    page, md = render(ctx)
    assert "Warning: judge &#x27;rules&#x27; changed since the calibration" in page
    assert "> **Warning:** judge &#x27;rules&#x27; changed since the calibration" in md

    other = _store(tmp_path / "o", {"rules": {"kind": "rules", "version": "3"}, "llm": {"kind": "llm"}})
    table, summary = stage_correct(_estimates(), _settings(cal_path), other)
    assert summary is not None and table is not None
    assert "this run's panel is [rules, llm]" in summary["warnings"][0]
    assert "the calibration has no entry for judge 'llm'" in summary["warnings"]
    assert table["corrected_rate"].null_count() == table.height  # other verdicts: not corrected


def test_a_bad_calibration_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.json: not found"):
        stage_correct(_estimates(), _settings(tmp_path / "missing.json"), _store(tmp_path, {}))


# --- disagreements for review -----------------------------------------------------------------

def _verdict(turn: str, judge: str, verdict: bool | None, votes: list[bool | None] | None = None,
             category: str = "destructive_action") -> dict[str, Any]:
    return {"turn_id": turn, "side": "candidate", "category": category, "judge": judge, "judge_version": "1",
            "verdict": verdict, "confidence": None, "votes": json.dumps(votes) if votes is not None else None,
            "evidence": f"rm -rf | {turn}" if verdict else None, "evidence_msg": 3 if verdict else None,
            "rationale": "deleted <src>" if judge == "llm" else None, "unscored_reason": None}


def test_disagreements_listed_in_both_reports(tmp_path: Path) -> None:
    store = _store(tmp_path, {"rules": {"kind": "rules", "version": "2"}, "llm": {"kind": "llm", "version": "1"}})
    rows = [_verdict("t1", "rules", True), _verdict("t1", "llm", False, [False, False, True]),   # judges disagree
            _verdict("t2", "rules", False), _verdict("t2", "llm", False, [False, False, False]),  # agree
            _verdict("t3", "rules", False), _verdict("t3", "llm", False, [True, False, False])]  # samples split
    store.write("judge_verdicts", pl.DataFrame(rows, schema=JUDGE_VERDICT_SCHEMA))
    review = judge_review(store)
    assert review["judges"] == ["rules", "llm"] and review["n_disagreements"] == 2
    assert review["disagreements"]["turn_id"].to_list() == ["t1", "t3"]
    assert pl.read_parquet(store.local / "judge_disagreements.parquet").height == 2
    page, md = render({**_ctx("cand"), "review": review})
    assert "<h2>Judge disagreements (for human review)</h2>" in page and "## Judge disagreements (for human review)" in md
    assert "2 trajectory × category pair(s)" in page and "2 trajectory × category pair(s)" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("| destructive_action | candidate | t1 |"))
    assert "rules=true" in line and "llm=false" in line and "rm -rf \\| t1" in line and "&lt;src&gt;" in line
    assert "<src>" not in page and "t3" in page


def test_single_judge_has_no_disagreements(tmp_path: Path) -> None:
    store = _store(tmp_path, {"rules": {"kind": "rules", "version": "2"}})
    store.write("judge_verdicts", pl.DataFrame([], schema=JUDGE_VERDICT_SCHEMA))
    page, md = render({**_ctx("cand"), "review": judge_review(store)})
    assert "None: a single judge (rules)" in page and "None: a single judge (rules)" in md


# --- end to end ------------------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.slow
def test_run_with_a_calibration_file_reports_and_logs_corrected_rates(tmp_path: Path) -> None:
    labelled = write_jsonl(tmp_path / "labelled.jsonl", synthetic_rows(120, seed=77))  # type: ignore[arg-type]
    cal = tmp_path / "calibration.json"
    proc = run_cli(["judge-eval", "--data", str(labelled), "--out", str(cal), "--no-mlflow", "--json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    ua = json.loads(proc.stdout)["judges"]["combined"]["categories"]["unsafe_any"]
    assert ua["tp"] + ua["fn"] > 0 and ua["tn"] + ua["fp"] > 0  # both kinds of label: a correction is possible
    # Pretend the rules changed since the calibration: the run still corrects, and says so.
    data = json.loads(cal.read_text())
    data["judges"]["rules"]["provenance"]["version"] = "0-old"
    cal.write_text(json.dumps(data))

    logs = write_jsonl(tmp_path / "logs.jsonl", synthetic_rows(150, seed=5))  # type: ignore[arg-type]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli(["run", "--data", str(logs), "--n", "80", "--seed", "3", "--store", str(tmp_path / "store"),
                    "--tracking-uri", uri, "--calibration", str(cal), "--json"], cwd=tmp_path)
    assert proc.returncode in (0, 1, 3), proc.stderr
    out = json.loads(proc.stdout)
    assert out["calibration_warnings"] and "judge 'rules' changed since the calibration" in out["calibration_warnings"][0]
    corrected_ua = out["corrected"]["unsafe_any"]
    assert corrected_ua["corrected_rate"] is not None
    assert 0 <= corrected_ua["corrected_lower"] <= corrected_ua["corrected_rate"] <= corrected_ua["corrected_upper"] <= 1

    run = MlflowClient(tracking_uri=uri).get_run(out["run_id"])
    metrics, params = run.data.metrics, run.data.params
    assert metrics["unsafe_any.corrected_rate"] == pytest.approx(corrected_ua["corrected_rate"])
    for k in ("corrected_lower", "corrected_upper", "sensitivity", "specificity", "baseline_corrected_rate"):
        assert f"unsafe_any.{k}" in metrics, k
    assert params["calibration.sha256"] == hashlib.sha256(cal.read_bytes()).hexdigest()
    assert params["calibration.judge_versions.rules"] == "rules 0-old"
    assert "changed since the calibration" in params["calibration.warnings"]
    assert params["judges.panel"] == "rules" and params["judges.rules.kind"] == "rules"
    artifacts = {a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(out["run_id"])}
    assert {"corrected.parquet", "calibration.json", "judges.json", "report.md"} <= artifacts

    md = (Path(out["report"]).with_suffix(".md")).read_text()
    assert "## Judge calibration and corrected rates" in md
    row = next(ln for ln in md.splitlines() if ln.startswith("| unsafe_any | candidate |"))
    assert f"{100 * corrected_ua['corrected_rate']:.2f}%" in row
    assert "> **Warning:** judge &#x27;rules&#x27; changed since the calibration" in md
    assert "## Judge disagreements (for human review)" in md and "None: a single judge (rules)" in md
