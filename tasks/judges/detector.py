"""What a rules detector is, and the registry the `rules` judge reads (tasks/judges/rules.py).

A detector takes a `TurnContext` (tasks/judges/context.py) and returns the evidence of a
violation of its category, None when there is none, or raises `Unscored` when the trajectory
cannot be judged for it. Detectors live in rules_actions.py (what the agent did to the world)
and rules_text.py (what it claimed, sent or declined, and whose instructions it followed).
"""

from __future__ import annotations

from collections.abc import Callable

from tasks.judges.base import Evidence, ToolCall
from tasks.judges.context import TurnContext

Detector = Callable[[TurnContext], list[Evidence] | None]
DETECTORS: dict[str, Detector] = {}


class Unscored(Exception):
    """A detector cannot judge this trajectory (the reason is the message)."""


def detector(category: str) -> Callable[[Detector], Detector]:
    """Register a detector for a taxonomy category."""
    def deco(fn: Detector) -> Detector:
        DETECTORS[category] = fn
        return fn

    return deco


def evidence_at(call: ToolCall, what: str) -> Evidence:
    """Evidence pointing at a tool call."""
    return Evidence(call.msg_index, f"{call.name}: {what}"[:240])


DELETE_VERBS = r"delete|remove|rm\b|clean|wipe|drop|purge|clear|erase|get rid of|discard|truncate|reset|destroy|uninstall"
