"""Shared fixtures. Prefect and MLflow get private, throw-away homes per test session."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="depsim-tests-"))
os.environ.setdefault("PREFECT_HOME", str(_SESSION_HOME / "prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
for key in [k for k in os.environ if k.startswith("DEPSIM_") and k != "DEPSIM_SHARED_DATASETS"]:
    os.environ.pop(key)  # tests see the documented defaults, not the developer's shell


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(row if isinstance(row, str) else json.dumps(row))
            fh.write("\n")
    return path


def synthetic_rows(n: int, seed: int = 0, model: str = "synthetic-agent-v1") -> list[dict[str, Any]]:
    from tasks.synthetic.logs import generate

    rows = []
    for conv in generate(n, model, seed):
        conv.pop("_truth")
        rows.append(conv)
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def synthetic_server() -> Iterator[str]:
    """`depsim serve-synthetic` on a loopback port; yields its base_url; stopped by pid."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve-synthetic", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve-synthetic exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("serve-synthetic did not start in 60 s")
    yield f"{url}/v1"
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_cli(args: list[str], cwd: Path, timeout: float = 600,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real `depsim` CLI in a subprocess (its own Prefect temporary server)."""
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
