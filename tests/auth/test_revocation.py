"""Revoking a user takes effect for the next request (issue 11, item 3).

A user removed from the htpasswd file, or whose password changed, once kept
working from the cache of successful checks, and kept their tokens, for minutes.
Now every lookup notices a changed file, remembered checks are tied to the
user's entry, and tokens carry a stamp of that entry.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from regproxy.access.htpasswd import Htpasswd
from tests.support.auth import PASSWORDS, Caller, RegistryFactory, fetch_token, write_htpasswd
from tests.support.digests import sha256


def rewrite_same_size(path: Path, users: dict[str, str]) -> None:
    """Rewrite the file without moving its mtime: the change a stat can miss."""
    before = path.stat()
    write_htpasswd(path, users)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_a_removed_user_is_refused_at_once(tmp_path: Path) -> None:
    path = write_htpasswd(tmp_path / "htpasswd", {"alice": "one", "bob": "two"})
    users = Htpasswd(path)
    assert users.check("alice", "one")
    assert users.cached("alice", "one")
    write_htpasswd(path, {"bob": "two"})
    assert not users.cached("alice", "one")
    assert not users.check("alice", "one")
    assert users.stamp("alice") is None


def test_a_changed_password_is_noticed_even_with_the_same_mtime(tmp_path: Path) -> None:
    path = write_htpasswd(tmp_path / "htpasswd", {"alice": "one"})
    users = Htpasswd(path)
    assert users.check("alice", "one")
    stamp = users.stamp("alice")
    rewrite_same_size(path, {"alice": "uno"})  # same length, same mtime
    assert not users.cached("alice", "one")
    assert not users.check("alice", "one")
    assert users.check("alice", "uno")
    assert users.stamp("alice") != stamp


def test_a_broken_or_missing_file_admits_nobody(tmp_path: Path) -> None:
    path = write_htpasswd(tmp_path / "htpasswd", {"alice": "one"})
    users = Htpasswd(path)
    assert users.check("alice", "one")
    path.write_text("alice:{SHA}not-bcrypt\n")
    assert not users.cached("alice", "one")
    assert not users.check("alice", "one")
    path.unlink()
    assert not users.check("alice", "one")
    write_htpasswd(path, {"alice": "one"})
    assert users.check("alice", "one")


@pytest.mark.parametrize("mode", ["basic", "token"])
async def test_removed_user_cannot_push_or_pull(
    registry_factory: RegistryFactory, mode: str
) -> None:
    registry = await registry_factory(mode)
    alice = Caller("alice")
    path = "/v2/alice/app/manifests/v1"
    assert (await alice.request(registry.client, mode, "GET", path)).status == 200
    htpasswd = registry.config.auth.htpasswd
    assert htpasswd is not None
    write_htpasswd(htpasswd, {u: p for u, p in PASSWORDS.items() if u != "alice"})
    assert (await alice.request(registry.client, mode, "GET", path)).status == 401
    blob = os.urandom(100)
    push = await alice.request(
        registry.client, mode, "POST", f"/v2/alice/app/blobs/uploads/?digest={sha256(blob)}", blob
    )
    assert push.status == 401


async def test_tokens_die_with_the_password_entry(registry_factory: RegistryFactory) -> None:
    registry = await registry_factory("token")
    client = registry.client
    realm, service = f"{registry.url}/auth/token", registry.config.auth.service
    status, answer = await fetch_token(
        client, realm, service, ["repository:alice/app:pull,push"], "alice"
    )
    assert status == 200
    headers = {"Authorization": f"Bearer {answer['token']}"}
    path = "/v2/alice/app/manifests/v1"
    async with client.get(path, headers=headers) as resp:
        assert resp.status == 200
    htpasswd = registry.config.auth.htpasswd
    assert htpasswd is not None
    # the password changes: the token issued for the old one is dead, the old password too
    write_htpasswd(htpasswd, {**PASSWORDS, "alice": "a-new-secret"})
    async with client.get(path, headers=headers) as resp:
        assert resp.status == 401
        assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
    status, _ = await fetch_token(client, realm, service, ["repository:alice/app:pull"], "alice")
    assert status == 401
    status, answer = await fetch_token(
        client, realm, service, ["repository:alice/app:pull"], "alice", "a-new-secret"
    )
    assert status == 200
    async with client.get(path, headers={"Authorization": f"Bearer {answer['token']}"}) as resp:
        assert resp.status == 200
    # and removal
    write_htpasswd(htpasswd, {u: p for u, p in PASSWORDS.items() if u != "alice"})
    async with client.get(path, headers={"Authorization": f"Bearer {answer['token']}"}) as resp:
        assert resp.status == 401


async def test_anonymous_tokens_survive_file_changes(registry_factory: RegistryFactory) -> None:
    registry = await registry_factory("token")
    status, answer = await fetch_token(
        registry.client,
        f"{registry.url}/auth/token",
        registry.config.auth.service,
        ["repository:public/app:pull"],
    )
    assert status == 200
    htpasswd = registry.config.auth.htpasswd
    assert htpasswd is not None
    write_htpasswd(htpasswd, {"someone": "else"})
    headers = {"Authorization": f"Bearer {answer['token']}"}
    async with registry.client.get("/v2/public/app/manifests/v1", headers=headers) as resp:
        assert resp.status == 200
