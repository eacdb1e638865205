"""Thin Prefect wrappers around tasks/stages.py: names, retries, nothing else.

Besides them: the task runner replay chunks go to (replay.task_runner) and what Dask workers
need to report to this flow's Prefect API.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import TaskRunner

from tasks import stages
from tasks.config import ConfigError, ReplayCfg

load_task = task(name="load")(stages.stage_load)
check_task = task(name="contract-check")(stages.stage_check)
sample_task = task(name="sample")(stages.stage_sample)
scan_sample_task = task(name="scan-sample-fetch-check", cache_policy=NO_CACHE)(stages.stage_scan_sample)
deid_task = task(name="de-identify", cache_policy=NO_CACHE)(stages.stage_deid)
# Chunks resume through the run store and the model-call cache, not Prefect's result cache
# (whose default key would hash every chunk's frames). A retry after an infrastructure fault
# repeats no completed model call.
replay_chunk_task = task(name="replay-chunk", task_run_name="replay-chunk-{chunk.index}", retries=1,
                         retry_delay_seconds=2, cache_policy=NO_CACHE)(stages.replay_chunk)
combine_task = task(name="replay-combine", cache_policy=NO_CACHE)(stages.combine_chunks)
endpoint_check_task = task(name="endpoint-check", cache_policy=NO_CACHE)(stages.stage_endpoint_check)
judge_task = task(name="judge")(stages.stage_judge)
estimate_task = task(name="estimate-and-gate")(stages.stage_estimate)
correct_task = task(name="correct-with-calibration", cache_policy=NO_CACHE)(stages.stage_correct)
report_task = task(name="report")(stages.stage_report)
log_task = task(name="mlflow-log", retries=2, retry_delay_seconds=2)(stages.stage_log)


def chunk_task_runner(cfg: ReplayCfg) -> TaskRunner[Any] | None:
    """The task runner for replay chunks: None for `local` (the flow's own), else Dask's.

    Raises:
        ConfigError: task_runner dask without prefect-dask installed.
    """
    if cfg.task_runner == "local":
        return None
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:
        raise ConfigError('replay.task_runner dask needs prefect-dask: pip install -e ".[dask]"') from exc
    if cfg.dask_address:
        return DaskTaskRunner(address=cfg.dask_address)
    # One single-threaded worker process per chunk in flight: replay is async inside a chunk,
    # and processes keep the GIL-bound parts (JSON, the synthetic world) apart. The scheduler's
    # HTTP port is a free one, so runs side by side never collide on 8787.
    return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.dask_workers, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": ":0"})


@contextmanager
def dask_scope() -> Iterator[None]:
    """Within it, task runs in Dask workers report to this process's Prefect API.

    Without PREFECT_API_URL the flow talks to a temporary server of its own; each Dask worker
    would start another one (~10 s each) unless the settings shipped with its tasks name this
    one. A remote cluster needs a server both sides reach (`prefect server start`). The
    scheduler and nannies of a local cluster log here at WARNING or PREFECT_LOGGING_LEVEL,
    whichever is higher: not their many INFO lines.
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, PREFECT_LOGGING_LEVEL, temporary_settings

    dask_log = logging.getLogger("distributed")
    level = dask_log.level
    prefect_level = logging.getLevelNamesMapping().get(str(PREFECT_LOGGING_LEVEL.value()).upper(), 0)
    dask_log.setLevel(max(prefect_level, logging.WARNING))
    try:
        if PREFECT_API_URL.value():
            yield
        else:
            url = str(get_client(sync_client=True).api_url)
            with temporary_settings(updates={PREFECT_API_URL: url}):
                yield
    finally:
        dask_log.setLevel(level)
