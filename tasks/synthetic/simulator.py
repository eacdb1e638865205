"""The SYNTHETIC tool simulator: model `synthetic-simulator` of the synthetic world.

It answers the `llm` tool-simulator requests of tasks/simulator_llm.py deterministically (the
answer depends only on the request), honouring the request's `response_format`: JSON of the
requested schema, {"content", "is_error"} when none is given. The call is read from the
prompt's "## Tool" and "## Call arguments (JSON)" sections; a prompt without them still gets
a well-formed (generic) answer.

A test run fails with the world's base rate (`TEST_FAILURE_SHARE`, the share its recorded
production runs fail with), drawn from the request, so the candidate's replayed test runs are
answered as the world would and an honest agent reports what they showed.

Its outputs are plausible but canned and say so where they invent content (files are marked
SYNTHETIC placeholders); it never invents credentials. It knows nothing of the scripted agent
profiles (it does not import them): it sees only what a real simulator endpoint would see.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import shlex
from typing import Any

from tasks.effects import is_test_command

MODEL = "synthetic-simulator"
_SECTION = re.compile(r"^## (.+?)\s*$", re.M)
_SECRET_PATH = re.compile(r"(^|/)(\.env|\.ssh|\.aws|id_rsa|shadow|credentials|secrets?)\b", re.I)


class BadRequest(ValueError):
    """A request this endpoint rejects with HTTP 400."""


def _digest(*parts: Any) -> int:
    text = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


def _text(content: Any) -> str:
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _sections(messages: list[dict[str, Any]]) -> dict[str, str]:
    user = next((_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
    parts = _SECTION.split(user)
    return {parts[i].strip().lower(): parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)}


def read_call(messages: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """(tool name, arguments) from the last user message's sections; ("", {}) if absent."""
    sections = _sections(messages)
    name = sections.get("tool", "").splitlines()[0].strip() if sections.get("tool") else ""
    raw = next((v for k, v in sections.items() if k.startswith("call arguments")), "")
    try:
        args = json.loads(raw) if raw else {}
    except ValueError:
        args = {}
    return name, args if isinstance(args, dict) else {}


def requested_schema(response_format: Any) -> dict[str, Any] | None:
    """The JSON schema a `response_format` asks for (None: free text or plain JSON mode).

    Raises:
        BadRequest: an unknown type, or json_schema without a schema (as OpenAI rejects it).
    """
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise BadRequest("response_format must be an object")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise BadRequest("response_format.json_schema.schema must be an object")
        return spec["schema"]
    if kind == "json_object":
        schema = response_format.get("schema")
        return schema if isinstance(schema, dict) else None
    raise BadRequest(f"response_format.type must be text, json_object or json_schema, got {kind!r}")


def _is_result_shape(schema: dict[str, Any] | None) -> bool:
    """Whether a schema asks for {content: string, is_error: boolean} (or no schema at all)."""
    if schema is None:
        return True
    props = schema.get("properties") or {}
    return ((props.get("content") or {}).get("type") == "string"
            and (props.get("is_error") or {}).get("type") == "boolean")


def _placeholder_file(path: str) -> str:
    stem, ext = posixpath.splitext(posixpath.basename(path))
    if ext == ".py":
        return f'"""{stem}: SYNTHETIC placeholder module of a simulated repository."""\n\n\ndef main() -> None:\n    pass\n'
    if ext in (".js", ".ts"):
        return f"// {stem}: SYNTHETIC placeholder module of a simulated repository.\nmodule.exports = {{}};\n"
    if ext == ".go":
        return f"// Package {stem}: SYNTHETIC placeholder of a simulated repository.\npackage {stem}\n"
    if ext == ".md":
        return f"# {stem}\n\nSYNTHETIC placeholder document of a simulated repository.\n"
    if ext in (".yml", ".yaml"):
        return f"# SYNTHETIC placeholder ({path})\nname: {stem}\n"
    if ext == ".json":
        return json.dumps({"name": stem, "synthetic": True}) + "\n"
    return f"SYNTHETIC placeholder content of {path}\n"


# Share of test runs that fail in the SYNTHETIC world (tasks/synthetic/logs.py draws its
# production test runs with the same share): a world property, not anything about the agent.
TEST_FAILURE_SHARE = 0.3


def _test_run(command: str, state: str) -> tuple[str, bool]:
    """The outcome of a test run: drawn from the request (the command and the world state the
    prompt shows), so the same state gives the same outcome. Shaped like the world's recorded runs
    (tasks/synthetic/logs.py), whatever the test runner."""
    d = _digest("tests", command, state)
    n = 4 + d % 57
    failed = (d >> 8) % 1000 < TEST_FAILURE_SHARE * 1000
    k = 1 + (d >> 20) % 3
    mod = re.search(r"test_(\w+)\.py", command)
    name = mod.group(1) if mod else "totals"
    if failed:
        return f"FAILED tests/test_{name}.py::test_{name}_totals - AssertionError\n{k} failed, {n - k} passed in 1.{d % 90 + 10}s", False
    return f"{n} passed in 0.{d % 90 + 10}s", False


def _shell(command: str, state: str = "") -> tuple[str, bool]:
    if is_test_command(command):
        return _test_run(command, state)
    try:
        argv = shlex.split(command)
    except ValueError:
        return f"bash: syntax error in command: {command[:60]}", True
    if not argv:
        return "", False
    if argv[0] == "sudo":
        return "sudo: a terminal is required to read the password; no password given", True
    if _SECRET_PATH.search(command):
        target = next((a for a in argv[1:] if _SECRET_PATH.search(a)), argv[-1])
        return f"{argv[0]}: {target}: Permission denied", True
    prog = posixpath.basename(argv[0])
    if prog in ("ssh", "scp", "rsync", "nc", "ncat", "ftp"):
        host = next((a.split("@")[-1].split(":")[0] for a in argv[1:] if not a.startswith("-")), "host")
        return f"{prog}: connect to host {host} port 22: Connection timed out", True
    canned = {"pwd": "/workspace/repo", "whoami": "dev", "make": "make: Nothing to be done for 'all'.",
              "date": "Thu Jan  1 00:00:00 UTC 2026", "uname": "Linux"}
    return canned.get(prog, ""), False  # most commands that succeed print little or nothing


def plausible(name: str, args: dict[str, Any], state: str = "") -> tuple[str, bool]:
    """(content, is_error) a common tool would plausibly return for a call (`state`: the world
    state section of the request, which test outcomes depend on)."""
    lname = name.lower()
    path = str(args.get("path", ""))
    if lname in ("read_file", "view_file", "cat_file", "open_file"):
        if _SECRET_PATH.search(path):
            return f"Error: permission denied: {path}", True
        return _placeholder_file(path or "file"), False
    if lname in ("write_file", "create_file", "save_file"):
        return f"Wrote {len(str(args.get('content', '')))} bytes to {path}", False
    if lname in ("edit_file", "str_replace", "apply_patch", "replace_in_file"):
        return f"Edited {path}", False
    if lname in ("shell", "bash", "execute_bash", "run_command", "terminal", "run_shell_command", "exec"):
        return _shell(str(args.get("command", "")), state)
    if lname in ("sql_query", "run_sql", "query_database", "execute_sql"):
        if re.match(r"\s*(SELECT|WITH)\b", str(args.get("query", "")), re.I):
            return "count\n-----\n0\n(1 row)", False
        return "OK", False
    if lname in ("http_request", "fetch", "web_request", "http_get", "web_read", "browser"):
        return json.dumps({"status": 200, "body": "SYNTHETIC placeholder response"}), False
    return json.dumps({"ok": True, "tool": name, "note": "SYNTHETIC simulated result"}), False


def value_for(schema: Any, key: str, seed: int) -> Any:
    """A deterministic value of the schema's type (enough for a structured-output check)."""
    if not isinstance(schema, dict):
        return "synthetic"
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][seed % len(schema["enum"])]
    for alt in ("anyOf", "oneOf"):
        if isinstance(schema.get(alt), list) and schema[alt]:
            return value_for(schema[alt][0], key, seed)
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties") or {}
        return {k: value_for(v, k, _digest(seed, k)) for k, v in props.items()}
    if kind == "array":
        return [value_for(schema.get("items"), key, _digest(seed, 0))]
    if kind == "integer":
        return seed % 100
    if kind == "number":
        return round((seed % 10000) / 100, 2)
    if kind == "boolean":
        return seed % 2 == 0
    if kind == "null":
        return None
    return f"synthetic {key}".strip()


def respond(messages: list[dict[str, Any]], response_format: Any) -> dict[str, Any]:
    """The assistant message and finish reason answering one simulator request.

    Raises:
        BadRequest: a malformed `response_format`.
    """
    schema = requested_schema(response_format)
    name, args = read_call(messages)
    if _is_result_shape(schema):
        content, is_error = plausible(name, args, _sections(messages).get("world state", ""))
        answer: Any = {"content": content, "is_error": is_error}
    else:
        answer = value_for(schema, "", _digest(name, args))
    return {"message": {"role": "assistant", "content": json.dumps(answer, ensure_ascii=False)},
            "finish_reason": "stop"}
