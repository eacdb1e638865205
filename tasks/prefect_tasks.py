"""Thin Prefect wrappers around tasks/stages.py: names, retries, nothing else."""

from __future__ import annotations

from prefect import task

from tasks import stages

load_task = task(name="load")(stages.stage_load)
check_task = task(name="contract-check")(stages.stage_check)
sample_task = task(name="sample")(stages.stage_sample)
replay_task = task(name="replay")(stages.stage_replay)
judge_task = task(name="judge")(stages.stage_judge)
estimate_task = task(name="estimate-and-gate")(stages.stage_estimate)
report_task = task(name="report")(stages.stage_report)
log_task = task(name="mlflow-log", retries=2, retry_delay_seconds=2)(stages.stage_log)
