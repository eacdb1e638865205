"""The MLflow model registry side of the MLOps loop: what a version says, claims, write-back, compare.

A registered model version says how to reach its model with tags:

    depsim.base_url     OpenAI-compatible endpoint, e.g. http://10.0.0.5:8000/v1   (required)
    depsim.model        model name at that endpoint                                (required)
    depsim.api_key_env  name of the environment variable holding its key           (optional)

depsim writes back onto the version: `depsim.claim` (the flow run that took it), `depsim.verdict`
(PASS, FAIL, INCONCLUSIVE or ERROR), `depsim.run_id`, `depsim.report` (the report in the MLflow
run's artifacts), `depsim.error` for an ERROR, and an alias (registry.pass_alias, default
`simulated-pass`) on PASS.

At most one simulation per version: whoever starts one (the webhook-triggered flow, the polling
flow) first claims the version. A claim is a tag, and MLflow has no compare-and-set, so it is
written, left to settle for a moment, and read back: of two claimants that both saw no claim, only
the one whose tag is read back proceeds (the later write wins for both readers). A version
without the endpoint tags gets `depsim.verdict` ERROR and a `depsim.error` saying what is missing,
but no claim: setting the tags later starts it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

ENDPOINT_TAGS = ("depsim.base_url", "depsim.model", "depsim.api_key_env")
CLAIM = "depsim.claim"
VERDICT = "depsim.verdict"


class NotRunnable(ValueError):
    """The version doesn't say how to reach its model (or says it wrongly)."""


@dataclass(frozen=True)
class Version:
    name: str
    version: str
    tags: dict[str, str]
    created_ms: int
    aliases: tuple[str, ...] = ()

    @property
    def claimed(self) -> bool:
        return CLAIM in self.tags

    @property
    def runnable(self) -> bool:
        return all(self.tags.get(k) for k in ENDPOINT_TAGS[:2])


def client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def get_version(c: Any, name: str, version: str) -> Version:
    mv = c.get_model_version(name, str(version))
    return Version(mv.name, str(mv.version), dict(mv.tags or {}), int(mv.creation_timestamp or 0),
                   tuple(getattr(mv, "aliases", None) or ()))


def candidate_overrides(v: Version) -> dict[str, Any]:
    """Settings overrides that make the version the candidate and tag the run with it.

    Raises:
        NotRunnable: a required tag is missing, the URL isn't http(s), or the key variable named
            by depsim.api_key_env is not set where the flow runs.
    """
    missing = [k for k in ENDPOINT_TAGS[:2] if not v.tags.get(k)]
    if missing:
        raise NotRunnable(f"model version {v.name}/{v.version} has no {' or '.join(missing)} tag: set "
                          "depsim.base_url (an OpenAI-compatible endpoint) and depsim.model on the version "
                          "to say how depsim reaches the model")
    url = v.tags["depsim.base_url"]
    if not url.startswith(("http://", "https://")):
        raise NotRunnable(f"model version {v.name}/{v.version}: depsim.base_url {url!r} is not an http(s) URL")
    key_env = v.tags.get("depsim.api_key_env") or None
    if key_env and not os.environ.get(key_env):
        raise NotRunnable(f"model version {v.name}/{v.version}: depsim.api_key_env names {key_env}, which is "
                          "not set in the environment the flow runs in")
    return {"models": {"candidate": {"base_url": url, "model": v.tags["depsim.model"], "api_key_env": key_env}},
            "run": {"tags": {"depsim.model.name": v.name, "depsim.model.version": v.version}}}


def claim(c: Any, name: str, version: str, owner: str, settle_s: float = 1.0) -> bool:
    """Take the version for one simulation; False when someone else has (or had) it."""
    if get_version(c, name, version).claimed:
        return False
    from mlflow.exceptions import MlflowException

    try:
        c.set_model_version_tag(name, version, CLAIM, owner)
    except MlflowException:  # a concurrent first write (SQL stores insert the tag row once): theirs
        return False
    time.sleep(settle_s)
    return get_version(c, name, version).tags.get(CLAIM) == owner


def write_back(c: Any, name: str, version: str, verdict: str, run_id: str | None = None,
               error: str | None = None, pass_alias: str | None = None) -> dict[str, str]:
    """Tag the version with the verdict (and run, report or error); alias it on PASS.

    The verdict tag is written last: whoever sees it (a poller, a dashboard, a test) finds the
    run, report, error and alias already there.
    """
    tags = {"depsim.verdict_at": datetime.now(UTC).isoformat(timespec="seconds")}
    if run_id:
        tags.update({"depsim.run_id": run_id, "depsim.report": f"runs:/{run_id}/report.html"})
    if error:
        tags["depsim.error"] = error[:4000]
    tags[VERDICT] = verdict
    if verdict == "PASS" and pass_alias:
        c.set_registered_model_alias(name, pass_alias, version)
    for k, val in tags.items():
        c.set_model_version_tag(name, version, k, val)
    return tags


def watched_versions(c: Any, models: list[str], max_age_hours: float) -> list[Version]:
    """Versions of the watched registered models (all when `models` is empty), newest first."""
    names = models or [m.name for m in _all_pages(c.search_registered_models)]
    cutoff = (time.time() - max_age_hours * 3600) * 1000
    out: list[Version] = []
    for name in names:
        for mv in _all_pages(c.search_model_versions, filter_string=f"name='{name}'"):
            if int(mv.creation_timestamp or 0) >= cutoff:
                out.append(Version(mv.name, str(mv.version), dict(mv.tags or {}), int(mv.creation_timestamp or 0)))
    return sorted(out, key=lambda v: -v.created_ms)


def _all_pages(search: Any, **kwargs: Any) -> list[Any]:
    items: list[Any] = []
    token = None
    while True:
        page = search(page_token=token, **kwargs)
        items.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return items


def compare_rows(tracking_uri: str, model: str, experiment: str | None = None) -> list[dict[str, Any]]:
    """One row per depsim run of the registered model's versions (newest version first): version,
    verdict, run id, start time and per category rate, interval, delta and gate."""
    from tasks.taxonomy import ALL_CATEGORIES

    c = client(tracking_uri)
    exps = [c.get_experiment_by_name(experiment)] if experiment else c.search_experiments()
    ids = [e.experiment_id for e in exps if e is not None]
    if not ids:
        return []
    runs = c.search_runs(ids, filter_string=f"tags.`depsim.model.name` = '{model}'", max_results=1000,
                         order_by=["attributes.start_time DESC"])
    rows = []
    for r in runs:
        m, t = r.data.metrics, r.data.tags
        cats = {cat: {"rate": m.get(f"{cat}.rate"), "lower": m.get(f"{cat}.lower"), "upper": m.get(f"{cat}.upper"),
                      "delta": m.get(f"{cat}.delta"), "delta_lower": m.get(f"{cat}.delta_lower"),
                      "delta_upper": m.get(f"{cat}.delta_upper"), "gate": t.get(f"depsim.gate.{cat}")}
                for cat in ALL_CATEGORIES if f"{cat}.rate" in m}
        rows.append({"version": t.get("depsim.model.version"), "verdict": t.get(VERDICT), "run_id": r.info.run_id,
                     "run_name": r.info.run_name, "experiment_id": r.info.experiment_id,
                     "started": datetime.fromtimestamp(r.info.start_time / 1000, UTC).isoformat(timespec="seconds"),
                     "candidate": t.get("depsim.candidate"), "sample_digest": t.get("depsim.sample_digest"),
                     "code_revision": t.get("depsim.code_revision"), "categories": cats})
    return sorted(rows, key=lambda r: (-_version_number(r["version"]), r["started"]), reverse=False)


def _version_number(v: str | None) -> int:
    try:
        return int(v or 0)
    except ValueError:
        return 0
