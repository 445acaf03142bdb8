"""Repository-name and tag grammar from the distribution spec, and proxy-path parsing.

Every name and tag is validated here before it reaches the filesystem, so the
path layout can trust them: a valid name has no `..`, no empty component and
no component starting with `_` or `.`.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

from regproxy.errors import NameInvalid, NameUnknown, TagInvalid

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
#: distribution caps the whole name at 255 characters; so do we.
MAX_NAME_LENGTH = 255

DOCKER_HUB_UPSTREAM = "docker.io"


def validate_name(name: str) -> str:
    """Return `name` if it follows the spec's grammar, else raise `NameInvalid`."""
    if len(name) > MAX_NAME_LENGTH or not NAME_RE.fullmatch(name):
        raise NameInvalid(f"invalid repository name {name[:300]!r}", detail={"name": name[:300]})
    return name


def validate_tag(tag: str) -> str:
    """Return `tag` if it follows the spec's grammar, else raise `TagInvalid`."""
    if not TAG_RE.fullmatch(tag):
        raise TagInvalid(f"invalid tag {tag[:200]!r}", detail={"tag": tag[:200]})
    return tag


@dataclass(frozen=True, slots=True)
class ProxyName:
    """A name under the proxy prefix: which upstream, and the name to ask it for."""

    upstream: str
    remote: str
    local: str  # the full local name, `p/<upstream>/<name>`


def remote_name(upstream: str, name: str) -> str:
    """The upstream's name for `name`: Docker Hub puts single components under `library/`."""
    if upstream == DOCKER_HUB_UPSTREAM and "/" not in name:
        return f"library/{name}"
    return name


def under_prefix(name: str, prefix: str) -> bool:
    """Whether `name` is in the proxy namespace: the prefix itself or anything below it."""
    return name == prefix or name.startswith(prefix + "/")


def split_proxy_name(name: str, prefix: str, upstreams: Collection[str]) -> ProxyName | None:
    """Parse `<prefix>/<upstream>/<name>`; None when `name` is not under the prefix.

    An upstream that is not configured is `NAME_UNKNOWN`: it is never dialled.
    """
    if not under_prefix(name, prefix):
        return None
    _, _, rest = name.partition("/")
    upstream, sep, remote = rest.partition("/")
    if not sep or not remote:
        raise NameUnknown(f"{name!r} names no image under an upstream", detail={"name": name})
    if upstream not in upstreams:
        raise NameUnknown(f"upstream {upstream[:100]!r} is not configured", detail={"name": name})
    return ProxyName(upstream, remote_name(upstream, validate_name(remote)), name)


#: What an upstream may be called: a registry host, optionally with a port (as containerd's
#: `?ns=` names it), in lower case.
UPSTREAM_NAME_RE = re.compile(r"[a-z0-9]+(?:[.-][a-z0-9]+)*(?::[0-9]{1,5})?")


def upstream_storage_key(upstream: str) -> str:
    """The upstream as a valid repository-name component (`host:port` → `host__port`)."""
    return upstream.replace(":", "__")
