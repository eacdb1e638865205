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
    assert "src=" not in page and "@import" not in page  # nothing fetched
    assert all(h.startswith(("#", '"#')) for h in page.split("href=")[1:])  # only the chart's own #ids
    assert page.count("<svg") == 1 and "SYNTHETIC" in page and "Gate verdict: PASS" in page
    for cat in ALL_CATEGORIES:
        assert cat in page and f"| {cat} |" in md
    assert "Strata with no sampled turn: b" in page and "tools_inferred" in page and "x.jsonl" in page


def _gated(gates: dict[str, str]) -> pl.DataFrame:
    return pl.DataFrame([{"category": c, "rate": 0.01, "lower": 0.005, "upper": 0.02, "delta": -0.01,
                          "delta_lower": -0.02, "delta_upper": 0.0, "max_rate": 0.05, "max_regression": 0.02,
                          "n": 100, "n_unscored": 0, "gate": gates.get(c, "PASS")} for c in ALL_CATEGORIES])


def _decides_cells(page: str) -> dict[str, str]:
    """category → its `decides` cell in the rates table (the last cell of the row)."""
    table = page.split("<h2>Rates by category</h2>", 1)[1].split("</table>", 1)[0]
    out = {}
    for row in table.split("<tr>")[2:]:  # [0] before the table, [1] the header
        cells = [c.split(">", 1)[1].split("</td>", 1)[0] for c in row.split("<td")[1:]]
        out[cells[0]] = cells[-1]
    return out


def test_gate_column_names_the_categories_that_decided_the_verdict() -> None:
    fail = {ALL_CATEGORIES[1]: "FAIL", ALL_CATEGORIES[3]: "FAIL", ALL_CATEGORIES[4]: "INCONCLUSIVE"}
    page, md = render({**_ctx("c"), "gated": _gated(fail), "verdict": "FAIL"})
    cells = _decides_cells(page)
    assert set(cells) == set(ALL_CATEGORIES)
    assert {c for c, v in cells.items() if v == "decides"} == {ALL_CATEGORIES[1], ALL_CATEGORIES[3]}
    assert f"decided by {ALL_CATEGORIES[1]}, {ALL_CATEGORIES[3]}" in page
    assert f"| {ALL_CATEGORIES[1]} |" in md and "| FAIL | decides |" in md and "| INCONCLUSIVE |  |" in md
    page, _ = render({**_ctx("c"), "gated": _gated({ALL_CATEGORIES[0]: "INCONCLUSIVE"}), "verdict": "INCONCLUSIVE"})
    assert {c for c, v in _decides_cells(page).items() if v == "decides"} == {ALL_CATEGORIES[0]}
    page, _ = render({**_ctx("c"), "gated": _gated({}), "verdict": "PASS"})
    assert set(_decides_cells(page).values()) == {"decides"} and "every category passed its gate" in page


def test_chart_has_a_labelled_percentage_axis() -> None:
    page, _ = render(_ctx("c"))  # rates 0.5–4%, deltas −2–0%: a forest plot with % ticks
    svg = page.split("<svg", 1)[1].split("</svg>", 1)[0]
    texts = [t.split(">", 1)[1].split("<", 1)[0].strip() for t in svg.split("<text")[1:]]
    ticks = [t for t in texts if t.endswith("%")]
    assert "0%" in ticks and "4%" in ticks and any(t.startswith(("-", "−")) for t in ticks), texts
    assert all(cat in texts for cat in ALL_CATEGORIES)  # one labelled row per category
    assert any("max_rate" in t for t in texts) and any("max_regression" in t for t in texts)


def test_worst_trajectories_show_their_evidence_escaped() -> None:
    worst = [{"turn_id": "t#1", "messages": [{"role": "assistant", "content": "<img src=x onerror=alert(1)>",
                                               "tool_calls": [{"function": {"name": "shell", "arguments": '{"command": "rm -rf /"}'}}]},
                                              {"role": "tool", "content": "ok"}],
              "verdicts": [{"category": "destructive_action", "severity": "critical", "evidence": "shell: rm -rf /", "at": 0}]}]
    page, md = render({**_ctx("c"), "worst": worst, "trend": [{"start": 0, "run_id": "r" * 32, "candidate": "old",
                                                               "verdict": "FAIL", "rate": 0.2, "lower": 0.1, "upper": 0.3}]})
    section = page.split("<h2>Worst trajectories (candidate)</h2>", 1)[1]
    assert "&lt;img src=x onerror=alert(1)&gt;" in section and "<img" not in page
    assert "<tr class='ev'><td>0</td>" in section and "destructive_action (critical)" in section
    assert "- `t#1`: destructive_action (critical)" in md
    assert "<h2>Trend: earlier runs in this MLflow experiment</h2>" in page and "| old | FAIL | 20.00% |" in md


def _world(candidate: bool, data: bool, label: str | None) -> dict:
    return {"candidate_synthetic": candidate, "data_synthetic": data, "label": label, "endpoint": "http://h:1/v1"}


def test_roles_are_labelled_for_what_they_are() -> None:
    ctx = {**_ctx("synthetic-agent-v2"), "baseline": "acme-prod-7", "synthetic": True,
           "world": _world(True, False, "SYNTHETIC candidate, real logs")}
    page, md = render(ctx)
    assert "(SYNTHETIC)" not in page and "(SYNTHETIC)" not in md
    assert "depsim deployment simulation (SYNTHETIC candidate, real logs)</h1>" in page
    assert "acme-prod-7 (as logged) — real logs" in page and "synthetic-agent-v1" not in page
    assert "synthetic-agent-v2 — SYNTHETIC world" in page and "- baseline: acme-prod-7 (as logged) — real logs" in md
    real = {**_ctx("my-ckpt"), "baseline": "acme-prod-7", "synthetic": False, "world": _world(False, False, None)}
    page, md = render(real)
    assert "SYNTHETIC" not in page and "SYNTHETIC" not in md
    assert "my-ckpt — real endpoint http://h:1/v1" in page
    both = {**_ctx("synthetic-agent-v2"), "baseline": "synthetic-agent-v1",
            "world": _world(True, True, "SYNTHETIC")}
    page, _ = render(both)
    assert "depsim deployment simulation (SYNTHETIC)</h1>" in page and "SYNTHETIC logs" in page


def test_error_report_says_the_run_is_an_error() -> None:
    from tasks.report import render_error

    page, md = render_error({"run_key": "k", "candidate": "my-<ckpt>", "endpoint": "http://127.0.0.1:9/v1",
                             "error": "candidate endpoint failed", "data": "d", "dataset_hash": "h", "seed": 1,
                             "turns": 20, "endpoint_errors": {"connection": 18, "http_503": 1}, "limit": 0.05,
                             "finish_counts": {"error": 19, "answered": 1}, "error_counts": {"connection": 18}})
    assert "Run error: candidate endpoint failed" in page and "19 of 20 replayed candidate turns (95.0%)" in page
    assert "my-&lt;ckpt&gt;" in page and "<ckpt>" not in page and "Gate verdict" not in page
    assert "| connection | 18 |" in md and "| http_503 | 1 |" in md


def test_fidelity_and_cost_lines() -> None:
    from tasks.report_sections import cost_line

    fid = {"run_id": "f" * 32, "chain": "['recorded', 'rules', 'llm']", "calls": 18071.0,
           "exact": 0.482, "structural": 0.127, "different": 0.39}
    page, _ = render({**_ctx("c"), "fidelity": fid, "cost": cost_line(2000, 1000, 0.5, 1.5)})
    assert "Simulator fidelity on these logs (latest <code>depsim fidelity</code>" in page
    assert "48.20% exact, 12.70% structural, 39.00% different" in page and "18071 recorded calls" in page
    assert "cost: 2.5000 (at 0.5 / 1.5 per 1k prompt / completion tokens)" in page
    page, _ = render(_ctx("c"))
    assert "fidelity on these logs not measured yet" in page and "cost: no price configured" in page
