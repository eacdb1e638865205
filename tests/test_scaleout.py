"""Scale-out: replay chunks as mapped Prefect tasks, locally or on a Dask cluster.

Fast tier: the plain chunk functions (plan, replay, resume, combine) on a tiny sample.
End-to-end tier: the real `depsim run` (its own Prefect temporary server) with the local task
runner, with prefect-dask on a local Dask cluster it starts itself, and on a cluster started
here whose worker is killed mid-chunk; the Prefect API is read back from this process (same
PREFECT_HOME).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import polars as pl
import pytest

from tasks.check import check_conversations, load_contract
from tasks.config import ConfigError, ReplayCfg, Settings, load_settings
from tasks.load import load_raw
from tasks.prefect_tasks import chunk_task_runner
from tasks.sample import build_turns, sample_turns
from tasks.stages import (
    ReplayChunksFailed,
    chunk_table_names,
    combine_chunks,
    plan_chunks,
    replay_chunk,
    stage_replay,
)
from tasks.store import RunStore
from tests.conftest import free_port, run_cli, synthetic_rows, write_jsonl

N_CONVERSATIONS, N_TURNS, CHUNK = 80, 60, 20
TIMING_COLUMNS = ["latency_s"]


# ---------------------------------------------------------------- plain functions (fast) ----

@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[pl.DataFrame, pl.DataFrame, Settings]:
    """25 sampled turns of 40 SYNTHETIC conversations; chunks of 10."""
    path = write_jsonl(tmp_path_factory.mktemp("small") / "logs.jsonl", synthetic_rows(40, seed=4))
    valid = check_conversations(load_raw(str(path)), load_contract(), 0.01, 0.1).valid
    sample, _ = sample_turns(build_turns(valid), 25, ["surface", "task_type", "uses_tools"], 7)
    return sample, valid, load_settings(overrides={"replay": {"chunk_size": 10, "cache": False}})


def test_plan_gives_each_chunk_only_its_conversations(small: tuple[pl.DataFrame, pl.DataFrame, Settings]) -> None:
    sample, valid, _ = small
    chunks = plan_chunks(sample, valid, 10)
    assert [c.sample.height for c in chunks] == [10, 10, 5]
    assert [c.start for c in chunks] == [0, 10, 20]
    assert pl.concat([c.sample for c in chunks]).equals(sample)
    for c in chunks:
        assert set(c.conversations["conversation_id"]) == set(c.sample["conversation_id"])
        assert c.conversations.columns == valid.columns
    (empty,) = plan_chunks(sample.clear(), valid, 10)  # an empty sample is one empty chunk
    assert empty.sample.height == 0 and empty.conversations.height == 0


def test_chunks_combine_to_the_whole_replay_and_resume(tmp_path: Path,
                                                       small: tuple[pl.DataFrame, pl.DataFrame, Settings]) -> None:
    sample, valid, s = small
    whole, whole_counts = stage_replay(sample, valid, s, RunStore(str(tmp_path / "a"), "run"))

    store = RunStore(str(tmp_path / "b"), "run")
    chunks = plan_chunks(sample, valid, s.replay.chunk_size)
    outcomes = [replay_chunk(c, s, store) for c in reversed(chunks)]  # any completion order
    for c in chunks:
        assert all((store.local / f"{n}.parquet").is_file() for n in chunk_table_names(c.index)[:2])
    traj, counts = combine_chunks(outcomes, store)
    assert traj.drop(TIMING_COLUMNS).equals(whole.drop(TIMING_COLUMNS))  # same rows, sample order
    assert counts == whole_counts and counts["model_calls"] >= sample.height
    assert pl.read_parquet(store.local / "model_calls.parquet").height == sum(
        o.counts["model_calls"] for o in outcomes)

    # Same run key again (a task retry, a rescheduled Dask task): complete chunks are not replayed.
    again = replay_chunk(chunks[1], s, store)
    assert again.resumed and again.counts == next(o for o in outcomes if o.index == 1).counts
    (store.local / chunk_table_names(2)[0]).with_suffix(".parquet").unlink()
    assert not replay_chunk(chunks[2], s, store).resumed  # a missing table: replayed


def test_dask_without_prefect_dask_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    assert chunk_task_runner(ReplayCfg()) is None  # local: the flow's own runner
    monkeypatch.setitem(sys.modules, "prefect_dask", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match=r'needs prefect-dask: pip install -e "\.\[dask\]"'):
        chunk_task_runner(ReplayCfg(task_runner="dask"))


# -------------------------------------------------------------------- end to end (real) ----

def _config(tmp_path: Path, name: str, replay: dict[str, Any], candidate: dict[str, Any] | None = None) -> Path:
    cfg: dict[str, Any] = {"replay": {"chunk_size": CHUNK, **replay}}
    if candidate:
        cfg["models"] = {"candidate": candidate}
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def _run(tmp_path: Path, data: Path, cfg: Path, name: str) -> tuple[dict[str, Any], Path]:
    store = tmp_path / f"store-{name}"
    proc = run_cli(["run", "--config", str(cfg), "--data", str(data), "--n", str(N_TURNS), "--seed", "3",
                    "--store", str(store), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--json"],
                   cwd=tmp_path)
    assert proc.returncode in (0, 1, 3), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    out = json.loads(proc.stdout)
    return out, Path(out["store"])


def _manifests(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(run_dir.glob("replay_chunk_*.json"))]


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[None]:
    """A temporary Prefect server on the database the CLI runs write (same PREFECT_HOME), for
    reading their runs back; stopped here rather than at interpreter exit."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with SubprocessASGIServer(free_port()) as server, temporary_settings({PREFECT_API_URL: server.api_url}):
        yield


def _chunk_task_runs(flow_run_id: str) -> list[Any]:
    """replay-chunk task runs of a flow run and its subflows, from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
        TaskRunFilter,
        TaskRunFilterName,
    )

    root = UUID(flow_run_id)
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[root])))
        ids = [root, *(r.id for r in children)]
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)),
                                     task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="replay-chunk-")))


def _assert_chunked(out: dict[str, Any], run_dir: Path) -> pl.DataFrame:
    """3 chunk tables and manifests; turns in = turns out; 3 completed replay-chunk task runs."""
    assert out["sampled_turns"] == N_TURNS
    assert sorted(p.name for p in run_dir.glob("trajectories_chunk_*.parquet")) == [
        f"trajectories_chunk_{i:05d}.parquet" for i in range(3)]
    assert [m["turns"] for m in _manifests(run_dir)] == [CHUNK] * 3
    traj = pl.read_parquet(run_dir / "trajectories.parquet")
    sample = pl.read_parquet(run_dir / "sample.parquet")
    assert traj.height == N_TURNS and traj["turn_id"].to_list() == sample["turn_id"].to_list()
    runs = _chunk_task_runs(out["flow_run_id"])
    assert sorted(r.name for r in runs) == [f"replay-chunk-{i}" for i in range(3)]
    assert all(r.state is not None and r.state.is_completed() for r in runs), [r.state for r in runs]
    return traj


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "logs.jsonl", synthetic_rows(N_CONVERSATIONS, seed=12))


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory, data: Path) -> tuple[dict[str, Any], Path]:
    tmp = tmp_path_factory.mktemp("local")
    return _run(tmp, data, _config(tmp, "local", {"task_runner": "local"}), "local")


@pytest.mark.e2e
@pytest.mark.usefixtures("prefect_api")
def test_local_runner_maps_chunks_as_tasks(local_run: tuple[dict[str, Any], Path]) -> None:
    out, run_dir = local_run
    _assert_chunked(out, run_dir)
    assert len({m["worker"] for m in _manifests(run_dir)}) == 1  # all in the flow's process


@pytest.mark.e2e
@pytest.mark.usefixtures("prefect_api")
def test_dask_runner_gives_the_same_trajectories(tmp_path: Path, data: Path,
                                                 local_run: tuple[dict[str, Any], Path]) -> None:
    pytest.importorskip("prefect_dask", reason="prefect-dask not installed (pip install -e '.[dask]')")
    out, run_dir = _run(tmp_path, data, _config(tmp_path, "dask", {"task_runner": "dask", "dask_workers": 2}),
                        "dask")
    traj = _assert_chunked(out, run_dir)
    local_out, local_dir = local_run
    local_worker = _manifests(local_dir)[0]["worker"]
    assert local_worker not in {m["worker"] for m in _manifests(run_dir)}  # replayed in Dask workers
    local = pl.read_parquet(local_dir / "trajectories.parquet")
    assert traj.drop(TIMING_COLUMNS).sort("turn_id").equals(local.drop(TIMING_COLUMNS).sort("turn_id"))
    assert out["model_calls"] == local_out["model_calls"] and out["metrics"] == local_out["metrics"]


@pytest.mark.e2e
@pytest.mark.usefixtures("prefect_api")
def test_a_failed_chunk_fails_the_replay_once_the_others_are_done(
        tmp_path: Path, small: tuple[pl.DataFrame, pl.DataFrame, Settings]) -> None:
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.simulate import replay_chunks

    sample, valid, s = small
    chunks = plan_chunks(sample, valid, s.replay.chunk_size)
    broken = dataclasses.replace(chunks[1], sample=chunks[1].sample.drop("user_msg_index"))
    store = RunStore(str(tmp_path), "run")
    one_at_a_time = replay_chunks.with_options(task_runner=ThreadPoolTaskRunner(max_workers=1))
    with pytest.raises(ReplayChunksFailed, match=r"1 of 3 chunks failed \(chunk 1\)") as failed:
        one_at_a_time([chunks[0], broken, chunks[2]], s, store)
    assert "user_msg_index" in str(failed.value.failures[1])
    assert sorted(p.name for p in store.local.glob("replay_chunk_*.json")) == [
        "replay_chunk_00000.json", "replay_chunk_00002.json"]  # chunk 2 ran after chunk 1 failed


@pytest.mark.e2e
@pytest.mark.usefixtures("prefect_api")
def test_lost_worker_loses_only_its_chunk(tmp_path: Path, data: Path) -> None:
    """SIGKILL a Dask worker part-way through a chunk: Dask runs that chunk again elsewhere, the
    other chunks run once, and the rerun takes the killed attempt's finished calls from the
    model cache: the endpoint gets each turn's request once, plus at most the ones in flight."""
    pytest.importorskip("prefect_dask", reason="prefect-dask not installed (pip install -e '.[dask]')")
    from distributed import Client, LocalCluster

    from tests.faulty_server import start_server

    concurrency, model = 2, "ok@300"  # 20 turns at 2 in flight, 300 ms each: ~3 s per chunk
    srv = start_server()
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    client = Client(cluster)
    try:
        install, read = _worker_probes()
        client.run(install)
        cfg = _config(tmp_path, "kill", {"task_runner": "dask", "dask_address": cluster.scheduler_address},
                      {"base_url": srv.url, "model": model, "concurrency": concurrency})
        result: dict[str, Any] = {}

        def depsim_run() -> None:
            try:
                result["run"] = _run(tmp_path, data, cfg, "kill")
            except BaseException as exc:  # re-raised below, in the test's thread
                result["error"] = exc

        run = threading.Thread(target=depsim_run, daemon=True)
        run.start()
        killed_pid, killed_key, lost = _kill_a_worker_mid_chunk(client, read, run)
        run.join(300)
        if "error" in result:
            raise result["error"]
        assert "run" in result, "depsim run did not finish in 300 s"
        out, run_dir = result["run"]
        _assert_chunked(out, run_dir)

        assert all(not m["worker"].endswith(f":{killed_pid}") for m in _manifests(run_dir))
        starts = client.run_on_scheduler(_processing_starts)
        reruns = {key for key, n in starts.items() if n > 1}
        assert killed_key in reruns and reruns <= lost, (starts, lost)  # the other chunks ran once
        assert out["cache_hits"] >= 2  # the killed attempt's finished turns were not called again
        assert out["model_calls"] + out["cache_hits"] == N_TURNS  # one call per turn ("ok" answers)
        log = srv.log()
        assert len({r["body"] for r in log}) == N_TURNS
        assert sum(r["attempt"] > 1 for r in log) <= concurrency  # only calls in flight were resent
    finally:
        client.close()
        cluster.close()
        srv.stop()


def _worker_probes() -> tuple[Callable[[Any], None], Callable[[Any], tuple[int, list[str]]]]:
    """(install, read) run inside the Dask workers; nested so they travel by value, not import.

    install counts the worker's replay progress ticks (one per finished turn, through
    tasks.progress) and warms its imports, so both workers start their first chunk together;
    read returns (ticks, keys of the tasks it is executing).
    """
    def install(dask_worker: Any) -> None:
        import tasks.prefect_tasks  # noqa: F401
        from tasks.progress import set_reporter

        dask_worker.replay_ticks = 0

        def tick(stage: str, done: int, total: int | None) -> None:
            if stage == "replay":
                dask_worker.replay_ticks += 1

        set_reporter(tick)

    def read(dask_worker: Any) -> tuple[int, list[str]]:
        return dask_worker.replay_ticks, [str(ts.key) for ts in dask_worker.state.executing]

    return install, read


def _kill_a_worker_mid_chunk(client: Any, read: Callable[[Any], tuple[int, list[str]]],
                             run: threading.Thread) -> tuple[int, str, set[str]]:
    """SIGKILL a worker whose first chunk has a few turns done and more to go.

    Returns its pid, the key of the chunk it was running and every key assigned to it.
    """
    deadline = time.time() + 240
    while time.time() < deadline and run.is_alive():
        for address, (ticks, executing) in client.run(read).items():
            if executing and 2 <= ticks <= CHUNK - 5:
                lost = {str(k) for k in client.processing()[address]} | {executing[0]}
                pid = client.run(os.getpid, workers=[address])[address]
                os.kill(pid, signal.SIGKILL)
                return pid, executing[0], lost
        time.sleep(0.05)
    raise AssertionError("no Dask worker was seen part-way through a chunk")


def _processing_starts(dask_scheduler: Any) -> dict[str, int]:
    """How many times the scheduler sent each task to a worker."""
    starts: dict[str, int] = {}
    for key, _start, finish, *_ in dask_scheduler.transition_log:
        if finish == "processing":
            starts[str(key)] = starts.get(str(key), 0) + 1
    return starts
