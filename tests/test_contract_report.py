"""The contract gate's verdicts in the flow's report, and GX engine failures as a ranked verdict."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

from tasks.check import check_conversations, load_contract
from tasks.load import load_raw
from tests.conftest import run_cli, synthetic_rows, write_jsonl

SHARED = Path(os.environ.get("DEPSIM_SHARED_DATASETS") or Path(__file__).resolve().parents[2] / "shared" / "datasets")


def test_engine_exception_is_an_error_verdict_not_a_crash(tmp_path: Path) -> None:
    contract = copy.deepcopy(load_contract())
    contract["fields"]["model"]["max_length"] = "not-a-number"  # GX refuses to build this expectation
    rows = [*synthetic_rows(5, seed=1), "{broken"]
    result = check_conversations(load_raw(str(write_jsonl(tmp_path / "a.jsonl", rows))), contract, 0.01, 0.5)
    assert result.verdict == "error"
    assert [c["check"] for c in result.checks if c["verdict"] == "error"] == ["great_expectations"]
    assert result.rows_in == 6 == result.rows_passed + result.rows_quarantined


@pytest.mark.e2e
@pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared datasets not found at {SHARED}")
def test_report_shows_the_gate_for_every_shared_dataset(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli(["run", "--data", str(SHARED), "--n", "40", "--tracking-uri", uri,
                    "--store", str(tmp_path / "store"), "--json"], cwd=tmp_path)
    assert proc.returncode in (0, 1, 3), proc.stderr
    out = json.loads(proc.stdout)
    files = sorted(SHARED.glob("*.jsonl"))
    assert set(out["contract"]["by_file"]) == {str(f) for f in files}
    page = Path(out["report"]).read_text()
    for f in files:
        counts = out["contract"]["by_file"][str(f)]
        assert counts["rows_passed"] + counts["rows_quarantined"] == sum(1 for _ in f.open())
        assert str(f) in page and counts["verdict"] in ("passed", "warning")
    assert "gx_validation.html" in {p.name for p in Path(out["store"]).iterdir()}
