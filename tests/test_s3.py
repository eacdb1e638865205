"""S3 over the real protocol: moto's standalone server on loopback, reached through endpoint_url."""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import boto3
import polars as pl
import pytest

from tasks.load import InputError, load_raw
from tasks.records import conversations_frame
from tests.conftest import free_port, run_cli, synthetic_rows

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    old = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update({**S3_ENV, "AWS_ENDPOINT_URL": url})
    try:
        yield url
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def bucket(s3_endpoint: str) -> str:
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="logs")
    rows = synthetic_rows(30, seed=6)
    body = "".join(json.dumps(r) + "\n" for r in rows[:20]).encode()
    s3.put_object(Bucket="logs", Key="prod/2026/part-0.jsonl", Body=body)
    buf = io.BytesIO()
    conversations_frame(rows[20:]).write_parquet(buf)
    s3.put_object(Bucket="logs", Key="prod/2026/part-1.parquet", Body=buf.getvalue())
    s3.put_object(Bucket="logs", Key="prod/2026/README.txt", Body=b"not a log")
    return "logs"


def test_load_prefix_reads_jsonl_and_parquet_objects(bucket: str) -> None:
    raw = load_raw(f"s3://{bucket}/prod/")
    assert raw.height == 30 and raw["parse_error"].null_count() == 30
    assert set(raw["source_file"]) == {f"s3://{bucket}/prod/2026/part-0.jsonl", f"s3://{bucket}/prod/2026/part-1.parquet"}


def test_missing_object_and_empty_prefix_are_clear_errors(bucket: str) -> None:
    with pytest.raises(InputError, match=re.escape("s3://logs/nope/: no .jsonl/.parquet objects found")):
        load_raw(f"s3://{bucket}/nope/")
    with pytest.raises(InputError, match=re.escape("s3://nobucket/x.jsonl")):
        load_raw("s3://nobucket/x.jsonl")


def test_sample_cli_from_s3_and_run_store_on_s3(bucket: str, s3_endpoint: str, tmp_path: Path) -> None:
    env = {**S3_ENV, "AWS_ENDPOINT_URL": s3_endpoint}
    proc = run_cli(["sample", "--data", f"s3://{bucket}/prod/", "--n", "25", "--seed", "4",
                    "--out", str(tmp_path / "s.parquet"), "--json"], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["sampled_turns"] == 25 and out["weight_sum"] == pytest.approx(out["population_turns"])
    assert pl.read_parquet(tmp_path / "s.parquet")["weight"].sum() == pytest.approx(out["population_turns"])
    proc = run_cli(["sample", "--data", "s3://nobucket/x/", "--out", str(tmp_path / "t.parquet")], cwd=tmp_path, env=env)
    assert proc.returncode == 4 and "s3://nobucket/x/" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "t.parquet").exists()  # nothing half-written


@pytest.mark.e2e
def test_run_with_data_and_run_store_on_s3(bucket: str, s3_endpoint: str, tmp_path: Path) -> None:
    env = {**S3_ENV, "AWS_ENDPOINT_URL": s3_endpoint}
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="runs")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli(["run", "--data", f"s3://{bucket}/prod/", "--n", "20", "--store", "s3://runs/depsim",
                    "--tracking-uri", uri, "--json"], cwd=tmp_path, env=env)
    assert proc.returncode in (0, 1, 3), proc.stderr
    out = json.loads(proc.stdout)
    assert out["store"].startswith("s3://runs/depsim/")
    prefix = out["store"][len("s3://runs/"):]
    keys = {o["Key"][len(prefix) + 1:] for o in s3.list_objects_v2(Bucket="runs", Prefix=prefix)["Contents"]}
    assert {"sample.parquet", "scores.parquet", "estimates.parquet", "report.html", "quarantine.parquet"} <= keys
    sample = pl.read_parquet(io.BytesIO(s3.get_object(Bucket="runs", Key=f"{prefix}/sample.parquet")["Body"].read()))
    assert sample.height == 20 and "weight" in sample.columns


def test_sample_scans_parquet_on_s3_lazily(s3_endpoint: str, tmp_path: Path) -> None:
    """Nested Parquet under an s3:// prefix: read through pyarrow's S3 filesystem at endpoint_url."""
    import pyarrow.parquet as pq

    from tasks.synthetic.scale import conversations_table

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="scan")
    rows = synthetic_rows(60, seed=8)
    for i, part in enumerate((rows[:25], rows[25:])):
        buf = io.BytesIO()
        pq.write_table(conversations_table(part), buf, row_group_size=10)
        s3.put_object(Bucket="scan", Key=f"prod/part-{i}.parquet", Body=buf.getvalue())
    out = tmp_path / "s3-sample.parquet"
    r = run_cli(["sample", "--data", "s3://scan/prod/", "--n", "40", "--out", str(out), "--json"], cwd=tmp_path,
                env={**S3_ENV, "AWS_ENDPOINT_URL": s3_endpoint})
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["scan"] is True and res["rows_in"] == 60 and res["sampled_turns"] == 40
    local = tmp_path / "local"
    local.mkdir()
    pq.write_table(conversations_table(rows), local / "all.parquet")
    r2 = run_cli(["sample", "--data", str(local), "--n", "40", "--out", str(tmp_path / "l.parquet"), "--json"], cwd=tmp_path)
    assert r2.returncode == 0, r2.stderr
    assert pl.read_parquet(out).equals(pl.read_parquet(tmp_path / "l.parquet"))  # same sample from S3 or disk


def test_unreadable_s3_parquet_object_is_named(s3_endpoint: str, tmp_path: Path) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="broken")
    s3.put_object(Bucket="broken", Key="p/bad.parquet", Body=b"PAR1 not parquet")
    out = tmp_path / "o.parquet"
    r = run_cli(["sample", "--data", "s3://broken/p/", "--n", "5", "--out", str(out)], cwd=tmp_path,
                env={**S3_ENV, "AWS_ENDPOINT_URL": s3_endpoint})
    assert r.returncode == 4
    assert "s3://broken/p/bad.parquet: not a readable Parquet file" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
