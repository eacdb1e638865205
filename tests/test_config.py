"""Configuration precedence, validation errors and secret handling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.config import ConfigError, Endpoint, load_settings


def test_defaults_come_from_conf_default_yaml() -> None:
    s = load_settings()
    assert s.models.candidate.model == "synthetic-agent-v2"
    assert s.models.candidate.synthetic
    assert s.sample.strata == ["surface", "task_type", "uses_tools"]


def test_precedence_file_then_env_then_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sample:\n  n: 11\nrun:\n  seed: 1\nmodels:\n  candidate:\n    model: from-file\n")
    assert load_settings(str(cfg)).sample.n == 11
    monkeypatch.setenv("DEPSIM_SAMPLE__N", "22")
    monkeypatch.setenv("DEPSIM_MODELS__CANDIDATE__CONCURRENCY", "3")
    s = load_settings(str(cfg))
    assert s.sample.n == 22 and s.run.seed == 1 and s.models.candidate.model == "from-file"
    assert s.models.candidate.concurrency == 3
    s = load_settings(str(cfg), {"sample": {"n": 33}})
    assert s.sample.n == 33


def test_unrelated_depsim_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEPSIM_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("DEPSIM_CONFIG", "")
    assert load_settings().sample.n > 0


@pytest.mark.parametrize(("over", "needle"), [
    ({"sample": {"n": 0}}, "sample.n"),
    ({"run": {"seed": "abc"}}, "run.seed"),
    ({"run": {"seed": 1.5}}, "run.seed"),
    ({"sample": {"allocation": "magic"}}, "sample.allocation"),
    ({"models": {"candidate": {"model": "x", "typo_key": 1}}}, "typo_key"),
])
def test_invalid_values_name_the_key(over: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_settings(overrides=over)


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(str(tmp_path / "nope.yaml"))


def test_secret_comes_from_env_and_never_from_dumps(monkeypatch: pytest.MonkeyPatch) -> None:
    ep = Endpoint(base_url="https://example.invalid/v1", model="m", api_key_env="MY_TEST_KEY")
    with pytest.raises(ConfigError, match="MY_TEST_KEY"):
        ep.api_key()
    monkeypatch.setenv("MY_TEST_KEY", "sk-very-secret-123")
    assert ep.api_key().get_secret_value() == "sk-very-secret-123"
    assert "sk-very-secret-123" not in repr(ep.api_key())
    s = load_settings(overrides={"models": {"candidate": {"api_key_env": "MY_TEST_KEY"}}})
    dumped = json.dumps(s.public_dict())
    assert "MY_TEST_KEY" in dumped and "sk-very-secret-123" not in dumped


def test_resolved_dump_is_not_re_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The flow rebuilds Settings from the CLI's dump; a YAML-style env list must not break that."""
    from tasks.config import settings_from_dict

    monkeypatch.setenv("DEPSIM_REPLAY__SIMULATOR_CHAIN", "[recorded, rules, llm]")
    s = load_settings()
    assert s.replay.simulator_chain == ["recorded", "rules", "llm"]
    again = settings_from_dict(s.public_dict())
    assert again.replay.simulator_chain == ["recorded", "rules", "llm"]
    monkeypatch.setenv("DEPSIM_REPLAY__SIMULATOR_CHAIN", "[recorded]")
    assert settings_from_dict(s.public_dict()).replay.simulator_chain == ["recorded", "rules", "llm"]


def test_llm_source_with_real_candidate_needs_a_real_simulator() -> None:
    real = {"base_url": "http://127.0.0.1:9/v1", "model": "m"}
    with pytest.raises(ConfigError, match=r"models\.simulator is the SYNTHETIC simulator"):
        load_settings(overrides={"replay": {"simulator_chain": ["recorded", "llm"]}, "models": {"candidate": real}})
    s = load_settings(overrides={"replay": {"simulator_chain": ["recorded", "llm"]},
                                 "models": {"candidate": real, "simulator": real}})
    assert not s.models.simulator.synthetic


def test_default_chain_drops_the_synthetic_simulator_for_a_real_candidate(tmp_path: Path) -> None:
    real = {"base_url": "http://127.0.0.1:9/v1", "model": "m"}
    assert load_settings().replay.simulator_chain == ["recorded", "rules", "llm"]
    assert load_settings(overrides={"models": {"candidate": real}}).replay.simulator_chain == ["recorded", "rules"]
    # with a real simulator the default chain keeps llm
    both = load_settings(overrides={"models": {"candidate": real, "simulator": real}})
    assert both.replay.simulator_chain == ["recorded", "rules", "llm"]
    # a chain the user wrote with llm is theirs: refused, not rewritten
    conf = tmp_path / "c.yaml"
    conf.write_text("replay:\n  simulator_chain: [recorded, rules, llm]\n")
    with pytest.raises(ConfigError, match=r"models\.simulator is the SYNTHETIC simulator"):
        load_settings(str(conf), overrides={"models": {"candidate": real}})


def test_synthetic_llm_judge_refused_for_a_real_candidate() -> None:
    real = {"candidate": {"base_url": "https://api.example.com/v1", "model": "gpt-4.1-mini"}}
    with pytest.raises(ConfigError, match=r"models\.judge is the SYNTHETIC judge"):
        load_settings(overrides={"judge": {"kinds": ["rules", "llm"]}, "models": real})
    # rules only, a real judge endpoint, or a synthetic candidate on a serve-synthetic port: fine
    assert load_settings(overrides={"models": real}).judge.kinds == ["rules"]
    judge = {"judge": {"base_url": "https://judge.example.com/v1", "model": "judge-model"}}
    assert load_settings(overrides={"judge": {"kinds": ["llm"]}, "models": {**real, **judge}}).judge.kinds == ["llm"]
    served = {"candidate": {"base_url": "http://127.0.0.1:8089/v1", "model": "synthetic-agent-v2"}}
    assert load_settings(overrides={"judge": {"kinds": ["llm"]}, "models": served}).models.candidate.synthetic_world


def test_public_url_drops_credentials() -> None:
    ep = Endpoint(base_url="https://user:pa55@api.example.com:8443/v1?api-key=k3y#frag", model="m")
    assert ep.public_url == "https://api.example.com:8443/v1"
    assert Endpoint(base_url="http://127.0.0.1:9/v1", model="m").public_url == "http://127.0.0.1:9/v1"
    assert Endpoint(model="m").public_url == "synthetic://"


def test_max_error_share_is_a_share() -> None:
    assert load_settings().replay.max_error_share == 0.05
    with pytest.raises(ConfigError, match=r"replay\.max_error_share"):
        load_settings(overrides={"replay": {"max_error_share": 1.5}})
