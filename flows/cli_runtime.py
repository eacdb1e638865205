"""What a long-running command needs around its flow: progress lines without long silences,
Prefect's temporary server started early and shielded from the terminal's Ctrl-C, and one clean
path for Ctrl-C and SIGTERM (exit 130, one line naming the command that resumes the run).

Used by `depsim run` (flows/cli.py) and `depsim backtest` (flows/cli_measure.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import typer

from tasks.progress import request_stop

EXIT_INTERRUPTED = 130


class Progress:
    """Progress lines on stderr: one per stage change and every ~10% of replay, a note before each
    step that takes a while without reporting and, once `watch()` runs, a line whenever nothing
    was printed for 5 s (then every 10 s while the step lasts): no long silent stretch."""

    def __init__(self, then: dict[str, str] | None = None) -> None:
        self.last: dict[str, int] = {}
        self.t0 = time.perf_counter()
        self.then = then or {}  # stage -> the step that follows it without reporting
        self.lock = threading.Lock()
        self.step = ""
        self.printed = self.step_t0 = self.t0
        self.quiet_s = 5.0
        self.stopped = threading.Event()
        self.watcher: threading.Thread | None = None

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        step = max(1, (total or 1) // 10)
        prev = self.last.get(stage, -step)
        if done != prev and (done - prev >= step or done == total):
            self.last[stage] = done
            self.note(f"{stage}{f' {done}/{total}' if total else ''}")
            if done == total and stage in self.then:
                self.note(self.then[stage])

    def note(self, text: str) -> None:
        with self.lock:
            self.step, self.step_t0 = text, time.perf_counter()
            self._echo(text)
            self.quiet_s = 5.0

    def _echo(self, text: str) -> None:
        self.printed = time.perf_counter()
        typer.echo(f"[{self.printed - self.t0:6.1f}s] {text}", err=True)

    def watch(self) -> None:
        self.watcher = threading.Thread(target=self._watch, name="depsim-progress", daemon=True)
        self.watcher.start()

    def _watch(self) -> None:
        while not self.stopped.wait(0.5):
            with self.lock:
                now = time.perf_counter()
                if self.step and now - self.printed >= self.quiet_s:
                    self._echo(f"… {now - self.step_t0:.0f} s since: {self.step}")
                    self.quiet_s = 10.0

    def close(self) -> None:
        """Stop the watcher (before exit: a daemon thread must not hold stderr then)."""
        self.stopped.set()
        if self.watcher is not None:
            self.watcher.join(2)


def quiet(_: str) -> None:
    """The note function of --json mode: stderr stays for errors."""


class ServerStart:
    """Prefect's temporary server, started in a thread while the pipeline is imported.

    Without PREFECT_API_URL a flow starts a temporary server (a uvicorn subprocess) on first use:
    10–20 s on a fresh PREFECT_HOME. Starting it here lets the CLI say so and import meanwhile,
    and SIGINT is blocked in the starting thread so that the server process inherits the block:
    the terminal's Ctrl-C, sent to the whole process group, then cannot stop the server before
    the interrupted flow run is marked. The server still stops on SIGTERM, at exit.
    """

    def __init__(self) -> None:
        from prefect.server.api.server import SubprocessASGIServer

        self.server = SubprocessASGIServer()  # the instance the flow's client will reuse
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.t0 = time.perf_counter()
        threading.Thread(target=self._start, name="depsim-prefect-server", daemon=True).start()

    def _start(self) -> None:
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        threading.Thread(target=self._watch_when_spawned, name="depsim-prefect-watch", daemon=True).start()
        try:
            self.server.start()
        except BaseException as exc:  # handed to the main thread by wait()
            self.error = exc
        finally:
            self.done.set()

    def _watch_when_spawned(self) -> None:
        """Start the watchdog as soon as the server process exists (its start-up takes 10–20 s)."""
        while self.server.server_process is None and not self.done.is_set():
            time.sleep(0.05)
        if self.server.server_process is not None:
            _watch(self.server.server_process)

    def abandon(self) -> None:
        """Interrupted while the server starts: stop it and leave now, skipping Python's shutdown.

        A thread still inside the start (in native code) would abort the interpreter's shutdown,
        and no flow run exists yet, so there is nothing else to clean up.
        """
        if self.done.is_set():
            return
        deadline = time.perf_counter() + 2
        while self.server.running and self.server.server_process is None and time.perf_counter() < deadline:
            time.sleep(0.05)  # the process is being spawned: stop it, never orphan it
        process = self.server.server_process
        if process is not None:
            process.terminate()
            try:
                process.wait(2)
            except subprocess.TimeoutExpired:  # still in its own start-up (migrations)
                process.kill()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)

    def wait(self) -> float:
        """Seconds the start took.

        Raises:
            RuntimeError: the server did not start.
        """
        while not self.done.wait(0.2):  # short waits: Ctrl-C stays prompt in the main thread
            pass
        if self.error is not None:
            raise RuntimeError(f"the temporary Prefect server did not start ({self.error}); raise "
                               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS or set PREFECT_API_URL "
                               "to a running `prefect server start`") from self.error
        return time.perf_counter() - self.t0


# Stops the temporary Prefect server when the CLI dies without its exit handlers (SIGKILL, the
# OOM killer): it polls its parent, then terminates the server if that pid is still the same
# process (its start time in /proc/<pid>/stat, checked again before SIGKILL).
_WATCHDOG = """
import os, signal, sys, time
parent, server, started = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def same():
    try:
        with open("/proc/%d/stat" % server, "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[19].decode() == started
    except (OSError, IndexError):
        return False
while os.getppid() == parent:
    time.sleep(0.5)
try:
    if same():
        os.kill(server, signal.SIGTERM)
        for _ in range(50):
            time.sleep(0.1)
            if not same():
                break
        else:
            os.kill(server, signal.SIGKILL)
except OSError:
    pass
"""
_watchdogs: list[subprocess.Popen[bytes]] = []  # kept: a dropped Popen of a live process warns


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks): a pid's identity over reuse."""
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _watch(process: subprocess.Popen[bytes]) -> None:
    """Start the watchdog of the temporary server (Linux: it reads /proc). A watchdog that cannot
    start costs only this protection."""
    started = _start_time(process.pid) if sys.platform.startswith("linux") else None
    if started is None:
        return
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    with contextlib.suppress(OSError):
        _watchdogs.append(subprocess.Popen(
            [sys.executable, "-S", "-c", _WATCHDOG, str(os.getpid()), str(process.pid), started],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=env, start_new_session=True, close_fds=True))  # no terminal signal reaches it


def start_prefect(note: Callable[[str], None]) -> ServerStart | None:
    """Start the temporary Prefect server when no API is configured; None when one is."""
    from prefect.settings import get_current_settings

    current = get_current_settings()
    if current.api.url:
        note(f"using the Prefect server at {current.api.url}")
        return None
    if not current.server.ephemeral.enabled:
        return None
    note("starting a temporary Prefect server (usually 10–20 s; set PREFECT_API_URL to use a running one)")
    return ServerStart()


def await_prefect(server: ServerStart | None, note: Callable[[str], None]) -> None:
    if server is None:
        return
    if not server.done.is_set():
        note("waiting for the Prefect server")
    note(f"Prefect server ready ({server.wait():.1f} s)")


def import_pipeline(note: Callable[[str], None]) -> None:
    """Import what the flow's stages import on first use, while the Prefect server starts, so
    the stages themselves start without a silent pause (Great Expectations alone takes ~3 s)."""
    note("loading the pipeline: Prefect flows, Great Expectations, MLflow (a few seconds)")
    import great_expectations  # noqa: F401
    import mlflow  # noqa: F401

    import flows.simulate  # noqa: F401


signals_seen = 0
interrupt_shown = False


def on_signal(signum: int, frame: Any) -> None:
    """SIGINT and SIGTERM: the first raises KeyboardInterrupt (one path for both) and asks
    running stages to stop; a second one while depsim cleans up is ignored; a third exits now."""
    global signals_seen
    signals_seen += 1
    request_stop()
    if signals_seen == 1:
        raise KeyboardInterrupt
    if signals_seen >= 3:
        os.write(2, b"interrupted again: exiting without cleanup\n")
        os._exit(EXIT_INTERRUPTED)


def on_unraisable(hook: Any) -> None:
    """An interrupt that landed in a finalizer or a weakref callback, where Python can only print
    it with a traceback and drop it: deliver it again, to the main thread's own code."""
    global signals_seen
    if hook.exc_type is not None and issubclass(hook.exc_type, KeyboardInterrupt):
        if signals_seen == 1:
            signals_seen = 0  # so the redelivered signal raises again
        import _thread

        _thread.interrupt_main()
        return
    sys.__unraisablehook__(hook)


def interrupt_types() -> tuple[type[BaseException], ...]:
    try:  # SIGTERM during a flow arrives as Prefect's TerminationSignal
        from prefect.exceptions import TerminationSignal
    except ImportError:
        return (KeyboardInterrupt,)
    return (KeyboardInterrupt, TerminationSignal)


def interrupted(as_json: bool, cached: bool, server: ServerStart | None) -> NoReturn:
    """The one line of an interrupted run, naming the command that resumes it."""
    global interrupt_shown
    interrupt_shown = True
    command = shlex.join(["depsim", *sys.argv[1:]])
    if cached:
        line = f"interrupted; resume with `{command}` (the model-call cache keeps every completed call)"
    else:
        line = f"interrupted; rerun with `{command}` (replay.cache is off: every model call is made again)"
    typer.secho(line, fg="yellow", err=True)
    if as_json:
        print(json.dumps({"error": "interrupted", "interrupted": True, "resume": command}))
    if server is not None:
        server.abandon()
    raise typer.Exit(EXIT_INTERRUPTED)
