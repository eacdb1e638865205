"""The run store: where every stage writes its table (Parquet). A local folder or s3:// prefix."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import polars as pl


def _s3_endpoint() -> str | None:
    return os.environ.get("DEPSIM_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")


def _s3_client() -> Any:
    import boto3

    endpoint = _s3_endpoint()
    return boto3.client("s3", endpoint_url=endpoint) if endpoint else boto3.client("s3")


def s3_filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow S3 filesystem, "bucket/key") for lazy Parquet reads; credentials as boto3 finds them."""
    import boto3
    from pyarrow import fs

    endpoint = _s3_endpoint()
    session = boto3.session.Session()
    creds = session.get_credentials()
    frozen = creds.get_frozen_credentials() if creds else None
    kwargs: dict[str, Any] = {"region": session.region_name or "us-east-1"}
    if frozen is not None:
        kwargs.update(access_key=frozen.access_key, secret_key=frozen.secret_key, session_token=frozen.token)
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or endpoint, scheme=scheme if host else "https")
    return fs.S3FileSystem(**kwargs), uri[len("s3://"):]


def _split(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    return bucket, key


def s3_list(uri: str) -> list[str]:
    """Objects under an s3:// prefix that look like conversation logs."""
    from tasks.load import InputError

    bucket, prefix = _split(uri)
    try:
        pages = _s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    except Exception as exc:
        raise InputError(f"{uri}: cannot list: {exc}") from exc
    return sorted(f"s3://{bucket}/{k}" for k in keys if k.endswith((".jsonl", ".jsonl.gz", ".parquet", ".ndjson")))


def s3_read_bytes(uri: str) -> bytes:
    from tasks.load import InputError

    bucket, key = _split(uri)
    try:
        return _s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as exc:
        raise InputError(f"{uri}: cannot read: {exc}") from exc


class RunStore:
    """Stage tables of one run under <root>/<run_key>/."""

    def __init__(self, root: str, run_key: str) -> None:
        self.root = root.rstrip("/")
        self.run_key = run_key
        self.s3 = root.startswith("s3://")
        self.uri = f"{self.root}/{run_key}"
        # Artifacts for MLflow and the report are always assembled locally too.
        self.local = Path(self.uri) if not self.s3 else Path(".depsim") / "runs" / run_key
        self.local.mkdir(parents=True, exist_ok=True)

    def write(self, name: str, frame: pl.DataFrame) -> str:
        path = self.local / f"{name}.parquet"
        frame.write_parquet(path)
        return self._publish(path)

    def read(self, name: str) -> pl.DataFrame:
        """A table of this run: the local copy, else the store's (written by another machine)."""
        path = self.local / f"{name}.parquet"
        if path.is_file() or not self.s3:
            return pl.read_parquet(path)
        return pl.read_parquet(s3_read_bytes(f"{self.uri}/{name}.parquet"))

    def write_text(self, name: str, text: str) -> str:
        path = self.local / name
        path.write_text(text, encoding="utf-8")
        return self._publish(path)

    def _publish(self, path: Path) -> str:
        """The file's address in the store: uploaded to S3 when the store is there."""
        if not self.s3:
            return str(path)
        uri = f"{self.uri}/{path.name}"
        bucket, key = _split(uri)
        _s3_client().put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
        return uri

    def write_json(self, name: str, data: Any) -> str:
        return self.write_text(name, json.dumps(data, indent=2, default=str))
