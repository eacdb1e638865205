"""Replay throughput and orchestration CPU against a loopback endpoint of fixed capacity.

The endpoint is tests/faulty_server.py in its own process, answering every request after
`--delay-ms` (200) without a tool call and admitting at most `--inflight` (32) requests at once;
requests beyond that wait in the server's queue (none is rejected). Its capacity is therefore
inflight / delay = 160 calls/s. Over the same turns, in the same run, it measures:

    engine       tasks.replay.replay_sample (the real replay: cache off, tool simulator built per
                 turn, trajectories frame), endpoint concurrency = inflight
    floor        one plain asyncio.gather over AsyncOpenAI.chat.completions.create with a
                 semaphore of inflight (the floor any engine must be compared to)
    floor_post   the same loop over client.post (no SDK param transform), for reference

For each: calls/s, share of the endpoint's limit, and the client process's CPU time per call
(time.process_time of this process only; the server's CPU is in another process). Prints a
JSON summary. Run from the repository root:

    python benchmarks/replay_bench.py [--turns 5000] [--delay-ms 200] [--inflight 32] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests.faulty_server is the loopback endpoint

import httpx  # noqa: E402
import polars as pl  # noqa: E402
from openai import AsyncOpenAI  # noqa: E402

from tasks.config import Endpoint, ReplayCfg  # noqa: E402
from tasks.records import conversations_frame  # noqa: E402
from tasks.replay import replay_sample  # noqa: E402
from tasks.sample import build_turns  # noqa: E402
from tasks.synthetic.logs import generate  # noqa: E402
from tests.faulty_server import start_server  # noqa: E402

TARGET_SHARE, TARGET_CPU_MS = 0.90, 3.0


def workload(n_turns: int, seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(conversations, turns): SYNTHETIC production conversations, n_turns of their turns."""
    rows: list[dict[str, Any]] = []
    turns = 0
    for conv in generate(10**9, "synthetic-agent-v1", seed):
        conv.pop("_truth")
        rows.append(conv)
        turns += sum(m["role"] == "user" for m in conv["messages"])
        if turns >= n_turns:
            break
    convs = conversations_frame(rows)
    return convs, build_turns(convs).head(n_turns)


def measure(run: Callable[[], Awaitable[int]], profile: str | None = None) -> dict[str, Any]:
    """Wall time, process CPU and calls of one asyncio run."""
    prof = cProfile.Profile() if profile else None
    cpu0, t0 = time.process_time(), time.perf_counter()
    if prof:
        prof.enable()
    calls = asyncio.run(run())
    if prof:
        prof.disable()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    out: dict[str, Any] = {"calls": calls, "wall_s": round(wall, 2), "calls_per_s": round(calls / wall, 1),
                           "cpu_s": round(cpu, 2), "cpu_ms_per_call": round(1000 * cpu / max(calls, 1), 3)}
    if prof:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats(profile).print_stats(40)
        out["profile_top"] = buf.getvalue()
    return out


def engine(url: str, model: str, inflight: int, convs: pl.DataFrame, turns: pl.DataFrame,
           stats: dict[str, Any]) -> Callable[[], Awaitable[int]]:
    endpoint = Endpoint(base_url=url, model=model, concurrency=inflight, timeout_s=60)

    async def run() -> int:
        traj, _ = await replay_sample(turns, convs, endpoint, ReplayCfg(), 0, stats=stats)
        stats["finish"] = dict(traj.group_by("finish").len().iter_rows())
        lat = stats["calls"]["latency_s"]
        stats["latency_ms"] = {q: round(1000 * float(lat.quantile(p)), 1)
                               for q, p in (("p50", 0.5), ("p95", 0.95), ("max", 1.0))}
        return int(stats["model_calls"])

    return run


def floor(url: str, model: str, inflight: int, convs: pl.DataFrame, turns: pl.DataFrame,
          use_post: bool) -> Callable[[], Awaitable[int]]:
    by_id = {r["conversation_id"]: r for r in convs.select("conversation_id", "messages", "tools").iter_rows(named=True)}
    todo = list(turns.select("conversation_id", "user_msg_index").iter_rows())

    async def run() -> int:
        client = AsyncOpenAI(base_url=url, api_key="unused", timeout=60, max_retries=0)
        sem = asyncio.Semaphore(inflight)

        async def one(cid: str, u: int) -> str:
            async with sem:
                conv = by_id[cid]
                messages, tools = json.loads(conv["messages"])[: u + 1], json.loads(conv["tools"])
                if use_post:
                    resp = await client.post("/chat/completions", cast_to=httpx.Response, body={
                        "model": model, "messages": messages, "tools": tools, "temperature": 0.0,
                        "seed": 0, "max_tokens": 1024})
                    return str(resp.json()["choices"][0]["message"]["content"])
                r = await client.chat.completions.create(model=model, messages=messages, tools=tools,
                                                         temperature=0.0, seed=0, max_tokens=1024)
                return r.choices[0].message.content or ""

        try:
            answers = await asyncio.gather(*(one(c, u) for c, u in todo))
        finally:
            await client.close()
        return len(answers)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=5000)
    parser.add_argument("--delay-ms", type=int, default=200)
    parser.add_argument("--inflight", type=int, default=32)
    parser.add_argument("--only", default="engine,floor,floor_post", help="comma-separated runs")
    parser.add_argument("--profile", choices=["tottime", "cumulative"], default=None,
                        help="cProfile the engine run; top 40 functions by this key to stderr")
    args = parser.parse_args()

    load_before = round(os.getloadavg()[0], 2)  # other work on the machine skews throughput
    limit = args.inflight / (args.delay_ms / 1000)
    convs, turns = workload(args.turns)
    prefix_kb = turns["prefix_len"].mean()
    server = start_server(max_inflight=args.inflight)
    runs: dict[str, Any] = {}
    try:
        for name in args.only.split(","):
            model = f"ok@{args.delay_ms}#{name}"
            stats: dict[str, Any] = {}
            if name == "engine":
                run = engine(server.url, model, args.inflight, convs, turns, stats)
            else:
                run = floor(server.url, model, args.inflight, convs, turns, use_post=name == "floor_post")
            res = measure(run, profile=args.profile if name == "engine" else None)
            if "profile_top" in res:
                print(res.pop("profile_top"), file=sys.stderr)
            res["share_of_limit"] = round(res["calls_per_s"] / limit, 3)
            res["server_requests"] = server.requests(model)
            if name == "engine":
                res.update(retries=stats["retries"], cache_hits=stats["cache_hits"], finish=stats["finish"],
                           latency_ms=stats["latency_ms"])
            runs[name] = res
        in_flight_max = server.stats()["in_flight_max"]
    finally:
        server.stop()

    summary: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "load_avg_1m_before": load_before,
                    "load_avg_1m_after": round(os.getloadavg()[0], 2)},
        "endpoint": {"delay_ms": args.delay_ms, "max_inflight": args.inflight, "beyond_limit": "queued",
                     "limit_calls_per_s": limit, "in_flight_max_seen": in_flight_max},
        "turns": turns.height, "mean_prefix_messages": round(float(prefix_kb or 0), 1), "runs": runs,
    }
    if "engine" in runs:
        eng = runs["engine"]
        summary["targets"] = {"share_of_limit_min": TARGET_SHARE, "cpu_ms_per_call_max": TARGET_CPU_MS,
                              "met": eng["share_of_limit"] >= TARGET_SHARE and eng["cpu_ms_per_call"] <= TARGET_CPU_MS}
        for ref in ("floor", "floor_post"):
            if ref in runs:
                summary[f"engine_vs_{ref}"] = {
                    "throughput_ratio": round(eng["calls_per_s"] / runs[ref]["calls_per_s"], 3),
                    "cpu_per_call_ratio": round(eng["cpu_ms_per_call"] / max(runs[ref]["cpu_ms_per_call"], 1e-9), 3)}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
