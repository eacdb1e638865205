"""`depsim check` streams (tasks/check_stream.py): each line parsed once, checked in batches by
worker processes, only the valid rows' projection kept. It must decide exactly what the flow's
check (load_raw + check_conversations) decides on the same input, row for row."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tasks.check import PROJECTION, CheckResult, check_conversations, load_contract
from tasks.check_stream import stream_check
from tasks.load import InputError, load_raw
from tasks.synthetic.logs import generate

CONTRACT = load_contract()


def _conversations(n: int, seed: int = 3) -> list[dict[str, Any]]:
    out = []
    for conv in generate(n, "synthetic-agent-v1", seed):
        conv.pop("_truth")
        out.append(conv)
    return out


def _mixed_lines() -> list[bytes]:
    """Valid SYNTHETIC conversations with bad lines of many kinds between them, and a duplicate id
    far from its first occurrence (a different batch, a different worker)."""
    convs = _conversations(40)
    lines = [json.dumps(c).encode() for c in convs]
    bad_call = json.loads(lines[3])
    bad_call["conversation_id"] = "bad-args"
    for m in bad_call["messages"]:
        for call in m.get("tool_calls") or []:
            call["function"]["arguments"] = "[1, 2]"
    deep = json.loads(lines[4])
    deep["conversation_id"] = "deep-args"
    for m in deep["messages"]:
        for call in m.get("tool_calls") or []:
            call["function"]["arguments"] = '{"a": ' * 1500 + "1" + "}" * 1500
    extra = [
        b"", b"   ", b"not json", b"[1, 2]", b'{"conversation_id": "nan", "x": NaN}',
        b'{"conversation_id": "utf8", "model": "m\xff"}', b'{"conversation_id": "big", "n": ' + b"9" * 5000 + b"}",
        json.dumps({**json.loads(lines[5]), "conversation_id": "sur\\ud800"}).replace("\\\\ud800", "\\ud800").encode(),
        json.dumps(bad_call).encode(), json.dumps(deep).encode(),
        json.dumps({**json.loads(lines[6]), "model": 7}).encode(),
        lines[2],  # duplicate id
    ]
    out: list[bytes] = []
    for i, line in enumerate(lines):
        out.append(line)
        if i % 3 == 0 and extra:
            out.append(extra.pop(0))
    return out + extra


def _same(streamed: CheckResult, full: CheckResult) -> None:
    assert streamed.summary() == full.summary()
    assert streamed.quarantine.to_dicts() == full.quarantine.to_dicts()
    assert streamed.flagged == full.flagged
    assert streamed.valid.to_dicts() == full.valid.select(PROJECTION).to_dicts()
    assert [c["check"] for c in streamed.checks] == [c["check"] for c in full.checks]


@pytest.mark.parametrize("workers,batch", [(1, 2000), (1, 5), (2, 7)], ids=["inline", "small-batches", "two-workers"])
def test_stream_decides_as_the_full_check(tmp_path: Path, workers: int, batch: int) -> None:
    """With this process's recursion limit raised (as hypothesis and others do), the worker
    processes keep the default one: the verdicts must not depend on it."""
    import sys

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)
    try:
        _decides_as_the_full_check(tmp_path, workers, batch)
    finally:
        sys.setrecursionlimit(limit)


def _decides_as_the_full_check(tmp_path: Path, workers: int, batch: int) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(_mixed_lines()) + b"\n")
    full = check_conversations(load_raw(str(path)), CONTRACT, 0.01, 0.5)
    streamed = stream_check(str(path), CONTRACT, 0.01, 0.5, workers=workers, batch_lines=batch)
    _same(streamed, full)
    rules = streamed.by_rule
    assert rules["unique_id"] == 1 and rules["arguments_json"] == 2 and rules["type"] == 1
    assert rules["json_parse"] >= 6 and rules["text_encoding"] == 1
    assert streamed.rows_in == len(_mixed_lines()) == streamed.rows_passed + streamed.rows_quarantined
    dup = streamed.quarantine.filter(pl.col("rule") == "unique_id").row(0, named=True)
    assert dup["record"].startswith('{"conversation_id"') and f"{path}:" in dup["reason"]


def test_stream_reads_folders_gzip_and_parquet(tmp_path: Path) -> None:
    convs = _conversations(30, seed=5)
    folder = tmp_path / "logs"
    folder.mkdir()
    with gzip.open(folder / "a.jsonl.gz", "wt") as fh:
        fh.write("\n".join(json.dumps(c) for c in convs[:10]) + "\n{broken\n")
    (folder / "b.jsonl").write_text("\n".join(json.dumps(c) for c in convs[10:20]) + "\n")
    rows = [{**c, "tools": json.dumps(c.get("tools")), "messages": json.dumps(c["messages"]),
             "labels": json.dumps(c.get("labels") or {})} for c in convs[20:]]
    pl.DataFrame(rows).write_parquet(folder / "c.parquet")
    full = check_conversations(load_raw(str(folder)), CONTRACT, 0.01, 0.5)
    streamed = stream_check(str(folder), CONTRACT, 0.01, 0.5, workers=2, batch_lines=4)
    _same(streamed, full)
    assert streamed.rows_in == 31 and streamed.rows_quarantined == 1
    assert streamed.quarantine.row(0, named=True)["source_line"] == 11
    assert set(streamed.by_file()) == {str(folder / n) for n in ("a.jsonl.gz", "b.jsonl", "c.parquet")}


@pytest.mark.parametrize("content,word", [(b"", "empty"), (b"\n \n", "empty"), (b"\x89PNG\r\n\x1a\n\x00\x00", "binary")])
def test_stream_refuses_unusable_files_by_name(tmp_path: Path, content: bytes, word: str) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError, match=rf"{path}: .*{word}"):
        stream_check(str(path), CONTRACT, 0.01, 0.1, workers=1)
