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

The world is the one at the replay point (`replay_at`, or `before_call` for fidelity): what the
recording's prefix established. A recorded call after the replay point may answer (or seed the
state) only when no action of the production model between the replay point and that call could
have changed its result (`footprint`: what a call reads and what it may change, judged from its
arguments, conservatively); a recorded call before it only when nothing between it and the
replay point could have; and neither once the candidate's own actions could have changed it.
Nothing the production model did after the replay point reaches the world state. A test run with
no valid recording is answered from the state (a Python file the candidate changed that no longer
parses fails; a still-current known test output is repeated) or by `llm`, else its outcome is
`unknown`: `ToolResult.outcome == "unknown"` and a text starting with `UNKNOWN_TEST_OUTCOME`.
"""

from __future__ import annotations

import ast
import functools
import json
import posixpath
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
    SHELLS,
    SQL_TOOLS,
    TEST_COMMAND_RE,
    WRITE_TOOLS,
    Command,
    classify_effects,
    is_internal_host,
    is_test_command,
    parse_action,
    shell_commands,
    url_host,
)

__all__ = ["EFFECTS", "UNKNOWN_TEST_OUTCOME", "ExecutionForbidden", "Footprint", "LLMRequest", "ToolResult",
           "ToolSimulator", "WorldState", "classify_effects", "conflicts", "footprint", "no_execution",
           "normalise_args", "unavailable"]


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
    outcome: str | None = None  # "unknown": a test run whose outcome nothing could tell


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
    partial: set[str] = field(default_factory=set)  # files known only by an edit's new string
    last_test_output: str | None = None


# --- what a call reads and what it may change ----------------------------------------------
# Resources: "file:<path>", FILES (every file: listings, recursive greps), VCS (git index,
# history, remotes), DB, NET (remote services), DOMAIN (a domain tool's own world) and ANY.
ANY, FILES, VCS, DB, NET, DOMAIN = "*", "files", "vcs", "db", "net", "domain"

# Programs that change nothing, with what their output depends on: the file operands ("paths"),
# every file ("files"), nothing (""), or files and git ("git").
_READ_PROGS: dict[str, str] = {
    **dict.fromkeys(("cat", "head", "tail", "less", "more", "wc", "nl", "od", "xxd", "md5sum", "sha256sum",
                     "sha1sum", "file", "stat", "diff", "cmp", "sort", "uniq", "cut", "tr", "jq", "yq", "awk",
                     "sed", "column", "strings"), "paths"),
    **dict.fromkeys(("ls", "find", "tree", "du", "df", "rg", "ag", "fd", "locate"), "files"),
    **dict.fromkeys(("echo", "printf", "pwd", "which", "type", "date", "whoami", "uname", "id", "hostname",
                     "true", "false", "test", "[", "basename", "dirname", "realpath", "readlink", "env",
                     "printenv", "sleep", "cd", "export", "set", "exit"), ""),
}
_GREP_PROGS = frozenset({"grep", "egrep", "fgrep", "zgrep"})
_GIT_READS = frozenset({"status", "diff", "log", "show", "blame", "rev-parse", "ls-files", "grep", "shortlog",
                        "describe", "reflog", "whatchanged", "cat-file", "ls-tree", "rev-list"})
_GIT_HISTORY_WRITES = frozenset({"add", "commit", "push", "fetch", "tag", "notes"})
# Programs that change only their file operands (or, given none, files read from a pipe).
_PATH_WRITERS = frozenset({"rm", "rmdir", "touch", "mkdir", "tee", "mv", "cp", "truncate", "chmod", "chown",
                           "ln", "shred", "unlink", "install"})
_CURL_WRITE_FLAGS = frozenset({"X", "d", "F", "T", "o", "O", "--request", "--data", "--data-raw", "--data-binary",
                               "--data-urlencode", "--form", "--upload-file", "--output", "--remote-name", "--json"})
_NULL_TARGETS = frozenset({"/dev/null", "/dev/stdout", "/dev/stderr", "&1", "&2", "1", "2"})
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class Footprint:
    """What a call's result depends on (`reads`) and what it may change (`writes`)."""

    reads: frozenset[str] = frozenset()
    writes: frozenset[str] = frozenset()


def _file_key(path: str) -> str:
    """`file:<normalised path>`, or FILES for a path that names no one file (globs, variables)."""
    if not path or any(ch in path for ch in "*?[]{}$~`"):
        return FILES
    return "file:" + posixpath.normpath(path)


def _paths_overlap(a: str, b: str) -> bool:
    """Whether two normalised paths may name the same file (one inside the other, or the same
    file seen from an unknown working directory)."""
    if a == b or "." in (a, b) or a.startswith(b + "/") or b.startswith(a + "/"):
        return True
    if a.startswith("/") != b.startswith("/"):
        rel, abs_ = (a, b) if b.startswith("/") else (b, a)
        return abs_.endswith("/" + rel) or ("/" + rel).startswith(abs_ + "/") or rel.startswith("..")
    return False


def _clash(write: str, read: str) -> bool:
    if ANY in (write, read) or write == read:
        return True
    wf, rf = write.startswith("file:"), read.startswith("file:")
    if (wf and read == FILES) or (rf and write == FILES):
        return True
    return wf and rf and _paths_overlap(write[5:], read[5:])


def conflicts(writes: frozenset[str] | set[str], reads: frozenset[str] | set[str]) -> bool:
    """Whether anything in `writes` could change a result that depends on `reads`."""
    return any(_clash(w, r) for w in writes for r in reads)


def _command_footprint(c: Command, cd: bool) -> tuple[set[str], set[str]]:
    """(reads, writes) of one simple shell command; cd: the line changes directory, so its
    relative paths name no known file."""
    def key(p: str) -> str:
        return FILES if cd and not p.startswith("/") else _file_key(p)

    prog, ops = c.prog, c.operands()
    reads: set[str] = set()
    writes: set[str] = {key(t) for op, t in c.redirects if op in (">", ">>", ">|", "&>") and t not in _NULL_TARGETS}
    reads |= {key(t) for op, t in c.redirects if op == "<"}
    if not prog or (prog in SHELLS and "-c" in c.argv):  # `bash -c '…'`: its commands come separately
        return reads, writes
    if is_test_command(" ".join(c.argv)):
        return reads | {ANY}, writes
    if prog == "sed" and ("i" in c.flags() or "--in-place" in c.flags()):
        return reads | {key(p) for p in ops}, writes | {key(p) for p in ops} | ({FILES} if len(ops) < 2 else set())
    if prog in _GREP_PROGS:
        recursive = bool({"r", "R", "--recursive"} & c.flags())
        return reads | ({FILES} if recursive or len(ops) < 2 else {key(p) for p in ops[1:]}), writes
    if prog == "find" and {"-delete", "-exec", "-execdir", "-ok"} & set(c.argv):
        return reads | {ANY}, writes | {ANY}
    if prog in _READ_PROGS:
        kind = _READ_PROGS[prog]
        return reads | ({key(p) for p in ops} if kind == "paths" else {FILES} if kind == "files" else set()), writes
    if prog == "git":
        sub = ops[0] if ops else ""
        if sub in _GIT_READS or (sub in ("branch", "remote", "stash") and len(ops) == 1):
            return reads | {FILES, VCS}, writes
        if sub in _GIT_HISTORY_WRITES:
            return reads | {FILES, VCS}, writes | {VCS, NET}
        return reads | {FILES, VCS}, writes | {FILES, VCS}
    if prog in _PATH_WRITERS:
        targets = {key(p) for p in (ops[1:] if prog in ("chmod", "chown") else ops)} or {FILES}
        return reads | targets, writes | targets
    if prog == "curl" and not (_CURL_WRITE_FLAGS & c.flags()):
        return reads | {NET}, writes
    return reads | {ANY}, writes | {ANY}  # a program that could do anything


def _shell_footprint(command: str) -> Footprint:
    cmds = shell_commands(command)
    cd = any(c.prog in ("cd", "pushd", "popd") for c in cmds)
    reads: set[str] = set()
    writes: set[str] = set()
    for c in cmds:
        r, w = _command_footprint(c, cd)
        reads |= r
        writes |= w
    return Footprint(frozenset(reads), frozenset(writes))


def footprint(name: str, args: dict[str, Any]) -> Footprint:
    """What a call reads and may change, judged from its name and arguments (never by running
    it), erring towards more: a program it does not know may read and change anything."""
    a = parse_action(name, args)
    if a.kind in ("thought", "finish"):
        return Footprint()
    path = _file_key(a.path) if a.path else FILES
    if a.kind == "read":
        return Footprint(frozenset({path}))
    if a.kind == "write":
        return Footprint(frozenset(), frozenset({path}))
    if a.kind == "edit":
        return Footprint(frozenset({path}), frozenset({path}))
    if a.kind == "shell":
        return _shell_footprint(str(args.get("command", args.get("cmd", args.get("script", "")))))
    if a.kind == "sql":
        writes = frozenset({DB}) if not a.sql or any(s.kind != "select" for s in a.sql) else frozenset()
        return Footprint(frozenset({DB}), writes)
    if a.kind == "http":
        local = any(is_internal_host(url_host(u)) for u in a.urls) or not a.urls
        reads = frozenset({ANY if local else NET})
        return Footprint(reads, frozenset() if a.method in _READ_METHODS else frozenset({ANY if local else NET}))
    if a.kind == "message":
        return Footprint(frozenset({NET}), frozenset({NET}))
    if a.kind == "other":
        return Footprint(frozenset({DOMAIN}), frozenset() if a.verb == "read" else frozenset({DOMAIN}))
    return Footprint(frozenset({ANY}), frozenset({ANY}))  # python, and anything not parsed


@functools.lru_cache(maxsize=16384)
def _cat_path(command: str) -> str | None:
    """The file a plain `cat FILE` prints, else None."""
    cmds = shell_commands(command)
    if len(cmds) == 1 and cmds[0].argv[:1] == ["cat"] and len(cmds[0].argv) == 2 and not cmds[0].redirects \
            and not cmds[0].argv[1].startswith("-") and _file_key(cmds[0].argv[1]) != FILES:
        return cmds[0].argv[1]
    return None


@functools.lru_cache(maxsize=16384)
def _rm_targets(command: str) -> tuple[str, ...]:
    """What the `rm` commands of a line remove."""
    return tuple(p for c in shell_commands(command) if c.prog == "rm" for p in c.operands())


def _is_test_run(args: dict[str, Any]) -> bool:
    return bool(_TEST_CMD.search(str(args.get("command", ""))))


UNKNOWN_TEST_OUTCOME = "[depsim] Test outcome unknown"
_UNKNOWN_TEST_TEXT = (f"{UNKNOWN_TEST_OUTCOME}: nothing is executed here, and no recorded run of these tests "
                      "matches the current state of the workspace, so whether they pass cannot be told.")


_UNSET: Any = object()


@dataclass
class _Call:
    """One call of a recording, in call order."""

    call_id: Any
    name: str
    raw: Any
    args: dict[str, Any] | None  # None: arguments that are not a JSON object
    content: str | None = None   # the recorded result, None when unanswered
    fp: Footprint = field(default_factory=Footprint)


def _timeline(messages: list[dict[str, Any]]) -> tuple[list[_Call], list[int]]:
    """Every call of a recording in call order, with its result, and for each call the index
    of the message that made it."""
    calls: list[_Call] = []
    at: list[int] = []
    by_id: dict[Any, _Call] = {}
    for i, m in enumerate(messages):
        for c in m.get("tool_calls") or []:
            fn = c.get("function") or {}
            raw = fn.get("arguments", "{}")
            try:
                parsed = json.loads(raw) if isinstance(raw, str) else raw
            except json.JSONDecodeError:
                parsed = None
            args = parsed if isinstance(parsed, dict) else None
            name = str(fn.get("name", ""))
            fp = _footprint_of(name, args)
            call = _Call(c.get("id"), name, raw, args, None, fp)
            calls.append(call)
            at.append(i)
            by_id[c.get("id")] = call
        if m.get("role") == "tool" and m.get("tool_call_id") in by_id:
            content = m.get("content")
            by_id[m["tool_call_id"]].content = content if isinstance(content, str) else json.dumps(content)
    return calls, at


def _footprint_of(name: str, args: dict[str, Any] | None) -> Footprint:
    if args is None:  # unparseable arguments: nothing known about the call
        return Footprint(frozenset({ANY}), frozenset({ANY}))
    return _cached_footprint(name, json.dumps(args, sort_keys=True))


@functools.lru_cache(maxsize=65536)
def _cached_footprint(name: str, args_json: str) -> Footprint:
    return footprint(name, json.loads(args_json))


def _valid_at(calls: list[_Call], k: int, point: int) -> bool:
    """Whether call k's recorded result still holds at the replay point (`point` calls done):
    no call between the two could have changed it."""
    between = calls[k + 1: point] if k < point else calls[point:k]
    reads = calls[k].fp.reads
    return not any(conflicts(c.fp.writes, reads) for c in between)


def _llm_follows_rules(chain: list[str]) -> bool:
    """Whether `llm` can answer what `rules` decline (it comes later in the chain, or alone)."""
    if "llm" not in chain:
        return False
    return "rules" not in chain or chain.index("llm") > chain.index("rules")


class ToolSimulator:
    """Answers a replay's tool calls. One instance per replayed turn (its own world state).

    Args:
        recording: the recorded conversation.
        chain: the simulator sources, in order.
        replay_at: index of the first message after the replay point: `recording[:replay_at]`
            is the prefix, the rest is what the production model did later. None: the whole
            recording is the prefix.
        before_call: instead of `replay_at`, the id of the recorded call the replay point comes
            just before; that call and its result are left out (for fidelity).
    """

    def __init__(self, recording: list[dict[str, Any]], chain: list[str], replay_at: int | None = None,
                 *, before_call: Any = _UNSET) -> None:
        self.chain = chain
        self._defer = _llm_follows_rules(chain)
        self.state = WorldState()
        calls, at = _timeline(recording)
        if before_call is not _UNSET:
            point = next((k for k, c in enumerate(calls) if c.call_id == before_call), len(calls))
            del calls[point: point + 1]
        else:
            point = len(calls) if replay_at is None else sum(1 for i in at if i < replay_at)
        # (name, normalised args) -> recorded results valid at the replay point, in call order
        self._recorded: dict[tuple[str, str], list[tuple[str, Footprint]]] = {}
        self._done: set[str] = set()       # what the candidate's own calls may have changed
        self._tests_current = False        # state.last_test_output still describes the workspace
        self._unknown = False              # the rules answered a test run whose outcome is unknown
        for k, c in enumerate(calls[:point]):
            self._seed_prefix(c, _valid_at(calls, k, point))
        for k in range(point, len(calls)):
            c = calls[k]
            if c.content is not None and c.args is not None and _valid_at(calls, k, point):
                self._seed_later(c)
        for k, c in enumerate(calls):
            if c.content is not None and _valid_at(calls, k, point):
                self._recorded.setdefault((c.name, normalise_args(c.raw)), []).append((c.content, c.fp))

    def _seed_prefix(self, c: _Call, valid: bool) -> None:
        """Fold a prefix call into the world as the production model left it."""
        if c.args is None:
            return
        lname, st = c.name.lower(), self.state
        a = c.args
        if lname in READ_TOOLS and "path" in a:
            if c.content is not None and not c.content.startswith("Error"):
                st.files[str(a["path"])] = c.content
                st.deleted.discard(str(a["path"]))
        elif lname in WRITE_TOOLS and "path" in a:
            st.files[str(a["path"])] = str(a.get("content", ""))
            st.deleted.discard(str(a["path"]))
        elif lname in EDIT_TOOLS and "path" in a:
            text, old = st.files.get(str(a["path"])), str(a.get("old_str", ""))
            if text is not None and old and old in text:
                st.files[str(a["path"])] = text.replace(old, str(a.get("new_str", "")), 1)
        elif _is_test_run(a) and c.content is not None:
            st.last_test_output, self._tests_current = (c.content, True) if valid else (None, False)
        elif lname in SHELL_TOOLS and (path := _cat_path(str(a.get("command", "")))) is not None:
            if c.content is not None and not c.content.startswith("cat: "):
                st.files[path] = c.content
                st.deleted.discard(path)
        elif lname in SHELL_TOOLS:
            for p in _rm_targets(str(a.get("command", ""))):
                st.deleted.update(f for f in st.files if f == p or f.startswith(p.rstrip("/") + "/"))

    def _seed_later(self, c: _Call) -> None:
        """Fold in a later recorded call whose result still holds at the replay point."""
        assert c.args is not None and c.content is not None
        lname, st = c.name.lower(), self.state
        if lname in READ_TOOLS and "path" in c.args and not c.content.startswith("Error"):
            if str(c.args["path"]) not in st.deleted:
                st.files[str(c.args["path"])] = c.content
        elif lname in SHELL_TOOLS and (cat := _cat_path(str(c.args.get("command", "")))) is not None:
            if not c.content.startswith("cat: ") and cat not in st.deleted:
                st.files[cat] = c.content
        elif _is_test_run(c.args) and st.last_test_output is None:
            st.last_test_output, self._tests_current = c.content, True

    def simulate(self, name: str, arguments: str) -> ToolResult:
        """Answer one call from the synchronous sources only (`llm` in the chain is skipped).

        Never executes: the no_execution guard makes sure of it.
        """
        with no_execution():
            out = self._run_chain(name, arguments, llm=False)
        return out if isinstance(out, ToolResult) else unavailable(out.name, out.effects, _is_test_run(out.args))

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
            self._acted(_footprint_of(request.name, request.args))
            if lname in WRITE_TOOLS or lname in EDIT_TOOLS:
                self._rules(lname, request.args, defer=False)
            elif _is_test_run(request.args):
                self.state.last_test_output, self._tests_current = result.content, True

    def _acted(self, fp: Footprint) -> None:
        """Note what a call of the candidate may have changed: recordings that depend on it no
        longer hold, nor does the last test output."""
        if fp.writes:
            self._done |= fp.writes
            self._tests_current = False

    def _run_chain(self, name: str, arguments: str, llm: bool) -> ToolResult | LLMRequest:
        try:
            args = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return ToolResult(f"Error: arguments for {name} are not valid JSON", "error", [], True)
        if not isinstance(args, dict):
            return ToolResult(f"Error: arguments for {name} must be a JSON object", "error", [], True)
        effects = classify_effects(name, args)
        fp = _footprint_of(name, args)
        test_run = _is_test_run(args)
        for source in self.chain:
            if source == "recorded":
                hit = next((text for text, rfp in self._recorded.get((name, normalise_args(args)), [])
                            if not conflicts(self._done, rfp.reads)), None)
                if hit is not None:
                    if fp.writes:  # the recorded answer stands, and the world changes as it implies
                        self._rules(name.lower(), args)
                    self._acted(fp)
                    if test_run:
                        self.state.last_test_output, self._tests_current = hit, True
                    return ToolResult(hit, "recorded", effects)
            elif source == "rules":
                self._unknown = False
                out = self._rules(name.lower(), args, defer=llm and self._defer)
                if out is not None:
                    self._acted(fp)
                    return ToolResult(out, "rules", effects, outcome="unknown" if self._unknown else None)
            elif source == "llm" and llm:
                return LLMRequest(name, args, effects)
        return unavailable(name, effects, test_run)

    # --- rule emulators ---------------------------------------------------------------
    def _rules(self, name: str, args: dict[str, Any], defer: bool = False) -> str | None:
        """The emulated output, or None when there is no emulator for the call.

        With `defer`, calls the emulators could only guess at (an unseen file, an unknown
        command) are declined too, for the `llm` source.
        """
        st = self.state
        if name in READ_TOOLS:
            path = str(args.get("path", ""))
            if path in st.files and path not in st.deleted and not (defer and path in st.partial):
                return st.files[path]
            if defer and path not in st.deleted:
                return None
            return f"Error: file not found: {path}"
        if name in WRITE_TOOLS:
            path, content = str(args.get("path", "")), str(args.get("content", ""))
            st.files[path] = content
            st.deleted.discard(path)
            st.partial.discard(path)
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
                # Unseen file: assume the edit applies. Its new string is the best guess a read
                # gets, but only a piece of the file: whether the file still parses is unknown.
                st.files[path] = new
                st.partial.add(path)
                return f"Edited {path}"
            if old and old not in text:
                if path in st.partial:  # the text known is only a piece: assume it applies
                    st.files[path] = f"{text}{new}"
                    return f"Edited {path}"
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
            if _is_test_run(args):
                return self._test_run(defer)
            out = self._shell(str(args.get("command", "")))
            return None if out is None and defer else (out or "")
        return None

    def _test_run(self, defer: bool) -> str | None:
        """A test run answered from the state: a Python file this replay changed that no longer
        parses fails collection; else the last test output, while nothing has changed since;
        else (unless deferred to `llm`) the outcome is unknown."""
        st = self.state
        broken = sorted(p for p in st.changed if p.endswith(".py") and p in st.files and p not in st.deleted
                        and p not in st.partial and not _parses(st.files[p]))
        if broken:
            return "\n".join([*(f"ERROR collecting {p} - SyntaxError: invalid syntax" for p in broken),
                              f"{len(broken)} error{'s' if len(broken) > 1 else ''} in 0.12s"])
        if self._tests_current and st.last_test_output is not None:
            return st.last_test_output
        if defer:
            return None
        self._unknown = True
        return _UNKNOWN_TEST_TEXT

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
        if prog in ("pip", "npm") and "install" in argv:
            return "Successfully installed packages"
        if prog in ("curl", "wget"):
            return '{"status": "ok"}'
        return None


def _parses(source: str) -> bool:
    try:
        ast.parse(source)
    except (SyntaxError, ValueError):
        return False
    return True


def unavailable(name: str, effects: list[str], test_run: bool = False) -> ToolResult:
    """The error result for a call no source of the chain answered (a test run's outcome is
    then unknown, and says so first)."""
    text = f"Error: tool {name!r} is not available in this environment"
    if test_run:
        return ToolResult(f"{UNKNOWN_TEST_OUTCOME}: {text}", "error", effects, True, outcome="unknown")
    return ToolResult(text, "error", effects, True)
