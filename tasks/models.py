"""Model access behind one small interface. The vendor SDK (openai) is imported only here.

Roles (candidate, baseline, simulator, judge) are bound to endpoints in conf; code never names
a model id. `synthetic://` binds a role to the in-process SYNTHETIC world over an ASGI transport,
so the real openai client and its HTTP stack are exercised without a socket.

Retries are depsim's, not the SDK's (its `max_retries` is 0): every retry is counted, 429/503
`Retry-After` is honoured exactly, and other transient faults (408, 409, 5xx, timeouts, dropped
connections, malformed bodies) back off exponentially with jitter, up to `endpoint.max_retries`.
A call that still fails raises `ModelCallError` with a short, countable reason.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import random
import time
from dataclasses import dataclass
from typing import Any, cast

import httpx
import openai
from openai import AsyncOpenAI

from tasks.cache import ModelCache
from tasks.config import Endpoint

_RETRY_STATUS = frozenset({408, 409, 429})


class ModelCallError(Exception):
    """A model call that failed for good, after its retries.

    Attributes:
        reason: a short kind to count by (http_429, http_500, timeout, connection,
            malformed_response, ...).
        detail: what the endpoint or the transport said, shortened.
        retries: retries spent before giving up.
        latency_s: wall time of the call, retries and back-offs included.
    """

    def __init__(self, reason: str, detail: str, retries: int = 0, latency_s: float = 0.0) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.retries = retries
        self.latency_s = latency_s


class BudgetExceeded(Exception):
    """The turn's wall-clock budget ran out while its call was in flight (the call is cancelled)."""


class MalformedResponse(ValueError):
    """A 2xx response whose body is not a chat completion."""


def make_client(endpoint: Endpoint) -> AsyncOpenAI:
    """An AsyncOpenAI client for the endpoint, with its timeout and the SDK's retries off."""
    key = endpoint.api_key().get_secret_value()
    if endpoint.synthetic:
        from tasks.synthetic.server import app

        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=cast(Any, app)), base_url="http://synthetic.local/v1")
        # The SDK is typed for its own httpx2 client but accepts a legacy httpx one (documented).
        return AsyncOpenAI(base_url="http://synthetic.local/v1", api_key=key, http_client=cast(Any, http),
                           timeout=endpoint.timeout_s, max_retries=0)
    base_url = endpoint.base_url
    if endpoint.local:
        from tasks.local_llm import resolve

        base_url = resolve(base_url)
    return AsyncOpenAI(base_url=base_url, api_key=key, timeout=endpoint.timeout_s, max_retries=0)


def encode_body(body: dict[str, Any]) -> bytes:
    """Canonical JSON bytes of a request body: what is sent, and what the cache key hashes."""
    return json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False).encode()


def retry_after_s(headers: Any) -> float | None:
    """Seconds the server asked to wait (`retry-after-ms`, `retry-after` seconds or HTTP date)."""
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            delay = float(value) / scale
        except ValueError:
            if name == "retry-after":
                parsed = email.utils.parsedate_tz(value)
                if parsed is not None:
                    return max(0.0, email.utils.mktime_tz(parsed) - time.time())
            continue
        if math.isfinite(delay):
            return max(0.0, delay)
    return None


def parse_completion(data: Any) -> tuple[dict[str, Any], str, int, int]:
    """(assistant message, finish reason, prompt tokens, completion tokens) of a response body.

    Raises:
        MalformedResponse: when the body is not a chat completion with a message.
    """
    try:
        choice = data["choices"][0]
        msg = choice["message"]
        if not isinstance(msg, dict):
            raise TypeError("message is not an object")
        out: dict[str, Any] = {"role": "assistant", "content": msg.get("content") or ""}
        calls: list[dict[str, Any]] = []
        for c in msg.get("tool_calls") or []:
            fn = c.get("function")
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                continue  # non-function tool types carry no name/arguments we can simulate
            args = fn.get("arguments")
            if not isinstance(args, str):  # some servers send an object; the wire format is text
                args = json.dumps(args) if args is not None else ""
            calls.append({"id": str(c.get("id") or f"call_{len(calls)}"), "type": "function",
                          "function": {"name": fn["name"], "arguments": args}})
        if calls:
            out["tool_calls"] = calls
        if msg.get("refusal"):
            out["refusal"] = msg["refusal"]
        usage = data.get("usage") or {}
        return (out, choice.get("finish_reason") or "stop", int(usage.get("prompt_tokens") or 0),
                int(usage.get("completion_tokens") or 0))
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
        raise MalformedResponse(f"not a chat completion: {type(exc).__name__}: {exc}") from None


class RateLimiter:
    """Requests-per-minute limiter (evenly spaced starts); None means unlimited."""

    def __init__(self, rpm: int | None) -> None:
        self.interval = 60.0 / rpm if rpm else 0.0
        self._next = 0.0

    async def wait(self) -> None:
        if not self.interval:
            return
        # No await between reading and advancing _next, so concurrent callers get distinct slots.
        now = time.monotonic()
        start = max(now, self._next)
        self._next = start + self.interval
        if start > now:
            await asyncio.sleep(start - now)


@dataclass
class ChatResult:
    """One answered chat call.

    `latency_s` is the call's wall time from admission (retries and back-offs included); for a
    cache hit it is the latency recorded when the response was first obtained.
    """

    message: dict[str, Any]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    retries: int = 0
    cached: bool = False
    queued_s: float = 0.0


class ChatModel:
    """One role's endpoint: cached, concurrency-limited, rate-limited chat completions.

    Counters: `calls` (requests sent for a call not answered from the cache, retries not
    included), `retries`, `cache_hits`.
    """

    def __init__(self, endpoint: Endpoint, seed: int, cache: ModelCache | None = None) -> None:
        self.endpoint = endpoint
        self.seed = endpoint.seed if endpoint.seed is not None else seed
        self.client = make_client(endpoint)
        self._cache_url = endpoint.base_url
        if endpoint.local:  # the model served, not the port it got this time
            from tasks.local_llm import cache_identity

            self._cache_url = cache_identity(endpoint.base_url)
        self.sem = asyncio.Semaphore(endpoint.concurrency)
        self.limiter = RateLimiter(endpoint.rpm)
        self.cache = cache
        self.calls = 0
        self.retries = 0
        self.cache_hits = 0

    def request_body(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                     max_tokens: int, response_format: dict[str, Any] | None = None,
                     tool_choice: str | None = None) -> dict[str, Any]:
        """The chat-completions body this model sends for a conversation.

        `response_format` (structured output) and `tool_choice` (with tools only) are sent only
        when given, so bodies (and cache keys) of requests without them are unchanged.
        """
        body: dict[str, Any] = {"model": self.endpoint.model, "messages": messages,
                                "temperature": self.endpoint.temperature, "seed": self.seed,
                                "max_tokens": max_tokens}
        if tools:
            body["tools"] = tools
            if tool_choice is not None:
                body["tool_choice"] = tool_choice
        if response_format is not None:
            body["response_format"] = response_format
        return body

    async def chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                   max_tokens: int, *, deadline_s: float | None = None,
                   response_format: dict[str, Any] | None = None, tool_choice: str | None = None) -> ChatResult:
        """One chat completion, from the cache when the same request was answered before.

        Args:
            messages: the conversation so far.
            tools: function-tool schemas offered to the model (None or empty: none).
            max_tokens: completion token limit.
            deadline_s: wall-clock limit for the call once it holds a concurrency slot
                (retries and back-offs included); None = no limit beyond the endpoint's.
            response_format: the body's `response_format` (e.g. a JSON schema); part of the
                request, hence of the cache key. None = not sent.
            tool_choice: the body's `tool_choice` when tools are offered; None = not sent.

        Raises:
            ModelCallError: the endpoint failed for good (non-retryable, or retries spent).
            BudgetExceeded: deadline_s passed before an answer.
        """
        body = encode_body(self.request_body(messages, tools, max_tokens, response_format, tool_choice))
        key = self.cache.key(self._cache_url, body) if self.cache is not None else None
        if key is not None and self.cache is not None:
            entry = self.cache.get(key)
            if entry is not None:
                try:
                    msg, finish, pt, ct = parse_completion(entry.get("response"))
                except MalformedResponse:
                    pass  # an unusable entry is a miss; the fresh answer overwrites it
                else:
                    self.cache_hits += 1
                    return ChatResult(msg, finish, pt, ct, float(entry.get("latency_s") or 0.0), cached=True)
        t_wait = time.perf_counter()
        async with self.sem:
            await self.limiter.wait()
            t0 = time.perf_counter()
            self.calls += 1
            state = {"retries": 0}
            try:
                if deadline_s is None:
                    data, parsed = await self._send(body, state)
                else:
                    async with asyncio.timeout(deadline_s) as scope:
                        data, parsed = await self._send(body, state)
            except TimeoutError as exc:
                self.retries += state["retries"]
                if deadline_s is None or not scope.expired():
                    raise
                raise BudgetExceeded(f"call cancelled after {time.perf_counter() - t0:.1f} s") from exc
            except ModelCallError as exc:
                exc.latency_s = time.perf_counter() - t0
                self.retries += state["retries"]
                raise
            latency = time.perf_counter() - t0
        self.retries += state["retries"]
        if key is not None and self.cache is not None:
            self.cache.put(key, {"response": data, "latency_s": latency})
        msg, finish, pt, ct = parsed
        return ChatResult(msg, finish, pt, ct, latency, retries=state["retries"], queued_s=t0 - t_wait)

    async def _send(self, body: bytes, state: dict[str, int]) -> tuple[Any, tuple[dict[str, Any], str, int, int]]:
        """POST the body until it succeeds, fails for good, or retries are spent."""
        ep = self.endpoint
        while True:
            delay: float | None = None
            try:
                # client.post skips the SDK's per-call recursive TypedDict transform of `messages`
                # (~20 ms per call on long agentic prefixes), and the raw response skips building
                # a pydantic ChatCompletion we would only take apart again; auth, headers,
                # timeouts and error mapping are still the SDK's.
                resp = await self.client.post("/chat/completions", cast_to=httpx.Response, content=body)
                try:
                    data = json.loads(resp.content)
                except ValueError as exc:
                    raise MalformedResponse(f"body is not JSON: {exc}") from None
                return data, parse_completion(data)
            except openai.APIStatusError as exc:
                status = exc.status_code
                reason, detail = f"http_{status}", str(exc.message)[:200]
                retryable = status in _RETRY_STATUS or status >= 500
                delay = retry_after_s(exc.response.headers) if retryable else None
                if delay is not None and delay > ep.retry_after_max_s:
                    retryable = False
                    detail = f"Retry-After {delay:.0f} s exceeds retry_after_max_s; {detail}"
            except openai.APITimeoutError:
                reason, detail, retryable = "timeout", f"no response within {ep.timeout_s} s", True
            except openai.APIConnectionError as exc:
                cause = exc.__cause__
                reason, retryable = "connection", True
                detail = f"{type(cause).__name__}: {cause}"[:200] if cause else str(exc)[:200]
            except MalformedResponse as exc:
                reason, detail, retryable = "malformed_response", str(exc)[:200], True
            if not retryable or state["retries"] >= ep.max_retries:
                raise ModelCallError(reason, detail, state["retries"])
            if delay is None:
                delay = min(ep.backoff_s * 2.0 ** state["retries"], ep.backoff_max_s) * random.uniform(0.75, 1.0)
            state["retries"] += 1
            await asyncio.sleep(delay)
            await self.limiter.wait()

    async def aclose(self) -> None:
        await self.client.close()
