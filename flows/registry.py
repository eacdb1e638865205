"""Flows of the MLOps loop: simulate a registered model version, and poll the registry for new ones.

    new version in the MLflow registry ──webhook──▶ deployments/receiver.py ──Prefect event──▶
    deployment trigger (deployments/prefect.yaml) ──▶ simulate_model_version(name, version)
    watch_registry (scheduled) ──▶ simulate_model_version for versions no one has claimed

`simulate_model_version` claims the version (tasks/registry.py: at most one simulation per
version, whatever the order and repetition of deliveries), runs `deployment_simulation` with the
version as the candidate, and writes the verdict back onto the version. The tracking and registry
URI is run.tracking_uri, else MLFLOW_TRACKING_URI, else the local SQLite store.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State

from flows.simulate import deployment_simulation
from tasks import registry
from tasks.config import _deep_merge, load_settings
from tasks.events import verdict_state
from tasks.tracking import default_tracking_uri

REGISTRY_DEPLOYMENT = "simulate_model_version/registry-simulation"


@flow(name="simulate_model_version")
def simulate_model_version(name: str, version: str, overrides: dict[str, Any] | None = None,
                           settle_s: float = 1.0) -> State[Any]:
    """Simulate one registered model version and write the verdict back onto it.

    Args:
        name: the registered model's name.
        version: its version number.
        overrides: settings layered over conf/default.yaml and DEPSIM_* (e.g. {"sample": {"n": 500}}).
        settle_s: how long a claim is left before it is read back.
    """
    log = get_run_logger()
    version = str(version)
    s = load_settings(overrides=overrides)
    uri = s.run.tracking_uri or default_tracking_uri()
    c = registry.client(uri)
    v = registry.get_version(c, name, version)
    if v.claimed:
        log.info("model version %s/%s already taken by %s: nothing to do", name, version, v.tags[registry.CLAIM])
        return Completed(name="Skipped", message=f"{name}/{version} already simulated ({v.tags[registry.CLAIM]})",
                         data={"skipped": True, "claim": v.tags[registry.CLAIM]})
    try:
        candidate = registry.candidate_overrides(v)
    except registry.NotRunnable as exc:
        registry.write_back(c, name, version, "ERROR", error=str(exc))
        log.error("%s", exc)
        return Failed(message=str(exc), data={"verdict": "ERROR", "error": str(exc)})
    owner = f"prefect-flow-run:{flow_run.id or 'local'}:{time.time_ns()}"
    if not registry.claim(c, name, version, owner, settle_s):
        log.info("model version %s/%s was claimed by another run first: nothing to do", name, version)
        return Completed(name="Skipped", message=f"{name}/{version} claimed by another run", data={"skipped": True})
    log.info("simulating model version %s/%s (%s at %s)", name, version, candidate["models"]["candidate"]["model"],
             candidate["models"]["candidate"]["base_url"])
    try:
        settings = load_settings(overrides=_deep_merge(overrides or {}, candidate))
        result = deployment_simulation(settings.public_dict())
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}"
        registry.write_back(c, name, version, "ERROR", run_id=getattr(exc, "run_id", None), error=message)
        log.error("simulation of %s/%s failed: %s", name, version, message)
        raise
    tags = registry.write_back(c, name, version, result["verdict"], run_id=result["run_id"],
                               pass_alias=s.registry.pass_alias)
    log.info("model version %s/%s: %s (MLflow run %s)", name, version, result["verdict"], result["run_id"])
    return verdict_state(result["verdict"], {**result, "model": {"name": name, "version": version}, "written": tags})


@flow(name="watch_registry")
def watch_registry(overrides: dict[str, Any] | None = None, deployment: str | None = REGISTRY_DEPLOYMENT,
                   grace_s: float = 600.0) -> dict[str, Any]:
    """Poll the registry: start a simulation for each recent version no one has claimed.

    The fallback where webhooks can't be used. A version younger than `grace_s` is left to the
    webhook path; a version without the endpoint tags is told so once (depsim.verdict ERROR) and
    picked up again when its tags are set.

    Args:
        overrides: settings layered over conf/default.yaml and DEPSIM_*; registry.models chooses
            the models watched, registry.max_age_hours how far back.
        deployment: the deployment to start per version (one flow run per version: the
            idempotency key is the version); None runs `simulate_model_version` here, one by one.
        grace_s: seconds a new version is left to the webhook path.
    """
    log = get_run_logger()
    s = load_settings(overrides=overrides)
    uri = s.run.tracking_uri or default_tracking_uri()
    c = registry.client(uri)
    started, told, skipped = [], [], []
    now_ms = time.time() * 1000
    for v in registry.watched_versions(c, s.registry.models, s.registry.max_age_hours):
        key = f"{v.name}/{v.version}"
        if v.claimed or now_ms - v.created_ms < grace_s * 1000:
            skipped.append(key)
            continue
        if not v.runnable:
            if registry.VERDICT not in v.tags:
                registry.write_back(c, v.name, v.version, "ERROR", error=str(_not_runnable(v)))
                told.append(key)
            else:
                skipped.append(key)
            continue
        log.info("starting a simulation of %s", key)
        if deployment is None:
            simulate_model_version(v.name, v.version, overrides)
        else:
            from prefect.deployments import run_deployment

            run_deployment(deployment, parameters={"name": v.name, "version": v.version, "overrides": overrides or {}},
                           timeout=0, idempotency_key=f"depsim:{uri}:{key}")
        started.append(key)
    return {"started": started, "told_missing_endpoint": told, "skipped": len(skipped)}


def _not_runnable(v: registry.Version) -> Exception:
    try:
        registry.candidate_overrides(v)
    except registry.NotRunnable as exc:
        return exc
    return registry.NotRunnable(f"model version {v.name}/{v.version} can't be simulated")
