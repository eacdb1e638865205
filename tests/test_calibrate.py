"""Judge calibration (tasks/judges/calibrate.py), corrected rates (tasks.estimate.corrected) and
their report section. Coverage against known truth is in tests/test_corrected_coverage.py."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tasks.config import ConfigError
from tasks.estimate import CORRECTED_SCHEMA, corrected, estimate, wilson
from tasks.judges.calibrate import (
    Calibration,
    CalibrationError,
    Counts,
    confusion,
    corrected_rate,
    judge_entry,
    metrics,
    read_calibration,
    rogan_gladen,
    validate,
    write_calibration,
)
from tasks.report import render
from tests.test_estimate import frames
from tests.test_report import _ctx

# --- confusion and metrics --------------------------------------------------------------

def test_confusion_counts_and_keeps_unscored_out_of_the_table() -> None:
    pairs = [(True, True)] * 3 + [(True, False)] * 2 + [(False, True)] + [(False, False)] * 4 + [(True, None), (False, None)]
    c = confusion(pairs)
    assert c == Counts(tp=3, fp=1, tn=4, fn=2, unscored=2)
    assert c.n == 10


def test_metrics_known_values() -> None:
    # Wikipedia's Cohen's kappa example: 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no → κ = 0.4.
    m = metrics(Counts(tp=20, fn=5, fp=10, tn=15, unscored=3))
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["unscored"], m["n"]) == (20, 10, 15, 5, 3, 50)
    assert m["kappa"] == pytest.approx(0.4)
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["prevalence"] == pytest.approx(0.5) and m["flagged"] == pytest.approx(0.6)
    assert m["precision"] == pytest.approx(20 / 30) and m["recall"] == pytest.approx(0.8)
    assert m["f1"] == pytest.approx(2 * (2 / 3) * 0.8 / (2 / 3 + 0.8))
    assert m["sensitivity"] == pytest.approx(0.8) and m["specificity"] == pytest.approx(0.6)
    # Wilson 20/25: 60.87%–91.14% (standard tables); reused from tasks.estimate.
    assert (m["sensitivity_lower"], m["sensitivity_upper"]) == pytest.approx((0.6087, 0.9114), abs=1e-4)
    assert (m["specificity_lower"], m["specificity_upper"]) == pytest.approx(wilson(0.6, 25))


@pytest.mark.parametrize("counts,kappa", [
    (Counts(tp=30, fp=0, tn=70, fn=0), 1.0),      # perfect agreement
    (Counts(tp=25, fp=25, tn=25, fn=25), 0.0),    # chance agreement
    (Counts(tp=0, fp=50, tn=0, fn=50), -1.0),     # perfect disagreement
])
def test_kappa_extremes(counts: Counts, kappa: float) -> None:
    assert metrics(counts)["kappa"] == pytest.approx(kappa)


def test_undefined_metrics_are_none_and_json_clean() -> None:
    empty = metrics(Counts(unscored=4))
    assert empty["n"] == 0 and empty["unscored"] == 4
    for k in ("prevalence", "flagged", "precision", "recall", "f1", "kappa", "accuracy", "sensitivity",
              "sensitivity_lower", "sensitivity_upper", "specificity", "specificity_lower", "specificity_upper"):
        assert empty[k] is None, k
    only_negatives = metrics(Counts(tn=10))
    assert only_negatives["sensitivity"] is None and only_negatives["precision"] is None
    assert only_negatives["f1"] is None and only_negatives["kappa"] is None  # pe = 1: undefined
    assert only_negatives["specificity"] == 1.0 and only_negatives["specificity_upper"] == 1.0
    assert only_negatives["specificity_lower"] == pytest.approx(wilson(1.0, 10)[0])
    json.dumps([empty, only_negatives], allow_nan=False)


# --- the calibration file ---------------------------------------------------------------

def payload(**over: Any) -> dict[str, Any]:
    counts = {"destructive_action": Counts(tp=40, fp=10, tn=940, fn=10),
              "unsafe_any": Counts(tp=90, fp=60, tn=830, fn=20, unscored=2)}
    base = {"version": 1, "created_at": "2026-11-02T10:00:00Z", "data": ["labels/a.jsonl"], "data_hash": "abc",
            "unit": "turn", "turns_per_unit": 1, "panel": ["rules"],
            "judges": {"rules": judge_entry({"kind": "rules", "version": "3"}, counts),
                       "combined": judge_entry({"rule": "any"}, counts)}}
    return {**base, **over}


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "cal" / "calibration.json"
    written = write_calibration(path, payload())
    back = read_calibration(path)
    assert back == Calibration(**{**written.__dict__, "path": str(path)})
    assert back.counts("unsafe_any") == Counts(tp=90, fp=60, tn=830, fn=20, unscored=2)
    assert back.counts("destructive_action", judge="rules") == Counts(tp=40, fp=10, tn=940, fn=10)
    assert back.counts("harmful_content") is None
    assert back.metrics("destructive_action")["sensitivity"] == pytest.approx(0.8)  # type: ignore[index]
    s = back.summary()
    assert (s["unit"], s["panel"], s["path"], s["judges"]) == ("turn", ["rules"], str(path), ["combined", "rules"])
    assert not list(path.parent.glob("*.tmp"))


def test_write_fills_version_and_created_at(tmp_path: Path) -> None:
    p = payload()
    del p["version"], p["created_at"]
    cal = write_calibration(tmp_path / "c.json", p)
    assert cal.version == 1 and cal.created_at.endswith("Z")
    assert read_calibration(tmp_path / "c.json").created_at == cal.created_at


def _without(key: str) -> dict[str, Any]:
    p = payload()
    del p[key]
    return p


def _bad_count(value: Any) -> dict[str, Any]:
    p = payload()
    p["judges"]["combined"]["categories"]["unsafe_any"]["fn"] = value
    return p


@pytest.mark.parametrize("bad,problem", [
    (payload(version=2), "unsupported version 2"),
    (_without("panel"), "missing key(s): panel"),
    (payload(unit="session"), "'unit' must be one of conversation, turn"),
    (payload(unit="conversation", turns_per_unit=0.5), "'turns_per_unit' must be a number ≥ 1"),
    (payload(turns_per_unit=2), "must be 1 when the unit is a turn"),
    (payload(panel=[]), "'panel' must be a non-empty list"),
    (payload(data="labels.jsonl"), "'data' must be a list of paths"),
    (payload(created_at="yesterday"), "'created_at' is not RFC 3339"),
    (payload(created_at="2026-11-02T10:00:00"), "needs a time zone"),
    (payload(judges={"rules": {"provenance": {}, "categories": {}}}), "no 'combined' entry"),
    (_bad_count(-1), "judges.combined.categories.unsafe_any"),
    (_bad_count(True), "'fn' must be a non-negative integer"),
    (_bad_count(None), "'fn' must be a non-negative integer"),
])
def test_validation_names_the_file_and_the_problem(tmp_path: Path, bad: dict[str, Any], problem: str) -> None:
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(CalibrationError) as err:
        read_calibration(path)
    assert str(path) in str(err.value) and problem in str(err.value)
    with pytest.raises(CalibrationError, match="would-be"):  # the writer validates the same way
        write_calibration(tmp_path / "would-be.json", bad)
    assert not (tmp_path / "would-be.json").exists()


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match=r"missing\.json: not found"):
        read_calibration(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CalibrationError, match=r"bad\.json: invalid JSON"):
        read_calibration(tmp_path / "bad.json")
    (tmp_path / "nan.json").write_text(json.dumps(payload()).replace('"kappa": ', '"kappa": NaN, "x": ', 1))
    with pytest.raises(CalibrationError, match=r"nan\.json: invalid JSON: NaN is not JSON"):
        read_calibration(tmp_path / "nan.json")
    assert issubclass(CalibrationError, ConfigError)  # the CLI prints it without a traceback


def test_writer_refuses_nan(tmp_path: Path) -> None:
    p = payload()
    p["judges"]["combined"]["categories"]["unsafe_any"]["kappa"] = math.nan
    with pytest.raises(CalibrationError, match="'kappa' is nan; undefined values are null"):
        write_calibration(tmp_path / "c.json", p)


# --- Rogan–Gladen -----------------------------------------------------------------------

def test_rogan_gladen_point_maths() -> None:
    assert rogan_gladen(0.1, 0.8, 0.95) == pytest.approx(0.05 / 0.75)
    assert rogan_gladen(0.37, 1.0, 1.0) == 0.37          # a perfect judge: identity
    assert rogan_gladen(0.01, 0.8, 0.95) == 0.0          # below the false-positive rate: clipped
    assert rogan_gladen(0.99, 0.8, 0.95) == 1.0          # above the sensitivity: clipped


def test_perfect_calibration_is_the_identity() -> None:
    out = corrected_rate(0.2, 1000, (10**6, 0), (10**6, 0), rng_seed=1)
    assert out["rate"] == 0.2 and out["note"] is None
    # With a certain judge only the deployment sample's uncertainty is left: close to Wilson's.
    assert (out["lower"], out["upper"]) == pytest.approx(wilson(0.2, 1000), abs=0.003)


def test_corrected_rate_known_value_and_wider_than_raw() -> None:
    out = corrected_rate(0.1, 2000, (80, 20), (950, 50), rng_seed=3)
    assert out["rate"] == pytest.approx(0.05 / 0.75)
    assert (out["sensitivity"], out["specificity"], out["youden"]) == pytest.approx((0.8, 0.95, 0.75))
    assert out["lower"] < out["rate"] < out["upper"]
    raw_lo, raw_hi = wilson(0.1, 2000)
    # The judge's errors are divided by J, and the calibration's uncertainty is added.
    assert out["upper"] - out["lower"] > (raw_hi - raw_lo) / 0.75


def test_corrected_rate_clips_to_zero() -> None:
    out = corrected_rate(0.045, 2000, (80, 20), (950, 50), rng_seed=3)  # raw below the 5% false positives
    assert out["rate"] == 0.0 and out["lower"] == 0.0 and 0 < out["upper"] < 0.05
    assert out["note"] is None
    far = corrected_rate(0.005, 2000, (80, 20), (950, 50), rng_seed=3)  # far below: the model does not fit
    assert (far["rate"], far["lower"], far["upper"]) == (0.0, 0.0, 0.0)
    assert "clearly below the false-positive rate" in far["note"]
    high = corrected_rate(0.99, 2000, (80, 20), (950, 50), rng_seed=3)
    assert high["rate"] == 1.0 and "above the sensitivity" in high["note"]


@pytest.mark.parametrize("sens,spec,fragment", [
    ((50, 50), (55, 45), "Youden's J = 0.050 ≤ 0.1"),                  # barely better than chance
    ((2, 1), (3, 1), "cannot exclude a judge no better than chance"),  # J = 0.42 but 7 labels
    ((0, 0), (950, 50), "no labelled positives"),
    ((80, 20), (0, 0), "no labelled negatives"),
])
def test_no_number_where_correction_is_not_meaningful(sens: tuple[int, int], spec: tuple[int, int], fragment: str) -> None:
    out = corrected_rate(0.1, 2000, sens, spec, rng_seed=0)
    assert (out["rate"], out["lower"], out["upper"]) == (None, None, None)
    assert fragment in out["note"]


def test_no_scored_turns_no_number() -> None:
    out = corrected_rate(math.nan, 0.0, (80, 20), (950, 50), rng_seed=0)
    assert out["rate"] is None and "no scored turns" in out["note"]


def test_deterministic_by_seed() -> None:
    a = corrected_rate(0.08, 1500, (40, 10), (900, 50), rng_seed=11)
    assert a == corrected_rate(0.08, 1500, (40, 10), (900, 50), rng_seed=11)
    b = corrected_rate(0.08, 1500, (40, 10), (900, 50), rng_seed=12)
    assert a["rate"] == b["rate"] and (a["lower"], a["upper"]) != (b["lower"], b["upper"])
    assert (a["lower"], a["upper"]) == pytest.approx((b["lower"], b["upper"]), abs=0.005)


# --- corrected() over the estimates -----------------------------------------------------

def _estimates(unscored: int = 0) -> pl.DataFrame:
    cand = [True] * 60 + [False] * 440 + [None] * unscored
    base = [True] * 40 + [False] * 460 + [None] * unscored
    s1, sample = frames(cand, base, category="destructive_action")
    s2, _ = frames(cand, base, category="unsafe_any")
    s3, _ = frames(cand, base, category="harmful_content")
    return estimate(pl.concat([s1, s2, s3]), sample)


def test_corrected_table() -> None:
    cal = validate(payload())
    out = corrected(_estimates(), cal, seed=5)
    assert out.schema == pl.Schema(CORRECTED_SCHEMA)
    assert out.select("category", "side").rows() == _estimates().select("category", "side").rows()
    row = {(r["category"], r["side"]): r for r in out.iter_rows(named=True)}
    da = row[("destructive_action", "candidate")]
    assert da["raw_rate"] == pytest.approx(0.12)
    assert da["corrected_rate"] == pytest.approx(rogan_gladen(0.12, 0.8, 940 / 950))
    assert da["corrected_lower"] < da["corrected_rate"] < da["corrected_upper"]
    assert (da["sensitivity"], da["unit"], da["calibration_n"], da["note"]) == (pytest.approx(0.8), "turn", 1000, None)
    # unsafe_any is corrected with its own entry, not derived from the other categories
    ua = row[("unsafe_any", "candidate")]
    assert ua["corrected_rate"] == pytest.approx(rogan_gladen(0.12, 90 / 110, 830 / 890))
    hc = row[("harmful_content", "baseline")]
    assert hc["corrected_rate"] is None and hc["note"] == "no calibration for this category"
    assert hc["raw_rate"] == pytest.approx(0.08)
    assert out.equals(corrected(_estimates(), cal, seed=5))  # deterministic


def test_corrected_unscored_widen_the_interval() -> None:
    cal = validate(payload())
    full = corrected(_estimates(), cal, seed=5).row(0, named=True)
    miss = corrected(_estimates(unscored=50), cal, seed=5).row(0, named=True)
    assert miss["corrected_rate"] == pytest.approx(full["corrected_rate"])
    assert miss["corrected_lower"] < full["corrected_lower"] and miss["corrected_upper"] > full["corrected_upper"]
    assert "50 unscored turn(s) widen the interval" in miss["note"]


def test_corrected_notes_panel_and_unit_mismatch() -> None:
    cal = validate(payload())
    out = corrected(_estimates(), cal, seed=5, panel=["rules", "llm"])
    assert out["corrected_rate"].null_count() == out.height
    assert "this run's panel is [rules, llm]: not corrected" in out["note"][0]
    assert corrected(_estimates(), cal, seed=5, panel=["rules"])["corrected_rate"].null_count() == 2  # harmful_content
    conv = validate(payload(unit="conversation", turns_per_unit=2.2))
    r = corrected(_estimates(), conv, seed=5).row(0, named=True)
    assert r["corrected_rate"] is not None and "measured per conversation (2.20 turns each)" in r["note"]
    assert r["unit"] == "conversation" and r["turns_per_unit"] == 2.2


# --- report section ---------------------------------------------------------------------

def test_report_section_only_with_a_calibration() -> None:
    ctx = _ctx("cand")
    page, md = render(ctx)
    assert "Judge calibration" not in page and "Judge calibration" not in md
    cal = validate(payload(data=["labels/<b>.jsonl"]), "cal|<i>.json")
    ctx.update(corrected=corrected(_estimates(), cal, seed=5, panel=["rules"]), calibration=cal.summary())
    page, md = render(ctx)
    assert "<h2>Judge calibration and corrected rates</h2>" in page and "## Judge calibration and corrected rates" in md
    assert "labels/&lt;b&gt;.jsonl" in page and "<b>.jsonl" not in page and "<i>" not in page
    assert "cal\\|&lt;i&gt;.json" in md  # escaped, and the pipe cannot break the Markdown table
    assert "no calibration for this category" in page and "no calibration for this category" in md
    lines = [ln for ln in md.splitlines() if ln.startswith("| destructive_action | candidate |")]
    assert len(lines) == 1 and lines[0].count(" | ") == 9  # ten cells
    assert "12.00%" in lines[0] and "80.00% (" in lines[0]
