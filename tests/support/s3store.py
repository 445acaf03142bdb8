"""regproxy configurations whose stores are on the test SeaweedFS (`tests/support/seaweed.py`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from regproxy.config import Config
from tests.support.inprocess import make_config
from tests.support.seaweed import ACCESS_KEY, SECRET_KEY, SeaweedS3


def s3_table(engine: SeaweedS3, folder: Path, **extra: Any) -> dict[str, Any]:
    """An `[s3]` table for `engine`, the secret in a file (never in the configuration).

    `metadata_ttl` is 0 unless a test asks otherwise: most tests change a store from one
    process (a command) and check at once what another (the server) answers."""
    secret = folder / "s3-secret"
    folder.mkdir(parents=True, exist_ok=True)
    secret.write_text(SECRET_KEY + "\n")
    return {
        "endpoint": engine.endpoint,
        "region": "us-east-1",
        "access_key_id": ACCESS_KEY,
        "secret_access_key_file": str(secret),
        "metadata_ttl": "0s",
        **extra,
    }


def s3_config(
    engine: SeaweedS3, bucket: str, folder: Path, s3: dict[str, Any] | None = None, **extra: Any
) -> Config:
    """Both stores on `bucket` (prefixes `registry` and `proxy`), temporary storage local."""
    return make_config(
        folder,
        registry_storage=f"s3://{bucket}/registry",
        proxy_storage=f"s3://{bucket}/proxy",
        s3=s3_table(engine, folder, **(s3 or {})),
        **extra,
    )


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(str(value))  # a JSON string is a TOML basic string


def s3_section(engine: SeaweedS3, folder: Path, **extra: Any) -> str:
    """The `[s3]` table of `s3_table` as TOML text (for configuration files)."""
    lines = [
        "[s3]",
        *(f"{k} = {_toml_value(v)}" for k, v in s3_table(engine, folder, **extra).items()),
    ]
    return "\n".join(lines) + "\n"


def s3_store_env(bucket: str) -> dict[str, str]:
    """Environment overrides that put both stores of any configuration file on `bucket`
    (for `RegproxyProcess`, whose file names local folders)."""
    return {
        "REGPROXY_REGISTRY_STORAGE": f"s3://{bucket}/registry",
        "REGPROXY_PROXY_STORAGE": f"s3://{bucket}/proxy",
    }


def write_s3_config(
    engine: SeaweedS3,
    bucket: str,
    folder: Path,
    *,
    s3: dict[str, Any] | None = None,
    extra: str = "",
    upstreams: dict[str, str] | None = None,
) -> Path:
    """A configuration.toml with both stores on `bucket` and a local temporary folder;
    `extra` is top-level TOML placed before the tables. Returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        f'registry_storage = "s3://{bucket}/registry"',
        'temporary_registry_storage = "tmp"',
        f'proxy_storage = "s3://{bucket}/proxy"',
        extra,
        "",
        s3_section(engine, folder, **(s3 or {})),
    ]
    for name, url in (upstreams or {}).items():
        lines += [f'[proxy.upstreams."{name}"]', f"url = {json.dumps(url)}", ""]
    path = folder / "configuration.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def bucket_keys(engine: SeaweedS3, bucket: str, prefix: str = "") -> list[str]:
    """Every key of `bucket` under `prefix`, sorted."""
    client = engine.client()
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return sorted(keys)


def blob_key(prefix: str, digest: str) -> str:
    """The key of a blob in the store at `s3://bucket/<prefix>` (see storage/layout.py)."""
    algorithm, _, hex_ = digest.partition(":")
    return f"{prefix}/blobs/{algorithm}/{hex_[:2]}/{hex_}"


def multipart_uploads(engine: SeaweedS3, bucket: str) -> list[dict[str, Any]]:
    """The multipart uploads of `bucket` that were started and neither completed nor aborted."""
    return list(engine.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []))
