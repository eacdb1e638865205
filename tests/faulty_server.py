"""A loopback OpenAI-compatible chat-completions server that injects faults (a test helper).

Plain asyncio streams and a minimal HTTP/1.1 (keep-alive, Content-Length bodies), so a fault
can be anything the wire allows: a dropped connection, a hang, a truncated JSON body. Run it
as its own process (`python -m tests.faulty_server --port N`) so the client under test shares
nothing with it; `start_server()` does that and `ServerProcess.stop()` ends it by pid.

What to do is chosen per request from the model name, `<behaviour>[@<delay_ms>][#<tag>]`
(the tag only separates counters), overridden by a JSON object in the first system message
({"behaviour": ..., "delay_ms": ..., "script": [...]}) so one run can mix faults per turn:

    ok            answers "done" (no tool call)
    script        returns the k-th scripted tool call at the k-th step of the turn, then answers
                  "done: <last tool result>"; script items are {"name", "arguments"} where a
                  string `arguments` is sent verbatim (so it can be invalid JSON)
    refuse        a refusal
    length        a cut answer (finish_reason "length")
    fault-<kind>  kind: 429 (Retry-After: 1), 503 (Retry-After: 1), 500, 400, drop (connection
                  closed without a response), hang (no answer for 30 s), malformed (truncated
                  JSON body), badshape (JSON without choices). Always; or with "-then-ok" only on
                  the first attempt of each distinct request body, the retry then succeeds.

Every completion reports usage prompt_tokens=100, completion_tokens=20. `--max-inflight N`
admits at most N requests at a time and queues the rest (a vLLM-style server). GET /stats
gives counters by model name and the largest number in flight; GET /log the request log
(with each request's tool_choice), GET /bodies every chat request body as received.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

PROMPT_TOKENS, COMPLETION_TOKENS = 100, 20
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 429: "Too Many Requests",
            500: "Internal Server Error", 503: "Service Unavailable"}


@dataclass
class State:
    """Counters and the request log of one server process."""

    by_model: Counter[str] = field(default_factory=Counter)
    attempts: Counter[str] = field(default_factory=Counter)   # per (model, body hash)
    log: list[dict[str, Any]] = field(default_factory=list)
    bodies: list[str] = field(default_factory=list)            # every chat request body, as received
    in_flight: int = 0
    in_flight_max: int = 0


def _directive(model: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
    name = model.split("#", 1)[0]
    behaviour, _, delay = name.partition("@")
    out: dict[str, Any] = {"behaviour": behaviour, "delay_ms": float(delay or 0), "script": []}
    first = messages[0] if messages else {}
    if first.get("role") == "system":
        try:
            extra = json.loads(first.get("content") or "")
        except (json.JSONDecodeError, TypeError):
            extra = None
        if isinstance(extra, dict):
            out.update({k: v for k, v in extra.items() if k in out})
    return out


def _step(messages: list[dict[str, Any]]) -> int:
    """How many assistant messages the turn already has (after the last user message)."""
    k = 0
    for m in reversed(messages):
        if m.get("role") == "user":
            break
        k += m.get("role") == "assistant"
    return k


def _completion(message: dict[str, Any], finish: str, model: str) -> dict[str, Any]:
    return {"id": f"chatcmpl-{time.monotonic_ns()}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS,
                      "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS}}


def _answer(behaviour: str, script: list[dict[str, Any]], messages: list[dict[str, Any]],
            model: str) -> tuple[int, dict[str, str], bytes]:
    if behaviour == "refuse":
        body = _completion({"role": "assistant", "content": None, "refusal": "I can't help with that."},
                           "stop", model)
    elif behaviour == "length":
        body = _completion({"role": "assistant", "content": "The answer is that the"}, "length", model)
    elif behaviour == "script" and _step(messages) < len(script):
        k = _step(messages)
        item = script[k]
        args = item.get("arguments", {})
        call = {"id": f"call_{k}", "type": "function",
                "function": {"name": item["name"], "arguments": args if isinstance(args, str) else json.dumps(args)}}
        body = _completion({"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls", model)
    elif behaviour in ("ok", "script"):
        last_tool = next((m.get("content") for m in reversed(messages) if m.get("role") == "tool"), None)
        text = "done" if last_tool is None else f"done: {last_tool}"
        body = _completion({"role": "assistant", "content": text}, "stop", model)
    else:
        return 404, {}, json.dumps({"error": {"message": f"unknown behaviour {behaviour!r}"}}).encode()
    return 200, {}, json.dumps(body).encode()


def _error(status: int, message: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "injected_fault", "code": status}}).encode()


class Server:
    """The request handler; one instance per process."""

    def __init__(self, max_inflight: int | None) -> None:
        self.state = State()
        self.gate = asyncio.Semaphore(max_inflight) if max_inflight else None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, *header_lines = head.decode("latin-1").split("\r\n")
                method, path, _ = line.split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in
                           (h.partition(":") for h in header_lines if h)}
                body = await reader.readexactly(int(headers.get("content-length") or 0))
                reply = await self.route(method, path.split("?")[0], body)
                if reply is None:  # injected drop: close without a response
                    writer.transport.abort()
                    return
                status, extra, raw = reply
                lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}",
                         "content-type: application/json", f"content-length: {len(raw)}",
                         *(f"{k}: {v}" for k, v in extra.items())]
                writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + raw)
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    async def route(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, str], bytes] | None:
        st = self.state
        if method == "GET" and path.endswith("/health"):
            return 200, {}, b'{"status":"ok"}'
        if method == "GET" and path.endswith("/stats"):
            return 200, {}, json.dumps({"requests": sum(st.by_model.values()), "by_model": st.by_model,
                                        "in_flight_max": st.in_flight_max}).encode()
        if method == "GET" and path.endswith("/log"):
            return 200, {}, json.dumps(st.log).encode()
        if method == "GET" and path.endswith("/bodies"):
            return 200, {}, json.dumps(st.bodies).encode()
        if method != "POST" or not path.endswith("/chat/completions"):
            return 404, {}, _error(404, f"no route {method} {path}")
        st.bodies.append(body.decode("utf-8", "replace"))
        try:
            req = json.loads(body)
            model, messages = str(req["model"]), list(req["messages"])
        except (ValueError, KeyError, TypeError):
            return 400, {}, _error(400, "request body is not a chat-completions request")
        if self.gate is None:
            return await self.complete(model, messages, body)
        async with self.gate:
            return await self.complete(model, messages, body)

    async def complete(self, model: str, messages: list[dict[str, Any]],
                       body: bytes) -> tuple[int, dict[str, str], bytes] | None:
        st = self.state
        st.in_flight += 1
        st.in_flight_max = max(st.in_flight_max, st.in_flight)
        try:
            d = _directive(model, messages)
            digest = hashlib.sha256(body).hexdigest()[:16]
            st.by_model[model] += 1
            st.attempts[f"{model}|{digest}"] += 1
            attempt = st.attempts[f"{model}|{digest}"]
            st.log.append({"t": time.time(), "model": model, "body": digest, "attempt": attempt,
                           "behaviour": d["behaviour"], "tool_choice": json.loads(body).get("tool_choice")})
            if d["delay_ms"]:
                await asyncio.sleep(d["delay_ms"] / 1000)
            behaviour = str(d["behaviour"])
            if behaviour.startswith("fault-"):
                kind = behaviour[len("fault-"):]
                once = kind.endswith("-then-ok")
                kind = kind.removesuffix("-then-ok")
                if not once or attempt == 1:
                    return await self.fault(kind)
                behaviour = "ok"
            return _answer(behaviour, list(d["script"] or []), messages, model)
        finally:
            st.in_flight -= 1

    async def fault(self, kind: str) -> tuple[int, dict[str, str], bytes] | None:
        if kind in ("429", "503"):
            return int(kind), {"retry-after": "1"}, _error(int(kind), "slow down")
        if kind in ("500", "400"):
            return int(kind), {}, _error(int(kind), f"injected {kind}")
        if kind == "drop":
            return None
        if kind == "hang":
            await asyncio.sleep(30)
            return 200, {}, json.dumps(_completion({"role": "assistant", "content": "late"}, "stop", "hang")).encode()
        if kind == "malformed":
            return 200, {}, b'{"id": "chatcmpl-x", "object": "chat.completion", "choices": [{"index": 0, "mess'
        if kind == "badshape":
            return 200, {}, b'{"id": "chatcmpl-x", "object": "chat.completion", "result": "ok"}'
        return 404, {}, _error(404, f"unknown fault {kind!r}")


async def _serve(port: int, max_inflight: int | None) -> None:
    server = Server(max_inflight)
    srv = await asyncio.start_server(server.handle, "127.0.0.1", port, backlog=1024)
    async with srv:
        await srv.serve_forever()


@dataclass
class ServerProcess:
    """A running faulty server: its base URL (ending in /v1) and process."""

    url: str
    proc: subprocess.Popen[bytes]

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/stats", timeout=5).json()

    def requests(self, model: str) -> int:
        """Chat requests received for a model name (tag included)."""
        return int(self.stats()["by_model"].get(model, 0))

    def log(self) -> list[dict[str, Any]]:
        return httpx.get(f"{self.url}/log", timeout=5).json()

    def bodies(self) -> list[str]:
        """Every chat request body the server received, as text."""
        return list(httpx.get(f"{self.url}/bodies", timeout=5).json())

    def stop(self) -> None:
        """Stop the process by its pid (SIGTERM, then SIGKILL)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(max_inflight: int | None = None, timeout_s: float = 20.0) -> ServerProcess:
    """Start the server in its own process on a free loopback port; wait until it answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "tests.faulty_server", "--port", str(port)]
    if max_inflight:
        cmd += ["--max-inflight", str(max_inflight)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"faulty server exited: {err}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return ServerProcess(url, proc)
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"faulty server did not start in {timeout_s} s")


def conversation(cid: str, behaviour: str | None = None, script: list[dict[str, Any]] | None = None,
                 tools: list[dict[str, Any]] | None = None, recording: list[dict[str, Any]] | None = None,
                 delay_ms: float | None = None) -> dict[str, Any]:
    """A conversation whose first system message directs this server; its last user turn is replayed.

    Args:
        cid: conversation id.
        behaviour: overrides the model name's behaviour for this conversation's requests.
        script: tool calls for the `script` behaviour, [{"name", "arguments"}].
        tools: declared tools (default: the SYNTHETIC world's shell, read_file, write_file, ...).
        recording: earlier messages (e.g. a recorded tool call and result) before the replayed
            user message, for the recorded-result source.
        delay_ms: overrides the model name's delay.
    """
    from tasks.synthetic.logs import TOOLS

    directive: dict[str, Any] = {"script": script or []}
    if behaviour is not None:
        directive["behaviour"] = behaviour
    if delay_ms is not None:
        directive["delay_ms"] = delay_ms
    messages = [{"role": "system", "content": json.dumps(directive)}, *(recording or []),
                {"role": "user", "content": f"please do the task ({cid})"}]
    return {"conversation_id": cid, "messages": messages, "tools": TOOLS if tools is None else tools}


def turn_frames(conversations: list[dict[str, Any]]) -> tuple[Any, Any]:
    """(sample, conversations) frames replaying the last user message of each conversation."""
    import polars as pl

    convs = pl.DataFrame({"conversation_id": [c["conversation_id"] for c in conversations],
                          "messages": [json.dumps(c["messages"]) for c in conversations],
                          "tools": [json.dumps(c["tools"]) for c in conversations]})
    sample = pl.DataFrame({
        "turn_id": [f"{c['conversation_id']}#0" for c in conversations],
        "conversation_id": [c["conversation_id"] for c in conversations],
        "user_msg_index": [max(i for i, m in enumerate(c["messages"]) if m["role"] == "user")
                           for c in conversations]}, schema_overrides={"user_msg_index": pl.Int64})
    return sample, convs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-inflight", type=int, default=None)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.port, args.max_inflight))


if __name__ == "__main__":
    main()
