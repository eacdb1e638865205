"""The report renders from a run context: self-contained, every category, user text escaped."""

from __future__ import annotations

import polars as pl

from tasks.report import render
from tasks.taxonomy import ALL_CATEGORIES


def _ctx(candidate: str) -> dict:
    gated = pl.DataFrame([{"category": c, "rate": 0.01, "lower": 0.005, "upper": 0.02, "delta": -0.01,
                           "delta_lower": -0.02, "delta_upper": 0.0, "max_rate": 0.05, "max_regression": 0.02,
                           "n": 100, "n_unscored": 0, "gate": "PASS"} for c in ALL_CATEGORIES])
    est = pl.DataFrame([{"category": c, "side": side, "rate": 0.02, "lower": 0.01, "upper": 0.04}
                        for c in ALL_CATEGORIES for side in ("candidate", "baseline")])
    strata = pl.DataFrame({"stratum": ["a", "b"], "sampled": [60, 0], "population": [600, 40]})
    rep = {"strata": [{"stratum": "a", "population": 600, "sampled": 60, "population_share": 0.94,
                       "sample_share": 1.0, "weighted_share": 0.94},
                      {"stratum": "b", "population": 40, "sampled": 0, "population_share": 0.06,
                       "sample_share": 0.0, "weighted_share": 0.0}],
           "psi": 0.5, "chi_square": 4.0, "chi_square_dof": 1, "chi_square_p": 0.04, "empty_strata": ["b"],
           "weighted_max_abs_share_diff": 0.06}
    quarantine = pl.DataFrame([{"source_file": "x.jsonl", "source_line": 3, "rule": "json_parse",
                                "reason": "invalid JSON <b>"}])
    return {"run_key": "k", "candidate": candidate, "baseline": "prod", "synthetic": True, "data": "d.jsonl",
            "dataset_hash": "h", "seed": 1, "verdict": "PASS", "gated": gated, "estimates": est,
            "check": {"verdict": "passed", "rows_in": 10, "rows_passed": 9, "rows_quarantined": 1,
                      "by_rule": {"json_parse": 1}, "normalised": {"tools_inferred": 2},
                      "by_file": {"x.jsonl": {"rows_passed": 9, "rows_quarantined": 1, "verdict": "warning"}}},
            "checks": [{"check": "row_rule:json_parse", "engine": "depsim", "verdict": "warning", "unexpected": 1}],
            "quarantine": quarantine, "strata": strata, "representativeness": rep, "sampled_turns": 60,
            "population_turns": 640, "weight_sum": 640.0, "finish_counts": {"answered": 60},
            "source_counts": {"recorded": 5, "rules": 7}, "model_calls": 80, "prompt_tokens": 1, "completion_tokens": 1}


def test_report_is_self_contained_and_complete() -> None:
    page, md = render(_ctx("cand-<script>alert(1)</script>"))
    assert "<script>" not in page and "&lt;script&gt;" in page  # user-controlled text is escaped
    assert "invalid JSON &lt;b&gt;" in page
    assert "src=" not in page and "href=" not in page and "@import" not in page  # nothing fetched
    assert page.count("<svg") == 1 and "SYNTHETIC" in page and "Gate verdict: PASS" in page
    for cat in ALL_CATEGORIES:
        assert cat in page and f"| {cat} |" in md
    assert "Strata with no sampled turn: b" in page and "tools_inferred" in page and "x.jsonl" in page
