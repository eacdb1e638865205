"""CLI commands that measure the method itself: judge-eval, fidelity, backtest.

Registered on flows.cli.app (flows/cli.py imports every flows/cli_*.py module).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from flows.cli import (
    ConfigOpt,
    DataOpt,
    JsonOpt,
    SeedOpt,
    TrackingUriOpt,
    _env_defaults,
    _fail,
    _handle_run_error,
    _print_quarantine,
    _seed,
    _settings,
    _usage,
    app,
)
from flows.cli_runtime import (
    Progress,
    await_prefect,
    import_pipeline,
    interrupt_types,
    interrupted,
    quiet,
    start_prefect,
)


@app.command(epilog="Examples:\n"
             "  depsim fidelity                 # the bundled SYNTHETIC logs\n"
             "  depsim fidelity --data logs/production.jsonl --json\n\n"
             "Exit status: 0 done · 4 a missing or unreadable file, a bad configuration or "
             "simulator prompt, MLflow unreachable · 2 usage error · 130 interrupted.")
def fidelity(
    data: DataOpt = None,
    config: ConfigOpt = None,
    tracking_uri: TrackingUriOpt = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment for fidelity runs.")] = "depsim-fidelity",
    deid: Annotated[bool, typer.Option("--deid", help="De-identify the conversations first (as `depsim run` does for real data), to measure what de-identification costs.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Replay the *recorded* tool calls through the simulator and compare with the recorded results.

    Each call's own recorded result is withheld from the simulator, and the world is the one at the call's replay point. Per tool: calls, exact, structural (same shape) and different results, and the simulator sources used (replay.simulator_chain). Logged to MLflow as one run; `--json` prints the per-tool table.
    """
    _env_defaults()
    from tasks.config import ConfigError
    from tasks.fidelity import fidelity as measure
    from tasks.fidelity import summarise
    from tasks.load import InputError, load_raw
    from tasks.stages import contract_check
    from tasks.tracking import default_tracking_uri, log_run

    s = _settings(config, {"run": {"data": data}} if data else {}, as_json)
    try:
        raw = load_raw(s.run.data)
    except InputError as exc:
        _fail(str(exc), as_json)
    valid = contract_check(raw, s).valid
    if deid:
        from tasks.deid import deid_frame

        valid, _ = deid_frame(valid)
    try:
        table = measure(valid, list(s.replay.simulator_chain), simulator=s.models.simulator,
                        prompt=s.replay.simulator_prompt, seed=s.run.seed)
    except ConfigError as exc:  # a bad simulator prompt file or a missing simulator key
        _fail(str(exc), as_json)
    per_tool = summarise(table)
    total = max(table.height, 1)
    overall = {k: int((table["match"] == k).sum()) for k in ("exact", "structural", "different")}
    metrics = {f"fidelity.{k}_share": v / total for k, v in overall.items()}
    metrics["fidelity.calls"] = float(table.height)
    for tool, c in per_tool.items():
        for k in ("calls", "exact", "structural", "different"):
            metrics[f"fidelity.{tool}.{k}"] = float(c[k])
    uri = tracking_uri or s.run.tracking_uri or default_tracking_uri()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            table.write_parquet(f"{tmp}/fidelity.parquet")
            run_id, _ = log_run(uri, experiment, "fidelity",
                                {"data": s.run.data or "bundled SYNTHETIC logs", "simulator_chain": s.replay.simulator_chain,
                                 "deid": deid},
                                metrics, {"depsim.kind": "fidelity"}, Path(tmp))
    except Exception as exc:  # MLflow unreachable or its store unwritable: infrastructure
        _fail(f"MLflow at {uri}: {type(exc).__name__}: {exc}", as_json)
    result = {"calls": table.height, **overall, "tools": per_tool, "run_id": run_id}
    if as_json:
        print(json.dumps(result))
        return
    typer.echo(f"{'tool':28} {'calls':>7} {'exact':>7} {'struct.':>7} {'diff.':>7}")
    for tool, c in per_tool.items():
        typer.echo(f"{tool:28} {c['calls']:7} {c['exact']:7} {c['structural']:7} {c['different']:7}")
    typer.echo(f"{table.height} recorded calls: {overall['exact']} exact, {overall['structural']} structural, "
               f"{overall['different']} different · MLflow run {run_id}")


def _num(x: float | None, width: int = 6) -> str:
    return f"{'–':>{width}}" if x is None else f"{x:{width}.3f}"


def _ci(m: dict[str, Any], name: str) -> str:
    if m.get(name) is None:
        return f"{'–':>19}"
    return f"{m[name]:.3f} [{m[f'{name}_lower']:.3f}, {m[f'{name}_upper']:.3f}]"


def _print_eval(result: dict[str, Any]) -> None:
    cov = result["coverage"]
    typer.echo(f"{cov['conversations']} conversations ({cov['turns']} judged turns; {cov['no_answered_turn']} without "
               f"an answered turn, left out), {cov['labelled_conversations']} with labels · unit {result['unit']}"
               + (f" ({result['turns_per_unit']:.2f} turns per conversation)" if result["unit"] == "conversation" else ""))
    for judge, entry in result["judges"].items():
        what = f"the panel's combined verdicts ({', '.join(result['panel'])})" if judge == "combined" else "alone"
        typer.echo(f"\njudge {judge}: {what}")
        typer.echo(f"{'category':27} {'labelled':>8} {'unlab.':>6} {'unsc.':>5} {'tp':>5} {'fp':>5} {'tn':>5} {'fn':>5} "
                   f"{'prec.':>6} {'recall':>6} {'f1':>6} {'kappa':>6}  {'sensitivity [95%]':19}  {'specificity [95%]':19}")
        for cat, m in entry["categories"].items():
            typer.echo(f"{cat:27} {m['n'] + m['unscored']:8} {cov['unlabelled'][cat]:6} {m['unscored']:5} "
                       f"{m['tp']:5} {m['fp']:5} {m['tn']:5} {m['fn']:5} {_num(m['precision'])} {_num(m['recall'])} "
                       f"{_num(m['f1'])} {_num(m['kappa'])}  {_ci(m, 'sensitivity'):19}  {_ci(m, 'specificity'):19}")
    unlabelled = [c for c, n in cov["labelled"].items() if not n]
    if unlabelled:
        typer.echo(f"\nno labels in the data for: {', '.join(unlabelled)}")
    if result.get("out"):
        typer.echo(f"calibration file: {result['out']}")
    if result.get("run_id"):
        typer.echo(f"MLflow run: {result['run_id']} (experiment {result['experiment']!r})")


@app.command("judge-eval", epilog="Examples:\n"
             "  depsim judge-eval --data labelled.jsonl --out cal.json\n"
             "  depsim run --calibration cal.json     # corrected rates with it\n"
             "  depsim judge-eval --data labelled.jsonl --judges rules,llm \\\n"
             "      --config conf/examples/openai.yaml\n"
             "  depsim judge-eval --data labelled.jsonl --no-mlflow --json\n\n"
             "Exit status: 0 done · 4 a missing or unreadable file, logs without labels or failing the "
             "contract, a bad configuration, an unwritable --out · 2 usage error (e.g. an unknown judge "
             "in --judges) · 130 interrupted.")
def judge_eval(
    data: Annotated[str, typer.Option("--data", "-d", help="Labelled conversation logs (contract field `labels`): JSONL/Parquet file, folder, glob or s3:// URI.")],
    judges: Annotated[str | None, typer.Option("--judges", help="Comma-separated judges of conf/judges.yaml to enable, e.g. rules or rules,llm. Default: judge.kinds (rules).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write a calibration file (JSON) for `depsim run --calibration`. Default: none written.")] = None,
    config: ConfigOpt = None,
    tracking_uri: TrackingUriOpt = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment for judge evaluations.")] = "depsim-judge-eval",
    no_mlflow: Annotated[bool, typer.Option("--no-mlflow", help="Do not log to MLflow.")] = False,
    deid: Annotated[bool, typer.Option("--deid", help="De-identify the conversations first (as `depsim run` does for real data), to measure what de-identification costs.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Measure the judges against human labels (the logs' `labels`) and write a calibration file.

    Every answered turn of every conversation is judged by each enabled judge: the production model's logged turns. No candidate is called.

    Labels are per conversation, verdicts per turn. A conversation counts as flagged for a category when any of its turns is flagged, as not flagged when every turn is scored and none is flagged, and as unscored otherwise (counted, kept out of the 2x2 table). Conversations without a label for a category are left out of it (counted as unlabelled). unsafe_any is the aggregate of the nine unsafe categories, for a judge alone as for the panel.

    Printed per judge (each enabled judge alone, and "combined": the panel's combined verdicts, what a run's rates are made of and what `depsim run --calibration` corrects with) and per category: tp, fp, tn, fn, precision, recall, f1, Cohen's kappa, sensitivity and specificity with 95% Wilson intervals.

    Logged to MLflow (metrics <judge>.<category>.<metric>, the judges' provenance as params) unless --no-mlflow.
    """
    _env_defaults()
    from tasks.check import CheckResult
    from tasks.config import ConfigError
    from tasks.judges import evaluate as ev
    from tasks.judges.calibrate import validate, write_calibration
    from tasks.load import InputError, dataset_hash, load_raw, resolve_sources
    from tasks.stages import ContractFailed, contract_check
    from tasks.stages import judge_eval as measure
    from tasks.taxonomy import load_taxonomy

    t0 = time.perf_counter()
    bar = Progress()
    over: dict[str, Any] = {"run": {"data": data}}
    names: list[str] | None = None
    if judges is not None:
        names = list(dict.fromkeys(j.strip() for j in judges.split(",") if j.strip()))
        if not names:
            _usage("--judges: name at least one judge", as_json)
        over["judge"] = {"kinds": names}
    s = _settings(config, over, as_json)
    try:
        specs = load_taxonomy(s.judge.taxonomy).get("judges") or {"rules": {}}
    except ConfigError as exc:
        _fail(str(exc), as_json)
    names = list(s.judge.kinds)
    unknown = [n for n in names if n not in specs]
    if unknown:
        _usage(f"unknown judge(s) {', '.join(map(repr, unknown))}: the judges of {s.judge.taxonomy} are "
               f"{', '.join(specs)}", as_json)
    try:
        sources = [src if "://" in src else str(Path(src).resolve()) for src in resolve_sources(s.run.data)]
        bar("load", 0, None)
        raw = load_raw(s.run.data)
    except InputError as exc:
        _fail(str(exc), as_json)
    bar("contract check", 0, None)
    checked: CheckResult = contract_check(raw, s)
    more = "`depsim check --quarantine FILE` writes all of them"
    if checked.verdict in ("failed", "error"):
        if not as_json:
            _print_quarantine(checked.quarantine, where=more)
        _fail(str(ContractFailed(checked, s.contract.fail_bad_share)), as_json, contract=checked.summary())
    if checked.rows_quarantined and not as_json:
        _print_quarantine(checked.quarantine, where=more)
    if deid:
        from tasks.deid import deid_frame

        checked.valid, _ = deid_frame(checked.valid)
    total = sum(len(ev.views_of(r)) for r in checked.valid.select("conversation_id", "model", "messages", "tools").iter_rows(named=True))
    done = 0

    def tick(k: int) -> None:
        nonlocal done
        done += k
        bar("judge turns", done, total)

    try:
        payload, coverage, stats = measure(checked.valid, s, names, sources, dataset_hash(raw), tick)
        cal = validate({"version": 1, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **payload},
                       str(out) if out else "<judge-eval>")
        if out is not None:
            cal = write_calibration(out, payload)
    except ConfigError as exc:  # includes CalibrationError (e.g. --out not writable as a calibration)
        _fail(str(exc), as_json)
    except OSError as exc:
        _fail(f"{out}: cannot write the calibration file ({exc.strerror or exc})", as_json)
    result: dict[str, Any] = {
        "data": sources, "data_hash": payload["data_hash"], "panel": names, "unit": payload["unit"],
        "turns_per_unit": payload["turns_per_unit"], "coverage": coverage,
        "contract": checked.summary(), "judges": payload["judges"], "judge_stats": stats,
        "out": str(out) if out else None, "run_id": None, "experiment": None}
    if not no_mlflow:
        bar("mlflow", 0, None)
        result["run_id"] = _log_eval(payload, coverage, stats, names, sources, out, cal, s, tracking_uri, experiment, as_json)
        result["experiment"] = experiment
    result["elapsed_s"] = round(time.perf_counter() - t0, 2)
    if as_json:
        print(json.dumps(result))
    else:
        _print_eval(result)


def _log_eval(payload: dict[str, Any], coverage: dict[str, Any], stats: Any, names: list[str], sources: list[str],
              out: Path | None, cal: Any, s: Any, tracking_uri: str | None, experiment: str, as_json: bool) -> str:
    """Log a judge evaluation to MLflow; its run id."""
    from tasks.tracking import (
        default_tracking_uri,
        evaluation_metrics_of,
        judge_metrics_of,
        log_run,
    )

    metrics = {**evaluation_metrics_of(payload["judges"]), **judge_metrics_of(stats),
               "conversations": coverage["conversations"], "turns": coverage["turns"],
               "no_answered_turn": coverage["no_answered_turn"],
               "labelled_conversations": coverage["labelled_conversations"],
               **{f"labelled.{c}": n for c, n in coverage["labelled"].items()},
               **{f"unlabelled.{c}": n for c, n in coverage["unlabelled"].items()}}
    params = {"data": ",".join(sources), "data_hash": payload["data_hash"], "panel": ",".join(names),
              "unit": payload["unit"], "turns_per_unit": payload["turns_per_unit"],
              "calibration_out": str(out) if out else "none",
              "judges": {name: e["provenance"] for name, e in payload["judges"].items() if name != "combined"},
              "combine": payload["judges"]["combined"]["provenance"]["combine"]}
    tags = {"depsim.kind": "judge-eval", "depsim.panel": ",".join(names)}
    uri = tracking_uri or s.run.tracking_uri or default_tracking_uri()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "calibration.json").write_text(
                json.dumps({"version": cal.version, "created_at": cal.created_at, **payload}, indent=2), encoding="utf-8")
            run_id, _ = log_run(uri, experiment, f"judge-eval-{'+'.join(names)}", params, metrics, tags, Path(tmp))
    except Exception as exc:  # MLflow unreachable or its store unwritable: infrastructure
        _fail(f"MLflow at {uri}: {type(exc).__name__}: {exc}", as_json)
    return str(run_id)


@app.command(epilog="Examples:\n"
             "  depsim backtest --model synthetic-agent-v3 --shipped-at 2026-11-01 \\\n"
             "      --n 2000 --seed 1\n"
             "  depsim backtest --model gpt-x --shipped-at 2026-03-01T00:00:00Z \\\n"
             "      --data logs/ --config my.yaml --json\n\n"
             "Exit status: 0 done · 4 a missing or unreadable file, no traffic of the model after (or of "
             "others before) --shipped-at, a bad configuration, an endpoint or infrastructure fault · "
             "2 usage error (e.g. --shipped-at not an ISO 8601 time) · 130 interrupted: rerun the same "
             "command, the model-call cache makes it repeat no completed call.")
def backtest(
    model: Annotated[str, typer.Option("--model", "-m", help="The shipped model whose prediction is checked (candidate of the simulation).")],
    shipped_at: Annotated[str, typer.Option("--shipped-at", help="When it shipped (ISO 8601, e.g. 2026-11-01): traffic before is simulated, its own turns after are observed.")],
    data: Annotated[str | None, typer.Option("--data", "-d", help="Logs of both periods (split by created_at and model). Default: the SYNTHETIC world (bundled logs before, the model's own generated logs after).")] = None,
    n: Annotated[int | None, typer.Option("--n", min=1, help="Turns to sample for the prediction. Default: sample.n (1000).")] = None,
    seed: SeedOpt = None,
    config: ConfigOpt = None,
    tracking_uri: TrackingUriOpt = None,
    store: Annotated[str | None, typer.Option(help="Run store of the prediction run: a folder or s3:// prefix. Default: run.store (./depsim-runs).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Backtest: predict a shipped model's rates by simulating it on the traffic before it shipped, observe them on its own production turns after, and score the prediction.

    Per category: predicted and observed rate, the multiplicative error max(p/o, o/p), and whether the predicted direction of change against the previous model was right; the median error over the fixed categories observed at 1% or more. Logged to MLflow (experiment depsim-backtest) with a report and a scorecard of every backtest there.
    """
    _env_defaults()
    from flows.backtest import BacktestError, parse_time, precheck
    from flows.backtest import backtest as run_backtest
    from tasks.config import ConfigError
    from tasks.load import InputError
    from tasks.progress import clear_stop, set_reporter

    try:
        when = parse_time(shipped_at)
    except BacktestError as exc:
        _usage(str(exc), as_json)
    over: dict[str, Any] = {"run": {}}
    for key, value in (("tracking_uri", tracking_uri), ("store", store)):
        if value is not None:
            over["run"][key] = value
    seed_value = _seed(seed, as_json).get("seed")
    if tracking_uri is None:
        from tasks.tracking import default_tracking_uri

        over["run"]["tracking_uri"] = default_tracking_uri()
    s = _settings(config, over, as_json)
    try:  # fail fast on a bad path or configuration, before starting Prefect
        precheck(model, when, data, s)
    except (BacktestError, InputError, ConfigError) as exc:
        _fail(str(exc), as_json)
    bar = Progress()
    note = quiet if as_json else bar.note
    clear_stop()
    if not as_json:
        set_reporter(bar)
    note(f"depsim: backtest of {model} shipped at {shipped_at}" + ("" if data else " on the SYNTHETIC world"))
    server = None
    if not as_json:
        bar.watch()
    try:
        server = start_prefect(note)
        import_pipeline(note)
        await_prefect(server, note)
        result = run_backtest(model, shipped_at, data=data, n=n, seed=seed_value, config=config, overrides=over)
    except interrupt_types():
        bar.close()
        interrupted(as_json, s.replay.cache, server)
    except (BacktestError, InputError, ConfigError) as exc:
        bar.close()
        _fail(str(exc), as_json)
    except Exception as exc:
        bar.close()
        _handle_run_error(exc, as_json, s.run.store)
    finally:
        bar.close()
    if as_json:
        from flows.backtest import json_safe

        print(json.dumps(json_safe(result), default=str))
        return
    _print_backtest(result)


def _print_backtest(result: dict[str, Any]) -> None:
    def pct(x: float | None) -> str:
        return "–" if x is None else f"{100 * x:.2f}%"

    typer.echo(f"{'category':28} {'previous':>9} {'predicted':>10} {'observed':>9} {'error':>7}  direction")
    for cat, c in result["categories"].items():
        err = c["multiplicative_error"]
        err_s = "–" if err is None else ("∞" if err == float("inf") else f"{err:.2f}x")
        mark = "" if c["in_median"] else " (not in median)"
        right = "–" if c["direction_correct"] is None else ("right" if c["direction_correct"] else "wrong")
        typer.echo(f"{cat:28} {pct(c['previous']):>9} {pct(c['predicted']):>10} {pct(c['observed']):>9} {err_s:>7}  {right}{mark}")
    med = result["median_multiplicative_error"]
    typer.echo(f"\nmedian multiplicative error: {'–' if med is None else f'{med:.2f}x'} over {result['categories_in_median']} "
               f"categories observed at >= 1% · MLflow run {result['run_id']} (experiment {result['experiment']})")
