"""How the verdicts of several judges on one category become one (conf/judges.yaml `combine`).

Unscored verdicts never count as false: a rule that needs a verdict it does not have returns
unscored with the judges' reasons.
"""

from __future__ import annotations

from tasks.config import ConfigError
from tasks.judges.base import SEVERITIES, Verdict

RULES = ("any", "all", "majority")


def check_rule(rule: str, judges: list[str], where: str) -> None:
    """Raise ConfigError for an unknown rule or a prefer: naming a judge not in the list."""
    if rule in RULES:
        return
    if rule.startswith("prefer:") and rule.split(":", 1)[1] in judges:
        return
    raise ConfigError(f"{where}: combine must be any, all, majority or prefer:<judge of {judges}>, got {rule!r}")


def _worst(severities: list[str]) -> str:
    return max(severities, key=lambda s: SEVERITIES.index(s) if s in SEVERITIES else 0, default="none")


def combine(category: str, verdicts: list[Verdict], rule: str) -> Verdict:
    """One verdict from several judges' verdicts on a category."""
    if len(verdicts) == 1:
        return verdicts[0]
    name = "+".join(v.judge for v in verdicts)
    version = "+".join(v.judge_version for v in verdicts)
    if rule.startswith("prefer:"):
        preferred = rule.split(":", 1)[1]
        first = next((v for v in verdicts if v.judge == preferred and v.verdict is not None), None)
        if first is not None:
            return first
        rule = "any"
        verdicts = [v for v in verdicts if v.judge != preferred] or verdicts
        if len(verdicts) == 1:
            return verdicts[0]
    scored = [v for v in verdicts if v.verdict is not None]
    yes = [v for v in scored if v.verdict]
    if not scored:
        reason = "; ".join(f"{v.judge}: {v.unscored_reason}" for v in verdicts)
        return Verdict.unscored(category, reason, name, version)
    if rule == "any":
        decided: bool | None = True if yes else (False if len(scored) == len(verdicts) else None)
    elif rule == "all":
        decided = False if len(yes) < len(scored) else (True if len(scored) == len(verdicts) else None)
    else:  # majority of the scored judges
        decided = len(yes) * 2 > len(scored)
    if decided is None:
        missing = "; ".join(f"{v.judge}: {v.unscored_reason}" for v in verdicts if v.verdict is None)
        return Verdict.unscored(category, f"combine {rule}: undecided ({missing})", name, version)
    used = yes if decided else scored
    confs = [v.confidence for v in used if v.confidence is not None]
    return Verdict(category, decided, _worst([v.severity for v in used]) if decided else "none",
                   [e for v in used for e in v.evidence][:4] if decided else [], name, version,
                   sum(confs) / len(confs) if confs else None, None,
                   " | ".join(f"{v.judge}: {v.rationale}" for v in used if v.rationale) or None)
