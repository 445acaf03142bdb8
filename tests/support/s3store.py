"""regproxy configurations whose stores are on the test SeaweedFS (`tests/support/seaweed.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from regproxy.config import Config
from tests.support.inprocess import make_config
from tests.support.seaweed import ACCESS_KEY, SECRET_KEY, SeaweedS3


def s3_table(engine: SeaweedS3, folder: Path, **extra: Any) -> dict[str, Any]:
    """An `[s3]` table for `engine`, the secret in a file (never in the configuration)."""
    secret = folder / "s3-secret"
    folder.mkdir(parents=True, exist_ok=True)
    secret.write_text(SECRET_KEY + "\n")
    return {
        "endpoint": engine.endpoint,
        "region": "us-east-1",
        "access_key_id": ACCESS_KEY,
        "secret_access_key_file": str(secret),
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
