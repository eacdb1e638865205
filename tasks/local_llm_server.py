"""`python -m tasks.local_llm_server …`: llama-cpp-python's OpenAI-compatible server with the
`depsim-tools` chat handler (the arguments are llama_cpp.server's own).

The handler is llama-cpp-python's `chatml-function-calling` (a grammar makes every tool call
parse), with what an agent replay needs on top:

- `tool_choice` "required" (which that format lacks) and a bounded "auto" (the format's own may
  chain calls without end): a first completion under a grammar of the choices picks a function
  (or, on "auto", a message), then the format makes that one forced call, or a plain answer.
- Tool results reach the model: the format's template renders only system, user and assistant
  messages, so a `tool` message is shown as a user message "functions.<name> returned: …".
- Messages the template cannot render are made renderable: content None → "" (an assistant
  message with tool calls and no content otherwise fails the request), a missing `parameters`
  → {}, and a system message is added when there is none (the template lists the tools in it).

Nothing here is imported by depsim itself: it runs only in the server's process.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from llama_cpp import llama_chat_format, llama_grammar


def _gbnf_literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def renderable(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation in the shape chatml-function-calling's template renders."""
    names = {c.get("id"): (c.get("function") or {}).get("name") for m in messages
             for c in (m.get("tool_calls") or []) if isinstance(c, dict)}
    out: list[dict[str, Any]] = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text
            content = "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        content = "" if content is None else str(content)
        role = m.get("role")
        if role == "tool":
            name = m.get("name") or names.get(m.get("tool_call_id")) or "tool"
            out.append({"role": "user", "content": f"functions.{name} returned:\n{content}"})
        elif role in ("system", "developer"):
            out.append({"role": "system", "content": content})
        elif role == "assistant" and m.get("tool_calls"):
            calls = [{"id": c.get("id", ""), "type": "function",
                      "function": {"name": (c.get("function") or {}).get("name", ""),
                                   "arguments": (c.get("function") or {}).get("arguments") or "{}"}}
                     for c in m["tool_calls"] if isinstance(c, dict)]
            out.append({"role": "assistant", "content": content, "tool_calls": calls})
        else:
            out.append({"role": "user" if role != "assistant" else "assistant", "content": content})
    if not out or out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": "You are a helpful assistant."})
    return out


def _with_parameters(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    fixed = []
    for t in tools:
        fn = dict(t.get("function") or {})
        fn.setdefault("parameters", {"type": "object", "properties": {}})
        fixed.append({**t, "function": fn})
    return fixed


class _Prompt(Exception):
    def __init__(self, prompt: str) -> None:
        self.prompt = prompt


class _Capture:
    """Stands in for the model to read the prompt chatml-function-calling would send."""

    verbose = False

    def create_completion(self, prompt: str, **_: Any) -> Any:
        raise _Prompt(prompt)


def call_prompt(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> str:
    """The format's own prompt for a forced call, up to where the function name is written, so
    the decision below and the call after it share one evaluated prefix (llama.cpp reuses it)."""
    name = tools[0]["function"]["name"]
    try:
        llama_chat_format.chatml_function_calling(llama=_Capture(), messages=messages, tools=tools,  # type: ignore[arg-type]
                                                  tool_choice={"type": "function", "function": {"name": name}})
    except _Prompt as got:
        return got.prompt[: -len(f"functions.{name}:\n")]
    raise RuntimeError("chatml-function-calling made no completion")


def next_move(llama: Any, prompt: str, tools: list[dict[str, Any]], required: bool, seed: int | None) -> str | None:
    """The function the model calls next (None: it answers with a message instead), chosen by a
    completion under a grammar of exactly those choices: one decision, a few tokens."""
    names = [str(t["function"]["name"]) for t in tools]
    if required and len(names) == 1:
        return names[0]
    choices = [f"functions.{n}:" for n in names] + ([] if required else ["message:"])
    grammar = llama_grammar.LlamaGrammar.from_string(
        "root ::= " + " | ".join(_gbnf_literal(c) for c in choices), verbose=False)
    out = llama.create_completion(prompt=prompt, grammar=grammar, max_tokens=48, temperature=0.0, seed=seed)
    text = str(out["choices"][0]["text"]).strip()
    if text not in choices or text == "message:":
        return names[0] if required else None
    return text[len("functions."):-1]


@llama_chat_format.register_chat_completion_handler("depsim-tools")
def depsim_tools(llama: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                 tool_choice: Any = None, **kwargs: Any) -> Any:
    msgs = renderable(messages)
    tools = _with_parameters(tools) if tools else None
    if tools and tool_choice in ("auto", "required"):
        # The format's own "auto" may chain calls without bound; here one step makes at most one.
        prompt = call_prompt(msgs, tools)
        name = next_move(llama, prompt, tools, tool_choice == "required", kwargs.get("seed"))
        if name is None:  # a message, written where the decision left off
            keep = ("temperature", "top_p", "top_k", "min_p", "max_tokens", "seed", "repeat_penalty")
            done = llama.create_completion(prompt=prompt + "message:\n", stop=["<|im_end|>"],
                                           **{k: kwargs[k] for k in keep if kwargs.get(k) is not None})
            return llama_chat_format._convert_completion_to_chat(done, stream=False)
        tool_choice = {"type": "function", "function": {"name": name}}
    return llama_chat_format.chatml_function_calling(llama=llama, messages=msgs, tools=tools,
                                                     tool_choice=tool_choice, **kwargs)


def null_content_to_text(app: Any) -> Any:
    """ASGI middleware: `"content": null` in a chat request's messages becomes "" before the
    server's request model sees it (it accepts only strings, and answers a 500 otherwise, which
    clients then retry)."""

    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or not str(scope.get("path", "")).endswith("/chat/completions"):
            await app(scope, receive, send)
            return
        chunks = []
        while True:
            event = await receive()
            chunks.append(event.get("body", b""))
            if not event.get("more_body"):
                break
        body = b"".join(chunks)
        try:
            data = json.loads(body)
            for m in data.get("messages") or []:
                if isinstance(m, dict) and m.get("content", "") is None:
                    m["content"] = ""
            body = json.dumps(data).encode()
        except (ValueError, AttributeError, TypeError):
            pass  # not ours to judge: the server answers it
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await app({**scope, "headers": headers}, replay, send)

    return wrapped


def exit_with_parent() -> None:
    """End this server when the process that started it is gone (killed without its cleanup),
    so no model server outlives its run."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def main() -> None:
    import llama_cpp.server.__main__ as server_main

    exit_with_parent()

    create_app = server_main.create_app
    server_main.create_app = lambda **kw: null_content_to_text(create_app(**kw))  # type: ignore[assignment]
    server_main.main()


if __name__ == "__main__":
    main()
