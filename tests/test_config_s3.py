"""Configuration of stores on S3: `s3://` store URLs, the `[s3]` section, its overrides.

A store URL stays a URL (`S3Location`), never a path made absolute; the temporary folder
is always local; `[s3]` keys have `REGPROXY_S3__…` overrides and one-line errors.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from regproxy import config as config_mod
from regproxy.config import Config, S3Config, S3Location
from regproxy.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
SEED = {
    "registry_storage": "storage/registry",
    "temporary_registry_storage": "storage/_tmp",
    "proxy_storage": "storage/proxy",
}


def build(raw: dict[str, Any], env: dict[str, str] | None = None) -> Config:
    return config_mod.from_mapping({**SEED, **raw}, Path("/base"), environ=env or {})


def error_of(raw: dict[str, Any], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        build(raw, env)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---- store locations ----------------------------------------------------------------------


def test_s3_stores_stay_urls() -> None:
    """An s3:// store is an S3Location (not a path under the config's folder); each store
    is on S3 or on disk independently."""
    config = build({"registry_storage": "s3://bucket/registry/", "proxy_storage": "cache"})
    assert config.registry_storage == S3Location("bucket", "registry")
    assert str(config.registry_storage) == "s3://bucket/registry"
    assert config.proxy_storage == Path("/base/cache")
    assert config.temporary_registry_storage == Path("/base/storage/_tmp")
    assert config.uses_s3
    config = build({"proxy_storage": "s3://bucket"})
    assert config.proxy_storage == S3Location("bucket", "")
    assert config.registry_storage == Path("/base/storage/registry")


def test_filesystem_stores_unchanged() -> None:
    """Without s3:// the stores are the absolute Paths every caller already takes."""
    config = build({})
    assert config.registry_storage == Path("/base/storage/registry")
    assert config.proxy_storage == Path("/base/storage/proxy")
    assert not config.uses_s3
    assert config.storage_dirs() == (
        Path("/base/storage/registry"),
        Path("/base/storage/_tmp"),
        Path("/base/storage/proxy"),
    )


def test_storage_dirs_are_local_folders_only() -> None:
    config = build({"registry_storage": "s3://bucket/r", "proxy_storage": "s3://bucket/p"})
    assert config.storage_dirs() == (Path("/base/storage/_tmp"),)


def test_temporary_storage_is_always_local() -> None:
    assert error_of({"temporary_registry_storage": "s3://bucket/tmp"}) == (
        "temporary_registry_storage: expected a local path, got the URL 's3://bucket/tmp' "
        "(only registry_storage and proxy_storage can be on S3)"
    )


def test_other_paths_refuse_urls() -> None:
    message = error_of({"auth": {"htpasswd": "https://example.com/htpasswd"}})
    assert message == (
        "auth.htpasswd: expected a local path, got the URL 'https://example.com/htpasswd'"
    )


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("s3:/bucket", "expected s3://BUCKET[/PREFIX]"),
        ("gs://bucket/x", "expected s3://BUCKET[/PREFIX]"),
        ("S3://bucket", "expected s3://BUCKET[/PREFIX]"),
        ("s3://Bucket_1", "is not an S3 bucket name"),
        ("s3://127.0.0.1:5311/bucket", "the endpoint goes in [s3] endpoint"),
        ("s3://bucket//registry", "empty, . or .. segment"),
        ("s3://bucket/../registry", "empty, . or .. segment"),
    ],
)
def test_bad_store_urls_name_the_key(url: str, needle: str) -> None:
    message = error_of({"proxy_storage": url})
    assert message.startswith("proxy_storage: ")
    assert needle in message


@pytest.mark.parametrize(
    ("registry", "proxy", "ok"),
    [
        ("s3://bucket/registry", "s3://bucket/proxy", True),
        ("s3://bucket/registry", "s3://bucket/registry2", True),
        ("s3://one/data", "s3://two/data", True),
        ("s3://bucket/registry", "s3://bucket/registry", False),
        ("s3://bucket/registry", "s3://bucket/registry/cache", False),
        ("s3://bucket/a/b", "s3://bucket/a", False),
        ("s3://bucket", "s3://bucket/proxy", False),
    ],
)
def test_stores_must_not_overlap(registry: str, proxy: str, ok: bool) -> None:
    """Cache eviction must never reach pushed images: one bucket holds both stores only
    under prefixes that do not nest."""
    raw = {"registry_storage": registry, "proxy_storage": proxy}
    if ok:
        build(raw)
    else:
        assert error_of(raw).startswith(f"proxy_storage: {proxy} overlaps registry_storage ")


# ---- [s3] ---------------------------------------------------------------------------------


def test_s3_defaults() -> None:
    """Defaults live in config.py: AWS itself, the AWS region and credentials chains, the
    bytes relayed (no redirect)."""
    assert build({}).s3 == S3Config()
    assert S3Config() == S3Config(
        endpoint=None,
        region=None,
        access_key_id=None,
        secret_access_key_env=None,
        secret_access_key_file=None,
        redirect=False,
        public_endpoint=None,
    )


def test_s3_section(tmp_path: Path) -> None:
    """The issue's example section, with the secret from a file next to the config."""
    path = tmp_path / "configuration.toml"
    path.write_text(
        'registry_storage = "s3://regproxy/registry"\n'
        'proxy_storage = "s3://regproxy/proxy"\n'
        'temporary_registry_storage = "storage/_tmp"\n'
        "[s3]\n"
        'endpoint = "http://127.0.0.1:5311/"\n'
        'region = "us-east-1"\n'
        'access_key_id = "AKID"\n'
        'secret_access_key_file = "s3-secret"\n'
        "redirect = true\n"
        'public_endpoint = "https://s3.example.com"\n'
    )
    (tmp_path / "s3-secret").write_text("sekrit\n")
    s3 = config_mod.load(path, environ={}).s3
    assert s3 == S3Config(
        endpoint="http://127.0.0.1:5311",
        region="us-east-1",
        access_key_id="AKID",
        secret_access_key_file=tmp_path / "s3-secret",
        redirect=True,
        public_endpoint="https://s3.example.com",
    )
    secret = s3.resolved_secret_access_key()
    assert secret == "sekrit"
    assert "sekrit" not in repr(secret) and "sekrit" not in repr(s3)


def test_secret_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RP_S3_SECRET", "from-env")
    s3 = build({"s3": {"access_key_id": "AKID", "secret_access_key_env": "RP_S3_SECRET"}}).s3
    assert s3.resolved_secret_access_key() == "from-env"
    monkeypatch.delenv("RP_S3_SECRET")
    with pytest.raises(ConfigError, match="environment variable RP_S3_SECRET is not set"):
        s3.resolved_secret_access_key()


def test_no_static_keys_means_the_aws_chain() -> None:
    assert (
        build({"s3": {"endpoint": "http://127.0.0.1:5311"}}).s3.resolved_secret_access_key() is None
    )


@pytest.mark.parametrize(
    ("s3", "message"),
    [
        ({"bogus": 1}, "s3.bogus: unknown configuration key"),
        ({"redirect": "yes"}, "s3.redirect: expected a boolean, got 'yes'"),
        ({"endpoint": 5311}, "s3.endpoint: expected a string, got 5311"),
        (
            {"endpoint": "127.0.0.1:5311"},
            "s3.endpoint: expected an http(s) URL, got '127.0.0.1:5311'",
        ),
        ({"public_endpoint": "s3.example.com"}, "s3.public_endpoint: expected an http(s) URL"),
        ({"access_key_id": "AKID"}, "s3.access_key_id: needs s3.secret_access_key_env or"),
        ({"secret_access_key_env": "X"}, "s3.secret_access_key_env: needs s3.access_key_id"),
        (
            {"access_key_id": "A", "secret_access_key_env": "X", "secret_access_key_file": "f"},
            "s3.secret_access_key_env and s3.secret_access_key_file: set one",
        ),
        ({"secret_access_key": "inline"}, "s3.secret_access_key: unknown configuration key"),
    ],
)
def test_s3_errors_name_the_key(s3: dict[str, Any], message: str) -> None:
    assert error_of({"s3": s3}).startswith(message)


# ---- environment overrides ----------------------------------------------------------------


def test_every_s3_key_has_an_override() -> None:
    env = {
        "REGPROXY_REGISTRY_STORAGE": "s3://bucket/registry",
        "REGPROXY_PROXY_STORAGE": "s3://bucket/proxy",
        "REGPROXY_S3__ENDPOINT": "http://127.0.0.1:5311",
        "REGPROXY_S3__REGION": "eu-central-1",
        "REGPROXY_S3__ACCESS_KEY_ID": "AKID",
        "REGPROXY_S3__SECRET_ACCESS_KEY_ENV": "RP_S3_SECRET",
        "REGPROXY_S3__REDIRECT": "true",
        "REGPROXY_S3__PUBLIC_ENDPOINT": "https://s3.example.com",
    }
    config = build({}, env)
    assert config.registry_storage == S3Location("bucket", "registry")
    assert config.proxy_storage == S3Location("bucket", "proxy")
    assert config.s3 == S3Config(
        endpoint="http://127.0.0.1:5311",
        region="eu-central-1",
        access_key_id="AKID",
        secret_access_key_env="RP_S3_SECRET",
        redirect=True,
        public_endpoint="https://s3.example.com",
    )
    env = {"REGPROXY_S3__SECRET_ACCESS_KEY_FILE": "secret", "REGPROXY_S3__ACCESS_KEY_ID": "A"}
    assert build({}, env).s3.secret_access_key_file == Path("/base/secret")


def test_override_beats_the_file_and_empty_means_unset() -> None:
    raw = {"s3": {"endpoint": "http://127.0.0.1:1", "public_endpoint": "http://a.example"}}
    env = {"REGPROXY_S3__ENDPOINT": "http://127.0.0.1:2", "REGPROXY_S3__PUBLIC_ENDPOINT": ""}
    s3 = build(raw, env).s3
    assert (s3.endpoint, s3.public_endpoint) == ("http://127.0.0.1:2", None)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"REGPROXY_S3__ENDPOINT": "ftp://x"},
            "s3.endpoint: expected an http(s) URL, got 'ftp://x' "
            "(from environment variable REGPROXY_S3__ENDPOINT)",
        ),
        (
            {"REGPROXY_S3__REDIRECT": "maybe"},
            "s3.redirect: expected a boolean, got 'maybe' "
            "(from environment variable REGPROXY_S3__REDIRECT)",
        ),
        (
            {"REGPROXY_TEMPORARY_REGISTRY_STORAGE": "s3://bucket/tmp"},
            "temporary_registry_storage: expected a local path, got the URL 's3://bucket/tmp' "
            "(only registry_storage and proxy_storage can be on S3) "
            "(from environment variable REGPROXY_TEMPORARY_REGISTRY_STORAGE)",
        ),
        (
            {"REGPROXY_REGISTRY_STORAGE": "s3://B"},
            "registry_storage: 'B' is not an S3 bucket name",
        ),
    ],
)
def test_bad_overrides_name_key_and_variable(env: dict[str, str], message: str) -> None:
    assert error_of({}, env).startswith(message)


# ---- the command line ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ('temporary_registry_storage = "s3://bucket/tmp"\n', "temporary_registry_storage: "),
        ('registry_storage = "s3://bucket"\nproxy_storage = "s3://bucket/p"\n', "overlaps"),
        ('[s3]\nendpoint = "localhost:5311"\n', "s3.endpoint: "),
    ],
)
@pytest.mark.parametrize("command", ["serve", "ls"])
def test_commands_refuse_bad_s3_config(
    tmp_path: Path, extra: str, needle: str, command: str
) -> None:
    """Exit code 2 and one line naming the key, before anything is created or dialled."""
    keys = {line.partition(" =")[0] for line in extra.splitlines()}
    seed = {k: v for k, v in SEED.items() if k not in keys}
    text = "".join(f'{k} = "{v}"\n' for k, v in seed.items()) + extra
    path = tmp_path / "configuration.toml"
    path.write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGPROXY_")}
    result = subprocess.run(
        [sys.executable, "-m", "regproxy", command, "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env={**env, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert result.returncode == 2, result
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("regproxy: configuration error: ")
    assert needle in line
    assert not (tmp_path / "storage").exists()
