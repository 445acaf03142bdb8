"""`REGPROXY_*` environment overrides win over the file; bad values name key and variable."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from regproxy import config as config_mod
from regproxy.errors import ConfigError
from tests.support.processes import RegproxyProcess

pytestmark = pytest.mark.timeout(60)
REPO_ROOT = Path(__file__).resolve().parents[2]

FILE = """\
registry_storage = "registry"
temporary_registry_storage = "tmp"
proxy_storage = "proxy"

[server]
listen = "127.0.0.1:5000"

[log]
format = "text"
level = "info"

[metrics]
listen = "127.0.0.1:9100"

[proxy.upstreams."docker.io"]
url = "https://registry-1.docker.io"
username = "file-user"
password = "file-password"
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "configuration.toml"
    path.write_text(FILE)
    return path


def test_environment_wins_over_the_file(config_file: Path) -> None:
    env = {
        "REGPROXY_SERVER__LISTEN": "0.0.0.0:5005",
        "REGPROXY_LOG__FORMAT": "json",
        "REGPROXY_LOG__LEVEL": "debug",
        "REGPROXY_LOG__ACCESS": "false",
        "REGPROXY_METRICS__LISTEN": "127.0.0.1:9200",
        "REGPROXY_METRICS__STORE_SCAN_INTERVAL": "10m",
        "REGPROXY_HEALTH__MIN_FREE_SPACE": "2GiB",
        "REGPROXY_PROXY__UPSTREAMS__DOCKER_IO__PASSWORD": "0123",  # stays a string
        "REGPROXY_PROXY_STORAGE": "/srv/cache",
    }
    config = config_mod.load(config_file, environ=env)
    assert config.server.listen == "0.0.0.0:5005"
    assert config.log.format == "json" and config.log.level == "debug"
    assert config.log.access is False
    assert config.metrics.listen == "127.0.0.1:9200"
    assert config.metrics.store_scan_interval == 600
    assert config.health.min_free_space == 2 * 2**30
    upstream = config.proxy.upstreams["docker.io"]
    assert upstream.username == "file-user"  # untouched keys keep the file's value
    assert upstream.resolved_password() == "0123"
    assert config.proxy_storage == Path("/srv/cache")
    # without overrides, the file's values
    plain = config_mod.load(config_file, environ={})
    assert plain.server.listen == "127.0.0.1:5000" and plain.log.format == "text"
    assert plain.metrics.listen == "127.0.0.1:9100"


def test_defaults_of_the_new_tables(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        'registry_storage = "r"\ntemporary_registry_storage = "t"\nproxy_storage = "p"\n'
    )
    config = config_mod.load(path, environ={})
    assert (config.log.format, config.log.level, config.log.access) == ("text", "info", True)
    assert config.metrics.listen is None and config.metrics.store_scan_interval == 300
    assert config.health.min_free_space == 256 * 2**20


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("REGPROXY_SERVER__LISTEN", "nowhere", "server.listen: expected host:port"),
        ("REGPROXY_LOG__FORMAT", "xml", 'log.format: expected "text" or "json"'),
        ("REGPROXY_LOG__LEVEL", "loud", "log.level: expected one of debug, info"),
        ("REGPROXY_LOG__ACCESS", "maybe", "log.access: expected a boolean"),
        ("REGPROXY_METRICS__LISTEN", "9100", "metrics.listen: expected host:port"),
        ("REGPROXY_METRICS__STORE_SCAN_INTERVAL", "soon", "metrics.store_scan_interval:"),
        ("REGPROXY_HEALTH__MIN_FREE_SPACE", "plenty", "health.min_free_space: expected a size"),
        ("REGPROXY_PROXY__UPSTREAMS__DOCKER_IO__URL", "ftp://x", "proxy.upstreams.docker.io.url"),
        ("REGPROXY_SERVER__NO_SUCH_KEY", "1", "server.no_such_key: unknown configuration key"),
    ],
)
def test_bad_values_name_the_key_and_the_variable(
    config_file: Path, variable: str, value: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        config_mod.load(config_file, environ={variable: value})
    text = str(caught.value)
    assert text.startswith(message), text
    assert text.endswith(f"(from environment variable {variable})"), text


def test_a_bad_file_value_does_not_blame_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(FILE.replace('format = "text"', 'format = "yaml"'))
    with pytest.raises(ConfigError) as caught:
        config_mod.load(path, environ={"REGPROXY_LOG__LEVEL": "debug"})
    assert "environment" not in str(caught.value)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGPROXY_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return {**env, **extra}


def test_serve_refuses_a_bad_environment_value_with_one_line(config_file: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "regproxy", "serve", "-c", str(config_file)],
        capture_output=True,
        text=True,
        env=_clean_env(REGPROXY_LOG__FORMAT="xml"),
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        'regproxy: configuration error: log.format: expected "text" or "json", got \'xml\' '
        "(from environment variable REGPROXY_LOG__FORMAT)"
    ]


def test_serve_follows_the_environment(tmp_path: Path) -> None:
    """The file says text logs and no metrics listener; the environment says otherwise."""
    server = RegproxyProcess(
        tmp_path,
        extra_config='[log]\nformat = "text"\n',
        env={"REGPROXY_LOG__FORMAT": "json", "REGPROXY_METRICS__LISTEN": "127.0.0.1:0"},
    )
    server.start()
    assert server.process is not None
    try:
        match = server.process.wait_for_log(
            r"metrics listening on http://127\.0\.0\.1:(\d+)/metrics", timeout=10
        )
        with urllib.request.urlopen(f"{server.url}/v2/", timeout=10) as resp:
            assert resp.status == 200
        url = f"http://127.0.0.1:{match.group(1)}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        assert re.search(r'regproxy_http_requests_total\{.*route="/v2/".*\} 1\.0', text), text
    finally:
        server.stop()
    lines = server.process.log_text(current_run_only=True).splitlines()
    entries = [json.loads(line) for line in lines if not line.startswith("=== ")]
    assert entries and entries[-1]["message"] == "stopped"
