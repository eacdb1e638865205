"""The simulator's guard: nothing can execute, touch files or open sockets while a tool is simulated."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest

from tasks.toolsim import ExecutionForbidden, ToolSimulator, no_execution


def test_guard_blocks_processes_files_and_sockets(tmp_path: Path) -> None:
    target = tmp_path / "victim.txt"
    target.write_text("keep me")
    with no_execution():
        with pytest.raises(ExecutionForbidden):
            subprocess.run(["rm", str(target)], check=False)
        with pytest.raises(ExecutionForbidden):
            target.unlink()
        with pytest.raises(ExecutionForbidden):
            open(tmp_path / "new.txt", "w")  # noqa: SIM115
        with pytest.raises(ExecutionForbidden):
            socket.create_connection(("127.0.0.1", 9), timeout=0.1)
    assert target.read_text() == "keep me" and not (tmp_path / "new.txt").exists()
    # outside the guard the process works normally
    assert subprocess.run(["true"], check=False).returncode == 0


def test_a_simulator_that_tries_to_execute_is_stopped(tmp_path: Path) -> None:
    victim = tmp_path / "dir"
    victim.mkdir()

    class Leaky(ToolSimulator):
        def _shell(self, command: str) -> str:
            subprocess.run(command, shell=True, check=False)  # the bug the guard exists for
            return ""

    sim = Leaky([], ["rules"])
    with pytest.raises(ExecutionForbidden):
        sim.simulate("shell", json.dumps({"command": f"rm -rf {victim} /nonexistent-depsim-canary"}))
    assert victim.is_dir()
    # the real simulator answers the same call without touching anything
    res = ToolSimulator([], ["rules"]).simulate("shell", json.dumps({"command": f"rm -rf {victim} /nonexistent-depsim-canary"}))
    assert res.source == "rules" and "destructive" in res.effects and victim.is_dir()
