"""Turns and the stratified sample (DESIGN §1–2).

A turn is the assistant's whole response to one user message. The population is every turn
of the valid conversations; the sample is stratified with explicit per-stratum sizes, and every
sampled turn carries its inclusion probability and weight (Horvitz–Thompson).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from datetime import datetime
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


PREFIX_BUCKETS: tuple[tuple[int, str], ...] = ((2, "1-2"), (6, "3-6"), (20, "7-20"), (50, "21-50"))
_DIGITS = re.compile(r"\d{4,}")


def prefix_bucket(prefix_len: int) -> str:
    for upper, label in PREFIX_BUCKETS:
        if prefix_len <= upper:
            return label
    return "51+"


def prefix_bucket_expr() -> pl.Expr:
    """prefix_bucket() of the prefix_len column, as a Polars expression."""
    expr = pl.lit("51+")
    for upper, label in reversed(PREFIX_BUCKETS):
        expr = pl.when(pl.col("prefix_len") <= upper).then(pl.lit(label)).otherwise(expr)
    return expr


def prefix_hash(messages: list[dict[str, Any]]) -> str:
    """Normalised content hash of a prefix: case, whitespace and long digit runs (ids) ignored."""
    h = hashlib.sha1()
    for m in messages:
        content = m.get("content")
        text = content if isinstance(content, str) else json.dumps(content, sort_keys=True)
        calls = json.dumps(m.get("tool_calls") or [], sort_keys=True)
        h.update(f"{m.get('role')}\x1f{text}\x1f{calls}\x1e".encode("utf-8", "replace"))
    return h.hexdigest()[:16]


def _normalised(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        content = m.get("content")
        text = content if isinstance(content, str) else json.dumps(content, sort_keys=True)
        out.append({"role": m.get("role"), "content": _DIGITS.sub("#", " ".join(text.lower().split())),
                    "tool_calls": [((c.get("function") or {}).get("name"), (c.get("function") or {}).get("arguments"))
                                   for c in m.get("tool_calls") or [] if isinstance(c, dict)]})
    return out


def build_turns(conversations: pl.DataFrame) -> pl.DataFrame:
    """Explode valid conversations into the turn population.

    Columns: TURN_SCHEMA plus has_response, created_at, prefix_bucket and prefix_hash (the
    normalised content hash used to collapse near-duplicate prefixes).
    """
    rows: list[dict[str, Any]] = []
    cols = ["conversation_id", "model", "surface", "task_type", "language", "messages"]
    frame = conversations
    if "created_at" not in frame.columns:
        frame = frame.with_columns(created_at=pl.lit(None, dtype=pl.Datetime("us", "UTC")))
    elif frame.schema["created_at"] == pl.String:
        frame = frame.with_columns(pl.col("created_at").str.to_datetime(time_zone="UTC", strict=False))
    for conv in frame.select([*cols, "created_at"]).iter_rows(named=True):
        messages = json.loads(conv["messages"])
        for k, (u, end, uses_tools, has_response) in enumerate(turns_of(messages)):
            rows.append({
                "turn_id": f"{conv['conversation_id']}#{k}", "conversation_id": conv["conversation_id"],
                "turn_index": k, "user_msg_index": u, "end_msg_index": end, "prefix_len": u + 1,
                "uses_tools": uses_tools, "model": conv["model"], "surface": conv["surface"],
                "task_type": conv["task_type"], "language": conv["language"],
                "has_response": has_response, "created_at": conv.get("created_at"),
                "prefix_bucket": prefix_bucket(u + 1),
                "prefix_hash": prefix_hash(_normalised(messages[: u + 1])),
            })
    return pl.DataFrame(rows, schema={**TURN_SCHEMA, "has_response": pl.Boolean,
                                      "created_at": pl.Datetime("us", "UTC"), "prefix_bucket": pl.String,
                                      "prefix_hash": pl.String})


def filter_turns(turns: pl.DataFrame, models: list[str] | None = None, created_after: datetime | None = None,
                 created_before: datetime | None = None, surfaces: list[str] | None = None,
                 task_types: list[str] | None = None, languages: list[str] | None = None,
                 min_prefix_len: int | None = None, max_prefix_len: int | None = None) -> pl.DataFrame:
    """The population after filters; raises SampleError when nothing is left."""
    conds: list[pl.Expr] = []
    for col, values in (("model", models), ("surface", surfaces), ("task_type", task_types), ("language", languages)):
        if values:
            conds.append(pl.col(col).is_in(values))
    if created_after is not None:
        conds.append(pl.col("created_at") >= created_after)
    if created_before is not None:
        conds.append(pl.col("created_at") < created_before)
    if min_prefix_len is not None:
        conds.append(pl.col("prefix_len") >= min_prefix_len)
    if max_prefix_len is not None:
        conds.append(pl.col("prefix_len") <= max_prefix_len)
    out = turns.filter(pl.all_horizontal(conds)) if conds else turns
    if out.height == 0:
        raise SampleError(f"the turn population is empty after filters ({turns.height} turns before filtering)")
    return out


def unit_hash(seed: int) -> pl.Expr:
    """Seeded hash of a turn's identity (conversation_id, turn_index): the draw's sort key.

    It depends on nothing but the turn itself, so the same seed draws the same turns in any
    row order, chunking or reader (tasks/scan.py or build_turns).
    """
    return pl.struct(pl.col("conversation_id").cast(pl.String), pl.col("turn_index").cast(pl.Int64)).hash(seed)


def collapse_duplicates(turns: pl.DataFrame) -> pl.DataFrame:
    """One turn per near-duplicate prefix (the first by conversation and turn), with dup_count = group size."""
    return (turns.sort("conversation_id", "turn_index")
            .with_columns(dup_count=pl.len().over("prefix_hash"))
            .unique("prefix_hash", keep="first", maintain_order=True))


def _shares(sizes: dict[str, int], allocation: str, priors: dict[str, float] | None,
            oversample: dict[str, float] | None) -> dict[str, float]:
    """Relative allocation weight of each stratum."""
    if allocation == "proportional":
        share = {h: float(N) for h, N in sizes.items()}
    elif allocation == "equal":
        share = {h: 1.0 for h in sizes}
    elif allocation == "neyman":
        if not priors:
            raise SampleError("neyman allocation needs prior per-stratum rates (sample.prior)")
        # Unknown or extreme priors are clipped so no stratum is starved (its rate may be wrong).
        fallback = sum(priors.values()) / len(priors)
        share = {}
        for h, N in sizes.items():
            p = min(max(priors.get(h, fallback), 0.005), 0.5)
            share[h] = N * math.sqrt(p * (1 - p))
    else:
        raise SampleError(f"unknown allocation {allocation!r} (proportional, equal, neyman)")
    for h, factor in (oversample or {}).items():
        if h in share:
            share[h] *= factor
    return share


def _allocate(sizes: dict[str, int], n: int, allocation: str, priors: dict[str, float] | None = None,
              oversample: dict[str, float] | None = None) -> dict[str, int]:
    """Per-stratum sample sizes summing to min(n, N), capped at each stratum's size.

    Strata that would get more than they hold are taken whole and the rest is shared out again;
    every stratum gets at least one turn when n allows, so the weights cover the population.
    """
    total = sum(sizes.values())
    n = min(n, total)
    share = _shares(sizes, allocation, priors, oversample)
    raw: dict[str, float] = {}
    free = dict(share)
    budget = float(n)
    while free:
        tot = sum(free.values()) or 1.0
        over = {h for h in free if budget * free[h] / tot >= sizes[h]}
        if not over:
            raw.update({h: budget * free[h] / tot for h in free})
            break
        for h in over:
            raw[h] = float(sizes[h])
            budget -= sizes[h]
            del free[h]
    alloc = {h: min(sizes[h], math.floor(raw.get(h, 0.0))) for h in sizes}
    if n >= len(sizes):  # every stratum gets a turn, so weights cover the whole population
        for h in alloc:
            alloc[h] = max(alloc[h], 1)
        while sum(alloc.values()) > n:
            big = max((h for h in alloc if alloc[h] > 1), key=lambda h: (alloc[h] - raw.get(h, 0.0), alloc[h], h))
            alloc[big] -= 1
    # Largest remainder, then hand leftovers to strata with room.
    order = sorted(sizes, key=lambda h: (-(raw.get(h, 0.0) - math.floor(raw.get(h, 0.0))), h))
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


def _matching_strata(strata_cols: list[str], keys: list[str], rules: dict[str, float]) -> dict[str, float]:
    """Oversampling factors per stratum key from rules such as {"task_type=devops": 3}."""
    out: dict[str, float] = {}
    for rule, factor in rules.items():
        conds = [c.split("=", 1) for c in rule.split("&")]
        bad = [c[0] for c in conds if len(c) != 2 or c[0].strip() not in strata_cols]
        if bad:
            raise SampleError(f"sample.oversample rule {rule!r}: {', '.join(bad)} is not a stratum column "
                              f"(strata: {', '.join(strata_cols)})")
        if factor <= 0:
            raise SampleError(f"sample.oversample rule {rule!r}: factor must be > 0")
        for key in keys:
            values = dict(zip(strata_cols, key.split("|"), strict=False))
            if all(values.get(c.strip()) == v.strip() for c, v in conds):
                out[key] = out.get(key, 1.0) * factor
    return out


def sample_turns(turns: pl.DataFrame, n: int, strata: list[str], seed: int,
                 allocation: str = "proportional", turn_choice: str = "all",
                 turns_per_conversation: int = 1, priors: dict[str, float] | None = None,
                 oversample: dict[str, float] | None = None,
                 dedupe: bool = False) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Stratified sample of n turns. Returns (sample with weights, per-stratum table).

    Args:
        turns: the population (build_turns, after filter_turns).
        n: sample size (all turns when n exceeds the population).
        strata: stratum columns; [] for a simple random sample.
        seed: explicit integer seed; the same inputs and seed give the same sample in any row order.
        allocation: proportional | equal | neyman (needs `priors`: stratum key → prior rate).
        turn_choice: all turns, the last turn, or `turns_per_conversation` random turns per conversation.
        oversample: {"column=value[&column=value]": factor} multiplies those strata's allocation.
        dedupe: collapse near-duplicate prefixes (same normalised content hash) into one unit whose
            weight carries the group size.

    Raises:
        SampleError: unknown stratum column, empty population, bad seed or allocation.
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
            _h=unit_hash(seed + 1),
            _nt=pl.len().over("conversation_id"),
        ).filter(pl.col("_h").rank("ordinal").over("conversation_id") <= k)
        within_prob = pl.min_horizontal(pl.lit(float(k)), pl.col("_nt").cast(pl.Float64)) / pl.col("_nt")
    elif turn_choice != "all":
        raise SampleError(f"unknown turn choice {turn_choice!r} (all, last, random)")
    if dedupe:
        if "prefix_hash" not in frame.columns:
            raise SampleError("dedupe needs the prefix_hash column (build_turns adds it)")
        frame = collapse_duplicates(frame)
    # Strata are found by grouping on their columns; the key text is built per stratum, not per
    # turn, and no per-turn column is added to the population (10M turns: seconds and GBs saved).
    units = pl.col("dup_count").sum() if dedupe else pl.len()
    # Streaming engine: grouping 10M turns in memory would cost ~1 GB of row keys.
    groups = (frame.lazy().group_by(strata).agg(N_h=pl.len(), turns=units.cast(pl.Int64)) if strata
              else frame.lazy().select(N_h=pl.len(), turns=units.cast(pl.Int64))).collect(engine="streaming")
    groups = groups.with_columns(_g=_group_hash(strata), stratum=stratum_key(strata))
    if groups["_g"].n_unique() != groups.height:
        raise SampleError("stratum hash collision; use fewer or different stratum columns")  # ~1e-17 odds
    sizes = dict(groups.select("stratum", "N_h").iter_rows())
    factors = _matching_strata(strata, list(sizes), oversample) if oversample else None
    alloc = _allocate(sizes, n, allocation, priors, factors)
    short = [h for h in sizes if alloc[h] == sizes[h] and allocation != "proportional"]
    if short and n < sum(sizes.values()):
        warnings.warn(f"{len(short)} stratum/strata smaller than their allocation; all their turns taken",
                      stacklevel=2)
    alloc_df = groups.select("_g", "stratum", "N_h", "turns").with_columns(
        n_h=pl.col("stratum").replace_strict(alloc, return_dtype=pl.Int64), N_h=pl.col("N_h").cast(pl.Int64))
    within = within_prob.alias("_within")
    dup = pl.col("dup_count") if dedupe else pl.lit(1, dtype=pl.UInt32).alias("dup_count")
    sample = _draw(frame, alloc_df, seed, strata, [within, dup])
    if "turn_id" not in sample.columns:  # the lazy scan leaves turn ids to the few sampled turns
        sample = sample.select(pl.format("{}#{}", "conversation_id", "turn_index").alias("turn_id"), pl.all())
    sample = sample.sort("turn_id").with_columns(pl.col(pl.Categorical).cast(pl.String))
    alloc_df = alloc_df.drop("_g")
    table = (alloc_df.rename({"N_h": "population_units", "n_h": "sampled"})
             .with_columns(population=pl.col("turns"))
             .select("stratum", "sampled", "population", *(["population_units"] if dedupe else []))
             .sort("stratum"))
    return sample, table


def stratum_key(strata: list[str]) -> pl.Expr:
    """The stratum's name: its column values joined by "|" (null as ∅), "all" without strata."""
    if not strata:
        return pl.lit("all")
    return pl.concat_str([pl.col(c).cast(pl.String).fill_null("∅") for c in strata], separator="|")


def _group_hash(strata: list[str]) -> pl.Expr:
    return pl.struct(strata).hash(0) if strata else pl.lit(0, dtype=pl.UInt64)


def _draw(frame: pl.DataFrame, alloc: pl.DataFrame, seed: int, strata: list[str],
          unit_cols: list[pl.Expr]) -> pl.DataFrame:
    """In each stratum, the n_h units with the smallest seeded hash, with inclusion probability and weight.

    Only units whose hash falls in a generous lower band of their stratum are kept for ranking
    (a few times n_h of them); a stratum whose band holds fewer than n_h units is ranked whole,
    so the result is exactly the n_h smallest. `unit_cols` (_within, dup_count) are computed
    for those candidates only.

    Weight = dup_count × (stratum turns / sampled dup_counts) / within-conversation probability:
    Horvitz–Thompson when every unit is one turn, calibrated to the stratum's known turn count
    when near-duplicates were collapsed, so weights always sum to the population.
    """
    top = float(2**64 - 1)
    band = alloc.with_columns(
        _thr=pl.when(pl.col("n_h") * 4 + 256 >= pl.col("N_h")).then(pl.lit(top))
        .otherwise((pl.col("n_h") * 4 + 256) / pl.col("N_h") * top))
    thr = dict(band.select("_g", "_thr").iter_rows())
    group = _group_hash(strata)
    in_band = unit_hash(seed).cast(pl.Float64) <= group.replace_strict(thr, return_dtype=pl.Float64)
    cand = frame.lazy().filter(in_band).with_columns(_g=group).collect(engine="streaming")
    got = dict(cand.group_by("_g").len().iter_rows())
    short = [g for g, n_h in alloc.select("_g", "n_h").iter_rows() if got.get(g, 0) < n_h]
    if short:  # the band held too few: rank those strata whole
        cand = pl.concat([cand.filter(~pl.col("_g").is_in(short)),
                          frame.filter(group.is_in(short)).with_columns(_g=group)])
    cand = cand.with_columns(*unit_cols, _k=unit_hash(seed)).join(band.drop("_thr"), on="_g")
    picked = (cand.with_columns(_r=pl.col("_k").rank("ordinal").over("_g"))
              .filter(pl.col("_r") <= pl.col("n_h"))
              .with_columns(inclusion_prob=(pl.col("n_h") / pl.col("N_h")) * pl.col("_within"))
              .with_columns(weight=pl.col("dup_count").cast(pl.Float64) * pl.col("turns")
                            / pl.col("dup_count").cast(pl.Float64).sum().over("_g") / pl.col("_within")))
    return picked.drop([c for c in picked.columns if c.startswith("_") or c in ("n_h", "N_h", "turns")])


def representativeness(table: pl.DataFrame, sample: pl.DataFrame) -> dict[str, Any]:
    """Stratum mix of the sample against the population: shares, PSI, chi-square, empty strata.

    The unweighted mix differs from the population by design under equal/Neyman allocation or
    oversampling; the weighted mix should match it (weights undo the design).
    """
    weighted = dict(sample.group_by("stratum").agg(pl.col("weight").sum()).iter_rows())
    pop_total = float(table["population"].sum())
    n = float(table["sampled"].sum())
    w_total = float(sum(weighted.values())) or 1.0
    rows, psi, chi2 = [], 0.0, 0.0
    for r in table.iter_rows(named=True):
        p = r["population"] / pop_total
        q = r["sampled"] / n if n else 0.0
        wq = weighted.get(r["stratum"], 0.0) / w_total
        eps = 1e-6
        psi += (max(q, eps) - max(p, eps)) * math.log(max(q, eps) / max(p, eps))
        expected = n * p
        if expected > 0:
            chi2 += (r["sampled"] - expected) ** 2 / expected
        rows.append({**r, "population_share": p, "sample_share": q, "weighted_share": wq})
    dof = max(len(rows) - 1, 1)
    try:
        from scipy.stats import chi2 as chi2_dist

        p_value = float(chi2_dist.sf(chi2, dof))
    except ImportError:  # scipy is optional here
        p_value = float("nan")
    return {"strata": rows, "psi": psi, "chi_square": chi2, "chi_square_dof": dof, "chi_square_p": p_value,
            "empty_strata": [r["stratum"] for r in rows if r["sampled"] == 0],
            "weighted_max_abs_share_diff": max((abs(r["weighted_share"] - r["population_share"]) for r in rows), default=0.0)}
