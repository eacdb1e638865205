"""The report: a self-contained HTML page (inline CSS and SVG, no network) and a Markdown twin.
The forest plot is tasks/report_chart.py; the worst trajectories, latency and trend are
tasks/report_sections.py."""

from __future__ import annotations

import html
from typing import Any

import polars as pl

from tasks.report_chart import forest_plot
from tasks.report_sections import trend_section, worst_section

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#1b1f24;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.3rem}
table{border-collapse:collapse;width:100%;font-size:.88rem}th,td{padding:.35rem .5rem;border-bottom:1px solid #eee;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f6f8fa}
.PASS{color:#116329;font-weight:600}.FAIL{color:#b91c1c;font-weight:600}.INCONCLUSIVE{color:#9a6700;font-weight:600}
.banner{padding:.6rem 1rem;border-radius:6px;margin:1rem 0;font-weight:600}
.banner.PASS{background:#dafbe1}.banner.FAIL{background:#ffebe9}.banner.INCONCLUSIVE{background:#fff8c5}
.scroll{overflow-x:auto}.synthetic{background:#eef;border:1px dashed #88a;padding:.5rem 1rem;border-radius:6px}
.muted{color:#57606a;font-size:.85rem}code{background:#f6f8fa;padding:0 .2rem}
table.traj td{text-align:left;vertical-align:top}table.traj pre{white-space:pre-wrap;margin:0;font-size:.8rem}
tr.ev{background:#fff8c5}.call{font-family:monospace;font-size:.8rem;color:#0550ae}details{margin:.5rem 0}
svg{max-width:100%;height:auto}
"""


def deid_line(info: dict[str, Any] | None) -> str:
    """What de-identification did to the sampled conversations, in one sentence."""
    if not info:
        return "De-identification: not run."
    if not info.get("applied"):
        return f"De-identification: off ({info.get('why', '')})."
    from tasks.deid import KINDS

    kinds = ", ".join(f"{k} {info.get(k, 0)}" for k in KINDS if info.get(k))
    return (f"De-identified before any model saw them ({info.get('why', '')}): {info.get('conversations_changed', 0)} of "
            f"{info.get('conversations', 0)} sampled conversations, distinct values replaced: {kinds or 'none'}.")


def _pct(x: float | None) -> str:
    return "–" if x is None or x != x else f"{100 * x:.2f}%"


def _fidelity_line(f: dict[str, Any] | None) -> str:
    if not f:
        return ("<p class='muted'>Simulator fidelity on these logs not measured yet: <code>depsim fidelity --data …</code> "
                "replays their recorded calls with each call's own result withheld and logs the shares to MLflow.</p>")
    return (f"<p>Simulator fidelity on these logs (latest <code>depsim fidelity</code>, chain {html.escape(str(f['chain']))}, "
            f"{int(f['calls'] or 0)} recorded calls): {_pct(f['exact'])} exact, {_pct(f['structural'])} structural, "
            f"{_pct(f['different'])} different · MLflow run <code>{html.escape(f['run_id'][:12])}</code></p>")


def decided_by(gated: pl.DataFrame, verdict: str) -> list[str]:
    """The categories that decided the verdict: those whose gate is the verdict (the worst one)."""
    return [r["category"] for r in gated.iter_rows(named=True) if r["gate"] == verdict]


def _roles(ctx: dict[str, Any]) -> tuple[str | None, list[tuple[str, str]]]:
    """(title label, [(role, what it is)]) from the run's world labels (tasks.stages.world_labels)."""
    synthetic = bool(ctx.get("synthetic"))
    world = ctx.get("world") or {"candidate_synthetic": synthetic, "data_synthetic": synthetic,
                                 "label": "SYNTHETIC" if synthetic else None}
    endpoint = str(world.get("endpoint") or ctx.get("endpoint") or "")
    where = "in process" if endpoint.startswith("synthetic://") or not endpoint else f"served at {endpoint}"
    cand = (f"SYNTHETIC world: a scripted agent profile ({where}), not a real model" if world["candidate_synthetic"]
            else f"real endpoint {endpoint}" if endpoint else "real endpoint")
    logs = ("SYNTHETIC logs: scripted agent profiles and users, not production traffic" if world["data_synthetic"]
            else "real logs: the production model's own logged turns")
    return world.get("label"), [("candidate", f"{ctx['candidate']} — {cand}"),
                                ("baseline", f"{ctx['baseline']} (as logged) — {logs}"),
                                ("data", f"{ctx['data']}")]


def _table(frame: pl.DataFrame, columns: list[str], fmt: dict[str, Any] | None = None) -> str:
    fmt = fmt or {}
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for r in frame.select(columns).iter_rows(named=True):
        cells = []
        for c in columns:
            v = r[c]
            text = fmt[c](v) if c in fmt else ("–" if v is None else str(v))
            cls = f' class="{v}"' if c == "gate" else ""
            cells.append(f"<td{cls}>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"


def _md_cell(text: str) -> str:
    """Text for a Markdown table cell: HTML escaped, no pipes or line breaks to break the row."""
    return html.escape(text).replace("|", "\\|").replace("\n", " ")


def _interval(lo: float | None, hi: float | None) -> str:
    return "–" if lo is None or hi is None else f"{_pct(lo)}–{_pct(hi)}"


def _with_interval(x: float | None, lo: float | None, hi: float | None) -> str:
    return "–" if x is None else f"{_pct(x)} ({_interval(lo, hi)})"


def _calibration_section(ctx: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(html parts, markdown lines) of the judge calibration and corrected rates; empty without one."""
    corr: pl.DataFrame | None = ctx.get("corrected")
    cal: dict[str, Any] = ctx.get("calibration") or {}
    if corr is None or not cal:
        return [], []
    rows = [{"category": r["category"], "side": r["side"],
             "raw": _pct(r["raw_rate"]), "raw 95%": _interval(r["raw_lower"], r["raw_upper"]),
             "corrected": _pct(r["corrected_rate"]), "corrected 95%": _interval(r["corrected_lower"], r["corrected_upper"]),
             "sensitivity": _with_interval(r["sensitivity"], r["sensitivity_lower"], r["sensitivity_upper"]),
             "specificity": _with_interval(r["specificity"], r["specificity_lower"], r["specificity_upper"]),
             "labelled": "–" if r["calibration_n"] is None else str(r["calibration_n"]),
             "note": r["note"] or ""} for r in corr.iter_rows(named=True)]
    cols = ["category", "side", "raw", "raw 95%", "corrected", "corrected 95%", "sensitivity", "specificity", "labelled", "note"]
    table = pl.DataFrame(rows, schema=dict.fromkeys(cols, pl.String))
    unit = str(cal.get("unit", "?"))
    tpu = cal.get("turns_per_unit")
    unit_text = f"{unit}" + (f" ({tpu:.2f} turns per unit)" if isinstance(tpu, int | float) and unit != "turn" else "")
    facts = [("file", str(cal.get("path") or "–")), ("created", str(cal.get("created_at") or "–")),
             ("unit", unit_text), ("panel", ", ".join(map(str, cal.get("panel") or [])) or "–"),
             ("labelled data", ", ".join(map(str, cal.get("data") or [])) or "–"),
             ("data sha", str(cal.get("data_hash") or "–"))]
    method = ("Corrected = Rogan–Gladen, (raw + specificity − 1) / (sensitivity + specificity − 1), with the "
              "panel's combined verdicts measured against human labels. Its 95% interval is a parametric "
              "bootstrap over both the deployment sample (design-effective n) and the labelled calibration "
              "sample; sensitivity and specificity carry 95% Wilson intervals. Where the correction is not "
              "meaningful there is no number and the note says why.")
    warnings = [str(w) for w in cal.get("warnings") or []]
    h = ["<h2>Judge calibration and corrected rates</h2>",
         "<p class='muted'>" + " · ".join(f"{k} <code>{html.escape(v)}</code>" for k, v in facts) + "</p>",
         *(f"<p class='INCONCLUSIVE'>Warning: {html.escape(w)}</p>" for w in warnings),
         f"<p class='muted'>{html.escape(method)}</p>", _table(table, cols)]
    md = ["## Judge calibration and corrected rates", "",
          " · ".join(f"{k} {_md_cell(v)}" for k, v in facts), "",
          *(f"> **Warning:** {_md_cell(w)}\n" for w in warnings), method, "",
          "| " + " | ".join(cols) + " |", "|---|---|" + "---:|" * 7 + "---|",
          *("| " + " | ".join(_md_cell(r[c]) for c in cols) + " |" for r in rows), ""]
    return h, md


_REVIEW_COLS = ["category", "side", "turn_id", "judges", "evidence", "rationale"]


def _review_section(ctx: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(html parts, markdown lines) listing where the judges disagreed, for human review."""
    review: dict[str, Any] | None = ctx.get("review")
    if not review:
        return [], []
    judges = [str(j) for j in review.get("judges") or []]
    found: pl.DataFrame | None = review.get("disagreements")
    total = int(review.get("n_disagreements") or 0)
    title = "Judge disagreements (for human review)"
    if len(judges) <= 1 and not review.get("sampled"):
        text = f"None: a single judge ({', '.join(judges) or 'rules'}) with a single verdict per category scored this run."
        return [f"<h2>{title}</h2>", f"<p>{html.escape(text)}</p>"], [f"## {title}", "", text, ""]
    if found is None or found.is_empty():
        text = f"None: the judges ({', '.join(judges)}) agreed on every scored trajectory and category."
        return [f"<h2>{title}</h2>", f"<p>{html.escape(text)}</p>"], [f"## {title}", "", text, ""]
    intro = (f"{total} trajectory × category pair(s) where the judges ({', '.join(judges)}) or one judge's samples "
             "disagreed" + (f"; the first {found.height} below, all in judge_disagreements.parquet" if total > found.height
                            else "") + ". Verdicts per judge; an LLM judge's verdict is its majority vote.")
    table = found.select([pl.col(c).cast(pl.String) for c in _REVIEW_COLS])
    cut = table.with_columns(pl.col("evidence", "rationale").str.slice(0, 200))
    h = [f"<h2>{title}</h2>", f"<p>{html.escape(intro)}</p>", _table(cut, _REVIEW_COLS)]
    md = [f"## {title}", "", intro, "", "| " + " | ".join(_REVIEW_COLS) + " |", "|---" * len(_REVIEW_COLS) + "|",
          *("| " + " | ".join(_md_cell(r[c] or "–") for c in _REVIEW_COLS) + " |" for r in cut.iter_rows(named=True)), ""]
    return h, md


def render(ctx: dict[str, Any]) -> tuple[str, str]:
    """(html, markdown) from the run context assembled by the flow."""
    gated: pl.DataFrame = ctx["gated"]
    estimates: pl.DataFrame = ctx["estimates"]
    base = {r["category"]: r for r in estimates.filter(pl.col("side") == "baseline").iter_rows(named=True)}
    gated = gated.with_columns(
        baseline_rate=pl.col("category").replace_strict({k: v["rate"] for k, v in base.items()}, default=None))
    verdict = ctx["verdict"]
    deciders = decided_by(gated, verdict)
    gated = gated.with_columns(decides=pl.col("category").is_in(deciders).replace_strict({True: "decides", False: ""}))
    label, roles = _roles(ctx)
    title = f"depsim deployment simulation{f' ({label})' if label else ''}"
    pct = {k: _pct for k in ("rate", "lower", "upper", "baseline_rate", "delta", "delta_lower", "delta_upper", "max_rate", "max_regression")}
    cols = ["category", "rate", "lower", "upper", "baseline_rate", "delta", "delta_lower", "delta_upper", "max_rate", "max_regression", "n", "n_unscored", "gate", "decides"]
    check = ctx["check"]
    q: pl.DataFrame = ctx["quarantine"]
    strata: pl.DataFrame = ctx["strata"]
    finish: dict[str, int] = ctx["finish_counts"]
    sources: dict[str, int] = ctx["source_counts"]
    cal_html, cal_md = _calibration_section(ctx)
    review_html, review_md = _review_section(ctx)
    worst_html, worst_md = worst_section(ctx.get("worst") or [])
    trend_html, trend_md = trend_section(ctx.get("trend") or [], _pct)
    synth_note = ("<p class='synthetic'><b>Roles.</b> " + "<br>".join(f"{r}: {html.escape(text)}" for r, text in roles)
                  + "</p>") if label else ("<p class='muted'>" + " · ".join(f"{r}: {html.escape(text)}" for r, text in roles) + "</p>")
    why = (f"decided by {', '.join(deciders)}" if verdict != "PASS" else "every category passed its gate")
    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>depsim report {html.escape(ctx['run_key'])}</title><style>{_CSS}</style></head><body>",
         f"<h1>{html.escape(title)}</h1>",
         f"<p class='muted'>run {html.escape(ctx['run_key'])} · candidate <code>{html.escape(ctx['candidate'])}</code> vs production baseline <code>{html.escape(ctx['baseline'])}</code> · data {html.escape(ctx['data'])} (sha {ctx['dataset_hash']}) · seed {ctx['seed']}</p>",
         synth_note,
         f"<div class='banner {verdict}'>Gate verdict: {verdict} <span class='muted'>({html.escape(why)})</span></div>",
         "<h2>Rates by category</h2>", forest_plot(gated, base),
         "<p class='muted'>Rates per sampled assistant turn, weighted by inverse inclusion probability; 95% Wilson intervals on the design-effective sample size. Delta = candidate − baseline on the same turns (paired). Gate: this category's verdict; decides: the categories whose gate is the overall verdict (the worst gate decides).</p>",
         _table(gated, cols, pct),
         *worst_html,
         *cal_html,
         *review_html,
         *trend_html,
         "<h2>Data contract</h2>",
         f"<p>verdict <b>{check['verdict']}</b> · rows in {check['rows_in']} · passed {check['rows_passed']} · quarantined {check['rows_quarantined']}</p>"]
    files = pl.DataFrame([{"file": f, **c} for f, c in check.get("by_file", {}).items()],
                         schema={"file": pl.String, "rows_passed": pl.Int64, "rows_quarantined": pl.Int64, "verdict": pl.String})
    if files.height:
        h.append(_table(files, files.columns))
    if check.get("levels"):
        h.append(f"<p>{html.escape(levels_line(check['levels']))}</p>")
    if check.get("by_rule"):
        h.append("<p>Quarantined rows by rule: " + ", ".join(f"<code>{html.escape(r)}</code> {n}" for r, n in check["by_rule"].items()) + "</p>")
    if check.get("flagged"):
        h.append("<p>Kept and flagged as real model behaviour: " + ", ".join(f"<code>{html.escape(r)}</code> {n}" for r, n in check["flagged"].items()) + "</p>")
    if check.get("normalised"):
        h.append("<p>Normalised before checking: " + ", ".join(f"<code>{html.escape(k)}</code> {n}" for k, n in check["normalised"].items()) + "</p>")
    h.append(f"<p>{html.escape(deid_line(ctx.get('deid')))}</p>")
    if q.height:
        h.append(_table(q.head(50), ["source_file", "source_line", "rule", "reason"]))
        if q.height > 50:
            h.append(f"<p class='muted'>… {q.height - 50} more in quarantine.parquet.</p>")
    checks = pl.DataFrame(ctx.get("checks") or [], schema={"check": pl.String, "engine": pl.String, "verdict": pl.String, "unexpected": pl.Int64})
    if checks.height:
        h.append("<details><summary>All contract checks (Great Expectations and row rules)</summary>"
                 + _table(checks, ["check", "engine", "verdict", "unexpected"]) + "</details>")
        h.append("<p class='muted'>Great Expectations' own rendering: <code>gx_validation.html</code> beside this report (needs network for its styles).</p>")
    rep = ctx.get("representativeness") or {}
    rep_rows = pl.DataFrame(rep.get("strata") or [])
    empty = rep.get("empty_strata") or []
    share = dict.fromkeys(("population_share", "sample_share", "weighted_share"), _pct)
    seq = ctx.get("sequential") or {}
    if seq.get("looks_planned", 1) > 1:
        looks_rows = "".join(f"<tr><td>{lk['look']}</td><td>{lk['turns']}</td><td class='{lk['verdict']}'>{lk['verdict']}</td>"
                             f"<td>{html.escape(', '.join(lk['undecided']) or '–')}</td></tr>" for lk in seq["per_look"])
        h += ["<h2>Adaptive stopping</h2>",
              f"<p>{seq['looks_planned']} planned looks, Bonferroni alpha spending: every interval is a 1 − 0.05/{seq['looks_planned']} "
              f"interval (z {seq['z']:.2f}), so the reported ones hold at 95% whichever look stopped the run. Stopped at look "
              f"{seq['looks_used']}: {seq['turns_used']} of a {seq['budget']}-turn budget replayed, <b>{seq['turns_saved']} turns saved</b>.</p>",
              f"<table><tr><th>look</th><th>turns</th><th>verdict</th><th>undecided categories</th></tr>{looks_rows}</table>"]
    h += ["<h2>Sample</h2>",
          f"<p>{ctx['sampled_turns']} of {ctx['population_turns']} turns sampled in {strata.height} strata; weights sum to {ctx['weight_sum']:.1f}.</p>",
          f"<p>Stratum mix, sample vs population: PSI {rep.get('psi', float('nan')):.4f} · chi-square {rep.get('chi_square', float('nan')):.2f} "
          f"(dof {rep.get('chi_square_dof', '–')}, p {rep.get('chi_square_p', float('nan')):.3f}) · largest weighted share gap {100 * rep.get('weighted_max_abs_share_diff', 0):.2f} points.</p>",
          ("<p class='FAIL'>Strata with no sampled turn: " + ", ".join(html.escape(e) for e in empty) + "</p>") if empty else "",
          _table(rep_rows, ["stratum", "population", "sampled", "population_share", "sample_share", "weighted_share"], share)
          if rep_rows.height else _table(strata, strata.columns),
          "<h2>Replay</h2>",
          "<p>Finish reasons: " + ", ".join(f"{k} {v}" for k, v in sorted(finish.items())) + "</p>",
          "<p>Simulated tool results by source: " + (", ".join(f"{k} {v}" for k, v in sorted(sources.items())) or "none") + ". Nothing was executed.</p>",
          _fidelity_line(ctx.get("fidelity")),
          f"<p>Model calls {ctx['model_calls']} · cache hits {ctx.get('cache_hits', 0)} · retries {ctx.get('retries', 0)} · "
          f"prompt tokens {ctx['prompt_tokens']} · completion tokens {ctx['completion_tokens']} · "
          f"{html.escape(ctx.get('latency') or 'latency: –')} · cost: {html.escape(ctx.get('cost') or 'no price configured')}</p>",
          ("<p>Replay errors by reason: " + ", ".join(f"<code>{html.escape(k)}</code> {v}" for k, v in sorted(ctx['error_counts'].items())) + "</p>")
          if ctx.get("error_counts") else "",
          "</body></html>"]
    md = [f"# {title}", "",
          f"run `{ctx['run_key']}` · candidate `{_md_cell(ctx['candidate'])}` vs baseline `{_md_cell(ctx['baseline'])}` · seed {ctx['seed']}", "",
          *(f"- {r}: {_md_cell(text)}" for r, text in roles), "",
          f"**Gate verdict: {verdict}** ({why})", "",
          "| category | rate | 95% interval | baseline | delta | gate | decides |", "|---|---:|---:|---:|---:|---|---|"]
    for r in gated.iter_rows(named=True):
        md.append(f"| {r['category']} | {_pct(r['rate'])} | {_pct(r['lower'])}–{_pct(r['upper'])} | {_pct(r['baseline_rate'])} | {_pct(r['delta'])} | {r['gate']} | {r['decides']} |")
    if seq.get("looks_planned", 1) > 1:
        md += ["", f"Adaptive stopping: look {seq['looks_used']} of {seq['looks_planned']}, {seq['turns_used']} of {seq['budget']} "
               f"turns replayed, {seq['turns_saved']} saved (Bonferroni, z {seq['z']:.2f})."]
    md += ["", *worst_md, *cal_md, *review_md, *trend_md]
    md += ["", f"Contract: {check['verdict']}, {check['rows_passed']}/{check['rows_in']} rows passed, {check['rows_quarantined']} quarantined"
           + (" (" + ", ".join(f"{r} {n}" for r, n in check.get("by_rule", {}).items()) + ")." if check.get("by_rule") else ".")
           + (" Kept and flagged: " + ", ".join(f"{r} {n}" for r, n in check["flagged"].items()) + "." if check.get("flagged") else ""),
           f"Sample: {ctx['sampled_turns']} of {ctx['population_turns']} turns. {deid_line(ctx.get('deid'))}", ""]
    return "".join(h), "\n".join(md)


def render_error(ctx: dict[str, Any]) -> tuple[str, str]:
    """(html, markdown) of a run that is an error: the candidate endpoint failed on too many turns.

    ctx: run_key, candidate, endpoint, error (the one-line message), data, dataset_hash, seed,
    turns, endpoint_errors (by kind), limit, finish_counts, error_counts.
    """
    counts: dict[str, int] = ctx["endpoint_errors"]
    n = sum(counts.values())
    share = n / max(int(ctx["turns"]), 1)
    rows = pl.DataFrame([{"kind": k, "turns": v} for k, v in counts.items()], schema={"kind": pl.String, "turns": pl.Int64})
    finish = ", ".join(f"{k} {v}" for k, v in sorted(ctx["finish_counts"].items()))
    lead = (f"{n} of {ctx['turns']} replayed candidate turns ({share:.1%}) ended in an endpoint error, above the "
            f"limit replay.max_error_share {ctx['limit']:.1%}. No rates are estimated and no gate is decided: "
            "this is an infrastructure failure, not evidence about the model.")
    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>depsim report {html.escape(ctx['run_key'])} (ERROR)</title><style>{_CSS}</style></head><body>",
         "<h1>depsim deployment simulation: ERROR</h1>",
         f"<p class='muted'>run {html.escape(ctx['run_key'])} · candidate <code>{html.escape(ctx['candidate'])}</code> at "
         f"<code>{html.escape(ctx['endpoint'])}</code> · data {html.escape(ctx['data'])} (sha {html.escape(ctx['dataset_hash'])}) · seed {ctx['seed']}</p>",
         "<div class='banner FAIL'>Run error: candidate endpoint failed</div>",
         f"<p>{html.escape(lead)}</p>", f"<p><code>{html.escape(ctx['error'])}</code></p>",
         "<h2>Endpoint errors by kind</h2>", _table(rows, ["kind", "turns"]),
         f"<p>Finish reasons: {html.escape(finish)}</p>", "</body></html>"]
    md = ["# depsim deployment simulation: ERROR", "",
          f"run `{ctx['run_key']}` · candidate `{_md_cell(ctx['candidate'])}` at `{_md_cell(ctx['endpoint'])}` · seed {ctx['seed']}", "",
          "**Run error: candidate endpoint failed**", "", lead, "", f"`{_md_cell(ctx['error'])}`", "",
          "| kind | turns |", "|---|---:|", *(f"| {_md_cell(k)} | {v} |" for k, v in counts.items()), "",
          f"Finish reasons: {finish}.", ""]
    return "".join(h), "\n".join(md)


def levels_line(levels: dict[str, Any]) -> str:
    """What the scan path checked at which level, in one sentence."""
    scan, fetch = levels.get("scan") or {}, levels.get("fetch") or {}
    excluded = ", ".join(f"{k} {v}" for k, v in (scan.get("excluded") or {}).items()) or "none"
    span = scan.get("time_range") or {}
    when = (f", conversations from {span['first'][:19]} to {span['last'][:19]} UTC"
            + (f", {span['conversations_without_time']} without a valid time" if span.get("conversations_without_time") else "")
            if span.get("first") else "")
    cached = scan.get("from_cache")
    read = (f"A scan of these files made {cached['created_at']} (kept in the run store's scan cache, the files "
            f"unchanged since) read" if cached else "The scan read")
    return (f"Checked at two levels. {read} {scan.get('rows_in', 0):,} rows in {scan.get('files', 0)} file(s) "
            f"(ids, strata and roles only{when}; left out of the population: {excluded}); the contract above applies to "
            f"the {fetch.get('conversations_fetched', 0):,} sampled conversations fetched: "
            f"{fetch.get('quarantined', 0)} quarantined or missing ({fetch.get('missing_at_fetch', 0)} missing at fetch), "
            f"{fetch.get('turns_replaced', 0)} turns replaced by the next in their stratum's draw order, "
            f"{fetch.get('turns_lost', 0)} lost."
            + ("" if not scan.get("bad_lines") else " Lines that are not conversations: " + "; ".join(
                f"{b['source_file']}:{b['source_line']} {b['rule']} ({b['reason']})" for b in scan["bad_lines"][:5])
               + (" …" if len(scan["bad_lines"]) > 5 else "") + "."))
