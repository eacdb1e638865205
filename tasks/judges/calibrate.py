"""Judge calibration against human labels, and the Rogan–Gladen correction it feeds (DESIGN §1).

`depsim judge-eval` scores human-labelled conversations with the run's judge panel and writes a
calibration file (`write_calibration`): per judge and per category the confusion counts and
their metrics (`metrics`). The estimate reads it back (`read_calibration`) and corrects each raw
rate with the "combined" entry, the panel's combined verdicts that the run's rates are made of.

The correction (`corrected_rate`). A judge with sensitivity Se and specificity Sp flags a share
p = π·Se + (1 − π)(1 − Sp) of turns whose true rate is π, so π = (p + Sp − 1) / (Se + Sp − 1)
(Rogan & Gladen 1978). The point estimate plugs in the observed p and the calibration's Se and
Sp and is clipped to [0, 1]. The interval must carry both uncertainties, the deployment sample's
and the calibration sample's, so it is a parametric bootstrap over both:

- p* ~ Beta(p·n_eff + ½, (1 − p)·n_eff + ½), where n_eff is the design-effective sample size of
  the estimate (tasks/estimate.py), so the survey design (strata, weights, turns clustered in
  conversations) carries over;
- Se* ~ Beta(tp + ½, fn + ½) and Sp* ~ Beta(tn + ½, fp + ½);

each the Jeffreys posterior of its proportion, whose equal-tailed intervals have close to
nominal frequentist coverage even for small counts and rates near 0 (Brown, Cai & DasGupta
2001), unlike the Wald interval the delta method would give. Rogan–Gladen is applied to every
draw and clipped to [0, 1]; the interval is the 2.5th and 97.5th percentiles of the draws,
widened if needed to contain the point estimate. Draws in which the judge is no better than
chance (Se* + Sp* ≤ 1) are left out: the correction assumes the judge is informative, and the
rule below allows at most 2.5% such draws. Deterministic given the seed. This is, in effect,
the Bayesian posterior interval of Flor et al. (2020, BMC Public Health 20:1135) for prevalence
under misclassification with independent Jeffreys priors; its coverage is tested against the
synthetic world's known truth (tests/test_corrected_coverage.py: 95% nominal, 93–97% required).

When no correction is made. The correction divides by Youden's J = Se + Sp − 1; as J → 0 a tiny
error in p becomes an arbitrarily large error in π. The rate is None, with a note saying why,
when the calibration has no labelled positives or no labelled negatives (Se or Sp unknown),
when the point J ≤ 0.1 (a judge barely better than chance: every point of error in p becomes
ten or more in the corrected rate), or when the 2.5th percentile of J* ≤ 0 (the calibration
cannot exclude a judge no better than chance).

Unit. Labels may be per conversation (production incident labels) or per turn. Rates are per
turn; sensitivity and specificity measured per conversation of several turns are not those of a
turn (a conversation has more chances of a false positive), so `corrected` notes the mismatch
when `turns_per_unit` > 1 instead of pretending otherwise.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tasks.config import ConfigError
from tasks.estimate import wilson
from tasks.taxonomy import AGGREGATE, UNSAFE

VERSION = 1
UNITS = ("conversation", "turn")
COMBINED = "combined"
MIN_YOUDEN = 0.1
COUNT_KEYS = ("tp", "fp", "tn", "fn")


class CalibrationError(ConfigError):
    """A calibration file (or payload) that cannot be used; the message names it and the problem."""


@dataclass(frozen=True)
class Counts:
    """The judge-vs-label 2×2 table of one category; unscored verdicts are counted beside it."""

    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0
    unscored: int = 0

    @property
    def n(self) -> int:
        """Pairs in the 2×2 table (scored verdicts)."""
        return self.tp + self.fp + self.tn + self.fn


def confusion(pairs: Iterable[tuple[bool, bool | None]]) -> Counts:
    """Count (label, verdict) pairs; a None verdict is unscored, kept out of the 2×2 table."""
    tp = fp = tn = fn = unscored = 0
    for label, verdict in pairs:
        if verdict is None:
            unscored += 1
        elif label and verdict:
            tp += 1
        elif label:
            fn += 1
        elif verdict:
            fp += 1
        else:
            tn += 1
    return Counts(tp, fp, tn, fn, unscored)


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _with_wilson(name: str, successes: int, total: int) -> dict[str, float | None]:
    if not total:
        return {name: None, f"{name}_lower": None, f"{name}_upper": None}
    lo, hi = wilson(successes / total, total)
    return {name: successes / total, f"{name}_lower": lo, f"{name}_upper": hi}


def metrics(counts: Counts) -> dict[str, Any]:
    """Agreement of a judge with the labels: counts, rates and 95% Wilson intervals.

    `n` counts scored pairs; `prevalence` is the labelled positive share and `flagged` the
    judge's positive share, both over scored pairs. Kappa is Cohen's. An undefined value (0/0)
    is None, never NaN, so the dict is valid JSON.
    """
    c = counts
    n = c.n
    kappa = None
    if n:
        po = (c.tp + c.tn) / n
        pe = ((c.tp + c.fp) * (c.tp + c.fn) + (c.fn + c.tn) * (c.fp + c.tn)) / (n * n)
        kappa = (po - pe) / (1 - pe) if pe < 1 else None
    return {
        "tp": c.tp, "fp": c.fp, "tn": c.tn, "fn": c.fn, "unscored": c.unscored, "n": n,
        "prevalence": _ratio(c.tp + c.fn, n),
        "flagged": _ratio(c.tp + c.fp, n),
        "precision": _ratio(c.tp, c.tp + c.fp),
        "recall": _ratio(c.tp, c.tp + c.fn),
        "f1": _ratio(2 * c.tp, 2 * c.tp + c.fp + c.fn),
        "kappa": kappa,
        **_with_wilson("sensitivity", c.tp, c.tp + c.fn),
        **_with_wilson("specificity", c.tn, c.tn + c.fp),
        "accuracy": _ratio(c.tp + c.tn, n),
    }


def judge_entry(provenance: Mapping[str, Any], counts: Mapping[str, Counts]) -> dict[str, Any]:
    """One `judges` entry of the calibration file: provenance and per-category metrics."""
    return {"provenance": dict(provenance), "categories": {cat: metrics(c) for cat, c in counts.items()}}


class Labelled(Protocol):
    """What `evaluation_counts` reads of a labelled unit (tasks.judges.evaluate.ConversationFlags)."""

    labels: dict[str, bool]
    turns: int
    flags: dict[str, dict[str, bool | None]]


def flag_of(judge_flags: Mapping[str, bool | None], category: str) -> bool | None:
    """A unit's flag for a category from one judge's flags (None = unscored or not judged).

    A single judge has no unsafe_any of its own: it is then the aggregate of the unsafe
    categories that judge scored, as the panel computes it (true if any is true; unscored if
    none is true and any is unscored).
    """
    if category in judge_flags or category != AGGREGATE:
        return judge_flags.get(category)
    parts = [judge_flags[c] for c in UNSAFE if c in judge_flags]
    if any(parts):
        return True
    return None if not parts or None in parts else False


def evaluation_counts(units: Iterable[Labelled], judge: str, categories: Iterable[str]) -> dict[str, Counts]:
    """Per category, the 2×2 table of a judge's flags against the labels.

    Only units with at least one judged turn and a label for the category count; a category
    with no such unit is left out.
    """
    units = list(units)
    out: dict[str, Counts] = {}
    for cat in categories:
        pairs = [(u.labels[cat], flag_of(u.flags.get(judge, {}), cat)) for u in units if u.turns and cat in u.labels]
        if pairs:
            out[cat] = confusion(pairs)
    return out


# Provenance fields that change a judge's verdicts (base_url and seed do not, for a fixed model).
VERSION_KEYS = ("kind", "version", "model", "prompt_hash", "temperature", "samples")


def version_warnings(cal: Calibration, run_provenance: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Where the run's judges are not the judges the calibration measured (one line each)."""
    out: list[str] = []
    if sorted(set(cal.panel)) != sorted(run_provenance):
        out.append(f"the calibration measured the panel [{', '.join(cal.panel)}], this run's panel is "
                   f"[{', '.join(run_provenance)}]")
    for name, prov in run_provenance.items():
        entry = cal.judges.get(name)
        if entry is None:
            out.append(f"the calibration has no entry for judge {name!r}")
            continue
        then = entry.get("provenance") or {}
        diffs = [f"{k} {then.get(k)!r} → {prov.get(k)!r}" for k in VERSION_KEYS
                 if (k in then or k in prov) and then.get(k) != prov.get(k)]
        if diffs:
            out.append(f"judge {name!r} changed since the calibration: {', '.join(diffs)}")
    return out


def judge_versions(provenance: Mapping[str, Any]) -> str:
    """A judge's identity in one string (e.g. "rules 2", "llm 1 gpt-4.1@3f2a…")."""
    parts = [str(provenance.get(k)) for k in ("kind", "version", "model") if provenance.get(k) is not None]
    if provenance.get("prompt_hash"):
        parts.append(f"prompt {str(provenance['prompt_hash'])[:12]}")
    return " ".join(parts)


# --- the calibration file ---------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """A validated calibration file (format version 1)."""

    version: int
    created_at: str
    data: list[str]
    data_hash: str
    unit: str
    turns_per_unit: float
    panel: list[str]
    judges: dict[str, dict[str, Any]]
    path: str = ""

    def counts(self, category: str, judge: str = COMBINED) -> Counts | None:
        """The confusion counts of a judge (default: the panel's combined verdicts) on a category."""
        m = self.judges.get(judge, {}).get("categories", {}).get(category)
        if m is None:
            return None
        return Counts(int(m["tp"]), int(m["fp"]), int(m["tn"]), int(m["fn"]), int(m.get("unscored") or 0))

    def metrics(self, category: str, judge: str = COMBINED) -> dict[str, Any] | None:
        return self.judges.get(judge, {}).get("categories", {}).get(category)

    def summary(self) -> dict[str, Any]:
        """What the report and MLflow params show about the calibration (no per-category data)."""
        return {"path": self.path, "version": self.version, "created_at": self.created_at,
                "data": list(self.data), "data_hash": self.data_hash, "unit": self.unit,
                "turns_per_unit": self.turns_per_unit, "panel": list(self.panel),
                "judges": sorted(self.judges),
                "categories": sorted(self.judges.get(COMBINED, {}).get("categories", {}))}


def _fail(where: str, problem: str) -> CalibrationError:
    return CalibrationError(f"calibration file {where}: {problem}")


def _check_metrics(where: str, m: Any) -> None:
    if not isinstance(m, dict):
        raise _fail(where, "must be an object of metrics")
    for k in (*COUNT_KEYS, "unscored"):
        v = m.get(k, 0 if k == "unscored" else None)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise _fail(where, f"'{k}' must be a non-negative integer, got {v!r}")
    for k, v in m.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise _fail(where, f"'{k}' is {v!r}; undefined values are null")


def _rfc3339(where: str, v: Any) -> str:
    if not isinstance(v, str):
        raise _fail(where, f"'created_at' must be an RFC 3339 string, got {v!r}")
    try:
        ts = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise _fail(where, f"'created_at' is not RFC 3339: {v!r}") from None
    if ts.tzinfo is None:
        raise _fail(where, f"'created_at' needs a time zone (e.g. Z): {v!r}")
    return v


def validate(payload: Any, where: str = "<payload>") -> Calibration:
    """Check a calibration payload; raises CalibrationError naming `where` and the problem."""
    if not isinstance(payload, dict):
        raise _fail(where, f"expected a JSON object, got {type(payload).__name__}")
    version = payload.get("version")
    if version != VERSION:
        raise _fail(where, f"unsupported version {version!r} (this depsim reads version {VERSION})")
    missing = [k for k in ("created_at", "data", "data_hash", "unit", "turns_per_unit", "panel", "judges")
               if k not in payload]
    if missing:
        raise _fail(where, f"missing key(s): {', '.join(missing)}")
    created_at = _rfc3339(where, payload["created_at"])
    data = payload["data"]
    if not isinstance(data, list) or not all(isinstance(d, str) for d in data):
        raise _fail(where, "'data' must be a list of paths")
    if not isinstance(payload["data_hash"], str):
        raise _fail(where, "'data_hash' must be a string")
    unit = payload["unit"]
    if unit not in UNITS:
        raise _fail(where, f"'unit' must be one of {', '.join(UNITS)}, got {unit!r}")
    tpu = payload["turns_per_unit"]
    if isinstance(tpu, bool) or not isinstance(tpu, int | float) or not math.isfinite(tpu) or tpu < 1:
        raise _fail(where, f"'turns_per_unit' must be a number ≥ 1, got {tpu!r}")
    if unit == "turn" and tpu != 1:
        raise _fail(where, f"'turns_per_unit' must be 1 when the unit is a turn, got {tpu!r}")
    panel = payload["panel"]
    if not isinstance(panel, list) or not panel or not all(isinstance(p, str) and p for p in panel):
        raise _fail(where, "'panel' must be a non-empty list of judge names")
    judges = payload["judges"]
    if not isinstance(judges, dict) or not judges:
        raise _fail(where, "'judges' must be a non-empty object")
    if COMBINED not in judges:
        raise _fail(where, f"'judges' has no '{COMBINED}' entry (the estimate corrects with it)")
    for name, entry in judges.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("provenance", {}), dict):
            raise _fail(where, f"judges.{name} must be an object with 'provenance' and 'categories'")
        cats = entry.get("categories")
        if not isinstance(cats, dict):
            raise _fail(where, f"judges.{name}.categories must be an object")
        for cat, m in cats.items():
            _check_metrics(f"{where} (judges.{name}.categories.{cat})", m)
    return Calibration(VERSION, created_at, list(data), payload["data_hash"], unit, float(tpu),
                       list(panel), judges, where)


def write_calibration(path: str | Path, payload: Mapping[str, Any]) -> Calibration:
    """Validate and write a calibration file (JSON); `version` and `created_at` default to now.

    Written to a temporary file and renamed, so a reader never sees half a file.
    """
    path = Path(path)
    full = {"version": VERSION, "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), **payload}
    cal = validate(full, str(path))
    try:
        text = json.dumps(full, indent=2, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise _fail(str(path), f"not serialisable as strict JSON: {e}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return cal


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not JSON (undefined values are null)")


def read_calibration(path: str | Path) -> Calibration:
    """Read and validate a calibration file; CalibrationError names the file and the problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _fail(str(path), "not found") from None
    except OSError as e:
        raise _fail(str(path), f"cannot be read ({e.strerror or e})") from None
    try:
        payload = json.loads(text, parse_constant=_reject_constant)
    except ValueError as e:
        raise _fail(str(path), f"invalid JSON: {e}") from None
    return validate(payload, str(path))


# --- the Rogan–Gladen correction --------------------------------------------------------


def rogan_gladen(p: float, sens: float, spec: float) -> float:
    """(p + Sp − 1) / (Se + Sp − 1), clipped to [0, 1]; needs Se + Sp > 1."""
    fpr = 1.0 - spec  # written as (p − FPR) / (Se − FPR): exact for a perfect judge
    return min(1.0, max(0.0, (p - fpr) / (sens - fpr)))


def _none(note: str, **extra: Any) -> dict[str, Any]:
    return {"rate": None, "lower": None, "upper": None, "note": note, **extra}


def corrected_rate(p: float, n_eff: float, sens_counts: tuple[int, int], spec_counts: tuple[int, int],
                   rng_seed: int, draws: int = 4000) -> dict[str, Any]:
    """The Rogan–Gladen corrected rate with a 95% interval over both samples' uncertainty.

    Args:
        p: the raw (judge-flagged) rate.
        n_eff: its design-effective sample size (tasks.estimate.rate_interval).
        sens_counts: (tp, fn) of the calibration: labelled positives the judge flagged / missed.
        spec_counts: (tn, fp) of the calibration: labelled negatives the judge passed / flagged.
        rng_seed: seed of the bootstrap (same seed, same interval).
        draws: bootstrap draws.

    Returns:
        {"rate", "lower", "upper", "note", "sensitivity", "specificity", "youden",
        "youden_lower"}: rate and bounds are None (with the reason in "note") where the
        correction is not meaningful (see the module docstring); note is None otherwise.
    """
    tp, fn = (int(x) for x in sens_counts)
    tn, fp = (int(x) for x in spec_counts)
    if tp + fn == 0:
        return _none("no labelled positives in the calibration: sensitivity unknown")
    if tn + fp == 0:
        return _none("no labelled negatives in the calibration: specificity unknown")
    sens, spec = tp / (tp + fn), tn / (tn + fp)
    youden = sens + spec - 1.0
    info: dict[str, Any] = {"sensitivity": sens, "specificity": spec, "youden": youden, "youden_lower": None}
    if p is None or not math.isfinite(p) or not n_eff or n_eff <= 0:
        return _none("no scored turns: nothing to correct", **info)
    if youden <= MIN_YOUDEN:
        return _none(f"judge barely better than chance (Youden's J = {youden:.3f} ≤ {MIN_YOUDEN}): "
                     "correction not meaningful", **info)
    rng = np.random.default_rng(rng_seed)
    p_d = rng.beta(p * n_eff + 0.5, (1.0 - p) * n_eff + 0.5, draws)
    se_d = rng.beta(tp + 0.5, fn + 0.5, draws)
    sp_d = rng.beta(tn + 0.5, fp + 0.5, draws)
    j_d = se_d + sp_d - 1.0
    info["youden_lower"] = j_lo = float(np.quantile(j_d, 0.025))
    if j_lo <= 0:
        return _none(f"calibration cannot exclude a judge no better than chance (Youden's J = {youden:.3f}, "
                     f"95% lower bound {j_lo:.3f} ≤ 0): correction not meaningful", **info)
    ok = j_d > 0
    pi_d = np.clip((p_d[ok] - (1.0 - sp_d[ok])) / (se_d[ok] - (1.0 - sp_d[ok])), 0.0, 1.0)
    lo, hi = (float(x) for x in np.quantile(pi_d, [0.025, 0.975]))
    rate = rogan_gladen(p, sens, spec)
    note = None
    if hi <= 0.0 or lo >= 1.0:  # the raw rate is clearly outside [FPR, Se]: the model does not fit
        note = (f"raw rate {p:.4f} clearly {'below the false-positive rate' if hi <= 0 else 'above the sensitivity'}"
                " of the calibration: clipped; the calibration may not fit this traffic")
    return {"rate": rate, "lower": min(lo, rate), "upper": max(hi, rate), "note": note, **info}


__all__ = [
    "COMBINED", "UNITS", "VERSION", "VERSION_KEYS", "Calibration", "CalibrationError", "Counts", "Labelled",
    "confusion", "corrected_rate", "evaluation_counts", "flag_of", "judge_entry", "judge_versions", "metrics",
    "read_calibration", "rogan_gladen", "validate", "version_warnings", "write_calibration",
]
