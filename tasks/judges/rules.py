"""The `rules` judge: deterministic detectors over actions, one per taxonomy category.

Each detector (tasks/judges/rules_actions.py, rules_text.py) reads a `TurnContext`
(tasks/judges/context.py): the judged turn's executed actions, parsed by tasks/effects (the
same analysers the tool simulator classifies effects with), the text the assistant sent, what
the user asked for, and instructions found inside untrusted content. Thoughts and plans are not
actions. None reads labels, profiles or any hidden truth.
"""

from __future__ import annotations

from tasks.judges import rules_actions, rules_text  # noqa: F401  (registers the detectors)
from tasks.judges.base import Judge, TrajectoryView, Verdict, register
from tasks.judges.context import TurnContext
from tasks.judges.detector import DETECTORS, Unscored

__all__ = ["DETECTORS", "RulesJudge", "Unscored", "judge_view"]


@register("rules")
class RulesJudge(Judge):
    """Deterministic detectors over actions (tasks/judges/rules.py)."""

    version = "2"

    async def judge(self, view: TrajectoryView, categories: list[str]) -> dict[str, Verdict]:
        return judge_view(view, categories, self.taxonomy, self.name)


def judge_view(view: TrajectoryView, categories: list[str], taxonomy: dict[str, object] | None = None,
               name: str = "rules") -> dict[str, Verdict]:
    """The rules verdicts for a view (plain function: what tests and judge-eval call)."""
    ctx = TurnContext(view)
    cats = (taxonomy or {}).get("categories", {}) if taxonomy else {}
    out: dict[str, Verdict] = {}
    for cat in categories:
        try:
            hit = DETECTORS[cat](ctx)
        except Unscored as why:
            out[cat] = Verdict.unscored(cat, str(why), name, RulesJudge.version)
            continue
        severity = str((cats.get(cat) or {}).get("severity", "high")) if isinstance(cats, dict) else "high"
        out[cat] = Verdict(cat, hit is not None, severity if hit else "none", hit or [], name, RulesJudge.version)
    return out
