"""Ctrl-C and SIGTERM during `depsim run`: a prompt stop, exit 130, one line naming the command
that resumes the run, the Prefect flow run marked CRASHED or CANCELLED, no stack dump, no
temporary Prefect server left behind; and the printed command really resumes from the cache."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

START_TIMEOUT = 240   # a fresh PREFECT_HOME: the temporary server's migrations, on a busy machine
STOP_TIMEOUT = 60     # measured: 1–4 s from the signal to exit on the 2-core machine


class _Run:
    """`depsim run` in its own session (process group), stderr read line by line."""

    def __init__(self, args: list[str], tmp: Path) -> None:
        self.home = tmp / "prefect"
        env = {**os.environ, "PREFECT_HOME": str(self.home)}
        env.pop("PREFECT_API_URL", None)  # the run's own temporary server, in PREFECT_HOME
        self.proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=tmp, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self.replaying = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if "] replay " in line:
                self.replaying.set()

    def wait_for_replay(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not self.replaying.wait(0.5):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail("no replay progress on stderr:\n" + "\n".join(self.lines[-30:]))

    def stop(self, sig: signal.Signals, group: bool) -> tuple[int, float, str]:
        """Send `sig` (to the whole process group, as a terminal's Ctrl-C does, or to the CLI
        alone, as `kill` does); the exit status, the seconds to exit and stdout."""
        t0 = time.monotonic()
        if group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(STOP_TIMEOUT)  # stderr belongs to the reader thread: no communicate()
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"no exit {STOP_TIMEOUT} s after {sig.name}:\n" + "\n".join(self.lines[-30:]))
        seconds = time.monotonic() - t0
        self.reader.join(10)
        assert self.proc.stdout is not None
        return self.proc.returncode, seconds, self.proc.stdout.read()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def _flow_run_states(home: Path) -> list[str]:
    with sqlite3.connect(home / "prefect.db") as db:
        return [row[0] for row in db.execute("SELECT state_type FROM flow_run")]


def _servers_of(home: Path) -> list[str]:
    """Pids of processes (the temporary Prefect server) still running with this PREFECT_HOME."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if f"PREFECT_HOME={home}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                found.append(proc.name)
        except OSError:
            continue
    return found


def _assert_interrupted(run: _Run, code: int, seconds: float, store: Path, command: str) -> str:
    stderr = "\n".join(run.lines)
    assert code == 130, stderr[-3000:]
    assert seconds < STOP_TIMEOUT
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]
    after = [line for line in run.lines if not line.startswith("[")]  # not progress lines
    assert len(after) == 1, stderr[-3000:]
    line = after[0]
    assert line.startswith(f"interrupted; resume with `{command}`"), line
    states = _flow_run_states(run.home)
    assert states and all(state in ("CRASHED", "CANCELLED") for state in states), states
    assert not list(store.glob("*/trajectories.parquet"))  # replay stopped before its end
    if sys.platform.startswith("linux"):
        deadline = time.monotonic() + 10
        while _servers_of(run.home) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _servers_of(run.home) == []  # the temporary Prefect server is gone
    return line


@pytest.mark.e2e
def test_ctrl_c_during_replay_stops_cleanly(tmp_path: Path) -> None:
    store = tmp_path / "store"
    args = ["run", "--n", "1000", "--store", str(store), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    run = _Run(args, tmp_path)
    run.wait_for_replay()
    code, seconds, out = run.stop(signal.SIGINT, group=True)  # a terminal's Ctrl-C
    _assert_interrupted(run, code, seconds, store, shlex.join(["depsim", *args]))
    assert out == ""


@pytest.mark.e2e
def test_sigterm_during_replay_stops_cleanly_and_the_printed_command_resumes(tmp_path: Path) -> None:
    store = tmp_path / "store"
    args = ["run", "--n", "500", "--store", str(store), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    run = _Run(args, tmp_path)
    run.wait_for_replay()
    time.sleep(1)  # let some model calls complete and reach the cache
    code, seconds, _ = run.stop(signal.SIGTERM, group=False)  # `kill PID`
    line = _assert_interrupted(run, code, seconds, store, shlex.join(["depsim", *args]))

    command = shlex.split(line.split("`")[1])
    assert command[0] == "depsim"
    env = {**os.environ, "PREFECT_HOME": str(run.home)}
    rerun = subprocess.run([sys.executable, "-m", "flows.cli", *command[1:], "--json"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=900)
    assert rerun.returncode in (0, 1, 3), rerun.stderr[-3000:]
    out = json.loads(rerun.stdout)
    assert out["cache_hits"] > 0  # the interrupted run's completed calls are not made again
    assert out["sampled_turns"] == 500


@pytest.mark.e2e
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the watchdog reads /proc")
def test_sigkill_leaves_no_temporary_prefect_server_behind(tmp_path: Path) -> None:
    """SIGKILL (or the OOM killer) runs no exit handler; the watchdog stops the server."""
    args = ["run", "--n", "300", "--store", str(tmp_path / "store"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    run = _Run(args, tmp_path)
    try:
        run.wait_for_replay()
        assert _servers_of(run.home)  # the temporary server is up
        run.proc.kill()  # the CLI alone, as the OOM killer would
        run.proc.wait(10)
        deadline = time.monotonic() + 20
        while _servers_of(run.home) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _servers_of(run.home) == []
    finally:
        run.kill()
