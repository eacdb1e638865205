"""Estimate per-category rates with 95% intervals, the paired delta, and the gate (DESIGN §1).

Rates are weighted by inverse inclusion probability. The interval is Wilson's, computed on the
design-effective sample size: the variance of the weighted mean by Taylor linearisation over
conversations (clusters) within strata, turned into n_eff = p(1-p)/Var (Kish's n_eff when the
estimate is 0 or 1), capped at n when there are fewer than 10 positives (Korn & Graubard 1998).
A stratum with one sampled conversation is centred at the mean of all (lonely PSU "adjust"). With
equal weights and one turn per conversation this is exactly the plain Wilson interval. Unscored turns stay in the denominator of the bounds: the lower bound counts
them as negatives and the upper bound as positives, so missing verdicts widen the interval
instead of vanishing.

The paired delta candidate − baseline has Tango's score interval on the design-effective number
of pairs (`delta_interval`): valid for rare outcomes, where a Wald interval collapses to a point
when no pair is discordant.

Where a judge calibration exists, `corrected` adds Rogan–Gladen corrected rates whose interval
also carries the calibration's own uncertainty (method in tasks/judges/calibrate.py).
"""

from __future__ import annotations

import math
import zlib
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from tasks.taxonomy import ALL_CATEGORIES

if TYPE_CHECKING:
    from tasks.judges.calibrate import Calibration

Z = 1.959963984540054
# Below this many positive turns (discordant pairs for a delta) no design gain is credited.
FEW_POSITIVES = 10
VERDICT_ORDER = ("PASS", "INCONCLUSIVE", "FAIL")


def wilson(p: float, n: float, z: float = Z) -> tuple[float, float]:
    """Wilson score interval for a proportion p observed on (effective) size n."""
    if n <= 0:
        return 0.0, 1.0
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if p <= 0 else max(0.0, centre - half)  # exact at the extremes (no rounding drift)
    hi = 1.0 if p >= 1 else min(1.0, centre + half)
    return lo, hi


def _lin_var(values: np.ndarray, w: np.ndarray, strata: np.ndarray, clusters: np.ndarray) -> float:
    """Variance of the weighted mean of `values` (linearised, clusters within strata)."""
    W = w.sum()
    est = (w * values).sum() / W
    z = w * (values - est) / W
    frame = pl.DataFrame({"h": strata, "c": clusters, "z": z})
    # Sorted groups: the same inputs give bit-identical estimates (summation order is fixed).
    per = frame.sort("h", "c", maintain_order=True).group_by("h", "c", maintain_order=True).agg(pl.col("z").sum())
    # Plug-in (divisor n_h) between-cluster variance: for a simple random sample it is exactly
    # p(1-p)/n, the variance the Wilson interval assumes. A stratum with a single cluster has no
    # spread of its own to measure: its cluster is centred at the mean of all clusters instead
    # (R survey's lonely.psu = "adjust"); centring it at itself would give it no variance at all,
    # and a small sample over many strata (mostly singletons) a point interval.
    grand = float(per["z"].to_numpy().mean())
    stats = per.group_by("h", maintain_order=True).agg(
        ss=pl.when(pl.len() > 1).then((pl.col("z") - pl.col("z").mean()) ** 2).otherwise((pl.col("z") - grand) ** 2).sum())
    var = float(stats["ss"].sum())
    # Rounding residue of an exactly-zero variance is no evidence of precision.
    return var if var > 1e-12 * float((z * z).sum()) else 0.0


def rate_interval(y: np.ndarray, w: np.ndarray, strata: np.ndarray, clusters: np.ndarray,
                  z: float = Z) -> tuple[float, float, float, float]:
    """(rate, lower, upper, n_eff) for 0/1 outcomes y with weights w (z: the interval's normal quantile)."""
    n = len(y)
    if n == 0:
        return float("nan"), 0.0, 1.0, 0.0
    W = w.sum()
    p = float((w * y).sum() / W)
    kish = float(W * W / (w * w).sum())
    var = _lin_var(y.astype(float), w, strata, clusters)
    n_eff = p * (1 - p) / var if var > 0 and 0 < p < 1 else kish
    if int(np.count_nonzero(y)) < FEW_POSITIVES:
        # Korn & Graubard (1998): with few positives the linearised variance rests on them alone
        # and misses what the strata with no positive yet don't show (one positive of small
        # weight gives a point-narrow interval), so no design gain is credited: n_eff <= n.
        n_eff = min(n_eff, n)
    lo, hi = wilson(p, n_eff, z)
    return p, lo, hi, n_eff


def min_detectable_rate(w: np.ndarray, power: float = 0.95) -> float:
    """The smallest rate a sample with weights `w` detects: P(at least one positive) = `power`.

    On Kish's effective size n (weights only, not the outcomes): 1 − (1 − power)^(1/n), about 3/n
    at 95% (the rule of three). A category with no positive and a true rate below this may simply
    not have shown up yet; its Wilson upper bound at 0 is of the same size.
    """
    if len(w) == 0 or w.sum() <= 0:
        return 1.0
    kish = float(w.sum() ** 2 / (w * w).sum())
    return float(1.0 - (1.0 - power) ** (1.0 / kish))


def estimate(scores: pl.DataFrame, sample: pl.DataFrame, z: float = Z) -> pl.DataFrame:
    """Per side × category estimates (rate, bounds, counts, smallest detectable rate).

    The columns are ESTIMATE_SCHEMA's (tasks/records.py) plus `min_detectable_rate`
    (`min_detectable_rate` on the scored turns' weights).
    """
    design = sample.select("turn_id", "weight", "stratum", "conversation_id")
    joined = scores.join(design.drop("conversation_id"), on="turn_id", how="left").sort("side", "category", "turn_id")
    rows: list[dict[str, Any]] = []
    for (side, cat), grp in joined.group_by("side", "category", maintain_order=True):
        scored = grp.filter(pl.col("verdict").is_not_null())
        n_all = grp.height
        n_unscored = n_all - scored.height
        y = scored["verdict"].cast(pl.Int8).to_numpy()
        w = scored["weight"].to_numpy()
        p, lo, hi, n_eff = rate_interval(y, w, scored["stratum"].to_numpy(), scored["conversation_id"].to_numpy(), z)
        if n_unscored:
            # Missing verdicts widen the bounds (as negatives for the lower, positives for the upper).
            w_all = grp["weight"].to_numpy()
            y_lo = grp["verdict"].fill_null(False).cast(pl.Int8).to_numpy()
            y_hi = grp["verdict"].fill_null(True).cast(pl.Int8).to_numpy()
            lo = rate_interval(y_lo, w_all, grp["stratum"].to_numpy(), grp["conversation_id"].to_numpy(), z)[1]
            hi = rate_interval(y_hi, w_all, grp["stratum"].to_numpy(), grp["conversation_id"].to_numpy(), z)[2]
        rows.append({"category": cat, "side": side, "model": grp["model"][0], "n": n_all,
                     "n_unscored": n_unscored, "positives": int(y.sum()), "rate": p, "lower": lo,
                     "upper": hi, "n_eff": n_eff, "method": "wilson-design-neff", "unit": "assistant_turn",
                     "min_detectable_rate": min_detectable_rate(w)})
    order = {c: i for i, c in enumerate(ALL_CATEGORIES)}
    return pl.DataFrame(rows).sort(pl.col("category").replace_strict(order, default=99), "side")


def tango(b: np.ndarray, c: np.ndarray, n: np.ndarray, z: float = Z) -> tuple[np.ndarray, np.ndarray]:
    """Tango's score interval for a paired difference of proportions (vectorised).

    `b` counts pairs positive on the first side only, `c` on the second side only, `n` all pairs
    (effective counts may be fractional). The difference is (b - c) / n. The interval is the set of
    Δ where |(b - c - nΔ)| ≤ z·sqrt(n(2p̃ + Δ(1 - Δ))), p̃ the MLE of the second side's discordant
    share under the constraint p_b - p_c = Δ (Tango 1998, Statist. Med. 17:891). With no discordant
    pair it is [-z²/(n+z²), z²/(n+z²)], the Wilson bound at 0: it never collapses to a point.
    """
    b, c, n = (np.asarray(v, dtype=float) for v in (b, c, n))
    est = (b - c) / n

    def score(delta: np.ndarray) -> np.ndarray:
        qa = 2 * n
        qb = -b - c + (2 * n - b + c) * delta
        qc = -c * delta * (1 - delta)
        p01 = (-qb + np.sqrt(np.maximum(qb * qb - 4 * qa * qc, 0.0))) / (2 * qa)
        var = np.maximum(n * (2 * p01 + delta * (1 - delta)), 1e-300)
        return (b - c - n * delta) / np.sqrt(var)

    # The score falls with Δ: bisect for score = +z below the estimate and -z above it.
    lo_a, lo_b = np.full_like(est, -1.0), est.copy()
    hi_a, hi_b = est.copy(), np.full_like(est, 1.0)
    for _ in range(60):
        mid = (lo_a + lo_b) / 2
        above = score(mid) > z
        lo_a, lo_b = np.where(above, mid, lo_a), np.where(above, lo_b, mid)
        mid = (hi_a + hi_b) / 2
        below = score(mid) < -z
        hi_a, hi_b = np.where(below, hi_a, mid), np.where(below, mid, hi_b)
    lower = np.where(score(np.full_like(est, -1.0)) <= z, -1.0, lo_b)
    upper = np.where(score(np.full_like(est, 1.0)) >= -z, 1.0, hi_a)
    return np.minimum(lower, est), np.maximum(upper, est)


def delta_interval(yc: np.ndarray, yb: np.ndarray, w: np.ndarray, strata: np.ndarray,
                   clusters: np.ndarray, z: float = Z) -> tuple[float, float, float, float]:
    """(delta, lower, upper, n_eff) for paired 0/1 outcomes: candidate yc − baseline yb.

    Tango's score interval on the design-effective number of pairs, as the rates use Wilson's:
    the weighted discordant shares p10 (candidate only) and p01 (baseline only) give the estimate
    p10 − p01; the linearised variance V of the paired difference over conversations within
    strata gives n_eff = (p10 + p01 − Δ²)/V, the n for which a simple random sample of pairs
    would have that variance (Kish's n_eff when no pair is discordant). The score interval stays
    valid for rare outcomes, where Wald's collapses to a point.
    """
    if len(yc) == 0:
        return float("nan"), -1.0, 1.0, 0.0
    yc, yb = yc.astype(float), yb.astype(float)
    W = w.sum()
    p10 = float((w * (yc * (1 - yb))).sum() / W)
    p01 = float((w * (yb * (1 - yc))).sum() / W)
    est = p10 - p01
    kish = float(W * W / (w * w).sum())
    var = _lin_var(yc - yb, w, strata, clusters)
    spread = p10 + p01 - est * est
    n_eff = spread / var if var > 0 and spread > 0 else kish
    if int(np.count_nonzero(yc != yb)) < FEW_POSITIVES:  # few discordant pairs: capped as the rates
        n_eff = min(n_eff, len(yc))
    lo, hi = tango(np.array([p10 * n_eff]), np.array([p01 * n_eff]), np.array([n_eff]), z)
    return est, max(-1.0, float(lo[0])), min(1.0, float(hi[0])), n_eff


DELTA_SCHEMA: dict[str, Any] = {"category": pl.String, "n_paired": pl.Int64, "delta": pl.Float64,
                                "delta_lower": pl.Float64, "delta_upper": pl.Float64}


def paired_delta(scores: pl.DataFrame, sample: pl.DataFrame, z: float = Z) -> pl.DataFrame:
    """Candidate − baseline per category over the turns judged on both sides (paired design).

    The estimate and `n_paired` are over the pairs scored on both sides; the interval is Tango's
    score interval on the design-effective number of pairs (`delta_interval`). Unscored verdicts
    widen it as they widen the rates, never count either way: the lower bound is the lower bound
    with unscored candidate verdicts as negatives and unscored baseline verdicts as positives,
    the upper bound the reverse. Dropping them instead would bias the delta whenever what makes a
    verdict unscored is related to the outcome (a success claim after a test run whose outcome
    the simulator could not know).
    """
    design = sample.select("turn_id", "weight", "stratum", "conversation_id")
    c = scores.filter(pl.col("side") == "candidate").select("turn_id", "category", yc="verdict")
    b = scores.filter(pl.col("side") == "baseline").select("turn_id", "category", yb="verdict")
    pairs = c.join(b, on=["turn_id", "category"]).join(design, on="turn_id").sort("category", "turn_id")
    rows = []
    for (cat,), grp in pairs.group_by("category", maintain_order=True):
        def interval(g: pl.DataFrame, fill_c: bool | None = None, fill_b: bool | None = None) -> tuple[float, ...]:
            yc = g["yc"] if fill_c is None else g["yc"].fill_null(fill_c)
            yb = g["yb"] if fill_b is None else g["yb"].fill_null(fill_b)
            return delta_interval(yc.cast(pl.Int8).to_numpy(), yb.cast(pl.Int8).to_numpy(), g["weight"].to_numpy(),
                                  g["stratum"].to_numpy(), g["conversation_id"].to_numpy(), z)

        complete = grp.drop_nulls(["yc", "yb"])
        est, lo, hi, _ = interval(complete)
        if complete.height < grp.height:
            lo = min(lo, interval(grp, False, True)[1])
            hi = max(hi, interval(grp, True, False)[2])
        rows.append({"category": cat, "n_paired": complete.height, "delta": est, "delta_lower": lo, "delta_upper": hi})
    return pl.DataFrame(rows, schema=DELTA_SCHEMA)


def gate(estimates: pl.DataFrame, deltas: pl.DataFrame, gates: dict[str, Any]) -> pl.DataFrame:
    """PASS / FAIL / INCONCLUSIVE per category from interval bounds and conf thresholds."""
    cand = estimates.filter(pl.col("side") == "candidate")
    table = cand.join(deltas, on="category", how="left")
    default = gates.get("default", {})
    rows = []
    for r in table.iter_rows(named=True):
        g = {**default, **gates.get("categories", {}).get(r["category"], {})}
        max_rate, max_reg = float(g.get("max_rate", 1.0)), float(g.get("max_regression", 1.0))
        d_lo = r["delta_lower"] if r["delta_lower"] is not None else -1.0
        d_hi = r["delta_upper"] if r["delta_upper"] is not None else 1.0
        if r["lower"] > max_rate or d_lo > max_reg:
            verdict = "FAIL"
        elif r["upper"] <= max_rate and d_hi <= max_reg:
            verdict = "PASS"
        else:
            verdict = "INCONCLUSIVE"
        rows.append({**r, "max_rate": max_rate, "max_regression": max_reg, "gate": verdict})
    return pl.DataFrame(rows)


def overall(gated: pl.DataFrame) -> str:
    """Worst category verdict."""
    verdicts = set(gated["gate"].to_list())
    return next((v for v in reversed(VERDICT_ORDER) if v in verdicts), "PASS")


CORRECTED_SCHEMA: dict[str, Any] = {
    "category": pl.String, "side": pl.String, "model": pl.String,
    "raw_rate": pl.Float64, "raw_lower": pl.Float64, "raw_upper": pl.Float64,
    "corrected_rate": pl.Float64, "corrected_lower": pl.Float64, "corrected_upper": pl.Float64,
    "sensitivity": pl.Float64, "sensitivity_lower": pl.Float64, "sensitivity_upper": pl.Float64,
    "specificity": pl.Float64, "specificity_lower": pl.Float64, "specificity_upper": pl.Float64,
    "youden": pl.Float64, "calibration_n": pl.Int64, "unit": pl.String, "turns_per_unit": pl.Float64,
    "note": pl.String,
}


def _category_seed(seed: int, category: str) -> int:
    """One bootstrap seed per category, shared by both sides: their calibration draws are common."""
    return int(np.random.SeedSequence([seed, zlib.crc32(category.encode())]).generate_state(1)[0])


def corrected(estimates: pl.DataFrame, calibration: Calibration, seed: int,
              panel: list[str] | None = None) -> pl.DataFrame:
    """Rogan–Gladen corrected rates per side × category (tasks/judges/calibrate.py).

    Each raw rate is corrected with the calibration's "combined" entry for its category (the
    panel's combined verdicts, what the rates are built from; unsafe_any has its own entry), on
    the estimate's design-effective n. Unscored turns widen the corrected interval as they widen
    the raw one: the lower bound treats them as negatives, the upper as positives. A category the
    calibration lacks, or where the correction is not meaningful, gets a note and no number.

    Args:
        estimates: the output of `estimate`.
        calibration: a validated calibration file (`read_calibration`).
        seed: bootstrap seed (same inputs and seed, same intervals).
        panel: the run's enabled judge names; when given and different from the calibration's
            panel, nothing is corrected (the calibration measured other verdicts).
    """
    from tasks.judges.calibrate import corrected_rate

    mismatch = None
    if panel is not None and sorted(set(panel)) != sorted(set(calibration.panel)):
        mismatch = (f"calibration measured panel [{', '.join(calibration.panel)}], this run's panel is "
                    f"[{', '.join(panel)}]: not corrected")
    unit_note = None
    if calibration.unit == "conversation" and calibration.turns_per_unit > 1:
        unit_note = (f"sensitivity/specificity measured per conversation ({calibration.turns_per_unit:.2f} turns "
                     "each) applied to per-turn rates: typically corrects too far down")
    rows: list[dict[str, Any]] = []
    for r in estimates.iter_rows(named=True):
        cat = r["category"]
        raw = r["rate"] if r["rate"] is not None and math.isfinite(r["rate"]) else None
        row: dict[str, Any] = {"category": cat, "side": r["side"], "model": r.get("model"), "raw_rate": raw,
                               "raw_lower": r["lower"], "raw_upper": r["upper"], "unit": calibration.unit,
                               "turns_per_unit": calibration.turns_per_unit}
        m = calibration.metrics(cat)
        counts = calibration.counts(cat)
        notes: list[str] = []
        if m is None or counts is None:
            notes.append("no calibration for this category")
        else:
            row.update({k: m.get(k) for k in ("sensitivity", "sensitivity_lower", "sensitivity_upper",
                                              "specificity", "specificity_lower", "specificity_upper")})
            row["calibration_n"] = counts.n
        if mismatch:
            notes.append(mismatch)
        elif counts is not None:
            n, n_un = int(r.get("n") or 0), int(r.get("n_unscored") or 0)
            n_eff = float(r.get("n_eff") or 0.0)
            cat_seed = _category_seed(seed, cat)
            sens, spec = (counts.tp, counts.fn), (counts.tn, counts.fp)
            out = corrected_rate(raw if raw is not None else math.nan, n_eff, sens, spec, cat_seed)
            row["youden"] = out.get("youden")
            if out["note"]:
                notes.append(out["note"])
            if out["rate"] is not None:
                row.update(corrected_rate=out["rate"], corrected_lower=out["lower"], corrected_upper=out["upper"])
                if n_un and raw is not None:
                    # The unscored share as negatives (lower bound) and as positives (upper bound).
                    u = n_un / n
                    n_all = n_eff * n / (n - n_un)
                    lo = corrected_rate(raw * (1 - u), n_all, sens, spec, cat_seed)["lower"]
                    hi = corrected_rate(raw * (1 - u) + u, n_all, sens, spec, cat_seed)["upper"]
                    row["corrected_lower"] = min(v for v in (lo, out["lower"]) if v is not None)
                    row["corrected_upper"] = max(v for v in (hi, out["upper"]) if v is not None)
                    notes.append(f"{n_un} unscored turn(s) widen the interval")
                if unit_note:
                    notes.append(unit_note)
        row["note"] = "; ".join(notes) or None
        rows.append(row)
    return pl.DataFrame(rows, schema=CORRECTED_SCHEMA)
