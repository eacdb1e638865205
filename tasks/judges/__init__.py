"""Judges: the interface and registry (base.py), the `rules` judge (rules.py; its detectors in
detector.py, rules_actions.py, rules_text.py), the `llm` judge (llm.py, llm_prompt.py), how
verdicts combine (combine.py) and calibration against human labels
(calibrate.py). `JudgePanel` runs the judges conf/judges.yaml names for a run."""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tasks.config import ConfigError
from tasks.judges.base import JUDGES, Judge, TrajectoryView, Verdict
from tasks.judges.combine import check_rule, combine
from tasks.taxonomy import AGGREGATE, CATEGORIES, UNSAFE

# Modules that register the built-in judge kinds (imported on first use, not at import time).
_BUILTIN = ("tasks.judges.rules", "tasks.judges.llm")


def _load_kinds() -> None:
    for mod in _BUILTIN:
        importlib.import_module(mod)



@dataclass(frozen=True)
class CategoryPlan:
    judges: list[str]
    combine: str


def plan(taxonomy: dict[str, Any], enabled: list[str], source: str = "judges.yaml") -> dict[str, CategoryPlan]:
    """Per category, the enabled judges that score it and the combine rule.

    Raises:
        ConfigError: an unknown judge name or kind, a bad combine rule, or a category left
            without an enabled judge.
    """
    _load_kinds()
    specs = taxonomy.get("judges") or {"rules": {"kind": "rules"}}
    for name in enabled:
        if name not in specs:
            raise ConfigError(f"judge.kinds: {name!r} is not a judge in {source} (judges: {', '.join(specs)})")
    for name, spec in specs.items():
        kind = (spec or {}).get("kind", name)
        if kind not in JUDGES:
            raise ConfigError(f"{source}: judges.{name}: unknown kind {kind!r} (known: {', '.join(sorted(JUDGES))})")
    default = str(taxonomy.get("combine_default", "any"))
    out: dict[str, CategoryPlan] = {}
    for cat in CATEGORIES:
        entry = taxonomy["categories"][cat]
        listed = [str(j) for j in entry.get("judges") or list(specs)]
        unknown = [j for j in listed if j not in specs]
        if unknown:
            raise ConfigError(f"{source}: categories.{cat}.judges: unknown judge(s) {unknown}")
        active = [j for j in listed if j in enabled]
        if not active:
            raise ConfigError(f"{source}: category {cat} has no enabled judge (its judges: {listed}; "
                              f"judge.kinds: {enabled})")
        rule = str(entry.get("combine", default))
        if rule.startswith("prefer:") and rule.split(":", 1)[1] not in active:
            rule = "any"  # the preferred judge is not enabled in this run
        check_rule(rule, active, f"{source}: categories.{cat}")
        out[cat] = CategoryPlan(active, rule)
    return out


def aggregate(verdicts: dict[str, Verdict]) -> Verdict:
    """unsafe_any from the nine unsafe categories: true if any is true; unscored if none is true
    and any is unscored."""
    parts = [verdicts[c] for c in UNSAFE]
    flagged = [v for v in parts if v.verdict]
    if flagged:
        ev = [v.evidence[0] for v in flagged if v.evidence]
        return Verdict(AGGREGATE, True, "high", ev[:4], "aggregate", "1", None, None,
                       ", ".join(v.category for v in flagged))
    missing = [v for v in parts if v.verdict is None]
    if missing:
        return Verdict.unscored(AGGREGATE, f"unscored: {', '.join(v.category for v in missing)}", "aggregate", "1")
    return Verdict(AGGREGATE, False, "none", [], "aggregate", "1")


def only_these_for_llm(taxonomy: dict[str, Any], categories: list[str], source: str) -> dict[str, Any]:
    """The taxonomy with judges of kind `llm` kept only on the given categories (judge.llm_categories:
    a slow local judge answers a few categories, the rules judge the rest).

    Raises:
        ConfigError: an unknown category name.
    """
    unknown = sorted(set(categories) - set(CATEGORIES))
    if unknown:
        raise ConfigError(f"judge.llm_categories: unknown categories {unknown} (known: {', '.join(CATEGORIES)})")
    specs = taxonomy.get("judges") or {}
    llm = {n for n, spec in specs.items() if (spec or {}).get("kind", n) == "llm"}
    cats = {}
    for cat, entry in taxonomy["categories"].items():
        listed = [str(j) for j in entry.get("judges") or list(specs)]
        if cat not in categories:
            listed = [j for j in listed if j not in llm]
        rule = str(entry.get("combine", taxonomy.get("combine_default", "any")))
        if rule.startswith("prefer:") and rule.split(":", 1)[1] not in listed:
            rule = "any"
        cats[cat] = {**entry, "judges": listed, "combine": rule}
    return {**taxonomy, "categories": cats}


class JudgePanel:
    """The judges of one run: judge a view with every enabled judge and combine per category."""

    def __init__(self, taxonomy: dict[str, Any], enabled: list[str], settings: Any = None,
                 source: str = "judges.yaml") -> None:
        limit = getattr(getattr(settings, "judge", None), "llm_categories", None)
        if limit is not None:
            taxonomy = only_these_for_llm(taxonomy, list(limit), source)
        self.taxonomy = taxonomy
        self.plans = plan(taxonomy, enabled, source)
        specs = taxonomy.get("judges") or {"rules": {"kind": "rules"}}
        names = sorted({j for p in self.plans.values() for j in p.judges}, key=list(specs).index)
        self.judges: dict[str, Judge] = {}
        for name in names:
            spec = dict(specs[name] or {})
            self.judges[name] = JUDGES[spec.get("kind", name)](name, spec, taxonomy, settings)

    async def judge(self, view: TrajectoryView) -> tuple[dict[str, Verdict], dict[str, dict[str, Verdict]]]:
        """(combined verdict per category incl. unsafe_any, each judge's own verdicts)."""
        per_judge: dict[str, dict[str, Verdict]] = {}
        wanted = {name: [c for c, p in self.plans.items() if name in p.judges] for name in self.judges}
        results = await asyncio.gather(*(j.judge(view, wanted[n]) for n, j in self.judges.items()))
        for name, res in zip(self.judges, results, strict=True):
            per_judge[name] = res
        combined = {c: combine(c, [per_judge[j][c] for j in p.judges], p.combine) for c, p in self.plans.items()}
        combined[AGGREGATE] = aggregate(combined)
        return combined, per_judge

    async def judge_all(self, views: list[TrajectoryView], concurrency: int = 64,
                        tick: Callable[[int], None] | None = None) -> list[tuple[dict[str, Verdict], dict[str, dict[str, Verdict]]]]:
        """judge() over many views, at most `concurrency` at a time, in order."""
        sem = asyncio.Semaphore(concurrency)

        async def one(v: TrajectoryView) -> tuple[dict[str, Verdict], dict[str, dict[str, Verdict]]]:
            async with sem:
                out = await self.judge(v)
            if tick:
                tick(1)
            return out

        return list(await asyncio.gather(*(one(v) for v in views)))

    def provenance(self) -> dict[str, Any]:
        return {name: j.provenance() for name, j in self.judges.items()}

    def stats(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, j in self.judges.items():
            out.update({f"{name}.{k}": v for k, v in j.stats().items()})
        return out

    async def aclose(self) -> None:
        for j in self.judges.values():
            await j.aclose()


__all__ = ["JUDGES", "CategoryPlan", "Judge", "JudgePanel", "TrajectoryView", "Verdict", "aggregate", "plan"]
