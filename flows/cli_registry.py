"""CLI commands of the MLOps loop: compare a registered model's versions, poll the registry once,
run the webhook receiver. Registered on flows.cli.app (flows/cli.py imports this module)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from flows.cli import EXIT_ERROR, ConfigOpt, JsonOpt, _env_defaults, _fail, _settings, app

TrackingOpt = Annotated[str | None, typer.Option(
    "--tracking-uri", help="MLflow tracking and registry URI. Default: run.tracking_uri, else "
    "$MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db.")]


def _uri(tracking_uri: str | None, config: str | None, as_json: bool) -> str:
    from tasks.tracking import default_tracking_uri

    if tracking_uri:
        return tracking_uri
    s = _settings(config, {}, as_json)
    return str(s.run.tracking_uri or default_tracking_uri())


def _fmt(v: float | None, pct: bool = True) -> str:
    if v is None:
        return "–"
    return f"{100 * v:+.2f}" if not pct else f"{100 * v:.2f}"


@app.command(epilog="Example: depsim compare --model support-agent --tracking-uri http://127.0.0.1:5000")
def compare(
    model: Annotated[str, typer.Option("--model", "-m", help="Registered model name (MLflow model registry).")],
    category: Annotated[list[str] | None, typer.Option("--category", help="Only these categories (repeatable). Default: all.")] = None,
    experiment: Annotated[str | None, typer.Option(help="Only this MLflow experiment. Default: every experiment.")] = None,
    tracking_uri: TrackingOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Per-version table of a registered model's depsim runs, from MLflow: one row per run with
    version, verdict, and per category the rate (%), its 95% interval and the delta against the
    production baseline (points). Exit 4 when MLflow can't be read or the model has no runs."""
    _env_defaults()
    from tasks.registry import compare_rows

    uri = _uri(tracking_uri, config, as_json)
    try:
        rows = compare_rows(uri, model, experiment)
    except Exception as exc:
        _fail(f"MLflow at {uri}: {type(exc).__name__}: {exc}", as_json)
    if not rows:
        _fail(f"no depsim runs tagged with registered model {model!r} at {uri} (runs of `simulate_model_version` "
              "carry the tag depsim.model.name)", as_json, EXIT_ERROR, rows=[])
    wanted = set(category or [])
    for r in rows:
        r["categories"] = {c: v for c, v in r["categories"].items() if not wanted or c in wanted}
    if as_json:
        print(json.dumps({"model": model, "tracking_uri": uri, "rows": rows}))
        return
    cats = list(rows[0]["categories"])
    typer.echo(f"registered model {model} · {len(rows)} run(s) · MLflow {uri}")
    typer.echo("rate % [95% interval] (delta vs baseline, points) · gate")
    for r in rows:
        typer.echo(f"\nversion {r['version']}  {r['verdict']}  run {r['run_id']}  {r['started']}  {r['candidate']}")
        for c in cats:
            v: dict[str, Any] = r["categories"].get(c) or {}
            if v.get("rate") is None:
                continue
            typer.echo(f"  {c:<26} {_fmt(v['rate']):>6} [{_fmt(v['lower'])}, {_fmt(v['upper'])}]"
                       f"  ({_fmt(v['delta'], pct=False)} [{_fmt(v['delta_lower'], pct=False)}, "
                       f"{_fmt(v['delta_upper'], pct=False)}])  {v.get('gate') or ''}")


@app.command("watch-registry", epilog="Example: depsim watch-registry --tracking-uri http://127.0.0.1:5000 --json")
def watch_registry_cmd(
    config: ConfigOpt = None,
    tracking_uri: TrackingOpt = None,
    grace_s: Annotated[float, typer.Option("--grace-s", help="Leave versions younger than this to the webhook path.")] = 0.0,
    as_json: JsonOpt = False,
) -> None:
    """Poll the MLflow model registry once (the `watch_registry` flow, here, without a Prefect
    deployment): simulate every recent version of the watched models (registry.models; all when
    empty) that no one has claimed, one by one, and write each verdict back onto its version.
    A version without depsim.base_url and depsim.model tags is told so (depsim.verdict ERROR)."""
    _env_defaults()
    overrides: dict[str, Any] = {"run": {"tracking_uri": tracking_uri}} if tracking_uri else {}
    _settings(config, overrides, as_json)  # a bad config is a one-line error here, not in the flow
    from flows.registry import watch_registry

    try:
        out = watch_registry(_as_overrides(config, overrides), deployment=None, grace_s=grace_s)
    except Exception as exc:
        _fail(f"{type(exc).__name__}: {exc}", as_json)
    if as_json:
        print(json.dumps(out))
        return
    typer.echo(f"started {len(out['started'])}: {', '.join(out['started']) or '–'} · told missing endpoint "
               f"{len(out['told_missing_endpoint'])} · skipped {out['skipped']}")


def _as_overrides(config: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """A --config file's content layered with `overrides`, as the flow's overrides parameter."""
    from tasks.config import _deep_merge, read_conf_yaml

    return _deep_merge(read_conf_yaml(config) if config else {}, overrides)


@app.command("receiver", context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             epilog="Example: DEPSIM_WEBHOOK_SECRET=... PREFECT_API_URL=http://127.0.0.1:4200/api "
                    "depsim receiver --port 8787")
def receiver_cmd(ctx: typer.Context) -> None:
    """Run the MLflow model-registry webhook receiver (deployments/receiver.py; its options:
    `python -m deployments.receiver --help`): verifies signed deliveries and turns each new model
    version into a Prefect event that starts its simulation. Needs DEPSIM_WEBHOOK_SECRET."""
    from deployments.receiver import main

    raise typer.Exit(main(list(ctx.args)) or 0)


@app.command("labels", epilog="Example: depsim labels --run 6956c70db5954339 --out reviewed.jsonl && "
                              "depsim judge-eval --data reviewed.jsonl")
def labels_cmd(
    run: Annotated[str, typer.Option("--run", help="MLflow run id of a depsim run whose traces reviewers labelled.")],
    out: Annotated[str, typer.Option("--out", help="Labelled set to write (JSONL, the conversation contract with labels).")],
    tracking_uri: TrackingOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Read back the labels reviewers added to a run's traces in the MLflow UI (assessments from a
    HUMAN source, named after a category, value true/false) and write them as a labelled set that
    `depsim judge-eval --data` measures the judges on. A labelled turn that follows an answered
    turn in its conversation is left out (judge-eval scores a record as a whole); the count is
    printed. Exit 4 when the run or its run-store folder can't be read or nothing is labelled."""
    _env_defaults()
    from pathlib import Path

    from tasks.trace_labels import human_labels, labelled_set

    uri = _uri(tracking_uri, config, as_json)
    try:
        from mlflow.tracking import MlflowClient

        tags = MlflowClient(tracking_uri=uri).get_run(run).data.tags
        store = tags.get("depsim.store")
        if not store or not Path(store).is_dir():
            _fail(f"run {run}: its run-store folder {store or '(not tagged)'} is not on this machine", as_json)
        labels = human_labels(uri, run)
        records = labelled_set(uri, run, str(store))
    except typer.Exit:
        raise
    except Exception as exc:
        _fail(f"MLflow at {uri}, run {run}: {type(exc).__name__}: {exc}", as_json)
    if not records:
        _fail(f"run {run}: no human labels to export ({labels.height} label rows on its traces)", as_json)
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    summary = {"run_id": run, "out": str(target), "records": len(records), "label_rows": labels.height,
               "reviewers": sorted(set(labels["reviewer"].drop_nulls().to_list()))}
    if as_json:
        print(json.dumps(summary))
    else:
        typer.echo(f"{len(records)} labelled turns from {labels.height} human labels → {target}; measure the judges: "
                   f"depsim judge-eval --data {target}")
