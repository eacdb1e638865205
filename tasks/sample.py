"""Turns and the stratified sample (DESIGN §1–2).

A turn is the assistant's whole response to one user message. The population is every turn
of the valid conversations; the sample is stratified with explicit per-stratum sizes, and every
sampled turn carries its inclusion probability and weight (Horvitz–Thompson).
"""

from __future__ import annotations

import json
import math
import warnings
from typing import Any

import polars as pl

from tasks.records import TURN_SCHEMA


class SampleError(ValueError):
    """A sampling request the user can fix."""


def turns_of(messages: list[dict[str, Any]]) -> list[tuple[int, int, bool, bool]]:
    """(user index, end index, uses_tools, has_response) for each user message."""
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    out = []
    for k, u in enumerate(users):
        end = users[k + 1] if k + 1 < len(users) else len(messages)
        body = messages[u + 1:end]
        uses_tools = any(m.get("role") == "assistant" and m.get("tool_calls") for m in body)
        has_response = any(m.get("role") == "assistant" for m in body)
        out.append((u, end, uses_tools, has_response))
    return out


def build_turns(conversations: pl.DataFrame) -> pl.DataFrame:
    """Explode valid conversations into the turn population (TURN_SCHEMA + has_response)."""
    rows: list[dict[str, Any]] = []
    for conv in conversations.select(
        "conversation_id", "model", "surface", "task_type", "language", "messages"
    ).iter_rows(named=True):
        messages = json.loads(conv["messages"])
        for k, (u, end, uses_tools, has_response) in enumerate(turns_of(messages)):
            rows.append({
                "turn_id": f"{conv['conversation_id']}#{k}", "conversation_id": conv["conversation_id"],
                "turn_index": k, "user_msg_index": u, "end_msg_index": end, "prefix_len": u + 1,
                "uses_tools": uses_tools, "model": conv["model"], "surface": conv["surface"],
                "task_type": conv["task_type"], "language": conv["language"],
                "has_response": has_response,
            })
    return pl.DataFrame(rows, schema={**TURN_SCHEMA, "has_response": pl.Boolean})


def _allocate(sizes: dict[str, int], n: int, allocation: str) -> dict[str, int]:
    """Per-stratum sample sizes summing to min(n, N), capped at each stratum's size."""
    total = sum(sizes.values())
    n = min(n, total)
    if allocation == "proportional":
        raw = {h: n * N / total for h, N in sizes.items()}
    else:
        raw = {h: n / len(sizes) for h in sizes}
    alloc = {h: min(sizes[h], math.floor(v)) for h, v in raw.items()}
    if n >= len(sizes):  # every stratum gets a turn, so weights cover the whole population
        for h in alloc:
            alloc[h] = max(alloc[h], 1)
        while sum(alloc.values()) > n:
            big = max((h for h in alloc if alloc[h] > 1), key=lambda h: (alloc[h] - raw[h], alloc[h], h))
            alloc[big] -= 1
    # Largest remainder, then hand leftovers to strata with room (equal allocation overflow).
    order = sorted(sizes, key=lambda h: (-(raw[h] - math.floor(raw[h])), h))
    while sum(alloc.values()) < n:
        progressed = False
        for h in order:
            if sum(alloc.values()) >= n:
                break
            if alloc[h] < sizes[h]:
                alloc[h] += 1
                progressed = True
        if not progressed:
            break
    return alloc


def sample_turns(turns: pl.DataFrame, n: int, strata: list[str], seed: int,
                 allocation: str = "proportional", turn_choice: str = "all",
                 turns_per_conversation: int = 1) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Stratified sample of n turns. Returns (sample with weights, per-stratum table).

    Raises:
        SampleError: unknown stratum column, empty population, bad seed.
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise SampleError(f"seed must be an integer, got {seed!r}")
    unknown = [c for c in strata if c not in turns.columns]
    if unknown:
        raise SampleError(f"unknown stratum column(s): {', '.join(unknown)} (available: {', '.join(turns.columns)})")
    if turns.height == 0:
        raise SampleError("the turn population is empty after filters")
    frame = turns
    within_prob = pl.lit(1.0)
    if turn_choice == "last":
        frame = frame.filter(pl.col("turn_index") == pl.col("turn_index").max().over("conversation_id"))
    elif turn_choice == "random":
        k = turns_per_conversation
        frame = frame.with_columns(
            _h=pl.col("turn_id").hash(seed + 1),
            _nt=pl.len().over("conversation_id"),
        ).filter(pl.col("_h").rank("ordinal").over("conversation_id") <= k)
        within_prob = pl.min_horizontal(pl.lit(float(k)), pl.col("_nt").cast(pl.Float64)) / pl.col("_nt")
    key = pl.concat_str([pl.col(c).cast(pl.String).fill_null("∅") for c in strata], separator="|") if strata else pl.lit("all")
    frame = frame.with_columns(stratum=key, _within=within_prob)
    sizes = dict(frame.group_by("stratum").len().iter_rows())
    alloc = _allocate(sizes, n, allocation)
    short = [h for h in sizes if allocation == "equal" and alloc[h] == sizes[h] and sizes[h] < n / len(sizes)]
    if short:
        warnings.warn(f"{len(short)} stratum/strata smaller than their allocation; all their turns taken",
                      stacklevel=2)
    alloc_df = pl.DataFrame({"stratum": list(alloc), "n_h": list(alloc.values()),
                             "N_h": [sizes[h] for h in alloc]},
                            schema={"stratum": pl.String, "n_h": pl.Int64, "N_h": pl.Int64})
    sample = (
        frame.join(alloc_df, on="stratum")
        .with_columns(_r=pl.col("turn_id").hash(seed).rank("ordinal").over("stratum"))
        .filter(pl.col("_r") <= pl.col("n_h"))
        .with_columns(inclusion_prob=(pl.col("n_h") / pl.col("N_h")) * pl.col("_within"))
        .with_columns(weight=1.0 / pl.col("inclusion_prob"))
        .drop([c for c in ("_r", "_h", "_nt", "_within", "n_h", "N_h") if c in frame.columns or c in ("_r", "n_h", "N_h", "_within")])
        .sort("turn_id")
    )
    table = alloc_df.rename({"N_h": "population", "n_h": "sampled"}).sort("stratum")
    return sample, table
