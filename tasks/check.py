"""The contract check: row rules + Great Expectations column expectations, one verdict.

Every input row ends either in the valid table or in quarantine with its file, line, rule and
reason; rows_in == rows_passed + rows_quarantined always. Verdicts are ranked
passed < warning < failed < error; an engine exception becomes an `error` check.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from typing import Any

import orjson
import polars as pl
import yaml

from tasks.normalise import normalise_record
from tasks.records import CONVERSATION_SCHEMA, QUARANTINE_SCHEMA, RAW_SCHEMA

VERDICTS = ("passed", "warning", "failed", "error")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
_TYPES = {"string": str, "list": list, "object": dict, "datetime": str}


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _printable(text: str) -> str:
    """Text safe to store: lone surrogates replaced."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _check_encoding(rec: dict[str, Any]) -> None:
    """Lone UTF-16 surrogates (\\ud800 escapes without their pair) are not Unicode text."""
    try:
        json.dumps(rec, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise Violation("text_encoding", "", f"text holds a lone UTF-16 surrogate at position {exc.start}") from None


def load_contract(name: str = "conversation.yaml") -> dict[str, Any]:
    return yaml.safe_load(resources.files("data_contracts").joinpath(name).read_text("utf-8"))


@dataclass
class CheckResult:
    valid: pl.DataFrame
    quarantine: pl.DataFrame
    verdict: str
    rows_in: int
    by_rule: dict[str, int]
    checks: list[dict[str, Any]] = field(default_factory=list)
    gx_result: dict[str, Any] | None = None
    normalised: dict[str, int] = field(default_factory=dict)
    gx_html: str | None = None
    warn_share: float = 0.01
    fail_share: float = 0.10
    # Conversations kept but flagged: real model behaviour a flag rule names (file, line, rule).
    flagged: list[dict[str, Any]] = field(default_factory=list)
    # Set on the scan path (tasks/fetch.py): what was checked on the whole log (the scan) and
    # what on the fetched sampled conversations (this check), with the replacements made.
    levels: dict[str, Any] | None = None

    @property
    def rows_quarantined(self) -> int:
        return self.quarantine.height

    @property
    def rows_passed(self) -> int:
        return self.valid.height

    def summary(self) -> dict[str, Any]:
        return {"rows_in": self.rows_in, "rows_passed": self.rows_passed,
                "rows_quarantined": self.rows_quarantined, "verdict": self.verdict,
                "by_rule": dict(sorted(self.by_rule.items())),
                "normalised": dict(sorted(self.normalised.items())),
                "flagged": dict(sorted(Counter(f["rule"] for f in self.flagged).items())),
                "by_file": self.by_file(), **({"levels": self.levels} if self.levels else {})}

    def by_file(self) -> dict[str, dict[str, Any]]:
        """Rows passed / quarantined and the verdict the same limits give, per source file."""
        out: dict[str, dict[str, Any]] = {}
        for f, n in self.valid.group_by("source_file").len().iter_rows():
            out.setdefault(f, {"rows_passed": 0, "rows_quarantined": 0})["rows_passed"] = n
        for f, n in self.quarantine.group_by("source_file").len().iter_rows():
            out.setdefault(f, {"rows_passed": 0, "rows_quarantined": 0})["rows_quarantined"] = n
        for c in out.values():
            c["verdict"] = share_verdict(c["rows_quarantined"], c["rows_passed"] + c["rows_quarantined"],
                                         self.warn_share, self.fail_share)
        return dict(sorted(out.items()))


class Violation(Exception):
    def __init__(self, rule: str, field_name: str, reason: str) -> None:
        super().__init__(reason)
        self.rule, self.field, self.reason = rule, field_name, reason


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in content)
    raise Violation("type", "content", f"content must be a string or a list of parts, got {type(content).__name__}")


def check_record(rec: dict[str, Any], contract: dict[str, Any], tools_inferred: bool = False,
                 flags: list[Violation] | None = None, keep_text: bool = True) -> dict[str, Any]:
    """Apply every row rule to one record; return the typed row or raise the first Violation.
    What breaks a flag rule (real model behaviour, e.g. an empty reply) is appended to `flags`
    and the record is kept."""
    fields = contract["fields"]
    for name, spec in fields.items():
        value = rec.get(name)
        if value is None:
            if spec.get("required"):
                raise Violation("required", name, f"required field {name!r} is missing or null")
            continue
        want = _TYPES[spec["type"]]
        if not isinstance(value, want) or isinstance(value, bool):
            raise Violation("type", name, f"{name} must be {spec['type']}, got {type(value).__name__}")
        if spec["type"] == "string" and spec.get("max_length") and len(value) > spec["max_length"]:
            raise Violation("type", name, f"{name} longer than {spec['max_length']} characters")
        if spec["type"] == "string" and spec.get("min_length") and len(value.strip()) < spec["min_length"]:
            raise Violation("type", name, f"{name} is empty")
    created_raw = rec["created_at"]
    if not _RFC3339.match(created_raw):
        raise Violation("created_at_format", "created_at", f"created_at {created_raw[:40]!r} is not RFC 3339")
    try:
        created = datetime.fromisoformat(created_raw.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError as exc:
        raise Violation("created_at_format", "created_at", f"created_at {created_raw[:40]!r}: {exc}") from None
    messages = rec["messages"]
    spec = fields["messages"]
    if not spec.get("min_items", 0) <= len(messages) <= spec.get("max_items", 10**9):
        raise Violation("type", "messages", f"messages has {len(messages)} items, allowed {spec.get('min_items')}..{spec.get('max_items')}")
    tools = rec.get("tools") or []
    declared: set[str] = set()
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise Violation("type", f"tools[{i}]", "each tool must be {type: function, function: {name, parameters}}")
        declared.add(fn["name"])
    labels = rec.get("labels") or {}
    for key, value in labels.items():
        if not isinstance(value, bool):
            raise Violation("labels_bool", f"labels.{key}", f"label {key!r} must be a boolean, got {type(value).__name__}")
    _check_messages(messages, declared, bool(tools), contract, flags if flags is not None else [])
    typed = {
        "conversation_id": rec["conversation_id"], "model": rec["model"], "created_at": created,
        "surface": rec.get("surface"), "task_type": rec.get("task_type"), "language": rec.get("language"),
        "n_messages": len(messages), "tools_inferred": tools_inferred,
    }
    if keep_text:
        typed.update(tools=json.dumps(tools, ensure_ascii=False), messages=json.dumps(messages, ensure_ascii=False),
                     labels=json.dumps(labels))
    return typed


def _check_messages(messages: list[Any], declared: set[str], has_tools: bool, contract: dict[str, Any],
                    flags: list[Violation]) -> None:
    roles = set(contract["roles"])
    limit = contract["limits"]["max_content_chars"]
    pending: dict[str, str] = {}
    seen_ids: set[str] = set()
    seen_user = False
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict) or msg.get("role") not in roles:
            role = msg.get("role") if isinstance(msg, dict) else None
            raise Violation("message_shape", where, f"{where}: not an object with a role in {sorted(roles)} (role={role!r})")
        role = msg["role"]
        text = _content_text(msg.get("content"))
        if len(text) > limit:
            raise Violation("content_size", f"{where}.content", f"{where}.content has {len(text)} characters (limit {limit})")
        if _CONTROL.search(text):
            raise Violation("control_chars", f"{where}.content", f"{where}.content contains a NUL/control character")
        if role in ("user", "assistant") and pending:
            missing = ", ".join(sorted(pending))
            raise Violation("tool_call_answered", where, f"tool call(s) {missing} not answered before {where} ({role})")
        if role == "user":
            seen_user = True
        elif role in ("assistant", "tool") and not seen_user:
            raise Violation("role_order", where, f"{where}: {role} message before the first user message")
        if role == "assistant":
            calls = msg.get("tool_calls") or []
            if not isinstance(calls, list):
                raise Violation("type", f"{where}.tool_calls", "tool_calls must be a list")
            if not text.strip() and not calls:
                flags.append(Violation("empty_assistant", where, f"{where}: assistant message with no content and no tool calls"))
            for j, call in enumerate(calls):
                cw = f"{where}.tool_calls[{j}]"
                fn = call.get("function") if isinstance(call, dict) else None
                cid = call.get("id") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(cid, str) or not cid:
                    raise Violation("message_shape", cw, f"{cw}: needs id and function.name")
                if cid in seen_ids:
                    raise Violation("tool_call_id_unique", f"{cw}.id", f"{cw}: tool-call id {cid!r} repeated")
                seen_ids.add(cid)
                args = fn.get("arguments")
                if not isinstance(args, str):
                    raise Violation("arguments_json", f"{cw}.function.arguments", f"{cw}: arguments must be a JSON string, got {type(args).__name__}")
                try:
                    parsed = loads(args) if args.strip() else {}
                except (json.JSONDecodeError, RecursionError):
                    raise Violation("arguments_json", f"{cw}.function.arguments", f"{cw}: arguments are not valid JSON") from None
                if not isinstance(parsed, dict):
                    raise Violation("arguments_json", f"{cw}.function.arguments", f"{cw}: arguments must encode a JSON object")
                if has_tools and fn["name"] not in declared:
                    flags.append(Violation("tool_declared", f"{cw}.function.name",
                                           f"{cw}: tool {fn['name']!r} is not declared in tools"))
                pending[cid] = fn["name"]
        elif role == "tool":
            cid = msg.get("tool_call_id")
            if cid not in pending:
                raise Violation("tool_result_paired", where, f"{where}: tool_call_id {cid!r} answers no earlier pending call")
            del pending[cid]
    if not seen_user:
        raise Violation("has_user_message", "messages", "no user message")
    # Calls left unanswered at the very end are allowed (e.g. an agent's final `finish` call).


def _gx_checks(frame: pl.DataFrame, contract: dict[str, Any]) -> tuple[list[dict[str, Any]], Any, dict[int, tuple[str, str]]]:
    """Column expectations built from the contract, run by Great Expectations (ephemeral).

    Returns (check list, the GX validation result, row index → (rule, reason) for failing rows).
    """
    import logging

    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.data_context.types.base import ProgressBarsConfig

    for name in [n for n in logging.root.manager.loggerDict if n.startswith("great_expectations")]:
        logging.getLogger(name).setLevel(logging.WARNING)  # some GX modules pin INFO
    pdf = frame.with_row_index("_row").to_pandas()
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    batch = (ctx.data_sources.add_pandas("logs").add_dataframe_asset("conversations")
             .add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": pdf}))
    suite = gx.ExpectationSuite(name=f"{contract['name']}_v{contract['version']}")
    for name, spec in contract["fields"].items():
        if name not in pdf.columns:
            continue
        if spec.get("required"):
            suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column=name))
        if spec.get("unique"):
            suite.add_expectation(gxe.ExpectColumnValuesToBeUnique(column=name))
        if spec["type"] == "string" and spec.get("max_length"):
            suite.add_expectation(gxe.ExpectColumnValueLengthsToBeBetween(
                column=name, min_value=spec.get("min_length", 0), max_value=spec["max_length"]))
    if "n_messages" in pdf.columns:
        m = contract["fields"]["messages"]
        suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(
            column="n_messages", min_value=m.get("min_items", 1), max_value=m.get("max_items")))
    result = batch.validate(suite, result_format={"result_format": "COMPLETE",
                                                 "unexpected_index_column_names": ["_row"]})
    checks: list[dict[str, Any]] = []
    bad: dict[int, tuple[str, str]] = {}
    for r in result.results:
        cfg = r.expectation_config
        if cfg is None:
            continue
        col = cfg.kwargs.get("column")
        rule = f"gx:{cfg.type}"
        checks.append({"check": f"{cfg.type}({col})", "engine": "great_expectations",
                       "verdict": "passed" if r.success else "failed",
                       "unexpected": int(r.result.get("unexpected_count") or 0)})
        for item in r.result.get("unexpected_index_list") or []:
            row = int(item["_row"]) if isinstance(item, dict) else int(item)
            bad.setdefault(row, (rule, f"{col}: fails {cfg.type}"))
    return checks, result, bad


_UNSET: Any = object()


MAX_DEPTH = 500  # JSON nested deeper than this is refused (a decision that must not depend on the stack)


def loads(text: str) -> Any:
    """Parse JSON text as json.loads does, several times faster, and refuse nesting deeper
    than MAX_DEPTH levels.

    orjson parses what it can (strict RFC 8259); anything it refuses (NaN, integers beyond 64
    bits, lone surrogate escapes) goes to json.loads, so what parses, what it parses to, and
    the error for what does not, are the standard library's. Depth is checked explicitly:
    json.loads' own limit is the interpreter's recursion limit, which differs between a test
    runner, a worker process and the CLI, and the same line must get the same verdict in all.

    Raises:
        json.JSONDecodeError: invalid JSON, or nested deeper than MAX_DEPTH.
    """
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        try:
            obj = json.loads(text)
        except RecursionError:
            raise json.JSONDecodeError(f"nested deeper than {MAX_DEPTH} levels", text, 0) from None
    if text.count("{") + text.count("[") > MAX_DEPTH and _depth(obj) > MAX_DEPTH:
        raise json.JSONDecodeError(f"nested deeper than {MAX_DEPTH} levels", text, 0)
    return obj


def _depth(obj: Any) -> int:
    """Nesting depth of parsed JSON (iterative; stops once past MAX_DEPTH)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        node, d = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, d)
        if deepest > MAX_DEPTH:
            break
        stack.extend((c, d + 1) for c in children if isinstance(c, dict | list))
    return deepest


def check_row(source_file: str, source_line: int, record: str | None, parse_error: str | None,
              excerpt: str | None, contract: dict[str, Any], normalised: Counter[str], keep_text: bool = True,
              parsed: Any = _UNSET) -> tuple[dict[str, Any] | None, dict[str, Any] | None, list[dict[str, Any]]]:
    """One raw row through normalisation and every row rule: (typed row, None, flags) when it
    passes, (None, quarantine row, []) when it does not. `parsed` is the record already parsed
    (the streaming check parses each line once); `keep_text=False` leaves tools, messages and
    labels out of the typed row (the standalone check keeps only what it reports on)."""
    def reject(cid: Any, rule: str, fld: str, reason: str, text: str | None = None) -> dict[str, Any]:
        shown = (record if text is None else text) or ""
        return {"source_file": source_file, "source_line": source_line,
                "conversation_id": _printable(cid) if isinstance(cid, str) else None, "rule": rule,
                "field": fld, "reason": _printable(reason), "record": _printable(shown[:2000])}

    if record is None:
        return None, reject(None, "json_parse", "", parse_error or "unreadable line", excerpt or ""), []
    rec: Any = None
    try:
        rec = loads(record) if parsed is _UNSET else parsed
        if not isinstance(rec, dict):
            raise Violation("json_parse", "", f"expected a JSON object, got {type(rec).__name__}")
        if _SURROGATE_ESCAPE.search(record):
            _check_encoding(rec)
        rec, inferred = normalise_record(rec, normalised)
        flags: list[Violation] = []
        typed = check_record(rec, contract, inferred, flags, keep_text)
    except Violation as v:
        return None, reject(rec.get("conversation_id") if isinstance(rec, dict) else None, v.rule, v.field, v.reason), []
    except (json.JSONDecodeError, RecursionError) as exc:
        return None, reject(None, "json_parse", "", f"invalid JSON: {type(exc).__name__}"), []
    except (TypeError, AttributeError, ValueError, KeyError) as exc:  # hostile shapes
        return None, reject(rec.get("conversation_id") if isinstance(rec, dict) else None, "message_shape", "",
                            f"malformed record: {type(exc).__name__}: {str(exc)[:120]}"), []
    typed["source_file"], typed["source_line"] = source_file, source_line
    return typed, None, [{"source_file": source_file, "source_line": source_line,
                          "conversation_id": typed["conversation_id"], "rule": f.rule, "field": f.field,
                          "reason": _printable(f.reason)} for f in flags]


# The typed columns without the conversation text: what the standalone check keeps per valid
# row, and what Great Expectations validates (never a pandas copy of the messages).
PROJECTION = [c for c in CONVERSATION_SCHEMA if c not in ("tools", "messages", "labels")]


class ContractCheck:
    """Collects checked rows in input order (ids unique across the input), then runs Great
    Expectations on the valid rows' projection and gives the verdict."""

    def __init__(self, contract: dict[str, Any], warn_share: float, fail_share: float, keep_text: bool = True) -> None:
        self.contract, self.warn_share, self.fail_share, self.keep_text = contract, warn_share, fail_share, keep_text
        self.good: list[dict[str, Any]] = []
        self.quarantine: list[dict[str, Any]] = []
        self.flagged: list[dict[str, Any]] = []
        self.normalised: Counter[str] = Counter()
        self.seen: dict[str, tuple[str, int]] = {}
        self.rows_in = 0

    def add(self, typed: dict[str, Any] | None, rejected: dict[str, Any] | None, flags: list[dict[str, Any]]) -> None:
        self.rows_in += 1
        if typed is None:
            assert rejected is not None
            self.quarantine.append(rejected)
            return
        cid = typed["conversation_id"]
        if cid in self.seen:
            f, line = self.seen[cid]
            self.quarantine.append({"source_file": typed["source_file"], "source_line": typed["source_line"],
                                    "conversation_id": _printable(cid), "rule": "unique_id", "field": "conversation_id",
                                    "reason": _printable(f"conversation_id {cid!r} already at {f}:{line}"),
                                    "record": _printable(typed.pop("_record", "")[:2000])})
            return
        self.seen[cid] = (typed["source_file"], typed["source_line"])
        typed.pop("_record", None)
        self.flagged.extend(flags)
        self.good.append(typed)

    def finish(self) -> CheckResult:
        contract = self.contract
        schema = CONVERSATION_SCHEMA if self.keep_text else {c: CONVERSATION_SCHEMA[c] for c in PROJECTION}
        valid = pl.DataFrame(self.good, schema=schema)
        self.good = []
        quarantine, checks = self.quarantine, []
        gx_json: dict[str, Any] | None = None
        gx_html: str | None = None
        engine_error = False
        try:
            gx_checks, gx_live, bad = _gx_checks(valid.select(PROJECTION), contract)
            gx_json, gx_html = gx_live.to_json_dict(), render_gx_html(gx_live)
            checks.extend(gx_checks)
            if bad:
                rows = valid.select("source_file", "source_line", "conversation_id")
                for idx, (rule, reason) in sorted(bad.items()):
                    f, line, cid = rows.row(idx)
                    quarantine.append({"source_file": f, "source_line": line, "conversation_id": cid, "rule": rule,
                                       "field": reason.split(":")[0], "reason": reason, "record": ""})
                valid = valid.with_row_index("_i").filter(~pl.col("_i").is_in(list(bad))).drop("_i")
        except Exception as exc:  # engine failure is a ranked `error` verdict, never a crash
            engine_error = True
            checks.append({"check": "great_expectations", "engine": "great_expectations",
                           "verdict": "error", "unexpected": 0, "error": f"{type(exc).__name__}: {exc}"})
        q = pl.DataFrame(quarantine, schema=QUARANTINE_SCHEMA)
        by_rule = {r: c for r, c in q.group_by("rule").len().iter_rows()} if q.height else {}
        verdict = share_verdict(q.height, self.rows_in, self.warn_share, self.fail_share)
        if valid.height == 0:
            verdict = "failed"
        if engine_error:
            verdict = "error"
        # A rule that quarantined rows is a warning while the run goes on, a failure when it stops it.
        hit = "failed" if verdict == "failed" else "warning"
        checks.extend({"check": f"row_rule:{rule}", "engine": "depsim",
                       "verdict": hit if by_rule.get(rule) else "passed",
                       "unexpected": by_rule.get(rule, 0)} for rule in contract["row_rules"])
        flagged = self.flagged
        if flagged and valid.height < len(self.seen):  # GX quarantined some: their flags go too
            kept = set(valid["conversation_id"].to_list())
            flagged = [f for f in flagged if f["conversation_id"] in kept]
        flag_counts = Counter(f["rule"] for f in flagged)
        checks.extend({"check": f"flag_rule:{rule}", "engine": "depsim", "verdict": "passed", "unexpected": 0,
                       "flagged": flag_counts.get(rule, 0)} for rule in contract.get("flag_rules") or {})
        return CheckResult(valid, q, verdict, self.rows_in, by_rule, checks, gx_json, dict(self.normalised), gx_html,
                           self.warn_share, self.fail_share, flagged)


def check_conversations(raw: pl.DataFrame, contract: dict[str, Any], warn_share: float,
                        fail_share: float) -> CheckResult:
    """Validate raw rows (RAW_SCHEMA) against the contract; split into valid rows and quarantine."""
    check = ContractCheck(contract, warn_share, fail_share)
    for f, line, record, error, excerpt in raw.select(list(RAW_SCHEMA)).iter_rows():
        typed, rejected, flags = check_row(f, line, record, error, excerpt, contract, check.normalised)
        if typed is not None:
            typed["_record"] = record
        check.add(typed, rejected, flags)
    return check.finish()


def share_verdict(bad: int, total: int, warn_share: float, fail_share: float) -> str:
    """passed / warning / failed from the share of bad rows and the configured limits."""
    share = bad / total if total else 1.0
    return "failed" if share > fail_share else "warning" if share > warn_share else "passed"


def render_gx_html(result: Any) -> str | None:
    """A live GX validation result rendered by GX's own page renderer (its CSS comes from CDNs)."""
    try:
        from great_expectations.render.renderer import ValidationResultsPageRenderer
        from great_expectations.render.view import DefaultJinjaPageView

        return DefaultJinjaPageView().render(ValidationResultsPageRenderer().render(result))
    except Exception:  # rendering is a convenience; the JSON result is the record
        return None


def summary_markdown(result: CheckResult) -> str:
    """A short Markdown summary of a check, for Prefect artifacts and the CLI."""
    s = result.summary()
    lines = [f"**Contract check: {s['verdict']}** — {s['rows_passed']} of {s['rows_in']} rows passed, "
             f"{s['rows_quarantined']} quarantined.", "", "| file | passed | quarantined | verdict |", "|---|---:|---:|---|"]
    lines += [f"| {f} | {c['rows_passed']} | {c['rows_quarantined']} | {c['verdict']} |" for f, c in s["by_file"].items()]
    if s["by_rule"]:
        lines += ["", "| rule | rows |", "|---|---:|"] + [f"| {r} | {n} |" for r, n in s["by_rule"].items()]
    if s["normalised"]:
        lines += ["", "| normalisation | applied |", "|---|---:|"] + [f"| {k} | {n} |" for k, n in s["normalised"].items()]
    return "\n".join(lines)
