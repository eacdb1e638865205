"""MLflow model-registry webhook receiver: a new model version becomes a Prefect event.

The loop: a model version is created, tagged or aliased in the MLflow registry; `mlflow server`
POSTs a signed webhook here; the receiver verifies it and posts the event
``depsim.model_version.ready`` to the Prefect server (``PREFECT_API_URL``); a deployment trigger
in deployments/prefect.yaml starts ``simulate_model_version(name, version)``.

Run it::

    export DEPSIM_WEBHOOK_SECRET=...                 # the secret given to create_webhook
    export PREFECT_API_URL=http://127.0.0.1:4200/api  # a running `prefect server start`
    python -m deployments.receiver --host 127.0.0.1 --port 8787 [--state FILE] [--max-skew 300] \\
        [--ignore-alias simulated-pass] [--json-logs]

Register it (the MLflow server needs, for a loopback or private receiver,
``MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https``, ``MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true`` and a fixed
Fernet key in ``MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY``, else stored secrets break on restart;
it caches the subscriber list for ``MLFLOW_WEBHOOK_CACHE_TTL`` seconds, default 60)::

    import os
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri="http://127.0.0.1:5000")  # the `mlflow server`
    hook = client.create_webhook(
        name="depsim-receiver",
        url="http://127.0.0.1:8787/mlflow-webhook",
        events=["model_version.created", "model_version_tag.set", "model_version_alias.created"],
        secret=os.environ["DEPSIM_WEBHOOK_SECRET"],
    )
    # Connectivity check without starting a simulation: the example tag is ignored (200).
    print(client.test_webhook(hook.webhook_id, event="model_version_tag.set"))

(``test_webhook`` with ``model_version.created`` would send MLflow's example payload,
``example_model`` version 1, and be accepted like a real version.)

Endpoint ``POST /mlflow-webhook`` (``--path``); ``GET /health`` answers 200. Every answer is JSON;
every outcome but health is logged as one line (outcome, status, reason, delivery id, remote
address; never the secret or the signature):

====  ==========================================================================================
202   ``{"accepted": true, "event": ..., "event_id": ...}``: the event reached the Prefect server
200   ``{"ignored": reason}``: ``tag_not_trigger`` (a tag key other than depsim.base_url,
      depsim.model, depsim.api_key_env, depsim.simulate, so depsim's own write-back tags such as
      depsim.verdict do not re-trigger) or ``own_alias`` (the alias depsim sets on PASS)
400   ``bad_json`` (not a JSON object) or ``missing_fields`` (entity, action, data, data.name,
      data.version; data.key for a tag, data.alias for an alias)
401   ``missing_signature`` (any of X-MLflow-Delivery-Id, X-MLflow-Timestamp, X-MLflow-Signature
      absent), ``bad_signature``, ``stale`` (timestamp unparseable or beyond ±--max-skew seconds)
404   ``not_found``; 405 ``method_not_allowed``; 411 ``length_required``; 413 ``too_large``
      (body over --max-body bytes, default 1 MiB)
409   ``replayed``: this delivery id was already accepted (remembered across restarts)
422   ``unsupported_event``: a signed event kind other than the three above (MLflow does not
      retry a 4xx, so subscribe the webhook to those three only)
503   ``emit_failed`` (the Prefect server did not take the event) or ``in_progress`` (the same
      delivery is being processed): MLflow retries 5xx with back-off, same delivery id
====  ==========================================================================================

The signature is ``v1,base64(HMAC-SHA256(secret, f"{delivery_id}.{timestamp}.{raw_body}"))``
(mlflow/webhooks/delivery.py), compared with ``hmac.compare_digest``. Accepted delivery ids are
kept in a SQLite file (``--state``, default ``$DEPSIM_HOME/.depsim/receiver.sqlite``, else
``~/.depsim/receiver.sqlite``) and pruned once older than the skew window, past which a replay is
``stale`` anyway. An id is recorded only after its event reached Prefect, so MLflow's retry after
a 503 is processed.

The event: name ``depsim.model_version.ready``; resource ``{"prefect.resource.id":
"mlflow.model-version.<name>.<version>", "mlflow.model.name": name, "mlflow.model.version":
version}``; payload ``{"name", "version", "trigger": "<entity>.<action>", "delivery_id"}`` plus
``"tag": {"key", "value"}`` or ``"alias"``; ``occurred`` is the delivery's timestamp; the id is
uuid5 of (name, version, delivery id), so a redelivery is one event on the server.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict

EVENT_NAME = "depsim.model_version.ready"
DEFAULT_PATH = "/mlflow-webhook"
DEFAULT_IGNORE_ALIAS = "simulated-pass"
TRIGGER_TAG_KEYS = frozenset({"depsim.base_url", "depsim.model", "depsim.api_key_env", "depsim.simulate"})
HANDLED_EVENTS = frozenset({"model_version.created", "model_version_tag.set", "model_version_alias.created"})
SECRET_ENV = "DEPSIM_WEBHOOK_SECRET"
DELIVERY_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER = "X-MLflow-Delivery-Id", "X-MLflow-Timestamp", "X-MLflow-Signature"
_EVENT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "depsim:mlflow-webhook")
_PRUNE_MARGIN_S = 60  # keep ids a little past the window: clocks move between check and prune

log = logging.getLogger("depsim.receiver")


class ModelVersionReady(BaseModel):
    """What crosses from the receiver to Prefect: a model version that may need a simulation."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    version: str
    trigger: str  # "<entity>.<action>" of the MLflow event
    delivery_id: str
    occurred: datetime
    tag: dict[str, str] | None = None
    alias: str | None = None

    @property
    def event_id(self) -> uuid.UUID:
        return uuid.uuid5(_EVENT_NAMESPACE, json.dumps([self.name, self.version, self.delivery_id]))

    def resource(self) -> dict[str, str]:
        return {"prefect.resource.id": f"mlflow.model-version.{self.name}.{self.version}",
                "mlflow.model.name": self.name, "mlflow.model.version": self.version}

    def payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "version": self.version, "trigger": self.trigger,
                               "delivery_id": self.delivery_id}
        if self.tag is not None:
            out["tag"] = self.tag
        if self.alias is not None:
            out["alias"] = self.alias
        return out


Emitter = Callable[[ModelVersionReady], None]
"""Puts the event on Prefect; raises if it did not get there (the receiver then answers 503)."""


class EmitError(RuntimeError):
    """The Prefect server did not take the event."""


class ReceiverConfigError(ValueError):
    """A startup mistake the user can fix; printed as one line."""


class PrefectEventsEmitter:
    """Posts events to ``{PREFECT_API_URL}/events`` and raises unless the server answers 204.

    Why not ``prefect.events.emit_event``: it queues the event for a background ``EventsWorker``
    that streams it over a websocket, returns before anything is sent, and logs and swallows
    failures (it returns None when events are disabled), so the receiver could not tell MLflow to
    retry; draining the worker does not surface a failed send either. prefect 3.9's
    ``POST /api/events`` (``create_events``, the route the ``PrefectEventsClient`` uses too)
    takes a JSON list of events and answers 204 once the batch is published on the server's event
    bus, from which triggers and storage read it. One attempt with a short timeout: MLflow waits
    30 s for an answer and retries a 503 itself. Deterministic event ids make a retried post
    harmless: the server stores events ON CONFLICT DO NOTHING and its triggers skip ids already
    seen. Auth and TLS follow the Prefect client (PREFECT_API_AUTH_STRING, PREFECT_API_KEY,
    PREFECT_API_TLS_INSECURE_SKIP_VERIFY, PREFECT_API_SSL_CERT_FILE).
    """

    def __init__(self, api_url: str, *, timeout: float = 10.0, headers: Mapping[str, str] | None = None,
                 verify: bool | str = True) -> None:
        self.api_url = api_url.rstrip("/")
        self._client = httpx.Client(timeout=timeout, headers=dict(headers or {}), verify=verify)

    @classmethod
    def from_prefect_settings(cls, timeout: float = 10.0) -> PrefectEventsEmitter:
        """Built from the active Prefect settings; raises ReceiverConfigError without an API URL."""
        from prefect.settings import get_current_settings

        api = get_current_settings().api
        if not api.url:
            raise ReceiverConfigError("PREFECT_API_URL is not set: the receiver posts events to a running "
                                      "`prefect server start` (a temporary server cannot receive them)")
        headers = {}
        if api.auth_string:
            token = base64.b64encode(api.auth_string.get_secret_value().encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        elif api.key:
            headers["Authorization"] = f"Bearer {api.key.get_secret_value()}"
        verify: bool | str = False if api.tls_insecure_skip_verify else (api.ssl_cert_file or True)
        return cls(api.url, timeout=timeout, headers=headers, verify=verify)

    def __call__(self, ready: ModelVersionReady) -> None:
        from prefect.events import Event

        event = Event(id=ready.event_id, occurred=ready.occurred, event=EVENT_NAME,
                      resource=ready.resource(), payload=ready.payload())
        try:
            response = self._client.post(f"{self.api_url}/events", json=[event.model_dump(mode="json")])
        except httpx.HTTPError as exc:
            raise EmitError(f"Prefect API unreachable: {type(exc).__name__}") from exc
        if response.status_code != 204:
            raise EmitError(f"Prefect API answered {response.status_code} to POST /events")

    def close(self) -> None:
        self._client.close()


class ReplayStore:
    """Accepted delivery ids with their timestamps, in SQLite so they survive a restart."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False)
        with self._lock, self._db:
            self._db.execute("CREATE TABLE IF NOT EXISTS accepted (delivery_id TEXT PRIMARY KEY, "
                             "ts INTEGER NOT NULL, event_id TEXT NOT NULL, accepted_at REAL NOT NULL)")
            self._db.execute("CREATE INDEX IF NOT EXISTS accepted_ts ON accepted (ts)")

    def seen(self, delivery_id: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM accepted WHERE delivery_id = ?", (delivery_id,)).fetchone()
        return row is not None

    def record(self, delivery_id: str, ts: int, event_id: str, *, prune_before: float) -> None:
        """Remember an accepted delivery and forget those older than ``prune_before`` (unix s)."""
        with self._lock, self._db:
            self._db.execute("INSERT OR IGNORE INTO accepted VALUES (?, ?, ?, ?)",
                             (delivery_id, ts, event_id, time.time()))
            self._db.execute("DELETE FROM accepted WHERE ts < ?", (prune_before,))

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM accepted").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def default_state_path() -> Path:
    """``$DEPSIM_HOME/.depsim/receiver.sqlite``, else ``~/.depsim/receiver.sqlite``."""
    home = os.environ.get("DEPSIM_HOME")
    return (Path(home) / ".depsim" if home else Path.home() / ".depsim") / "receiver.sqlite"


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


class _Rejected(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass(frozen=True)
class _Ignored:
    reason: str
    detail: str


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The ``X-MLflow-Signature`` value MLflow sends for this delivery."""
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode("utf-8"), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def _signature_ok(secret: str, delivery_id: str, timestamp: str, body: bytes, header: str) -> bool:
    expected = sign(secret, delivery_id, timestamp, body).encode()
    # Space-separated list, as in Standard Webhooks (secret rotation); MLflow sends one.
    return any(hmac.compare_digest(expected, candidate.encode()) for candidate in header.split())


def parse_delivery(body: bytes, delivery_id: str, ts: int, *, ignore_alias: str,
                   trigger_tags: frozenset[str] = TRIGGER_TAG_KEYS) -> ModelVersionReady | _Ignored:
    """Route a verified delivery body: an event to emit, or a reason to ignore it.

    Raises:
        _Rejected: 400 bad_json / missing_fields, 422 unsupported_event.
    """
    try:
        doc = json.loads(body)
    except ValueError:  # includes UnicodeDecodeError
        raise _Rejected(400, "bad_json") from None
    if not isinstance(doc, dict):
        raise _Rejected(400, "bad_json")
    entity, action, data = doc.get("entity"), doc.get("action"), doc.get("data")
    if not (isinstance(entity, str) and isinstance(action, str) and isinstance(data, dict)):
        raise _Rejected(400, "missing_fields")
    trigger = f"{entity}.{action}"
    if trigger not in HANDLED_EVENTS:
        raise _Rejected(422, "unsupported_event")
    name, version = data.get("name"), data.get("version")
    if isinstance(version, int) and not isinstance(version, bool):
        version = str(version)
    if not (isinstance(name, str) and name and isinstance(version, str) and version.isdigit()):
        raise _Rejected(400, "missing_fields")
    fields: dict[str, Any] = {}
    if entity == "model_version_tag":
        key, value = data.get("key"), data.get("value", "")
        if not (isinstance(key, str) and isinstance(value, str)):
            raise _Rejected(400, "missing_fields")
        if key not in trigger_tags:
            return _Ignored("tag_not_trigger", f"tag={key}")
        fields["tag"] = {"key": key, "value": value}
    elif entity == "model_version_alias":
        alias = data.get("alias")
        if not isinstance(alias, str) or not alias:
            raise _Rejected(400, "missing_fields")
        if alias == ignore_alias:
            return _Ignored("own_alias", f"alias={alias}")
        fields["alias"] = alias
    return ModelVersionReady(name=name, version=version, trigger=trigger, delivery_id=delivery_id,
                             occurred=datetime.fromtimestamp(ts, UTC), **fields)


class WebhookApp:
    """Verification, replay protection and routing of one delivery, independent of HTTP."""

    def __init__(self, secret: str, emit: Emitter, store: ReplayStore, *, max_skew: int = 300,
                 ignore_alias: str = DEFAULT_IGNORE_ALIAS, trigger_tags: frozenset[str] = TRIGGER_TAG_KEYS,
                 clock: Callable[[], float] = time.time) -> None:
        if not secret:
            raise ReceiverConfigError(f"{SECRET_ENV} is empty")
        self._secret = secret
        self.emit, self.store, self.max_skew = emit, store, max_skew
        self.ignore_alias, self.trigger_tags, self.clock = ignore_alias, trigger_tags, clock
        self._in_flight: set[str] = set()
        self._in_flight_lock = threading.Lock()

    def __repr__(self) -> str:  # never the secret
        return f"WebhookApp(state={self.store.path}, max_skew={self.max_skew})"

    def handle(self, headers: Mapping[str, str], body: bytes, remote: str) -> Reply:
        delivery_id = headers.get(DELIVERY_HEADER)
        try:
            return self._handle(headers, body, remote)
        except _Rejected as rej:
            return self.reject(rej.status, rej.reason, delivery_id, remote)

    def _handle(self, headers: Mapping[str, str], body: bytes, remote: str) -> Reply:
        delivery_id, ts_raw = headers.get(DELIVERY_HEADER), headers.get(TIMESTAMP_HEADER)
        signature = headers.get(SIGNATURE_HEADER)
        if not (delivery_id and ts_raw and signature):
            raise _Rejected(401, "missing_signature")
        if not _signature_ok(self._secret, delivery_id, ts_raw, body, signature):
            raise _Rejected(401, "bad_signature")
        now = self.clock()
        if not (ts_raw.isascii() and ts_raw.isdigit() and len(ts_raw) < 16) or abs(now - int(ts_raw)) > self.max_skew:
            raise _Rejected(401, "stale")
        ts = int(ts_raw)
        if self.store.seen(delivery_id):
            raise _Rejected(409, "replayed")
        routed = parse_delivery(body, delivery_id, ts, ignore_alias=self.ignore_alias,
                                trigger_tags=self.trigger_tags)
        if isinstance(routed, _Ignored):
            _log_outcome(logging.INFO, "ignored", 200, routed.reason, delivery_id, remote, detail=routed.detail)
            return Reply(200, {"ignored": routed.reason})
        with self._in_flight_lock:
            if delivery_id in self._in_flight:
                return self.reject(503, "in_progress", delivery_id, remote, retry_after=1)
            self._in_flight.add(delivery_id)
        try:
            return self._emit(routed, ts, remote, now)
        finally:
            with self._in_flight_lock:
                self._in_flight.discard(delivery_id)

    def _emit(self, ready: ModelVersionReady, ts: int, remote: str, now: float) -> Reply:
        event_id = str(ready.event_id)
        try:
            self.emit(ready)
        except Exception as exc:
            return self.reject(503, "emit_failed", ready.delivery_id, remote, retry_after=5,
                               error=f"{type(exc).__name__}: {exc}"[:300])
        try:
            self.store.record(ready.delivery_id, ts, event_id,
                              prune_before=now - self.max_skew - _PRUNE_MARGIN_S)
        except sqlite3.Error as exc:  # the event is on Prefect; a redelivery re-posts the same id
            log.error("state write failed: %s", exc)
        _log_outcome(logging.INFO, "accepted", 202, ready.trigger, ready.delivery_id, remote,
                     model=f"{ready.name}/{ready.version}", event_id=event_id)
        return Reply(202, {"accepted": True, "event": EVENT_NAME, "event_id": event_id})

    def reject(self, status: int, reason: str, delivery_id: str | None, remote: str,
               retry_after: int | None = None, **extra: Any) -> Reply:
        level = logging.ERROR if status >= 500 else logging.WARNING
        _log_outcome(level, "rejected", status, reason, delivery_id, remote, **extra)
        headers = {"Retry-After": str(retry_after)} if retry_after else {}
        return Reply(status, {"error": reason}, headers)


def _log_outcome(level: int, outcome: str, status: int, reason: str, delivery_id: str | None,
                 remote: str, **extra: Any) -> None:
    fields = {"outcome": outcome, "status": status, "reason": reason,
              "delivery_id": (delivery_id or "")[:100] or None, "remote": remote, **extra}
    text = " ".join(f"{k}={_quote(v)}" for k, v in fields.items())
    log.log(level, "webhook %s", text, extra={"depsim": fields})


def _quote(value: Any) -> str:
    text = str(value)
    return text if text and text.isprintable() and not any(c in text for c in ' "=') else json.dumps(text)


class _Handler(BaseHTTPRequestHandler):
    server: ReceiverServer
    timeout = 30  # seconds a client may take to send its request
    error_content_type = "application/json"
    error_message_format = '{"error": "%(message)s"}'

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/health":
            self._send(Reply(200, {"status": "ok"}))
        elif path == self.server.path:
            self._send(self.server.app.reject(405, "method_not_allowed", None, self._remote()))
        else:
            self._send(self.server.app.reject(404, "not_found", None, self._remote()))

    def do_POST(self) -> None:
        app, remote = self.server.app, self._remote()
        if urlsplit(self.path).path != self.server.path:
            status, reason = (405, "method_not_allowed") if urlsplit(self.path).path == "/health" else (404, "not_found")
            self._send(app.reject(status, reason, self.headers.get(DELIVERY_HEADER), remote))
            return
        raw_length = self.headers.get("Content-Length", "")
        if not raw_length.isdigit():
            self.close_connection = True
            self._send(app.reject(411, "length_required", self.headers.get(DELIVERY_HEADER), remote))
            return
        length = int(raw_length)
        if length > self.server.max_body:
            self._drain(length)
            self._send(app.reject(413, "too_large", self.headers.get(DELIVERY_HEADER), remote, size=length))
            return
        headers = {k: self.headers[k] for k in (DELIVERY_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER)
                   if self.headers.get(k) is not None}
        try:
            reply = app.handle(headers, self.rfile.read(length), remote)
        except Exception as exc:
            log.exception("internal error")
            reply = app.reject(500, "internal_error", headers.get(DELIVERY_HEADER), remote, error=type(exc).__name__)
        self._send(reply)

    def do_PUT(self) -> None:
        self._not_allowed()

    do_DELETE = do_PATCH = do_PUT

    def _not_allowed(self) -> None:
        known = urlsplit(self.path).path in (self.server.path, "/health")
        status, reason = (405, "method_not_allowed") if known else (404, "not_found")
        self.close_connection = True
        self._send(self.server.app.reject(status, reason, self.headers.get(DELIVERY_HEADER), self._remote()))

    def _drain(self, length: int) -> None:
        """Read a too-large body (up to 16 MiB) so the client sees the 413 rather than a reset."""
        self.close_connection = True
        left = min(length, 16 * 2**20)
        while left > 0 and (chunk := self.rfile.read(min(left, 65536))):
            left -= len(chunk)

    def _remote(self) -> str:
        return str(self.client_address[0])

    def _send(self, reply: Reply) -> None:
        data = json.dumps(reply.body).encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # each outcome is logged once by WebhookApp


class ReceiverServer(ThreadingHTTPServer):
    """The HTTP server around a WebhookApp; ``port=0`` picks a free port (see ``url``)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, app: WebhookApp, host: str = "127.0.0.1", port: int = 0, *,
                 path: str = DEFAULT_PATH, max_body: int = 2**20) -> None:
        if not path.startswith("/") or path == "/health":
            raise ReceiverConfigError(f"--path must start with / and not be /health: {path!r}")
        self.app, self.path, self.max_body = app, path, max_body
        super().__init__((host, port), _Handler)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        return f"http://{f'[{host}]' if ':' in host else host}:{port}{self.path}"

    def start(self) -> ReceiverServer:
        """Serve on a background thread (tests, in-process use)."""
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="depsim-receiver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join(10)
        self.server_close()
        self.app.store.close()

    def __enter__(self) -> ReceiverServer:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def build(secret: str, emit: Emitter, *, host: str = "127.0.0.1", port: int = 0, state_path: Path | None = None,
          path: str = DEFAULT_PATH, max_skew: int = 300, max_body: int = 2**20,
          ignore_alias: str = DEFAULT_IGNORE_ALIAS, clock: Callable[[], float] = time.time) -> ReceiverServer:
    """A bound, not yet serving receiver (``.start()`` in a thread or ``.serve_forever()``)."""
    if max_skew <= 0 or max_body <= 0:
        raise ReceiverConfigError("--max-skew and --max-body must be positive")
    store = ReplayStore(state_path or default_state_path())
    app = WebhookApp(secret, emit, store, max_skew=max_skew, ignore_alias=ignore_alias, clock=clock)
    try:
        return ReceiverServer(app, host, port, path=path, max_body=max_body)
    except Exception:
        store.close()
        raise


def serve(host: str, port: int, secret: str, emit: Emitter | None = None, state_path: Path | None = None,
          **options: Any) -> None:
    """Run the receiver in the foreground until SIGTERM or Ctrl-C.

    Args:
        host: interface to bind.
        port: TCP port (0 picks one; the URL is logged).
        secret: the webhook secret given to ``MlflowClient.create_webhook``.
        emit: where events go; default ``PrefectEventsEmitter.from_prefect_settings()``.
        state_path: SQLite file of accepted delivery ids (default ``default_state_path()``).
        **options: ``path``, ``max_skew``, ``max_body``, ``ignore_alias`` of ``build``.
    """
    emitter = emit or PrefectEventsEmitter.from_prefect_settings()
    server = build(secret, emitter, host=host, port=port, state_path=state_path, **options)
    target = getattr(emitter, "api_url", None)
    log.info("listening on %s (state %s, events to %s)", server.url, server.app.store.path,
             target or type(emitter).__name__)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.app.store.close()
        log.info("stopped")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": datetime.fromtimestamp(record.created, UTC).isoformat(), "level": record.levelname,
               "logger": record.name, **(getattr(record, "depsim", None) or {"message": record.getMessage()})}
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def _configure_logging(json_logs: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter = (_JsonFormatter() if json_logs
                                    else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setFormatter(formatter)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m deployments.receiver``; returns the exit status (2 on a configuration error)."""
    parser = argparse.ArgumentParser(prog="python -m deployments.receiver", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8787)
    parser.add_argument("--path", default=DEFAULT_PATH, help="webhook path (default %(default)s)")
    parser.add_argument("--state", type=Path, default=None, help="SQLite file of accepted delivery ids")
    parser.add_argument("--max-skew", type=int, default=300, help="seconds a timestamp may be off")
    parser.add_argument("--max-body", type=int, default=2**20, help="largest body in bytes")
    parser.add_argument("--ignore-alias", default=DEFAULT_IGNORE_ALIAS, help="alias depsim sets itself")
    parser.add_argument("--emit-timeout", type=float, default=10.0, help="seconds to wait for Prefect")
    parser.add_argument("--json-logs", action="store_true", help="one JSON object per log line")
    args = parser.parse_args(argv)
    secret = os.environ.get(SECRET_ENV)
    try:
        if not secret:
            raise ReceiverConfigError(f"{SECRET_ENV} is not set: export the secret given to "
                                      "MlflowClient.create_webhook")
        _configure_logging(args.json_logs)
        emitter = PrefectEventsEmitter.from_prefect_settings(args.emit_timeout)
        serve(args.host, args.port, secret, emitter, args.state, path=args.path, max_skew=args.max_skew,
              max_body=args.max_body, ignore_alias=args.ignore_alias)
    except (ReceiverConfigError, OSError) as exc:
        print(f"depsim receiver: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
