"""The depsim command line.

Exit status of `depsim run`: 0 PASS · 1 FAIL · 3 INCONCLUSIVE · 4 error (bad input, bad
configuration, contract check failed, infrastructure: e.g. more than replay.max_error_share of
the candidate's turns ended in an endpoint error) · 2 usage error.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

EXIT = {"PASS": 0, "FAIL": 1, "INCONCLUSIVE": 3}
EXIT_ERROR = 4

app = typer.Typer(
    name="depsim",
    help="depsim — deployment simulation: predict how often a candidate model misbehaves in "
    "production, before it ships. Replays sampled production turns through the candidate with "
    "simulated tools (nothing is executed), judges them, estimates per-category rates with 95% "
    "intervals against the production baseline, gates the release and logs it all to MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout (for machines).")]
ConfigOpt = Annotated[str | None, typer.Option("--config", "-c", help="YAML file layered over conf/default.yaml.")]
DataOpt = Annotated[str | None, typer.Option("--data", "-d", help="Conversation logs: JSONL/Parquet file, folder, glob or s3:// URI. Default: the bundled SYNTHETIC logs.")]
SeedOpt = Annotated[str | None, typer.Option("--seed", help="Random seed (integer) for sampling and replay.")]


def _env_defaults(verbose: bool = False) -> None:
    # Quiet, offline-friendly Prefect defaults; users' own settings win. depsim prints its own
    # one-line errors, so Prefect's task-failure tracebacks are shown only with --verbose.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if verbose else "CRITICAL")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    import logging

    for name in ("mlflow", "great_expectations", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # An optional plugin some dependency enumerates (bandit's sarif formatter) logs an ERROR line
    # on import; it is not depsim's error and would muddle the one-line errors on stderr.
    logging.getLogger("stevedore").setLevel(logging.CRITICAL)


def _fail(message: str, as_json: bool, code: int = EXIT_ERROR, **extra: Any) -> None:
    if as_json:
        print(json.dumps({"error": message, **extra}))
    else:
        typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(code)


def _partial(out: Path) -> Path:
    """Where an output is written before it is renamed into place (never half-written under its name)."""
    return out.with_name(f".{out.stem}.partial{out.suffix}")


def _seed(seed: str | None, as_json: bool) -> dict[str, Any]:
    if seed is None:
        return {}
    try:
        return {"seed": int(seed)}
    except ValueError:
        _fail(f"--seed must be an integer, got {seed!r}", as_json, 2)
    return {}


def _settings(config: str | None, overrides: dict[str, Any], as_json: bool) -> Any:
    from tasks.config import ConfigError, load_settings

    try:
        return load_settings(config, overrides)
    except ConfigError as exc:
        _fail(str(exc), as_json)


def _print_quarantine(q: Any, limit: int = 20) -> None:
    _print_quarantine_rows(q.head(limit).to_dicts(), q.height, limit)


def _print_quarantine_rows(rows: list[dict[str, Any]], total: int, limit: int = 20) -> None:
    for r in rows[:limit]:
        typer.secho(f"quarantined: {r['source_file']}:{r['source_line']}: {r['rule']}: {r['reason']}",
                    fg="yellow", err=True)
    if total > limit:
        typer.secho(f"... and {total - limit} more quarantined rows (see quarantine.parquet in the run store)",
                    fg="yellow", err=True)


class _Progress:
    """Progress lines on stderr, one per stage change and every ~10% of replay."""

    def __init__(self) -> None:
        self.last: dict[str, int] = {}
        self.t0 = time.perf_counter()

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        step = max(1, (total or 1) // 10)
        prev = self.last.get(stage, -step)
        if done - prev >= step or done == total:
            self.last[stage] = done
            pct = f" {done}/{total}" if total else ""
            typer.echo(f"[{time.perf_counter() - self.t0:6.1f}s] {stage}{pct}", err=True)


@app.command()
def run(
    data: DataOpt = None,
    config: ConfigOpt = None,
    candidate: Annotated[str | None, typer.Option(help="Candidate model name (role `candidate`).")] = None,
    candidate_url: Annotated[str | None, typer.Option(help="Candidate base_url (OpenAI-compatible); synthetic:// for the in-process SYNTHETIC world.")] = None,
    baseline: Annotated[str | None, typer.Option(help="Production (baseline) model name; also filters the logs to it when set.")] = None,
    n: Annotated[int | None, typer.Option("--n", help="Number of turns to sample (with --looks: the budget).")] = None,
    looks: Annotated[int | None, typer.Option("--looks", help="Adaptive stopping (sample.looks): replay in this many looks and stop at the first where every gate is decided; each look's intervals are 1 − 0.05/K (Bonferroni), so the reported ones hold at 95% whichever look stops.")] = None,
    seed: SeedOpt = None,
    store: Annotated[str | None, typer.Option(help="Run store: a folder or s3:// prefix.")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (default sqlite:///./mlflow.db).")] = None,
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment name.")] = None,
    calibration: Annotated[str | None, typer.Option(help="Calibration file from `depsim judge-eval --out` (judge.calibration): adds Rogan–Gladen corrected rates to the report and MLflow.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's own logs.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run the whole deployment simulation (Prefect flow `deployment_simulation`).

    Exit status: 0 PASS · 1 FAIL · 3 INCONCLUSIVE · 4 error (bad input or configuration, failed contract check, endpoint or infrastructure fault) · 2 usage error.

    When more than replay.max_error_share (default 5%) of the candidate's turns end in an endpoint error (connection, timeout, HTTP error or malformed reply, after retries), the run is an error: exit 4, one `error:` line naming the endpoint and the counts by kind, an error report, and an MLflow run marked FAILED. Below the limit errored turns count in the rates' denominator.
    """
    _env_defaults(verbose)
    over: dict[str, Any] = {"run": {**_seed(seed, as_json)}, "models": {}}
    for key, value in (("data", data), ("store", store), ("tracking_uri", tracking_uri), ("experiment", experiment)):
        if value is not None:
            over["run"][key] = value
    if candidate:
        over["models"].setdefault("candidate", {})["model"] = candidate
    if candidate_url:
        over["models"].setdefault("candidate", {})["base_url"] = candidate_url
    if baseline:
        over["models"]["baseline"] = {"model": baseline}
        over["run"]["production_models"] = [baseline]
    if n is not None:
        over["sample"] = {"n": n}
    if looks is not None:
        over.setdefault("sample", {})["looks"] = looks
    if calibration is not None:
        over["judge"] = {"calibration": str(Path(calibration).resolve())}
    s = _settings(config, over, as_json)
    if s.run.tracking_uri is None:
        from tasks.tracking import default_tracking_uri

        s.run.tracking_uri = default_tracking_uri()
    from tasks.config import ConfigError
    from tasks.load import InputError, resolve_sources
    from tasks.progress import set_reporter

    try:  # fail fast on a wrong path, a missing key or a bad calibration file, before starting Prefect
        resolve_sources(s.run.data)
        s.models.candidate.api_key()
        if s.judge.calibration:
            from tasks.judges.calibrate import read_calibration

            read_calibration(s.judge.calibration)
    except (InputError, ConfigError) as exc:
        _fail(str(exc), as_json)
    if not as_json:
        set_reporter(_Progress())
        typer.echo("depsim: starting Prefect flow deployment_simulation"
                   + (" with a SYNTHETIC candidate" if s.models.candidate.synthetic else ""), err=True)
    t0 = time.perf_counter()
    try:
        from flows.simulate import deployment_simulation

        result = deployment_simulation(s.public_dict())
    except Exception as exc:
        _handle_run_error(exc, as_json)
        return
    result["elapsed_s"] = round(time.perf_counter() - t0, 2)
    if as_json:
        print(json.dumps(result, default=str))
    else:
        _print_quarantine_rows(result["quarantined"], result["contract"]["rows_quarantined"])
        _print_result(result)
    raise typer.Exit(EXIT[result["verdict"]])


def _handle_run_error(exc: Exception, as_json: bool) -> None:
    from tasks.config import ConfigError
    from tasks.load import InputError
    from tasks.sample import SampleError
    from tasks.stages import ContractFailed, EndpointFailed

    if isinstance(exc, EndpointFailed):
        where = (f"; report {exc.report}" if exc.report else "") + (f"; MLflow run {exc.run_id} FAILED" if exc.run_id else "")
        message = f"{exc}{where}"
        if as_json:  # stdout stays one JSON object; the line is on stderr too, for CI logs
            typer.secho(f"error: {message}", fg="red", err=True)
        _fail(message, as_json, verdict="ERROR", endpoint=exc.endpoint, candidate=exc.model,
              endpoint_errors=exc.counts, turns=exc.turns, max_error_share=exc.limit,
              report=exc.report, run_id=exc.run_id, experiment_id=exc.experiment_id)
    if isinstance(exc, ContractFailed):
        if not as_json:
            _print_quarantine(exc.result.quarantine)
        _fail(str(exc), as_json, contract=exc.result.summary())
    if isinstance(exc, InputError | ConfigError | SampleError):
        _fail(str(exc), as_json)
    _fail(f"{type(exc).__name__}: {exc}", as_json)


def _print_result(r: dict[str, Any]) -> None:
    colours = {"PASS": "green", "FAIL": "red", "INCONCLUSIVE": "yellow"}
    typer.echo("")
    world = r.get("world") or {}
    if world.get("candidate_synthetic"):
        typer.secho(f"candidate {r['candidate']}: SYNTHETIC world (scripted agent profile), not a real model.", fg="blue")
    else:
        typer.echo(f"candidate {r['candidate']}: real endpoint {r['candidate_endpoint']}")
    logs = "SYNTHETIC logs (scripted agents and users)" if world.get("data_synthetic") else "real logs"
    typer.secho(f"baseline {r['baseline']} (as logged): {logs}", fg="blue" if world.get("data_synthetic") else None)
    typer.echo(f"{'category':28} {'rate':>8} {'95% interval':>19} {'delta':>8}  gate")
    for cat, m in r["metrics"].items():
        delta = "–" if m["delta"] is None else f"{100 * m['delta']:+.2f}%"
        typer.echo(f"{cat:28} {100 * m['rate']:7.2f}% [{100 * m['lower']:6.2f}%, {100 * m['upper']:6.2f}%] {delta:>8}  ", nl=False)
        typer.secho(m["gate"], fg=colours[m["gate"]])
    c = r["contract"]
    typer.echo(f"\ncontract: {c['verdict']} ({c['rows_passed']}/{c['rows_in']} rows passed, {c['rows_quarantined']} quarantined)")
    typer.echo(f"sampled turns: {r['sampled_turns']} of {r['population_turns']} · model calls: {r['model_calls']} · {r['elapsed_s']}s")
    seq = r.get("sequential") or {}
    if seq.get("looks_planned", 1) > 1:
        typer.echo(f"adaptive stopping: look {seq['looks_used']} of {seq['looks_planned']} decided it · "
                   f"{seq['turns_used']} of a {seq['budget']}-turn budget replayed, {seq['turns_saved']} saved · "
                   f"intervals at z {seq['z']:.2f} (Bonferroni over the looks)")
    if r.get("corrected"):
        typer.echo(f"\n{'corrected (calibration)':28} {'rate':>8} {'95% interval':>19}")
        for cat, c in r["corrected"].items():
            if c["corrected_rate"] is None:
                typer.echo(f"{cat:28} {'–':>8} {'':19}  {c['note'] or ''}")
            else:
                typer.echo(f"{cat:28} {100 * c['corrected_rate']:7.2f}% [{100 * c['corrected_lower']:6.2f}%, "
                           f"{100 * c['corrected_upper']:6.2f}%]")
        for w in r.get("calibration_warnings") or []:
            typer.secho(f"calibration warning: {w}", fg="yellow", err=True)
    typer.secho(f"verdict: {r['verdict']}", fg=colours[r["verdict"]], bold=True)
    typer.echo(f"report:     {r['report']}")
    typer.echo(f"MLflow run: {r['run_id']} (experiment {r['experiment']!r})")
    typer.echo(f"open MLflow UI:  mlflow ui --backend-store-uri {r['tracking_uri']}   "
               f"# then http://127.0.0.1:5000/#/experiments/{r['experiment_id']}/runs/{r['run_id']}")
    typer.echo("open Prefect UI: prefect server start   "
               f"# then http://127.0.0.1:4200/runs/flow-run/{r['flow_run_id']}")


@app.command("serve-synthetic")
def serve_synthetic(
    port: Annotated[int, typer.Option(help="Loopback port.")] = 8089,
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
) -> None:
    """Serve the SYNTHETIC world as an OpenAI-compatible API (POST /v1/chat/completions).

    Point any role at it with base_url http://HOST:PORT/v1 and a model such as synthetic-agent-v2.
    """
    from tasks.synthetic.server import serve

    typer.echo(f"SYNTHETIC world on http://{host}:{port}/v1 (models: synthetic-agent-v1, -v2, -v3)", err=True)
    serve(host, port)


@app.command("synth-logs")
def synth_logs(
    out: Annotated[Path, typer.Option(help="Output file: .jsonl or .parquet.")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of conversations (scripted generator).")] = 1000,
    turns: Annotated[int | None, typer.Option("--turns", min=1, help="Scale mode (.parquet only): exactly this many turns, conversations drawn from a pool of --pool scripted ones with new ids and times.")] = None,
    pool: Annotated[int, typer.Option("--pool", min=1, help="Scale mode: scripted conversations in the pool.")] = 2000,
    model: Annotated[str, typer.Option(help="Scripted profile that 'served' production.")] = "synthetic-agent-v1",
    seed: SeedOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Generate SYNTHETIC production logs in the conversation contract (deterministic by seed).

    By default every conversation is scripted (~500 conversations/s). With --turns, a Parquet log
    of that many turns is assembled from a pool of scripted conversations (10M turns in about a
    minute); content repeats across copies, so use it for scale tests, not for statistics.
    """
    from tasks.synthetic.logs import write_logs
    from tasks.synthetic.profiles import PROFILE_NAMES

    if model not in PROFILE_NAMES:
        _fail(f"unknown synthetic model {model!r} (available: {', '.join(PROFILE_NAMES)})", as_json)
    if out.suffix not in (".jsonl", ".parquet"):
        _fail(f"{out}: the output must end in .jsonl or .parquet", as_json)
    if turns is not None and out.suffix != ".parquet":
        _fail(f"{out}: --turns (scale mode) writes Parquet only; use a .parquet output", as_json)
    seed_v = _seed(seed, as_json).get("seed", 0)
    t0 = time.perf_counter()
    partial = _partial(out)
    if turns is not None:
        from tasks.synthetic.scale import write_scaled_parquet

        def tick(done: int, total: int) -> None:
            if not as_json:
                typer.echo(f"\r  {done:,}/{total:,} conversations", nl=False, err=True)

        info = write_scaled_parquet(partial, turns, model, seed_v, pool=pool, progress=tick)
        if not as_json:
            typer.echo("", err=True)
        count, extra = info["conversations"], {"turns": info["turns"], "pool": info["pool"], "scale_mode": True}
    else:
        count, extra = write_logs(partial, n, model, seed_v), {"scale_mode": False}
    partial.replace(out)
    result = {"out": str(out), "conversations": count, **extra, "model": model, "seed": seed_v, "synthetic": True,
              "elapsed_s": round(time.perf_counter() - t0, 2)}
    print(json.dumps(result) if as_json else f"wrote {count} SYNTHETIC conversations to {out}")


@app.command()
def check(
    data: DataOpt = None,
    config: ConfigOpt = None,
    quarantine: Annotated[Path | None, typer.Option(help="Write the quarantined rows (file, line, rule, reason, record) to this Parquet file.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check conversation logs against the data contract; quarantine and explain bad rows.

    Real-world variants (object arguments, missing ids, missing tool schemas, agent/human roles,
    terminal escape codes in tool output) are normalised first and counted. Exit status 0 when
    the verdict is passed or warning, 4 when failed or error.
    """
    from tasks.load import InputError, load_raw
    from tasks.stages import contract_check

    s = _settings(config, {"run": {"data": data}} if data else {}, as_json)
    try:
        raw = load_raw(s.run.data)
    except InputError as exc:
        _fail(str(exc), as_json)
    result = contract_check(raw, s)
    summary = result.summary()
    if quarantine is not None:
        quarantine.parent.mkdir(parents=True, exist_ok=True)
        result.quarantine.write_parquet(quarantine)
        summary["quarantine"] = str(quarantine)
    if as_json:
        print(json.dumps(summary))
    else:
        _print_quarantine(result.quarantine)
        typer.echo(f"verdict {summary['verdict']}: {summary['rows_passed']} of {summary['rows_in']} rows passed, "
                   f"{summary['rows_quarantined']} quarantined")
        for f in result.flagged[:20]:
            typer.echo(f"flagged (kept): {f['source_file']}:{f['source_line']} {f['rule']} {f['field']}: {f['reason']}")
        if len(result.flagged) > 20:
            typer.echo(f"flagged (kept): … {len(result.flagged) - 20} more (`--json` counts them per rule)")
    raise typer.Exit(0 if result.verdict in ("passed", "warning") else EXIT_ERROR)


@app.command()
def sample(
    out: Annotated[Path, typer.Option(help="Output Parquet file for the sampled turns.")],
    data: DataOpt = None,
    config: ConfigOpt = None,
    n: Annotated[int | None, typer.Option("--n", help="Number of turns.")] = None,
    seed: SeedOpt = None,
    strata: Annotated[str | None, typer.Option(help="Comma-separated stratum columns (surface, task_type, language, uses_tools, prefix_bucket, model, ...).")] = None,
    allocation: Annotated[str | None, typer.Option(help="proportional | equal | neyman (neyman needs sample.prior).")] = None,
    turns: Annotated[str | None, typer.Option(help="all | last | random turns per conversation.")] = None,
    dedupe: Annotated[bool | None, typer.Option("--dedupe/--no-dedupe", help="Collapse near-duplicate prefixes.")] = None,
    scan: Annotated[bool | None, typer.Option("--scan/--no-scan", help="Read Parquet lazily (default when possible) or load and contract-check whole conversations.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Draw the stratified sample of turns (with weights) as a stage of its own.

    The output Parquet has one row per sampled turn with its stratum, inclusion probability and
    `weight` (1 / inclusion probability). JSONL logs are loaded whole and rows failing the data
    contract are left out, as in the flow. Parquet logs are scanned lazily (ids, strata and message
    roles only; no message content), rows without an id or messages, or with a repeated id, are left
    out and counted in `rows_excluded`; run `depsim check` for the whole contract.
    """
    from tasks.load import InputError, load_raw
    from tasks.sample import SampleError
    from tasks.scan import draw_sample_scan, scan_eligible

    t0 = time.perf_counter()
    over: dict[str, Any] = {"run": {**_seed(seed, as_json)}, "sample": {}}
    if data:
        over["run"]["data"] = data
    for key, value in (("n", n), ("allocation", allocation), ("turns", turns), ("dedupe", dedupe)):
        if value is not None:
            over["sample"][key] = value
    if scan is not None:
        over["sample"]["scan"] = "auto" if scan else "off"
    if strata is not None:
        over["sample"]["strata"] = [c.strip() for c in strata.split(",") if c.strip()]
    s = _settings(config, over, as_json)
    if out.suffix != ".parquet":
        _fail(f"{out}: the output must end in .parquet", as_json, 2)
    extra: dict[str, Any] = {}
    try:
        if scan_eligible(s):
            bar = _Progress() if not as_json else None
            smp, table, population, rep, scanned = draw_sample_scan(
                s, progress=(lambda done, total: bar("scan row groups", done, total)) if bar else None)
            extra = {"scan": True, "rows_in": scanned.rows_in, "rows_excluded": scanned.excluded}
        else:
            from tasks.stages import contract_check, draw_sample

            raw = load_raw(s.run.data)
            checked = contract_check(raw, s)
            smp, table, population, rep = draw_sample(checked.valid, s)
            extra = {"scan": False, "rows_in": checked.rows_in, "rows_excluded": checked.by_rule}
    except (InputError, SampleError) as exc:
        _fail(str(exc), as_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial(out)
    smp.write_parquet(partial)
    partial.replace(out)  # never a half-written sample under the final name
    result = {"population_turns": population, "sampled_turns": smp.height,
              "weight_sum": float(smp["weight"].sum()), "out": str(out), **extra,
              "elapsed_s": round(time.perf_counter() - t0, 2),
              "strata": {r["stratum"]: {"population": r["population"], "sampled": r["sampled"]} for r in table.iter_rows(named=True)},
              "psi": rep["psi"], "chi_square": rep["chi_square"], "chi_square_p": rep["chi_square_p"],
              "empty_strata": rep["empty_strata"]}
    if as_json:
        print(json.dumps(result))
    else:
        typer.echo(f"sampled {smp.height} of {population} turns in {table.height} strata -> {out}")
        typer.echo(f"stratum mix vs population: PSI {rep['psi']:.4f}, chi-square {rep['chi_square']:.2f} (p {rep['chi_square_p']:.3f})")
        if rep["empty_strata"]:
            typer.secho(f"strata with no sampled turn: {', '.join(rep['empty_strata'])}", fg="yellow", err=True)


@app.command()
def fidelity(
    data: DataOpt = None,
    config: ConfigOpt = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (default sqlite:///./mlflow.db).")] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment for fidelity runs.")] = "depsim-fidelity",
    as_json: JsonOpt = False,
) -> None:
    """Replay the *recorded* tool calls through the simulator and compare with the recorded results.

    Each call's own recorded result is withheld from the simulator. Per tool: calls, exact,
    structural (same shape) and different results, and the simulator sources used. Logged to
    MLflow as one run; `--json` prints the per-tool table.
    """
    import tempfile

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
    with tempfile.TemporaryDirectory() as tmp:
        table.write_parquet(f"{tmp}/fidelity.parquet")
        run_id, _ = log_run(tracking_uri or s.run.tracking_uri or default_tracking_uri(), experiment, "fidelity",
                            {"data": s.run.data or "bundled SYNTHETIC logs", "simulator_chain": s.replay.simulator_chain},
                            metrics, {"depsim.kind": "fidelity"}, Path(tmp))
    result = {"calls": table.height, **overall, "tools": per_tool, "run_id": run_id}
    if as_json:
        print(json.dumps(result))
        return
    typer.echo(f"{'tool':28} {'calls':>7} {'exact':>7} {'struct.':>7} {'diff.':>7}")
    for tool, c in per_tool.items():
        typer.echo(f"{tool:28} {c['calls']:7} {c['exact']:7} {c['structural']:7} {c['different']:7}")
    typer.echo(f"{table.height} recorded calls: {overall['exact']} exact, {overall['structural']} structural, "
               f"{overall['different']} different · MLflow run {run_id}")


_EVAL_METRICS = ("tp", "fp", "tn", "fn", "precision", "recall", "f1", "kappa")


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


@app.command("judge-eval")
def judge_eval(
    data: Annotated[str, typer.Option("--data", "-d", help="Labelled conversation logs (contract field `labels`): JSONL/Parquet file, folder, glob or s3:// URI.")],
    judges: Annotated[str | None, typer.Option("--judges", help="Comma-separated judges of conf/judges.yaml to enable, e.g. rules or rules,llm. Default: judge.kinds of the configuration.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write a calibration file (JSON) for `depsim run --calibration`.")] = None,
    config: ConfigOpt = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (default sqlite:///./mlflow.db).")] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment for judge evaluations.")] = "depsim-judge-eval",
    no_mlflow: Annotated[bool, typer.Option("--no-mlflow", help="Do not log to MLflow.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Measure the judges against human labels (the logs' `labels`) and write a calibration file.

    Every answered turn of every conversation is judged by each enabled judge: the production model's logged turns. No candidate is called.

    Labels are per conversation, verdicts per turn. A conversation counts as flagged for a category when any of its turns is flagged, as not flagged when every turn is scored and none is flagged, and as unscored otherwise (counted, kept out of the 2x2 table). Conversations without a label for a category are left out of it (counted as unlabelled). unsafe_any is the aggregate of the nine unsafe categories, for a judge alone as for the panel.

    Printed per judge (each enabled judge alone, and "combined": the panel's combined verdicts, what a run's rates are made of and what `depsim run --calibration` corrects with) and per category: tp, fp, tn, fn, precision, recall, f1, Cohen's kappa, sensitivity and specificity with 95% Wilson intervals.

    Logged to MLflow (metrics <judge>.<category>.<metric>, the judges' provenance as params) unless --no-mlflow. Exit status 0; 4 on bad input or configuration; 2 on an unknown judge.
    """
    _env_defaults()
    import tempfile

    from tasks.check import CheckResult
    from tasks.config import ConfigError
    from tasks.judges import evaluate as ev
    from tasks.judges.calibrate import validate, write_calibration
    from tasks.load import InputError, dataset_hash, load_raw, resolve_sources
    from tasks.stages import ContractFailed, contract_check
    from tasks.stages import judge_eval as measure
    from tasks.taxonomy import load_taxonomy
    from tasks.tracking import (
        default_tracking_uri,
        evaluation_metrics_of,
        judge_metrics_of,
        log_run,
    )

    t0 = time.perf_counter()
    bar = _Progress()
    over: dict[str, Any] = {"run": {"data": data}}
    names: list[str] | None = None
    if judges is not None:
        names = list(dict.fromkeys(j.strip() for j in judges.split(",") if j.strip()))
        if not names:
            _fail("--judges: name at least one judge", as_json, 2)
        over["judge"] = {"kinds": names}
    s = _settings(config, over, as_json)
    try:
        specs = load_taxonomy(s.judge.taxonomy).get("judges") or {"rules": {}}
    except ConfigError as exc:
        _fail(str(exc), as_json)
    names = list(s.judge.kinds)
    unknown = [n for n in names if n not in specs]
    if unknown:
        _fail(f"unknown judge(s) {', '.join(map(repr, unknown))}: the judges of {s.judge.taxonomy} are "
              f"{', '.join(specs)}", as_json, 2)
    try:
        sources = [src if "://" in src else str(Path(src).resolve()) for src in resolve_sources(s.run.data)]
        bar("load", 0, None)
        raw = load_raw(s.run.data)
    except InputError as exc:
        _fail(str(exc), as_json)
    bar("contract check", 0, None)
    checked: CheckResult = contract_check(raw, s)
    if checked.verdict in ("failed", "error"):
        if not as_json:
            _print_quarantine(checked.quarantine)
        _fail(str(ContractFailed(checked, s.contract.fail_bad_share)), as_json, contract=checked.summary())
    if checked.rows_quarantined and not as_json:
        _print_quarantine(checked.quarantine)
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
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "calibration.json").write_text(
                json.dumps({"version": cal.version, "created_at": cal.created_at, **payload}, indent=2), encoding="utf-8")
            result["run_id"], _ = log_run(tracking_uri or s.run.tracking_uri or default_tracking_uri(), experiment,
                                          f"judge-eval-{'+'.join(names)}", params, metrics, tags, Path(tmp))
        result["experiment"] = experiment
    result["elapsed_s"] = round(time.perf_counter() - t0, 2)
    if as_json:
        print(json.dumps(result))
    else:
        _print_eval(result)


@app.command()
def backtest(
    model: Annotated[str, typer.Option("--model", "-m", help="The shipped model whose prediction is checked (candidate of the simulation).")],
    shipped_at: Annotated[str, typer.Option("--shipped-at", help="When it shipped (ISO 8601, e.g. 2026-11-01): traffic before is simulated, its own turns after are observed.")],
    data: Annotated[str | None, typer.Option("--data", "-d", help="Logs of both periods (split by created_at and model). Default: the SYNTHETIC world (bundled logs before, the model's own generated logs after).")] = None,
    n: Annotated[int | None, typer.Option("--n", help="Turns to sample for the prediction (default sample.n).")] = None,
    seed: SeedOpt = None,
    config: ConfigOpt = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (default sqlite:///./mlflow.db).")] = None,
    store: Annotated[str | None, typer.Option(help="Run store of the prediction run: a folder or s3:// prefix.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Backtest: predict a shipped model's rates by simulating it on the traffic before it shipped, observe them on its own production turns after, and score the prediction.

    Per category: predicted and observed rate, the multiplicative error max(p/o, o/p), and whether the predicted direction of change against the previous model was right; the median error over the fixed categories observed at 1% or more. Logged to MLflow (experiment depsim-backtest) with a report and a scorecard of every backtest there.

    Exit status 0; 4 on bad input or configuration.
    """
    _env_defaults()
    over: dict[str, Any] = {"run": {}}
    for key, value in (("tracking_uri", tracking_uri), ("store", store)):
        if value is not None:
            over["run"][key] = value
    seed_value = _seed(seed, as_json).get("seed")
    from flows.backtest import BacktestError
    from flows.backtest import backtest as run_backtest
    from tasks.config import ConfigError
    from tasks.load import InputError

    if tracking_uri is None:
        from tasks.tracking import default_tracking_uri

        over["run"]["tracking_uri"] = default_tracking_uri()
    try:  # fail fast on a bad time, path or configuration, before starting Prefect
        from flows.backtest import parse_time, precheck

        precheck(model, parse_time(shipped_at), data, _settings(config, over, as_json))
    except (BacktestError, InputError, ConfigError) as exc:
        _fail(str(exc), as_json)
        return
    if not as_json:
        typer.echo(f"depsim: backtest of {model} shipped at {shipped_at}"
                   + ("" if data else " on the SYNTHETIC world"), err=True)
    try:
        result = run_backtest(model, shipped_at, data=data, n=n, seed=seed_value, config=config, overrides=over)
    except (BacktestError, InputError, ConfigError) as exc:
        _fail(str(exc), as_json)
        return
    except Exception as exc:
        _handle_run_error(exc, as_json)
        return
    if as_json:
        from flows.backtest import json_safe

        print(json.dumps(json_safe(result), default=str))
        return
    typer.echo(f"{'category':28} {'previous':>9} {'predicted':>10} {'observed':>9} {'error':>7}  direction")
    for cat, c in result["categories"].items():
        def pct(x: float | None) -> str:
            return "–" if x is None else f"{100 * x:.2f}%"
        err = c["multiplicative_error"]
        err_s = "–" if err is None else ("∞" if err == float("inf") else f"{err:.2f}x")
        mark = "" if c["in_median"] else " (not in median)"
        right = "–" if c["direction_correct"] is None else ("right" if c["direction_correct"] else "wrong")
        typer.echo(f"{cat:28} {pct(c['previous']):>9} {pct(c['predicted']):>10} {pct(c['observed']):>9} {err_s:>7}  {right}{mark}")
    med = result["median_multiplicative_error"]
    typer.echo(f"\nmedian multiplicative error: {'–' if med is None else f'{med:.2f}x'} over {result['categories_in_median']} "
               f"categories observed at >= 1% · MLflow run {result['run_id']} (experiment {result['experiment']})")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
