"""SYNTHETIC production logs at scale: millions of turns as one Parquet file, in seconds.

The scripted generator (tasks/synthetic/logs.py) makes ~550 conversations/s, far too slow for a
10M-turn log. This writer generates a *pool* of conversations with it, then draws conversations
from the pool with a seeded RNG and gives each a new conversation_id and created_at (spread
evenly over the window, in time order, as production exports are). Content therefore repeats
across conversations drawn from the same pool entry: the log is for scale benchmarks of loading
and sampling, not for statistics (near-duplicate collapse will, correctly, fold the copies).

Messages are written as native nested Parquet (list of structs in the OpenAI chat shape), with
string fields dictionary-encoded, so the file is compact and a reader can project the fields it
needs (role, tool_calls) without touching message content. tools and labels are JSON text.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.synthetic.logs import generate

_STR = pa.dictionary(pa.int32(), pa.large_string())
CALL_TYPE = pa.struct([("id", pa.large_string()), ("type", _STR),
                       ("function", pa.struct([("name", _STR), ("arguments", _STR)]))])
MESSAGE_TYPE = pa.struct([("role", _STR), ("content", _STR), ("tool_calls", pa.large_list(CALL_TYPE)),
                          ("tool_call_id", pa.large_string()), ("name", _STR)])
SCHEMA = pa.schema([
    ("conversation_id", pa.large_string()), ("model", _STR), ("created_at", pa.timestamp("us", tz="UTC")),
    ("surface", _STR), ("task_type", _STR), ("language", _STR), ("tools", _STR),
    ("messages", pa.large_list(MESSAGE_TYPE)), ("labels", _STR),
])


def _message(m: dict[str, Any]) -> dict[str, Any]:
    content = m.get("content")
    return {"role": m.get("role"),
            "content": content if isinstance(content, str) or content is None else json.dumps(content),
            "tool_calls": m.get("tool_calls"), "tool_call_id": m.get("tool_call_id"), "name": m.get("name")}


def conversations_table(convs: list[dict[str, Any]]) -> pa.Table:
    """Contract-shaped conversations as an Arrow table (SCHEMA): nested messages, JSON-text tools and labels."""
    rows: dict[str, list[Any]] = {f.name: [] for f in SCHEMA}
    for conv in convs:
        for key in ("conversation_id", "model", "surface", "task_type", "language"):
            rows[key].append(conv.get(key))
        created = conv.get("created_at")
        rows["created_at"].append(datetime.fromisoformat(created.replace("Z", "+00:00")) if created else None)
        rows["tools"].append(json.dumps(conv.get("tools") or []))
        rows["labels"].append(json.dumps(conv.get("labels") or {}))
        rows["messages"].append([_message(m) for m in conv["messages"]])
    # Dictionary-encoded strings: compact files, and take() copies indices, not text.
    return pa.Table.from_pydict(rows).cast(SCHEMA)


def write_conversations_parquet(path: str | Path, convs: list[dict[str, Any]]) -> None:
    pq.write_table(conversations_table(convs), path, compression="zstd")


def _pool_table(n: int, model: str, seed: int) -> tuple[pa.Table, np.ndarray]:
    """The pool as an Arrow table (SCHEMA) and the number of turns (user messages) per entry."""
    convs = []
    for conv in generate(n, model, seed):
        conv.pop("_truth", None)
        convs.append(conv)
    turns = [sum(m.get("role") == "user" for m in c["messages"]) for c in convs]
    return conversations_table(convs), np.asarray(turns, dtype=np.int64)


def write_scaled_parquet(path: str | Path, turns: int, model: str = "synthetic-agent-v1", seed: int = 0,
                         pool: int = 2000, batch: int = 250_000, days: int = 30,
                         progress: Any = None) -> dict[str, Any]:
    """Write a SYNTHETIC log of exactly `turns` assistant turns (user messages) to Parquet.

    Returns {"out", "conversations", "turns", "pool", "bytes"}.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table, per_conv = _pool_table(min(pool, max(turns, 1)), model, seed)
    rng = np.random.default_rng(seed)
    # Draw pool entries until the turn count is reached; the last conversation is cut to fit
    # by choosing, among the pool, an entry with exactly the turns still missing.
    mean = float(per_conv.mean())
    picks: list[np.ndarray] = []
    total = 0
    while total < turns:
        draw = rng.integers(0, len(per_conv), size=max(1024, int((turns - total) / mean * 1.05)))
        cum = total + np.cumsum(per_conv[draw])
        keep = int(np.searchsorted(cum, turns, side="right"))
        picks.append(draw[:keep])
        total = int(cum[keep - 1]) if keep else total
        if keep < len(draw) and total < turns:
            short = turns - total
            exact = np.flatnonzero(per_conv == short)
            if len(exact) == 0:
                exact = np.flatnonzero(per_conv == per_conv.min())
            picks.append(np.asarray([exact[rng.integers(0, len(exact))]]))
            total += int(per_conv[picks[-1][0]])
    index = np.concatenate(picks) if picks else np.zeros(0, dtype=np.int64)
    n = len(index)
    start = int(datetime(2026, 10, 1, tzinfo=UTC).timestamp() * 1_000_000)
    step = days * 86400 * 1_000_000 // max(n, 1)
    tag = model.rsplit("-", 1)[-1]
    with pq.ParquetWriter(path, SCHEMA, compression="zstd", use_dictionary=True,
                          dictionary_pagesize_limit=64 << 20) as writer:
        for lo in range(0, n, batch):
            idx = index[lo:lo + batch]
            part = table.take(pa.array(idx))
            ids = pa.array([f"syn-{tag}-{seed}-x{i:09d}" for i in range(lo, lo + len(idx))], pa.large_string())
            created = pa.array(start + np.arange(lo, lo + len(idx), dtype=np.int64) * step,
                               pa.timestamp("us", tz="UTC"))
            part = part.set_column(0, "conversation_id", ids).set_column(2, "created_at", created)
            writer.write_table(part, row_group_size=batch)
            if progress:
                progress(min(lo + batch, n), n)
    return {"out": str(path), "conversations": n, "turns": int(per_conv[index].sum()) if n else 0,
            "pool": len(per_conv), "bytes": path.stat().st_size}
