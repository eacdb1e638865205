"""Adaptive stopping (DESIGN §1, gate): replay the sample in K looks and stop at the first look
where the release gate is decided — every category PASSes, or one FAILs — or when the budget
(the whole sample) is spent, with INCONCLUSIVE remaining the answer then. Categories still
undecided at a FAIL are reported as such.

The statistics stay valid under that stopping rule by **Bonferroni alpha spending**: each of the
K planned looks spends α/K, so every interval at every look is a 1 − α/K interval (z for
α/(2K) in each tail). By the union bound the chance that any interval at any look misses its
truth is at most α, so whichever look the run stops at, its reported intervals cover with at
least 1 − α = 95%; the price is wider intervals per look (z 2.24 for K=2, 2.39 for K=3, 2.50
for K=4 against 1.96). With K=1 (the default) nothing changes: one look at the whole sample.

Looks are nested sub-samples that keep the stratified design: the sample is put in *look
order*, each stratum's turns spread evenly over it (a turn's place is its seeded random rank
within its stratum, as a fraction of the stratum's sampled turns), so any prefix holds each
stratum in about its sampled share. A look uses a prefix whose length is a multiple of
`replay.chunk_size` (the replay's unit of work), with each stratum's weights scaled so they
still sum to the stratum's population.
"""

from __future__ import annotations

import hashlib
from statistics import NormalDist

import polars as pl

ALPHA = 0.05


def look_z(looks: int, alpha: float = ALPHA) -> float:
    """The two-sided normal quantile each look's intervals use: 1 − α/K coverage per look."""
    return NormalDist().inv_cdf(1 - alpha / (2 * max(1, looks)))


def look_sizes(n: int, looks: int, chunk: int) -> list[int]:
    """Cumulative turns at each look: K evenly spaced prefixes rounded up to whole chunks (so
    fewer looks when the sample has fewer chunks than K); the last is the whole sample."""
    if looks <= 1 or n <= chunk:
        return [n]
    sizes = sorted({min(n, -(-(k * n // looks) // chunk) * chunk) for k in range(1, looks + 1)})
    return [s for s in sizes if s > 0]


def _rank_key(seed: int, turn_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}|{turn_id}".encode(), digest_size=8).digest(), "big")


def look_order(sample: pl.DataFrame, seed: int) -> pl.DataFrame:
    """The sample reordered so that every prefix holds each stratum in about its sampled share."""
    keyed = sample.with_columns(_key=pl.col("turn_id").map_elements(lambda t: _rank_key(seed, t), return_dtype=pl.UInt64))
    keyed = keyed.with_columns(
        _pos=((pl.col("_key").rank("ordinal").over("stratum") - 0.5) / pl.len().over("stratum")))
    return keyed.sort("_pos", "_key").drop("_key", "_pos")


def at_look(sample: pl.DataFrame, n: int) -> pl.DataFrame:
    """The first n turns of a look-ordered sample, weights scaled within each stratum so they
    sum to what the whole sample's weights sum to there (the stratum's population)."""
    totals = sample.group_by("stratum").agg(_total=pl.col("weight").sum())
    head = sample.head(n)
    return (head.join(totals, on="stratum", how="left")
            .with_columns(weight=pl.col("weight") * pl.col("_total") / pl.col("weight").sum().over("stratum"))
            .drop("_total"))


def undecided(gated: pl.DataFrame) -> list[str]:
    """The categories whose gate is still INCONCLUSIVE."""
    return gated.filter(pl.col("gate") == "INCONCLUSIVE")["category"].to_list()


__all__ = ["ALPHA", "at_look", "look_order", "look_sizes", "look_z", "undecided"]
