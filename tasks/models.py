"""Model access behind one small interface. The vendor SDK (openai) is imported only here.

Roles (candidate, baseline, simulator, judge) are bound to endpoints in conf; code never names
a model id. `synthetic://` binds a role to the in-process SYNTHETIC world over an ASGI transport,
so the real openai client and its HTTP stack are exercised without a socket.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import httpx
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletion

from tasks.config import Endpoint


def make_client(endpoint: Endpoint) -> AsyncOpenAI:
    """An AsyncOpenAI client for the endpoint, with its own timeout and retry policy."""
    key = endpoint.api_key().get_secret_value()
    if endpoint.synthetic:
        from tasks.synthetic.server import app

        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://synthetic.local/v1")
        return AsyncOpenAI(base_url="http://synthetic.local/v1", api_key=key, http_client=http,
                           timeout=endpoint.timeout_s, max_retries=endpoint.max_retries)
    return AsyncOpenAI(base_url=endpoint.base_url, api_key=key, timeout=endpoint.timeout_s,
                       max_retries=endpoint.max_retries)


class RateLimiter:
    """Requests-per-minute limiter (evenly spaced starts); None means unlimited."""

    def __init__(self, rpm: int | None) -> None:
        self.interval = 60.0 / rpm if rpm else 0.0
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        if not self.interval:
            return
        async with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            await asyncio.sleep(start - now)


@dataclass
class ChatResult:
    message: dict[str, Any]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float


class ChatModel:
    """One role's endpoint: concurrency-limited, rate-limited chat completions."""

    def __init__(self, endpoint: Endpoint, seed: int) -> None:
        self.endpoint = endpoint
        self.seed = endpoint.seed if endpoint.seed is not None else seed
        self.client = make_client(endpoint)
        self.sem = asyncio.Semaphore(endpoint.concurrency)
        self.limiter = RateLimiter(endpoint.rpm)
        self.calls = 0

    async def chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                   max_tokens: int) -> ChatResult:
        async with self.sem:
            await self.limiter.wait()
            t0 = time.perf_counter()
            self.calls += 1
            kwargs: dict[str, Any] = {"model": self.endpoint.model, "messages": messages,
                                      "temperature": self.endpoint.temperature, "seed": self.seed,
                                      "max_tokens": max_tokens}
            if tools:
                kwargs["tools"] = tools
            # client.post skips the SDK's per-call recursive TypedDict transform of `messages`,
            # which costs ~20 ms per call on long agentic prefixes; the request, retries,
            # auth and response parsing are the same client's.
            resp = await self.client.post("/chat/completions", cast_to=ChatCompletion, body=kwargs)
            latency = time.perf_counter() - t0
        choice = resp.choices[0]
        msg = choice.message
        out: dict[str, Any] = {"role": "assistant", "content": msg.content or ""}
        if msg.tool_calls:
            out["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.function.name, "arguments": c.function.arguments}}
                for c in msg.tool_calls if getattr(c, "function", None) is not None
            ]
        if getattr(msg, "refusal", None):
            out["refusal"] = msg.refusal
        usage = resp.usage
        return ChatResult(out, choice.finish_reason or "stop",
                          usage.prompt_tokens if usage else 0,
                          usage.completion_tokens if usage else 0, latency)

    async def aclose(self) -> None:
        await self.client.close()
