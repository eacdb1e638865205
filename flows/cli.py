"""The depsim command line: the app, options and helpers shared by every command, and `run`.

The other commands live in flows/cli_*.py by theme; each registers on `app`, and this module
imports every one of them at its end (a new command module needs no edit here).

Exit status, the same rule for every command, in text and in --json mode:

- 0: done (`run`: verdict PASS); `run` also has 1 FAIL and 3 INCONCLUSIVE.
- 2: usage error, the command line itself: an unknown command or option, a missing required
  option, a value of the wrong type, out of range or not one of the choices (`--n -5`,
  `--seed x`, `--judges rulez`, an output file with the wrong suffix). Nothing was read.
- 4: error in what the command line points at or reaches: a missing or unreadable file
  (`--data`, `--config`, `--calibration`), a malformed or invalid configuration (a --config
  file, DEPSIM_* variables), logs that fail the data contract, an endpoint or infrastructure
  fault (Prefect, MLflow, the run store).
- 130: interrupted (Ctrl-C or SIGTERM).

Errors are one line on stderr starting `error:`; with --json, stdout is one JSON object with
an `error` key instead (usage errors too).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from flows import cli_runtime
from flows.cli_runtime import (
    EXIT_INTERRUPTED,
    Progress,
    await_prefect,
    import_pipeline,
    interrupt_types,
    interrupted,
    on_signal,
    on_unraisable,
    quiet,
    start_prefect,
)

try:  # typer >= 0.2x vendors click: its usage errors derive from TyperException
    from typer import TyperException as _UsageErrorBase
except ImportError:  # older typer on click itself
    from click import ClickException as _UsageErrorBase  # type: ignore[assignment]

EXIT = {"PASS": 0, "FAIL": 1, "INCONCLUSIVE": 3}
EXIT_USAGE = 2
EXIT_ERROR = 4

EXIT_RULE = ("Exit status: 0 done · 2 usage error (the command line itself: unknown option, "
             "wrong type, out of range) · 4 error (a missing or malformed file, bad configuration, "
             "contract check failed, endpoint or infrastructure fault) · 130 interrupted.")

app = typer.Typer(
    name="depsim",
    help="depsim — deployment simulation: predict how often a candidate model misbehaves in "
    "production, before it ships. Replays sampled production turns through the candidate with "
    "simulated tools (nothing is executed), judges them, estimates per-category rates with 95% "
    "intervals against the production baseline, gates the release and logs it all to MLflow.",
    epilog="Examples:\n"
    "  depsim run                      # the whole pipeline, SYNTHETIC world\n"
    "  depsim run --help               # a command's options, with examples\n"
    "  depsim check --data logs.jsonl  # the data-contract check alone\n\n"
    "`depsim run`: 0 PASS · 1 FAIL · 3 INCONCLUSIVE. " + EXIT_RULE
    + " docs/cli.md describes every command.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("depsim")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"depsim {_package_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                          help="Print depsim's version and exit.")] = False,
) -> None:
    """depsim — deployment simulation."""


JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of text (errors too: an `error` key).")]
ConfigOpt = Annotated[str | None, typer.Option("--config", "-c", help="YAML file layered over conf/default.yaml (then DEPSIM_* variables, then options). Default: none.")]
DataOpt = Annotated[str | None, typer.Option("--data", "-d", help="Conversation logs: JSONL/Parquet file, folder, glob or s3:// URI. Default: run.data; unset, the bundled SYNTHETIC logs (2,000 conversations).")]
SeedOpt = Annotated[str | None, typer.Option("--seed", help="Random seed (integer) for sampling and replay. Default: run.seed (7).")]
TrackingUriOpt = Annotated[str | None, typer.Option("--tracking-uri", help="MLflow tracking URI. Default: run.tracking_uri, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db.")]


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


def _fail(message: str, as_json: bool, code: int = EXIT_ERROR, **extra: Any) -> NoReturn:
    """One `error:` line on stderr (or one JSON object on stdout) and exit with `code`."""
    # One line, even for a message that quotes a YAML parser's multi-line report.
    message = " ".join(line.strip() for line in message.splitlines() if line.strip().strip("^"))
    if as_json:
        print(json.dumps({"error": message, **extra}))
    else:
        typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(code)


def _usage(message: str, as_json: bool) -> NoReturn:
    """A usage error found by depsim rather than by typer: the same exit status, 2."""
    _fail(message, as_json, EXIT_USAGE, usage_error=True)


def _partial(out: Path) -> Path:
    """Where an output is written before it is renamed into place (never half-written under its name)."""
    return out.with_name(f".{out.stem}.partial{out.suffix}")


def _seed(seed: str | None, as_json: bool) -> dict[str, Any]:
    if seed is None:
        return {}
    try:
        return {"seed": int(seed)}
    except ValueError:
        _usage(f"--seed must be an integer, got {seed!r}", as_json)


def _settings(config: str | None, overrides: dict[str, Any], as_json: bool) -> Any:
    from tasks.config import ConfigError, load_settings

    try:
        return load_settings(config, overrides)
    except ConfigError as exc:
        _fail(str(exc), as_json)


def _print_quarantine(q: Any, limit: int = 20, where: str = "") -> None:
    _print_quarantine_rows(q.head(limit).to_dicts(), q.height, limit, where)


def _print_quarantine_rows(rows: list[dict[str, Any]], total: int, limit: int = 20, where: str = "") -> None:
    for r in rows[:limit]:
        typer.secho(f"quarantined: {r['source_file']}:{r['source_line']}: {r['rule']}: {r['reason']}",
                    fg="yellow", err=True)
    if total > limit:
        typer.secho(f"... and {total - limit} more quarantined rows{f' ({where})' if where else ''}",
                    fg="yellow", err=True)



# ---- depsim run ------------------------------------------------------------------------------

@app.command(epilog="Examples:\n"
             "  depsim run                   # the default: 1,000 SYNTHETIC turns, ~1 min\n"
             "  depsim run --n 200 --seed 3  # a smaller sample, another draw\n"
             "  depsim run --config conf/examples/openai.yaml \\\n"
             "      --data logs/production.jsonl --json\n\n"
             "Exit status: 0 PASS · 1 FAIL · 3 INCONCLUSIVE · 4 error (a missing or malformed file, bad "
             "configuration, contract check failed, endpoint or infrastructure fault) · 2 usage error "
             "(the command line itself) · 130 interrupted: rerun the same command to resume, the "
             "model-call cache makes it repeat no completed call.")
def run(
    data: DataOpt = None,
    config: ConfigOpt = None,
    candidate: Annotated[str | None, typer.Option(help="Candidate model name (role `candidate`). Default: models.candidate.model (synthetic-agent-v2).")] = None,
    candidate_url: Annotated[str | None, typer.Option(help="Candidate base_url (OpenAI-compatible). Default: models.candidate.base_url (synthetic://, the in-process SYNTHETIC world).")] = None,
    baseline: Annotated[str | None, typer.Option(help="Production (baseline) model name; also filters the logs to it. Default: models.baseline.model (synthetic-agent-v1), logs not filtered.")] = None,
    n: Annotated[int | None, typer.Option("--n", min=1, help="Number of turns to sample (with --looks: the budget). Default: sample.n (1000).")] = None,
    looks: Annotated[int | None, typer.Option("--looks", min=1, help="Adaptive stopping: replay in this many looks and stop at the first where every gate is decided; each look's intervals are 1 − 0.05/K (Bonferroni), so the reported ones hold at 95% whichever look stops. Default: sample.looks (1: one look at the whole sample).")] = None,
    seed: SeedOpt = None,
    store: Annotated[str | None, typer.Option(help="Run store: a folder or s3:// prefix. Default: run.store (./depsim-runs).")] = None,
    tracking_uri: TrackingUriOpt = None,
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment name. Default: run.experiment (depsim).")] = None,
    calibration: Annotated[str | None, typer.Option(help="Calibration file from `depsim judge-eval --out`: adds Rogan–Gladen corrected rates to the report and MLflow. Default: judge.calibration (none).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's own logs and task-failure tracebacks.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run the whole deployment simulation (Prefect flow `deployment_simulation`).

    Load → contract check → sample → replay the candidate with simulated tools → judge → estimate and gate → report → MLflow. Progress goes to stderr; the gate table, the report path and the MLflow run to stdout.

    When more than replay.max_error_share (default 5%) of the candidate's turns end in an endpoint error (connection, timeout, HTTP error or malformed reply, after retries), the run is an error: exit 4, one `error:` line naming the endpoint and the counts by kind, an error report, and an MLflow run marked FAILED. Below the limit errored turns count in the rates' denominator.

    Ctrl-C or SIGTERM stops the replay at its next turn, marks the Prefect flow run CRASHED and exits 130 with the command that resumes it.
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
    from tasks.progress import clear_stop, set_reporter

    try:  # fail fast on a wrong path, a missing key or a bad calibration file, before starting Prefect
        resolve_sources(s.run.data)
        s.models.candidate.api_key()
        from tasks.local_llm import preflight

        preflight(s)  # local-llm:// roles: the extra and the model are there
        if s.judge.calibration:
            from tasks.judges.calibrate import read_calibration

            read_calibration(s.judge.calibration)
    except (InputError, ConfigError) as exc:
        _fail(str(exc), as_json)
    bar = Progress(then={"judge": "estimate and gate, report, MLflow run"})
    note = quiet if as_json else bar.note
    clear_stop()
    if not as_json:
        set_reporter(bar)
        note("depsim: Prefect flow deployment_simulation"
             + (" with a SYNTHETIC candidate" if s.models.candidate.synthetic else ""))
    t0 = time.perf_counter()
    server = None
    if not as_json:
        bar.watch()
    try:
        server = start_prefect(note)
        import_pipeline(note)
        from flows.simulate import deployment_simulation

        await_prefect(server, note)
        result = deployment_simulation(s.public_dict())
    except interrupt_types():
        bar.close()
        interrupted(as_json, s.replay.cache, server)
    except Exception as exc:
        bar.close()
        _handle_run_error(exc, as_json, s.run.store)
    finally:
        bar.close()
    result["elapsed_s"] = round(time.perf_counter() - t0, 2)
    if as_json:
        print(json.dumps(result, default=str))
    else:
        _print_quarantine_rows(result["quarantined"], result["contract"]["rows_quarantined"],
                               where=f"all of them: quarantine.parquet in {result['store']}")
        _print_result(result)
    raise typer.Exit(EXIT[result["verdict"]])


def _handle_run_error(exc: Exception, as_json: bool, store: str) -> NoReturn:
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
            _print_quarantine(exc.result.quarantine,
                              where=f"all of them: quarantine.parquet in this run's folder under {store}")
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
    if r.get("deid"):
        from tasks.report import deid_line

        typer.echo(deid_line(r["deid"]))
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


# ---- entry point -----------------------------------------------------------------------------

def _show_usage_error(exc: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"error": exc.format_message(), "usage_error": True}))
        return
    try:
        from typer import rich_utils
    except ImportError:  # typer without rich: click's plain format
        exc.show()
        return
    rich_utils.rich_format_error(exc)  # prints nothing for a bare `depsim`: its help is shown


def main() -> None:
    """`depsim`: the exit status rule of the module docstring, in text and --json mode."""
    args = sys.argv[1:]
    as_json = "--json" in args[: args.index("--")] if "--" in args else "--json" in args
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)  # `kill`, a CI timeout, a container stop: as Ctrl-C
    sys.unraisablehook = on_unraisable
    try:
        code = app(args=args, prog_name="depsim", standalone_mode=False)
    except _UsageErrorBase as exc:  # typer's and click's own usage errors
        _show_usage_error(exc, as_json)
        sys.exit(exc.exit_code)
    except typer.Abort:  # end of input at a prompt
        code = EXIT_INTERRUPTED
    if code == EXIT_INTERRUPTED and not cli_runtime.interrupt_shown:  # typer turns Ctrl-C into exit 130
        typer.secho("interrupted", fg="yellow", err=True)
        if as_json:
            print(json.dumps({"error": "interrupted", "interrupted": True}))
    sys.exit(code or 0)


def _register_commands() -> None:
    """Import every flows/cli_*.py module: each registers its commands on `app`."""
    import importlib
    import pkgutil

    import flows

    for module in sorted(m.name for m in pkgutil.iter_modules(flows.__path__)):
        if module.startswith("cli_"):
            importlib.import_module(f"flows.{module}")


if __name__ == "__main__":
    # `python -m flows.cli` runs this file as __main__, a second copy of the module: hand over to
    # flows.cli itself, on whose `app` the command modules register their commands.
    from flows.cli import main as _main

    _main()
else:
    _register_commands()
