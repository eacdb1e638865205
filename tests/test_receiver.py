"""deployments/receiver.py: MLflow webhook verification, replay protection, routing and emitting.

Fast tests run the receiver in-process on a loopback port with a recording emitter and send real
HTTP requests signed by MLflow's own signer. The e2e tests start a real `prefect server start`
(the real emitter puts the event on it) and a real `mlflow server` (it delivers the webhook).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from mlflow.webhooks.delivery import _generate_hmac_signature

from deployments.receiver import (
    EVENT_NAME,
    EmitError,
    ModelVersionReady,
    PrefectEventsEmitter,
    ReceiverServer,
    ReplayStore,
    build,
)
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
SECRET = "s3cret-webhook-key-Ω"  # non-ASCII: MLflow signs with the UTF-8 bytes


class Recorder:
    """An emitter that records events and can be told to fail the next n calls."""

    def __init__(self) -> None:
        self.events: list[ModelVersionReady] = []
        self.calls = 0
        self.fail_next = 0
        self._lock = threading.Lock()

    def __call__(self, ready: ModelVersionReady) -> None:
        with self._lock:
            self.calls += 1
            if self.fail_next:
                self.fail_next -= 1
                raise EmitError("Prefect API answered 500 to POST /events")
            self.events.append(ready)


def mlflow_body(entity: str, action: str, data: dict[str, Any]) -> bytes:
    """The body as mlflow/webhooks/delivery.py builds it."""
    return json.dumps({"entity": entity, "action": action,
                       "timestamp": datetime.now(UTC).isoformat(), "data": data}).encode()


def signed(body: bytes, *, delivery_id: str | None = None, ts: int | None = None,
           secret: str = SECRET) -> dict[str, str]:
    delivery_id = delivery_id or str(uuid.uuid4())
    timestamp = str(int(time.time()) if ts is None else ts)
    return {"Content-Type": "application/json", "X-MLflow-Delivery-Id": delivery_id,
            "X-MLflow-Timestamp": timestamp,
            "X-MLflow-Signature": _generate_hmac_signature(secret, delivery_id, timestamp, body.decode())}


CREATED = {"name": "agent", "version": "3", "source": "models:/m-123", "run_id": None,
           "tags": {"depsim.base_url": "http://127.0.0.1:9/v1"}, "description": None}


def post(server: ReceiverServer, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(server.url, content=body, headers=headers, timeout=10)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def receiver(tmp_path: Path, recorder: Recorder) -> Iterator[ReceiverServer]:
    with build(SECRET, recorder, state_path=tmp_path / "receiver.sqlite") as server:
        yield server


def test_accepts_a_created_model_version(receiver: ReceiverServer, recorder: Recorder) -> None:
    body = mlflow_body("model_version", "created", CREATED)
    headers = signed(body)
    r = post(receiver, body, headers)
    assert r.status_code == 202, r.text
    (ready,) = recorder.events
    delivery_id = headers["X-MLflow-Delivery-Id"]
    assert r.json() == {"accepted": True, "event": EVENT_NAME, "event_id": str(ready.event_id)}
    assert ready.event_id == uuid.uuid5(uuid.uuid5(uuid.NAMESPACE_URL, "depsim:mlflow-webhook"),
                                        json.dumps(["agent", "3", delivery_id]))
    assert ready.resource() == {"prefect.resource.id": "mlflow.model-version.agent.3",
                                "mlflow.model.name": "agent", "mlflow.model.version": "3"}
    assert ready.payload() == {"name": "agent", "version": "3", "trigger": "model_version.created",
                               "delivery_id": delivery_id}
    assert ready.occurred == datetime.fromtimestamp(int(headers["X-MLflow-Timestamp"]), UTC)


@pytest.mark.parametrize("key", ["depsim.base_url", "depsim.model", "depsim.api_key_env", "depsim.simulate"])
def test_accepts_a_trigger_tag(receiver: ReceiverServer, recorder: Recorder, key: str) -> None:
    body = mlflow_body("model_version_tag", "set", {"name": "agent", "version": "3", "key": key, "value": "v"})
    r = post(receiver, body, signed(body))
    assert r.status_code == 202, r.text
    (ready,) = recorder.events
    assert ready.payload()["trigger"] == "model_version_tag.set"
    assert ready.payload()["tag"] == {"key": key, "value": "v"}


def test_accepts_an_alias(receiver: ReceiverServer, recorder: Recorder) -> None:
    body = mlflow_body("model_version_alias", "created", {"name": "agent", "alias": "candidate", "version": "4"})
    r = post(receiver, body, signed(body))
    assert r.status_code == 202, r.text
    (ready,) = recorder.events
    assert (ready.name, ready.version, ready.payload()["alias"]) == ("agent", "4", "candidate")
    assert ready.payload()["trigger"] == "model_version_alias.created"


@pytest.mark.parametrize("drop", [None, "X-MLflow-Signature", "X-MLflow-Timestamp", "X-MLflow-Delivery-Id"])
def test_unsigned_or_partly_signed_is_401(receiver: ReceiverServer, recorder: Recorder, drop: str | None) -> None:
    body = mlflow_body("model_version", "created", CREATED)
    headers = signed(body)
    if drop is None:
        headers = {"Content-Type": "application/json"}
    else:
        headers.pop(drop)
    r = post(receiver, body, headers)
    assert (r.status_code, r.json()) == (401, {"error": "missing_signature"})
    assert recorder.calls == 0


@pytest.mark.parametrize("tamper", ["wrong_secret", "body", "delivery_id", "timestamp", "version_prefix", "garbage"])
def test_bad_signature_is_401(receiver: ReceiverServer, recorder: Recorder, tamper: str) -> None:
    body = mlflow_body("model_version", "created", CREATED)
    headers = signed(body, secret="not-the-secret" if tamper == "wrong_secret" else SECRET)
    if tamper == "body":
        body = body.replace(b'"3"', b'"4"')
    elif tamper == "delivery_id":
        headers["X-MLflow-Delivery-Id"] = str(uuid.uuid4())
    elif tamper == "timestamp":
        headers["X-MLflow-Timestamp"] = str(int(headers["X-MLflow-Timestamp"]) - 1)
    elif tamper == "version_prefix":
        headers["X-MLflow-Signature"] = "v2," + headers["X-MLflow-Signature"][3:]
    elif tamper == "garbage":
        headers["X-MLflow-Signature"] = "v1,not-base64"
    r = post(receiver, body, headers)
    assert (r.status_code, r.json()) == (401, {"error": "bad_signature"})
    assert recorder.calls == 0


@pytest.mark.parametrize("ts", [-301, +301, -86_400, "abc", "1e9", "-5"])
def test_stale_or_unparseable_timestamp_is_401(receiver: ReceiverServer, recorder: Recorder, ts: int | str) -> None:
    body = mlflow_body("model_version", "created", CREATED)
    if isinstance(ts, int):
        headers = signed(body, ts=int(time.time()) + ts)
    else:  # correctly signed, so it is the timestamp that is refused
        delivery_id = str(uuid.uuid4())
        headers = {"X-MLflow-Delivery-Id": delivery_id, "X-MLflow-Timestamp": ts,
                   "X-MLflow-Signature": _generate_hmac_signature(SECRET, delivery_id, ts, body.decode())}
    r = post(receiver, body, headers)
    assert (r.status_code, r.json()) == (401, {"error": "stale"})
    assert recorder.calls == 0


def test_timestamp_inside_the_window_is_accepted(receiver: ReceiverServer, recorder: Recorder) -> None:
    for offset in (-290, +290):
        body = mlflow_body("model_version", "created", CREATED)
        assert post(receiver, body, signed(body, ts=int(time.time()) + offset)).status_code == 202
    assert len(recorder.events) == 2


def test_replayed_delivery_is_409_and_emitted_once(receiver: ReceiverServer, recorder: Recorder) -> None:
    body = mlflow_body("model_version", "created", CREATED)
    headers = signed(body)
    assert post(receiver, body, headers).status_code == 202
    r = post(receiver, body, headers)
    assert (r.status_code, r.json()) == (409, {"error": "replayed"})
    assert len(recorder.events) == 1 and recorder.calls == 1


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'"text"', b"\xff\xfe{}", b""])
def test_malformed_json_is_400(receiver: ReceiverServer, recorder: Recorder, body: bytes) -> None:
    delivery_id, ts = str(uuid.uuid4()), str(int(time.time()))
    # Signed over the raw bytes (MLflow's signer takes str, so it cannot sign invalid UTF-8).
    digest = hmac.new(SECRET.encode(), f"{delivery_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    headers = {"X-MLflow-Delivery-Id": delivery_id, "X-MLflow-Timestamp": ts,
               "X-MLflow-Signature": "v1," + base64.b64encode(digest).decode()}
    r = post(receiver, body, headers)
    assert (r.status_code, r.json()) == (400, {"error": "bad_json"})
    assert recorder.calls == 0


@pytest.mark.parametrize("doc", [
    {"action": "created", "data": CREATED},
    {"entity": "model_version", "data": CREATED},
    {"entity": "model_version", "action": "created"},
    {"entity": "model_version", "action": "created", "data": "agent"},
    {"entity": "model_version", "action": "created", "data": {"version": "3"}},
    {"entity": "model_version", "action": "created", "data": {"name": "agent"}},
    {"entity": "model_version", "action": "created", "data": {"name": "agent", "version": "three"}},
    {"entity": "model_version_tag", "action": "set", "data": {"name": "agent", "version": "3"}},
    {"entity": "model_version_alias", "action": "created", "data": {"name": "agent", "version": "3"}},
])
def test_missing_fields_is_400(receiver: ReceiverServer, recorder: Recorder, doc: dict[str, Any]) -> None:
    body = json.dumps(doc).encode()
    r = post(receiver, body, signed(body))
    assert (r.status_code, r.json()) == (400, {"error": "missing_fields"})
    assert recorder.calls == 0


@pytest.mark.parametrize("entity,action,data", [
    ("registered_model", "created", {"name": "agent", "tags": {}, "description": None}),
    ("model_version_tag", "deleted", {"name": "agent", "version": "3", "key": "depsim.model"}),
    ("model_version_alias", "deleted", {"name": "agent", "alias": "candidate"}),
    ("prompt_version", "created", {"name": "p", "version": "1", "template": "hi", "tags": {}}),
])
def test_unknown_event_is_422(receiver: ReceiverServer, recorder: Recorder, entity: str, action: str,
                              data: dict[str, Any]) -> None:
    body = mlflow_body(entity, action, data)
    r = post(receiver, body, signed(body))
    assert (r.status_code, r.json()) == (422, {"error": "unsupported_event"})
    assert recorder.calls == 0


@pytest.mark.parametrize("key", ["depsim.verdict", "depsim.run_id", "depsim.claim", "example_key"])
def test_own_and_foreign_tags_are_ignored(receiver: ReceiverServer, recorder: Recorder, key: str) -> None:
    body = mlflow_body("model_version_tag", "set", {"name": "agent", "version": "3", "key": key, "value": "PASS"})
    r = post(receiver, body, signed(body))
    assert (r.status_code, r.json()) == (200, {"ignored": "tag_not_trigger"})
    assert recorder.calls == 0


def test_own_alias_is_ignored(receiver: ReceiverServer, recorder: Recorder, tmp_path: Path) -> None:
    body = mlflow_body("model_version_alias", "created", {"name": "agent", "alias": "simulated-pass", "version": "3"})
    r = post(receiver, body, signed(body))
    assert (r.status_code, r.json()) == (200, {"ignored": "own_alias"})
    assert recorder.calls == 0
    with build(SECRET, recorder, state_path=tmp_path / "other.sqlite", ignore_alias="shipped") as other:
        assert post(other, body, signed(body)).status_code == 202  # --ignore-alias names another alias
        body = mlflow_body("model_version_alias", "created", {"name": "agent", "alias": "shipped", "version": "3"})
        assert post(other, body, signed(body)).json() == {"ignored": "own_alias"}


def test_oversized_body_is_413(receiver: ReceiverServer, recorder: Recorder) -> None:
    data = {**CREATED, "description": "x" * 2**20}
    body = mlflow_body("model_version", "created", data)
    r = post(receiver, body, signed(body))
    assert (r.status_code, r.json()) == (413, {"error": "too_large"})
    assert recorder.calls == 0
    assert httpx.get(receiver.url.replace("/mlflow-webhook", "/health")).status_code == 200


def test_paths_methods_and_health(receiver: ReceiverServer) -> None:
    base = receiver.url.removesuffix("/mlflow-webhook")
    assert (httpx.get(f"{base}/health").status_code, httpx.get(f"{base}/health").json()) == (200, {"status": "ok"})
    assert httpx.post(f"{base}/other", content=b"{}").status_code == 404
    assert httpx.get(f"{base}/other").json() == {"error": "not_found"}
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        r = httpx.request(method, receiver.url)
        assert (r.status_code, r.json()) == (405, {"error": "method_not_allowed"}), method
    assert httpx.post(f"{base}/health", content=b"{}").status_code == 405


def test_emitter_failure_is_503_and_the_retry_is_accepted(receiver: ReceiverServer, recorder: Recorder) -> None:
    recorder.fail_next = 1
    body = mlflow_body("model_version", "created", CREATED)
    headers = signed(body)
    r = post(receiver, body, headers)
    assert (r.status_code, r.json()) == (503, {"error": "emit_failed"})
    assert "Retry-After" in r.headers  # MLflow's urllib3 Retry honours it
    assert receiver.app.store.count() == 0  # not recorded: the retry must get through
    retry = post(receiver, body, headers)  # MLflow re-sends the identical request
    assert retry.status_code == 202, retry.text
    assert post(receiver, body, headers).status_code == 409
    assert len(recorder.events) == 1 and recorder.calls == 2


def test_concurrent_redelivery_is_503_in_progress(tmp_path: Path) -> None:
    """MLflow re-sends after its 30 s timeout while the first attempt may still be emitting."""
    release, entered, events = threading.Event(), threading.Event(), []

    def slow_emit(ready: ModelVersionReady) -> None:
        entered.set()
        assert release.wait(10)
        events.append(ready)

    body = mlflow_body("model_version", "created", CREATED)
    headers = signed(body)
    with build(SECRET, slow_emit, state_path=tmp_path / "s.sqlite") as server:
        first: list[httpx.Response] = []
        worker = threading.Thread(target=lambda: first.append(post(server, body, headers)))
        worker.start()
        assert entered.wait(10)
        second = post(server, body, headers)
        assert (second.status_code, second.json()) == (503, {"error": "in_progress"})
        assert second.headers["Retry-After"] == "1"
        release.set()
        worker.join(10)
        assert first[0].status_code == 202
        assert post(server, body, headers).status_code == 409
    assert len(events) == 1


def test_replay_protection_survives_a_restart(tmp_path: Path, recorder: Recorder) -> None:
    state = tmp_path / "state" / "receiver.sqlite"
    body = mlflow_body("model_version", "created", CREATED)
    headers = signed(body)
    with build(SECRET, recorder, state_path=state) as first:
        assert post(first, body, headers).status_code == 202
    with build(SECRET, recorder, state_path=state) as second:
        assert post(second, body, headers).status_code == 409
        fresh = mlflow_body("model_version", "created", CREATED)
        assert post(second, fresh, signed(fresh)).status_code == 202
    assert len(recorder.events) == 2


def test_state_is_pruned_past_the_skew_window(tmp_path: Path, recorder: Recorder) -> None:
    now = [time.time()]
    clock: Callable[[], float] = lambda: now[0]  # noqa: E731
    with build(SECRET, recorder, state_path=tmp_path / "s.sqlite", clock=clock) as server:
        old = mlflow_body("model_version", "created", CREATED)
        old_headers = signed(old, ts=int(now[0]))
        assert post(server, old, old_headers).status_code == 202
        now[0] += 1000
        new = mlflow_body("model_version", "created", CREATED)
        assert post(server, new, signed(new, ts=int(now[0]))).status_code == 202
        assert server.app.store.count() == 1  # the old id is gone ...
        assert post(server, old, old_headers).json() == {"error": "stale"}  # ... and its replay is stale


def test_one_log_line_per_outcome_without_secrets(receiver: ReceiverServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="depsim.receiver")
    body = mlflow_body("model_version", "created", CREATED)
    good = signed(body)
    bad = {**good, "X-MLflow-Signature": signed(body, secret="wrong")["X-MLflow-Signature"]}
    post(receiver, body, bad)
    post(receiver, body, good)
    post(receiver, body, good)
    lines = [r.getMessage() for r in caplog.records if r.name == "depsim.receiver"]
    assert len(lines) == 3, lines
    delivery_id = good["X-MLflow-Delivery-Id"]
    for line, outcome, status in zip(lines, ["rejected", "accepted", "rejected"], [401, 202, 409], strict=True):
        assert f"outcome={outcome}" in line and f"status={status}" in line
        assert f"delivery_id={delivery_id}" in line and "remote=127.0.0.1" in line
    assert "reason=bad_signature" in lines[0] and "reason=replayed" in lines[2]
    text = "\n".join(lines)
    assert SECRET not in text and good["X-MLflow-Signature"][3:] not in text and bad["X-MLflow-Signature"][3:] not in text


def test_replay_store_keeps_ids(tmp_path: Path) -> None:
    store = ReplayStore(tmp_path / "a" / "b.sqlite")
    store.record("d1", 100, "e1", prune_before=0)
    store.record("d1", 100, "e1", prune_before=0)  # idempotent
    assert store.seen("d1") and not store.seen("d2") and store.count() == 1
    store.close()


def test_prefect_emitter_raises_when_the_server_is_unreachable() -> None:
    emitter = PrefectEventsEmitter(f"http://127.0.0.1:{free_port()}/api", timeout=2)
    ready = ModelVersionReady(name="agent", version="1", trigger="model_version.created", delivery_id="d",
                              occurred=datetime.now(UTC))
    with pytest.raises(EmitError, match="unreachable"):
        emitter(ready)
    emitter.close()


def _run_module(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deployments.receiver", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_refuses_to_start_without_the_secret() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DEPSIM_WEBHOOK_SECRET"}
    result = _run_module(["--port", str(free_port())], env)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "DEPSIM_WEBHOOK_SECRET is not set" in result.stderr


def test_refuses_to_start_without_a_prefect_api_url(tmp_path: Path) -> None:
    env = {**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}, "DEPSIM_WEBHOOK_SECRET": SECRET,
           "PREFECT_HOME": str(tmp_path / "prefect")}
    result = _run_module(["--port", str(free_port()), "--state", str(tmp_path / "s.sqlite")], env)
    assert result.returncode == 2 and "PREFECT_API_URL is not set" in result.stderr
    assert result.stderr.strip().count("\n") == 0


def _wait_http(url: str, proc: subprocess.Popen[Any], timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, f"{what} exited with {proc.returncode}"
        assert time.time() < deadline, f"{what} did not answer {url} within {timeout:.0f} s"
        time.sleep(0.3)


def _stop(proc: subprocess.Popen[Any]) -> None:
    """Stop a process started with start_new_session=True, and its children, by its group id."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_cli_process_answers_503_while_prefect_is_down(tmp_path: Path) -> None:
    """`python -m deployments.receiver` with the real emitter: Prefect unreachable -> 503, JSON logs."""
    port = free_port()
    env = {**os.environ, "DEPSIM_WEBHOOK_SECRET": SECRET, "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"}
    proc = subprocess.Popen([sys.executable, "-m", "deployments.receiver", "--port", str(port), "--json-logs",
                             "--state", str(tmp_path / "s.sqlite"), "--emit-timeout", "2"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", proc, 60, "receiver")
        body = mlflow_body("model_version", "created", CREATED)
        headers = signed(body)
        r = httpx.post(f"http://127.0.0.1:{port}/mlflow-webhook", content=body, headers=headers, timeout=20)
        assert (r.status_code, r.json()) == (503, {"error": "emit_failed"})
    finally:
        _stop(proc)
    assert proc.returncode == 0  # SIGTERM stops it cleanly
    stderr = proc.stderr.read() if proc.stderr else ""
    records = [json.loads(line) for line in stderr.splitlines()]
    (rejection,) = [r for r in records if r.get("outcome") == "rejected"]
    assert rejection["reason"] == "emit_failed" and rejection["status"] == 503
    assert rejection["delivery_id"] == headers["X-MLflow-Delivery-Id"]
    assert SECRET not in stderr and headers["X-MLflow-Signature"][3:] not in stderr


@pytest.fixture
def prefect_server(tmp_path: Path) -> Iterator[str]:
    """A real `prefect server start` on a free loopback port; yields its API URL; stopped by pid."""
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/api/health", proc, 120, "prefect server")
        yield f"http://127.0.0.1:{port}/api"
    finally:
        _stop(proc)


def _events(api: str, event_id: str | None = None) -> list[dict[str, Any]]:
    flt: dict[str, Any] = {"event": {"name": [EVENT_NAME]}}
    if event_id:
        flt["id"] = {"id": [event_id]}
    r = httpx.post(f"{api}/events/filter", json={"filter": flt, "limit": 50}, timeout=10)
    r.raise_for_status()
    return list(r.json()["events"])


def _wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.time() + timeout
    while not (found := check()):
        assert time.time() < deadline, f"{what} not seen within {timeout:.0f} s"
        time.sleep(0.5)
    return found


@pytest.mark.e2e
def test_real_emitter_puts_the_event_on_a_prefect_server(prefect_server: str, tmp_path: Path) -> None:
    emitter = PrefectEventsEmitter(prefect_server, timeout=10)
    with build(SECRET, emitter, state_path=tmp_path / "s.sqlite") as server:
        body = mlflow_body("model_version_tag", "set",
                           {"name": "agent", "version": "7", "key": "depsim.base_url", "value": "http://x/v1"})
        headers = signed(body)
        r = post(server, body, headers)
        assert r.status_code == 202, r.text
        event_id = r.json()["event_id"]
        (event,) = _wait_for(lambda: _events(prefect_server, event_id), 60, "the event on the Prefect server")
    assert event["event"] == EVENT_NAME
    assert event["resource"] == {"prefect.resource.id": "mlflow.model-version.agent.7",
                                 "mlflow.model.name": "agent", "mlflow.model.version": "7"}
    assert event["payload"] == {"name": "agent", "version": "7", "trigger": "model_version_tag.set",
                                "delivery_id": headers["X-MLflow-Delivery-Id"],
                                "tag": {"key": "depsim.base_url", "value": "http://x/v1"}}
    # A redelivery posts the same event id: the server keeps one. A later marker event shows the
    # duplicate has been through the server's pipeline.
    ready = ModelVersionReady(name="agent", version="7", trigger="model_version_tag.set",
                              delivery_id=headers["X-MLflow-Delivery-Id"], occurred=datetime.now(UTC),
                              tag={"key": "depsim.base_url", "value": "http://x/v1"})
    assert str(ready.event_id) == event_id
    emitter(ready)
    marker = ModelVersionReady(name="agent", version="8", trigger="model_version.created", delivery_id="marker",
                               occurred=datetime.now(UTC))
    emitter(marker)
    _wait_for(lambda: _events(prefect_server, str(marker.event_id)), 60, "the marker event")
    assert [e["id"] for e in _events(prefect_server) if e["id"] == event_id] == [event_id]
    emitter.close()


@pytest.mark.e2e
def test_mlflow_server_delivers_a_signed_model_version_created(tmp_path: Path, recorder: Recorder,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    from cryptography.fernet import Fernet
    from mlflow import MlflowClient

    caplog.set_level(logging.INFO, logger="depsim.receiver")
    port = free_port()
    env = {**os.environ, "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
           "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode(), "MLFLOW_WEBHOOK_CACHE_TTL": "1",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no huey job consumers: webhooks don't need them
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                             "--default-artifact-root", str(tmp_path / "artifacts")],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        with build(SECRET, recorder, state_path=tmp_path / "s.sqlite") as server:
            _wait_http(f"http://127.0.0.1:{port}/health", proc, 120, "mlflow server")
            client = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
            hook = client.create_webhook(name="depsim-receiver", url=server.url, secret=SECRET,
                                         events=["model_version.created", "model_version_tag.set",
                                                 "model_version_alias.created"])
            # The module docstring's connectivity check: MLflow's example tag is ignored (200).
            probe = client.test_webhook(hook.webhook_id, event="model_version_tag.set")
            assert probe.success and probe.response_status == 200, probe
            client.create_registered_model("agent")
            mv = client.create_model_version("agent", source="s3://bucket/agent/v1",
                                             tags={"depsim.base_url": "http://127.0.0.1:9/v1"})
            client.set_model_version_tag("agent", mv.version, "depsim.verdict", "PASS")  # write-back: ignored
            client.set_registered_model_alias("agent", "simulated-pass", mv.version)  # own alias: ignored

            def outcomes() -> list[dict[str, Any]]:
                return [r.depsim for r in caplog.records if hasattr(r, "depsim")]  # type: ignore[attr-defined]

            _wait_for(lambda: len(outcomes()) >= 4, 60, "four deliveries from the mlflow server")
            time.sleep(1.0)  # nothing else is on its way
    finally:
        _stop(proc)
    seen = sorted((o["outcome"], o["status"], o["reason"]) for o in outcomes())
    assert seen == [("accepted", 202, "model_version.created"), ("ignored", 200, "own_alias"),
                    ("ignored", 200, "tag_not_trigger"), ("ignored", 200, "tag_not_trigger")], seen
    (ready,) = recorder.events
    assert (ready.name, ready.version, ready.trigger) == ("agent", mv.version, "model_version.created")
    (accepted,) = [o for o in outcomes() if o["outcome"] == "accepted"]
    assert accepted["delivery_id"] == ready.delivery_id
