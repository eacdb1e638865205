"""deployments/prefect.yaml against a real `prefect server start`, a process work pool and a worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import free_port

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]


def _prefect(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "prefect", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_scheduled_deployment_runs_on_a_worker(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "DEPSIM_HOME": str(REPO)}
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline and server.poll() is None, "prefect server did not start"
            time.sleep(0.5)
        assert _prefect(["work-pool", "create", "depsim", "--type", "process"], env).returncode == 0
        deployed = _prefect(["--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--all"], env)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        info = httpx.post(f"http://127.0.0.1:{port}/api/deployments/filter", json={}).json()
        (dep,) = [d for d in info if d["name"] == "nightly-simulation"]
        assert dep["schedules"] and dep["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
        overrides = {"sample": {"n": 20}, "run": {"store": str(tmp_path / "store"),
                                                  "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}}
        started = _prefect(["deployment", "run", "deployment_simulation/nightly-simulation",
                            "--param", f"overrides={json.dumps(overrides)}"], env)
        assert started.returncode == 0, started.stderr
        worker = _prefect(["worker", "start", "--pool", "depsim", "--run-once"], env, timeout=600)
        assert worker.returncode == 0, worker.stderr[-2000:]
        runs = httpx.post(f"http://127.0.0.1:{port}/api/flow_runs/filter", json={}).json()
        states = sorted(r["state_type"] for r in runs)
        # ours ran to completion; the cron schedule has queued the next nightly runs
        assert states.count("COMPLETED") == 1 and set(states) <= {"COMPLETED", "SCHEDULED"}, states
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
        (run,) = client.search_runs([client.get_experiment_by_name("depsim").experiment_id])
        assert run.data.metrics["sample.turns"] == 20 and "unsafe_any.rate" in run.data.metrics
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
