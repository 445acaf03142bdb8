"""Configuration loading: the seed's keys, errors that name the key, units, env overrides, CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from regproxy import __version__
from regproxy import config as config_mod
from regproxy.config import Config, parse_duration, parse_size
from regproxy.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
SEED = {
    "registry_storage": "storage/registry",
    "temporary_registry_storage": "storage/_tmp",
    "proxy_storage": "storage/proxy",
}


def build(raw: dict[str, Any], env: dict[str, str] | None = None) -> Config:
    return config_mod.from_mapping(raw, Path("/base"), environ=env or {})


def error_of(raw: dict[str, Any], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        build(raw, env)
    return str(info.value)


def write(tmp_path: Path, text: str, name: str = "configuration.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- the seed's keys and defaults -------------------------------------------------------


def test_seed_keys(tmp_path: Path) -> None:
    """The three seed keys alone are a valid file; relative paths follow the file's folder."""
    path = write(
        tmp_path,
        'registry_storage = "storage/registry"\n'
        'temporary_registry_storage = "/abs/tmp"\n'
        'proxy_storage = "~/proxy"\n',
    )
    config = config_mod.load(path, environ={})
    assert config.registry_storage == tmp_path / "storage/registry"
    assert config.temporary_registry_storage == Path("/abs/tmp")
    assert config.proxy_storage == Path("~/proxy").expanduser()
    assert config.source == path
    assert config.storage_dirs() == (
        config.registry_storage,
        config.temporary_registry_storage,
        config.proxy_storage,
    )


def test_defaults() -> None:
    config = build(dict(SEED))
    assert config.server.listen == "127.0.0.1:5000"
    assert (config.server.host, config.server.port) == ("127.0.0.1", 5000)
    assert config.server.upload_max_age == 86400
    assert config.proxy.prefix == "p"
    assert config.proxy.upstreams == {}
    assert config.proxy_max_size is None
    assert config.server.direct_writes is True


def test_direct_writes_switch() -> None:
    """`server.direct_writes` is a bool, from the file or the environment."""
    assert build({**SEED, "server": {"direct_writes": False}}).server.direct_writes is False
    env = {"REGPROXY_SERVER__DIRECT_WRITES": "false"}
    assert build(dict(SEED), env).server.direct_writes is False
    assert error_of({**SEED, "server": {"direct_writes": "sometimes"}}).startswith(
        "server.direct_writes"
    )


def test_default_file_is_cwd_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "\n".join(f'{k} = "{v}"' for k, v in SEED.items()))
    monkeypatch.chdir(tmp_path)
    config = config_mod.load(None, environ={})
    assert config.registry_storage == tmp_path / "storage/registry"


def test_sample_configuration_loads() -> None:
    """The repository's own configuration.toml is valid."""
    config = config_mod.load(REPO_ROOT / "configuration.toml", environ={})
    assert config.registry_storage.is_absolute()
    assert "docker.io" in config.proxy.upstreams


def test_listen_forms() -> None:
    config = build({**SEED, "server": {"listen": "[::1]:5001"}})
    assert (config.server.host, config.server.port) == ("::1", 5001)
    config = build({**SEED, "server": {"listen": "0.0.0.0:0"}})
    assert config.server.port == 0


def test_upstreams() -> None:
    config = build(
        {
            **SEED,
            "proxy": {
                "upstreams": {
                    "docker.io": {"url": "https://registry-1.docker.io", "tag_ttl": "10m"},
                    "local": {"url": "http://127.0.0.1:5001", "username": "u", "password": "pw"},
                },
                "mirror_upstream": "docker.io",
            },
        }
    )
    assert config.proxy.upstreams["docker.io"].tag_ttl == 600
    local = config.proxy.upstreams["local"]
    assert local.resolved_password() == "pw"
    assert "pw" not in repr(local)
    assert config.proxy.mirror_upstream == "docker.io"


# ---- errors name the dotted key ---------------------------------------------------------


@pytest.mark.parametrize("missing", list(SEED))
def test_missing_seed_key(missing: str) -> None:
    raw = {k: v for k, v in SEED.items() if k != missing}
    assert error_of(raw).startswith(f"{missing}:")


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"bogus": 1}, "bogus"),
        ({"server": {"bogus": 1}}, "server.bogus"),
        ({"server": {"listen": "1.2.3.4:5", "lsiten": "x"}}, "server.lsiten"),
        (
            {"proxy": {"upstreams": {"x": {"url": "https://x", "pasword": "p"}}}},
            "proxy.upstreams.x.pasword",
        ),
        ({"proxy": {"upstreams": {"x": {}}}}, "proxy.upstreams.x.url"),
    ],
)
def test_unknown_or_missing_nested_key(raw: dict[str, Any], key: str) -> None:
    assert error_of({**SEED, **raw}).startswith(f"{key}:")


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"registry_storage": 5}, "registry_storage"),
        ({"registry_storage": ""}, "registry_storage"),
        ({"proxy_storage": ["a"]}, "proxy_storage"),
        ({"server": "127.0.0.1:5000"}, "server"),
        ({"server": {"listen": 5000}}, "server.listen"),
        ({"server": {"listen": "localhost"}}, "server.listen"),
        ({"server": {"listen": "localhost:99999"}}, "server.listen"),
        ({"server": {"upload_max_age": "soon"}}, "server.upload_max_age"),
        ({"server": {"upload_max_age": True}}, "server.upload_max_age"),
        ({"server": {"upload_max_age": -5}}, "server.upload_max_age"),
        ({"proxy_max_size": "lots"}, "proxy_max_size"),
        ({"proxy_max_size": 1.5}, "proxy_max_size"),
        ({"proxy_max_size": -1}, "proxy_max_size"),
        ({"proxy": {"prefix": "P/x"}}, "proxy.prefix"),
        ({"proxy": {"upstreams": []}}, "proxy.upstreams"),
        ({"proxy": {"upstreams": {"x": "https://x"}}}, "proxy.upstreams.x"),
        ({"proxy": {"upstreams": {"x": {"url": "ftp://x"}}}}, "proxy.upstreams.x.url"),
        (
            {"proxy": {"upstreams": {"x": {"url": "https://x", "tag_ttl": "1 fortnight"}}}},
            "proxy.upstreams.x.tag_ttl",
        ),
        (
            {"proxy": {"upstreams": {"x": {"url": "https://x", "password": 5}}}},
            "proxy.upstreams.x.password",
        ),
        ({"proxy": {"mirror_upstream": "nowhere"}}, "proxy.mirror_upstream"),
    ],
)
def test_wrong_types_name_the_key(raw: dict[str, Any], key: str) -> None:
    merged = {**SEED, **raw}
    message = error_of(merged)
    assert message.startswith(f"{key}:") or message.startswith(f"{key} "), message
    assert "\n" not in message


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        config_mod.load(tmp_path / "absent.toml", environ={})
    with pytest.raises(ConfigError, match="invalid TOML"):
        config_mod.load(write(tmp_path, "registry_storage = [unclosed"), environ={})
    path = tmp_path / "binary.toml"
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="UTF-8"):
        config_mod.load(path, environ={})


# ---- durations and sizes ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (90, 90),
        (1.5, 1.5),
        ("90", 90),
        ("90s", 90),
        ("250ms", 0.25),
        ("5m", 300),
        ("1h", 3600),
        ("7d", 604800),
        ("2w", 1209600),
        (" 3 m ", 180),
        ("0", 0),
    ],
)
def test_durations(text: Any, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "m", "5y", "-5s", "5 minutes", True, None, [1]])
def test_bad_durations(bad: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (1024, 1024),
        ("1024", 1024),
        ("1k", 1024),
        ("1KiB", 1024),
        ("1kB", 1000),
        ("512MiB", 512 * 2**20),
        ("10GB", 10 * 10**9),
        ("1.5G", int(1.5 * 2**30)),
        ("2TiB", 2 * 2**40),
        ("100b", 100),
        ("0", 0),
    ],
)
def test_sizes(text: Any, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["", "MiB", "5 apples", "-1", True, 1.5, None])
def test_bad_sizes(bad: Any) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


def test_units_in_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "\n".join(f'{k} = "{v}"' for k, v in SEED.items())
        + '\nproxy_max_size = "20GiB"\n[server]\nupload_max_age = "2h"\nshutdown_timeout = 5\n',
    )
    config = config_mod.load(path, environ={})
    assert config.proxy_max_size == 20 * 2**30
    assert config.server.upload_max_age == 7200
    assert config.server.shutdown_timeout == 5


# ---- REGPROXY_* environment overrides ---------------------------------------------------


def test_env_overrides_top_level_and_nested() -> None:
    config = build(
        dict(SEED),
        {
            "REGPROXY_REGISTRY_STORAGE": "/srv/registry",
            "REGPROXY_SERVER__LISTEN": "0.0.0.0:5005",
            "REGPROXY_SERVER__UPLOAD_MAX_AGE": "30m",
            "REGPROXY_PROXY_MAX_SIZE": "1GiB",
            "REGPROXY_SERVER__SHUTDOWN_TIMEOUT": "3",
            "UNRELATED": "ignored",
            "REGPROXY_CONFIG": "/not/a/key.toml",
        },
    )
    assert config.registry_storage == Path("/srv/registry")
    assert config.server.listen == "0.0.0.0:5005"
    assert config.server.upload_max_age == 1800
    assert config.proxy_max_size == 2**30
    assert config.server.shutdown_timeout == 3


def test_env_override_beats_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "\n".join(f'{k} = "{v}"' for k, v in SEED.items()) + '\n[server]\nlisten = "1.1.1.1:1"\n',
    )
    config = config_mod.load(path, environ={"REGPROXY_SERVER__LISTEN": "127.0.0.1:7000"})
    assert config.server.listen == "127.0.0.1:7000"


def test_env_matches_keys_with_dots() -> None:
    """`docker.io` is addressed as DOCKER_IO; a numeric value stays a string for strings."""
    raw = {**SEED, "proxy": {"upstreams": {"docker.io": {"url": "https://registry-1.docker.io"}}}}
    config = build(
        raw,
        {
            "REGPROXY_PROXY__UPSTREAMS__DOCKER_IO__USERNAME": "bob",
            "REGPROXY_PROXY__UPSTREAMS__DOCKER_IO__PASSWORD": "123456",
            "REGPROXY_PROXY__UPSTREAMS__DOCKER_IO__TAG_TTL": "60",
        },
    )
    upstream = config.proxy.upstreams["docker.io"]
    assert upstream.username == "bob"
    assert upstream.resolved_password() == "123456"
    assert upstream.tag_ttl == 60
    assert set(config.proxy.upstreams) == {"docker.io"}


def test_env_errors_name_the_key() -> None:
    assert error_of(dict(SEED), {"REGPROXY_BOGUS": "1"}).startswith("bogus:")
    assert error_of(dict(SEED), {"REGPROXY_SERVER__NOPE": "1"}).startswith("server.nope:")
    message = error_of(dict(SEED), {"REGPROXY_SERVER__UPLOAD_MAX_AGE": "true"})
    assert message.startswith("server.upload_max_age:")


def test_env_from_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an explicit mapping, os.environ is read."""
    monkeypatch.setenv("REGPROXY_SERVER__LISTEN", "127.0.0.1:6553")
    config = config_mod.from_mapping(dict(SEED), Path("/base"))
    assert config.server.listen == "127.0.0.1:6553"


def test_password_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "secret"
    secret.write_text("from-file\n")
    monkeypatch.setenv("MY_PW", "from-env")
    raw = {
        **SEED,
        "proxy": {
            "upstreams": {
                "a": {"url": "https://a", "password_env": "MY_PW"},
                "b": {"url": "https://b", "password_file": str(secret)},
                "c": {"url": "https://c", "password_env": "NOT_SET_ANYWHERE_42"},
            }
        },
    }
    config = build(raw)
    assert config.proxy.upstreams["a"].resolved_password() == "from-env"
    assert config.proxy.upstreams["b"].resolved_password() == "from-file"
    with pytest.raises(ConfigError, match="NOT_SET_ANYWHERE_42"):
        config.proxy.upstreams["c"].resolved_password()


# ---- the command line -------------------------------------------------------------------


def _regproxy(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGPROXY_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "regproxy", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd or REPO_ROOT,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def test_version() -> None:
    result = _regproxy("--version")
    assert result.returncode == 0
    assert __version__ in result.stdout
    assert result.stdout.startswith("regproxy")


SEED_TOML = "\n".join(f'{k} = "{v}"' for k, v in SEED.items()) + "\n"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (SEED_TOML + "bogus = 1\n", "bogus"),
        (SEED_TOML + "[server]\nlisten = 5000\n", "server.listen"),
        (SEED_TOML + '[server]\nupload_max_age = "later"\n', "server.upload_max_age"),
        ('registry_storage = "r"\n', "temporary_registry_storage"),
        ("registry_storage = [\n", "invalid TOML"),
    ],
)
def test_serve_refuses_bad_config(tmp_path: Path, text: str, needle: str) -> None:
    """`serve` with a bad configuration: exit code 2 and one line naming the problem."""
    path = write(tmp_path, text)
    result = _regproxy("serve", "-c", str(path), "--listen", "127.0.0.1:0")
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0]
    assert lines[0].startswith("regproxy: ")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()


def test_serve_missing_config_file(tmp_path: Path) -> None:
    result = _regproxy("serve", "-c", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "not found" in result.stderr


def test_serve_without_config_in_cwd(tmp_path: Path) -> None:
    result = _regproxy("serve", cwd=tmp_path)
    assert result.returncode == 2
    assert "configuration.toml" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("listen", ["nonsense", "127.0.0.1:99999", ":80"])
def test_serve_bad_listen_flag(tmp_path: Path, listen: str) -> None:
    path = write(tmp_path, SEED_TOML)
    result = _regproxy("serve", "-c", str(path), "--listen", listen)
    assert result.returncode == 2, result
    assert len(result.stderr.strip().splitlines()) == 1
    assert "listen" in result.stderr
