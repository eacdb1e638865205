"""The whole MLOps loop with real servers on loopback: `prefect server start`, a process worker,
`mlflow server` (SQLite store, webhooks on), the webhook receiver and the synthetic world served
over HTTP. A model version registered in MLflow is simulated once, by itself, and the verdict
appears on it; no planted secret reaches MLflow, the report or Prefect's logs.

Run it alone with `pytest -m registry_e2e`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.registry_e2e]
REPO = Path(__file__).resolve().parents[1]
SECRET_KEY = "sk-depsim-planted-9f3c2a7e41b6"       # a candidate API key the version names
WEBHOOK_SECRET = "whsec-depsim-planted-5d1e08aa77"   # the webhook's signing secret


def _wait(what: str, ok: Callable[[], Any], timeout: float, procs: list[subprocess.Popen[bytes]]) -> Any:
    deadline = time.time() + timeout
    while True:
        try:
            value = ok()
            if value:
                return value
        except (httpx.HTTPError, OSError):
            pass
        for p in procs:
            assert p.poll() is None, f"{what}: {p.args} exited with {p.returncode}"
        assert time.time() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(1)


class Services:
    def __init__(self, tmp: Path) -> None:
        self.tmp, self.procs = tmp, []  # type: ignore[var-annotated]
        self.logs: list[Path] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = self.tmp / f"{name}.log"
        self.logs.append(log)
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    s = Services(tmp_path)
    try:
        yield s
    finally:
        s.stop()


def test_registered_version_is_simulated_once_and_the_verdict_written_back(
        tmp_path: Path, services: Services, synthetic_server: str) -> None:
    from cryptography.fernet import Fernet

    prefect_port, mlflow_port, receiver_port = free_port(), free_port(), free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    tracking = f"http://127.0.0.1:{mlflow_port}"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DEPSIM_", "MLFLOW_", "PREFECT_"))}
    prefect_env = {**base, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api,
                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_TO_API_ENABLED": "true"}
    py = sys.executable

    # The servers.
    server = services.start("prefect-server", [py, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                               "--port", str(prefect_port)], prefect_env)
    mlflow_env = {**base, "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
                  "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode(),
                  "MLFLOW_WEBHOOK_CACHE_TTL": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow_server = services.start("mlflow-server", [
        py, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--artifacts-destination", str(tmp_path / "mlartifacts")], mlflow_env)
    _wait("prefect server", lambda: httpx.get(f"{api}/health", timeout=2).status_code == 200, 180, [server])
    _wait("mlflow server", lambda: httpx.get(f"{tracking}/health", timeout=2).status_code == 200, 180,
          [mlflow_server])

    # Deploy, and a worker whose flow runs see the team's MLflow and a planted key.
    def prefect(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([py, "-m", "prefect", *args], cwd=REPO, env={**prefect_env, "DEPSIM_HOME": str(REPO)},
                              capture_output=True, text=True, timeout=300)

    assert prefect("work-pool", "create", "depsim", "--type", "process").returncode == 0
    deployed = prefect("--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--all")
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    worker_env = {**prefect_env, "DEPSIM_HOME": str(REPO), "MLFLOW_TRACKING_URI": tracking,
                  "DEPSIM_RUN__STORE": str(tmp_path / "store"), "DEPSIM_RUN__EXPERIMENT": "registry-e2e",
                  "DEPSIM_SAMPLE__N": "40", "DEPSIM_TEST_CANDIDATE_KEY": SECRET_KEY}
    worker = services.start("worker", [py, "-m", "prefect", "worker", "start", "--pool", "depsim"], worker_env)
    receiver = services.start("receiver", [py, "-m", "deployments.receiver", "--host", "127.0.0.1", "--port",
                                           str(receiver_port), "--state", str(tmp_path / "receiver.sqlite")],
                              {**prefect_env, "DEPSIM_WEBHOOK_SECRET": WEBHOOK_SECRET})
    _wait("receiver", lambda: httpx.get(f"http://127.0.0.1:{receiver_port}/health", timeout=2).status_code == 200,
          60, [receiver])

    # Register the webhook, then a model version pointing at the synthetic world.
    client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    client.create_webhook(name="depsim", url=f"http://127.0.0.1:{receiver_port}/mlflow-webhook",
                          events=["model_version.created", "model_version_tag.set", "model_version_alias.created"],
                          secret=WEBHOOK_SECRET)
    time.sleep(2)  # the server caches its subscriber list for MLFLOW_WEBHOOK_CACHE_TTL (1 s here)
    client.create_registered_model("support-agent")
    training = client.create_run(client.create_experiment("training")).info.run_id  # where the version came from
    mv = client.create_model_version("support-agent", f"runs:/{training}/model", run_id=training, tags={
        "depsim.base_url": synthetic_server, "depsim.model": "synthetic-agent-v1",
        "depsim.api_key_env": "DEPSIM_TEST_CANDIDATE_KEY"})
    version = str(mv.version)

    def verdict() -> str | None:
        return client.get_model_version("support-agent", version).tags.get("depsim.verdict")

    # A second, redundant delivery for the same version (a tag that asks for a simulation).
    client.set_model_version_tag("support-agent", version, "depsim.simulate", "true")
    got = _wait("verdict written back", verdict, 600, [server, mlflow_server, worker, receiver])
    tags = client.get_model_version("support-agent", version).tags
    # v1 against its own logged turns, 40 turns: too few for any PASS on the 3% limits (the
    # Wilson upper bound at 0 of 40 is 8.8%), and no category FAILs.
    assert got == "INCONCLUSIVE", tags

    # Exactly one simulation: every other flow run of the registry deployment was skipped.
    def registry_runs() -> list[dict[str, Any]]:
        runs = httpx.post(f"{api}/flow_runs/filter", json={}, timeout=10).json()
        return [r for r in runs if r["parameters"].get("name") == "support-agent"]

    runs = _wait("both deliveries handled", lambda: (rs := registry_runs()) and len(rs) >= 2
                 and all(r["state_type"] in ("COMPLETED", "FAILED", "CRASHED") for r in rs) and rs, 180,
                 [server, worker])
    names = sorted(r["state_name"] for r in runs)
    assert names.count("Skipped") == len(runs) - 1, names
    expected = {"PASS": "Passed", "FAIL": "Gate failed", "INCONCLUSIVE": "Inconclusive"}[got]
    assert expected in names

    # The MLflow run: linked to the version, with its dataset, traces and judge assessments.
    run = client.get_run(tags["depsim.run_id"])
    assert run.data.tags["depsim.model.name"] == "support-agent"
    assert run.data.tags["depsim.model.version"] == version
    assert run.data.tags["depsim.verdict"] == got
    assert tags["depsim.report"] == f"runs:/{run.info.run_id}/report.html"
    assert run.inputs.dataset_inputs and run.inputs.dataset_inputs[0].dataset.name == "sampled-turns"
    assert run.info.end_time - run.info.start_time > 2000
    traces = client.search_traces(locations=[run.info.experiment_id], run_id=run.info.run_id, max_results=100)
    assert len(traces) == 40
    assert any(t.info.assessments for t in traces)
    if got == "PASS":
        assert client.get_model_version_by_alias("support-agent", "simulated-pass").version == version

    # The verdict event reached Prefect's event stream (the server stores events a few seconds late).
    def verdict_event() -> bool:
        events = httpx.post(f"{api}/events/filter", json={"filter": {"event": {"prefix": ["depsim.verdict."]}}},
                            timeout=10).json()["events"]
        return any(e["event"] == f"depsim.verdict.{got.lower()}" for e in events)

    _wait("the depsim.verdict event stored", verdict_event, 90, [server])

    # No planted secret in MLflow (params, tags, artifacts, traces), the report or Prefect's logs.
    exported: list[str] = [json.dumps(run.data.params), json.dumps(run.data.tags), json.dumps(tags)]
    art = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "downloaded")))
    exported += [p.read_text(errors="replace") for p in art.rglob("*") if p.is_file() and p.suffix != ".parquet"]
    exported += [p.read_bytes().decode("latin-1") for p in art.rglob("*.parquet")]
    exported += [t.to_json() for t in traces]
    logs = httpx.post(f"{api}/logs/filter", json={"limit": 200}, timeout=10).json()
    assert logs, "no Prefect logs reached the API"
    exported += [json.dumps(logs)]
    exported += [p.read_text(errors="replace") for p in services.logs]
    blob = "\n".join(exported)
    assert SECRET_KEY not in blob and WEBHOOK_SECRET not in blob

    # The polling fallback finds nothing left to start.
    polled = prefect("deployment", "run", "watch_registry/registry-watch", "--param", "grace_s=0", "--watch")
    assert polled.returncode == 0, polled.stdout[-2000:] + polled.stderr[-2000:]
    assert len(registry_runs()) == len(runs)
