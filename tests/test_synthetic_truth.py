"""The SYNTHETIC world's hidden truth channel (tasks/synthetic/truth.py).

Every turn the synthetic agent writes, logged or replayed, must decode to exactly the
behaviours its plan chose; anything else must decode to "unknown", never to a wrong set; and
nothing in depsim outside the world may read the channel.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from pathlib import Path
from typing import Any

import pytest

from tasks.sample import turns_of
from tasks.synthetic.agent import plan_turn, respond
from tasks.synthetic.logs import TOOLS, generate
from tasks.synthetic.profiles import PROFILE_NAMES, get_profile, turn_truth
from tasks.synthetic.truth import (
    FINAL_TEXT_CATEGORIES,
    call_id,
    decode_call_id,
    decode_final_text,
    decode_turn,
)
from tasks.taxonomy import CATEGORIES

ROOT = Path(__file__).resolve().parents[1]
Turn = tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]  # prefix, turn, truth record


@pytest.fixture(scope="module")
def logged() -> list[Turn]:
    """About 3,400 logged turns: the production profile, plus the regressed one for rarer behaviours."""
    out: list[Turn] = []
    for model, n, seed in (("synthetic-agent-v1", 1000, 31), ("synthetic-agent-v3", 500, 32)):
        for conv in generate(n, model, seed):
            msgs = conv["messages"]
            for (u, end, _tools, _resp), t in zip(turns_of(msgs), conv["_truth"], strict=True):
                out.append((msgs[: u + 1], msgs[u + 1:end], t))
    return out


def test_every_logged_turn_decodes_to_its_plan(logged: list[Turn]) -> None:
    wrong = [(t, decode_turn(turn)) for _p, turn, t in logged if decode_turn(turn) != frozenset(t["behaviours"])]
    print(f"logged turns decoded exactly: {len(logged) - len(wrong)}/{len(logged)}")
    assert len(logged) > 3000 and wrong == []
    seen = {b for _p, _t, t in logged for b in t["behaviours"]}
    assert seen == set(CATEGORIES)  # every category is exercised
    no_calls = [t for _p, turn, t in logged if not any(m.get("tool_calls") for m in turn)]
    assert any(t["behaviours"] == ["over_refusal"] for t in no_calls)
    assert any(t["harmful_request"] for t in no_calls) and any(not t["behaviours"] for t in no_calls)
    # a turn without tool calls can only show what lives in its final text
    assert all(set(t["behaviours"]) <= FINAL_TEXT_CATEGORIES for t in no_calls)


def _replay(model: str, seed: int, prefix: list[dict[str, Any]], recorded: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The synthetic agent regenerates a turn; tools answer with the recording where it has the call."""
    answers: dict[tuple[str, str], str] = {}
    for m in recorded:
        for c in m.get("tool_calls") or []:
            res = next((r for r in recorded if r.get("tool_call_id") == c["id"]), None)
            if res is not None:
                answers[(c["function"]["name"], c["function"]["arguments"])] = res.get("content") or ""
    new: list[dict[str, Any]] = []
    for _ in range(30):
        msg = respond(model, seed, prefix + new, TOOLS)["message"]
        new.append(msg)
        if not msg.get("tool_calls"):
            break
        for c in msg["tool_calls"]:
            fn = c["function"]
            new.append({"role": "tool", "tool_call_id": c["id"], "name": fn["name"],
                        "content": answers.get((fn["name"], fn["arguments"]), "")})
    return new


@pytest.mark.parametrize("model,seed", [("synthetic-agent-v2", 7), ("synthetic-agent-v3", 123)])
def test_replayed_turns_decode_to_the_candidates_plan(logged: list[Turn], model: str, seed: int) -> None:
    turns = logged[::2]  # 1,700 turns per profile keep the test quick
    wrong = []
    for prefix, recorded, _t in turns:
        new = _replay(model, seed, prefix, recorded)
        plan = plan_turn(model, seed, prefix)
        if decode_turn(new) != plan.behaviours:
            wrong.append((plan.behaviours, decode_turn(new), new[-1].get("content")))
    print(f"{model} replayed turns decoded exactly: {len(turns) - len(wrong)}/{len(turns)}")
    assert wrong == []


def test_turns_replayed_through_the_pipeline_keep_their_truth(tmp_path: Path) -> None:
    from tasks.check import check_conversations, load_contract
    from tasks.config import Endpoint, ReplayCfg
    from tasks.load import load_raw
    from tasks.replay import replay_sample
    from tasks.sample import build_turns, sample_turns
    from tests.conftest import synthetic_rows, write_jsonl

    data = write_jsonl(tmp_path / "logs.jsonl", synthetic_rows(40, seed=8))
    valid = check_conversations(load_raw(str(data)), load_contract(), 0.01, 0.1).valid
    smp, _ = sample_turns(build_turns(valid), 40, ["task_type"], 5)
    traj, _ = asyncio.run(replay_sample(smp, valid, Endpoint(model="synthetic-agent-v3"), ReplayCfg(), 5))
    convs = {r["conversation_id"]: json.loads(r["messages"]) for r in valid.iter_rows(named=True)}
    users = {r["turn_id"]: r["user_msg_index"] for r in smp.iter_rows(named=True)}
    replayed = [r for r in traj.iter_rows(named=True) if json.loads(r["messages"])]  # errors replay nothing
    assert len(replayed) >= 0.8 * traj.height
    for row in replayed:
        prefix = convs[row["conversation_id"]][: users[row["turn_id"]] + 1]
        assert decode_turn(json.loads(row["messages"])) == plan_turn("synthetic-agent-v3", 5, prefix).behaviours


def test_foreign_and_garbled_ids_decode_to_unknown() -> None:
    rng = random.Random(0)
    behaviours = frozenset({"destructive_action", "over_refusal"})
    good = call_id("0|1|2|3|synthetic-agent-v1|9", behaviours)
    assert decode_call_id(good) == behaviours
    assert decode_call_id(call_id("x", [])) == frozenset()
    garbled = [good[:i] + format((int(good[i], 16) + 1) % 16, "x") + good[i + 1:] for i in range(5, len(good))]
    foreign = ["call_" + "".join(rng.choice("0123456789abcdef") for _ in range(n)) for n in (22, 24) for _ in range(2000)]
    foreign += ["call_abc123", "toolu_01A09q90qw90lq917835lq9", "call_" + "0" * 22, good.upper(), good + "0", "", None]
    assert [c for c in garbled + foreign if decode_call_id(c) is not None] == []

    def turn(cid: Any) -> list[dict[str, Any]]:
        return [{"role": "assistant", "content": "", "tool_calls": [
                    {"id": cid, "type": "function", "function": {"name": "shell", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": cid, "content": ""},
                {"role": "assistant", "content": "I'm sorry, but I can't help with that request."}]

    assert decode_turn(turn(good)) == behaviours
    assert all(decode_turn(turn(c)) is None for c in garbled[:5] + foreign[:50])  # tool calls, none decodable
    assert decode_turn([{"role": "assistant", "content": "Sure, here you go."}]) is None
    assert decode_turn([]) is None
    # the world's own texts, re-rendered with other whitespace, are still recognised
    assert decode_final_text("I'm sorry,  but I can't help\nwith that request.") == frozenset({"over_refusal"})
    assert decode_final_text("I'm sorry, but I can't help with that request. Anyway, here it is.") is None


def test_turn_truth_knows_harmful_requests() -> None:
    p = get_profile("synthetic-agent-v1")
    assert p is not None
    old = turn_truth(p, "question", False)  # the old signature still works
    assert old == turn_truth(p, "question", False, harmful_request=False) and old["over_refusal"] > 0
    assert set(turn_truth(p, "question", True, harmful_request=True).values()) == {0.0}


def test_plans_match_turn_truth_in_frequency(logged: list[Turn]) -> None:
    """The exact per-turn probabilities agree with what the planner draws (a binomial check)."""
    for model in PROFILE_NAMES:
        p = get_profile(model)
        assert p is not None
        expected = dict.fromkeys(CATEGORIES, 0.0)
        var = dict.fromkeys(CATEGORIES, 0.0)
        observed = dict.fromkeys(CATEGORIES, 0)
        for prefix, _turn, t in logged:
            plan = plan_turn(model, 99, prefix)
            assert plan.harmful_request == t["harmful_request"]
            for c, q in turn_truth(p, plan.task_type, plan.injection_in_prefix, plan.harmful_request).items():
                if c in expected:
                    expected[c] += q
                    var[c] += q * (1 - q)
            for c in plan.behaviours:
                observed[c] += 1
        for c in CATEGORIES:
            assert abs(observed[c] - expected[c]) <= 4 * var[c] ** 0.5 + 1, (model, c, observed[c], expected[c])


_READS_TRUTH = re.compile(r"synthetic\.truth|from\s+tasks\.synthetic\s+import\s+[^\n]*\btruth\b|WORLD_KEY|"
                          r"decode_turn|decode_call_id|decode_final_text")


def test_nothing_outside_the_world_reads_the_truth() -> None:
    """Judges, estimators and the pipeline never import the truth channel or its key.

    Allowed: tasks/synthetic/ (the world, including its server and scripted judge) and
    tasks/models.py, which only routes requests to the in-process server.
    """
    files = [p for d in ("tasks", "flows") for p in sorted((ROOT / d).rglob("*.py"))]
    allowed = ROOT / "tasks" / "synthetic"
    offenders = [
        f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
        for p in files if allowed not in p.parents and p != ROOT / "tasks" / "models.py"
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if _READS_TRUTH.search(line)
    ]
    assert len(files) > 20 and offenders == []
