"""The htpasswd user file: bcrypt only, reloads on change, no 5xx and no timing oracle."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import bcrypt
import pytest

from regproxy.access.htpasswd import Htpasswd, parse_htpasswd
from regproxy.errors import ConfigError
from tests.support.auth import Caller, RegistryFactory, fetch_token, write_htpasswd


def entry(user: str, password: bytes, rounds: int = 4) -> str:
    return f"{user}:{bcrypt.hashpw(password, bcrypt.gensalt(rounds=rounds)).decode()}"


def test_only_bcrypt_entries_are_accepted() -> None:
    assert set(parse_htpasswd("# users\n\n" + entry("a", b"x") + "\n")) == {"a"}
    for bad in ("a:{SHA}abc=", "a:$apr1$salt$hash", "a:plain", "nocolon", ":$2y$05$x"):
        with pytest.raises(ConfigError):
            parse_htpasswd(bad)


def test_long_passwords_and_malformed_entries(tmp_path: Path) -> None:
    """bcrypt (and `htpasswd -B`) use the first 72 bytes; bcrypt>=5 raises on longer
    input, which must be a refusal or a match, never an error."""
    long_password = b"p" * 100
    path = tmp_path / "htpasswd"
    path.write_text(
        "\n".join(
            [
                entry("long", long_password[:72]),  # as htpasswd -B stores it
                "broken:$2y$05$not-a-valid-bcrypt-hash",
            ]
        )
    )
    users = Htpasswd(path)
    assert users.check("long", long_password.decode())
    assert not users.check("long", "q" * 100)
    assert not users.check("broken", "anything")
    assert not users.check("nobody", "x" * 500)


def test_the_file_is_reloaded_when_it_changes(tmp_path: Path) -> None:
    path = write_htpasswd(tmp_path / "htpasswd", {"alice": "one"})
    users = Htpasswd(path)
    assert users.check("alice", "one")
    write_htpasswd(path, {"alice": "two", "carol": "three"})
    stat = path.stat()
    os.utime(path, (stat.st_atime, stat.st_mtime + 5))  # a new mtime even on coarse clocks
    assert not users.check("alice", "one")  # the cache of good checks is dropped too
    assert users.check("alice", "two")
    assert users.check("carol", "three")


def test_unknown_users_cost_what_known_users_cost(tmp_path: Path) -> None:
    """Checking a user who does not exist takes as long as a wrong password for one who
    does, whatever cost the file's entries use (a timing oracle would reveal user names)."""
    path = tmp_path / "htpasswd"
    path.write_text(entry("alice", b"secret", rounds=4) + "\n")
    users = Htpasswd(path)

    def median_seconds(user: str) -> float:
        samples = []
        for i in range(7):
            started = time.perf_counter()
            assert not users.check(user, f"wrong-{i}")
            samples.append(time.perf_counter() - started)
        return statistics.median(samples)

    known, unknown = median_seconds("alice"), median_seconds("mallory")
    assert unknown < known * 4 + 0.003, (known, unknown)


@pytest.mark.parametrize("mode", ["token", "basic"])
async def test_overlong_credentials_are_a_401(registry_factory: RegistryFactory, mode: str) -> None:
    registry = await registry_factory(mode, seed=False)
    client = registry.client
    for user, password in (("alice", "x" * 300), ("x" * 5000, "y"), ("alice", "é" * 50)):
        result = await Caller(user, password).request(client, "basic", "GET", "/v2/")
        assert result.status == 401, (user[:10], password[:10])
        if mode == "token":
            status, _ = await fetch_token(
                client, f"{registry.url}/auth/token", "regproxy", [], user, password
            )
            assert status == 401
            form = {"grant_type": "password", "username": user, "password": password}
            async with client.post("/auth/token", data=form) as resp:
                assert resp.status == 401
