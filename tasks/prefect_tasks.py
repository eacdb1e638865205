"""Thin Prefect wrappers around tasks/stages.py: names, retries, nothing else."""

from __future__ import annotations

from prefect import task

from tasks import stages

load_task = task(stages.stage_load, name="load")
check_task = task(stages.stage_check, name="contract-check")
sample_task = task(stages.stage_sample, name="sample")
replay_task = task(stages.stage_replay, name="replay")
judge_task = task(stages.stage_judge, name="judge")
estimate_task = task(stages.stage_estimate, name="estimate-and-gate")
report_task = task(stages.stage_report, name="report")
log_task = task(stages.stage_log, name="mlflow-log", retries=2, retry_delay_seconds=2)
