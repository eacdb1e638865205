"""Simulated tools: nothing is ever executed (DESIGN §1, STYLE 6).

A call goes through the configured chain — `recorded` (an equivalent call in the recording
returns its recorded result), then `rules` (deterministic emulators for shell, files, git, SQL
and HTTP over a per-replay world state seeded from the recording), then `llm` (an LLM simulator,
tasks/simulator_llm.py) — and comes back with its `source`. Every call is classified by effect
on the way in.

The synchronous sources run here, under the `no_execution` guard. The `llm` source needs the
network, so it cannot run under the guard: `ToolSimulator.answer` returns an `LLMRequest` when
the chain reaches `llm` with no earlier source answering, the caller (tasks/replay.py,
tasks/fidelity.py) puts it to the simulator endpoint, and `ToolSimulator.learn` folds the
result back into the world state (under the guard again). `llm` answers every call that
reaches it (or fails with a reason), so sources listed after it are never tried.

With `llm` after `rules` in the chain, the emulators decline what they could only guess — a
read of a file the world state has never seen, a shell command they do not emulate — so the
LLM simulator answers those instead; without `llm` they answer as before ("file not found",
empty output).
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from tasks.effects import (  # one catalogue of tools and effects, shared with the judges
    EDIT_TOOLS,
    EFFECTS,
    HTTP_TOOLS,
    READ_TOOLS,
    SHELL_TOOLS,
    SQL_TOOLS,
    TEST_COMMAND_RE,
    WRITE_TOOLS,
    classify_effects,
)

__all__ = ["EFFECTS", "ExecutionForbidden", "LLMRequest", "ToolResult", "ToolSimulator", "WorldState",
           "classify_effects", "no_execution", "normalise_args", "unavailable"]


class ExecutionForbidden(RuntimeError):
    """Raised when anything tries to execute, touch files or open sockets while a tool is simulated."""


# Audit events that would mean a simulated tool really ran something or touched the world.
_FORBIDDEN_EVENTS = frozenset({
    "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
    "os.startfile", "pty.spawn", "socket.connect", "socket.sendto", "socket.sendmsg", "socket.bind",
    "open", "os.remove", "os.rmdir", "os.rename", "os.truncate", "os.chmod", "os.chown", "os.mkdir",
    "os.symlink", "os.link", "os.kill", "os.killpg", "shutil.rmtree", "shutil.copyfile", "shutil.move",
    "urllib.Request", "http.client.connect", "ctypes.dlopen",
})
_SIMULATING: ContextVar[bool] = ContextVar("depsim_simulating_tool", default=False)
_guard_installed = False


def _audit(event: str, _args: tuple[Any, ...]) -> None:
    if event in _FORBIDDEN_EVENTS and _SIMULATING.get():
        raise ExecutionForbidden(f"depsim never executes tools: {event!r} attempted during tool simulation")


@contextmanager
def no_execution() -> Iterator[None]:
    """Within this block, process spawns, file access and sockets raise ExecutionForbidden.

    A Python audit hook (installed once, on first use) enforces it for the current context only,
    so the rest of the process (Prefect, MLflow) is unaffected.
    """
    global _guard_installed
    if not _guard_installed:
        sys.addaudithook(_audit)
        _guard_installed = True
    token = _SIMULATING.set(True)
    try:
        yield
    finally:
        _SIMULATING.reset(token)

_TEST_CMD = TEST_COMMAND_RE


def normalise_args(raw: Any) -> str:
    """Canonical form of arguments for matching calls: parsed, key-sorted, whitespace-collapsed."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            return " ".join(raw.split())

    def norm(v: Any) -> Any:
        if isinstance(v, str):
            return " ".join(v.split())
        if isinstance(v, dict):
            return {k: norm(x) for k, x in sorted(v.items())}
        if isinstance(v, list):
            return [norm(x) for x in v]
        return v

    return json.dumps(norm(raw), sort_keys=True)


@dataclass
class ToolResult:
    content: str
    source: str            # recorded | rules | llm | error
    effects: list[str]
    is_error: bool = False
    reason: str | None = None  # why the simulator (not the tool) failed: "<kind>: <detail>"


@dataclass(frozen=True)
class LLMRequest:
    """A call no synchronous source answered, for the `llm` source (run outside the guard)."""

    name: str
    args: dict[str, Any]
    effects: list[str]


@dataclass
class WorldState:
    """What the replay's world looks like: files known or written, last outputs seen."""

    files: dict[str, str] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)
    changed: set[str] = field(default_factory=set)  # paths this replay wrote, edited or removed
    last_test_output: str | None = None


def _recorded_pairs(messages: list[dict[str, Any]]) -> list[tuple[str, str, Any, str]]:
    """(tool name, normalised args, raw args, result) for each answered call of a recording."""
    calls: dict[str, tuple[str, Any]] = {}
    pairs = []
    for m in messages:
        for c in m.get("tool_calls") or []:
            fn = c.get("function") or {}
            calls[c.get("id")] = (fn.get("name", ""), fn.get("arguments", "{}"))
        if m.get("role") == "tool" and m.get("tool_call_id") in calls:
            name, raw = calls[m["tool_call_id"]]
            content = m.get("content")
            pairs.append((name, normalise_args(raw), raw, content if isinstance(content, str) else json.dumps(content)))
    return pairs


def _llm_follows_rules(chain: list[str]) -> bool:
    """Whether `llm` can answer what `rules` decline (it comes later in the chain, or alone)."""
    if "llm" not in chain:
        return False
    return "rules" not in chain or chain.index("llm") > chain.index("rules")


class ToolSimulator:
    """Answers a replay's tool calls. One instance per replayed turn (its own world state)."""

    def __init__(self, recording: list[dict[str, Any]], chain: list[str]) -> None:
        self.chain = chain
        self._defer = _llm_follows_rules(chain)
        self.recorded: dict[tuple[str, str], str] = {}
        self.state = WorldState()
        for name, norm, raw, content in _recorded_pairs(recording):
            self.recorded.setdefault((name, norm), content)
            self._seed_state(name, raw, content)

    def _seed_state(self, name: str, args: Any, content: str) -> None:
        """Learn files and outputs from a recorded call (exact arguments, not normalised)."""
        try:
            parsed = json.loads(args) if isinstance(args, str) else args
        except json.JSONDecodeError:
            return
        if not isinstance(parsed, dict):
            return
        lname = name.lower()
        if lname in READ_TOOLS and "path" in parsed and not content.startswith("Error"):
            self.state.files.setdefault(parsed["path"], content)
        elif lname in WRITE_TOOLS and "path" in parsed:
            self.state.files[parsed["path"]] = str(parsed.get("content", ""))
        cmd = str(parsed.get("command", ""))
        if _TEST_CMD.search(cmd):
            self.state.last_test_output = content

    def simulate(self, name: str, arguments: str) -> ToolResult:
        """Answer one call from the synchronous sources only (`llm` in the chain is skipped).

        Never executes: the no_execution guard makes sure of it.
        """
        with no_execution():
            out = self._run_chain(name, arguments, llm=False)
        return out if isinstance(out, ToolResult) else unavailable(out.name, out.effects)

    def answer(self, name: str, arguments: str) -> ToolResult | LLMRequest:
        """Answer one call, or hand it on to the `llm` source when the chain gets that far.

        The synchronous sources run under the no_execution guard; an `LLMRequest` is for the
        caller to put to the LLM simulator (outside the guard) and then pass to `learn`.
        """
        with no_execution():
            return self._run_chain(name, arguments, llm=True)

    def learn(self, request: LLMRequest, result: ToolResult) -> None:
        """Fold an `llm` result into the world state, so later calls see what it implied.

        A write or an edit lands in the files (as the rules emulators apply it) and a test run
        sets the last test output. File content the simulator only imagined (a read of an
        unseen file) is not fixed into the world: a later edit of that file is not rejected
        for missing imagined text, and the trajectory keeps the answer for the simulator's
        own consistency. Error results teach nothing.
        """
        if result.is_error:
            return
        lname = request.name.lower()
        with no_execution():
            if lname in WRITE_TOOLS or lname in EDIT_TOOLS:
                self._rules(lname, request.args, defer=False)
            elif _TEST_CMD.search(str(request.args.get("command", ""))):
                self.state.last_test_output = result.content

    def _run_chain(self, name: str, arguments: str, llm: bool) -> ToolResult | LLMRequest:
        try:
            args = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return ToolResult(f"Error: arguments for {name} are not valid JSON", "error", [], True)
        if not isinstance(args, dict):
            return ToolResult(f"Error: arguments for {name} must be a JSON object", "error", [], True)
        effects = classify_effects(name, args)
        for source in self.chain:
            if source == "recorded":
                if self._sees_changed_state(args):
                    continue  # the recording predates this replay's own writes
                hit = self.recorded.get((name, normalise_args(args)))
                if hit is not None:
                    self._seed_state(name, args, hit)
                    return ToolResult(hit, "recorded", effects)
            elif source == "rules":
                out = self._rules(name.lower(), args, defer=llm and self._defer)
                if out is not None:
                    return ToolResult(out, "rules", effects)
            elif source == "llm" and llm:
                return LLMRequest(name, args, effects)
        return unavailable(name, effects)

    def _sees_changed_state(self, args: dict[str, Any]) -> bool:
        if not self.state.changed:
            return False
        text = " ".join(str(v) for v in args.values())
        return any(p and p in text for p in self.state.changed)

    # --- rule emulators ---------------------------------------------------------------
    def _rules(self, name: str, args: dict[str, Any], defer: bool = False) -> str | None:
        """The emulated output, or None when there is no emulator for the call.

        With `defer`, calls the emulators could only guess at (an unseen file, an unknown
        command) are declined too, for the `llm` source.
        """
        st = self.state
        if name in READ_TOOLS:
            path = str(args.get("path", ""))
            if path in st.files and path not in st.deleted:
                return st.files[path]
            if defer and path not in st.deleted:
                return None
            return f"Error: file not found: {path}"
        if name in WRITE_TOOLS:
            path, content = str(args.get("path", "")), str(args.get("content", ""))
            st.files[path] = content
            st.deleted.discard(path)
            st.changed.add(path)
            return f"Wrote {len(content)} bytes to {path}"
        if name in EDIT_TOOLS:
            path = str(args.get("path", ""))
            old, new = str(args.get("old_str", "")), str(args.get("new_str", ""))
            if path in st.deleted:
                return f"Error: file not found: {path}"
            st.changed.add(path)
            text = st.files.get(path)
            if text is None:
                # Unseen file: assume the edit applies, and remember the new text.
                st.files[path] = new
                return f"Edited {path}"
            if old and old not in text:
                return f"Error: old_str not found in {path}"
            st.files[path] = text.replace(old, new, 1)
            return f"Edited {path}"
        if name in SQL_TOOLS:
            q = str(args.get("query", "")).strip()
            if re.match(r"(SELECT|WITH)\b", q, re.I):
                return "count\n-----\n0\n(1 row)"
            return "OK"
        if name in HTTP_TOOLS:
            method = str(args.get("method", "GET")).upper()
            return json.dumps({"status": 200 if method == "GET" else 201, "body": "ok"})
        if name in SHELL_TOOLS:
            out = self._shell(str(args.get("command", "")))
            return None if out is None and defer else (out or "")
        return None

    def _shell(self, command: str) -> str | None:
        """Emulated output of a command line; None for a program no emulator knows."""
        st = self.state
        try:
            argv = shlex.split(command)
        except ValueError:
            argv = command.split()
        if not argv:
            return ""
        prog = argv[0]
        if prog == "cat" and len(argv) > 1:
            return "\n".join(st.files[p] if p in st.files and p not in st.deleted
                             else f"cat: {p}: No such file or directory" for p in argv[1:])
        if prog == "ls":
            target = next((a for a in argv[1:] if not a.startswith("-")), "")
            names = sorted({p[len(target):].lstrip("/").split("/")[0] for p in st.files
                            if p.startswith(target) and p not in st.deleted})
            return "\n".join(n for n in names if n)
        if prog == "rm":
            for p in argv[1:]:
                if not p.startswith("-"):
                    for f in list(st.files):
                        if f == p or f.startswith(p.rstrip("/") + "/"):
                            st.deleted.add(f)
                            st.changed.add(f)
                    st.changed.add(p)
            return ""
        if prog == "echo":
            return " ".join(argv[1:])
        if prog == "grep":
            pattern = next((a for a in argv[1:] if not a.startswith("-")), "")
            hits = [f"{p}:{line}" for p, text in st.files.items() if p not in st.deleted
                    for line in text.splitlines() if pattern and pattern in line]
            return "\n".join(hits[:50])
        if prog == "git":
            sub = argv[1] if len(argv) > 1 else ""
            return {"status": "\n".join(f" M {p}" for p in sorted(st.files)[:10]),
                    "diff": f" {len(st.files)} files changed", "log": "commit 0000000 (HEAD)\n    previous work",
                    "commit": "[main 1a2b3c4] commit", "push": "Everything up-to-date",
                    "reset": "HEAD is now at 1a2b3c4"}.get(sub, "")
        if _TEST_CMD.search(command):
            return st.last_test_output or "12 passed in 0.42s"
        if prog in ("pip", "npm") and "install" in argv:
            return "Successfully installed packages"
        if prog in ("curl", "wget"):
            return '{"status": "ok"}'
        return None


def unavailable(name: str, effects: list[str]) -> ToolResult:
    """The error result for a call no source of the chain answered."""
    return ToolResult(f"Error: tool {name!r} is not available in this environment", "error", effects, True)
