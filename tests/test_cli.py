"""The command line as a newcomer meets it: --version, every command's help (an example, every
default), the exit-status rule in text and --json mode, and messages that point at real files."""

from __future__ import annotations

import json
import re
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from flows.cli import app
from tasks.config import load_settings

from .conftest import run_cli, synthetic_rows, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
COMMAND = typer.main.get_command(app)
COMMANDS = sorted(COMMAND.commands)  # type: ignore[attr-defined]
# Paths a message may point a user at, relative to the repository (or ../shared, which a clone lacks).
REPO_PATH = re.compile(r"(\.\./shared\S*|(?<![\w/.-])(?:conf|docs|data_contracts|deployments|flows|tasks|benchmarks)/[\w./-]*\w(?![\w<*]))")


def _help(args: list[str]) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "400", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    return result.output


def test_version() -> None:
    proc = run_cli(["--version"], cwd=ROOT)
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"depsim {version('depsim')}"


def test_the_commands_are_all_registered() -> None:
    assert {"run", "check", "sample", "synth-logs", "serve-synthetic", "judge-eval", "fidelity",
            "backtest"} <= set(COMMANDS)


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS)], ids=["depsim", *COMMANDS])
def test_help_shows_an_example(command: list[str]) -> None:
    text = _help(command)
    assert "Example" in text, text


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_shows_its_default(name: str) -> None:
    """Typer shows a literal default; an option without one (None) must say what None means."""
    for param in COMMAND.commands[name].params:  # type: ignore[attr-defined]
        if param.param_type_name != "option" or param.required or getattr(param, "is_flag", False):
            continue
        if param.name == "help":
            continue
        if param.default is None:
            assert "Default" in (param.help or ""), f"{name} {param.opts}: no default shown"


def _configured(key: str) -> str:
    value: Any = load_settings().model_dump(mode="json")
    for part in key.split("."):
        value = value[part]
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)


def test_defaults_in_help_match_the_configuration() -> None:
    """Help text that names a configuration key and its default, "Default: sample.n (1000)",
    names the value conf/default.yaml really has."""
    checked = 0
    for name in COMMANDS:
        for param in COMMAND.commands[name].params:  # type: ignore[attr-defined]
            for key, shown in re.findall(r"Default: ([a-z_]+(?:\.[a-z_]+)+) \(([^)]*)\)", param.help or ""):
                value = re.split(r", |: ", shown)[0]
                assert value == _configured(key), f"{name} {param.opts}: {key} shown as {value!r}"
                checked += 1
    assert checked >= 10


USAGE_ERRORS = [  # the command line itself is wrong: 2, nothing read
    ["run", "--n", "-5"],
    ["run", "--seed", "x"],
    ["run", "--bogus"],
    ["sample", "--out", "s.csv"],
    ["sample", "--out", "s.parquet", "--allocation", "most"],
    ["synth-logs", "--out", "x.jsonl", "--model", "synthetic-agent-v9"],
    ["backtest", "--model", "m", "--shipped-at", "last tuesday"],
    ["judge-eval"],
]
BAD_VALUES = [  # what the command line points at is wrong: 4
    ["run", "--config", "missing.yaml"],
    ["run", "--config", "{broken}"],
    ["run", "--config", "{invalid}"],
    ["run", "--data", "missing.jsonl"],
    ["check", "--data", "missing.jsonl"],
    ["sample", "--out", "s.parquet", "--config", "{broken}"],
    ["fidelity", "--data", "missing.jsonl"],
    ["backtest", "--model", "m", "--shipped-at", "2026-11-01", "--data", "missing.jsonl"],
]


def _files(tmp: Path) -> dict[str, str]:
    broken = tmp / "broken.yaml"
    broken.write_text("sample: [1\n")  # malformed YAML
    invalid = tmp / "invalid.yaml"
    invalid.write_text("sample:\n  n: -5\n")  # well-formed, an invalid value
    return {"broken": str(broken), "invalid": str(invalid)}


def _assert_messages_point_at_real_files(text: str) -> None:
    assert "../shared" not in text, text
    for path in REPO_PATH.findall(text):
        assert (ROOT / path).exists(), f"{path} named in: {text}"


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
@pytest.mark.parametrize("args,code", [(a, 2) for a in USAGE_ERRORS] + [(a, 4) for a in BAD_VALUES],
                         ids=[f"usage-{' '.join(a)}" for a in USAGE_ERRORS] + [f"bad-{' '.join(a)}" for a in BAD_VALUES])
def test_exit_status_rule(tmp_path: Path, args: list[str], code: int, as_json: bool) -> None:
    files = _files(tmp_path)
    argv = [a.format(**files) for a in args] + (["--json"] if as_json else [])
    proc = run_cli(argv, cwd=tmp_path, timeout=120)
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    if as_json:
        lines = proc.stdout.strip().splitlines()
        assert len(lines) == 1, proc.stdout  # one JSON object, nothing else
        error = json.loads(lines[0])["error"]
        assert error
        assert json.loads(lines[0]).get("usage_error") is (True if code == 2 else None)
        message = error
    else:
        assert proc.stdout == ""
        message = proc.stderr
        if code == 4:
            errors = [line for line in proc.stderr.splitlines() if not line.startswith("[")]
            assert len(errors) == 1 and errors[0].startswith("error: "), proc.stderr
    _assert_messages_point_at_real_files(message)
    assert not list(tmp_path.glob("*.parquet")) and not list(tmp_path.glob(".*.partial*"))


def test_an_invalid_environment_variable_is_a_bad_value(tmp_path: Path) -> None:
    proc = run_cli(["check", "--json"], cwd=tmp_path, env={"DEPSIM_SAMPLE__N": "-5"})
    assert proc.returncode == 4 and "sample.n" in json.loads(proc.stdout)["error"]


def test_help_names_real_files() -> None:
    for command in [[], *([c] for c in COMMANDS)]:
        _assert_messages_point_at_real_files(_help(command))


def test_docs_stand_alone() -> None:
    """docs/ and the README's links need nothing beside the repository."""
    for doc in [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]:
        text = doc.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" not in target:
                assert (doc.parent / target).exists(), f"{doc.name} links to {target}"
        if doc.parent.name == "docs":
            assert "../shared" not in text, doc
            _assert_messages_point_at_real_files(text)


def test_docs_cli_covers_every_command() -> None:
    text = " ".join((ROOT / "docs" / "cli.md").read_text(encoding="utf-8").split())
    for name in COMMANDS:
        assert f"depsim {name}" in text, name


@pytest.mark.e2e
def test_failed_contract_points_at_the_quarantine_file(tmp_path: Path) -> None:
    rows: list[Any] = synthetic_rows(40, seed=3)
    rows += ["not json"] * 30  # 30 bad rows: more than the 20 printed, and over the 10% limit
    data = write_jsonl(tmp_path / "logs.jsonl", rows)
    store = tmp_path / "store"
    proc = run_cli(["run", "--data", str(data), "--store", str(store),
                    "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"], cwd=tmp_path, timeout=600)
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    more = [line for line in proc.stderr.splitlines() if "more quarantined rows" in line]
    assert len(more) == 1 and str(store) in more[0], proc.stderr[-3000:]
    assert len(list(store.glob("*/quarantine.parquet"))) == 1  # the file the message names
