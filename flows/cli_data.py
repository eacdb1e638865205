"""CLI commands on logs and the SYNTHETIC world: check, sample, synth-logs, serve-synthetic.

Registered on flows.cli.app (flows/cli.py imports every flows/cli_*.py module).
"""

from __future__ import annotations

import json
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from flows.cli import (
    EXIT_ERROR,
    ConfigOpt,
    DataOpt,
    JsonOpt,
    SeedOpt,
    _fail,
    _partial,
    _print_quarantine,
    _seed,
    _settings,
    _usage,
    app,
)
from flows.cli_runtime import Progress


class Allocation(StrEnum):
    proportional = "proportional"
    equal = "equal"
    neyman = "neyman"


class TurnsPerConversation(StrEnum):
    all = "all"
    last = "last"
    random = "random"


@app.command(epilog="Examples:\n"
             "  depsim check                  # the bundled SYNTHETIC logs\n"
             "  depsim check --data logs/ --quarantine bad.parquet\n"
             "  depsim check --data logs/production.jsonl --json\n\n"
             "Exit status: 0 verdict passed or warning · 4 verdict failed or error, or a missing or "
             "unreadable file, or a bad configuration · 2 usage error · 130 interrupted.")
def check(
    data: DataOpt = None,
    config: ConfigOpt = None,
    quarantine: Annotated[Path | None, typer.Option(help="Write the quarantined rows (file, line, rule, reason, record) to this Parquet file. Default: not written (the first 20 are printed).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check conversation logs against the data contract (data_contracts/conversation.yaml); quarantine and explain bad rows.

    Real-world variants (object arguments, missing ids, missing tool schemas, agent/human roles, terminal escape codes in tool output) are normalised first and counted. Conversations with a made-up tool call or an empty assistant reply are kept and flagged (real model behaviour, not bad data).
    """
    from tasks.check import load_contract
    from tasks.check_stream import stream_check
    from tasks.load import InputError

    s = _settings(config, {"run": {"data": data}} if data else {}, as_json)

    ticked: list[int] = []

    def tick(rows: int) -> None:
        if not as_json:
            typer.echo(f"\r  {rows:,} rows checked", nl=False, err=True)
            ticked.append(rows)

    try:
        result = stream_check(s.run.data, load_contract(s.contract.file), s.contract.warn_bad_share,
                              s.contract.fail_bad_share, progress=tick)
    except InputError as exc:
        if ticked:
            typer.echo("", err=True)
        _fail(str(exc), as_json)
    if ticked:
        typer.echo("", err=True)
    summary = result.summary()
    if quarantine is not None:
        try:
            quarantine.parent.mkdir(parents=True, exist_ok=True)
            result.quarantine.write_parquet(quarantine)
        except OSError as exc:
            _fail(f"{quarantine}: cannot write the quarantine file ({exc.strerror or exc})", as_json)
        summary["quarantine"] = str(quarantine)
    if as_json:
        print(json.dumps(summary))
    else:
        _print_quarantine(result.quarantine,
                          where=f"all of them in {quarantine}" if quarantine else "--quarantine FILE writes all of them")
        typer.echo(f"verdict {summary['verdict']}: {summary['rows_passed']} of {summary['rows_in']} rows passed, "
                   f"{summary['rows_quarantined']} quarantined")
        for f in result.flagged[:20]:
            typer.echo(f"flagged (kept): {f['source_file']}:{f['source_line']} {f['rule']} {f['field']}: {f['reason']}")
        if len(result.flagged) > 20:
            typer.echo(f"flagged (kept): … {len(result.flagged) - 20} more (`--json` counts them per rule)")
    raise typer.Exit(0 if result.verdict in ("passed", "warning") else EXIT_ERROR)


@app.command(epilog="Examples:\n"
             "  depsim sample --out sample.parquet    # 1,000 turns of the bundled logs\n"
             "  depsim sample --data big.parquet --n 2000 --out s.parquet --json\n"
             "  depsim sample --out s.parquet --strata surface,language --allocation equal\n\n"
             "Exit status: 0 done · 4 a missing or unreadable file, a bad configuration, an empty "
             "population · 2 usage error (e.g. --n 0, --seed x, an --out not ending in .parquet) · "
             "130 interrupted.")
def sample(
    out: Annotated[Path, typer.Option(help="Output Parquet file for the sampled turns (.parquet).")],
    data: DataOpt = None,
    config: ConfigOpt = None,
    n: Annotated[int | None, typer.Option("--n", min=1, help="Number of turns. Default: sample.n (1000).")] = None,
    seed: SeedOpt = None,
    strata: Annotated[str | None, typer.Option(help="Comma-separated stratum columns (surface, task_type, language, uses_tools, prefix_bucket, model, ...). Default: sample.strata (surface,task_type,uses_tools).")] = None,
    allocation: Annotated[Allocation | None, typer.Option(help="How turns are shared among strata (neyman needs sample.prior). Default: sample.allocation (proportional).")] = None,
    turns: Annotated[TurnsPerConversation | None, typer.Option(help="Which turns of a conversation may be drawn. Default: sample.turns (all).")] = None,
    dedupe: Annotated[bool | None, typer.Option("--dedupe/--no-dedupe", help="Collapse near-duplicate prefixes. Default: sample.dedupe (off).")] = None,
    scan: Annotated[bool | None, typer.Option("--scan/--no-scan", help="Scan the logs lazily (Parquet and JSONL), or load and contract-check whole conversations. Default: sample.scan (auto: Parquet, and JSONL of sample.scan_jsonl_min_mb or more).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Draw the stratified sample of turns (with weights) as a stage of its own.

    The output Parquet has one row per sampled turn with its stratum, inclusion probability and `weight` (1 / inclusion probability). JSONL logs are loaded whole and rows failing the data contract are left out, as in the flow.

    Parquet logs are scanned lazily (ids, strata and message roles only; no message content); rows without an id or messages, or with a repeated id, are left out and counted in `rows_excluded`; run `depsim check` for the whole contract.
    """
    from tasks.load import InputError, load_raw
    from tasks.sample import SampleError
    from tasks.scan import draw_sample_scan, scan_eligible

    if out.suffix != ".parquet":
        _usage(f"{out}: the output must end in .parquet", as_json)
    t0 = time.perf_counter()
    over: dict[str, Any] = {"run": {**_seed(seed, as_json)}, "sample": {}}
    if data:
        over["run"]["data"] = data
    for key, value in (("n", n), ("allocation", allocation and allocation.value),
                       ("turns", turns and turns.value), ("dedupe", dedupe)):
        if value is not None:
            over["sample"][key] = value
    if scan is not None:
        over["sample"]["scan"] = "on" if scan else "off"
    if strata is not None:
        over["sample"]["strata"] = [c.strip() for c in strata.split(",") if c.strip()]
    s = _settings(config, over, as_json)
    extra: dict[str, Any] = {}
    try:
        if scan_eligible(s):
            bar = Progress() if not as_json else None
            smp, table, population, rep, scanned = draw_sample_scan(
                s, progress=(lambda done, total: bar("scan (Parquet row groups, JSONL bytes)", done, total)) if bar else None)
            extra = {"scan": True, "rows_in": scanned.rows_in, "rows_excluded": scanned.excluded,
                     "bad_lines": scanned.bad_lines[:20], "from_cache": scanned.cached}
        else:
            from tasks.stages import contract_check, draw_sample

            raw = load_raw(s.run.data)
            checked = contract_check(raw, s)
            smp, table, population, rep = draw_sample(checked.valid, s)
            extra = {"scan": False, "rows_in": checked.rows_in, "rows_excluded": checked.by_rule}
    except (InputError, SampleError) as exc:
        _fail(str(exc), as_json)
    partial = _partial(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        smp.write_parquet(partial)
        partial.replace(out)  # never a half-written sample under the final name
    except OSError as exc:
        _fail(f"{out}: cannot write the sample ({exc.strerror or exc})", as_json)
    result = {"population_turns": population, "sampled_turns": smp.height,
              "weight_sum": float(smp["weight"].sum()), "out": str(out), **extra,
              "elapsed_s": round(time.perf_counter() - t0, 2),
              "strata": {r["stratum"]: {"population": r["population"], "sampled": r["sampled"]} for r in table.iter_rows(named=True)},
              "psi": rep["psi"], "chi_square": rep["chi_square"], "chi_square_p": rep["chi_square_p"],
              "empty_strata": rep["empty_strata"]}
    if as_json:
        print(json.dumps(result))
    else:
        if extra.get("from_cache"):
            typer.echo(f"population from the scan cache (the files unchanged since their scan at "
                       f"{extra['from_cache']['created_at']}; sample.scan_cache: false to scan again)")
        typer.echo(f"sampled {smp.height} of {population} turns in {table.height} strata -> {out}")
        typer.echo(f"stratum mix vs population: PSI {rep['psi']:.4f}, chi-square {rep['chi_square']:.2f} (p {rep['chi_square_p']:.3f})")
        if rep["empty_strata"]:
            typer.secho(f"strata with no sampled turn: {', '.join(rep['empty_strata'])}", fg="yellow", err=True)


@app.command("scan", epilog="Examples:\n"
             "  depsim scan --data logs/prod.jsonl.gz --n 2000              # when the log lands\n"
             "  depsim run --data logs/prod.jsonl.gz --n 2000 --candidate ckpt-42   # after each checkpoint\n"
             "  depsim scan --data logs/ --store /srv/depsim-runs --json   # runs with the same --store\n\n"
             "Exit status: 0 done, or nothing to prepare (said why) · 4 a missing or unreadable file, a log "
             "the scan cannot read, a bad configuration · 2 usage error · 130 interrupted.")
def scan(
    data: DataOpt = None,
    config: ConfigOpt = None,
    store: Annotated[str | None, typer.Option(help="The runs' store: its scan cache is filled (<store>/cache/scans; for an s3:// store a local .depsim/cache/scans under the current folder, which only runs started there read). Default: run.store (./depsim-runs).")] = None,
    n: Annotated[int | None, typer.Option("--n", min=1, help="The runs' sample size: the lines such a draw picks are kept. Default: sample.n (1000).")] = None,
    seed: SeedOpt = None,
    strata: Annotated[str | None, typer.Option(help="The runs' stratum columns. Default: sample.strata.")] = None,
    baseline: Annotated[str | None, typer.Option(help="The runs' --baseline (it filters the logs to that model). Default: logs not filtered.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Scan a log into the run store's scan cache once, so that the runs over it do not.

    The one pass over the log that a first `depsim run` makes (inflate, parse, count turns per stratum, keep the JSONL lines its draw picks) made ahead, e.g. when a new log lands. The next `depsim run` over the unchanged files with the same store and draw settings (--n, --seed, strata, --baseline, allocation, turn choice, filters) does not scan the log, and from JSONL does not read its lines again. Another draw over the cached population reads only its lines, in one pass. When runs with these settings would not read the cache (sample.scan_cache false, or a log they load whole), it says so and does nothing.
    """
    from tasks.load import InputError
    from tasks.sample import SampleError
    from tasks.scan import draw_sample_scan, is_jsonl, scan_eligible
    from tasks.scan_cache import cache_root

    t0 = time.perf_counter()
    over: dict[str, Any] = {"run": {**_seed(seed, as_json)}, "sample": {}}
    if data:
        over["run"]["data"] = data
    if store:
        over["run"]["store"] = store
    if baseline:
        over["run"]["production_models"] = [baseline]
    if n is not None:
        over["sample"]["n"] = n
    if strata is not None:
        over["sample"]["strata"] = [c.strip() for c in strata.split(",") if c.strip()]
    s = _settings(config, over, as_json)
    try:
        why = ("sample.scan_cache is false, so runs do not read the cache" if not s.sample.scan_cache else
               None if scan_eligible(s) else
               "runs load this log whole and check every conversation (sample.scan, sample.scan_jsonl_min_mb: "
               "JSONL under the size is loaded; sample.dedupe and labels priors need whole conversations)")
        if why:
            if as_json:
                print(json.dumps({"skipped": why, "cache": None, "elapsed_s": round(time.perf_counter() - t0, 2)}))
            else:
                typer.echo(f"nothing to prepare: {why}")
            return
        bar = Progress() if not as_json else None
        _, _, population, _, scanned = draw_sample_scan(
            s, progress=(lambda done, total: bar("scan (Parquet row groups, JSONL bytes)", done, total)) if bar else None,
            retain=True)
        if scanned.saving is not None:
            scanned.saving.join()
    except (InputError, SampleError) as exc:
        _fail(str(exc), as_json)
    entry = (cache_root(s) / scanned.key).resolve() if scanned.key else None
    jsonl = any(is_jsonl(src) for src in scanned.sources)
    result = {"population_turns": population, "rows_in": scanned.rows_in, "files": scanned.files,
              "rows_excluded": scanned.excluded, "bad_lines": scanned.bad_lines[:20],
              "time_range": scanned.time_range, "kept_lines": len(scanned.kept),
              "from_cache": scanned.cached, "cache": str(entry) if entry and (entry / "meta.json").is_file() else None,
              "elapsed_s": round(time.perf_counter() - t0, 2)}
    if as_json:
        print(json.dumps(result, default=str))
        return
    if scanned.cached:
        typer.echo(f"already in the scan cache (scanned at {scanned.cached['created_at']}; the files are unchanged)")
    else:
        excluded = ", ".join(f"{k} {v:,}" for k, v in sorted(scanned.excluded.items())) or "none"
        typer.echo(f"scanned {scanned.rows_in:,} rows in {scanned.files} file(s): {population:,} turns; "
                   f"left out: {excluded}")
        for b in scanned.bad_lines[:20]:
            typer.echo(f"bad line: {b['source_file']}:{b['source_line']} {b['rule']}: {b['reason']}")
    if result["cache"] is None:
        typer.secho("the scan cache was not written (a file that cannot be fingerprinted, or a store that cannot "
                    "be written: see the warning above): runs will scan again", fg="yellow", err=True)
        return
    typer.echo(f"-> {result['cache']}")
    if jsonl:
        typer.echo(f"kept {len(scanned.kept):,} lines for a draw of {s.sample.n} turns (seed {s.run.seed})" if scanned.kept
                   else "no lines kept for this draw: a run reads its lines in one pass over the files")


@app.command("synth-logs", epilog="Examples:\n"
             "  depsim synth-logs --out logs.jsonl --n 500\n"
             "  depsim synth-logs --out v3.jsonl --model synthetic-agent-v3 --seed 1\n"
             "  depsim synth-logs --out big.parquet --turns 10000000   # scale mode, ~1 min\n\n"
             "Exit status: 0 done · 2 usage error (an unknown --model, an --out not ending in .jsonl "
             "or .parquet, --turns without .parquet) · 4 the output cannot be written · 130 interrupted.")
def synth_logs(
    out: Annotated[Path, typer.Option(help="Output file: .jsonl or .parquet.")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of conversations (scripted generator).")] = 1000,
    turns: Annotated[int | None, typer.Option("--turns", min=1, help="Scale mode (.parquet only): exactly this many turns, conversations drawn from a pool of --pool scripted ones with new ids and times. Default: off (--n scripted conversations).")] = None,
    pool: Annotated[int, typer.Option("--pool", min=1, help="Scale mode: scripted conversations in the pool.")] = 2000,
    model: Annotated[str, typer.Option(help="Scripted profile that 'served' production: synthetic-agent-v1, -v2 or -v3.")] = "synthetic-agent-v1",
    seed: Annotated[str | None, typer.Option("--seed", help="Random seed (integer) of the generator. Default: 0.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Generate SYNTHETIC production logs in the conversation contract (deterministic by seed).

    By default every conversation is scripted (~500 conversations/s). With --turns, a Parquet log of that many turns is assembled from a pool of scripted conversations (10M turns in about a minute); content repeats across copies, so use it for scale tests, not for statistics.
    """
    from tasks.synthetic.profiles import PROFILE_NAMES

    if model not in PROFILE_NAMES:
        _usage(f"unknown synthetic model {model!r} (available: {', '.join(PROFILE_NAMES)})", as_json)
    if out.suffix not in (".jsonl", ".parquet"):
        _usage(f"{out}: the output must end in .jsonl or .parquet", as_json)
    if turns is not None and out.suffix != ".parquet":
        _usage(f"{out}: --turns (scale mode) writes Parquet only; use a .parquet output", as_json)
    seed_v = _seed(seed, as_json).get("seed", 0)
    t0 = time.perf_counter()
    partial = _partial(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        count, extra = _write_synthetic(partial, n, turns, pool, model, seed_v, as_json)
        partial.replace(out)
    except OSError as exc:
        _fail(f"{out}: cannot write the logs ({exc.strerror or exc})", as_json)
    result = {"out": str(out), "conversations": count, **extra, "model": model, "seed": seed_v, "synthetic": True,
              "elapsed_s": round(time.perf_counter() - t0, 2)}
    print(json.dumps(result) if as_json else f"wrote {count} SYNTHETIC conversations to {out}")


def _write_synthetic(partial: Path, n: int, turns: int | None, pool: int, model: str, seed: int,
                     as_json: bool) -> tuple[int, dict[str, Any]]:
    from tasks.synthetic.logs import write_logs

    if turns is None:
        return write_logs(partial, n, model, seed), {"scale_mode": False}
    from tasks.synthetic.scale import write_scaled_parquet

    def tick(done: int, total: int) -> None:
        if not as_json:
            typer.echo(f"\r  {done:,}/{total:,} conversations", nl=False, err=True)

    info = write_scaled_parquet(partial, turns, model, seed, pool=pool, progress=tick)
    if not as_json:
        typer.echo("", err=True)
    return info["conversations"], {"turns": info["turns"], "pool": info["pool"], "scale_mode": True}


@app.command("serve-synthetic", epilog="Examples:\n"
             "  depsim serve-synthetic --port 8089\n"
             "  DEPSIM_MODELS__CANDIDATE__BASE_URL=http://127.0.0.1:8089/v1 depsim run\n\n"
             "Exit status: 0 stopped (Ctrl-C or SIGTERM) · 2 usage error · 4 the port cannot be "
             "bound.")
def serve_synthetic(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Loopback port.")] = 8089,
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
) -> None:
    """Serve the SYNTHETIC world as an OpenAI-compatible API (POST /v1/chat/completions).

    Point any role at it with base_url http://HOST:PORT/v1 and a model such as synthetic-agent-v2. Runs until Ctrl-C or SIGTERM.
    """
    import socket

    from tasks.synthetic.server import MODEL_NAMES, serve

    try:  # uvicorn would log the bind error and exit 1: say it as depsim's own error instead
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind((host, port))
    except OSError as exc:
        _fail(f"cannot serve on {host}:{port}: {exc.strerror or exc}", False)
    typer.echo(f"SYNTHETIC world on http://{host}:{port}/v1 (models: {', '.join(MODEL_NAMES)})", err=True)
    serve(host, port)
