"""The SYNTHETIC world behind an OpenAI-compatible chat-completions API (ASGI).

Reached with the real `openai` client: in-process through `httpx.ASGITransport`, or on a
loopback port with `depsim serve-synthetic --port N` (uvicorn). Requests are routed by model
name: the scripted agent profiles (tasks/synthetic/agent.py), the tool simulator
`synthetic-simulator` (tasks/synthetic/simulator.py) and the judges `synthetic-judge` and
`synthetic-judge-oracle` (tasks/synthetic/judge.py).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from tasks.synthetic import judge, simulator
from tasks.synthetic.agent import respond
from tasks.synthetic.profiles import PROFILE_NAMES

Scope = dict[str, Any]
MODEL_NAMES: tuple[str, ...] = (*PROFILE_NAMES, simulator.MODEL, *judge.MODELS)


def _tokens(obj: Any) -> int:
    return max(1, len(json.dumps(obj, ensure_ascii=False)) // 4)


def chat_completion(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Answer one chat-completions request body; returns (HTTP status, JSON body)."""
    model = body.get("model")
    messages = body.get("messages")
    if model not in MODEL_NAMES:
        return 404, {"error": {"message": f"The model `{model}` does not exist in the synthetic world "
                               f"(available: {', '.join(MODEL_NAMES)})", "type": "invalid_request_error",
                               "code": "model_not_found"}}
    if not isinstance(messages, list) or not messages:
        return 400, {"error": {"message": "messages must be a non-empty list", "type": "invalid_request_error"}}
    seed = body.get("seed")
    seed = int(seed) if isinstance(seed, int) else 0
    if model == simulator.MODEL:
        try:
            out = simulator.respond(messages, body.get("response_format"))
        except simulator.BadRequest as exc:
            return 400, {"error": {"message": str(exc), "type": "invalid_request_error", "param": "response_format"}}
    elif model in judge.MODELS:
        try:
            out = judge.respond(model, messages, body.get("response_format"))
        except simulator.BadRequest as exc:
            return 400, {"error": {"message": str(exc), "type": "invalid_request_error"}}
    else:
        out = respond(model, seed, messages, body.get("tools"))
    prompt_tokens = _tokens(messages)
    completion_tokens = _tokens(out["message"])
    return 200, {
        "id": f"chatcmpl-syn-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "synthetic-world",
        "choices": [{"index": 0, "message": out["message"], "finish_reason": out["finish_reason"],
                     "logprobs": None}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def models_list() -> dict[str, Any]:
    return {"object": "list", "data": [{"id": m, "object": "model", "created": 0,
                                        "owned_by": "depsim-synthetic"} for m in MODEL_NAMES]}


async def app(scope: Scope, receive: Any, send: Any) -> None:
    """Minimal ASGI app: POST /v1/chat/completions, GET /v1/models, GET /health."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    path = scope["path"].rstrip("/")
    method = scope["method"]
    if method == "POST" and path.endswith("/chat/completions"):
        try:
            payload = json.loads(body or b"{}")
            status, data = chat_completion(payload)
        except json.JSONDecodeError:
            status, data = 400, {"error": {"message": "request body is not JSON", "type": "invalid_request_error"}}
    elif method == "GET" and path.endswith("/models"):
        status, data = 200, models_list()
    elif method == "GET" and path in ("/health", "/v1/health"):
        status, data = 200, {"status": "ok", "world": "synthetic"}
    else:
        status, data = 404, {"error": {"message": f"no route {method} {path}", "type": "not_found"}}
    raw = json.dumps(data).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(raw)).encode())]})
    await send({"type": "http.response.body", "body": raw})


def serve(host: str = "127.0.0.1", port: int = 8089) -> None:
    """Serve the synthetic world on a port (blocking)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning", lifespan="on")
