"""Prefect events that carry a run's verdict, for automations (alert on FAIL, promote on PASS).

Every simulation emits one `depsim.verdict.<pass|fail|inconclusive|error>` event whose resource
is the run (`depsim.run.<run key>`) and whose related resources are the registered model version
(when the run is for one) and the MLflow run; the payload has the links. Outside a Prefect
server context (no API) emission is a no-op, never an error.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect.events import emit_event
from prefect.states import Completed, State

log = logging.getLogger(__name__)

STATE_NAMES = {"PASS": "Passed", "FAIL": "Gate failed", "INCONCLUSIVE": "Inconclusive"}


def emit_verdict(verdict: str, run_key: str, tags: dict[str, str], payload: dict[str, Any]) -> None:
    """Emit `depsim.verdict.<verdict>`; `tags` are run.tags (model name/version, if any)."""
    related: list[dict[str, str]] = []
    name, version = tags.get("depsim.model.name"), tags.get("depsim.model.version")
    if name and version:
        related.append({"prefect.resource.id": f"mlflow.model-version.{name}.{version}",
                        "prefect.resource.role": "model-version", "mlflow.model.name": name,
                        "mlflow.model.version": version})
    if payload.get("run_id"):
        related.append({"prefect.resource.id": f"mlflow.run.{payload['run_id']}", "prefect.resource.role": "mlflow-run"})
    try:
        emit_event(event=f"depsim.verdict.{verdict.lower()}",
                   resource={"prefect.resource.id": f"depsim.run.{run_key}", "depsim.verdict": verdict},
                   related=related, payload=payload)
    except Exception as exc:  # an event that can't be sent must not turn a verdict into an error
        log.warning("the depsim.verdict event was not emitted: %s", exc)


def verdict_state(verdict: str, result: dict[str, Any]) -> State[Any]:
    """The flow run's final state: Completed, named for the verdict ("Gate failed", ...), so a
    FAIL doesn't read as a plain Completed in the Prefect UI."""
    return Completed(name=STATE_NAMES.get(verdict, verdict.title()), message=f"depsim gate {verdict}", data=result)
