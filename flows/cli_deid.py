"""`depsim deid`: de-identify conversation logs on their own (tasks/deid.py), with counts per
kind. Registered on flows.cli.app (flows/cli.py imports this module)."""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Annotated, Any, cast

import typer

from flows.cli import EXIT_ERROR, JsonOpt, _fail, _partial, _usage, app

_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz", ".json")


def _writer(path: Path) -> IO[str]:
    if path.name.endswith(".gz"):
        return cast(IO[str], gzip.open(path, "wt", encoding="utf-8", newline="\n"))
    return path.open("w", encoding="utf-8", newline="\n")


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with gzip.open(path, "rb") if path.name.endswith(".gz") else path.open("rb") as fh:
        yield from enumerate(fh, start=1)


def _parse(line: bytes) -> tuple[dict[str, Any] | None, str | None]:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 text (byte {exc.start + 1})"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"not JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(value, dict):
        return None, f"not a JSON object ({type(value).__name__})"
    return value, None


@app.command("deid", epilog="Example: depsim deid --data logs.jsonl.gz --out logs.deid.jsonl.gz --json")
def deid_cmd(
    data: Annotated[str, typer.Option("--data", "-d", help="Conversation logs to de-identify: one JSONL or JSONL.gz file.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Where to write the de-identified JSONL (.jsonl, or .jsonl.gz to compress).")],
    as_json: JsonOpt = False,
) -> None:
    """De-identify conversations: credentials, e-mail addresses, phone numbers, IP addresses,
    URL passwords and account numbers become typed placeholders (<SECRET_1>, <EMAIL_2>, ...),
    the same value the same placeholder everywhere in a conversation (messages, tool-call
    arguments, tool results). Names are not detected (no offline NER library). The mapping stays
    in memory and is never written or printed. Prints the distinct values replaced per kind. A
    line that is not a JSON object is named (file:line), counted and not written; exit 4 if any."""
    from tasks.deid import KINDS, Deidentifier

    src, dst = Path(data), Path(out)
    if not dst.name.endswith((".jsonl", ".jsonl.gz")):
        _usage(f"--out must end in .jsonl or .jsonl.gz, got {out!r}", as_json)
    if not data.endswith(_SUFFIXES):
        _usage(f"--data must be a JSONL file (.jsonl, .jsonl.gz), got {data!r}", as_json)
    if not src.is_file():
        _fail(f"{data}: no such file", as_json)
    if src.resolve() == dst.resolve():
        _usage("--out must differ from --data", as_json)
    partial = _partial(dst) if not dst.name.endswith(".gz") else dst.with_name(f".{dst.name[:-9]}.partial.jsonl.gz")
    counts: Counter[str] = Counter({k: 0 for k in KINDS})
    bad: list[dict[str, Any]] = []
    written = 0
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        with _writer(partial) as fh:
            for lineno, line in _lines(src):
                if not line.strip():
                    continue
                record, error = _parse(line)
                if record is None:
                    bad.append({"file": data, "line": lineno, "rule": "json_parse", "message": error})
                    continue
                d = Deidentifier()
                fh.write(json.dumps(d.conversation(record), ensure_ascii=False))
                fh.write("\n")
                counts.update(d.counts())
                written += 1
        os.replace(partial, dst)
    except (OSError, EOFError) as exc:
        partial.unlink(missing_ok=True)
        _fail(f"{data}: cannot read or write: {exc}", as_json)
    summary = {"data": data, "out": out, "conversations": written, "counts": dict(counts),
               "bad_lines": len(bad), "errors": bad[:100]}
    if as_json:
        if bad:
            summary["error"] = f"{len(bad)} line(s) of {data} are not JSON objects and were not written"
        print(json.dumps(summary))
    else:
        typer.echo(f"de-identified {written} conversation(s) → {out}")
        typer.echo("distinct values replaced per kind:")
        for kind in KINDS:
            typer.echo(f"  {kind:<16} {counts[kind]:>8}")
        for b in bad[:20]:
            typer.secho(f"{b['file']}:{b['line']}: {b['rule']}: {b['message']}", err=True)
        if len(bad) > 20:
            typer.secho(f"... and {len(bad) - 20} more", err=True)
        if bad:
            typer.secho(f"error: {len(bad)} line(s) of {data} are not JSON objects and were not written", fg="red", err=True)
    if bad:
        raise typer.Exit(EXIT_ERROR)
